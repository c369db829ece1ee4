//! The names of a room's keys and channel in Redis (see `scripts` for what each holds): the
//! prefix, then the room's hash tag `{r:<room>}` so that everything about one room lives in one
//! slot of a Redis Cluster. Names only.

use protocol::envelope::RoomId;

/// A room's keys.
pub(crate) struct RoomKeys {
    pub(crate) meta: String,
    pub(crate) hist: String,
    pub(crate) channel: String,
    pub(crate) count: String,
    pub(crate) users: String,
    pub(crate) names: String,
    pub(crate) leases: String,
    /// The prefix of the per-node user hashes (the node id follows).
    pub(crate) nu: String,
}

impl RoomKeys {
    pub(crate) fn new(prefix: &str, room: &RoomId) -> Self {
        let base = format!("{prefix}:{{r:{room}}}:");
        let key = |suffix: &str| format!("{base}{suffix}");
        Self {
            meta: key("meta"),
            hist: key("hist"),
            channel: key("ch"),
            count: key("count"),
            users: key("users"),
            names: key("names"),
            leases: key("leases"),
            nu: key("nu:"),
        }
    }

    /// The keys of the membership scripts (join, leave, presence, touch, announce), in order.
    pub(crate) fn membership(&self) -> [&str; 5] {
        [
            &self.count,
            &self.users,
            &self.names,
            &self.leases,
            &self.channel,
        ]
    }
}

/// The channel of `room`.
pub(crate) fn channel(prefix: &str, room: &RoomId) -> String {
    format!("{prefix}:{{r:{room}}}:ch")
}

/// The room a channel of this prefix belongs to.
pub(crate) fn room_of_channel<'a>(prefix: &str, channel: &'a [u8]) -> Option<&'a str> {
    let rest = channel.strip_prefix(prefix.as_bytes())?;
    let rest = rest.strip_prefix(b":{r:")?;
    let room = rest.strip_suffix(b"}:ch")?;
    std::str::from_utf8(room).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rooms_keys_share_its_hash_tag_and_its_channel_names_it() {
        let room = RoomId::parse("chat.1:x@y").unwrap();
        let keys = RoomKeys::new("rh", &room);
        for key in keys
            .membership()
            .into_iter()
            .chain([&*keys.meta, &*keys.hist])
        {
            assert!(key.starts_with("rh:{r:chat.1:x@y}:"), "{key}");
        }
        assert_eq!(keys.channel, channel("rh", &room));
        assert_eq!(
            room_of_channel("rh", keys.channel.as_bytes()),
            Some("chat.1:x@y")
        );
        assert_eq!(room_of_channel("other", keys.channel.as_bytes()), None);
        assert_eq!(room_of_channel("rh", b"rh:{r:x}:meta"), None);
    }
}
