//! The Raft metadata file (`raft-meta` in the data dir): one small payload
//! (the log store's vote, committed index and purge point, as JSON),
//! replaced whole on each write and durable when [`MetaFile::write`]
//! returns. Owns only the bytes on disk: it does not know what the payload
//! means (`raft::log_store` does) nor judge it against the log
//! ([`super::meta_check`] does).
//!
//! Why not sled (which held these before): sled reads a record that fails
//! its checksum as the end of its log and opens on what came before it,
//! silently, and a copy of its files taken while its background threads
//! run is not one it can open, so the power-loss seam could not revert it.
//! This file is written only by us, only through [`super::durable`].
//!
//! Layout: two slots of [`SLOT`] bytes, written alternately (the write with
//! sequence number `seq` goes to slot `seq % 2`). A slot is
//! `magic: 8 | version: u32 LE | seq: u64 LE | len: u32 LE |
//! crc32(version ‖ seq ‖ len ‖ payload): u32 LE | payload`, zero-padded.
//! A write never touches the slot holding the current state, so a crash or
//! power loss in the middle of one leaves the previous state intact in the
//! other slot: on open, the valid slot with the higher sequence wins, and
//! a torn one beside it is what such a crash leaves. Both slots invalid is
//! damage: refused (`InvalidData`), never read as empty.
//!
//! Creation writes both slots to `raft-meta.tmp`, syncs it, renames it into
//! place and syncs the directory, so a `raft-meta` that exists was written
//! whole; a crash before the rename leaves only the temp file, which the
//! next creation replaces.
//!
//! What it cannot see: a slot whose bits flipped while the other still
//! holds the previous state opens on that previous state (checksums find
//! damage, not which write came last); [`super::meta_check`] refuses it
//! when the log or the snapshot proves a later vote.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::durable;

/// The file's name in the data dir.
pub const FILE: &str = "raft-meta";
/// Size of each slot; the file is two of them.
pub const SLOT: usize = 4096;
const MAGIC: &[u8; 8] = b"MWRAFTMD";
const VERSION: u32 = 1;
const HEADER: usize = 8 + 4 + 8 + 4 + 4;
/// The largest payload a slot holds.
pub const MAX_PAYLOAD: usize = SLOT - HEADER;

/// The open file and the sequence number of the state it holds.
#[derive(Debug)]
pub struct MetaFile {
    file: File,
    /// The sequence number of the latest write; the next goes to the
    /// other slot.
    seq: u64,
}

/// What [`MetaFile::read_slots`] finds: the latest valid slot's sequence
/// and payload, and why the other slot is invalid if it is.
type Slots = (u64, Vec<u8>, Option<String>);

impl MetaFile {
    /// Reads the file at `path` without writing anything: `Ok(None)` when
    /// there is none, its latest payload otherwise, `InvalidData` when
    /// neither slot is valid. (An invalid slot beside a valid one is
    /// logged when the file is opened, not here: the start-up check reads
    /// it just before.)
    pub fn read(path: &Path) -> io::Result<Option<Vec<u8>>> {
        Ok(Self::read_slots(path)?.map(|(_, payload, _)| payload))
    }

    /// Opens the file at `path`, creating it with `initial` if there is
    /// none (durably: the file and its name). Returns the file and its
    /// latest payload.
    pub fn open_or_create(path: &Path, initial: &[u8]) -> io::Result<(Self, Vec<u8>)> {
        if let Some((seq, payload, invalid)) = Self::read_slots(path)? {
            if let Some(why) = invalid {
                // A crash in the middle of a write leaves this; so would
                // damage, which the other slot outlives.
                tracing::warn!(path = %path.display(), seq, reason = %why, "one slot of the raft metadata file is invalid; the other is used");
            }
            let file = std::fs::OpenOptions::new().write(true).open(path)?;
            return Ok((Self { file, seq }, payload));
        }
        Ok((Self::create(path, initial)?, initial.to_vec()))
    }

    /// Replaces the payload; durable when this returns. On an error the
    /// state on disk is the previous one or this one: the caller must not
    /// assume either (openraft stops on a storage error).
    pub fn write(&mut self, payload: &[u8]) -> io::Result<()> {
        let seq = self.seq + 1;
        let slot = encode(seq, payload)?;
        let offset = slot_offset(seq);
        self.file.write_all_at(&slot, offset)?;
        durable::wrote(&self.file, offset, SLOT as u64);
        durable::sync_data(&self.file)?;
        self.seq = seq;
        Ok(())
    }

    fn create(path: &Path, initial: &[u8]) -> io::Result<Self> {
        let tmp = tmp_path(path);
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)?;
        // Slot 0 holds seq 0 and slot 1 seq 1, the same payload in both:
        // the first write (seq 2) then has a valid slot to fall back on.
        let mut both = encode(0, initial)?;
        both.extend_from_slice(&encode(1, initial)?);
        file.write_all_at(&both, 0)?;
        durable::wrote(&file, 0, both.len() as u64);
        durable::sync_data(&file)?;
        std::fs::rename(&tmp, path)?;
        durable::sync_dir(parent(path))?;
        Ok(Self { file, seq: 1 })
    }

    /// The latest valid slot's (seq, payload, why the other slot is
    /// invalid if it is), `None` when the file does not exist.
    fn read_slots(path: &Path) -> io::Result<Option<Slots>> {
        let bytes = match std::fs::read(path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        let slots = [0, 1].map(|i| decode(&bytes, i));
        let best = slots
            .iter()
            .filter_map(|s| s.as_ref().ok())
            .max_by_key(|(seq, _)| *seq)
            .cloned();
        let [first, second] = &slots;
        match best {
            Some((seq, payload)) => {
                let invalid = first.as_ref().err().or(second.as_ref().err()).cloned();
                Ok(Some((seq, payload, invalid)))
            }
            None => Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "neither slot is valid (first: {}; second: {})",
                    first.as_ref().err().map_or("", String::as_str),
                    second.as_ref().err().map_or("", String::as_str),
                ),
            )),
        }
    }

    /// A write torn by a power loss (tests): only the first `keep` bytes
    /// of the next slot reach the disk (synced), and the write is not
    /// counted as done.
    #[cfg(test)]
    pub(crate) fn torn_write(&mut self, payload: &[u8], keep: usize) -> io::Result<()> {
        let seq = self.seq + 1;
        let slot = encode(seq, payload)?;
        let offset = slot_offset(seq);
        let kept = &slot[..keep.min(SLOT)];
        self.file.write_all_at(kept, offset)?;
        durable::wrote(&self.file, offset, kept.len() as u64);
        durable::sync_data(&self.file)
    }
}

fn parent(path: &Path) -> &Path {
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    }
}

fn tmp_path(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".tmp");
    PathBuf::from(name)
}

fn slot_offset(seq: u64) -> u64 {
    (seq % 2) * SLOT as u64
}

fn checksum(seq: u64, payload: &[u8]) -> u32 {
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&VERSION.to_le_bytes());
    hasher.update(&seq.to_le_bytes());
    hasher.update(&(payload.len() as u32).to_le_bytes());
    hasher.update(payload);
    hasher.finalize()
}

/// One slot's bytes (padded to [`SLOT`]) holding `payload` as write `seq`.
pub(crate) fn encode(seq: u64, payload: &[u8]) -> io::Result<Vec<u8>> {
    if payload.len() > MAX_PAYLOAD {
        return Err(io::Error::other(format!(
            "raft metadata of {} bytes (at most {MAX_PAYLOAD})",
            payload.len()
        )));
    }
    let mut slot = Vec::with_capacity(SLOT);
    slot.extend_from_slice(MAGIC);
    slot.extend_from_slice(&VERSION.to_le_bytes());
    slot.extend_from_slice(&seq.to_le_bytes());
    slot.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    slot.extend_from_slice(&checksum(seq, payload).to_le_bytes());
    slot.extend_from_slice(payload);
    slot.resize(SLOT, 0);
    Ok(slot)
}

/// Slot `index` of the file's `bytes`: its (seq, payload), or why not.
fn decode(bytes: &[u8], index: usize) -> Result<(u64, Vec<u8>), String> {
    let start = index * SLOT;
    let slot = bytes
        .get(start..)
        .map(|rest| &rest[..rest.len().min(SLOT)])
        .unwrap_or_default();
    let field = |from: usize, to: usize| -> Result<&[u8], String> {
        slot.get(from..to)
            .ok_or_else(|| format!("cut short at {} bytes", slot.len()))
    };
    let u32_at = |at: usize| -> Result<u32, String> {
        let mut b = [0u8; 4];
        b.copy_from_slice(field(at, at + 4)?);
        Ok(u32::from_le_bytes(b))
    };
    if field(0, 8)? != MAGIC {
        return Err("no magic number".to_owned());
    }
    let version = u32_at(8)?;
    if version != VERSION {
        return Err(format!(
            "format version {version}, this binary reads {VERSION}"
        ));
    }
    let mut seq = [0u8; 8];
    seq.copy_from_slice(field(12, 20)?);
    let seq = u64::from_le_bytes(seq);
    let len = u32_at(20)? as usize;
    if len > MAX_PAYLOAD {
        return Err(format!("length {len} past the slot"));
    }
    let crc = u32_at(24)?;
    let payload = field(HEADER, HEADER + len)?;
    if checksum(seq, payload) != crc {
        return Err("checksum mismatch".to_owned());
    }
    if slot_offset(seq) != start as u64 {
        return Err(format!("write {seq} found in the wrong slot"));
    }
    Ok((seq, payload.to_vec()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flip(path: &Path, offset: usize) {
        let mut bytes = std::fs::read(path).expect("read");
        bytes[offset] ^= 0x20;
        std::fs::write(path, bytes).expect("write");
    }

    #[test]
    fn the_latest_write_is_read_back_and_one_damaged_slot_falls_back() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(FILE);
        assert_eq!(MetaFile::read(&path).expect("read"), None, "no file yet");
        let (mut file, first) = MetaFile::open_or_create(&path, b"zero").expect("create");
        assert_eq!(first, b"zero");
        assert!(!tmp_path(&path).exists(), "the temp file was renamed");
        for n in 1..=5u8 {
            file.write(format!("write {n}").as_bytes()).expect("write");
            assert_eq!(
                MetaFile::read(&path).expect("read"),
                Some(format!("write {n}").into_bytes())
            );
        }
        drop(file);
        // Write 6 (seq 7) is in slot 1: damaged, write 5 (seq 6, slot 0)
        // is read.
        let (mut file, _) = MetaFile::open_or_create(&path, b"unused").expect("open");
        file.write(b"write 6").expect("write");
        drop(file);
        flip(&path, SLOT + HEADER + 2);
        assert_eq!(
            MetaFile::read(&path).expect("read"),
            Some(b"write 5".to_vec())
        );
        // The next write goes to the damaged slot, never over the good one.
        let (mut file, payload) = MetaFile::open_or_create(&path, b"unused").expect("open");
        assert_eq!(payload, b"write 5");
        file.write(b"write 7").expect("write");
        drop(file);
        assert_eq!(
            MetaFile::read(&path).expect("read"),
            Some(b"write 7".to_vec())
        );
        // Both damaged: refused, and the file is left as it is.
        flip(&path, HEADER + 1);
        flip(&path, SLOT + 3);
        let damaged = std::fs::read(&path).expect("read");
        let err = MetaFile::read(&path).expect_err("both slots damaged");
        assert_eq!(err.kind(), io::ErrorKind::InvalidData, "{err}");
        assert!(err.to_string().contains("neither slot"), "{err}");
        let err = MetaFile::open_or_create(&path, b"x").expect_err("not recreated");
        assert_eq!(err.kind(), io::ErrorKind::InvalidData, "{err}");
        assert_eq!(std::fs::read(&path).expect("read"), damaged);
    }

    #[test]
    fn garbage_and_empty_files_are_refused_never_read_as_empty() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(FILE);
        for bytes in [Vec::new(), vec![0u8; 2 * SLOT], b"{\"vote\":null}".to_vec()] {
            std::fs::write(&path, &bytes).expect("write");
            let err = MetaFile::open_or_create(&path, b"x").expect_err("refused");
            assert_eq!(err.kind(), io::ErrorKind::InvalidData, "{err}");
            assert_eq!(std::fs::read(&path).expect("read"), bytes);
        }
    }

    #[test]
    fn a_slot_copied_into_the_other_place_is_invalid() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(FILE);
        let mut bytes = encode(3, b"three").expect("encode");
        bytes.extend_from_slice(&encode(3, b"three").expect("encode"));
        std::fs::write(&path, &bytes).expect("write");
        assert_eq!(
            MetaFile::read(&path).expect("read"),
            Some(b"three".to_vec())
        );
        std::fs::write(&path, &bytes[..SLOT]).expect("write");
        assert!(MetaFile::read(&path).is_err(), "seq 3 belongs in slot 1");
    }

    #[test]
    fn an_oversized_payload_is_an_error_not_a_torn_slot() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(FILE);
        let (mut file, _) = MetaFile::open_or_create(&path, b"ok").expect("create");
        assert!(file.write(&vec![b'x'; MAX_PAYLOAD + 1]).is_err());
        file.write(&vec![b'x'; MAX_PAYLOAD])
            .expect("the largest fits");
        assert_eq!(
            MetaFile::read(&path).expect("read"),
            Some(vec![b'x'; MAX_PAYLOAD])
        );
    }
}
