//! The errors the HTTP API answers with: services (`accounts`, `rooms`) and the route table return
//! an [`ApiError`] carrying the SPEC §2 code, and `From<ApiError> for HttpResponse` is the one
//! place that turns it into a status, headers (`Retry-After`, `Allow`) and the body
//! `{"error":{"code","message","field"?}}`. Storage failures are logged here, once, and shown to
//! the client as generic 500/503 answers. Owns no routing and no service logic.

use std::borrow::Cow;

use engine::HttpResponse;
use protocol::ErrorCode;
use storage::StoreError;

/// What a service or route answers when it refuses or fails.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    /// HTTP status.
    pub status: u16,
    /// The SPEC error code.
    pub code: ErrorCode,
    /// What the client reads; never a secret, never the precise reason of an auth failure.
    pub message: Cow<'static, str>,
    /// The input field at fault (`invalid_input`).
    pub field: Option<Cow<'static, str>>,
    /// Seconds for `Retry-After`.
    pub retry_after: Option<u64>,
    /// Methods for `Allow` (405).
    pub allow: Option<&'static str>,
    /// Adds `WWW-Authenticate: Bearer` (a bearer token was missing or refused).
    pub challenge: bool,
}

/// A service's answer: the success response, or the error to render.
pub type Answer = Result<HttpResponse, ApiError>;

impl ApiError {
    /// `status` with `code` and `message`.
    pub fn new(status: u16, code: ErrorCode, message: impl Into<Cow<'static, str>>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            field: None,
            retry_after: None,
            allow: None,
            challenge: false,
        }
    }

    /// Adds `Retry-After`.
    #[must_use]
    pub fn retry_after(mut self, secs: u64) -> Self {
        self.retry_after = Some(secs);
        self
    }

    /// Adds `WWW-Authenticate: Bearer`.
    #[must_use]
    pub fn challenge(mut self) -> Self {
        self.challenge = true;
        self
    }

    /// `400 invalid_input` naming the field.
    pub fn invalid_input(
        field: impl Into<Cow<'static, str>>,
        message: impl Into<Cow<'static, str>>,
    ) -> Self {
        Self {
            field: Some(field.into()),
            ..Self::new(400, ErrorCode::InvalidInput, message)
        }
    }

    /// `400 bad_request`.
    pub fn bad_request(message: impl Into<Cow<'static, str>>) -> Self {
        Self::new(400, ErrorCode::BadRequest, message)
    }

    /// `429 rate_limited` with `Retry-After`.
    pub fn rate_limited(retry_after_secs: u64) -> Self {
        Self::new(
            429,
            ErrorCode::RateLimited,
            "too many requests; retry later",
        )
        .retry_after(retry_after_secs)
    }

    /// `401 invalid_token`, whatever the precise reason.
    pub fn invalid_token() -> Self {
        Self::new(401, ErrorCode::InvalidToken, "invalid or expired token")
    }

    /// `401 invalid_credentials`, whatever the precise reason.
    pub fn invalid_credentials() -> Self {
        Self::new(
            401,
            ErrorCode::InvalidCredentials,
            "invalid e-mail or password",
        )
    }

    /// `403 forbidden`.
    pub fn forbidden() -> Self {
        Self::new(403, ErrorCode::Forbidden, "not allowed")
    }

    /// `404 not_found`.
    pub fn not_found(message: impl Into<Cow<'static, str>>) -> Self {
        Self::new(404, ErrorCode::NotFound, message)
    }

    /// `405` with `Allow`.
    pub fn method_not_allowed(allow: &'static str) -> Self {
        Self {
            allow: Some(allow),
            ..Self::new(405, ErrorCode::BadRequest, "method not allowed")
        }
    }

    /// `503 unavailable` with `Retry-After: 1`: a pool is full.
    pub fn busy() -> Self {
        Self::new(503, ErrorCode::Unavailable, "server busy; retry later").retry_after(1)
    }

    /// `500 internal`.
    pub fn internal() -> Self {
        Self::new(500, ErrorCode::Internal, "internal error")
    }

    /// A storage failure, logged here: 503 with `Retry-After` when the database cannot be
    /// reached, 500 otherwise.
    pub fn storage(e: &StoreError) -> Self {
        match e {
            StoreError::Unavailable(why) => {
                tracing::warn!(error = %why, "storage unavailable");
                Self::new(
                    503,
                    ErrorCode::Unavailable,
                    "storage unavailable; retry later",
                )
                .retry_after(1)
            }
            other => {
                tracing::error!(error = %other, "storage failure");
                Self::internal()
            }
        }
    }
}

impl From<&StoreError> for ApiError {
    fn from(e: &StoreError) -> Self {
        Self::storage(e)
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        Self::storage(&e)
    }
}

impl From<ApiError> for HttpResponse {
    fn from(e: ApiError) -> Self {
        let body = protocol::http::error_body(e.code, &e.message, e.field.as_deref());
        let mut response = HttpResponse::json(e.status, body);
        if let Some(secs) = e.retry_after {
            response.headers.push(("Retry-After", secs.to_string()));
        }
        if let Some(allow) = e.allow {
            response.headers.push(("Allow", allow.to_owned()));
        }
        if e.challenge {
            response
                .headers
                .push(("WWW-Authenticate", "Bearer".to_owned()));
        }
        response
    }
}

/// The response of an answer: the one place errors are rendered.
pub fn respond(answer: Answer) -> HttpResponse {
    answer.unwrap_or_else(HttpResponse::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header<'a>(r: &'a HttpResponse, name: &str) -> Option<&'a str> {
        r.headers
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
    }

    #[test]
    fn renders_the_spec_shape_with_its_headers() {
        let r = HttpResponse::from(ApiError::invalid_input("email", "not an e-mail address"));
        assert_eq!(r.status, 400);
        assert_eq!(
            String::from_utf8(r.body).unwrap(),
            r#"{"error":{"code":"invalid_input","message":"not an e-mail address","field":"email"}}"#
        );
        let r = HttpResponse::from(ApiError::rate_limited(7));
        assert_eq!((r.status, header(&r, "Retry-After")), (429, Some("7")));
        let r = HttpResponse::from(ApiError::method_not_allowed("GET, POST"));
        assert_eq!((r.status, header(&r, "Allow")), (405, Some("GET, POST")));
        let r = HttpResponse::from(ApiError::storage(&StoreError::Unavailable("down".into())));
        assert_eq!((r.status, header(&r, "Retry-After")), (503, Some("1")));
    }
}
