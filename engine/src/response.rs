//! The answer to an HTTP request: status, headers and body, and the SPEC §2 error shape. Below
//! both the route table (`routes`) and the deferred answers (`pending`); imports neither.

use protocol::ErrorCode;

/// The answer to an HTTP request. `Content-Length`, `Connection` and `X-Request-Id` are added
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
