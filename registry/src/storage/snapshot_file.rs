//! The latest snapshot, as one checksummed file written atomically (temp
//! file, fsync, rename, fsync of the directory). Kept out of sled: a
//! multi-megabyte blob in sled costs far more disk writes than a file.
//!
//! Layout of `snapshot.bin`: the magic `MWSNAP1\n`, then the metadata
//! length (u64 BE), the metadata (JSON), the data length (u64 BE), the
//! data, and a CRC-32 of everything before it (u32 BE).

use std::io::{self, Write};
use std::path::{Path, PathBuf};

const MAGIC: &[u8; 8] = b"MWSNAP1\n";
const FILE: &str = "snapshot.bin";

use meshwork_core::frame::{decode_frame, encode_frame};

/// The directory that holds the snapshot.
#[derive(Debug, Clone)]
pub struct SnapshotFile {
    dir: PathBuf,
}

impl SnapshotFile {
    pub fn new(dir: &Path) -> io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        Ok(Self {
            dir: dir.to_owned(),
        })
    }

    /// The stored (metadata, data), if any. A damaged file is an error,
    /// never silently ignored.
    pub fn read(&self) -> io::Result<Option<(Vec<u8>, Vec<u8>)>> {
        let path = self.dir.join(FILE);
        let bytes = match std::fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        decode_frame(MAGIC, &bytes).map(Some).map_err(|why| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{} is corrupt: {why}", path.display()),
            )
        })
    }

    /// Replaces the stored snapshot, durably.
    pub fn write(&self, meta: &[u8], data: &[u8]) -> io::Result<()> {
        let tmp = self.dir.join("snapshot.bin.tmp");
        let body = encode_frame(MAGIC, meta, data);
        let mut file = std::fs::File::create(&tmp)?;
        file.write_all(&body)?;
        file.sync_all()?;
        drop(file);
        std::fs::rename(&tmp, self.dir.join(FILE))?;
        std::fs::File::open(&self.dir)?.sync_all()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_corruption() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = SnapshotFile::new(dir.path()).expect("new");
        assert!(file.read().expect("read").is_none());
        file.write(b"{\"m\":1}", b"data bytes").expect("write");
        let (meta, data) = file.read().expect("read").expect("some");
        assert_eq!(
            (meta.as_slice(), data.as_slice()),
            (&b"{\"m\":1}"[..], &b"data bytes"[..])
        );
        let path = dir.path().join(FILE);
        let mut bytes = std::fs::read(&path).expect("bytes");
        let n = bytes.len();
        bytes[n / 2] ^= 0xff;
        std::fs::write(&path, &bytes).expect("write");
        assert!(file.read().is_err());
        std::fs::write(&path, b"short").expect("write");
        assert!(file.read().is_err());
    }
}
