//! The one-time move of the Raft metadata from sled (`raft/`, written by
//! builds before the metadata file) into [`super::meta_file`]. Owns only
//! that move: reading the old store, and setting it aside once its content
//! is durable in the new file. The only code that still links sled.
//!
//! DESIGN departure: DESIGN.md names sled for the vote and the other Raft
//! metadata. They now live in a two-slot file of our own (see
//! [`super::meta_file`] for why); sled stays a dependency only so that a
//! data dir of an earlier build opens with its vote, committed index and
//! purge point (and the entries of sled's `log` tree, from builds older
//! still, moved into the WAL). Nothing on the hot path touches it.
//!
//! The move, in an order a crash at any point survives:
//! 1. the old store is read on a copy (`raft.check`, removed after: sled
//!    writes on open, and a refusal must leave the data dir unchanged);
//! 2. the caller judges the vote against the log and the snapshot;
//! 3. the old `log` tree's entries are appended to the WAL and synced
//!    (a crash after this finds them in both; the same bounds in the WAL
//!    mean the move already happened, and it is not repeated);
//! 4. the metadata file is created, durably (until then, the next start
//!    migrates again);
//! 5. `raft/` is renamed `raft.migrated` (kept, not removed: it is the
//!    operator's to delete once the server runs). The rename is not
//!    synced: undone by a power loss, it is redone at the next start
//!    ([`set_aside`]), since the metadata file exists by then.

use std::io;
use std::path::{Path, PathBuf};

use serde_json::Value;

use super::meta_file::MetaFile;
use super::wal::{DEFAULT_SEGMENT_SIZE, Wal};

/// The old store's directory in the data dir.
pub const OLD_DIR: &str = "raft";
/// Where it goes once migrated.
pub const MIGRATED_DIR: &str = "raft.migrated";
/// Where the copy of the old store is opened (inside the data dir: the
/// store is as private as the rest of it); removed after reading.
pub const CHECK_DIR: &str = "raft.check";

/// The sled tree and keys of the metadata, as earlier builds wrote them
/// (each value JSON).
const META_TREE: &str = "raft_meta";
const KEYS: [&str; 3] = ["vote", "committed", "last_purged"];
/// The sled tree that held log entries before they moved to the WAL
/// (key: index, u64 big-endian; value: the entry, as the WAL's payload).
const OLD_LOG_TREE: &str = "log";

/// What the old store held.
#[derive(Debug)]
pub struct Legacy {
    /// The metadata payload for [`MetaFile`]: a JSON object with the vote,
    /// committed index and purge point (null when absent).
    pub payload: Vec<u8>,
    /// Entries of the old `log` tree (index, payload), in order.
    pub old_log: Vec<(u64, Vec<u8>)>,
    /// The purge point's index: the old log may start past it.
    purged: Option<u64>,
}

/// How earlier builds opened the store.
fn sled_config(path: &Path) -> sled::Config {
    sled::Config::new()
        .path(path)
        .mode(sled::Mode::HighThroughput)
        .flush_every_ms(None)
}

/// Reads the old store in `<data_dir>/raft` on a copy. The outer error is
/// I/O (the copy could not be made); the inner one says why the store
/// cannot be read.
pub fn read(data_dir: &Path) -> io::Result<Result<Legacy, String>> {
    let copy = data_dir.join(CHECK_DIR);
    remove(&copy)?;
    let _remove = RemoveOnDrop(copy.clone());
    copy_dir(&data_dir.join(OLD_DIR), &copy)?;
    let db = match sled_config(&copy).open() {
        Ok(db) => db,
        Err(e) => return Ok(Err(format!("sled cannot open it: {e}"))),
    };
    Ok(read_store(&db))
}

fn read_store(db: &sled::Db) -> Result<Legacy, String> {
    let unreadable = |e: sled::Error| format!("sled cannot read it: {e}");
    let tree = db.open_tree(META_TREE).map_err(unreadable)?;
    let mut meta = serde_json::Map::new();
    for key in KEYS {
        let value = match tree.get(key).map_err(unreadable)? {
            Some(bytes) => {
                serde_json::from_slice(&bytes).map_err(|e| format!("its {key} is not JSON: {e}"))?
            }
            None => Value::Null,
        };
        meta.insert(key.to_owned(), value);
    }
    let index = |key: &str| meta.get(key).and_then(|v| v.get("index")?.as_u64());
    let purged = index("last_purged");
    let mut old_log = Vec::new();
    if db
        .tree_names()
        .iter()
        .any(|n| n.as_ref() == OLD_LOG_TREE.as_bytes())
    {
        let log = db.open_tree(OLD_LOG_TREE).map_err(unreadable)?;
        for item in log.iter() {
            let (key, bytes) = item.map_err(unreadable)?;
            let index: [u8; 8] = key
                .as_ref()
                .try_into()
                .map_err(|_| "a key of its old log is not an index".to_owned())?;
            old_log.push((u64::from_be_bytes(index), bytes.to_vec()));
        }
    }
    let payload = serde_json::to_vec(&Value::Object(meta)).map_err(|e| e.to_string())?;
    Ok(Legacy {
        payload,
        old_log,
        purged,
    })
}

/// Steps 3 to 5 of the move (see the module docs): the old log into the
/// WAL in `wal_dir`, the metadata into a new file at `meta_path`, the old
/// store set aside.
pub fn finish(
    data_dir: &Path,
    legacy: &Legacy,
    wal_dir: &Path,
    meta_path: &Path,
) -> io::Result<()> {
    if let (Some((first, _)), Some((last, _))) = (legacy.old_log.first(), legacy.old_log.last()) {
        // Without the committed index: the WAL does not hold it yet.
        let (wal, _) = Wal::open(wal_dir, DEFAULT_SEGMENT_SIZE, legacy.purged, None)?;
        match wal.bounds() {
            None => {
                for (index, payload) in &legacy.old_log {
                    wal.append(*index, payload)?;
                }
                for file in wal.take_dirty() {
                    super::durable::sync_data(&file)?;
                }
                tracing::info!(
                    entries = legacy.old_log.len(),
                    "moved the raft log from sled to the WAL"
                );
            }
            // Moved by a start that stopped before the metadata file.
            Some(bounds) if bounds == (*first, *last) => {}
            Some(_) => {
                return Err(io::Error::other(
                    "log entries both in sled and in the WAL; refusing to guess which is right",
                ));
            }
        }
    }
    MetaFile::open_or_create(meta_path, &legacy.payload)?;
    tracing::info!(from = %data_dir.join(OLD_DIR).display(), to = %meta_path.display(), "moved the raft metadata from sled to its own file");
    set_aside(data_dir)
}

/// Renames the old store `raft.migrated`, once the metadata file exists.
pub fn set_aside(data_dir: &Path) -> io::Result<()> {
    let (from, to) = (data_dir.join(OLD_DIR), data_dir.join(MIGRATED_DIR));
    if to.exists() {
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!(
                "cannot set the migrated sled store {} aside: {} exists (remove one of them)",
                from.display(),
                to.display()
            ),
        ));
    }
    std::fs::rename(&from, &to)?;
    tracing::info!(path = %to.display(), "the old sled store is kept there; delete it once the server runs");
    Ok(())
}

fn remove(dir: &Path) -> io::Result<()> {
    match std::fs::remove_dir_all(dir) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Removes the copy however the read ends.
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        if let Err(e) = remove(&self.0) {
            tracing::warn!(path = %self.0.display(), error = %e, "cannot remove the copy of the old sled store");
        }
    }
}

fn copy_dir(from: &Path, to: &Path) -> io::Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_dir(&entry.path(), &target)?;
        } else {
            std::fs::copy(entry.path(), target)?;
        }
    }
    Ok(())
}

/// Writes a sled store the way earlier builds did (for the tests of the
/// move): the metadata as JSON under its keys, and `old_log` in the old
/// `log` tree.
#[cfg(test)]
pub(crate) fn write_old_store(
    data_dir: &Path,
    meta: &[(&str, Value)],
    old_log: &[(u64, Vec<u8>)],
) -> sled::Result<()> {
    let db = sled_config(&data_dir.join(OLD_DIR)).open()?;
    let tree = db.open_tree(META_TREE)?;
    for (key, value) in meta {
        tree.insert(key.as_bytes(), value.to_string().into_bytes())?;
    }
    if !old_log.is_empty() {
        let log = db.open_tree(OLD_LOG_TREE)?;
        for (index, payload) in old_log {
            log.insert(index.to_be_bytes(), payload.as_slice())?;
        }
    }
    db.flush()?;
    Ok(())
}
