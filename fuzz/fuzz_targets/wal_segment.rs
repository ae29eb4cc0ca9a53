//! Feeds arbitrary bytes to the Raft log's segment reader as the one
//! segment of a log directory (the stable-toolchain counterpart is the
//! seeded `random_damage_is_refused_unchanged_or_keeps_a_prefix` test in
//! `registry/src/storage/wal.rs`). It must never panic or hang; judging the
//! log (`Wal::check`) must never change a byte; and opening agrees with the
//! judgement: a log that `check` refuses is refused by `open` with the
//! files unchanged, and one it accepts opens and reads back every record.
#![no_main]

use std::sync::atomic::{AtomicU64, Ordering};

use libfuzzer_sys::fuzz_target;
use meshwork_registry::storage::wal::Wal;

fn files(dir: &std::path::Path) -> Vec<(String, Vec<u8>)> {
    let mut all: Vec<_> = std::fs::read_dir(dir)
        .expect("dir")
        .map(|e| {
            let e = e.expect("entry");
            (
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read(e.path()).expect("read"),
            )
        })
        .collect();
    all.sort();
    all
}

fuzz_target!(|data: &[u8]| {
    static RUN: AtomicU64 = AtomicU64::new(0);
    let dir = std::env::temp_dir().join(format!(
        "mw-fuzz-wal-{}-{}",
        std::process::id(),
        RUN.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).expect("dir");
    std::fs::write(dir.join("wal-0000000000000001.seg"), data).expect("segment");
    let before = files(&dir);
    let judged = Wal::check(&dir);
    assert_eq!(files(&dir), before, "check changed the log");
    match Wal::open(&dir, 64 << 10, None, None) {
        Ok((wal, _)) => {
            assert!(judged.is_ok(), "open accepted what check refused: {judged:?}");
            if let Some((first, last)) = wal.bounds() {
                let read = wal.read(first, last + 1).expect("records read back");
                assert_eq!(read.len() as u64, last - first + 1);
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::InvalidData => {
            assert!(judged.is_err(), "check accepted what open refused: {e}");
            assert_eq!(files(&dir), before, "a refusal changed the log: {e}");
        }
        Err(_) => {}
    }
    let _ = std::fs::remove_dir_all(&dir);
});
