//! The seams of the state that the shards of a node — and, with a shared store, several nodes
//! (SPEC §10) — count together: connection caps and connect rates ([`Counters`]), who is connected
//! and on which shards ([`Presence`]), closed sessions that may be resumed ([`Resumes`]). Each is
//! a trait; [`InProcess`] (striped maps in this process, `local.rs`) is the embedded default and
//! today's only implementation. [`Backend`] holds the implementation the configuration chose as an
//! enum (static dispatch, nothing boxed per call); the engine calls the traits and never asks
//! which.
//!
//! Rooms' order and history (the broker of the architecture) live in the room core, which is the
//! in-process broker; a shared broker answers a publish's `seq` asynchronously, which is shaped
//! with its implementation. This module must not know shards, sockets or rooms' members.

mod local;

use std::net::IpAddr;
use std::sync::Arc;

pub(crate) use local::{InProcess, PendingSlot};

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

/// The implementation of the shared state the configuration chose.
pub(crate) enum Backend {
    /// This process's own maps (the embedded default).
    InProcess(InProcess),
}

impl Backend {
    /// The in-process state's per-IP table, which also counts this node's connections in
    /// progress (they are never shared: they are this node's sockets).
    pub(crate) fn local(&self) -> &InProcess {
        match self {
            Self::InProcess(local) => local,
        }
    }
}

impl Counters for Backend {
    fn connect_allowed(&self, ip: IpAddr) -> bool {
        match self {
            Self::InProcess(s) => s.connect_allowed(ip),
        }
    }

    fn admit(
        &self,
        ip: IpAddr,
        user: &Arc<str>,
        name: &Arc<str>,
        conn: ConnId,
    ) -> Result<Option<ConnId>, CapRefusal> {
        match self {
            Self::InProcess(s) => s.admit(ip, user, name, conn),
        }
    }

    fn release(&self, ip: IpAddr, user: &Arc<str>, conn: ConnId) {
        match self {
            Self::InProcess(s) => s.release(ip, user, conn),
        }
    }
}

impl Presence for Backend {
    fn user_conns(&self, user: &str) -> Vec<ConnId> {
        match self {
            Self::InProcess(s) => s.user_conns(user),
        }
    }

    fn online_user(&self, user: &str) -> Option<OnlineUser> {
        match self {
            Self::InProcess(s) => s.online_user(user),
        }
    }
}

impl Resumes for Backend {
    fn remember(&self, session: &str, user: &Arc<str>) {
        match self {
            Self::InProcess(s) => s.remember(session, user),
        }
    }

    fn take(&self, session: &str, user: &str) -> bool {
        match self {
            Self::InProcess(s) => s.take(session, user),
        }
    }
}
