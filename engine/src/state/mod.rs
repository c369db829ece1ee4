//! The seams of the state that the shards of a node — and, with a shared store, several nodes
//! (SPEC §10) — count together: connection caps and connect rates ([`Counters`]), who is connected
//! and on which shards ([`Presence`]), closed sessions that may be resumed ([`Resumes`]). Each is
//! a trait; [`InProcess`] (striped maps in this process, `local.rs`) is the embedded default and
//! today's only implementation. [`Backend`] holds the implementation as an enum (static dispatch,
//! nothing boxed per call); the engine calls the traits and never asks which, except for the
//! node's own count of connections in progress ([`Backend::local`]), which is never shared.
//!
//! Rooms' order and history (the broker of the architecture) live in the room core, which is the
//! in-process broker; a shared broker answers a publish's `seq` asynchronously, which is shaped
//! with its implementation. This module must not know shards, sockets or rooms' members.

mod local;
mod seams;

use std::net::IpAddr;
use std::sync::Arc;

pub(crate) use local::{InProcess, PendingSlot};
pub(crate) use seams::{CapRefusal, Counters, Presence, Resumes};

use crate::conn::ConnId;
use crate::room::OnlineUser;

/// The implementation of the shared state. Today always [`InProcess`]; a shared store joins as a
/// variant chosen by the configuration.
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

    fn upkeep(&self, turn: usize) {
        match self {
            Self::InProcess(s) => s.upkeep(turn),
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
