//! The archive `GET /v1/snapshot` answers and `PUT /v1/snapshot` takes: a
//! [`frame`](crate::frame) under the magic `MWBACKUP1\n`, whose metadata is
//! a JSON [`BackupHeader`] and whose data is the state as JSON. Shared so
//! `meshctl snapshot save` refuses a damaged download with the same checks
//! the server restores with; the server also checks that the state decodes.

use serde::{Deserialize, Serialize};

use crate::frame::decode_frame;

/// Marks a Meshwork backup archive (and its format version).
pub const BACKUP_MAGIC: &[u8] = b"MWBACKUP1\n";

/// What an archive says about itself.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", deny_unknown_fields)]
pub struct BackupHeader {
    /// The cluster it was taken from.
    pub cluster_id: Option<String>,
    /// The log index of the state it holds.
    pub index: u64,
    pub datacenter: String,
    /// The server that wrote it.
    pub server: String,
    pub version: String,
    /// Seconds since the Unix epoch.
    pub created_at: u64,
    pub kv_entries: usize,
    pub nodes: usize,
}

/// Why an archive was refused.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error("Not a valid Meshwork snapshot ({len} bytes): {why}")]
    Frame { len: usize, why: &'static str },
    #[error("Snapshot header is invalid: {0}")]
    Header(#[source] serde_json::Error),
}

/// Checks an archive's frame and header; returns the header and the
/// state's JSON (not decoded here).
pub fn decode(bytes: &[u8]) -> Result<(BackupHeader, Vec<u8>), BackupError> {
    let (meta, data) = decode_frame(BACKUP_MAGIC, bytes).map_err(|why| BackupError::Frame {
        len: bytes.len(),
        why,
    })?;
    let header = serde_json::from_slice(&meta).map_err(BackupError::Header)?;
    Ok((header, data))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::encode_frame;

    #[test]
    fn a_damaged_archive_says_what_is_wrong() {
        let header = br#"{"ClusterId":null,"Index":7,"Datacenter":"dc1","Server":"s1","Version":"0","CreatedAt":1,"KvEntries":0,"Nodes":0}"#;
        let good = encode_frame(BACKUP_MAGIC, header, b"{}");
        let (h, data) = decode(&good).expect("a good archive");
        assert_eq!((h.index, data.as_slice()), (7, &b"{}"[..]));
        let mut flipped = good.clone();
        flipped[BACKUP_MAGIC.len() + 10] ^= 1;
        assert!(
            decode(&flipped)
                .expect_err("refused")
                .to_string()
                .contains("checksum mismatch")
        );
        assert!(
            decode(&good[..good.len() - 3])
                .expect_err("refused")
                .to_string()
                .contains("truncated")
        );
        assert!(
            decode(b"MWSNAP1\nxxxx")
                .expect_err("refused")
                .to_string()
                .contains("bad magic")
        );
        let bad_header = encode_frame(BACKUP_MAGIC, b"{}", b"{}");
        assert!(matches!(decode(&bad_header), Err(BackupError::Header(_))));
    }
}
