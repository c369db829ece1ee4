//! What the engine asks of the server's HTTP route table: the request it hands over, what a route
//! answers (now, or later from a pool), and the trait the server implements. Plain types; the HTTP
//! loop that uses them is `http`.

use std::net::SocketAddr;

use protocol::http::RequestHead;

use crate::pending::PendingResponse;
use crate::response::HttpResponse;

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
