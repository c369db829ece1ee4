//! The authentication interface the engine calls at upgrade, on `refresh`, and before sensitive
//! operations. The server implements it (JWT verification, revocation); the engine never sees keys.

use std::net::IpAddr;
use std::sync::Arc;

/// Who a verified token speaks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// User id (UUID string).
    pub user_id: Arc<str>,
    /// Username.
    pub username: Arc<str>,
    /// Session (refresh family) id; empty for tokens minted by `ringhub token`.
    pub session_id: Arc<str>,
    /// Token issue time, epoch milliseconds.
    pub issued_at_ms: u64,
    /// Token expiry, epoch milliseconds.
    pub expires_at_ms: u64,
    /// The token's binding fingerprint (`fpt`), when bound: a refresh on a live connection must
    /// carry the same one.
    pub binding: Option<Arc<str>>,
}

/// How far a revocation reaches, which decides the close code of a live connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Revoked {
    /// This session (logout, session delete, refresh reuse): close with 4001.
    Session,
    /// The whole account (logout-all, deletion): close with 4510.
    Account,
}

impl Revoked {
    /// The close code a live connection gets.
    pub const fn close_code(self) -> protocol::CloseCode {
        match self {
            Self::Session => protocol::CloseCode::UNAUTHORIZED,
            Self::Account => protocol::CloseCode::ACCOUNT_CLOSED,
        }
    }
}

/// The client as the server sees it.
#[derive(Debug, Clone, Copy)]
pub struct ClientInfo<'a> {
    /// The client's address (after trusted proxies).
    pub ip: IpAddr,
    /// Its `User-Agent`.
    pub user_agent: Option<&'a str>,
}

/// Why a token was refused. The client always gets the same `invalid_token`/401; the reason is for
/// logs and the `ringhub_auth_failures_total{reason}` metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthFailure {
    /// No token presented.
    Missing,
    /// Not a JWT, or a bad signature, unknown key or wrong algorithm.
    Malformed,
    /// Expired.
    Expired,
    /// A refresh token where an access token belongs.
    WrongType,
    /// Revoked.
    Revoked,
    /// Bound to another fingerprint.
    WrongFingerprint,
}

impl AuthFailure {
    /// The metric label.
    pub const fn label(self) -> &'static str {
        match self {
            Self::Missing => "missing",
            Self::Malformed => "malformed",
            Self::Expired => "expired",
            Self::WrongType => "wrong_type",
            Self::Revoked => "revoked",
            Self::WrongFingerprint => "wrong_fingerprint",
        }
    }

    /// Every reason, for the metrics table.
    pub const ALL: [AuthFailure; 6] = [
        Self::Missing,
        Self::Malformed,
        Self::Expired,
        Self::WrongType,
        Self::Revoked,
        Self::WrongFingerprint,
    ];
}

/// Verifies access tokens. Called on a shard: must not block (no storage round trip in the
/// common case).
pub trait Authenticator: Send + Sync + 'static {
    /// Verifies an access token presented by `client`.
    fn verify_access(&self, token: &str, client: &ClientInfo<'_>) -> Result<Identity, AuthFailure>;

    /// Verifies a fresh access token sent with `refresh` on a live connection whose identity is
    /// `current`: same user, and a bound token must carry `current`'s binding.
    fn verify_refresh(&self, token: &str, current: &Identity) -> Result<Identity, AuthFailure>;

    /// Whether the session or account of `identity` has been revoked since it was verified.
    fn revoked(&self, identity: &Identity) -> Option<Revoked>;
}
