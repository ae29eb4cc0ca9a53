//! Backups over the API: `GET /v1/snapshot` saves the whole replicated
//! state, `PUT /v1/snapshot` restores it through Raft so every server
//! converges (Consul's paths; our own archive format).
//!
//! An archive is one frame (see `raft::snapshot_file`): the magic
//! `MWBACKUP1\n`, a JSON header ([`BackupHeader`]), the state as JSON, and a
//! CRC-32 of everything before it. A restore checks all of it before it
//! proposes anything, so a truncated, corrupt or foreign archive leaves the
//! state untouched; then it sends the state's JSON through Raft in pieces
//! (`RestorePart`, staged) and a `RestoreCommit` that swaps the data in.

use axum::body::Body;
use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::{IntoResponse, Response};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::AppState;
use super::authz::Authz;
use super::error::ApiError;
use super::query::{Params, ReadOptions};
use crate::auth::{Need, Single};
use crate::command::{Command, CommandResponse};
use meshwork_core::backup::{BACKUP_MAGIC, BackupHeader};
use meshwork_core::frame::encode_frame;

/// Largest archive a restore accepts.
pub const MAX_BACKUP_BYTES: usize = 128 * 1024 * 1024;
/// A restore goes through Raft in pieces of this size: openraft gives one
/// AppendEntries a heartbeat interval to arrive, so no log entry may be
/// much larger than what a link carries in that time.
const RESTORE_PART_BYTES: usize = 128 * 1024;
/// One restore at a time per server.
static RESTORING: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// `GET /v1/snapshot`: a consistent archive of the whole state (a leader
/// read by default; `?stale` from this server, `?consistent` after a
/// quorum check).
pub async fn save(
    State(app): State<AppState>,
    authz: Authz,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    // A backup holds every secret (ACL tokens included): management only,
    // as Consul.
    authz.require_single(Single::Acl, Need::Write)?;
    let options = ReadOptions::from_params(&Params::parse(query.as_deref()))?;
    app.node.read_barrier(options.consistency).await?;
    // O(1): the state maps are persistent. The mesh CA (its private keys)
    // never leaves the servers: a restore keeps the cluster's own anyway.
    let mut state = app.node.state.read().clone();
    state.ca = Default::default();
    let header = BackupHeader {
        cluster_id: state.cluster_id.clone(),
        index: state.last_index,
        datacenter: app.datacenter.to_string(),
        server: app.node_name.to_string(),
        version: env!("CARGO_PKG_VERSION").to_owned(),
        created_at: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        kv_entries: state.kv.len(),
        nodes: state.catalog.nodes().count(),
    };
    let index = state.last_index;
    let archive = tokio::task::spawn_blocking(move || -> Result<Vec<u8>, String> {
        let meta = serde_json::to_vec(&header).map_err(|e| e.to_string())?;
        let data = serde_json::to_vec(&state).map_err(|e| e.to_string())?;
        Ok(encode_frame(BACKUP_MAGIC, &meta, &data))
    })
    .await
    .map_err(|e| ApiError::Internal(format!("encoding the snapshot: {e}")))?
    .map_err(|e| ApiError::Internal(format!("encoding the snapshot: {e}")))?;
    tracing::info!(index, bytes = archive.len(), "snapshot saved over the API");
    let mut response = archive.into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    headers.insert("X-Consul-Index", HeaderValue::from(index));
    Ok(response)
}

use crate::storage::datadir::UPLOAD_FILE;
/// Longest archive header accepted.
const MAX_META_BYTES: u64 = 64 * 1024;

/// `PUT /v1/snapshot`: restores an archive. One from another cluster is
/// refused unless `?force` says that is meant (a rebuilt cluster has a new
/// id); the cluster keeps its own id either way.
///
/// One restore at a time per server (429 for others). The archive is
/// checked as it arrives — refused at its first bad byte (magic, lengths,
/// header, cluster) — and its data spilled to a file in the data dir, not
/// held in memory; the checksum and the state's decoding are checked
/// before anything is proposed.
pub async fn restore(
    State(app): State<AppState>,
    authz: Authz,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    authz.require_single(Single::Acl, Need::Write)?;
    let params = Params::parse(query.as_deref());
    let force = params.flag("force")?;
    let Ok(_one_at_a_time) = RESTORING.try_lock() else {
        return Err(ApiError::TooManyRequests(
            "A restore is already running on this server; nothing was changed. Wait for it to finish".into(),
        ));
    };
    if let Some(len) = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        && len > MAX_BACKUP_BYTES as u64
    {
        return Err(ApiError::PayloadTooLarge(format!(
            "Snapshot of {len} bytes is larger than {MAX_BACKUP_BYTES}; nothing was changed"
        )));
    }
    drop(headers);
    let path = app.data_dir.join(UPLOAD_FILE);
    let _remove = RemoveOnDrop(path.clone());
    let ours = app.node.state.read().cluster_id.clone();
    let upload = receive(body, &path, |header| {
        if let (Some(theirs), Some(ours)) = (&header.cluster_id, &ours)
            && theirs != ours
            && !force
        {
            return Err(ApiError::Conflict(format!(
                "Snapshot is from cluster {theirs}, this is cluster {ours}; nothing was changed. \
                 Restore it anyway with ?force (meshctl snapshot restore --force) to replace this cluster's data"
            )));
        }
        Ok(())
    })
    .await?;
    // The state must decode (and hold only kinds this version knows).
    let check_path = path.clone();
    tokio::task::spawn_blocking(move || check_state(&check_path))
        .await
        .map_err(|e| ApiError::Internal(format!("checking the snapshot: {e}")))??;

    let id = format!("{:016x}", rand::random::<u64>());
    let parts = u32::try_from(upload.data_len.div_ceil(RESTORE_PART_BYTES as u64))
        .map_err(|_| ApiError::bad_request("snapshot too large; nothing was changed"))?;
    tracing::warn!(
        restore = %id,
        bytes = upload.data_len,
        parts,
        "restoring a snapshot over the API"
    );
    let mut file = tokio::fs::File::open(&path)
        .await
        .map_err(|e| ApiError::Internal(format!("reading the uploaded snapshot: {e}")))?;
    let mut left = upload.data_len;
    for part in 0..parts {
        let size = left.min(RESTORE_PART_BYTES as u64) as usize;
        let mut piece = vec![0u8; size];
        file.read_exact(&mut piece)
            .await
            .map_err(|e| ApiError::Internal(format!("reading the uploaded snapshot: {e}")))?;
        left -= size as u64;
        let staged = app
            .node
            .write(Command::RestorePart {
                id: id.clone(),
                part,
                data: piece,
            })
            .await?;
        if staged.response != CommandResponse::Applied(true) {
            return Err(ApiError::Conflict(
                "Another restore (through another server) replaced this one; nothing of this one was applied".into(),
            ));
        }
    }
    let applied = app
        .node
        .write(Command::RestoreCommit {
            id,
            parts,
            crc: upload.data_crc,
        })
        .await?;
    if applied.response != CommandResponse::Applied(true) {
        return Err(ApiError::Conflict(
            "The restore was replaced by another one before it completed; nothing of this one was applied".into(),
        ));
    }
    tracing::warn!(
        index = applied.index,
        from_index = upload.header.index,
        from_cluster = upload.header.cluster_id.as_deref().unwrap_or(""),
        "snapshot restored over the API: the KV store and catalog were replaced"
    );
    let mut response = ().into_response();
    response
        .headers_mut()
        .insert("X-Consul-Index", HeaderValue::from(applied.index));
    Ok(response)
}

/// Removes a file when dropped (the upload, whatever happens).
struct RemoveOnDrop(std::path::PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// An archive received and checked (frame, header, checksum).
struct Upload {
    header: BackupHeader,
    data_len: u64,
    /// CRC-32 of the data alone (what `RestoreCommit` checks).
    data_crc: u32,
}

/// Where the archive reader is.
enum Part {
    Magic,
    MetaLen,
    Meta(usize),
    DataLen,
    Data(u64),
    Crc,
}

/// Receives an archive from `body`, checking it as it comes: the magic
/// byte by byte, the lengths as soon as they are read, the header (and
/// `vet`, on it) before any data; the data goes to `path`.
async fn receive(
    mut body: Body,
    path: &std::path::Path,
    vet: impl Fn(&BackupHeader) -> Result<(), ApiError>,
) -> Result<Upload, ApiError> {
    use http_body_util::BodyExt;
    let refuse = |why: &str| {
        ApiError::bad_request(format!(
            "Not a valid Meshwork snapshot: {why}; nothing was changed"
        ))
    };
    let mut file = tokio::fs::File::create(path).await.map_err(|e| {
        ApiError::Internal(format!(
            "cannot spill the upload to {}: {e}",
            path.display()
        ))
    })?;
    let mut whole = crc32fast::Hasher::new();
    let mut data_crc = crc32fast::Hasher::new();
    let mut part = Part::Magic;
    let mut pending: Vec<u8> = Vec::new();
    let mut header = None;
    let mut data_len = 0u64;
    let mut crc_seen: Option<[u8; 4]> = None;
    let mut total = 0usize;
    loop {
        let frame = body.frame().await.transpose().map_err(|e| {
            ApiError::bad_request(format!(
                "cannot read the snapshot: {e}; nothing was changed"
            ))
        })?;
        let Some(frame) = frame else { break };
        let Ok(chunk) = frame.into_data() else {
            continue;
        };
        if crc_seen.is_some() && !chunk.is_empty() {
            return Err(refuse("trailing bytes after the data"));
        }
        total += chunk.len();
        if total > MAX_BACKUP_BYTES + 1024 {
            return Err(ApiError::PayloadTooLarge(format!(
                "Snapshot larger than {MAX_BACKUP_BYTES} bytes; nothing was changed"
            )));
        }
        let mut rest: &[u8] = &chunk;
        while !rest.is_empty() {
            match part {
                Part::Magic => {
                    let want = BACKUP_MAGIC.len() - pending.len();
                    let (now, later) = rest.split_at(want.min(rest.len()));
                    pending.extend_from_slice(now);
                    rest = later;
                    if !BACKUP_MAGIC.starts_with(&pending) {
                        return Err(refuse("not a snapshot of this kind (bad magic)"));
                    }
                    if pending.len() == BACKUP_MAGIC.len() {
                        whole.update(&pending);
                        pending.clear();
                        part = Part::MetaLen;
                    }
                }
                Part::MetaLen | Part::DataLen | Part::Crc => {
                    let size = if matches!(part, Part::Crc) { 4 } else { 8 };
                    let want = size - pending.len();
                    let (now, later) = rest.split_at(want.min(rest.len()));
                    pending.extend_from_slice(now);
                    rest = later;
                    if pending.len() < size {
                        continue;
                    }
                    match part {
                        Part::MetaLen => {
                            whole.update(&pending);
                            let len =
                                u64::from_be_bytes(pending[..8].try_into().unwrap_or_default());
                            if len > MAX_META_BYTES {
                                return Err(refuse("its header is too long"));
                            }
                            part = Part::Meta(len as usize);
                        }
                        Part::DataLen => {
                            whole.update(&pending);
                            data_len =
                                u64::from_be_bytes(pending[..8].try_into().unwrap_or_default());
                            if data_len > MAX_BACKUP_BYTES as u64 {
                                return Err(ApiError::PayloadTooLarge(format!(
                                    "Snapshot data of {data_len} bytes is larger than {MAX_BACKUP_BYTES}; nothing was changed"
                                )));
                            }
                            part = Part::Data(data_len);
                        }
                        _ => {
                            crc_seen = Some(pending[..4].try_into().unwrap_or_default());
                            if !rest.is_empty() {
                                return Err(refuse("trailing bytes after the data"));
                            }
                        }
                    }
                    pending.clear();
                }
                Part::Meta(len) => {
                    let want = len - pending.len();
                    let (now, later) = rest.split_at(want.min(rest.len()));
                    pending.extend_from_slice(now);
                    rest = later;
                    if pending.len() == len {
                        whole.update(&pending);
                        let parsed: BackupHeader =
                            serde_json::from_slice(&pending).map_err(|e| {
                                ApiError::bad_request(format!(
                                    "Snapshot header is invalid: {e}; nothing was changed"
                                ))
                            })?;
                        vet(&parsed)?;
                        header = Some(parsed);
                        pending.clear();
                        part = Part::DataLen;
                    }
                }
                Part::Data(left) => {
                    let n = usize::try_from(left).unwrap_or(usize::MAX).min(rest.len());
                    let (now, later) = rest.split_at(n);
                    whole.update(now);
                    data_crc.update(now);
                    file.write_all(now).await.map_err(|e| {
                        ApiError::Internal(format!(
                            "cannot spill the upload: {e}; nothing was changed"
                        ))
                    })?;
                    rest = later;
                    let left = left - n as u64;
                    part = if left == 0 {
                        Part::Crc
                    } else {
                        Part::Data(left)
                    };
                }
            }
            if crc_seen.is_some() && !rest.is_empty() {
                return Err(refuse("trailing bytes after the data"));
            }
        }
    }
    // The data may have been empty: a zero-length data part is complete.
    if let Part::Data(0) = part {
        part = Part::Crc;
    }
    let (Some(header), Some(crc)) = (header, crc_seen) else {
        let _ = part;
        return Err(refuse("truncated"));
    };
    if whole.finalize() != u32::from_be_bytes(crc) {
        return Err(refuse("checksum mismatch"));
    }
    file.flush().await.map_err(|e| {
        ApiError::Internal(format!("cannot spill the upload: {e}; nothing was changed"))
    })?;
    Ok(Upload {
        header,
        data_len,
        data_crc: data_crc.finalize(),
    })
}

/// Checks that the spilled state decodes (streamed from the file) and
/// holds only config entry kinds this version knows.
fn check_state(path: &std::path::Path) -> Result<(), ApiError> {
    let file = std::fs::File::open(path)
        .map_err(|e| ApiError::Internal(format!("reading the uploaded snapshot: {e}")))?;
    let state: crate::state::State = serde_json::from_reader(std::io::BufReader::new(file))
        .map_err(|e| {
            ApiError::bad_request(format!(
                "Snapshot data is invalid: {e}; nothing was changed"
            ))
        })?;
    if let Some(kind) = state
        .config
        .kinds()
        .find(|k| crate::state::config::check_kind(k).is_err())
    {
        return Err(ApiError::bad_request(format!(
            "Snapshot holds config entries of kind {kind:?}, unknown to this version; nothing was changed"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    use futures::StreamExt;

    fn archive() -> Vec<u8> {
        let header = BackupHeader {
            cluster_id: Some("c1".into()),
            index: 7,
            datacenter: "dc1".into(),
            server: "s1".into(),
            version: "0".into(),
            created_at: 0,
            kv_entries: 0,
            nodes: 0,
        };
        let meta = serde_json::to_vec(&header).expect("meta");
        let data = serde_json::to_vec(&crate::state::State::default()).expect("data");
        encode_frame(BACKUP_MAGIC, &meta, &data)
    }

    /// Receives `chunks` as a streamed body, then checks the state.
    async fn upload(chunks: Vec<Vec<u8>>, dir: &std::path::Path) -> Result<Upload, String> {
        let stream = futures::stream::iter(
            chunks
                .into_iter()
                .map(|c| Ok::<_, std::io::Error>(bytes::Bytes::from(c))),
        );
        let path = dir.join(UPLOAD_FILE);
        let got = receive(Body::from_stream(stream), &path, |h| {
            if h.cluster_id.as_deref() == Some("other") {
                Err(ApiError::Conflict("foreign".into()))
            } else {
                Ok(())
            }
        })
        .await
        .map_err(|e| e.to_string())?;
        check_state(&path).map_err(|e| e.to_string())?;
        Ok(got)
    }

    #[tokio::test]
    async fn an_upload_is_checked_as_it_streams_whatever_its_pieces() {
        let dir = tempfile::tempdir().expect("tmp");
        let good = archive();
        for split in 1..good.len() {
            let (a, b) = good.split_at(split);
            let got = upload(vec![a.to_vec(), b.to_vec()], dir.path())
                .await
                .unwrap_or_else(|e| panic!("split at {split}: {e}"));
            assert_eq!(got.header.index, 7);
        }
        let message = |bytes: &[u8]| {
            let bytes = bytes.to_vec();
            let dir = dir.path().to_owned();
            async move {
                match upload(vec![bytes], &dir).await {
                    Ok(_) => panic!("accepted a bad archive"),
                    Err(e) => e,
                }
            }
        };
        assert!(message(&good[..good.len() / 2]).await.contains("truncated"));
        let mut flipped = good.clone();
        let at = flipped.len() - 10;
        flipped[at] ^= 1;
        assert!(message(&flipped).await.contains("checksum"));
        assert!(
            message(b"MWSNAP1\nnot a backup at all")
                .await
                .contains("bad magic")
        );
        assert!(message(b"").await.contains("truncated"));
        let mut trailing = good.clone();
        trailing.extend_from_slice(b"junk");
        assert!(message(&trailing).await.contains("trailing"));
        let not_state = encode_frame(
            BACKUP_MAGIC,
            &serde_json::to_vec(&serde_json::json!({
                "ClusterId": null, "Index": 1, "Datacenter": "dc1", "Server": "s", "Version": "0",
                "CreatedAt": 0, "KvEntries": 0, "Nodes": 0
            }))
            .expect("meta"),
            b"{\"nope\":1}",
        );
        assert!(
            message(&not_state)
                .await
                .contains("Snapshot data is invalid")
        );
        // A huge declared header is refused before it is read.
        let mut long = BACKUP_MAGIC.to_vec();
        long.extend_from_slice(&u64::MAX.to_be_bytes());
        assert!(message(&long).await.contains("header is too long"));
        // Garbage is refused at its first byte: the rest is never read.
        let never = futures::stream::iter(vec![Ok::<_, std::io::Error>(
            bytes::Bytes::from_static(b"X"),
        )])
        .chain(futures::stream::pending());
        let path = dir.path().join(UPLOAD_FILE);
        let refused = tokio::time::timeout(
            std::time::Duration::from_secs(5),
            receive(Body::from_stream(never), &path, |_| Ok(())),
        )
        .await
        .expect("refused without waiting for the rest");
        assert!(refused.is_err());
        // Another cluster's archive: refused from its header.
        let foreign = encode_frame(BACKUP_MAGIC, &serde_json::to_vec(&serde_json::json!({
            "ClusterId": "other", "Index": 1, "Datacenter": "dc1", "Server": "s", "Version": "0",
            "CreatedAt": 0, "KvEntries": 0, "Nodes": 0
        })).expect("meta"), b"{}");
        assert_eq!(message(&foreign).await, "foreign");
    }
}
