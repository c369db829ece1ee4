//! Redis Cluster's addressing (SPEC §10, `redis_cluster = true`): the slot of a key or shard
//! channel (CRC16 of its hash tag, as Redis computes it) and the map of slots to masters read
//! from `CLUSTER SLOTS`. Pure: no connection, no state of a shard. Hand-written because it is on
//! every command's path in cluster mode and is twenty lines; the `redis` crate's cluster feature
//! would bring its own async client along.

use redis::Value;

use super::resp::{bytes, int, items};

/// Slots of a Redis Cluster.
pub(crate) const SLOTS: usize = 16384;
/// The same, as a slot number bound.
const SLOTS_U16: u16 = 16384;

/// CRC16/XMODEM (polynomial 0x1021, no reflection, initial 0), the checksum Redis uses.
fn crc16(data: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &byte in data {
        crc ^= u16::from(byte) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc
}

/// The slot of `key`: of what is between its first `{` and the next `}` when that is not empty,
/// else of the whole key.
pub(crate) fn slot(key: &[u8]) -> u16 {
    let tagged = key
        .iter()
        .position(|b| *b == b'{')
        .and_then(|open| {
            let rest = &key[open + 1..];
            let close = rest.iter().position(|b| *b == b'}')?;
            (close > 0).then(|| &rest[..close])
        })
        .unwrap_or(key);
    crc16(tagged) % SLOTS_U16
}

/// Which master serves each slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SlotMap {
    /// `host:port` of each master, in the order they were first seen.
    pub(crate) masters: Vec<String>,
    /// Per slot, the index of its master in `masters` (`u16::MAX`: nobody serves it).
    owner: Vec<u16>,
}

impl SlotMap {
    /// The map a `CLUSTER SLOTS` reply describes: `[[start, end, [host, port, id…], replicas…]…]`.
    /// A master announced without a host (an empty string or `?`) is reached at `fallback_host`,
    /// the host this node asked.
    pub(crate) fn from_cluster_slots(reply: &Value, fallback_host: &str) -> Result<Self, String> {
        let mut map = SlotMap {
            masters: Vec::new(),
            owner: vec![u16::MAX; SLOTS],
        };
        for range in items(reply) {
            let [start, end, master, ..] = items(range) else {
                return Err("a slot range without a master".into());
            };
            let (Some(start), Some(end)) = (int(start), int(end)) else {
                return Err("a slot range without bounds".into());
            };
            let (Ok(start), Ok(end)) = (usize::try_from(start), usize::try_from(end)) else {
                return Err("a negative slot".into());
            };
            if start > end || end >= SLOTS {
                return Err(format!("slots {start}-{end} are out of range"));
            }
            let [host, port, ..] = items(master) else {
                return Err("a master without an address".into());
            };
            let host = bytes(host)
                .and_then(|h| std::str::from_utf8(h).ok())
                .filter(|h| !h.is_empty() && *h != "?")
                .unwrap_or(fallback_host);
            let Some(port) = int(port).and_then(|p| u16::try_from(p).ok()) else {
                return Err("a master without a port".into());
            };
            let addr = if host.contains(':') {
                format!("[{host}]:{port}")
            } else {
                format!("{host}:{port}")
            };
            let index = match map.masters.iter().position(|m| *m == addr) {
                Some(i) => i,
                None => {
                    map.masters.push(addr);
                    map.masters.len() - 1
                }
            };
            let index = u16::try_from(index).map_err(|_| "too many masters")?;
            map.owner[start..=end].fill(index);
        }
        Ok(map)
    }

    /// Whether every slot has a master.
    pub(crate) fn covers_all(&self) -> bool {
        self.owner.iter().all(|o| *o != u16::MAX)
    }

    /// The master serving `slot`.
    pub(crate) fn master_of(&self, slot: u16) -> Option<&str> {
        let index = *self.owner.get(usize::from(slot))?;
        self.masters.get(usize::from(index)).map(String::as_str)
    }

    /// Serves `slot` from `addr` from now on (a `MOVED` said so); false when `addr` is not a
    /// known master (the map must be read again).
    pub(crate) fn moved(&mut self, slot: u16, addr: &str) -> bool {
        let Some(index) = self.masters.iter().position(|m| m == addr) else {
            return false;
        };
        let Ok(index) = u16::try_from(index) else {
            return false;
        };
        if let Some(owner) = self.owner.get_mut(usize::from(slot)) {
            *owner = index;
        }
        true
    }
}

/// The host part of `host:port` (brackets of an IPv6 address removed).
pub(crate) fn host_of(addr: &str) -> &str {
    let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h);
    host.trim_start_matches('[').trim_end_matches(']')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_the_ones_redis_computes() {
        // Values from `CLUSTER KEYSLOT` on Redis 7.
        assert_eq!(crc16(b"123456789"), 0x31c3);
        assert_eq!(slot(b"foo"), 12182);
        assert_eq!(slot(b"bar"), 5061);
        assert_eq!(slot(b"{user1000}.following"), slot(b"{user1000}.followers"));
        assert_eq!(slot(b"{user1000}.following"), slot(b"user1000"));
        // An empty tag hashes the whole key; only the first `{…}` counts.
        assert_eq!(slot(b"foo{}{bar}"), crc16(b"foo{}{bar}") % 16384);
        assert_eq!(slot(b"foo{{bar}}zap"), slot(b"{bar"));
        assert_eq!(slot(b"foo{bar}{zap}"), slot(b"bar"));
        assert_eq!(slot(b"rh:{r:chat}:meta"), slot(b"rh:{r:chat}:ch"));
    }

    fn range(start: i64, end: i64, host: &str, port: i64) -> Value {
        Value::Array(vec![
            Value::Int(start),
            Value::Int(end),
            Value::Array(vec![
                Value::BulkString(host.as_bytes().to_vec()),
                Value::Int(port),
                Value::BulkString(b"id".to_vec()),
            ]),
        ])
    }

    #[test]
    fn a_cluster_slots_reply_becomes_a_map() {
        let reply = Value::Array(vec![
            range(0, 5460, "127.0.0.1", 7000),
            range(5461, 10922, "127.0.0.1", 7001),
            range(10923, 16383, "", 7002),
        ]);
        let mut map = SlotMap::from_cluster_slots(&reply, "10.0.0.9").unwrap();
        assert!(map.covers_all());
        assert_eq!(map.masters.len(), 3);
        assert_eq!(map.master_of(0), Some("127.0.0.1:7000"));
        assert_eq!(map.master_of(5461), Some("127.0.0.1:7001"));
        assert_eq!(map.master_of(16383), Some("10.0.0.9:7002"));
        assert!(map.moved(0, "127.0.0.1:7001"));
        assert_eq!(map.master_of(0), Some("127.0.0.1:7001"));
        assert!(!map.moved(0, "127.0.0.1:7999"));
    }

    #[test]
    fn a_partial_or_broken_reply_is_told() {
        let partial = Value::Array(vec![range(0, 100, "h", 1)]);
        assert!(
            !SlotMap::from_cluster_slots(&partial, "h")
                .unwrap()
                .covers_all()
        );
        let broken = Value::Array(vec![range(10, 20_000, "h", 1)]);
        assert!(SlotMap::from_cluster_slots(&broken, "h").is_err());
        assert!(SlotMap::from_cluster_slots(&Value::Array(vec![Value::Int(1)]), "h").is_err());
    }

    #[test]
    fn hosts_come_out_of_addresses() {
        assert_eq!(host_of("127.0.0.1:7000"), "127.0.0.1");
        assert_eq!(host_of("[::1]:7000"), "::1");
    }
}
