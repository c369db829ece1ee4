//! The server side of the WebSocket opening handshake (RFC 6455 §4.2) and the choice of
//! subprotocol (SPEC §4). Checks the head; authentication and origin policy belong to the caller.

use crate::envelope::Format;
use crate::http::RequestHead;

/// The native subprotocols, in no particular order (the client's order decides).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Subprotocol {
    /// `ringhub.v1.json`: JSON in text frames (the default when none is offered).
    Json,
    /// `ringhub.v1.json+zstd`: as `Json`, and either side may send zstd frames in binary frames.
    JsonZstd,
    /// `ringhub.v1.msgpack`: MessagePack in binary frames.
    Msgpack,
    /// `ringhub.v1.msgpack+zstd`: as `Msgpack`, with zstd.
    MsgpackZstd,
}

impl Subprotocol {
    /// All four, for tests and for the load generator.
    pub const ALL: [Subprotocol; 4] =
        [Self::Json, Self::JsonZstd, Self::Msgpack, Self::MsgpackZstd];

    /// The `Sec-WebSocket-Protocol` token.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Json => "ringhub.v1.json",
            Self::JsonZstd => "ringhub.v1.json+zstd",
            Self::Msgpack => "ringhub.v1.msgpack",
            Self::MsgpackZstd => "ringhub.v1.msgpack+zstd",
        }
    }

    /// Parses a token (exact, case-sensitive as RFC 6455 requires).
    pub fn from_token(token: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|p| p.as_str() == token)
    }

    /// The envelope encoding.
    pub const fn format(self) -> Format {
        match self {
            Self::Json | Self::JsonZstd => Format::Json,
            Self::Msgpack | Self::MsgpackZstd => Format::MsgPack,
        }
    }

    /// Whether zstd frames are allowed both ways.
    pub const fn zstd(self) -> bool {
        matches!(self, Self::JsonZstd | Self::MsgpackZstd)
    }
}

/// Why an upgrade request was refused; each maps to an HTTP status.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HandshakeError {
    /// Not a GET over HTTP/1.1 with `Upgrade: websocket` and `Connection: upgrade` (400).
    #[error("not a WebSocket upgrade request: {0}")]
    NotUpgrade(&'static str),
    /// `Sec-WebSocket-Version` is not 13 (426, with `Sec-WebSocket-Version: 13`).
    #[error("unsupported WebSocket version")]
    UnsupportedVersion,
    /// `Sec-WebSocket-Key` missing or not 16 base64-encoded bytes (400).
    #[error("missing or malformed Sec-WebSocket-Key")]
    BadKey,
    /// Subprotocols were offered and none is ours (400 `unsupported`).
    #[error(
        "no supported subprotocol offered; supported: ringhub.v1.json, ringhub.v1.json+zstd, ringhub.v1.msgpack, ringhub.v1.msgpack+zstd"
    )]
    NoSupportedSubprotocol,
}

impl HandshakeError {
    /// The HTTP status this refusal answers with.
    pub const fn status(&self) -> u16 {
        match self {
            Self::UnsupportedVersion => 426,
            _ => 400,
        }
    }
}

/// What a valid upgrade request carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpgradeRequest {
    /// The client's `Sec-WebSocket-Key`, as sent.
    pub key: String,
    /// The offered subprotocols, in the client's order (empty when none).
    pub offered: Vec<String>,
}

/// Checks the head of an upgrade request (method, version, headers, key).
pub fn check_upgrade(head: &RequestHead) -> Result<UpgradeRequest, HandshakeError> {
    if head.method != "GET" {
        return Err(HandshakeError::NotUpgrade("method must be GET"));
    }
    if head.minor_version < 1 {
        return Err(HandshakeError::NotUpgrade("HTTP/1.1 required"));
    }
    if !head.header_has_token("upgrade", "websocket") {
        return Err(HandshakeError::NotUpgrade("missing Upgrade: websocket"));
    }
    if !head.header_has_token("connection", "upgrade") {
        return Err(HandshakeError::NotUpgrade("missing Connection: upgrade"));
    }
    if head.header("sec-websocket-version").map(<[u8]>::trim_ascii) != Some(b"13") {
        return Err(HandshakeError::UnsupportedVersion);
    }
    let key = head
        .header_str("sec-websocket-key")
        .map(str::trim)
        .ok_or(HandshakeError::BadKey)?;
    if !is_valid_key(key) {
        return Err(HandshakeError::BadKey);
    }
    let offered = head
        .headers_named("sec-websocket-protocol")
        .filter_map(|v| std::str::from_utf8(v).ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .take(32)
        .map(str::to_owned)
        .collect();
    Ok(UpgradeRequest {
        key: key.to_owned(),
        offered,
    })
}

/// A key is the base64 of 16 bytes: 22 significant characters and `==`.
fn is_valid_key(key: &str) -> bool {
    let b = key.as_bytes();
    b.len() == 24
        && b[22..] == *b"=="
        && b[..22].iter().all(|&c| c.is_ascii_alphanumeric() || c == b'+' || c == b'/')
        // the last significant character carries 2 bits of padding that must be zero
        && b"AQgw".contains(&b[21])
}

/// SPEC §4: the first offered token we support, in the client's order; `Json` when none is
/// offered; an error when some are offered and none is ours.
pub fn select_subprotocol(offered: &[String]) -> Result<(Subprotocol, bool), HandshakeError> {
    if offered.is_empty() {
        return Ok((Subprotocol::Json, false));
    }
    offered
        .iter()
        .find_map(|t| Subprotocol::from_token(t))
        .map(|p| (p, true))
        .ok_or(HandshakeError::NoSupportedSubprotocol)
}

/// Writes the `101 Switching Protocols` response. `protocol` is echoed in
/// `Sec-WebSocket-Protocol` when the client offered one.
pub fn write_accept(out: &mut Vec<u8>, key: &str, protocol: Option<Subprotocol>) {
    let accept = tungstenite::handshake::derive_accept_key(key.as_bytes());
    out.extend_from_slice(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: ");
    out.extend_from_slice(accept.as_bytes());
    if let Some(p) = protocol {
        out.extend_from_slice(b"\r\nSec-WebSocket-Protocol: ");
        out.extend_from_slice(p.as_str().as_bytes());
    }
    out.extend_from_slice(b"\r\n\r\n");
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::{HttpLimits, parse_request_head};

    fn head(extra: &str) -> RequestHead {
        let raw = format!(
            "GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: keep-alive, Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n"
        );
        parse_request_head(raw.as_bytes(), &HttpLimits::default())
            .unwrap()
            .unwrap()
    }

    #[test]
    fn rfc6455_accept_key_example() {
        // RFC 6455 §1.3: key "dGhlIHNhbXBsZSBub25jZQ==" -> "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=".
        let up = check_upgrade(&head("")).unwrap();
        let mut out = Vec::new();
        write_accept(&mut out, &up.key, None);
        let text = String::from_utf8(out).unwrap();
        assert!(text.contains("Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n"));
        assert!(!text.contains("Sec-WebSocket-Protocol"));
    }

    #[test]
    fn subprotocol_follows_the_clients_order() {
        let up = check_upgrade(&head("Sec-WebSocket-Protocol: chat, ringhub.v1.msgpack+zstd\r\nSec-WebSocket-Protocol: ringhub.v1.json\r\n")).unwrap();
        assert_eq!(
            select_subprotocol(&up.offered),
            Ok((Subprotocol::MsgpackZstd, true))
        );
        assert_eq!(select_subprotocol(&[]), Ok((Subprotocol::Json, false)));
        assert_eq!(
            select_subprotocol(&["chat".to_owned(), "RINGHUB.V1.JSON".to_owned()]),
            Err(HandshakeError::NoSupportedSubprotocol)
        );
        let mut out = Vec::new();
        write_accept(&mut out, &up.key, Some(Subprotocol::MsgpackZstd));
        assert!(
            String::from_utf8(out)
                .unwrap()
                .contains("Sec-WebSocket-Protocol: ringhub.v1.msgpack+zstd\r\n")
        );
    }

    #[test]
    fn refuses_bad_versions_and_keys() {
        let raw = "GET /ws HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 8\r\n\r\n";
        let h = parse_request_head(raw.as_bytes(), &HttpLimits::default())
            .unwrap()
            .unwrap();
        assert_eq!(check_upgrade(&h), Err(HandshakeError::UnsupportedVersion));
        assert_eq!(HandshakeError::UnsupportedVersion.status(), 426);
        let raw = raw
            .replace("Version: 8", "Version: 13")
            .replace("dGhlIHNhbXBsZSBub25jZQ==", "short");
        let h = parse_request_head(raw.as_bytes(), &HttpLimits::default())
            .unwrap()
            .unwrap();
        assert_eq!(check_upgrade(&h), Err(HandshakeError::BadKey));
        let raw = "POST /ws HTTP/1.1\r\n\r\n";
        let h = parse_request_head(raw.as_bytes(), &HttpLimits::default())
            .unwrap()
            .unwrap();
        assert!(matches!(
            check_upgrade(&h),
            Err(HandshakeError::NotUpgrade(_))
        ));
    }
}
