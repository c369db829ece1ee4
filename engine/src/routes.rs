//! What the engine asks of the server's HTTP route table: the request it hands over, the
//! response it writes, and the trait the server implements. Plain types; the HTTP loop that uses
//! them is `http`.

use std::net::SocketAddr;

use protocol::ErrorCode;
use protocol::http::RequestHead;

use crate::pending::PendingResponse;

/// An HTTP request the engine does not handle itself.
#[derive(Debug)]
pub struct HttpRequest<'a> {
    /// The parsed head.
    pub head: &'a RequestHead,
    /// The body (`Content-Length` bytes, at most 64 KiB).
    pub body: &'a [u8],
    /// The TCP peer.
    pub peer: SocketAddr,
    /// The client's address (the peer, or `X-Forwarded-For` from a trusted proxy).
    pub client_ip: std::net::IpAddr,
    /// The request id echoed in `X-Request-Id` (the caller's if sane, else generated).
    pub request_id: &'a str,
}

/// The answer to an [`HttpRequest`]. `Content-Length`, `Connection` and `X-Request-Id` are added
/// by the engine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpResponse {
    /// Status code.
    pub status: u16,
    /// Headers.
    pub headers: Vec<(&'static str, String)>,
    /// Body.
    pub body: Vec<u8>,
}

/// What a route answers: at once, or later from another thread.
#[derive(Debug)]
pub enum Routed {
    /// The answer.
    Now(HttpResponse),
    /// Work handed to a blocking pool; the engine awaits it (bounded) without blocking the shard.
    Later(PendingResponse),
}

impl From<HttpResponse> for Routed {
    fn from(response: HttpResponse) -> Self {
        Self::Now(response)
    }
}

/// The server's route table. Called on a shard: must answer without blocking; slow work goes
/// to a blocking pool and comes back as [`Routed::Later`].
pub trait HttpRoutes: Send + Sync + 'static {
    /// Answers one request.
    fn handle(&self, request: &HttpRequest<'_>) -> Routed;
}

/// Builds a JSON response.
impl HttpResponse {
    /// `status` with a JSON body.
    pub fn json(status: u16, body: Vec<u8>) -> Self {
        Self {
            status,
            headers: vec![("Content-Type", "application/json".to_owned())],
            body,
        }
    }

    /// The SPEC §2 error shape.
    pub fn error(status: u16, code: ErrorCode, message: &str) -> Self {
        Self::json(status, protocol::http::error_body(code, message, None))
    }
}
