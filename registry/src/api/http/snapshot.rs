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

use super::AppState;
use super::error::ApiError;
use super::query::{Params, ReadOptions};
use crate::command::{Command, CommandResponse};
use meshwork_core::backup::{self, BACKUP_MAGIC, BackupHeader};
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
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    let options = ReadOptions::from_params(&Params::parse(query.as_deref()))?;
    app.node.read_barrier(options.consistency).await?;
    // O(1): the state maps are persistent.
    let state = app.node.state.read().clone();
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

/// `PUT /v1/snapshot`: restores an archive. One from another cluster is
/// refused unless `?force` says that is meant (a rebuilt cluster has a new
/// id); the cluster keeps its own id either way.
pub async fn restore(
    State(app): State<AppState>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let params = Params::parse(query.as_deref());
    let force = params.flag("force")?;
    let bytes = super::kv::read_body(&headers, body, MAX_BACKUP_BYTES).await?;
    let (header, data) = tokio::task::spawn_blocking(move || decode_archive(&bytes))
        .await
        .map_err(|e| ApiError::Internal(format!("decoding the snapshot: {e}")))??;
    let ours = app.node.state.read().cluster_id.clone();
    if let (Some(theirs), Some(ours)) = (&header.cluster_id, &ours)
        && theirs != ours
        && !force
    {
        return Err(ApiError::Conflict(format!(
            "Snapshot is from cluster {theirs}, this is cluster {ours}; nothing was changed. \
             Restore it anyway with ?force (meshctl snapshot restore --force) to replace this cluster's data"
        )));
    }
    let Ok(_one_at_a_time) = RESTORING.try_lock() else {
        return Err(ApiError::Conflict(
            "A restore is already running on this server; nothing was changed. Wait for it to finish".into(),
        ));
    };
    let id = format!("{:016x}", rand::random::<u64>());
    let pieces: Vec<&[u8]> = data.chunks(RESTORE_PART_BYTES).collect();
    let parts =
        u32::try_from(pieces.len()).map_err(|_| ApiError::bad_request("snapshot too large"))?;
    tracing::warn!(
        restore = %id,
        bytes = data.len(),
        parts,
        "restoring a snapshot over the API"
    );
    for (part, piece) in pieces.iter().enumerate() {
        let staged = app
            .node
            .write(Command::RestorePart {
                id: id.clone(),
                part: part as u32,
                data: piece.to_vec(),
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
            crc: crc32fast::hash(&data),
        })
        .await?;
    if applied.response != CommandResponse::Applied(true) {
        return Err(ApiError::Conflict(
            "The restore was replaced by another one before it completed; nothing of this one was applied".into(),
        ));
    }
    tracing::warn!(
        index = applied.index,
        from_index = header.index,
        from_cluster = header.cluster_id.as_deref().unwrap_or(""),
        "snapshot restored over the API: the KV store and catalog were replaced"
    );
    let mut response = ().into_response();
    response
        .headers_mut()
        .insert("X-Consul-Index", HeaderValue::from(applied.index));
    Ok(response)
}

/// Checks and decodes an archive; says what is wrong with a bad one.
/// Returns the header and the state's JSON, checked to decode (and to hold
/// only config entry kinds this version knows).
pub fn decode_archive(bytes: &[u8]) -> Result<(BackupHeader, Vec<u8>), ApiError> {
    let (header, data) = backup::decode(bytes)
        .map_err(|e| ApiError::bad_request(format!("{e}; nothing was changed")))?;
    let state: crate::state::State = serde_json::from_slice(&data).map_err(|e| {
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
    Ok((header, data))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn damaged_archives_are_refused_with_the_reason() {
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
        let good = encode_frame(BACKUP_MAGIC, &meta, &data);
        let (back, _) = decode_archive(&good).expect("good archive");
        assert_eq!(back.index, 7);

        let message = |bytes: &[u8]| match decode_archive(bytes) {
            Ok(_) => panic!("accepted a bad archive"),
            Err(e) => e.to_string(),
        };
        assert!(message(&good[..good.len() / 2]).contains("truncated"));
        let mut flipped = good.clone();
        let at = flipped.len() - 10;
        flipped[at] ^= 1;
        assert!(message(&flipped).contains("checksum"));
        assert!(message(b"MWSNAP1\nnot a backup at all").contains("bad magic"));
        assert!(message(b"").contains("bad magic"));
        let mut trailing = good.clone();
        trailing.extend_from_slice(b"junk");
        assert!(!message(&trailing).is_empty());
        let not_state = encode_frame(BACKUP_MAGIC, &meta, b"{\"nope\":1}");
        assert!(message(&not_state).contains("Snapshot data is invalid"));
    }
}
