//! The key/value store with Consul's semantics: every entry carries
//! `CreateIndex`/`ModifyIndex`, deletions leave tombstones so that a
//! blocking query on a prefix sees a deletion as a change. Tombstones older
//! than the tombstone TTL are reaped ([`crate::leader::gc`]); what a reader saw of
//! a reaped key's index never goes backwards (see `reaped`).

use imbl::{OrdMap, OrdSet};
use std::ops::Bound;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

/// One stored key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvEntry {
    /// Shared so that readers can copy an entry out under a short lock.
    #[serde(with = "arc_bytes")]
    pub value: Arc<[u8]>,
    pub flags: u64,
    pub create_index: u64,
    pub modify_index: u64,
    /// How many times the key's lock was acquired (kept after release).
    pub lock_index: u64,
    /// The session holding the key's lock, if locked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session: Option<String>,
}

/// All keys, in order, plus the tombstones of deleted ones.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvStore {
    entries: OrdMap<String, KvEntry>,
    /// key → index of its deletion. A re-created key drops its tombstone
    /// (its new ModifyIndex is higher anyway).
    tombstones: OrdMap<String, u64>,
    /// Index of the last change to any key (0 when none yet).
    #[serde(default)]
    last_change: u64,
    /// The highest deletion index of a reaped tombstone: a key or prefix
    /// with nothing newer reports it, so an index a reader saw (a reaped
    /// deletion's) never goes backwards.
    #[serde(default)]
    reaped: u64,
    /// session id → the keys it holds locked.
    #[serde(default)]
    held: OrdMap<String, OrdSet<String>>,
}

impl KvStore {
    /// Replaces every key with those of `backup` (a restored snapshot), as
    /// one write at `index`: restored entries carry `index` as their
    /// create and modify index, and keys that are gone leave tombstones,
    /// so indexes never go backwards and every blocking query wakes.
    pub fn restore(&mut self, index: u64, backup: &KvStore) {
        let mut tombstones = self.tombstones.clone();
        for key in self.entries.keys() {
            if !backup.entries.contains_key(key) {
                tombstones.insert(key.clone(), index);
            }
        }
        let mut entries = OrdMap::new();
        for (key, entry) in &backup.entries {
            tombstones.remove(key);
            entries.insert(
                key.clone(),
                KvEntry {
                    create_index: index,
                    modify_index: index,
                    ..entry.clone()
                },
            );
        }
        self.entries = entries;
        self.tombstones = tombstones;
        // Rebuilt from the entries by `rebuild_locks`, not trusted.
        self.held = OrdMap::new();
        self.last_change = index;
    }

    /// Sets `key`; with `cas`, only if the precondition holds.
    pub fn set(
        &mut self,
        index: u64,
        key: &str,
        value: &[u8],
        flags: u64,
        cas: Option<u64>,
    ) -> bool {
        let existing = self.entries.get(key);
        if let Some(cas) = cas {
            let current = existing.map_or(0, |e| e.modify_index);
            if current != cas {
                return false;
            }
        }
        // A plain write to a locked key keeps the lock (as Consul).
        let create_index = existing.map_or(index, |e| e.create_index);
        let lock_index = existing.map_or(0, |e| e.lock_index);
        let session = existing.and_then(|e| e.session.clone());
        self.put(
            key,
            KvEntry {
                value: Arc::from(value),
                flags,
                create_index,
                modify_index: index,
                lock_index,
                session,
            },
        );
        true
    }

    fn put(&mut self, key: &str, entry: KvEntry) {
        self.last_change = entry.modify_index;
        self.entries.insert(key.to_owned(), entry);
        self.tombstones.remove(key);
    }

    /// Takes `key`'s lock for `session` and sets it (Consul's `?acquire`):
    /// false when another session holds it or the `cas` precondition
    /// fails. The holder acquiring again updates the value without
    /// counting a new acquisition. The caller checked that the session
    /// exists.
    pub fn acquire(
        &mut self,
        index: u64,
        key: &str,
        value: &[u8],
        flags: u64,
        session: &str,
        cas: Option<u64>,
    ) -> bool {
        let existing = self.entries.get(key);
        if cas.is_some_and(|cas| existing.map_or(0, |e| e.modify_index) != cas) {
            return false;
        }
        let (create_index, lock_index) = match existing {
            // The holder acquiring again with nothing changed writes
            // nothing (no index moves, no watcher wakes), as Consul.
            Some(e)
                if e.session.as_deref() == Some(session)
                    && e.flags == flags
                    && *e.value == *value =>
            {
                return true;
            }
            Some(e) if e.session.as_deref() == Some(session) => (e.create_index, e.lock_index),
            Some(e) if e.session.is_some() => return false,
            Some(e) => (e.create_index, e.lock_index + 1),
            None => (index, 1),
        };
        self.put(
            key,
            KvEntry {
                value: Arc::from(value),
                flags,
                create_index,
                modify_index: index,
                lock_index,
                session: Some(session.to_owned()),
            },
        );
        self.held
            .entry(session.to_owned())
            .or_default()
            .insert(key.to_owned());
        true
    }

    /// Releases `key`'s lock held by `session` and sets it (Consul's
    /// `?release`): false when `session` does not hold it or the `cas`
    /// precondition fails.
    pub fn release(
        &mut self,
        index: u64,
        key: &str,
        value: &[u8],
        flags: u64,
        session: &str,
        cas: Option<u64>,
    ) -> bool {
        let Some(existing) = self.entries.get(key) else {
            return false;
        };
        if existing.session.as_deref() != Some(session)
            || cas.is_some_and(|cas| existing.modify_index != cas)
        {
            return false;
        }
        let (create_index, lock_index) = (existing.create_index, existing.lock_index);
        self.put(
            key,
            KvEntry {
                value: Arc::from(value),
                flags,
                create_index,
                modify_index: index,
                lock_index,
                session: None,
            },
        );
        self.forget_lock(session, key);
        true
    }

    /// Ends every lock of an invalidated session: the keys are unlocked
    /// (their value kept) or deleted. Returns the keys it held.
    pub fn drop_session(&mut self, index: u64, session: &str, delete: bool) -> Vec<String> {
        let keys: Vec<String> = self
            .held
            .remove(session)
            .map(|keys| keys.into_iter().collect())
            .unwrap_or_default();
        for key in &keys {
            if delete {
                self.entries.remove(key);
                self.tombstones.insert(key.clone(), index);
            } else if let Some(entry) = self.entries.get_mut(key) {
                entry.session = None;
                entry.modify_index = index;
            }
            self.last_change = index;
        }
        keys
    }

    /// After a restore: the lock index rebuilt from the entries, and the
    /// locks of sessions that do not exist (`exists` false) released, so
    /// that a backup can never leave a key locked by nobody.
    pub fn rebuild_locks(&mut self, index: u64, exists: impl Fn(&str) -> bool) {
        let locked: Vec<(String, String)> = self
            .entries
            .iter()
            .filter_map(|(k, e)| e.session.as_ref().map(|s| (k.clone(), s.clone())))
            .collect();
        self.held = OrdMap::new();
        for (key, session) in locked {
            if exists(&session) {
                self.held.entry(session).or_default().insert(key);
            } else if let Some(entry) = self.entries.get_mut(&key) {
                entry.session = None;
                entry.modify_index = index;
                self.last_change = index;
            }
        }
    }

    fn forget_lock(&mut self, session: &str, key: &str) {
        if let Some(keys) = self.held.get_mut(session) {
            keys.remove(key);
            if keys.is_empty() {
                self.held.remove(session);
            }
        }
    }

    /// Keys locked by `session`, in order.
    pub fn held_by<'a>(&'a self, session: &str) -> impl Iterator<Item = &'a String> + 'a {
        self.held.get(session).into_iter().flat_map(|k| k.iter())
    }

    /// Deletes `key`; with `cas`, only if its ModifyIndex matches. Deleting
    /// a missing key succeeds (as Consul).
    pub fn delete(&mut self, index: u64, key: &str, cas: Option<u64>) -> bool {
        match (self.entries.get(key), cas) {
            (None, _) => true,
            (Some(e), Some(cas)) if e.modify_index != cas => false,
            (Some(_), _) => {
                if let Some(session) = self.entries.remove(key).and_then(|e| e.session) {
                    self.forget_lock(&session, key);
                }
                self.tombstones.insert(key.to_owned(), index);
                self.last_change = index;
                true
            }
        }
    }

    /// Deletes every key under `prefix`.
    pub fn delete_tree(&mut self, index: u64, prefix: &str) {
        let doomed: Vec<String> = self.prefix_range(prefix).map(|(k, _)| k.clone()).collect();
        for key in doomed {
            if let Some(session) = self.entries.remove(&key).and_then(|e| e.session) {
                self.forget_lock(&session, &key);
            }
            self.tombstones.insert(key, index);
            self.last_change = index;
        }
    }

    /// Drops the tombstones of deletions at or below `up_to`; how many.
    pub fn reap(&mut self, up_to: u64) -> usize {
        let doomed: Vec<(String, u64)> = self
            .tombstones
            .iter()
            .filter(|(_, i)| **i <= up_to)
            .map(|(k, i)| (k.clone(), *i))
            .collect();
        for (key, index) in &doomed {
            self.tombstones.remove(key);
            self.reaped = self.reaped.max(*index);
        }
        doomed.len()
    }

    /// Some tombstone is at or below `up_to`.
    pub fn reapable(&self, up_to: u64) -> bool {
        self.tombstones.values().any(|i| *i <= up_to)
    }

    /// Tombstones kept.
    pub fn tombstones(&self) -> usize {
        self.tombstones.len()
    }

    /// Index of the last change to any key.
    pub fn last_change(&self) -> u64 {
        self.last_change
    }

    pub fn get(&self, key: &str) -> Option<&KvEntry> {
        self.entries.get(key)
    }

    /// Entries whose key starts with `prefix`, in key order.
    pub fn prefix_range<'a>(
        &'a self,
        prefix: &'a str,
    ) -> impl Iterator<Item = (&'a String, &'a KvEntry)> + 'a {
        self.entries
            .range::<_, str>((Bound::Included(prefix), Bound::Unbounded))
            .take_while(move |(k, _)| k.starts_with(prefix))
    }

    /// The index a read of `key` reports: its ModifyIndex, or the index of
    /// its deletion, or (never existed, or its tombstone was reaped) the
    /// highest reaped deletion index (0 before any).
    pub fn key_index(&self, key: &str) -> u64 {
        self.entries
            .get(key)
            .map(|e| e.modify_index)
            .or_else(|| self.tombstones.get(key).copied())
            .unwrap_or(self.reaped)
    }

    /// The index a read of the prefix reports: the highest ModifyIndex or
    /// deletion index under it, and at least the highest reaped deletion
    /// index (a reaped tombstone under the prefix may have counted).
    pub fn prefix_index(&self, prefix: &str) -> u64 {
        let live = self
            .prefix_range(prefix)
            .map(|(_, e)| e.modify_index)
            .max()
            .unwrap_or(0);
        let dead = self
            .tombstones
            .range::<_, str>((Bound::Included(prefix), Bound::Unbounded))
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(_, i)| *i)
            .max()
            .unwrap_or(0);
        live.max(dead).max(self.reaped)
    }

    /// Keys under `prefix`; with a separator, keys are rolled up to the
    /// first separator after the prefix (`a/b/c` with prefix `a/` and
    /// separator `/` lists `a/b/`), as Consul's `?keys&separator=`.
    pub fn keys(&self, prefix: &str, separator: Option<&str>) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for (key, _) in self.prefix_range(prefix) {
            let listed = match separator.filter(|s| !s.is_empty()) {
                Some(sep) => match key[prefix.len()..].find(sep) {
                    Some(at) => &key[..prefix.len() + at + sep.len()],
                    None => key.as_str(),
                },
                None => key.as_str(),
            };
            if out.last().map(String::as_str) != Some(listed) {
                out.push(listed.to_owned());
            }
        }
        out
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

pub(crate) mod arc_bytes {
    use std::sync::Arc;

    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &Arc<[u8]>, serializer: S) -> Result<S::Ok, S::Error> {
        crate::state::base64_bytes::serialize(bytes, serializer)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Arc<[u8]>, D::Error> {
        crate::state::base64_bytes::deserialize(deserializer).map(Arc::from)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_keeps_create_index_and_bumps_modify_index() {
        let mut kv = KvStore::default();
        assert!(kv.set(5, "a", b"1", 0, None));
        assert!(kv.set(9, "a", b"2", 3, None));
        let e = kv.get("a").expect("present");
        assert_eq!((e.create_index, e.modify_index, e.flags), (5, 9, 3));
        assert_eq!(&*e.value, b"2");
    }

    #[test]
    fn cas_zero_creates_only_when_absent() {
        let mut kv = KvStore::default();
        assert!(kv.set(2, "a", b"1", 0, Some(0)));
        assert!(!kv.set(3, "a", b"2", 0, Some(0)));
        assert!(!kv.set(4, "a", b"2", 0, Some(7)));
        assert!(kv.set(5, "a", b"2", 0, Some(2)));
        assert_eq!(kv.get("a").map(|e| e.modify_index), Some(5));
    }

    #[test]
    fn reaped_tombstones_never_move_an_index_back() {
        let mut kv = KvStore::default();
        kv.set(1, "a/x", b"1", 0, None);
        kv.set(2, "a/y", b"1", 0, None);
        kv.set(3, "b/z", b"1", 0, None);
        kv.delete(4, "a/y", None);
        kv.delete(6, "b/z", None);
        assert_eq!(kv.prefix_index("a/"), 4);
        assert!(kv.reapable(5));
        assert_eq!(kv.reap(5), 1, "only the deletion at or below 5");
        assert!(!kv.reapable(5));
        assert_eq!(kv.tombstones(), 1);
        // Index 4 was seen for `a/` and `a/y`: neither goes below it.
        assert_eq!(kv.prefix_index("a/"), 4);
        assert_eq!(kv.key_index("a/y"), 4);
        assert_eq!(kv.key_index("b/z"), 6, "an unreaped tombstone is exact");
        assert_eq!(kv.key_index("a/x"), 1, "live keys are exact");
        assert_eq!(kv.reap(10), 1);
        assert_eq!(kv.key_index("b/z"), 6);
        assert_eq!(kv.tombstones(), 0);
        kv.set(11, "b/z", b"2", 0, None);
        assert_eq!(kv.key_index("b/z"), 11);
    }

    #[test]
    fn delete_with_cas_and_tombstones() {
        let mut kv = KvStore::default();
        kv.set(2, "p/a", b"1", 0, None);
        kv.set(3, "p/b", b"1", 0, None);
        assert!(!kv.delete(4, "p/a", Some(99)));
        assert!(kv.delete(5, "p/a", Some(2)));
        assert!(kv.delete(6, "p/missing", Some(1)));
        assert_eq!(kv.key_index("p/a"), 5);
        assert_eq!(kv.prefix_index("p/"), 5);
        kv.delete_tree(8, "p/");
        assert!(kv.is_empty());
        assert_eq!(kv.prefix_index("p/"), 8);
        assert_eq!(kv.prefix_index("q/"), 0);
        kv.set(9, "p/a", b"x", 0, None);
        assert_eq!(kv.key_index("p/a"), 9);
    }

    #[test]
    fn prefix_range_stops_at_prefix_end() {
        let mut kv = KvStore::default();
        for (i, k) in ["a", "ab", "abc", "b", "a/x"].iter().enumerate() {
            kv.set(i as u64 + 1, k, b"", 0, None);
        }
        let keys: Vec<_> = kv.prefix_range("ab").map(|(k, _)| k.as_str()).collect();
        assert_eq!(keys, ["ab", "abc"]);
    }

    #[test]
    fn keys_roll_up_at_separator() {
        let mut kv = KvStore::default();
        for (i, k) in ["web/a", "web/sub/x", "web/sub/y", "web/z", "webx"]
            .iter()
            .enumerate()
        {
            kv.set(i as u64 + 1, k, b"", 0, None);
        }
        assert_eq!(kv.keys("web/", Some("/")), ["web/a", "web/sub/", "web/z"]);
        assert_eq!(kv.keys("web", None).len(), 5);
        assert_eq!(kv.keys("", Some("/")), ["web/", "webx"]);
    }
}
