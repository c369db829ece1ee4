//! Who is in a room (SPEC §6): users with their connection counts, and the net changes waiting
//! for the next presence flush. Plain data.

use std::collections::HashMap;
use std::sync::Arc;

use protocol::envelope::PresenceEntry;

/// Users present in one room with their connection counts. Most rooms (every personal room) hold
/// one or a few users: up to [`SMALL_PRESENCE`] of them live in a vector grown one slot at a time
/// (one 40-byte allocation for a personal room, where a hash map takes about 180); a larger room
/// moves to a hash map, and back to a list once it is down to half that many users.
pub(crate) enum PresenceTable {
    Small(Vec<(Arc<str>, Arc<str>, u32)>),
    Large(Box<PresenceCounts>),
}

/// user → (name, connections).
type PresenceCounts = HashMap<Arc<str>, (Arc<str>, u32)>;

/// Net presence changes of a room since its last flush: user → (name, joined?).
pub(crate) type PresenceDiff = HashMap<Arc<str>, (Arc<str>, bool)>;

/// Users above which a room's presence is a hash map.
const SMALL_PRESENCE: usize = 8;

impl Default for PresenceTable {
    fn default() -> Self {
        Self::Small(Vec::new())
    }
}

impl PresenceTable {
    /// Counts one more connection of `user`; returns the user's count.
    pub(crate) fn add(&mut self, user: &Arc<str>, name: &Arc<str>) -> u32 {
        match self {
            Self::Small(list) => {
                if let Some(entry) = list.iter_mut().find(|(u, _, _)| u == user) {
                    entry.2 += 1;
                    return entry.2;
                }
                if list.len() < SMALL_PRESENCE {
                    if list.is_empty() {
                        list.reserve_exact(1);
                    }
                    list.push((user.clone(), name.clone(), 1));
                    return 1;
                }
                let mut map: HashMap<_, _> = std::mem::take(list)
                    .into_iter()
                    .map(|(u, n, c)| (u, (n, c)))
                    .collect();
                map.insert(user.clone(), (name.clone(), 1));
                *self = Self::Large(Box::new(map));
                1
            }
            Self::Large(map) => {
                let entry = map.entry(user.clone()).or_insert_with(|| (name.clone(), 0));
                entry.1 += 1;
                entry.1
            }
        }
    }

    /// Counts one connection fewer of `user`; returns its count left (`None`: it was not there).
    /// A user whose count reaches 0 is removed.
    pub(crate) fn remove(&mut self, user: &Arc<str>) -> Option<u32> {
        match self {
            Self::Small(list) => {
                let pos = list.iter().position(|(u, _, _)| u == user)?;
                let left = list[pos].2.saturating_sub(1);
                list[pos].2 = left;
                if left == 0 {
                    list.swap_remove(pos);
                }
                Some(left)
            }
            Self::Large(map) => {
                let entry = map.get_mut(user)?;
                entry.1 = entry.1.saturating_sub(1);
                let left = entry.1;
                if left == 0 {
                    map.remove(user);
                    // Back to a list once well below the switch (no flapping at the edge).
                    if map.len() <= SMALL_PRESENCE / 2 {
                        let list = std::mem::take(&mut **map)
                            .into_iter()
                            .map(|(u, (n, c))| (u, n, c))
                            .collect();
                        *self = Self::Small(list);
                    }
                }
                Some(left)
            }
        }
    }

    /// Every user present, sorted by id.
    pub(crate) fn entries(&self) -> Vec<PresenceEntry> {
        let entry = |user: &Arc<str>, name: &Arc<str>, conns: u32| PresenceEntry {
            user: user.to_string(),
            name: name.to_string(),
            conns,
        };
        let mut list: Vec<PresenceEntry> = match self {
            Self::Small(list) => list.iter().map(|(u, n, c)| entry(u, n, *c)).collect(),
            Self::Large(map) => map.iter().map(|(u, (n, c))| entry(u, n, *c)).collect(),
        };
        list.sort_by(|a, b| a.user.cmp(&b.user));
        list
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn users(table: &PresenceTable) -> Vec<(String, u32)> {
        table
            .entries()
            .into_iter()
            .map(|e| (e.user, e.conns))
            .collect()
    }

    #[test]
    fn presence_table_counts_across_the_list_and_map_switch() {
        let mut table = PresenceTable::default();
        let ids: Vec<Arc<str>> = (0..12).map(|i| Arc::from(format!("u{i:02}"))).collect();
        let name: Arc<str> = Arc::from("n");
        for id in &ids {
            assert_eq!(table.add(id, &name), 1);
        }
        assert_eq!(table.add(&ids[3], &name), 2);
        assert!(matches!(table, PresenceTable::Large(_)));
        assert_eq!(table.remove(&ids[3]), Some(1));
        for id in &ids[5..] {
            assert_eq!(table.remove(id), Some(0));
        }
        assert_eq!(table.remove(&ids[11]), None);
        // Five users left: above half the switch, still a map.
        assert!(matches!(table, PresenceTable::Large(_)));
        assert_eq!(table.remove(&ids[4]), Some(0));
        assert!(matches!(table, PresenceTable::Small(_)));
        assert_eq!(
            users(&table),
            [("u00", 1), ("u01", 1), ("u02", 1), ("u03", 1)].map(|(u, c)| (u.to_owned(), c))
        );
        assert_eq!(table.add(&ids[0], &name), 2);
        assert_eq!(table.remove(&ids[0]), Some(1));
    }
}
