//! The write-ahead log that holds the Raft log entries: append-only segment
//! files that are zero-filled before first use.
//!
//! Why not sled (which kept all Raft data in earlier builds): an
//! append to a file that grows changes the file's size, so every
//! `fdatasync` also commits the filesystem journal, and on one disk the
//! journal commits of the three servers (and sled's own extra
//! `sync_file_range` calls) queue behind each other. Overwriting
//! zero-filled blocks needs no metadata change, so a flush is one data
//! write. (etcd preallocates its WAL segments for the same reason.)
//!
//! Layout: `wal-<seq>.seg` files (16 hex digits, increasing). Each record is
//! `len: u32 LE | crc32(seq ‖ index ‖ payload): u32 LE | index: u64 LE |
//! payload`; a zero header ends a segment's records (written explicitly
//! when a segment is closed). Indexes are consecutive within a segment; a
//! new segment may start past a purged gap.
//!
//! Segments are recycled: one that holds only purged records becomes the
//! spare (`wal.spare`) that the next roll-over renames into place, so in
//! steady state no new blocks are allocated at all. Its old records fail
//! the checksum (it includes the segment's seq), so they read as the end
//! of the log. Only when there is nothing to recycle is a spare zero-filled,
//! in the background.
//!
//! Crash safety: records are written in order and only acknowledged after
//! `fdatasync`; a segment is synced before the next one receives a record.
//! So a crash can leave one thing only: a torn tail, an incomplete last
//! record (or last batch) in the last segment. Recovery decides before it
//! writes anything. An invalid record is a torn tail when it is in the last
//! segment, nothing valid for this segment follows it anywhere (the search
//! looks at every offset, so a damaged length field cannot hide what
//! comes after), and dropping it loses no index at or below the committed
//! index recorded in the metadata: then its remains are zeroed and the log
//! ends before it. Anything else is corruption: the log refuses to open,
//! changes nothing, and names the segment, the offset and the index (see
//! [`Damage`]).

use std::collections::VecDeque;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use super::drop_cache;

/// Default size of a segment file.
pub const DEFAULT_SEGMENT_SIZE: u64 = 16 * 1024 * 1024;
const HEADER: usize = 16;
/// Refuses records this large (a batch of 256 commands of 512 KiB values
/// in JSON stays below it).
const MAX_RECORD: usize = 1 << 30;
pub(crate) const SPARE: &str = "wal.spare";
/// How long a roll-over's steps took, each counted from its start.
#[derive(Debug, Default)]
struct RollOver {
    sync_old: std::time::Duration,
    new_segment: std::time::Duration,
    sync_dir: std::time::Duration,
    no_spare: bool,
}

/// A segment roll-over slower than this is logged as a warning.
const SLOW_ROLL_OVER: std::time::Duration = std::time::Duration::from_millis(20);
pub(crate) const SPARE_TMP: &str = "wal.spare.tmp";
const ZERO_CHUNK: usize = 1 << 20;

/// Where one record lives.
#[derive(Debug, Clone, Copy)]
struct Pos {
    seq: u64,
    offset: u64,
    len: u32,
}

#[derive(Debug)]
struct Segment {
    seq: u64,
    file: Arc<File>,
    /// Where the next record goes.
    end: u64,
    /// Index of the last record written in this segment.
    last_index: Option<u64>,
}

#[derive(Debug)]
struct State {
    segments: VecDeque<Segment>,
    /// `positions[i]` holds index `first + i`.
    positions: VecDeque<Pos>,
    first: u64,
    /// Files written since the last sync.
    dirty: Vec<Arc<File>>,
}

/// The log. All methods take `&self`; clones of the `Arc` share it.
#[derive(Debug)]
pub struct Wal {
    dir: PathBuf,
    segment_size: u64,
    state: Mutex<State>,
    spare_in_progress: Arc<AtomicBool>,
    /// The thread making the spare, joined on drop so that a closed log
    /// leaves no writer behind in its directory (a reopen would race it).
    spare_thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

/// What recovery found, for the log.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Recovery {
    pub segments: usize,
    pub records: usize,
    /// Bytes of a torn tail that were zeroed.
    pub torn_bytes: u64,
    /// Where the torn tail began, and what was wrong with it.
    pub torn_at: Option<(PathBuf, u64, String)>,
}

fn segment_name(seq: u64) -> String {
    format!("wal-{seq:016x}.seg")
}

fn parse_segment_name(name: &str) -> Option<u64> {
    let hex = name.strip_prefix("wal-")?.strip_suffix(".seg")?;
    if hex.len() != 16 {
        return None;
    }
    u64::from_str_radix(hex, 16).ok()
}

fn checksum(seq: u64, index: u64, payload: &[u8]) -> u32 {
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&seq.to_le_bytes());
    hasher.update(&index.to_le_bytes());
    hasher.update(payload);
    hasher.finalize()
}

fn corrupt(msg: String) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, msg)
}

/// Corruption found on open: where, and why it is not a torn write. The
/// log was left as it was.
#[derive(Debug, thiserror::Error)]
#[error(
    "{segment}: {reason} at offset {offset} (the record for index {index}), and {why}: \
     the log is damaged, not torn by a crash; nothing was changed"
)]
pub struct Damage {
    pub segment: String,
    pub offset: u64,
    /// The index the damaged record should hold.
    pub index: u64,
    pub reason: String,
    /// What proves it is not a torn tail.
    pub why: String,
}

/// The first record after `from` that is valid for segment `seq` and
/// carries an index in `(after, after + 2^20]`: proof that the log goes on
/// past a damaged record. Every offset is tried (a damaged length cannot
/// say where the next record starts); the index filter keeps the checksum
/// work to real candidates, and records of a recycled segment's earlier
/// life fail the checksum (it covers `seq`).
fn valid_record_after(
    file: &File,
    seq: u64,
    from: u64,
    file_len: u64,
    after: u64,
) -> std::io::Result<Option<(u64, u64)>> {
    if from >= file_len {
        return Ok(None);
    }
    let mut rest = vec![0u8; (file_len - from) as usize];
    file.read_exact_at(&mut rest, from)?;
    let window = 1u64 << 20;
    for at in 0..rest.len().saturating_sub(HEADER - 1) {
        let header = &rest[at..at + HEADER];
        let mut index_bytes = [0u8; 8];
        index_bytes.copy_from_slice(&header[8..16]);
        let index = u64::from_le_bytes(index_bytes);
        if index <= after || index - after > window {
            continue;
        }
        let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as usize;
        if len == 0 || len > MAX_RECORD || at + HEADER + len > rest.len() {
            continue;
        }
        let crc = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
        if checksum(seq, index, &rest[at + HEADER..at + HEADER + len]) == crc {
            return Ok(Some((from + at as u64, index)));
        }
    }
    Ok(None)
}

use super::durable::{self, sync_dir};

/// Writes `len` zero bytes at `offset`.
fn zero_range(file: &File, offset: u64, len: u64) -> std::io::Result<()> {
    let zeros = vec![0u8; ZERO_CHUNK.min(len as usize).max(1)];
    let mut done = 0u64;
    while done < len {
        let n = (len - done).min(zeros.len() as u64) as usize;
        file.write_all_at(&zeros[..n], offset + done)?;
        durable::wrote(file, offset + done, n as u64);
        done += n as u64;
    }
    Ok(())
}

/// The spare is zero-filled and synced this much at a time, so that at
/// most this much of it waits ahead of a log sync on the same disk
/// (written in one go, a whole segment of zeros held up the appends behind it).
const SPARE_SYNC_EVERY: u64 = 4 << 20;

/// Creates `wal.spare`: a zero-filled, synced file of `size` bytes.
/// Runs on a thread of its own (see `prepare_spare`).
fn make_spare(dir: &Path, size: u64) -> std::io::Result<()> {
    let tmp = dir.join(SPARE_TMP);
    let file = File::create(&tmp)?;
    let mut done = 0;
    while done < size {
        let n = (size - done).min(SPARE_SYNC_EVERY);
        zero_range(&file, done, n)?;
        // These syncs are for latency, not safety (storage::power_loss
        // passes without them): a spare cut short by a power loss is
        // still whole where it matters, since the segment made from it is
        // synced with its records, length and blocks included. Synced
        // here, its blocks are allocated and zeroed ahead of time, so the
        // appends' syncs write data only.
        durable::sync_data(&file)?;
        done += n;
    }
    durable::sync_all(&file)?;
    drop_cache(&file);
    drop(file);
    std::fs::rename(&tmp, dir.join(SPARE))?;
    sync_dir(dir)
}

/// One segment's records, read in order.
struct Scanned {
    records: Vec<(u64, Pos)>,
    /// Offset after the last valid record.
    end: u64,
    /// Why the scan stopped before the zeroed end, if it did.
    invalid: Option<String>,
    file_len: u64,
}

fn scan_segment(file: &File, seq: u64) -> std::io::Result<Scanned> {
    let file_len = file.metadata()?.len();
    let mut reader = std::io::BufReader::with_capacity(1 << 20, file);
    reader.seek(SeekFrom::Start(0))?;
    let mut records = Vec::new();
    let mut offset = 0u64;
    let mut payload = Vec::new();
    let mut prev: Option<u64> = None;
    let invalid = loop {
        if offset + HEADER as u64 > file_len {
            break None;
        }
        let mut header = [0u8; HEADER];
        reader.read_exact(&mut header)?;
        let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
        if len == 0 {
            break if header.iter().all(|b| *b == 0) {
                None
            } else {
                Some("bad record header".to_owned())
            };
        }
        let crc = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
        let mut index_bytes = [0u8; 8];
        index_bytes.copy_from_slice(&header[8..16]);
        let index = u64::from_le_bytes(index_bytes);
        let total = HEADER as u64 + u64::from(len);
        if len as usize > MAX_RECORD || offset + total > file_len {
            break Some("record runs past the end of the segment".to_owned());
        }
        payload.resize(len as usize, 0);
        reader.read_exact(&mut payload)?;
        if checksum(seq, index, &payload) != crc {
            break Some("checksum mismatch".to_owned());
        }
        if let Some(p) = prev
            && index != p + 1
        {
            break Some(format!("index {index} does not follow {p}"));
        }
        records.push((index, Pos { seq, offset, len }));
        prev = Some(index);
        offset += total;
    };
    Ok(Scanned {
        records,
        end: offset,
        invalid,
        file_len,
    })
}

/// The log's segments as read, once judged sound (a torn tail at most).
struct Judged {
    segments: Vec<(u64, PathBuf, File, Scanned)>,
    /// A half-made spare left by a crash, to remove.
    spare_tmp: Option<PathBuf>,
}

/// Reads every segment and decides, writing nothing: the log is sound (a
/// torn tail at most, see the module docs), or `Err` naming the damage.
fn judge(dir: &Path, purged: Option<u64>, committed: Option<u64>) -> std::io::Result<Judged> {
    let mut seqs = Vec::new();
    let mut spare_tmp = None;
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name == SPARE_TMP {
            // Left by a crash while the spare was being made: removed
            // once the log is known to be sound.
            spare_tmp = Some(entry.path());
        } else if let Some(seq) = parse_segment_name(&name) {
            seqs.push(seq);
        }
    }
    seqs.sort_unstable();
    // First read everything and decide; nothing is written before the
    // whole log has been judged.
    let mut scanned_segments = Vec::with_capacity(seqs.len());
    let mut last_index: Option<u64> = purged;
    let count = seqs.len();
    // A log with no segment at all (a healthy one always keeps one) whose
    // metadata says entries past the purge point were committed lost them.
    if count == 0
        && let Some(c) = committed
        && purged.is_none_or(|p| c > p)
    {
        return Err(corrupt(format!(
            "{}: the raft log holds no segment, but index {c} was committed: the log is \
             damaged, not torn by a crash; nothing was changed",
            dir.display()
        )));
    }
    for (i, seq) in seqs.iter().copied().enumerate() {
        let path = dir.join(segment_name(seq));
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)?;
        let scanned = scan_segment(&file, seq)?;
        let kept_last = scanned.records.last().map(|(i, _)| *i).or(last_index);
        if let Some(reason) = &scanned.invalid {
            let after = kept_last.unwrap_or(0);
            let damage = |why: String| Damage {
                segment: path.display().to_string(),
                offset: scanned.end,
                index: after + 1,
                reason: reason.clone(),
                why,
            };
            if i + 1 != count {
                let why = format!("{} later segment(s) hold more of the log", count - i - 1);
                return Err(corrupt(damage(why).to_string()));
            }
            if let Some((offset, index)) =
                valid_record_after(&file, seq, scanned.end + 1, scanned.file_len, after)?
            {
                let why = format!("a valid record for index {index} follows at offset {offset}");
                return Err(corrupt(damage(why).to_string()));
            }
            if let Some(c) = committed
                && c > after
            {
                let why = format!(
                    "index {c} was committed: dropping the rest would lose committed entries"
                );
                return Err(corrupt(damage(why).to_string()));
            }
        }
        last_index = kept_last;
        scanned_segments.push((seq, path, file, scanned));
    }
    // A log that ends cleanly but short of the committed index lost
    // records at a boundary (a cut file): as damaged.
    if let (Some(c), Some((seq, path, _, scanned))) = (committed, scanned_segments.last())
        && last_index.is_none_or(|l| c > l)
    {
        let after = last_index.unwrap_or(0);
        return Err(corrupt(
            Damage {
                segment: path.display().to_string(),
                offset: scanned.end,
                index: after + 1,
                reason: format!("segment {seq:x} ends"),
                why: format!("index {c} was committed: the log lost committed entries"),
            }
            .to_string(),
        ));
    }
    Ok(Judged {
        segments: scanned_segments,
        spare_tmp,
    })
}

impl Wal {
    /// Judges the log in `dir` without writing anything (nor opening the
    /// metadata store, which writes on open): `Err` when it is damaged
    /// beyond a torn tail, by the proofs that need no metadata (a later
    /// segment, or a valid record after the damage). A missing directory
    /// is an empty log. Returns the log's last record (index, payload),
    /// for the checks of the metadata against the log.
    pub fn check(dir: &Path) -> std::io::Result<Option<(u64, Vec<u8>)>> {
        if !dir.exists() {
            return Ok(None);
        }
        let judged = judge(dir, None, None)?;
        let last = judged
            .segments
            .iter()
            .rev()
            .find_map(|(_, _, file, scanned)| {
                let (index, pos) = scanned.records.last()?;
                Some((file, *index, *pos))
            });
        let Some((file, index, pos)) = last else {
            return Ok(None);
        };
        // Its checksum was verified by the scan.
        let mut payload = vec![0u8; pos.len as usize];
        file.read_exact_at(&mut payload, pos.offset + HEADER as u64)?;
        Ok(Some((index, payload)))
    }

    /// Opens (creating if needed) the log in `dir`. Records at or below
    /// `purged` may be missing (they were purged); a gap anywhere else is
    /// corruption. `committed` (the metadata's committed index, if known)
    /// is a floor: a torn tail may not take the log below it.
    pub fn open(
        dir: &Path,
        segment_size: u64,
        purged: Option<u64>,
        committed: Option<u64>,
    ) -> std::io::Result<(Self, Recovery)> {
        std::fs::create_dir_all(dir)?;
        let Judged {
            segments: scanned_segments,
            spare_tmp,
        } = judge(dir, purged, committed)?;
        if let Some(tmp) = spare_tmp {
            match std::fs::remove_file(tmp) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
        }
        let mut recovery = Recovery::default();
        let mut segments = VecDeque::new();
        let mut positions: VecDeque<Pos> = VecDeque::new();
        let mut first = 0u64;
        for (seq, path, file, scanned) in scanned_segments {
            if let Some((first_index, _)) = scanned.records.first() {
                let expected = first + positions.len() as u64;
                if !positions.is_empty() && *first_index != expected {
                    let last = expected - 1;
                    if *first_index < expected || purged.is_none_or(|p| p < last) {
                        return Err(corrupt(format!(
                            "{}: starts at index {first_index} but the previous segment ends at {last}; nothing was changed",
                            path.display()
                        )));
                    }
                    positions.clear();
                }
                if positions.is_empty() {
                    first = *first_index;
                }
            }
            recovery.records += scanned.records.len();
            let last_index = scanned.records.last().map(|(i, _)| *i);
            positions.extend(scanned.records.iter().map(|(_, p)| *p));
            segments.push_back(Segment {
                seq,
                file: Arc::new(file),
                end: scanned.end,
                last_index,
            });
            if let Some(reason) = &scanned.invalid {
                recovery.torn_bytes = scanned.file_len - scanned.end;
                recovery.torn_at = Some((path, scanned.end, reason.clone()));
            }
        }
        // Index continuity is settled: only now is a proven torn tail
        // zeroed (the last segment's; see the module docs).
        if let (Some((path, offset, reason)), Some(last)) = (&recovery.torn_at, segments.back()) {
            tracing::warn!(
                segment = %path.display(),
                offset,
                reason = %reason,
                zeroed_bytes = recovery.torn_bytes,
                "the log ends with a torn write (a crash while appending, never acknowledged); dropping it"
            );
            zero_range(&last.file, *offset, recovery.torn_bytes)?;
            // Keeps the disk as the log now sees it. Not needed for
            // safety: a torn tail that a power loss brings back is judged
            // torn again at the next start (no record after it was synced).
            durable::sync_data(&last.file)?;
        }
        for segment in &segments {
            drop_cache(&segment.file);
        }
        recovery.segments = segments.len();
        let wal = Self {
            dir: dir.to_owned(),
            segment_size,
            state: Mutex::new(State {
                segments,
                positions,
                first,
                dirty: Vec::new(),
            }),
            spare_in_progress: Arc::new(AtomicBool::new(false)),
            spare_thread: Mutex::new(None),
        };
        if let Some(p) = purged {
            wal.purge(p)?;
        }
        {
            let mut state = wal.lock();
            if state.segments.is_empty() {
                wal.roll_over(&mut state)?;
            }
        }
        wal.prepare_spare();
        Ok((wal, recovery))
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves positions consistent with
        // the files (they are updated after each write), so keep going.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts zero-filling the next spare segment unless one exists or is
    /// being made.
    fn prepare_spare(&self) {
        if self.dir.join(SPARE).exists() || self.spare_in_progress.swap(true, Ordering::AcqRel) {
            return;
        }
        let (dir, size, flag) = (
            self.dir.clone(),
            self.segment_size,
            Arc::clone(&self.spare_in_progress),
        );
        let spawned = std::thread::Builder::new()
            .name("raft-wal-spare".into())
            .spawn(move || {
                // Background work: the appends' syncs go first.
                super::lower_this_threads_priority();
                if let Err(e) = make_spare(&dir, size) {
                    tracing::warn!(error = %e, "could not prepare a spare log segment");
                }
                flag.store(false, Ordering::Release);
            });
        match spawned {
            Ok(handle) => {
                let previous = self
                    .spare_thread
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .replace(handle);
                // The flag was clear, so the previous thread has finished.
                if let Some(previous) = previous {
                    let _ = previous.join();
                }
            }
            Err(_) => self.spare_in_progress.store(false, Ordering::Release),
        }
    }

    /// Makes a new (zero-filled) segment the one appended to. The current
    /// one is synced first, so that records never become durable out of
    /// order across segments.
    fn roll_over(&self, state: &mut State) -> std::io::Result<RollOver> {
        let mut took = RollOver::default();
        let started = std::time::Instant::now();
        if let Some(current) = state.segments.back() {
            // Close it with an explicit end (a recycled file holds old
            // bytes past the last record), unless the file ends there.
            let file_len = current.file.metadata()?.len();
            if current.end + HEADER as u64 <= file_len {
                current.file.write_all_at(&[0u8; HEADER], current.end)?;
                durable::wrote(&current.file, current.end, HEADER as u64);
            }
            durable::sync_data(&current.file)?;
        }
        took.sync_old = started.elapsed();
        let seq = state.segments.back().map_or(1, |s| s.seq + 1);
        let path = self.dir.join(segment_name(seq));
        let spare = self.dir.join(SPARE);
        if spare.exists() && !self.spare_in_progress.load(Ordering::Acquire) {
            std::fs::rename(&spare, &path)?;
        } else {
            took.no_spare = true;
            let file = File::create(&path)?;
            zero_range(&file, 0, self.segment_size)?;
            // For latency, as the spare's syncs (see `make_spare`).
            durable::sync_all(&file)?;
            drop_cache(&file);
        }
        took.new_segment = started.elapsed();
        sync_dir(&self.dir)?;
        took.sync_dir = started.elapsed();
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)?;
        state.segments.push_back(Segment {
            seq,
            file: Arc::new(file),
            end: 0,
            last_index: None,
        });
        self.remove_unused_segments(state)?;
        self.prepare_spare();
        Ok(took)
    }

    /// Recycles as the spare, or deletes, the segments (never the current
    /// one) that hold no live record.
    fn remove_unused_segments(&self, state: &mut State) -> std::io::Result<()> {
        let oldest_live = state.positions.front().map(|p| p.seq);
        let mut removed = false;
        while state.segments.len() > 1 {
            let seq = state.segments[0].seq;
            if oldest_live.is_some_and(|live| live <= seq) {
                break;
            }
            let Some(segment) = state.segments.pop_front() else {
                break;
            };
            let path = self.dir.join(segment_name(seq));
            let spare = self.dir.join(SPARE);
            let recyclable = segment.file.metadata()?.len() == self.segment_size
                && !spare.exists()
                && !self.spare_in_progress.load(Ordering::Acquire);
            if recyclable {
                // Synced when it was closed; its pages are clean.
                drop_cache(&segment.file);
                std::fs::rename(&path, &spare)?;
            } else {
                std::fs::remove_file(&path)?;
            }
            removed = true;
        }
        if removed {
            // Tidiness, not safety: segments that a power loss brings back
            // hold only purged records (below the purge point, never read),
            // and a recycled spare is renamed again, and that rename synced,
            // before anything is written to it (`roll_over`).
            sync_dir(&self.dir)?;
        }
        Ok(())
    }

    /// Index of the first and last record, if any.
    pub fn bounds(&self) -> Option<(u64, u64)> {
        let state = self.lock();
        let n = state.positions.len() as u64;
        (n > 0).then(|| (state.first, state.first + n - 1))
    }

    /// Appends one record (in the page cache; `take_dirty` + sync makes it
    /// durable). `index` must follow the last record, unless the log is
    /// empty.
    pub fn append(&self, index: u64, payload: &[u8]) -> std::io::Result<()> {
        if payload.is_empty() || payload.len() > MAX_RECORD {
            return Err(std::io::Error::other(format!(
                "log record of {} bytes (must be 1..={MAX_RECORD})",
                payload.len()
            )));
        }
        let len = payload.len() as u32;
        let mut state = self.lock();
        let n = state.positions.len() as u64;
        if n > 0 && index != state.first + n {
            return Err(std::io::Error::other(format!(
                "append of index {index} after {}",
                state.first + n - 1
            )));
        }
        let total = (HEADER + payload.len()) as u64;
        let needs_new = match state.segments.back() {
            None => true,
            Some(seg) => {
                (seg.end > 0 && seg.end + total > self.segment_size)
                    || seg.last_index.is_some_and(|last| index != last + 1)
            }
        };
        if needs_new {
            let started = std::time::Instant::now();
            let phases = self.roll_over(&mut state)?;
            let took = started.elapsed();
            // On the append path (openraft's core waits for it): say when
            // it is slow, and in which step (times are cumulative), so a
            // latency spike can be traced to it.
            if took > SLOW_ROLL_OVER {
                tracing::warn!(
                    took_ms = took.as_millis() as u64,
                    old_synced_ms = phases.sync_old.as_millis() as u64,
                    new_ready_ms = phases.new_segment.as_millis() as u64,
                    dir_synced_ms = phases.sync_dir.as_millis() as u64,
                    spare_was_missing = phases.no_spare,
                    "starting a new log segment held up appends"
                );
            } else {
                tracing::debug!(took_us = took.as_micros() as u64, "new log segment");
            }
        }
        let Some(seg) = state.segments.back_mut() else {
            return Err(std::io::Error::other("no log segment"));
        };
        let mut record = Vec::with_capacity(total as usize);
        record.extend_from_slice(&len.to_le_bytes());
        record.extend_from_slice(&checksum(seg.seq, index, payload).to_le_bytes());
        record.extend_from_slice(&index.to_le_bytes());
        record.extend_from_slice(payload);
        // The segment is zero-filled, so a record that runs past its
        // preallocated end (an oversized one) is the only size change.
        seg.file.write_all_at(&record, seg.end)?;
        durable::wrote(&seg.file, seg.end, total);
        let pos = Pos {
            seq: seg.seq,
            offset: seg.end,
            len,
        };
        seg.end += total;
        seg.last_index = Some(index);
        let file = Arc::clone(&seg.file);
        if n == 0 {
            state.first = index;
        }
        state.positions.push_back(pos);
        if !state.dirty.iter().any(|f| Arc::ptr_eq(f, &file)) {
            state.dirty.push(file);
        }
        Ok(())
    }

    /// Syncs the segment appended to: what a start read from disk (which a
    /// crash, unlike a power loss, leaves in the page cache) is durable.
    pub fn sync_current(&self) -> std::io::Result<()> {
        let file = self.lock().segments.back().map(|s| Arc::clone(&s.file));
        match file {
            Some(file) => durable::sync_data(&file),
            None => Ok(()),
        }
    }

    /// The files written since the last call; syncing them makes every
    /// append made before this call durable.
    pub fn take_dirty(&self) -> Vec<Arc<File>> {
        std::mem::take(&mut self.lock().dirty)
    }

    /// Reads the payloads of `start..end` (clamped to what the log holds).
    pub fn read(&self, start: u64, end: u64) -> std::io::Result<Vec<(u64, Vec<u8>)>> {
        let wanted: Vec<(u64, Pos, Arc<File>)> = {
            let state = self.lock();
            let n = state.positions.len() as u64;
            let lo = start.max(state.first);
            let hi = end.min(state.first + n);
            let mut out = Vec::with_capacity(hi.saturating_sub(lo) as usize);
            let mut seg_iter = state.segments.iter();
            let mut seg: Option<&Segment> = None;
            for index in lo..hi {
                let pos = state.positions[(index - state.first) as usize];
                while seg.is_none_or(|s| s.seq != pos.seq) {
                    seg = seg_iter.next();
                    if seg.is_none() {
                        return Err(corrupt(format!("no segment {} for index {index}", pos.seq)));
                    }
                }
                if let Some(s) = seg {
                    out.push((index, pos, Arc::clone(&s.file)));
                }
            }
            out
        };
        let mut out = Vec::with_capacity(wanted.len());
        for (index, pos, file) in wanted {
            let mut buf = vec![0u8; HEADER + pos.len as usize];
            file.read_exact_at(&mut buf, pos.offset)?;
            let payload = buf.split_off(HEADER);
            let crc = u32::from_le_bytes([buf[4], buf[5], buf[6], buf[7]]);
            if checksum(pos.seq, index, &payload) != crc {
                return Err(corrupt(format!(
                    "log record {index} in segment {} at offset {} fails its checksum",
                    pos.seq, pos.offset
                )));
            }
            out.push((index, payload));
        }
        Ok(out)
    }

    /// Removes every record from `index` on, durably, before returning.
    pub fn truncate(&self, index: u64) -> std::io::Result<()> {
        let mut state = self.lock();
        let n = state.positions.len() as u64;
        if n == 0 || index >= state.first + n {
            return Ok(());
        }
        let keep = index.saturating_sub(state.first) as usize;
        let cut = state.positions[keep];
        state.positions.truncate(keep);
        let mut removed = false;
        while state.segments.back().is_some_and(|s| s.seq > cut.seq) {
            if let Some(seg) = state.segments.pop_back() {
                std::fs::remove_file(self.dir.join(segment_name(seg.seq)))?;
                removed = true;
            }
        }
        if removed {
            sync_dir(&self.dir)?;
        }
        if let Some(seg) = state.segments.back_mut() {
            zero_range(&seg.file, cut.offset, seg.end - cut.offset)?;
            durable::sync_data(&seg.file)?;
            seg.end = cut.offset;
            // A record before the cut in this segment is index - 1.
            seg.last_index = (cut.offset > 0).then(|| index - 1);
        }
        Ok(())
    }

    /// Forgets every record up to and including `index` and deletes the
    /// segments that no longer hold a live one.
    pub fn purge(&self, index: u64) -> std::io::Result<()> {
        let mut state = self.lock();
        while !state.positions.is_empty() && state.first <= index {
            state.positions.pop_front();
            state.first += 1;
        }
        if state.positions.is_empty() {
            state.first = index + 1;
        }
        self.remove_unused_segments(&mut state)
    }
}

impl Drop for Wal {
    fn drop(&mut self) {
        let handle = self
            .spare_thread
            .get_mut()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(handle) = handle {
            let _ = handle.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn payload(i: u64) -> Vec<u8> {
        format!("entry-{i}-{}", "x".repeat((i % 50) as usize)).into_bytes()
    }

    fn sync(wal: &Wal) {
        for f in wal.take_dirty() {
            durable::sync_data(&f).expect("sync");
        }
    }

    fn segment_files(dir: &Path) -> usize {
        std::fs::read_dir(dir)
            .expect("dir")
            .filter(|e| {
                let name = e.as_ref().expect("entry").file_name();
                parse_segment_name(&name.to_string_lossy()).is_some()
            })
            .count()
    }

    #[test]
    fn appends_roll_over_and_survive_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (wal, rec) = Wal::open(dir.path(), 4096, None, None).expect("open");
        assert_eq!(rec, Recovery::default());
        for i in 1..=500 {
            wal.append(i, &payload(i)).expect("append");
        }
        sync(&wal);
        assert!(segment_files(dir.path()) > 3, "rolled over");
        assert_eq!(wal.bounds(), Some((1, 500)));
        drop(wal);
        let (wal, rec) = Wal::open(dir.path(), 4096, None, None).expect("reopen");
        assert_eq!(rec.records, 500);
        assert_eq!(rec.torn_bytes, 0);
        let got = wal.read(1, 501).expect("read");
        assert_eq!(got.len(), 500);
        for (i, p) in got {
            assert_eq!(p, payload(i));
        }
        assert!(wal.append(7, b"x").is_err(), "out of order append refused");
    }

    #[test]
    fn truncate_is_durable_and_leaves_no_stale_records() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (wal, _) = Wal::open(dir.path(), 4096, None, None).expect("open");
        for i in 1..=300 {
            wal.append(i, &payload(i)).expect("append");
        }
        wal.truncate(120).expect("truncate");
        assert_eq!(wal.bounds(), Some((1, 119)));
        // Rewrite with records of the same size as before, then stop
        // earlier: the old 151.. must not come back.
        for i in 120..=150 {
            wal.append(i, &payload(i)).expect("append");
        }
        sync(&wal);
        drop(wal);
        let (wal, _) = Wal::open(dir.path(), 4096, None, None).expect("reopen");
        assert_eq!(wal.bounds(), Some((1, 150)));
        wal.truncate(1).expect("truncate all");
        assert_eq!(wal.bounds(), None);
        wal.append(1, b"again").expect("append after full truncate");
        sync(&wal);
        drop(wal);
        let (wal, _) = Wal::open(dir.path(), 4096, None, None).expect("reopen");
        assert_eq!(wal.read(1, 2).expect("read"), vec![(1, b"again".to_vec())]);
    }

    #[test]
    fn purge_deletes_old_segments_and_allows_a_gap() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (wal, _) = Wal::open(dir.path(), 4096, None, None).expect("open");
        for i in 1..=400 {
            wal.append(i, &payload(i)).expect("append");
        }
        let before = segment_files(dir.path());
        wal.purge(350).expect("purge");
        assert!(segment_files(dir.path()) < before);
        assert_eq!(wal.bounds(), Some((351, 400)));
        // A snapshot install purges past the end; the next append starts
        // after the gap.
        wal.purge(1000).expect("purge past end");
        assert_eq!(wal.bounds(), None);
        wal.append(1001, b"after gap").expect("append after gap");
        sync(&wal);
        drop(wal);
        // The segments before the gap are gone, so no purge point is needed.
        let (wal, _) = Wal::open(dir.path(), 4096, None, None).expect("reopen");
        assert_eq!(wal.bounds(), Some((1001, 1001)));
        assert_eq!(segment_files(dir.path()), 1);
    }

    #[test]
    fn recycled_segments_do_not_bring_old_records_back() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (wal, _) = Wal::open(dir.path(), 4096, None, None).expect("open");
        let mut next = 1;
        for round in 0..5 {
            for _ in 0..200 {
                wal.append(next, &payload(next)).expect("append");
                next += 1;
            }
            sync(&wal);
            wal.purge(next - 50).expect("purge");
            // A spare is there: recycled by the purge, or (when a roll-over
            // took the last one) being zero-filled in the background, which
            // on a busy machine can take a moment.
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
            while !dir.path().join(SPARE).exists() && std::time::Instant::now() < deadline {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            assert!(
                dir.path().join(SPARE).exists(),
                "round {round}: no spare segment after the purge"
            );
        }
        // Stop mid-segment: the rest of the (recycled) file is old records.
        drop(wal);
        let (wal, rec) = Wal::open(dir.path(), 4096, Some(next - 50), None).expect("reopen");
        assert_eq!(wal.bounds(), Some((next - 49, next - 1)));
        assert!(rec.records >= 49);
        for (i, p) in wal.read(next - 49, next).expect("read") {
            assert_eq!(p, payload(i));
        }
    }

    #[test]
    fn a_missing_segment_is_corruption_unless_purged() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (wal, _) = Wal::open(dir.path(), 4096, None, None).expect("open");
        for i in 1..=400 {
            wal.append(i, &payload(i)).expect("append");
        }
        sync(&wal);
        drop(wal);
        std::fs::remove_file(dir.path().join(segment_name(2))).expect("remove");
        let err = Wal::open(dir.path(), 4096, None, None).expect_err("gap refused");
        assert!(
            err.to_string().contains("previous segment ends at"),
            "{err}"
        );
        let (wal, _) = Wal::open(dir.path(), 4096, Some(390), None).expect("purged gap accepted");
        assert_eq!(wal.bounds(), Some((391, 400)));
    }

    #[test]
    fn a_closed_log_leaves_no_spare_half_made() {
        // Making a 64 MiB spare takes far longer than opening and closing;
        // without the join on drop, the spare's writer would still be at
        // work here, and a reopen could race it (CI saw ENOENT that way).
        let dir = tempfile::tempdir().expect("tempdir");
        let (wal, _) = Wal::open(dir.path(), 64 << 20, None, None).expect("open");
        drop(wal);
        assert!(
            !dir.path().join(SPARE_TMP).exists(),
            "spare still being made"
        );
        assert!(dir.path().join(SPARE).exists(), "spare finished");
        let (wal, _) = Wal::open(dir.path(), 64 << 20, None, None).expect("reopen");
        wal.append(1, b"a").expect("append");
        sync(&wal);
    }

    #[test]
    fn a_torn_tail_is_dropped_and_corruption_elsewhere_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (wal, _) = Wal::open(dir.path(), 1 << 20, None, None).expect("open");
        for i in 1..=10 {
            wal.append(i, &payload(i)).expect("append");
        }
        sync(&wal);
        let last = wal.read(10, 11).expect("read");
        drop(wal);
        let seg = dir.path().join(segment_name(1));
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(&seg)
            .expect("open seg");
        // Tear record 10: flip a payload byte.
        let len = last[0].1.len() as u64;
        let end_of_10: u64 = (1..=10)
            .map(|i| HEADER as u64 + payload(i).len() as u64)
            .sum();
        file.write_all_at(b"#", end_of_10 - len + 1).expect("tear");
        drop(file);
        let (wal, rec) = Wal::open(dir.path(), 1 << 20, None, None).expect("reopen");
        assert_eq!(wal.bounds(), Some((1, 9)));
        assert!(rec.torn_bytes > 0);
        // Roll over, then corrupt the first (no longer last) segment.
        wal.append(10, &vec![b'y'; 2 << 20])
            .expect("oversized record");
        wal.append(11, b"z").expect("append");
        sync(&wal);
        drop(wal);
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(&seg)
            .expect("open seg");
        file.write_all_at(b"#", HEADER as u64 + 2).expect("corrupt");
        drop(file);
        let err = Wal::open(dir.path(), 1 << 20, None, None).expect_err("refused");
        assert!(
            err.to_string()
                .contains("later segment(s) hold more of the log"),
            "{err}"
        );
    }

    /// Every file of the log directory, by name, with its bytes.
    fn files(dir: &Path) -> std::collections::BTreeMap<String, Vec<u8>> {
        std::fs::read_dir(dir)
            .expect("dir")
            .map(|e| {
                let e = e.expect("entry");
                let name = e.file_name().to_string_lossy().into_owned();
                (name, std::fs::read(e.path()).expect("read"))
            })
            .collect()
    }

    /// What opening a damaged copy of a log gave.
    #[derive(Debug, PartialEq, Eq)]
    enum Opened {
        /// Opened, with these records (index, payload) read back.
        Records(Vec<(u64, Vec<u8>)>),
        /// Refused; the files were left byte for byte as they were.
        Refused(String),
    }

    /// Copies the log's segments into a fresh dir, lets `damage` change the
    /// one segment file, and opens it with `committed` as the floor.
    fn open_damaged(
        segments: &std::collections::BTreeMap<String, Vec<u8>>,
        committed: Option<u64>,
        damage: impl FnOnce(&mut Vec<u8>),
    ) -> Opened {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut segments = segments.clone();
        let (_, bytes) = segments.iter_mut().next().expect("one segment");
        damage(bytes);
        for (name, bytes) in &segments {
            std::fs::write(dir.path().join(name), bytes).expect("write");
        }
        let before = files(dir.path());
        match Wal::open(dir.path(), SEGMENT, None, committed) {
            Ok((wal, _)) => Opened::Records(match wal.bounds() {
                Some((first, last)) => wal.read(first, last + 1).expect("read back"),
                None => Vec::new(),
            }),
            Err(e) => {
                assert_eq!(files(dir.path()), before, "a refusal changed files: {e}");
                Opened::Refused(e.to_string())
            }
        }
    }

    const SEGMENT: u64 = 64 << 10;

    /// A log's segment files by name, and its records (index, payload).
    type Log = (
        std::collections::BTreeMap<String, Vec<u8>>,
        Vec<(u64, Vec<u8>)>,
    );

    /// A one-segment log of `n` records; its segment files and records.
    fn small_log(n: u64, size: impl Fn(u64) -> usize) -> Log {
        let dir = tempfile::tempdir().expect("tempdir");
        let (wal, _) = Wal::open(dir.path(), SEGMENT, None, None).expect("open");
        let records: Vec<(u64, Vec<u8>)> = (1..=n)
            .map(|i| (i, vec![b'a' + (i % 26) as u8; size(i)]))
            .collect();
        for (i, payload) in &records {
            wal.append(*i, payload).expect("append");
        }
        sync(&wal);
        drop(wal);
        let segments = files(dir.path())
            .into_iter()
            .filter(|(name, _)| parse_segment_name(name).is_some())
            .collect();
        (segments, records)
    }

    /// Where each record starts, and where the records end.
    fn offsets(records: &[(u64, Vec<u8>)]) -> (Vec<usize>, usize) {
        let mut at = 0;
        let mut starts = Vec::new();
        for (_, payload) in records {
            starts.push(at);
            at += HEADER + payload.len();
        }
        (starts, at)
    }

    /// The segment reader against random damage, seeded (what the
    /// `wal_segment` fuzz target does without end): runs of random bytes,
    /// random truncations and zeroed spans anywhere in a segment. Whatever
    /// the damage: no panic, and either a refusal with the files unchanged
    /// (`open_damaged` asserts it) or a log whose records are a prefix of
    /// the written ones, all of them when every record was committed.
    #[test]
    fn random_damage_is_refused_unchanged_or_keeps_a_prefix() {
        use rand::{Rng, SeedableRng};
        let (segments, records) = small_log(8, |i| 10 + 13 * i as usize);
        let (_, end) = offsets(&records);
        let size = segments.values().next().map_or(0, Vec::len);
        let (mut kept, mut refused) = (0, 0);
        for seed in 0..400u64 {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            let committed = rng.random_bool(0.5).then_some(records.len() as u64);
            let opened = open_damaged(&segments, committed, |b| {
                for _ in 0..rng.random_range(1..4) {
                    let at = rng.random_range(0..end + 32);
                    match rng.random_range(0..3) {
                        0 => {
                            let n = rng.random_range(1..24).min(size - at);
                            rng.fill(&mut b[at..at + n]);
                        }
                        1 => b.truncate(at),
                        _ => {
                            let n = rng.random_range(1..64).min(size - at);
                            b[at..at + n].fill(0);
                        }
                    }
                    if b.len() <= at {
                        break;
                    }
                }
            });
            match opened {
                Opened::Records(got) => {
                    assert!(
                        got.len() <= records.len() && got[..] == records[..got.len()],
                        "seed {seed}: not a prefix of what was written"
                    );
                    if committed.is_some() {
                        assert_eq!(
                            got.len(),
                            records.len(),
                            "seed {seed}: a committed record lost"
                        );
                    }
                    kept += 1;
                }
                Opened::Refused(_) => refused += 1,
            }
        }
        // Both verdicts are common: the damage is neither always fatal
        // nor always harmless.
        assert!(
            kept > 40 && refused > 40,
            "{kept} opened, {refused} refused"
        );
    }

    #[test]
    fn a_bit_flip_anywhere_is_refused_unchanged_or_loses_nothing_committed() {
        let (segments, records) = small_log(6, |i| 20 + 7 * i as usize);
        let (starts, end) = offsets(&records);
        let last = records.len() as u64;
        // Every bit of every byte of every record (headers and payloads
        // alike), and a few bytes past the end.
        for at in 0..end + 64 {
            let bit = 1u8 << (at % 8);
            // All committed: nothing may be dropped.
            let opened = open_damaged(&segments, Some(last), |b| b[at] ^= bit);
            match &opened {
                Opened::Records(got) => {
                    assert!(at >= end, "a flip at {at} inside the records was accepted");
                    assert_eq!(got, &records, "a flip past the end lost records");
                }
                Opened::Refused(why) => {
                    assert!(
                        at < end,
                        "a flip past the records at {at} was refused: {why}"
                    );
                    let record = starts.iter().rposition(|s| *s <= at).expect("a record") + 1;
                    assert!(
                        why.contains(&format!("index {record})")),
                        "flip at {at}: {why}"
                    );
                }
            }
            // Nothing known committed: a damaged last record is a torn
            // tail (dropped), any other is refused.
            let opened = open_damaged(&segments, None, |b| b[at] ^= bit);
            let in_last = at >= starts[starts.len() - 1] && at < end;
            match opened {
                Opened::Records(got) if in_last => assert_eq!(got, records[..5]),
                Opened::Records(got) => {
                    assert!(at >= end, "a flip at {at} was accepted");
                    assert_eq!(got, records);
                }
                Opened::Refused(why) => {
                    assert!(!in_last && at < end, "flip at {at} refused: {why}");
                    assert!(why.contains("follows at offset"), "{why}");
                }
            }
        }
    }

    #[test]
    fn a_torn_last_record_is_dropped_unless_it_was_committed() {
        let (segments, records) = small_log(5, |i| 300 * i as usize);
        let (starts, end) = offsets(&records);
        let last_start = starts[4];
        for cut in last_start..end {
            // The write stopped at `cut`: the rest is still zero...
            let torn = |b: &mut Vec<u8>| b[cut..end].fill(0);
            assert_eq!(
                open_damaged(&segments, Some(4), torn),
                Opened::Records(records[..4].to_vec()),
                "torn at {cut}"
            );
            assert!(matches!(
                open_damaged(&segments, Some(5), torn),
                Opened::Refused(why) if why.contains("index 5 was committed")
            ));
            // ...or the file ends there.
            let cut_file = |b: &mut Vec<u8>| b.truncate(cut);
            assert_eq!(
                open_damaged(&segments, Some(4), cut_file),
                Opened::Records(records[..4].to_vec()),
                "file cut at {cut}"
            );
        }
        // A file cut at a record boundary ends the log early: refused when
        // that loses committed entries.
        let cut = |b: &mut Vec<u8>| b.truncate(last_start);
        assert!(matches!(
            open_damaged(&segments, Some(5), cut),
            Opened::Refused(why) if why.contains("lost committed entries")
        ));
    }

    #[test]
    fn a_log_without_segments_but_with_committed_entries_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let err = Wal::open(dir.path(), SEGMENT, Some(3), Some(9)).expect_err("refused");
        assert!(err.to_string().contains("index 9 was committed"), "{err}");
        assert_eq!(std::fs::read_dir(dir.path()).expect("dir").count(), 0);
        // Everything committed was purged into a snapshot: a fresh log is fine.
        drop(Wal::open(dir.path(), SEGMENT, Some(9), Some(9)).expect("open"));
    }

    #[test]
    fn a_zeroed_page_or_a_damaged_first_header_is_refused() {
        let (segments, records) = small_log(14, |_| 1000);
        let (_, end) = offsets(&records);
        assert!(end > 3 * 4096);
        // A page in the middle reads back as zeros (a lost write).
        let zeroed = open_damaged(&segments, None, |b| b[4096..8192].fill(0));
        assert!(
            matches!(&zeroed, Opened::Refused(why) if why.contains("follows at offset")),
            "{zeroed:?}"
        );
        // The first record's length says it runs past the segment's end.
        let long = open_damaged(&segments, None, |b| {
            b[0..4].copy_from_slice(&u32::MAX.to_le_bytes())
        });
        assert!(
            matches!(&long, Opened::Refused(why) if why.contains("index 1)") && why.contains("index 2 follows")),
            "{long:?}"
        );
    }
}
