//! The latest snapshot, as one checksummed file written atomically (temp
//! file, fsync, rename, fsync of the directory). Kept out of sled: a
//! multi-megabyte blob in sled costs far more disk writes than a file.
//!
//! Layout of `snapshot.bin`: the magic `MWSNAP1\n`, then the metadata
//! length (u64 BE), the metadata (JSON), the data length (u64 BE), the
//! data, and a CRC-32 of everything before it (u32 BE).

use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

const MAGIC: &[u8; 8] = b"MWSNAP1\n";
/// The snapshot file's name in its directory.
pub const FILE: &str = "snapshot.bin";

use meshwork_core::frame::decode_frame;

use super::{drop_cache, durable};

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

    /// Judges the snapshot in `dir` without writing anything (nor holding
    /// it in memory): `Err` (`InvalidData`, naming the file) when it is
    /// damaged, else its metadata, if there is a snapshot. Run before
    /// anything in the data dir is opened for writing, so that a damaged
    /// snapshot refuses the start with every byte unchanged.
    pub fn check(dir: &Path) -> io::Result<Option<Vec<u8>>> {
        let path = dir.join(FILE);
        let file = match std::fs::File::open(&path) {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        let damaged = |why: &str| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{} is corrupt: {why}", path.display()),
            )
        };
        let len = file.metadata()?.len();
        let u64_at = |at: u64| -> io::Result<Option<u64>> {
            let mut bytes = [0u8; 8];
            if at.checked_add(8).is_none_or(|end| end > len) {
                return Ok(None);
            }
            file.read_exact_at(&mut bytes, at)?;
            Ok(Some(u64::from_be_bytes(bytes)))
        };
        let mut magic = [0u8; MAGIC.len()];
        if len < MAGIC.len() as u64 || {
            file.read_exact_at(&mut magic, 0)?;
            &magic != MAGIC
        } {
            return Err(damaged("not a snapshot of this kind (bad magic)"));
        }
        // The layout must add up to the file's length exactly.
        let meta_at = MAGIC.len() as u64 + 8;
        let meta_len = u64_at(MAGIC.len() as u64)?;
        let data_len = meta_len
            .and_then(|m| meta_at.checked_add(m))
            .map(u64_at)
            .transpose()?
            .flatten();
        let framed = meta_len.zip(data_len).and_then(|(m, d)| {
            meta_at
                .checked_add(m)?
                .checked_add(8)?
                .checked_add(d)?
                .checked_add(4)
        });
        let crc_at = len.saturating_sub(4);
        let mut crc = crc32fast::Hasher::new();
        let mut buf = vec![0u8; 1 << 20];
        let mut at = 0u64;
        while at < crc_at {
            let n = (crc_at - at).min(buf.len() as u64) as usize;
            file.read_exact_at(&mut buf[..n], at)?;
            crc.update(&buf[..n]);
            at += n as u64;
        }
        let mut stored = [0u8; 4];
        if len >= 4 {
            file.read_exact_at(&mut stored, crc_at)?;
        }
        if len < meta_at + 8 + 4 || crc.finalize() != u32::from_be_bytes(stored) {
            return Err(damaged(if framed.is_some_and(|f| f <= len) {
                "checksum mismatch"
            } else {
                "truncated"
            }));
        }
        match (framed, meta_len) {
            (Some(f), Some(m)) if f == len => {
                let mut meta = vec![0u8; m as usize];
                file.read_exact_at(&mut meta, meta_at)?;
                Ok(Some(meta))
            }
            (Some(f), _) if f < len => Err(damaged("trailing bytes after the data")),
            _ => Err(damaged("truncated")),
        }
    }

    /// Replaces the stored snapshot, durably.
    pub fn write(&self, meta: &[u8], data: &[u8]) -> io::Result<()> {
        self.write_with(meta, |out| out.write_all(data)).map(|_| ())
    }

    /// Replaces the stored snapshot, durably, with the data `encode`
    /// streams into the file (never held in memory whole). Returns the
    /// data's length.
    ///
    /// The file is synced every [`SYNC_EVERY`] bytes and its pages dropped
    /// from the cache: a snapshot is hundreds of megabytes, and written in
    /// one go it would queue that much behind every Raft log `fdatasync`
    /// on the same disk (measured: writes stalled for seconds while three
    /// servers wrote 212 MB snapshots at once).
    pub fn write_with(
        &self,
        meta: &[u8],
        encode: impl FnOnce(&mut dyn Write) -> io::Result<()>,
    ) -> io::Result<u64> {
        let tmp = self.dir.join("snapshot.bin.tmp");
        let file = std::fs::File::create(&tmp)?;
        // magic | meta length | meta | data length | data | CRC-32 of all
        // before it. The data length is known only at the end: written as
        // zeros, then filled in, its CRC combined in its place.
        let mut head = Vec::with_capacity(MAGIC.len() + 8 + meta.len() + 8);
        head.extend_from_slice(MAGIC);
        head.extend_from_slice(&(meta.len() as u64).to_be_bytes());
        head.extend_from_slice(meta);
        let mut crc = crc32fast::Hasher::new();
        crc.update(&head);
        let length_at = head.len() as u64;
        head.extend_from_slice(&[0u8; 8]);
        let mut out = SyncingWriter {
            file: &file,
            written: 0,
            synced: 0,
            crc: crc32fast::Hasher::new(),
        };
        out.write_all(&head)?;
        let data_from = out.written;
        out.crc = crc32fast::Hasher::new();
        {
            let mut buffered = io::BufWriter::with_capacity(1 << 16, &mut out);
            encode(&mut buffered)?;
            buffered.flush()?;
        }
        let data_len = out.written - data_from;
        let mut length = crc32fast::Hasher::new();
        length.update(&data_len.to_be_bytes());
        crc.combine(&length);
        crc.combine(&out.crc);
        out.write_all(&crc.finalize().to_be_bytes())?;
        file.write_all_at(&data_len.to_be_bytes(), length_at)?;
        durable::wrote(&file, length_at, 8);
        durable::sync_all(&file)?;
        drop_cache(&file);
        drop(file);
        std::fs::rename(&tmp, self.dir.join(FILE))?;
        durable::sync_dir(&self.dir)?;
        Ok(data_len)
    }
}

/// A snapshot file is synced (and its pages dropped) after every this many
/// bytes, so at most this much of it waits ahead of a Raft log sync.
pub const SYNC_EVERY: u64 = 4 << 20;

/// Writes through to the file, checksumming, syncing every [`SYNC_EVERY`].
struct SyncingWriter<'a> {
    file: &'a std::fs::File,
    written: u64,
    synced: u64,
    crc: crc32fast::Hasher,
}

impl Write for SyncingWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = (&*self.file).write(buf)?;
        durable::wrote(self.file, self.written, n as u64);
        self.crc.update(&buf[..n]);
        self.written += n as u64;
        if self.written - self.synced >= SYNC_EVERY {
            // For latency (the write-back stays small), not safety: the
            // file counts only once synced whole and renamed.
            durable::sync_data(self.file)?;
            drop_cache(self.file);
            self.synced = self.written;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
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

    #[test]
    fn the_check_refuses_exactly_what_a_read_refuses() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = SnapshotFile::new(dir.path()).expect("new");
        assert!(SnapshotFile::check(dir.path()).expect("check").is_none());
        file.write(b"{\"m\":3}", &[7u8; 300]).expect("write");
        assert_eq!(
            SnapshotFile::check(dir.path()).expect("check").as_deref(),
            Some(&b"{\"m\":3}"[..])
        );
        let path = dir.path().join(FILE);
        let good = std::fs::read(&path).expect("bytes");
        let mut damaged: Vec<Vec<u8>> = Vec::new();
        for at in 0..good.len() {
            let mut bytes = good.clone();
            bytes[at] ^= 0x20;
            damaged.push(bytes);
        }
        for len in 0..good.len() {
            damaged.push(good[..len].to_vec());
        }
        let mut longer = good.clone();
        longer.push(0);
        damaged.push(longer);
        for bytes in damaged {
            std::fs::write(&path, &bytes).expect("write");
            let err = SnapshotFile::check(dir.path()).expect_err("damage passed the check");
            assert_eq!(err.kind(), io::ErrorKind::InvalidData);
            let read = file.read().expect_err("damage passed the read");
            assert!(err.to_string().contains("snapshot.bin is corrupt"), "{err}");
            // The same words for the same damage, but for which of
            // "truncated" and "checksum mismatch" a cut file gets.
            let kind = |e: &io::Error| e.to_string().contains("bad magic");
            assert_eq!(kind(&err), kind(&read), "{err} / {read}");
        }
    }

    #[test]
    fn a_streamed_snapshot_reads_back_as_the_frame_it_would_have_been() {
        // Longer than two sync chunks, written in odd-sized pieces.
        let dir = tempfile::tempdir().expect("tempdir");
        let file = SnapshotFile::new(dir.path()).expect("new");
        let data: Vec<u8> = (0..(2 * SYNC_EVERY + 12_345))
            .map(|i| (i * 31 % 251) as u8)
            .collect();
        let len = file
            .write_with(b"{\"m\":2}", |out| {
                data.chunks(7_777)
                    .try_for_each(|piece| out.write_all(piece))
            })
            .expect("write");
        assert_eq!(len, data.len() as u64);
        let (meta, back) = file.read().expect("read").expect("some");
        assert_eq!(meta, b"{\"m\":2}");
        assert!(back == data, "the data read back differs");
        assert_eq!(
            std::fs::read(dir.path().join(FILE)).expect("bytes"),
            meshwork_core::frame::encode_frame(MAGIC, b"{\"m\":2}", &data),
            "not byte for byte the frame encode_frame makes"
        );
        // An encoder that fails leaves the previous snapshot in place.
        let failed = file.write_with(b"{}", |out| {
            out.write_all(b"partial")?;
            Err(io::Error::other("encoder failed"))
        });
        assert!(failed.is_err());
        let (meta, _) = file.read().expect("read").expect("some");
        assert_eq!(meta, b"{\"m\":2}");
    }
}
