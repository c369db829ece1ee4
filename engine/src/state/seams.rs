//! The traits of the shared-state seams and what they answer; implementations live beside them
//! (`local.rs`) and are chosen in `state`.

use std::net::IpAddr;
use std::sync::Arc;

use crate::conn::ConnId;
use crate::room::OnlineUser;

/// Why a connect was refused by the caps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CapRefusal {
    TooManyForIp,
    TooManyForUser,
}

/// Connect rates and connection caps (SPEC §9 `connect_per_ip`, `max_connections_per_ip`,
/// `max_connections_per_user` with `session_conflict`).
pub(crate) trait Counters {
    /// Takes one connect attempt of `ip` (its group: an IPv4 address, an IPv6 /64); false past
    /// the rate.
    fn connect_allowed(&self, ip: IpAddr) -> bool;
    /// Counts a new connection against the per-IP and per-user caps; the connection it replaces
    /// (to close with 4509) under `close_oldest`.
    fn admit(
        &self,
        ip: IpAddr,
        user: &Arc<str>,
        name: &Arc<str>,
        conn: ConnId,
    ) -> Result<Option<ConnId>, CapRefusal>;
    /// Undoes [`Counters::admit`] when the connection ends.
    fn release(&self, ip: IpAddr, user: &Arc<str>, conn: ConnId);
    /// Periodic upkeep, called by every shard's ticker with a turn number that differs between
    /// shards and rises with time (the in-process maps sweep one stripe of stale entries).
    fn upkeep(&self, turn: usize);
}

/// Who is connected, and where (a personal room's owner, SPEC §5).
pub(crate) trait Presence {
    /// `user`'s live connections (oldest first).
    fn user_conns(&self, user: &str) -> Vec<ConnId>;
    /// `user`'s name, connection count and shards, when it has a connection.
    fn online_user(&self, user: &str) -> Option<OnlineUser>;
}

/// Closed sessions that may be resumed (SPEC §7, `resume_ttl`).
pub(crate) trait Resumes {
    /// Remembers a closed session of `user` for `resume_ttl`.
    fn remember(&self, session: &str, user: &Arc<str>);
    /// Takes a resumable session: true when it exists, is unexpired and belongs to `user`. A
    /// session can be taken once.
    fn take(&self, session: &str, user: &str) -> bool;
}
