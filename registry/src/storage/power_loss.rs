//! Power-loss tests of the storage layer, through the seam in
//! [`super::durable`]: each runs the real code on a temp data dir while the
//! seam keeps the image a power loss would leave, then puts that image in
//! place and reopens. Every sync the code makes for safety is needed by
//! one of these (or by the fault suite's power-loss cycles, for the Raft
//! log's group commit): deleting it makes a test here fail.

use std::collections::BTreeMap;
use std::path::PathBuf;

use rand::{Rng, SeedableRng};

use super::durable;
use super::wal::Wal;

/// A temp data dir with its power-loss image beside it. Dropping it stops
/// the image.
pub(crate) struct Powered {
    _tmp: tempfile::TempDir,
    pub(crate) root: PathBuf,
    image: PathBuf,
}

impl Powered {
    pub(crate) fn new() -> Self {
        let tmp = tempfile::tempdir().expect("tempdir");
        let root = tmp.path().join("data");
        let image = tmp.path().join("image");
        std::fs::create_dir_all(&root).expect("data dir");
        durable::start_image(&root, &image).expect("start image");
        Self {
            _tmp: tmp,
            root,
            image,
        }
    }

    /// The power fails: whatever was not made durable is gone. Whatever
    /// had the files open must be dropped first. The image restarts from
    /// what is now on disk.
    pub(crate) fn power_loss(&self) {
        durable::restore_image(&self.image, &self.root).expect("restore image");
        durable::start_image(&self.root, &self.image).expect("restart image");
    }
}

impl Powered {
    /// Counts everything now on disk as durable (for files written by
    /// code the seam does not see, such as an earlier build's sled store).
    pub(crate) fn everything_durable_now(&self) {
        durable::start_image(&self.root, &self.image).expect("restart image");
    }
}

impl Drop for Powered {
    fn drop(&mut self) {
        durable::stop_image(&self.root);
    }
}

fn sync(wal: &Wal) {
    for file in wal.take_dirty() {
        durable::sync_data(&file).expect("sync");
    }
}

/// Random appends, group-commit syncs, truncations of uncommitted entries,
/// purges (which recycle segments) and power losses, on tiny segments so
/// that roll-overs and recycling happen all the time. After every power
/// loss the log must open (nothing torn: the image holds whole syncs) with
/// every synced, untruncated record, and no record that a truncation took
/// away. (A recycled segment's old records past the end read as a torn
/// tail and are zeroed: that is not a loss.)
#[test]
fn the_log_keeps_every_synced_record_through_power_losses() {
    const SEGMENT: u64 = 4096;
    for seed in 0..40u64 {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let disk = Powered::new();
        let dir = disk.root.join("wal");
        // The latest payload appended at each index (what a record found
        // there must be), the highest index made durable, the committed
        // index (truncations stay above it) and the durable purge point.
        let mut latest: BTreeMap<u64, Vec<u8>> = BTreeMap::new();
        let mut synced = 0u64;
        let mut committed = 0u64;
        let mut purged: Option<u64> = None;
        let mut next = 1u64;
        let (mut wal, _) = Wal::open(&dir, SEGMENT, None, None).expect("open");
        for step in 0..120 {
            match rng.random_range(0..100) {
                0..55 => {
                    for _ in 0..rng.random_range(1..6) {
                        let size = rng.random_range(1..700);
                        let payload: Vec<u8> =
                            format!("{seed}/{step}/{next}/{}", "p".repeat(size)).into_bytes();
                        wal.append(next, &payload).expect("append");
                        latest.insert(next, payload);
                        next += 1;
                    }
                }
                55..75 => {
                    sync(&wal);
                    synced = next - 1;
                    if synced > 0 {
                        committed = rng.random_range(committed..=synced);
                    }
                }
                75..83 if next - 1 > committed + 1 => {
                    // A new leader overrides uncommitted entries.
                    let cut = rng.random_range(committed + 1..next);
                    wal.truncate(cut).expect("truncate");
                    latest.retain(|i, _| *i < cut);
                    next = cut;
                    synced = synced.min(cut - 1);
                }
                83..90 if committed > purged.unwrap_or(0) => {
                    let to = rng.random_range(purged.unwrap_or(0) + 1..=committed);
                    // The purge point is durable first (the metadata file,
                    // in the server).
                    purged = Some(to);
                    wal.purge(to).expect("purge");
                }
                90..100 => {
                    drop(wal);
                    disk.power_loss();
                    let (reopened, _) = Wal::open(
                        &dir,
                        SEGMENT,
                        purged,
                        (committed > 0).then_some(committed),
                    )
                    .unwrap_or_else(|e| {
                        panic!(
                            "seed {seed} step {step}: the log did not open after a power loss: {e}"
                        )
                    });
                    wal = reopened;
                    let first = purged.map_or(1, |p| p + 1);
                    let last = wal.bounds().map_or(first.saturating_sub(1), |(_, l)| l);
                    assert!(
                        last >= synced,
                        "seed {seed} step {step}: synced up to {synced}, the log ends at {last}"
                    );
                    for (index, payload) in wal.read(first, last + 1).expect("read") {
                        assert_eq!(
                            Some(&payload),
                            latest.get(&index),
                            "seed {seed} step {step}: record {index} is not the latest written there"
                        );
                    }
                    // Unsynced records past the durable end are gone, or
                    // were made durable by a sync the log did on its own.
                    latest.retain(|i, _| *i <= last);
                    next = last + 1;
                    synced = last;
                }
                _ => {}
            }
        }
        drop(wal);
    }
}

/// A written snapshot is durable when `write` returns: a power loss right
/// after it reads it back (not the previous one, not a torn file).
#[test]
fn a_snapshot_written_is_the_one_read_after_a_power_loss() {
    let disk = Powered::new();
    let dir = disk.root.join("snapshot");
    let file = super::snapshot_file::SnapshotFile::new(&dir).expect("snapshot dir");
    durable::sync_dir(&disk.root).expect("sync root");
    for round in 0..3u8 {
        let meta = format!("meta-{round}").into_bytes();
        // Past one sync interval, so the streaming syncs run too.
        let data = vec![round; (super::snapshot_file::SYNC_EVERY + 12345) as usize];
        file.write(&meta, &data).expect("write");
        disk.power_loss();
        let read = file.read().expect("a readable snapshot");
        assert_eq!(read, Some((meta, data)), "round {round}");
    }
}

/// A new data dir's marker is durable when `open` returns: after a power
/// loss the dir opens again as the same node.
#[test]
fn a_new_data_dir_survives_a_power_loss() {
    let disk = Powered::new();
    let path = disk.root.join("registry");
    std::fs::create_dir_all(&path).expect("dir");
    durable::sync_dir(&disk.root).expect("sync root");
    let first = super::datadir::DataDir::open(&path, 1).expect("open new");
    let uuid = first.node_uuid.clone();
    drop(first);
    disk.power_loss();
    let again = super::datadir::DataDir::open(&path, 1).expect("reopen after a power loss");
    assert_eq!(again.node_uuid, uuid);
}

/// Random metadata writes (the vote, committed index and purge point, as
/// the log store makes them) and power losses, some right after the file
/// was created: every power loss leaves the file readable, holding the
/// last payload written (each write is durable when it returns).
#[test]
fn a_metadata_write_is_the_one_read_after_a_power_loss() {
    use super::meta_file::{FILE, MAX_PAYLOAD, MetaFile};
    for seed in 0..30u64 {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let disk = Powered::new();
        let path = disk.root.join(FILE);
        let initial = format!("initial {seed}").into_bytes();
        let (mut file, read) = MetaFile::open_or_create(&path, &initial).expect("create");
        assert_eq!(read, initial);
        let mut last = initial;
        for step in 0..40 {
            if rng.random_range(0..100) < 70 {
                let size = rng.random_range(0..=MAX_PAYLOAD);
                let payload: Vec<u8> = (0..size).map(|_| rng.random()).collect();
                file.write(&payload).expect("write");
                last = payload;
            } else {
                drop(file);
                disk.power_loss();
                let read = MetaFile::read(&path).unwrap_or_else(|e| {
                    panic!("seed {seed} step {step}: unreadable after a power loss: {e}")
                });
                assert!(
                    read.as_ref() == Some(&last),
                    "seed {seed} step {step}: after a power loss the file holds {:?}, not the last write",
                    read.map(|r| r.len())
                );
                let (reopened, _) = MetaFile::open_or_create(&path, b"not this").expect("reopen");
                file = reopened;
            }
        }
    }
}

/// A new metadata file is durable, name and content, when it is created.
#[test]
fn a_new_metadata_file_survives_a_power_loss() {
    use super::meta_file::{FILE, MetaFile};
    let disk = Powered::new();
    let path = disk.root.join(FILE);
    drop(MetaFile::open_or_create(&path, b"first").expect("create"));
    disk.power_loss();
    assert_eq!(
        MetaFile::read(&path).expect("readable"),
        Some(b"first".to_vec())
    );
}

/// A power loss in the middle of a metadata write (only part of the new
/// slot reached the disk) leaves the previous payload readable.
#[test]
fn a_torn_metadata_write_falls_back_to_the_previous_value() {
    use super::meta_file::{FILE, MetaFile, SLOT};
    let next = b"the write torn by the power loss".repeat(20);
    for keep in [1, 8, 20, 28, 29, 100, 28 + next.len() - 1] {
        assert!(keep < SLOT);
        for writes_before in 0..3u8 {
            let disk = Powered::new();
            let path = disk.root.join(FILE);
            let (mut file, _) = MetaFile::open_or_create(&path, b"initial").expect("create");
            let mut last = b"initial".to_vec();
            for n in 0..writes_before {
                last = format!("write {n}").into_bytes();
                file.write(&last).expect("write");
            }
            file.torn_write(&next, keep).expect("torn write");
            drop(file);
            disk.power_loss();
            assert_eq!(
                MetaFile::read(&path).expect("readable"),
                Some(last),
                "{keep} bytes of the slot written after {writes_before} writes"
            );
        }
    }
}

/// A restart killed while it rebuilds its power-loss image (the fault
/// suite kills at any moment) leaves a whole image to restore: the
/// previous one while the new is being built, the new one once it is
/// built even if the swap was cut between its two renames. (The image used
/// to be deleted first: a kill mid-deletion left it listing a synced WAL
/// segment whose content was gone, restored as an empty file.)
#[test]
fn a_restart_killed_while_rebuilding_its_image_leaves_a_whole_image() {
    let disk = Powered::new();
    let file = disk.root.join("segment");
    std::fs::write(&file, b"synced records").expect("write");
    disk.everything_durable_now();
    disk.power_loss();
    let next = disk.image.with_file_name("image.next");
    // Killed while building: a half-made `.next` beside the whole image.
    std::fs::create_dir_all(next.join("content")).expect("half-made next");
    durable::restore_image(&disk.image, &disk.root).expect("restore");
    assert_eq!(std::fs::read(&file).expect("read"), b"synced records");
    // Killed between the swap's renames: only `.next`, whole.
    durable::start_image(&disk.root, &disk.image).expect("rebuild");
    durable::stop_image(&disk.root);
    std::fs::rename(&disk.image, &next).expect("cut swap");
    durable::restore_image(&disk.image, &disk.root).expect("restore from next");
    assert_eq!(std::fs::read(&file).expect("read"), b"synced records");
}
