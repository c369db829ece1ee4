//! Persistent rooms and their permissions (SPEC §5, the rooms routes of §2): the in-memory
//! [`RoomDirectory`] that the engine asks on every join (its `RoomPolicy`, a read lock and a map
//! lookup, never storage), and the [`RoomService`] behind the HTTP routes, which writes storage
//! first, then the directory, then tells the live connections (kick, re-authorize) before it
//! answers. Functions of the service block and run on the storage pool.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, OnceLock, RwLock};

use engine::{HttpResponse, Identity, RoomAccess, RoomPolicy, RoomSettings};
use protocol::ErrorCode;
use protocol::envelope::RoomId;
use serde::Serialize;
use storage::{MemberRole, Permission, RoomRecord, RoomUpdate, Store, StoreError};

use crate::announce::Announcement;
use crate::api_error::{Answer, ApiError};
use crate::clock::now_ms;
use crate::config::Rate;
use crate::limiter::BucketTable;

/// Room-changing calls (create, update, delete, member changes) a user may make per minute.
pub const ROOM_CHANGES_PER_MINUTE: u32 = 120;

/// What a user is to a room.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Relation {
    /// Created it.
    Owner,
    /// Appointed by the owner.
    Moderator,
    /// Added by the owner or a moderator.
    Member,
    /// Anyone else.
    Stranger,
}

/// The permission matrix of SPEC §5 for one user and room.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rights {
    /// Join, history, presence, `GET /rooms/{id}`.
    pub read: bool,
    /// Publish.
    pub publish: bool,
    /// Change the room's settings, delete it, appoint moderators.
    pub manage_settings: bool,
    /// Add and remove plain members.
    pub manage_members: bool,
}

/// SPEC §5's table; admins may do everything.
pub fn rights(permission: Permission, relation: Relation, admin: bool) -> Rights {
    if admin || relation == Relation::Owner {
        return Rights {
            read: true,
            publish: true,
            manage_settings: true,
            manage_members: true,
        };
    }
    let insider = matches!(relation, Relation::Moderator | Relation::Member);
    let moderator = relation == Relation::Moderator;
    match permission {
        Permission::Public => Rights {
            read: true,
            publish: true,
            manage_settings: false,
            manage_members: false,
        },
        Permission::Restricted => Rights {
            read: true,
            publish: insider,
            manage_settings: false,
            manage_members: moderator,
        },
        Permission::Private => Rights {
            read: insider,
            publish: insider,
            manage_settings: false,
            manage_members: moderator,
        },
        Permission::OwnerOnly => Rights {
            read: false,
            publish: false,
            manage_settings: false,
            manage_members: false,
        },
    }
}

#[derive(Debug, Clone)]
struct Entry {
    record: RoomRecord,
    members: HashMap<String, MemberRole>,
    /// Being deleted: denied to everyone until the shards have forgotten it.
    deleted: bool,
}

impl Entry {
    fn relation(&self, user: &str) -> Relation {
        if self.record.owner_id == user {
            return Relation::Owner;
        }
        match self.members.get(user) {
            Some(MemberRole::Moderator) => Relation::Moderator,
            Some(MemberRole::Member) => Relation::Member,
            None => Relation::Stranger,
        }
    }

    fn settings(&self) -> RoomSettings {
        RoomSettings {
            max_members: self.record.max_members,
            presence: self.record.presence,
            history: self.record.history,
        }
    }
}

/// Every persistent room with its memberships, and the admins: the engine's room policy.
#[derive(Debug, Default)]
pub struct RoomDirectory {
    rooms: RwLock<HashMap<String, Arc<Entry>>>,
    admins: RwLock<HashSet<String>>,
}

impl RoomDirectory {
    /// Loads every room, membership and admin from storage.
    pub fn load(store: &dyn Store) -> Result<Self, StoreError> {
        let mut rooms: HashMap<String, Entry> = store
            .all_rooms()?
            .into_iter()
            .map(|record| {
                (
                    record.id.clone(),
                    Entry {
                        record,
                        members: HashMap::new(),
                        deleted: false,
                    },
                )
            })
            .collect();
        for (room, user, role) in store.all_members()? {
            if let Some(entry) = rooms.get_mut(&room) {
                entry.members.insert(user, role);
            }
        }
        let directory = Self {
            rooms: RwLock::new(rooms.into_iter().map(|(k, v)| (k, Arc::new(v))).collect()),
            admins: RwLock::new(HashSet::new()),
        };
        directory.set_admins(store.admins()?);
        Ok(directory)
    }

    /// Replaces the admin set (reloaded periodically: `ringhub user set-role` runs in another
    /// process). Returns the users who lost the role.
    pub fn set_admins(&self, admins: Vec<String>) -> Vec<String> {
        let admins: HashSet<String> = admins.into_iter().collect();
        let mut current = self
            .admins
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let demoted = current.difference(&admins).cloned().collect();
        *current = admins;
        demoted
    }

    /// Whether `user` has the global admin role.
    pub fn is_admin(&self, user: &str) -> bool {
        self.admins
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .contains(user)
    }

    fn get(&self, room: &str) -> Option<Arc<Entry>> {
        self.rooms
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(room)
            .cloned()
    }

    fn put(&self, entry: Entry) {
        self.rooms
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(entry.record.id.clone(), Arc::new(entry));
    }

    /// Changes a room's entry under the write lock (so that concurrent changes compose instead
    /// of the last one restoring a stale copy); nothing when the room is gone.
    fn modify(&self, room: &str, change: impl FnOnce(&mut Entry)) {
        let mut rooms = self
            .rooms
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(entry) = rooms.get_mut(room) {
            change(Arc::make_mut(entry));
        }
    }

    fn remove(&self, room: &str) {
        self.rooms
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(room);
    }

    /// Replaces this node's copy of `room` with what storage holds now (another node changed
    /// it); false when storage has no such room.
    fn refresh(&self, store: &dyn Store, room: &str) -> Result<bool, StoreError> {
        let Some(record) = store.room(room)? else {
            self.remove(room);
            return Ok(false);
        };
        let members = store.members(room)?.into_iter().collect();
        self.put(Entry {
            record,
            members,
            deleted: false,
        });
        Ok(true)
    }

    /// Replaces every room with what storage holds now (announcements may have been missed):
    /// the rooms that changed, and those that are gone.
    fn reload(&self, store: &dyn Store) -> Result<(Vec<String>, Vec<String>), StoreError> {
        let fresh = Self::load(store)?;
        let fresh = fresh
            .rooms
            .into_inner()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut current = self
            .rooms
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let changed = fresh
            .iter()
            .filter(|(id, entry)| {
                current
                    .get(*id)
                    .is_none_or(|old| old.record != entry.record || old.members != entry.members)
            })
            .map(|(id, _)| id.clone())
            .collect();
        let gone = current
            .keys()
            .filter(|id| !fresh.contains_key(*id))
            .cloned()
            .collect();
        *current = fresh;
        Ok((changed, gone))
    }

    /// A user's rights in a persistent room; `None` when the room is not persistent.
    pub fn rights_of(&self, room: &str, user: &str) -> Option<Rights> {
        let entry = self.get(room)?;
        if entry.deleted {
            return Some(rights(Permission::OwnerOnly, Relation::Stranger, false));
        }
        Some(rights(
            entry.record.permission,
            entry.relation(user),
            self.is_admin(user),
        ))
    }
}

impl RoomPolicy for RoomDirectory {
    fn is_admin(&self, user: &str) -> bool {
        RoomDirectory::is_admin(self, user)
    }

    fn access(&self, room: &RoomId, user: &str) -> RoomAccess {
        let Some(entry) = self.get(room.as_str()) else {
            return RoomAccess::Unknown;
        };
        if entry.deleted {
            return RoomAccess::Denied;
        }
        let r = rights(
            entry.record.permission,
            entry.relation(user),
            self.is_admin(user),
        );
        if r.read {
            RoomAccess::Granted {
                publish: r.publish,
                settings: entry.settings(),
            }
        } else {
            RoomAccess::Denied
        }
    }
}

/// The rooms routes' work.
pub struct RoomService {
    store: Arc<dyn Store>,
    directory: Arc<RoomDirectory>,
    control: OnceLock<engine::Control>,
    /// Room changes per user: each one makes every shard look at its connections.
    changes_per_user: BucketTable,
    /// `POST /rooms/{id}/messages` per user: the per-connection publish limit of a WebSocket.
    publish_per_user: BucketTable,
    default_rooms: Vec<RoomId>,
    default_max_members: u32,
    max_message_bytes: usize,
    max_json_depth: usize,
}

impl std::fmt::Debug for RoomService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RoomService").finish_non_exhaustive()
    }
}

fn no_such_room() -> ApiError {
    ApiError::not_found("no such room")
}

#[derive(Serialize)]
struct RoomJson<'a> {
    id: &'a str,
    permission: &'static str,
    owner: &'a str,
    max_members: u32,
    members_online: usize,
    presence: bool,
    history: bool,
}

fn room_body(record: &RoomRecord, online: usize) -> Vec<u8> {
    #[derive(Serialize)]
    struct Wrapper<'a> {
        room: RoomJson<'a>,
    }
    sonic_rs::to_vec(&Wrapper {
        room: RoomJson {
            id: &record.id,
            permission: record.permission.as_str(),
            owner: &record.owner_id,
            max_members: record.max_members,
            members_online: online,
            presence: record.presence,
            history: record.history,
        },
    })
    .unwrap_or_default()
}

/// The fields of `POST /rooms`, validated on the shard.
#[derive(Debug, Clone)]
pub struct NewRoom {
    /// Room id.
    pub id: RoomId,
    /// Permission level.
    pub permission: Permission,
    /// Size limit (default `max_room_members`).
    pub max_members: Option<u32>,
    /// Presence switch.
    pub presence: bool,
    /// History switch.
    pub history: bool,
}

impl RoomService {
    /// The service over `store` and `directory`.
    pub fn new(
        store: Arc<dyn Store>,
        directory: Arc<RoomDirectory>,
        default_rooms: Vec<RoomId>,
        default_max_members: u32,
        max_message_bytes: usize,
        max_json_depth: usize,
        publish_per_user: engine::RateSpec,
    ) -> Self {
        Self {
            store,
            directory,
            control: OnceLock::new(),
            publish_per_user: BucketTable::with_burst(
                Rate {
                    count: publish_per_user.count,
                    per: publish_per_user.per,
                },
                publish_per_user.burst,
            ),
            changes_per_user: BucketTable::new(Rate {
                count: ROOM_CHANGES_PER_MINUTE,
                per: std::time::Duration::from_secs(60),
            }),
            default_rooms,
            default_max_members,
            max_message_bytes,
            max_json_depth,
        }
    }

    /// Connects the running engine.
    pub fn attach(&self, control: engine::Control) {
        let _ = self.control.set(control);
    }

    /// Another node changed `room` (and removed `removed` from it): read it again, then kick the
    /// removed user or ask the policy again for every member here.
    pub fn changed_elsewhere(&self, room: &str, removed: Option<&str>) {
        let Ok(id) = RoomId::parse(room) else {
            return;
        };
        if let Err(e) = self.directory.refresh(&*self.store, room) {
            tracing::warn!(room, error = %e, "cannot read a room changed on another node");
            return;
        }
        if let Some(control) = self.control.get() {
            match removed {
                Some(user) => control.kick(&id, Some(user), "removed"),
                None => control.reauthorize(&id),
            };
        }
    }

    /// Another node deleted `room`: its members here are kicked and it is forgotten.
    pub fn deleted_elsewhere(&self, room: &str) {
        let Ok(id) = RoomId::parse(room) else {
            return;
        };
        self.directory.modify(room, |e| e.deleted = true);
        if let Some(control) = self.control.get() {
            control.delete_room(&id);
        }
        self.directory.remove(room);
    }

    /// Reads every room again (announcements may have been missed): members of changed rooms
    /// are asked for again, those of rooms gone are kicked.
    pub fn reload_all(&self) {
        let (changed, gone) = match self.directory.reload(&*self.store) {
            Ok(both) => both,
            Err(e) => {
                tracing::warn!(error = %e, "cannot reload rooms");
                return;
            }
        };
        let Some(control) = self.control.get() else {
            return;
        };
        for room in changed.iter().filter_map(|r| RoomId::parse(r).ok()) {
            control.reauthorize(&room);
        }
        for room in gone.iter().filter_map(|r| RoomId::parse(r).ok()) {
            control.kick(&room, None, "room_deleted");
        }
    }

    /// Reloads the admin set from storage.
    pub fn reload_admins(&self) {
        match self.store.admins() {
            Ok(admins) => {
                // A former admin keeps no room that only the role let them into.
                for user in self.directory.set_admins(admins) {
                    if let Some(control) = self.control.get() {
                        control.reauthorize_user(&user);
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot reload admins"),
        }
    }

    /// One token of the caller's publish budget (`POST /rooms/{id}/messages`), or 429: the same
    /// rate and burst as a WebSocket publisher's, counted per user (checked on the shard before
    /// any work is queued).
    pub fn take_publish(&self, who: &Identity) -> Result<(), ApiError> {
        self.publish_per_user
            .take(who.user_id.as_bytes(), now_ms())
            .map_err(ApiError::rate_limited)
    }

    /// One token of the caller's room-change budget, or 429.
    fn budget(&self, who: &Identity) -> Result<(), ApiError> {
        self.changes_per_user
            .take(who.user_id.as_bytes(), now_ms())
            .map_err(ApiError::rate_limited)
    }

    fn online(&self, room: &RoomId) -> usize {
        self.control
            .get()
            .and_then(|c| c.presence(room))
            .map_or(0, |p| p.len())
    }

    fn entry_and_rights(&self, room: &RoomId, user: &str) -> Option<(Arc<Entry>, Rights)> {
        let entry = self.directory.get(room.as_str()).filter(|e| !e.deleted)?;
        let r = rights(
            entry.record.permission,
            entry.relation(user),
            self.directory.is_admin(user),
        );
        Some((entry, r))
    }

    /// `POST /rooms`.
    pub fn create(&self, who: &Identity, new: &NewRoom) -> Answer {
        self.budget(who)?;
        // A default room or a live ephemeral room belongs to everyone in it: only an admin may
        // turn it into somebody's persistent room.
        if !self.directory.is_admin(&who.user_id)
            && (self.default_rooms.contains(&new.id) || self.online(&new.id) > 0)
        {
            return Err(ApiError::new(
                409,
                ErrorCode::RoomExists,
                "a room with this id exists",
            ));
        }
        let record = RoomRecord {
            id: new.id.as_str().to_owned(),
            permission: new.permission,
            owner_id: who.user_id.to_string(),
            max_members: new.max_members.unwrap_or(self.default_max_members),
            presence: new.presence,
            history: new.history,
            created_at_ms: now_ms(),
        };
        match self.store.create_room(&record) {
            Ok(()) => {}
            Err(StoreError::Conflict(_)) => {
                return Err(ApiError::new(
                    409,
                    ErrorCode::RoomExists,
                    "a room with this id exists",
                ));
            }
            Err(e) => return Err(ApiError::storage(&e)),
        }
        self.directory.put(Entry {
            record: record.clone(),
            members: HashMap::new(),
            deleted: false,
        });
        // An ephemeral room of that name may be live: its members now need the new rights.
        if let Some(control) = self.control.get() {
            control.reauthorize(&new.id);
        }
        Announcement::RoomChanged {
            room: record.id.clone(),
        }
        .tell(self.control.get());
        tracing::info!(room = %record.id, user_id = %who.user_id, "room created");
        Ok(HttpResponse::json(
            201,
            room_body(&record, self.online(&new.id)),
        ))
    }

    /// `GET /rooms/{id}`.
    pub fn get(&self, who: &Identity, room: &RoomId) -> Answer {
        let Some((entry, r)) = self.entry_and_rights(room, &who.user_id) else {
            return Err(no_such_room());
        };
        if !r.read {
            return Err(ApiError::forbidden());
        }
        Ok(HttpResponse::json(
            200,
            room_body(&entry.record, self.online(room)),
        ))
    }

    /// `PATCH /rooms/{id}`.
    pub fn update(&self, who: &Identity, room: &RoomId, update: &RoomUpdate) -> Answer {
        self.budget(who)?;
        let Some((_, r)) = self.entry_and_rights(room, &who.user_id) else {
            return Err(no_such_room());
        };
        if !r.manage_settings {
            return Err(ApiError::forbidden());
        }
        let Some(record) = self.store.update_room(room.as_str(), update)? else {
            return Err(no_such_room());
        };
        let stored = record.clone();
        self.directory.modify(room.as_str(), |e| e.record = stored);
        if let Some(control) = self.control.get() {
            control.reauthorize(room);
        }
        Announcement::RoomChanged {
            room: room.as_str().to_owned(),
        }
        .tell(self.control.get());
        Ok(HttpResponse::json(
            200,
            room_body(&record, self.online(room)),
        ))
    }

    /// `DELETE /rooms/{id}`: members receive `kicked` before the answer.
    pub fn delete(&self, who: &Identity, room: &RoomId) -> Answer {
        self.budget(who)?;
        let Some((_, r)) = self.entry_and_rights(room, &who.user_id) else {
            return Err(no_such_room());
        };
        if !r.manage_settings {
            return Err(ApiError::forbidden());
        }
        if !self.store.delete_room(room.as_str())? {
            return Err(no_such_room());
        }
        // Denied to everyone while the shards kick and forget it, then gone.
        self.directory.modify(room.as_str(), |e| e.deleted = true);
        if let Some(control) = self.control.get() {
            control.delete_room(room);
        }
        self.directory.remove(room.as_str());
        Announcement::RoomDeleted {
            room: room.as_str().to_owned(),
        }
        .tell(self.control.get());
        tracing::info!(room = %room, user_id = %who.user_id, "room deleted");
        Ok(HttpResponse::json(204, Vec::new()))
    }

    /// `PUT /rooms/{id}/members/{user_id}`.
    pub fn put_member(
        &self,
        who: &Identity,
        room: &RoomId,
        user: &str,
        role: MemberRole,
    ) -> Answer {
        self.budget(who)?;
        let Some((entry, r)) = self.entry_and_rights(room, &who.user_id) else {
            return Err(no_such_room());
        };
        // Only the owner (or an admin) appoints moderators or changes one; moderators manage
        // plain members.
        let target_is_moderator = entry.members.get(user) == Some(&MemberRole::Moderator);
        let allowed = match role {
            MemberRole::Moderator => r.manage_settings,
            MemberRole::Member => r.manage_settings || (r.manage_members && !target_is_moderator),
        };
        if !allowed {
            return Err(ApiError::forbidden());
        }
        if entry.record.owner_id == user {
            return Err(ApiError::invalid_input(
                "user_id",
                "the owner is not a member",
            ));
        }
        if self.store.user_by_id(user)?.is_none() {
            return Err(ApiError::new(404, ErrorCode::NotFound, "no such user"));
        }
        if !self.store.put_member(room.as_str(), user, role, now_ms())? {
            return Err(no_such_room());
        }
        self.directory.modify(room.as_str(), |e| {
            e.members.insert(user.to_owned(), role);
        });
        if let Some(control) = self.control.get() {
            control.reauthorize(room);
        }
        Announcement::RoomChanged {
            room: room.as_str().to_owned(),
        }
        .tell(self.control.get());
        Ok(HttpResponse::json(204, Vec::new()))
    }

    /// `DELETE /rooms/{id}/members/{user_id}`: the removed user is kicked before the answer.
    pub fn remove_member(&self, who: &Identity, room: &RoomId, user: &str) -> Answer {
        self.budget(who)?;
        let Some((entry, r)) = self.entry_and_rights(room, &who.user_id) else {
            return Err(no_such_room());
        };
        let target = entry.members.get(user).copied();
        let allowed = match target {
            Some(MemberRole::Moderator) => r.manage_settings,
            Some(MemberRole::Member) => r.manage_settings || r.manage_members,
            None => r.manage_members,
        };
        if !allowed {
            return Err(ApiError::forbidden());
        }
        if target.is_none() {
            return Err(ApiError::new(
                404,
                ErrorCode::NotFound,
                "not a member of this room",
            ));
        }
        self.store.remove_member(room.as_str(), user)?;
        self.directory.modify(room.as_str(), |e| {
            e.members.remove(user);
        });
        // SPEC §2: a removed user who is online in the room is kicked, whatever the room's
        // permission (in a public or restricted room they may join again as anyone may).
        if let Some(control) = self.control.get() {
            control.kick(room, Some(user), "removed");
        }
        Announcement::MemberRemoved {
            room: room.as_str().to_owned(),
            user: user.to_owned(),
        }
        .tell(self.control.get());
        Ok(HttpResponse::json(204, Vec::new()))
    }

    /// `GET /rooms/{id}/presence`.
    pub fn presence(&self, who: &Identity, room: &RoomId) -> Answer {
        let Some((_, r)) = self.entry_and_rights(room, &who.user_id) else {
            return Err(no_such_room());
        };
        if !r.read {
            return Err(ApiError::forbidden());
        }
        let list = self
            .control
            .get()
            .and_then(|c| c.presence(room))
            .unwrap_or_default();
        #[derive(Serialize)]
        struct Member<'a> {
            user: &'a str,
            name: &'a str,
            conns: u32,
        }
        #[derive(Serialize)]
        struct Body<'a> {
            presence: Vec<Member<'a>>,
        }
        let presence = list
            .iter()
            .map(|p| Member {
                user: &p.user,
                name: &p.name,
                conns: p.conns,
            })
            .collect();
        Ok(HttpResponse::json(
            200,
            sonic_rs::to_vec(&Body { presence }).unwrap_or_default(),
        ))
    }

    /// `POST /rooms/{id}/messages`: publishes `data` (raw JSON) as the caller.
    pub fn publish(
        &self,
        who: &Identity,
        room: &RoomId,
        data: &[u8],
        event: Option<protocol::envelope::EventName>,
    ) -> Answer {
        let settings = if let Some(owner) = room.as_str().strip_prefix(RoomId::PERSONAL_PREFIX) {
            // A personal room: its owner and admins may push to it.
            if owner != &*who.user_id && !self.directory.is_admin(&who.user_id) {
                return Err(ApiError::forbidden());
            }
            None
        } else {
            let Some((entry, r)) = self.entry_and_rights(room, &who.user_id) else {
                return Err(no_such_room());
            };
            if !r.publish {
                return Err(ApiError::forbidden());
            }
            Some(entry.settings())
        };
        if data.len() > self.max_message_bytes {
            return Err(ApiError::new(
                413,
                ErrorCode::TooLarge,
                "data is larger than max_message_bytes",
            ));
        }
        let limits = protocol::envelope::DecodeLimits {
            max_depth: self.max_json_depth,
            max_message_bytes: self.max_message_bytes,
            ..protocol::envelope::DecodeLimits::default()
        };
        let Ok(value) =
            protocol::envelope::decode_value(data, protocol::envelope::Format::Json, &limits)
        else {
            return Err(ApiError::invalid_input(
                "data",
                "data is not acceptable (too deep?)",
            ));
        };
        let Some(control) = self.control.get() else {
            return Err(ApiError::new(503, ErrorCode::Unavailable, "not ready"));
        };
        match control.publish(room, &who.user_id, &who.username, (value, event), settings) {
            Ok(seq) => Ok(HttpResponse::json(
                202,
                format!(r#"{{"seq":{seq}}}"#).into_bytes(),
            )),
            Err(ErrorCode::RateLimited) => {
                Err(
                    ApiError::new(429, ErrorCode::RateLimited, "room publish rate exceeded")
                        .retry_after(1),
                )
            }
            Err(code) => Err(ApiError::new(503, code, "the room did not answer")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_matrix_of_spec_section_5() {
        use Permission::*;
        use Relation::*;
        let r = |p, rel| {
            let x = rights(p, rel, false);
            (x.read, x.publish, x.manage_settings, x.manage_members)
        };
        assert_eq!(r(Public, Stranger), (true, true, false, false));
        assert_eq!(r(Public, Moderator), (true, true, false, false));
        assert_eq!(r(Restricted, Stranger), (true, false, false, false));
        assert_eq!(r(Restricted, Member), (true, true, false, false));
        assert_eq!(r(Restricted, Moderator), (true, true, false, true));
        assert_eq!(r(Private, Stranger), (false, false, false, false));
        assert_eq!(r(Private, Member), (true, true, false, false));
        assert_eq!(r(Private, Moderator), (true, true, false, true));
        assert_eq!(r(OwnerOnly, Moderator), (false, false, false, false));
        assert_eq!(r(OwnerOnly, Owner), (true, true, true, true));
        let admin = rights(OwnerOnly, Stranger, true);
        assert!(admin.read && admin.publish && admin.manage_settings && admin.manage_members);
    }
}
