//! The HTTP routes the engine hands to the server. Until the accounts issue, these are the
//! operational ones of SPEC §2/§11: `/healthz`, `/readyz`, `/metrics`; everything else is 404.

use std::sync::Arc;

use engine::{HttpRequest, HttpResponse, HttpRoutes, Metrics};
use protocol::ErrorCode;

/// The route table.
#[derive(Debug)]
pub struct Routes {
    metrics: Arc<Metrics>,
}

impl Routes {
    /// Routes over the engine's counters.
    pub fn new(metrics: Arc<Metrics>) -> Self {
        Self { metrics }
    }
}

impl HttpRoutes for Routes {
    fn handle(&self, request: &HttpRequest<'_>) -> HttpResponse {
        let method = request.head.method.as_str();
        match (method, request.head.path()) {
            ("GET" | "HEAD", "/healthz") => HttpResponse::json(200, br#"{"status":"ok"}"#.to_vec()),
            // Storage arrives with the accounts issue; the embedded engine state is always ready.
            ("GET" | "HEAD", "/readyz") => {
                HttpResponse::json(200, br#"{"status":"ready","storage":"memory"}"#.to_vec())
            }
            ("GET" | "HEAD", "/metrics") => {
                let mut text = String::with_capacity(4096);
                self.metrics.render(&mut text);
                HttpResponse {
                    status: 200,
                    headers: vec![("Content-Type", "text/plain; version=0.0.4".to_owned())],
                    body: text.into_bytes(),
                }
            }
            (_, "/healthz" | "/readyz" | "/metrics") => {
                let mut r = HttpResponse::error(405, ErrorCode::BadRequest, "method not allowed");
                r.headers.push(("Allow", "GET, HEAD".to_owned()));
                r
            }
            _ => HttpResponse::error(404, ErrorCode::NotFound, "no such route"),
        }
    }
}
