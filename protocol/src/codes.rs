//! The wire codes of SPEC §4: `error.code` strings and WebSocket close codes.
//!
//! Named constants with their documented meaning, so that the engine and the server map errors
//! at one edge and never spell a code twice.

/// An `error.code` of SPEC §4, shared by the HTTP API and the WebSocket protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    /// Malformed request (HTTP: body not JSON).
    BadRequest,
    /// A field failed validation (HTTP; carries `field`).
    InvalidInput,
    /// A WebSocket message that is not a well-formed envelope.
    InvalidMessage,
    /// A well-formed envelope with an `op` the server does not know.
    UnknownOp,
    /// Missing or unusable credentials.
    Unauthorized,
    /// A token failed verification for any reason (the reason is logged, never sent).
    InvalidToken,
    /// A rotated refresh token was presented again: the session is revoked.
    TokenReused,
    /// Registration with an e-mail already in use.
    EmailTaken,
    /// Registration with a username already in use (ignoring case).
    UsernameTaken,
    /// An `Idempotency-Key` replayed with a different body.
    IdempotencyKeyReused,
    /// Login failed (generic; never says which part was wrong).
    InvalidCredentials,
    /// The caller may not do this.
    Forbidden,
    /// No such resource.
    NotFound,
    /// `POST /rooms` with an id in use.
    RoomExists,
    /// The room is at `max_members`.
    RoomFull,
    /// Publishing to a room the connection has not joined.
    NotJoined,
    /// A rate limit answered; retry later.
    RateLimited,
    /// A body or message above its bound.
    TooLarge,
    /// Media type, transport or feature not supported.
    Unsupported,
    /// The request conflicts with the current state.
    Conflict,
    /// A dependency is down or a queue is full; retry later.
    Unavailable,
    /// A server fault.
    Internal,
}

impl ErrorCode {
    /// Every code, for tests and documentation.
    pub const ALL: [ErrorCode; 22] = [
        Self::BadRequest,
        Self::InvalidInput,
        Self::InvalidMessage,
        Self::UnknownOp,
        Self::Unauthorized,
        Self::InvalidToken,
        Self::TokenReused,
        Self::EmailTaken,
        Self::UsernameTaken,
        Self::IdempotencyKeyReused,
        Self::InvalidCredentials,
        Self::Forbidden,
        Self::NotFound,
        Self::RoomExists,
        Self::RoomFull,
        Self::NotJoined,
        Self::RateLimited,
        Self::TooLarge,
        Self::Unsupported,
        Self::Conflict,
        Self::Unavailable,
        Self::Internal,
    ];

    /// The snake_case wire name.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::BadRequest => "bad_request",
            Self::InvalidInput => "invalid_input",
            Self::InvalidMessage => "invalid_message",
            Self::UnknownOp => "unknown_op",
            Self::Unauthorized => "unauthorized",
            Self::InvalidToken => "invalid_token",
            Self::TokenReused => "token_reused",
            Self::EmailTaken => "email_taken",
            Self::UsernameTaken => "username_taken",
            Self::IdempotencyKeyReused => "idempotency_key_reused",
            Self::InvalidCredentials => "invalid_credentials",
            Self::Forbidden => "forbidden",
            Self::NotFound => "not_found",
            Self::RoomExists => "room_exists",
            Self::RoomFull => "room_full",
            Self::NotJoined => "not_joined",
            Self::RateLimited => "rate_limited",
            Self::TooLarge => "too_large",
            Self::Unsupported => "unsupported",
            Self::Conflict => "conflict",
            Self::Unavailable => "unavailable",
            Self::Internal => "internal",
        }
    }

    /// Parses a wire name (clients and tests).
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|code| code.as_str() == name)
    }
}

/// A WebSocket close code of SPEC §4. 4000–4499 mean "reconnect with backoff", 4500–4999 "do not
/// reconnect automatically".
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CloseCode(pub u16);

impl CloseCode {
    /// Normal closure.
    pub const NORMAL: Self = Self(1000);
    /// Server shutting down: reconnect elsewhere and `resume`.
    pub const GOING_AWAY: Self = Self(1001);
    /// Protocol error.
    pub const PROTOCOL_ERROR: Self = Self(1002);
    /// Unsupported data (e.g. a binary frame on a JSON connection).
    pub const UNSUPPORTED_DATA: Self = Self(1003);
    /// Close frame without status (never sent; reported for an empty close payload).
    pub const NO_STATUS: Self = Self(1005);
    /// Invalid UTF-8 in a text message.
    pub const INVALID_PAYLOAD: Self = Self(1007);
    /// Policy violation.
    pub const POLICY: Self = Self(1008);
    /// Message too big (also a zstd frame that decompresses past the bound).
    pub const TOO_BIG: Self = Self(1009);
    /// Internal error.
    pub const INTERNAL: Self = Self(1011);
    /// Token expired or revoked: obtain a new access token first.
    pub const UNAUTHORIZED: Self = Self(4001);
    /// Kept sending past 3× a rate limit.
    pub const RATE_LIMITED: Self = Self(4008);
    /// Silent for longer than `2 × heartbeat + 10s`.
    pub const IDLE_TIMEOUT: Self = Self(4010);
    /// More than `max_queued_bytes` waiting to be written.
    pub const SLOW_CONSUMER: Self = Self(4011);
    /// The connection's origin was removed from `allowed_origins` at run time.
    pub const ORIGIN_FORBIDDEN: Self = Self(4503);
    /// Replaced by a newer connection of the same user (`close_oldest`).
    pub const SESSION_REPLACED: Self = Self(4509);
    /// Account deleted or every session logged out.
    pub const ACCOUNT_CLOSED: Self = Self(4510);

    /// The close reason the server sends: the code's name.
    pub const fn reason(self) -> &'static str {
        match self.0 {
            1000 => "normal",
            1001 => "going_away",
            1002 => "protocol_error",
            1003 => "unsupported_data",
            1005 => "no_status",
            1007 => "invalid_payload",
            1008 => "policy_violation",
            1009 => "too_big",
            1011 => "internal_error",
            4001 => "unauthorized",
            4008 => "rate_limited",
            4010 => "idle_timeout",
            4011 => "slow_consumer",
            4503 => "origin_forbidden",
            4509 => "session_replaced",
            4510 => "account_closed",
            _ => "",
        }
    }

    /// Whether a peer may send this code in a close frame (RFC 6455 §7.4).
    pub fn is_valid_on_wire(self) -> bool {
        matches!(self.0, 1000..=1003 | 1007..=1014 | 3000..=4999)
    }

    /// Whether SPEC §4 tells the client to reconnect (with backoff).
    pub const fn should_reconnect(self) -> bool {
        matches!(self.0, 1001 | 1011 | 4000..=4499)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_names_round_trip_and_are_unique() {
        let mut names: Vec<_> = ErrorCode::ALL.iter().map(|c| c.as_str()).collect();
        for code in ErrorCode::ALL {
            assert_eq!(ErrorCode::from_name(code.as_str()), Some(code));
        }
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), ErrorCode::ALL.len());
    }

    #[test]
    fn close_reasons_are_the_spec_names() {
        assert_eq!(CloseCode::SLOW_CONSUMER.reason(), "slow_consumer");
        assert_eq!(CloseCode::SESSION_REPLACED.reason(), "session_replaced");
        assert!(CloseCode::RATE_LIMITED.should_reconnect());
        assert!(!CloseCode::ACCOUNT_CLOSED.should_reconnect());
        assert!(!CloseCode::NO_STATUS.is_valid_on_wire());
        assert!(CloseCode(4999).is_valid_on_wire());
    }
}
