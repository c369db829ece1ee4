//! What this node tells the other nodes of its service, and what it does when told (SPEC §10
//! points 5 and 6): revocations, room changes and admin role changes. The text of each
//! announcement (pure, tested here) and the [`NodeListener`] that applies what another node
//! announced through the same paths as a local change — in order, on a thread of its own, never on the shard
//! that heard it. Announcements are best effort on top of storage: a node that missed some (Redis
//! was unreachable, it restarted) reloads revocations, rooms and admins from storage.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use engine::Revoked;
use storage::{Revocation, RevocationKind};

use crate::accounts::Accounts;
use crate::origins::Origins;
use crate::pool::Pool;
use crate::rooms::RoomService;

/// One announcement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Announcement {
    /// A revocation written to storage on the announcing node.
    Revoked {
        /// What was revoked.
        revocation: Revocation,
        /// Who owns what it covers.
        user: String,
    },
    /// A persistent room changed: read it again and ask the policy again for its members.
    RoomChanged {
        /// The room.
        room: String,
    },
    /// A persistent room was deleted: kick its members and forget it.
    RoomDeleted {
        /// The room.
        room: String,
    },
    /// A user was removed from a room: read the room again and kick the user.
    MemberRemoved {
        /// The room.
        room: String,
        /// The user removed.
        user: String,
    },
    /// Someone's admin role changed: read the admins again.
    AdminsChanged,
    /// `allowed_origins` changed: read them again.
    OriginsChanged,
}

impl Announcement {
    /// The wire text: `R|s|at|until|user|session`, `R|u|at|until|user`, `M|c|room`, `M|d|room`,
    /// `M|k|user|room`, `A`.
    pub fn encode(&self) -> Vec<u8> {
        match self {
            Self::Revoked { revocation, user } => {
                let r = revocation;
                match r.kind {
                    RevocationKind::Session => format!(
                        "R|s|{}|{}|{user}|{}",
                        r.revoked_at_ms, r.keep_until_ms, r.subject
                    ),
                    RevocationKind::User => {
                        format!("R|u|{}|{}|{user}", r.revoked_at_ms, r.keep_until_ms)
                    }
                }
            }
            Self::RoomChanged { room } => format!("M|c|{room}"),
            Self::RoomDeleted { room } => format!("M|d|{room}"),
            Self::MemberRemoved { room, user } => format!("M|k|{user}|{room}"),
            Self::AdminsChanged => "A".to_owned(),
            Self::OriginsChanged => "O".to_owned(),
        }
        .into_bytes()
    }

    /// Reads the wire text; `None` for anything else (ignored: a newer node may say more).
    pub fn decode(text: &[u8]) -> Option<Self> {
        let text = std::str::from_utf8(text).ok()?;
        let fields: Vec<&str> = text.split('|').collect();
        let nonempty = |s: &str| (!s.is_empty()).then(|| s.to_owned());
        Some(match fields.as_slice() {
            ["R", kind, at, until, user, rest @ ..] => {
                let (kind, subject) = match (*kind, rest) {
                    ("s", [session]) => (RevocationKind::Session, nonempty(session)?),
                    ("u", []) => (RevocationKind::User, nonempty(user)?),
                    _ => return None,
                };
                Self::Revoked {
                    revocation: Revocation {
                        kind,
                        subject,
                        revoked_at_ms: at.parse().ok()?,
                        keep_until_ms: until.parse().ok()?,
                    },
                    user: nonempty(user)?,
                }
            }
            ["M", "c", room] => Self::RoomChanged {
                room: nonempty(room)?,
            },
            ["M", "d", room] => Self::RoomDeleted {
                room: nonempty(room)?,
            },
            ["M", "k", user, room] => Self::MemberRemoved {
                room: nonempty(room)?,
                user: nonempty(user)?,
            },
            ["A"] => Self::AdminsChanged,
            ["O"] => Self::OriginsChanged,
            _ => return None,
        })
    }

    /// Tells the other nodes (nothing without Redis).
    pub fn tell(&self, control: Option<&engine::Control>) {
        if let Some(control) = control {
            control.announce(self.encode());
        }
    }
}

/// Announcements waiting to be applied before the listener falls back to one full reload.
const ANNOUNCE_QUEUE: usize = 4096;

/// Applies what other nodes announce.
pub struct NodeListener {
    accounts: Arc<Accounts>,
    rooms: Arc<RoomService>,
    origins: Arc<Origins>,
    /// One thread: announcements are applied in the order they were made (a logout-all's
    /// account revocation before its sessions', so its connections close with 4510).
    worker: Pool,
    /// A reload after a full queue is running.
    reloading: Arc<AtomicBool>,
}

impl NodeListener {
    /// The listener of a node whose accounts, rooms and origins are these; the work runs on a
    /// thread of its own, in order.
    pub fn new(accounts: Arc<Accounts>, rooms: Arc<RoomService>, origins: Arc<Origins>) -> Self {
        Self {
            accounts,
            rooms,
            origins,
            worker: Pool::new("announce", 1, ANNOUNCE_QUEUE, false),
            reloading: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Queues `job` behind the announcements before it. When the queue is full nothing is lost:
    /// one thread (at most one at a time) reloads everything announcements carry from storage.
    fn run(&self, job: impl FnOnce() + Send + 'static) {
        if self.worker.submit(job).is_ok() {
            return;
        }
        if self.reloading.swap(true, Ordering::AcqRel) {
            return;
        }
        tracing::warn!("too many announcements queued: reloading what other nodes announced");
        let (accounts, rooms, origins) = (
            self.accounts.clone(),
            self.rooms.clone(),
            self.origins.clone(),
        );
        let reloading = self.reloading.clone();
        let spawned = std::thread::Builder::new()
            .name("ringhub-reload".into())
            .spawn(move || {
                reload_everything(&accounts, &rooms, &origins);
                reloading.store(false, Ordering::Release);
            });
        if spawned.is_err() {
            self.reloading.store(false, Ordering::Release);
        }
    }
}

/// What a node that missed announcements reads again from storage.
fn reload_everything(accounts: &Accounts, rooms: &RoomService, origins: &Origins) {
    accounts.reload_revocations();
    rooms.reload_all();
    rooms.reload_admins();
    origins.reload();
}

impl engine::announce::Listener for NodeListener {
    fn heard(&self, message: &[u8]) {
        let Some(announcement) = Announcement::decode(message) else {
            tracing::debug!(len = message.len(), "an announcement this node cannot read");
            return;
        };
        let (accounts, rooms) = (self.accounts.clone(), self.rooms.clone());
        let origins = self.origins.clone();
        self.run(move || match announcement {
            Announcement::Revoked { revocation, user } => {
                let session = match revocation.kind {
                    RevocationKind::Session => Some(revocation.subject.clone()),
                    RevocationKind::User => None,
                };
                let reach = match revocation.kind {
                    RevocationKind::Session => Revoked::Session,
                    RevocationKind::User => Revoked::Account,
                };
                accounts.revoked_elsewhere(revocation, &user, session.as_deref(), reach);
            }
            Announcement::RoomChanged { room } => rooms.changed_elsewhere(&room, None),
            Announcement::RoomDeleted { room } => rooms.deleted_elsewhere(&room),
            Announcement::MemberRemoved { room, user } => {
                rooms.changed_elsewhere(&room, Some(&user));
            }
            Announcement::AdminsChanged => rooms.reload_admins(),
            Announcement::OriginsChanged => origins.reload(),
        });
    }

    fn missed(&self) {
        let (accounts, rooms) = (self.accounts.clone(), self.rooms.clone());
        let origins = self.origins.clone();
        self.run(move || reload_everything(&accounts, &rooms, &origins));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn announcements_read_back_as_written() {
        let all = [
            Announcement::Revoked {
                revocation: Revocation {
                    kind: RevocationKind::Session,
                    subject: "s-1".into(),
                    revoked_at_ms: 10,
                    keep_until_ms: 20,
                },
                user: "u-1".into(),
            },
            Announcement::Revoked {
                revocation: Revocation {
                    kind: RevocationKind::User,
                    subject: "u-2".into(),
                    revoked_at_ms: i64::MAX,
                    keep_until_ms: i64::MAX,
                },
                user: "u-2".into(),
            },
            Announcement::RoomChanged {
                room: "chat.1:x@y".into(),
            },
            Announcement::RoomDeleted { room: "r".into() },
            Announcement::MemberRemoved {
                room: "r".into(),
                user: "u".into(),
            },
            Announcement::AdminsChanged,
            Announcement::OriginsChanged,
        ];
        for a in all {
            assert_eq!(Announcement::decode(&a.encode()), Some(a));
        }
    }

    #[test]
    fn anything_else_is_ignored() {
        for text in [
            &b""[..],
            b"R|s|1|2|u",
            b"R|u|1|2|",
            b"R|x|1|2|u|s",
            b"R|s|one|2|u|s",
            b"M|c|",
            b"M|k|u",
            b"Z",
            b"\xff",
        ] {
            assert_eq!(Announcement::decode(text), None, "{text:?}");
        }
    }
}
