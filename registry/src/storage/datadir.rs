//! The data directory: what it holds, and the checks that keep a server
//! from running on the wrong or a damaged one. Nothing here ever deletes
//! data: a problem stops the start with a message naming it.
//!
//! Layout: `meshwork.json` (format version, node id, node UUID, cluster
//! id), `wal/` (the Raft log's segments, [`super::wal`]), `raft-meta` (the
//! vote, committed index and purge point, [`super::meta_file`]) and
//! `snapshot/` (the latest snapshot file). A data dir of an earlier build
//! has `raft/` (sled) instead of `raft-meta`: it is moved over once
//! ([`super::sled_migration`]) and kept as `raft.migrated`. The log, the
//! snapshot and the metadata are all judged before anything is written.
//!
//! An open data dir is locked (`flock` on the directory itself, so that no
//! file is added): a second server on it is refused.

use std::path::{Path, PathBuf};

use rand::Rng;
use serde::{Deserialize, Serialize};

/// Layout version written by this binary.
const FORMAT: u32 = 1;
const MARKER: &str = "meshwork.json";
/// The latest snapshot (see [`crate::storage::snapshot_file`]).
pub const SNAPSHOT_DIR: &str = "snapshot";
/// The Raft log's segments (see [`crate::storage::wal`]).
pub const WAL_DIR: &str = "wal";

/// What to do about a damaged log: the operator's explicit way out.
pub fn rebuild_hint(path: &Path) -> String {
    format!(
        "To rebuild this server from the others: stop it, move {} aside (keep it for \
         inspection), and start it again with `--join <a live server's Raft address>` in place \
         of `--peers`. A single-server cluster restores its last backup instead \
         (`meshctl snapshot restore`, into a fresh data dir).",
        path.display()
    )
}

/// Why a data dir cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum DataDirError {
    #[error("cannot create data dir {path}: {source}")]
    Create {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is corrupt ({reason}); restore it from a backup or point --data-dir elsewhere")]
    Corrupt { path: PathBuf, reason: String },
    #[error(
        "{path} has Raft data but no {MARKER}: it was not written by meshwork-registry, or it is damaged"
    )]
    NoMarker { path: PathBuf },
    #[error(
        "{path} is not empty ({found} and maybe more) and was not written by meshwork-registry: \
         point --data-dir at an empty or new directory"
    )]
    Foreign { path: PathBuf, found: String },
    #[error("data dir {path} uses layout version {found}; this binary reads version {FORMAT}")]
    Format { path: PathBuf, found: u32 },
    #[error(
        "data dir {path} belongs to node {found}, not node {wanted}: check --node-id and --data-dir"
    )]
    WrongNode {
        path: PathBuf,
        found: u64,
        wanted: u64,
    },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("data dir {path} is in use (is another meshwork-registry using it?): {source}")]
    Locked {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("raft log {wal}: {reason}\n  {}", rebuild_hint(path))]
    DamagedLog {
        path: PathBuf,
        wal: PathBuf,
        reason: String,
    },
    #[error("power-loss image ({}): {source}", super::durable::IMAGE_ENV)]
    PowerLossImage { source: std::io::Error },
    #[error("snapshot {file}: {reason}\n  {}", rebuild_hint(path))]
    DamagedSnapshot {
        path: PathBuf,
        file: PathBuf,
        reason: String,
    },
    #[error(
        "raft metadata {store} is damaged: {reason}; nothing was changed\n  {}",
        rebuild_hint(path)
    )]
    DamagedMeta {
        path: PathBuf,
        store: PathBuf,
        reason: String,
    },
    #[error("cannot read the raft log {wal}: {source}")]
    ReadLog {
        wal: PathBuf,
        source: std::io::Error,
    },
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Marker {
    format: u32,
    node_id: u64,
    node_uuid: String,
    /// Learned from the Raft log once the cluster has named itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    cluster_id: Option<String>,
}

/// An opened data dir.
#[derive(Debug)]
pub struct DataDir {
    pub path: PathBuf,
    pub node_id: u64,
    pub node_uuid: String,
    /// The cluster this data belongs to, once known.
    pub cluster_id: Option<String>,
    /// The Raft metadata file (`raft-meta`), for the log store.
    pub meta_file: PathBuf,
    /// The directory, open and `flock`ed while this lives.
    _lock: std::fs::File,
}

impl DataDir {
    /// Opens (creating if new) the data dir for `node_id`.
    pub fn open(path: &Path, node_id: u64) -> Result<Self, DataDirError> {
        // Created closed to other users (see below for one that exists).
        std::os::unix::fs::DirBuilderExt::mode(std::fs::DirBuilder::new().recursive(true), 0o750)
            .create(path)
            .map_err(|source| DataDirError::Create {
                path: path.to_owned(),
                source,
            })?;
        // The log and snapshots hold every secret (ACL tokens included):
        // nobody but the service user (and its group, as systemd's
        // StateDirectory makes it) may read them.
        {
            use std::os::unix::fs::PermissionsExt;
            if let Ok(meta) = std::fs::metadata(path)
                && meta.permissions().mode() & 0o007 != 0
            {
                let tightened = meta.permissions().mode() & 0o770;
                match std::fs::set_permissions(path, std::fs::Permissions::from_mode(tightened)) {
                    Ok(()) => {
                        tracing::info!(path = %path.display(), mode = format!("{tightened:o}"), "data dir was readable by other users; tightened")
                    }
                    Err(e) => {
                        tracing::warn!(path = %path.display(), error = %e, "data dir is readable by other users and cannot be tightened")
                    }
                }
            }
        }
        let lock = lock(path)?;
        // Tests only: the image a power loss would leave, from here on.
        super::durable::start_image_from_env(path)
            .map_err(|source| DataDirError::PowerLossImage { source })?;
        let marker_path = path.join(MARKER);
        let old_store = path.join(super::sled_migration::OLD_DIR);
        let meta_path = path.join(super::meta_file::FILE);
        let marker = match std::fs::read(&marker_path) {
            Ok(bytes) => {
                let marker: Marker =
                    serde_json::from_slice(&bytes).map_err(|e| DataDirError::Corrupt {
                        path: marker_path.clone(),
                        reason: e.to_string(),
                    })?;
                if marker.format != FORMAT {
                    return Err(DataDirError::Format {
                        path: path.to_owned(),
                        found: marker.format,
                    });
                }
                if marker.node_id != node_id {
                    return Err(DataDirError::WrongNode {
                        path: path.to_owned(),
                        found: marker.node_id,
                        wanted: node_id,
                    });
                }
                marker
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                if old_store.exists() || meta_path.exists() {
                    return Err(DataDirError::NoMarker {
                        path: path.to_owned(),
                    });
                }
                // A new data dir is empty: anything else in it belongs to
                // someone else. Excepted: a file system's lost+found, the
                // marker half written by a crash, the sidecars' state
                // (their units keep it in /var/lib/meshwork/sidecar, inside
                // the registry's default data dir), and the management
                // token the installed config bootstraps into
                // (`[acl] bootstrap_file`), which outlives a data dir wiped
                // to rebuild a server.
                let entries = std::fs::read_dir(path).map_err(|source| DataDirError::Read {
                    path: path.to_owned(),
                    source,
                })?;
                for entry in entries {
                    let entry = entry.map_err(|source| DataDirError::Read {
                        path: path.to_owned(),
                        source,
                    })?;
                    let name = entry.file_name().to_string_lossy().into_owned();
                    if !matches!(
                        name.as_str(),
                        "lost+found" | "meshwork.json.tmp" | "sidecar" | "management-token"
                    ) {
                        return Err(DataDirError::Foreign {
                            path: path.to_owned(),
                            found: name,
                        });
                    }
                }
                let marker = Marker {
                    format: FORMAT,
                    node_id,
                    node_uuid: new_uuid(),
                    cluster_id: None,
                };
                write_atomically(&marker_path, &marker)?;
                marker
            }
            Err(source) => {
                return Err(DataDirError::Read {
                    path: marker_path,
                    source,
                });
            }
        };
        let _ = std::fs::remove_file(path.join(UPLOAD_FILE));
        // The log is judged before anything is written: a damaged log
        // refuses with the data dir untouched.
        let wal = path.join(WAL_DIR);
        let last_record = crate::storage::wal::Wal::check(&wal).map_err(|source| {
            if source.kind() == std::io::ErrorKind::InvalidData {
                DataDirError::DamagedLog {
                    path: path.to_owned(),
                    wal: wal.clone(),
                    reason: source.to_string(),
                }
            } else {
                DataDirError::ReadLog {
                    wal: wal.clone(),
                    source,
                }
            }
        })?;
        // So is the snapshot, and then the metadata's vote against both.
        let snapshot = path.join(SNAPSHOT_DIR);
        let snapshot_meta =
            crate::storage::snapshot_file::SnapshotFile::check(&snapshot).map_err(|source| {
                if source.kind() == std::io::ErrorKind::InvalidData {
                    DataDirError::DamagedSnapshot {
                        path: path.to_owned(),
                        file: snapshot.join(crate::storage::snapshot_file::FILE),
                        reason: source.to_string(),
                    }
                } else {
                    DataDirError::Read {
                        path: snapshot.clone(),
                        source,
                    }
                }
            })?;
        // An earlier build's sled store, not yet moved: read (on a copy).
        let legacy = if old_store.exists() && !meta_path.exists() {
            let read = super::sled_migration::read(path).map_err(|source| DataDirError::Write {
                path: path.join(super::sled_migration::CHECK_DIR),
                source,
            })?;
            Some(read.map_err(|reason| DataDirError::DamagedMeta {
                path: path.to_owned(),
                store: old_store.clone(),
                reason,
            })?)
        } else {
            None
        };
        let stored = match &legacy {
            Some(legacy) => Some(legacy.payload.clone()),
            None => super::meta_file::MetaFile::read(&meta_path).map_err(|source| {
                if source.kind() == std::io::ErrorKind::InvalidData {
                    DataDirError::DamagedMeta {
                        path: path.to_owned(),
                        store: meta_path.clone(),
                        reason: source.to_string(),
                    }
                } else {
                    DataDirError::Read {
                        path: meta_path.clone(),
                        source,
                    }
                }
            })?,
        };
        let old_log_last = legacy.as_ref().and_then(|l| l.old_log.last().cloned());
        let evidence = crate::storage::meta_check::Evidence {
            last_record: last_record.or(old_log_last),
            snapshot_meta,
        };
        crate::storage::meta_check::check(stored.as_deref(), &evidence).map_err(|refusal| {
            DataDirError::DamagedMeta {
                path: path.to_owned(),
                store: if legacy.is_some() {
                    old_store.clone()
                } else {
                    meta_path.clone()
                },
                reason: refusal.0,
            }
        })?;
        // Judged sound: now the move may write.
        let moved = match &legacy {
            Some(legacy) => super::sled_migration::finish(path, legacy, &wal, &meta_path),
            // Moved, but the rename was undone by a power loss.
            None if old_store.exists() => super::sled_migration::set_aside(path),
            None => Ok(()),
        };
        moved.map_err(|source| DataDirError::Write {
            path: old_store.clone(),
            source,
        })?;
        Ok(Self {
            path: path.to_owned(),
            node_id,
            node_uuid: marker.node_uuid,
            cluster_id: marker.cluster_id,
            meta_file: meta_path,
            _lock: lock,
        })
    }

    /// Writes the cluster id into the marker (done once, when learned).
    pub fn record_cluster_id(&self, cluster_id: &str) -> Result<(), DataDirError> {
        let marker = Marker {
            format: FORMAT,
            node_id: self.node_id,
            node_uuid: self.node_uuid.clone(),
            cluster_id: Some(cluster_id.to_owned()),
        };
        write_atomically(&self.path.join(MARKER), &marker)
    }
}

/// Opens the data dir and takes an exclusive `flock` on it (released when
/// the returned file closes, by this process or its death).
fn lock(path: &Path) -> Result<std::fs::File, DataDirError> {
    let dir = std::fs::File::open(path).map_err(|source| DataDirError::Read {
        path: path.to_owned(),
        source,
    })?;
    rustix::fs::flock(&dir, rustix::fs::FlockOperation::NonBlockingLockExclusive).map_err(|e| {
        DataDirError::Locked {
            path: path.to_owned(),
            source: e.into(),
        }
    })?;
    Ok(dir)
}

fn write_atomically(path: &Path, marker: &Marker) -> Result<(), DataDirError> {
    let tmp = path.with_extension("json.tmp");
    let bytes = serde_json::to_vec_pretty(marker).map_err(|e| DataDirError::Write {
        path: path.to_owned(),
        source: std::io::Error::other(e),
    })?;
    let write = || -> std::io::Result<()> {
        use std::io::Write;
        let mut file = std::fs::File::create(&tmp)?;
        file.write_all(&bytes)?;
        super::durable::sync_all(&file)?;
        std::fs::rename(&tmp, path)?;
        if let Some(dir) = path.parent() {
            super::durable::sync_dir(dir)?;
        }
        Ok(())
    };
    write().map_err(|source| DataDirError::Write {
        path: path.to_owned(),
        source,
    })
}

/// Where `PUT /v1/snapshot` spills an uploaded archive while it checks
/// and proposes it; a leftover (a crash mid-restore) is removed when the
/// data dir opens.
pub const UPLOAD_FILE: &str = "restore-upload.tmp";

/// A random RFC 4122 version-4 UUID, as Consul's node IDs (from the
/// thread's CSPRNG: also used for ACL secrets).
pub fn new_uuid() -> String {
    let mut b: [u8; 16] = rand::rng().random();
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reopens_and_rejects_other_node() {
        let dir = tempfile::tempdir().expect("tempdir");
        let uuid = {
            let opened = DataDir::open(dir.path(), 3).expect("open");
            opened.node_uuid.clone()
        };
        let again = DataDir::open(dir.path(), 3).expect("reopen");
        assert_eq!(again.node_uuid, uuid);
        drop(again);
        let err = DataDir::open(dir.path(), 4).expect_err("other node");
        assert!(err.to_string().contains("belongs to node 3"), "{err}");
    }

    #[test]
    fn corrupt_marker_and_missing_marker_are_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        drop(DataDir::open(dir.path(), 1).expect("open"));
        std::fs::write(dir.path().join(MARKER), b"{not json").expect("write");
        let err = DataDir::open(dir.path(), 1).expect_err("corrupt");
        assert!(err.to_string().contains("corrupt"), "{err}");
        // Raft metadata without a marker.
        let meta = dir.path().join(crate::storage::meta_file::FILE);
        drop(crate::storage::meta_file::MetaFile::open_or_create(&meta, b"{}").expect("meta"));
        std::fs::remove_file(dir.path().join(MARKER)).expect("rm");
        let err = DataDir::open(dir.path(), 1).expect_err("no marker");
        assert!(err.to_string().contains("no meshwork.json"), "{err}");
    }

    #[test]
    fn a_foreign_non_empty_dir_is_refused_and_left_alone() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("notes.txt"), b"mine").expect("write");
        let err = DataDir::open(dir.path(), 1).expect_err("foreign");
        assert!(err.to_string().contains("notes.txt"), "{err}");
        assert!(!dir.path().join(MARKER).exists(), "nothing written");
        // A file system's lost+found is no one's data.
        std::fs::remove_file(dir.path().join("notes.txt")).expect("rm");
        std::fs::create_dir(dir.path().join("lost+found")).expect("mkdir");
        drop(DataDir::open(dir.path(), 1).expect("a fresh dir"));
    }

    #[test]
    fn a_data_dir_in_use_is_refused_until_it_is_closed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let first = DataDir::open(dir.path(), 1).expect("open");
        let err = DataDir::open(dir.path(), 1).expect_err("in use");
        assert!(matches!(err, DataDirError::Locked { .. }), "{err}");
        assert!(
            err.to_string().contains("another meshwork-registry"),
            "{err}"
        );
        drop(first);
        drop(DataDir::open(dir.path(), 1).expect("free again"));
    }

    #[test]
    fn uuid_shape() {
        let id = new_uuid();
        assert_eq!(id.len(), 36);
        assert_eq!(&id[14..15], "4");
    }
}
