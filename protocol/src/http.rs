//! HTTP/1.1 request heads (parsed with httparse, bounded) and the response writer.
//!
//! Owns the bytes of one request head, the framing of its body and one response; knows nothing of
//! routes, bodies' meaning or sockets. Bodies are framed by `Content-Length` or by
//! `Transfer-Encoding: chunked` (RFC 9112 §7.1, decoded incrementally by [`ChunkedDecoder`] under
//! the same bound). A head that carries both, or any other transfer coding, is refused: that is
//! the request-smuggling door, closed.

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
    /// `Transfer-Encoding` other than one `chunked`, or together with `Content-Length` (400; the
    /// connection is closed).
    #[error("Transfer-Encoding must be exactly `chunked`, without Content-Length")]
    BadTransferEncoding,
    /// A chunked body that breaks RFC 9112 §7.1 or its bounds (400).
    #[error("malformed chunked body: {0}")]
    BadChunk(&'static str),
}

impl HttpError {
    /// The HTTP status this error answers with.
    pub const fn status(&self) -> u16 {
        match self {
            Self::HeadTooLarge(_) | Self::TooManyHeaders(_) => 431,
            Self::Malformed(_)
            | Self::BadContentLength
            | Self::BadTransferEncoding
            | Self::BadChunk(_) => 400,
            Self::BodyTooLarge(_) => 413,
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
    /// The validated `Content-Length` (0 when absent, and for a chunked body).
    pub content_length: usize,
    /// The body is `Transfer-Encoding: chunked`: decode it with a [`ChunkedDecoder`].
    pub chunked: bool,
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

/// Decodes a query-string value: `%XX` escapes and `+` as a space. `None` on a bad escape or
/// invalid UTF-8.
pub fn percent_decode(input: &str) -> Option<Cow<'_, str>> {
    if !input.contains('+') {
        return percent_decode_path(input);
    }
    percent_decode_path(&input.replace('+', " ")).map(|s| Cow::Owned(s.into_owned()))
}

/// Decodes a path segment: `%XX` escapes only (`+` is itself). `None` on a bad escape (a `%`
/// not followed by two hex digits) or invalid UTF-8. The one percent decoder of the project,
/// over the `percent-encoding` crate; the strictness (no bad escape kept as written) is ours.
pub fn percent_decode_path(input: &str) -> Option<Cow<'_, str>> {
    let bytes = input.as_bytes();
    let well_formed = bytes.iter().enumerate().all(|(i, &b)| {
        b != b'%'
            || bytes
                .get(i + 1..i + 3)
                .is_some_and(|hex| hex.iter().all(u8::is_ascii_hexdigit))
    });
    if !well_formed {
        return None;
    }
    percent_encoding::percent_decode_str(input)
        .decode_utf8()
        .ok()
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
        chunked: false,
    };
    if head.header("transfer-encoding").is_some() {
        // Exactly one coding, `chunked`, over however many lines; never with a length, and never
        // in HTTP/1.0, which has no transfer codings (RFC 9112 §6.1).
        let only_chunked = {
            let mut codings = head
                .headers_named("transfer-encoding")
                .flat_map(|v| v.split(|&b| b == b','))
                .map(<[u8]>::trim_ascii)
                .filter(|c| !c.is_empty());
            codings
                .next()
                .is_some_and(|c| c.eq_ignore_ascii_case(b"chunked"))
                && codings.next().is_none()
        };
        if !only_chunked || head.header("content-length").is_some() || head.minor_version == 0 {
            return Err(HttpError::BadTransferEncoding);
        }
        head.chunked = true;
        return Ok(Some(head));
    }
    head.content_length = content_length(&head, limits)?;
    Ok(Some(head))
}

/// Most bytes of chunk extensions on one chunk-size line (they are read and ignored).
pub const MAX_CHUNK_EXT_LINE: usize = 1024;
/// Most bytes of chunk extensions in one body.
pub const MAX_CHUNK_EXT_TOTAL: usize = 8 * 1024;
/// Most bytes of trailer fields after the last chunk (read and ignored).
pub const MAX_TRAILER_BYTES: usize = 8 * 1024;
/// Most hex digits of a chunk size (leading zeros included).
const MAX_SIZE_DIGITS: u8 = 16;

/// Where a [`ChunkedDecoder`] is in the body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ChunkState {
    /// Reading a chunk size's hex digits.
    Size { size: u64, digits: u8 },
    /// Past the size, in its extensions (or whitespace), until CR.
    Ext { size: u64, line: usize },
    /// Expecting the LF that ends the size line.
    SizeLf { size: u64 },
    /// Copying this many more data bytes.
    Data { left: u64 },
    /// Expecting the CR after a chunk's data.
    DataCr,
    /// Expecting the LF after a chunk's data.
    DataLf,
    /// In a trailer line (after the last chunk) of this many bytes so far.
    Trailer { line: usize },
    /// Expecting the LF that ends a trailer line (or the body, after an empty one).
    TrailerLf { line: usize },
    /// The body is complete.
    Done,
}

/// Decodes a `Transfer-Encoding: chunked` body incrementally (RFC 9112 §7.1): feed it the bytes
/// that follow the head as they arrive; it keeps only the decoded body, which never grows past
/// `max_body` (a chunk that would pass it is refused before any of its data is copied).
/// Extensions and trailers are bounded and ignored.
#[derive(Debug)]
pub struct ChunkedDecoder {
    state: ChunkState,
    body: Vec<u8>,
    max_body: usize,
    ext_total: usize,
    trailer_total: usize,
}

impl ChunkedDecoder {
    /// A decoder for a body of at most `max_body` bytes.
    pub fn new(max_body: usize) -> Self {
        Self {
            state: ChunkState::Size { size: 0, digits: 0 },
            body: Vec::new(),
            max_body,
            ext_total: 0,
            trailer_total: 0,
        }
    }

    /// Whether the whole body (last chunk and trailers) has been read.
    pub fn is_done(&self) -> bool {
        self.state == ChunkState::Done
    }

    /// The decoded body (complete once [`Self::is_done`]).
    pub fn into_body(self) -> Vec<u8> {
        self.body
    }

    /// Consumes what it can of `input`; returns how many bytes it used. Bytes after the end of
    /// the body are not used (they start the next request). Errors are final.
    pub fn feed(&mut self, input: &[u8]) -> Result<usize, HttpError> {
        let mut i = 0;
        while i < input.len() {
            let b = input[i];
            self.state = match self.state {
                ChunkState::Done => return Ok(i),
                ChunkState::Data { left } => {
                    let available = input.len() - i;
                    let take = usize::try_from(left).map_or(available, |l| l.min(available));
                    self.body.extend_from_slice(&input[i..i + take]);
                    i += take;
                    let left = left - take as u64;
                    self.state = if left == 0 {
                        ChunkState::DataCr
                    } else {
                        ChunkState::Data { left }
                    };
                    continue;
                }
                ChunkState::Size { size, digits } => match hex_value(b) {
                    Some(d) => {
                        if digits >= MAX_SIZE_DIGITS {
                            return Err(HttpError::BadChunk("chunk size too long"));
                        }
                        ChunkState::Size {
                            size: (size << 4) | u64::from(d),
                            digits: digits + 1,
                        }
                    }
                    None if digits == 0 => {
                        return Err(HttpError::BadChunk("chunk size is not hexadecimal"));
                    }
                    None => match b {
                        b'\r' => ChunkState::SizeLf { size },
                        b';' | b' ' | b'\t' => self.ext(size, 0)?,
                        _ => return Err(HttpError::BadChunk("chunk size is not hexadecimal")),
                    },
                },
                ChunkState::Ext { size, line } => match b {
                    b'\r' => ChunkState::SizeLf { size },
                    b'\n' => return Err(HttpError::BadChunk("bare LF in a chunk-size line")),
                    _ => self.ext(size, line)?,
                },
                ChunkState::SizeLf { size } => {
                    if b != b'\n' {
                        return Err(HttpError::BadChunk("chunk-size line not ended by CRLF"));
                    }
                    if size == 0 {
                        ChunkState::Trailer { line: 0 }
                    } else {
                        let room = (self.max_body - self.body.len()) as u64;
                        if size > room {
                            return Err(HttpError::BodyTooLarge(self.max_body));
                        }
                        // Reserved once the size is known to fit: at most `max_body` in all.
                        self.body.reserve(usize::try_from(size).unwrap_or(0));
                        ChunkState::Data { left: size }
                    }
                }
                ChunkState::DataCr => {
                    if b != b'\r' {
                        return Err(HttpError::BadChunk("chunk data longer than its size"));
                    }
                    ChunkState::DataLf
                }
                ChunkState::DataLf => {
                    if b != b'\n' {
                        return Err(HttpError::BadChunk("chunk data not ended by CRLF"));
                    }
                    ChunkState::Size { size: 0, digits: 0 }
                }
                ChunkState::Trailer { line } => match b {
                    b'\r' => ChunkState::TrailerLf { line },
                    b'\n' => return Err(HttpError::BadChunk("bare LF in a trailer")),
                    _ => {
                        self.trailer_total += 1;
                        if self.trailer_total > MAX_TRAILER_BYTES {
                            return Err(HttpError::BadChunk("trailers too large"));
                        }
                        ChunkState::Trailer { line: line + 1 }
                    }
                },
                ChunkState::TrailerLf { line } => {
                    if b != b'\n' {
                        return Err(HttpError::BadChunk("trailer line not ended by CRLF"));
                    }
                    if line == 0 {
                        ChunkState::Done
                    } else {
                        ChunkState::Trailer { line: 0 }
                    }
                }
            };
            i += 1;
        }
        Ok(i)
    }

    /// One more byte of a chunk-size line's extensions, bounded per line and per body.
    fn ext(&mut self, size: u64, line: usize) -> Result<ChunkState, HttpError> {
        self.ext_total += 1;
        if line + 1 > MAX_CHUNK_EXT_LINE || self.ext_total > MAX_CHUNK_EXT_TOTAL {
            return Err(HttpError::BadChunk("chunk extensions too long"));
        }
        Ok(ChunkState::Ext {
            size,
            line: line + 1,
        })
    }
}

fn hex_value(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
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
    }

    #[test]
    fn transfer_encoding_is_one_chunked_without_a_length() {
        let ok = parse(b"POST / HTTP/1.1\r\nTransfer-Encoding: Chunked\r\n\r\n")
            .unwrap()
            .unwrap();
        assert!(ok.chunked);
        assert_eq!(ok.content_length, 0);
        for bad in [
            &b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n"[..],
            b"POST / HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"POST / HTTP/1.1\r\nTransfer-Encoding: identity\r\n\r\n",
            b"POST / HTTP/1.1\r\nTransfer-Encoding: \r\n\r\n",
            b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n",
        ] {
            assert_eq!(
                parse(bad),
                Err(HttpError::BadTransferEncoding),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    fn dechunk(wire: &[u8], max: usize) -> Result<(Vec<u8>, usize), HttpError> {
        let mut d = ChunkedDecoder::new(max);
        let used = d.feed(wire)?;
        assert!(d.is_done(), "not done after {used} bytes");
        Ok((d.into_body(), used))
    }

    #[test]
    fn chunked_bodies_decode_whole_or_byte_by_byte() {
        let wire = b"4;ext=1\r\nWiki\r\n5 \r\npedia\r\nE\r\n in\r\n\r\nchunks.\r\n0\r\nX-Trailer: y\r\n\r\nNEXT";
        let expected = b"Wikipedia in\r\n\r\nchunks.";
        let (body, used) = dechunk(wire, 1024).unwrap();
        assert_eq!(body, expected);
        assert_eq!(&wire[used..], b"NEXT");
        let mut d = ChunkedDecoder::new(1024);
        let mut used = 0;
        for (i, b) in wire.iter().enumerate() {
            if d.is_done() {
                break;
            }
            used += d.feed(std::slice::from_ref(b)).unwrap();
            assert!(used == i + 1 || d.is_done());
        }
        assert!(d.is_done());
        assert_eq!(d.into_body(), expected);
        // An empty body.
        assert_eq!(dechunk(b"0\r\n\r\n", 0).unwrap().0, b"");
    }

    #[test]
    fn chunked_bodies_are_bounded_before_their_data_arrives() {
        let mut d = ChunkedDecoder::new(8);
        assert_eq!(d.feed(b"5\r\nhello\r\n"), Ok(10));
        assert_eq!(d.feed(b"4\r\n"), Err(HttpError::BodyTooLarge(8)));
        let mut d = ChunkedDecoder::new(65536);
        assert_eq!(
            d.feed(b"ffffffffffffffff\r\n"),
            Err(HttpError::BodyTooLarge(65536))
        );
        let mut d = ChunkedDecoder::new(65536);
        assert!(matches!(
            d.feed(b"00000000000000001\r\n"),
            Err(HttpError::BadChunk(_))
        ));
        let long_ext = format!("1;{}\r\n", "a".repeat(MAX_CHUNK_EXT_LINE));
        assert!(matches!(
            ChunkedDecoder::new(10).feed(long_ext.as_bytes()),
            Err(HttpError::BadChunk(_))
        ));
        let mut many_ext = String::new();
        for _ in 0..20 {
            many_ext.push_str(&format!("1;{}\r\nx\r\n", "a".repeat(500)));
        }
        assert!(matches!(
            ChunkedDecoder::new(100).feed(many_ext.as_bytes()),
            Err(HttpError::BadChunk(_))
        ));
        let trailers = format!("0\r\nX: {}\r\n\r\n", "a".repeat(MAX_TRAILER_BYTES));
        assert!(matches!(
            ChunkedDecoder::new(10).feed(trailers.as_bytes()),
            Err(HttpError::BadChunk(_))
        ));
    }

    #[test]
    fn malformed_chunks_are_refused() {
        for bad in [
            &b"x\r\n"[..],
            b"\r\n",
            b"3\nabc\r\n",
            b"3\r\nabcd\r\n",
            b"3\r\nabc\n",
            b"3;a\nabc",
            b"0\r\nX: y\n",
            b"0\r\n\rx",
        ] {
            assert!(
                matches!(
                    ChunkedDecoder::new(100).feed(bad),
                    Err(HttpError::BadChunk(_))
                ),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
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
        assert_eq!(percent_decode_path("a+b%21").as_deref(), Some("a+b!"));
        assert_eq!(percent_decode_path("caf%C3%A9").as_deref(), Some("café"));
        assert_eq!(percent_decode_path("100%"), None);
        assert_eq!(percent_decode_path("%C3"), None);
    }
}
