//! HTTP/1.1 request heads (parsed with httparse, bounded) and the response writer.
//!
//! Owns the bytes of one request head and one response; knows nothing of routes, bodies' meaning
//! or sockets. Bodies are framed by `Content-Length` only: `Transfer-Encoding` is refused, which
//! also closes the request-smuggling door of a head that carries both.

use std::borrow::Cow;

/// Bounds on a request head a peer sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HttpLimits {
    /// Most header lines accepted (at most [`HttpLimits::HEADER_CAP`]).
    pub max_headers: usize,
    /// Most bytes of request line plus headers, CRLFCRLF included.
    pub max_head_bytes: usize,
    /// Largest `Content-Length` accepted (SPEC §2: 64 KiB).
    pub max_body_bytes: usize,
}

impl HttpLimits {
    /// The hard ceiling for `max_headers`: the parser's header table lives on the stack.
    pub const HEADER_CAP: usize = 128;
}

impl Default for HttpLimits {
    fn default() -> Self {
        Self {
            max_headers: 64,
            max_head_bytes: 16 * 1024,
            max_body_bytes: 64 * 1024,
        }
    }
}

/// Why a request head was refused. Each maps to one HTTP status at the edge.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HttpError {
    /// The head exceeds `max_head_bytes` (431).
    #[error("request head larger than {0} bytes")]
    HeadTooLarge(usize),
    /// More header lines than `max_headers` (431).
    #[error("more than {0} headers")]
    TooManyHeaders(usize),
    /// Not parseable as HTTP/1.x (400).
    #[error("malformed request head: {0}")]
    Malformed(&'static str),
    /// `Content-Length` missing where needed, repeated with different values, or not a number (400).
    #[error("invalid Content-Length")]
    BadContentLength,
    /// `Content-Length` above `max_body_bytes` (413).
    #[error("body larger than {0} bytes")]
    BodyTooLarge(usize),
    /// `Transfer-Encoding` (chunked bodies) is not supported (501).
    #[error("Transfer-Encoding is not supported")]
    TransferEncodingUnsupported,
}

impl HttpError {
    /// The HTTP status this error answers with.
    pub const fn status(&self) -> u16 {
        match self {
            Self::HeadTooLarge(_) | Self::TooManyHeaders(_) => 431,
            Self::Malformed(_) | Self::BadContentLength => 400,
            Self::BodyTooLarge(_) => 413,
            Self::TransferEncodingUnsupported => 501,
        }
    }
}

/// One header line; the name is kept as sent, compared case-insensitively.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// Header name.
    pub name: String,
    /// Raw value bytes (may be non-UTF-8).
    pub value: Vec<u8>,
}

/// A parsed request head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestHead {
    /// Method, as sent (`GET`, `POST`, …).
    pub method: String,
    /// Request target: path plus optional `?query`.
    pub target: String,
    /// 0 for HTTP/1.0, 1 for HTTP/1.1.
    pub minor_version: u8,
    /// Header lines in order.
    pub headers: Vec<Header>,
    /// Bytes of the head, CRLFCRLF included: the body (if any) starts here.
    pub head_len: usize,
    /// The validated `Content-Length` (0 when absent).
    pub content_length: usize,
}

impl RequestHead {
    /// The first header with this name (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .map(|h| h.value.as_slice())
    }

    /// The first header with this name, if it is valid UTF-8.
    pub fn header_str(&self, name: &str) -> Option<&str> {
        self.header(name).and_then(|v| std::str::from_utf8(v).ok())
    }

    /// Every value of a header that may repeat, in order.
    pub fn headers_named<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a [u8]> + 'a {
        self.headers
            .iter()
            .filter(move |h| h.name.eq_ignore_ascii_case(name))
            .map(|h| &h.value[..])
    }

    /// Whether a comma-separated header (e.g. `Connection`) contains `token`, ignoring case.
    pub fn header_has_token(&self, name: &str, token: &str) -> bool {
        self.headers_named(name).any(|v| {
            v.split(|&b| b == b',')
                .any(|part| part.trim_ascii().eq_ignore_ascii_case(token.as_bytes()))
        })
    }

    /// The path, without the query string.
    pub fn path(&self) -> &str {
        self.target.split_once('?').map_or(&self.target, |(p, _)| p)
    }

    /// The raw query string, without `?`.
    pub fn query(&self) -> Option<&str> {
        self.target.split_once('?').map(|(_, q)| q)
    }

    /// The first query parameter named `key`, percent-decoded (`+` is a space). `None` when
    /// absent or not valid UTF-8 once decoded.
    pub fn query_param(&self, key: &str) -> Option<Cow<'_, str>> {
        let query = self.query()?;
        query.split('&').find_map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (k == key).then(|| percent_decode(v)).flatten()
        })
    }

    /// Whether the connection stays open after the response (HTTP/1.1 default, 1.0 opt-in).
    pub fn keep_alive(&self) -> bool {
        if self.minor_version == 0 {
            self.header_has_token("connection", "keep-alive")
        } else {
            !self.header_has_token("connection", "close")
        }
    }

    /// The request target with `token=` query values masked, for logs (SPEC §4).
    pub fn target_for_log(&self) -> Cow<'_, str> {
        match self.query() {
            Some(q) if q.split('&').any(|p| p.starts_with("token=")) => {
                let masked: Vec<&str> = q
                    .split('&')
                    .map(|p| {
                        if p.starts_with("token=") {
                            "token=***"
                        } else {
                            p
                        }
                    })
                    .collect();
                Cow::Owned(format!("{}?{}", self.path(), masked.join("&")))
            }
            _ => Cow::Borrowed(&self.target),
        }
    }
}

/// Decodes `%XX` escapes and `+`. `None` on a bad escape or invalid UTF-8.
pub fn percent_decode(input: &str) -> Option<Cow<'_, str>> {
    if !input.bytes().any(|b| b == b'%' || b == b'+') {
        return Some(Cow::Borrowed(input));
    }
    let bytes = input.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = bytes.get(i + 1..i + 3)?;
                let hi = (hex[0] as char).to_digit(16)?;
                let lo = (hex[1] as char).to_digit(16)?;
                out.push(u8::try_from(hi * 16 + lo).ok()?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok().map(Cow::Owned)
}

/// Parses one request head from the start of `buf`.
///
/// `Ok(None)` means the head is incomplete and still within `max_head_bytes`: read more and call
/// again with the same (grown) buffer. Nothing is consumed; on success the body starts at
/// [`RequestHead::head_len`].
pub fn parse_request_head(
    buf: &[u8],
    limits: &HttpLimits,
) -> Result<Option<RequestHead>, HttpError> {
    let max_headers = limits.max_headers.min(HttpLimits::HEADER_CAP);
    let mut storage = [httparse::EMPTY_HEADER; HttpLimits::HEADER_CAP];
    let mut req = httparse::Request::new(&mut storage[..max_headers]);
    let head_len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => {
            return if buf.len() > limits.max_head_bytes {
                Err(HttpError::HeadTooLarge(limits.max_head_bytes))
            } else {
                Ok(None)
            };
        }
        Err(httparse::Error::TooManyHeaders) => return Err(HttpError::TooManyHeaders(max_headers)),
        Err(httparse::Error::Version) => {
            return Err(HttpError::Malformed("unsupported HTTP version"));
        }
        Err(httparse::Error::Token | httparse::Error::Status) => {
            return Err(HttpError::Malformed("bad request line"));
        }
        Err(_) => return Err(HttpError::Malformed("bad header")),
    };
    if head_len > limits.max_head_bytes {
        return Err(HttpError::HeadTooLarge(limits.max_head_bytes));
    }
    let (Some(method), Some(target), Some(minor_version)) = (req.method, req.path, req.version)
    else {
        return Err(HttpError::Malformed("incomplete request line"));
    };
    let headers: Vec<Header> = req
        .headers
        .iter()
        .map(|h| Header {
            name: h.name.to_owned(),
            value: h.value.to_vec(),
        })
        .collect();
    let mut head = RequestHead {
        method: method.to_owned(),
        target: target.to_owned(),
        minor_version,
        headers,
        head_len,
        content_length: 0,
    };
    if head.header("transfer-encoding").is_some() {
        return Err(HttpError::TransferEncodingUnsupported);
    }
    head.content_length = content_length(&head, limits)?;
    Ok(Some(head))
}

fn content_length(head: &RequestHead, limits: &HttpLimits) -> Result<usize, HttpError> {
    let mut found: Option<u64> = None;
    for value in head.headers_named("content-length") {
        let text = std::str::from_utf8(value)
            .map_err(|_| HttpError::BadContentLength)?
            .trim();
        if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
            return Err(HttpError::BadContentLength);
        }
        let n: u64 = text
            .parse()
            .map_err(|_| HttpError::BodyTooLarge(limits.max_body_bytes))?;
        match found {
            Some(prev) if prev != n => return Err(HttpError::BadContentLength),
            _ => found = Some(n),
        }
    }
    let n = found.unwrap_or(0);
    if n > limits.max_body_bytes as u64 {
        return Err(HttpError::BodyTooLarge(limits.max_body_bytes));
    }
    usize::try_from(n).map_err(|_| HttpError::BodyTooLarge(limits.max_body_bytes))
}

/// The reason phrase of a status the server uses.
pub const fn reason_phrase(status: u16) -> &'static str {
    match status {
        101 => "Switching Protocols",
        200 => "OK",
        201 => "Created",
        202 => "Accepted",
        204 => "No Content",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        409 => "Conflict",
        413 => "Content Too Large",
        415 => "Unsupported Media Type",
        422 => "Unprocessable Content",
        426 => "Upgrade Required",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        503 => "Service Unavailable",
        _ => "Unknown",
    }
}

/// Writes a complete HTTP/1.1 response into `out`: status line, the given headers,
/// `Content-Length`, `Connection`, then the body. A `Content-Type` must be among `headers` when
/// the body is not empty.
pub fn write_response(
    out: &mut Vec<u8>,
    status: u16,
    headers: &[(&str, &str)],
    body: &[u8],
    keep_alive: bool,
) {
    out.reserve(128 + body.len());
    out.extend_from_slice(b"HTTP/1.1 ");
    push_decimal(out, u64::from(status));
    out.push(b' ');
    out.extend_from_slice(reason_phrase(status).as_bytes());
    out.extend_from_slice(b"\r\n");
    for (name, value) in headers {
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    if status != 204 && status >= 200 {
        out.extend_from_slice(b"Content-Length: ");
        push_decimal(out, body.len() as u64);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(if keep_alive {
        b"Connection: keep-alive\r\n\r\n"
    } else {
        b"Connection: close\r\n\r\n"
    });
    out.extend_from_slice(body);
}

/// The error body of SPEC §2: `{"error":{"code","message"[,"field"]}}`.
pub fn error_body(code: crate::ErrorCode, message: &str, field: Option<&str>) -> Vec<u8> {
    #[derive(serde::Serialize)]
    struct Inner<'a> {
        code: &'a str,
        message: &'a str,
        #[serde(skip_serializing_if = "Option::is_none")]
        field: Option<&'a str>,
    }
    #[derive(serde::Serialize)]
    struct Outer<'a> {
        error: Inner<'a>,
    }
    let body = Outer {
        error: Inner {
            code: code.as_str(),
            message,
            field,
        },
    };
    sonic_rs::to_vec(&body)
        .unwrap_or_else(|_| br#"{"error":{"code":"internal","message":"internal"}}"#.to_vec())
}

/// Writes a JSON error response of SPEC §2 shape.
pub fn write_error(
    out: &mut Vec<u8>,
    status: u16,
    code: crate::ErrorCode,
    message: &str,
    extra_headers: &[(&str, &str)],
    keep_alive: bool,
) {
    let body = error_body(code, message, None);
    let mut headers = Vec::with_capacity(extra_headers.len() + 1);
    headers.push(("Content-Type", "application/json"));
    headers.extend_from_slice(extra_headers);
    write_response(out, status, &headers, &body, keep_alive);
}

fn push_decimal(out: &mut Vec<u8>, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[i..]);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(raw: &[u8]) -> Result<Option<RequestHead>, HttpError> {
        parse_request_head(raw, &HttpLimits::default())
    }

    #[test]
    fn parses_a_get_with_query_and_keep_alive() {
        let raw = b"GET /ws?token=abc%20d&x=1 HTTP/1.1\r\nHost: a\r\nConnection: Upgrade, keep-alive\r\n\r\nrest";
        let head = parse(raw).unwrap().unwrap();
        assert_eq!(head.method, "GET");
        assert_eq!(head.path(), "/ws");
        assert_eq!(head.query_param("token").as_deref(), Some("abc d"));
        assert_eq!(head.query_param("x").as_deref(), Some("1"));
        assert_eq!(head.query_param("y"), None);
        assert!(head.header_has_token("Connection", "upgrade"));
        assert!(head.keep_alive());
        assert_eq!(&raw[head.head_len..], b"rest");
        assert_eq!(head.target_for_log(), "/ws?token=***&x=1");
    }

    #[test]
    fn incomplete_head_needs_more_bytes_until_the_bound() {
        assert_eq!(parse(b"GET / HTTP/1.1\r\nHost: a\r\n"), Ok(None));
        let limits = HttpLimits {
            max_head_bytes: 32,
            ..HttpLimits::default()
        };
        let long = b"GET / HTTP/1.1\r\nX-Long: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
        assert_eq!(
            parse_request_head(long, &limits),
            Err(HttpError::HeadTooLarge(32))
        );
    }

    #[test]
    fn header_count_is_bounded() {
        let mut raw = b"GET / HTTP/1.1\r\n".to_vec();
        for i in 0..5 {
            raw.extend_from_slice(format!("X-{i}: v\r\n").as_bytes());
        }
        raw.extend_from_slice(b"\r\n");
        let limits = HttpLimits {
            max_headers: 4,
            ..HttpLimits::default()
        };
        assert_eq!(
            parse_request_head(&raw, &limits),
            Err(HttpError::TooManyHeaders(4))
        );
    }

    #[test]
    fn content_length_rules() {
        let ok = parse(b"POST /login HTTP/1.1\r\nContent-Length: 12\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(ok.content_length, 12);
        let conflicting = b"POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n";
        assert_eq!(parse(conflicting), Err(HttpError::BadContentLength));
        assert_eq!(
            parse(b"POST / HTTP/1.1\r\nContent-Length: -1\r\n\r\n"),
            Err(HttpError::BadContentLength)
        );
        let big = b"POST / HTTP/1.1\r\nContent-Length: 99999999999999999999999\r\n\r\n";
        assert_eq!(parse(big), Err(HttpError::BodyTooLarge(65536)));
        assert_eq!(
            parse(b"POST / HTTP/1.1\r\nContent-Length: 65537\r\n\r\n"),
            Err(HttpError::BodyTooLarge(65536))
        );
        let chunked = b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n";
        assert_eq!(parse(chunked), Err(HttpError::TransferEncodingUnsupported));
    }

    #[test]
    fn malformed_heads_are_errors_not_waits() {
        assert!(matches!(
            parse(b"\x00\x01\x02 / HTTP/1.1\r\n\r\n"),
            Err(HttpError::Malformed(_))
        ));
        assert!(matches!(
            parse(b"GET / HTTP/2.0\r\n\r\n"),
            Err(HttpError::Malformed(_))
        ));
    }

    #[test]
    fn http10_closes_by_default() {
        let head = parse(b"GET / HTTP/1.0\r\n\r\n").unwrap().unwrap();
        assert!(!head.keep_alive());
    }

    #[test]
    fn writes_a_response_with_length_and_connection() {
        let mut out = Vec::new();
        write_response(
            &mut out,
            200,
            &[("Content-Type", "application/json")],
            b"{}",
            true,
        );
        assert_eq!(
            out,
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\nConnection: keep-alive\r\n\r\n{}"
        );
        let mut out = Vec::new();
        write_error(
            &mut out,
            413,
            crate::ErrorCode::TooLarge,
            "body too large",
            &[],
            false,
        );
        let text = String::from_utf8(out).unwrap();
        assert!(text.starts_with("HTTP/1.1 413 Content Too Large\r\n"));
        assert!(text.ends_with(r#"{"error":{"code":"too_large","message":"body too large"}}"#));
        assert!(text.contains("Connection: close"));
    }

    #[test]
    fn percent_decoding_rejects_bad_escapes() {
        assert_eq!(percent_decode("a%2"), None);
        assert_eq!(percent_decode("a%zz"), None);
        assert_eq!(percent_decode("%ff"), None);
        assert_eq!(percent_decode("a+b%21").as_deref(), Some("a b!"));
    }
}
