//! Limits counted by every node of a service together (SPEC §9 and §10 point 7): the questions
//! the server asks ([`SharedAsk`]) and the answers ([`Verdict`]); the shared broker counts them
//! in Redis with one atomic script per question. Without Redis, or while it is unreachable, the
//! answer is [`Verdict::Unknown`] and the caller's own per-node counters decide (never "no
//! limit"). Plain types.

/// What a node asks of a shared limit.
#[derive(Debug, Clone, PartialEq)]
pub enum SharedAsk {
    /// Take one token of the bucket `key` (`per_token_ms` between tokens, `burst` of them).
    Take {
        /// The bucket, e.g. `login_per_ip:<ip>`.
        key: String,
        /// Milliseconds per token.
        per_token_ms: f64,
        /// Tokens a full bucket holds.
        burst: u32,
    },
    /// Whether the account `key` is locked out.
    Locked {
        /// The account (e.g. the e-mail's blind index in hex).
        key: String,
    },
    /// One more failed login of `key`: locks it after `limit` within `window_ms`, for
    /// `lockout_ms`.
    Failed {
        /// The account.
        key: String,
        /// The window of the failure count.
        window_ms: u64,
        /// Failures that lock.
        limit: u32,
        /// How long a lock lasts.
        lockout_ms: u64,
    },
    /// A successful login of `key`: its failures are forgotten.
    Succeeded {
        /// The account.
        key: String,
    },
}

impl SharedAsk {
    /// The key it counts under (without the service's prefix).
    pub(crate) fn key(&self) -> &str {
        match self {
            Self::Take { key, .. }
            | Self::Locked { key }
            | Self::Failed { key, .. }
            | Self::Succeeded { key } => key,
        }
    }
}

/// The answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Within the limit (taken, not locked).
    Allowed,
    /// Past it: retry after this many milliseconds.
    Limited {
        /// Milliseconds until it may succeed.
        retry_after_ms: u64,
    },
    /// Redis did not answer (or is not configured): the node's own counters decide.
    Unknown,
}
