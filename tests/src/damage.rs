//! Damage for the corruption suites: a data dir's files as bytes (to prove
//! a refusal changed nothing), copies of a pristine data dir, and the
//! kinds of damage a disk does (a flipped bit, a cut file, a zeroed page).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Result, bail};

/// Every file under `dir`, by path, with its bytes.
pub fn files(dir: &Path) -> Result<BTreeMap<PathBuf, Vec<u8>>> {
    let mut out = BTreeMap::new();
    let mut todo = vec![dir.to_owned()];
    for _ in 0..10_000 {
        let Some(next) = todo.pop() else {
            return Ok(out);
        };
        for entry in std::fs::read_dir(&next)? {
            let path = entry?.path();
            if path.is_dir() {
                todo.push(path);
            } else {
                out.insert(path.clone(), std::fs::read(&path)?);
            }
        }
    }
    bail!("{} holds too many directories", dir.display())
}

/// The paths whose bytes differ between two [`files`] results (added and
/// removed files included).
pub fn changed(
    before: &BTreeMap<PathBuf, Vec<u8>>,
    after: &BTreeMap<PathBuf, Vec<u8>>,
) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = before
        .keys()
        .chain(after.keys())
        .filter(|p| before.get(*p) != after.get(*p))
        .cloned()
        .collect();
    out.sort();
    out.dedup();
    out
}

/// Copies the directory tree `from` to `to` (created), with the modes.
pub fn copy_dir(from: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir_all(to)?;
    std::fs::set_permissions(to, std::fs::metadata(from)?.permissions())?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_dir(&entry.path(), &target)?;
        } else {
            std::fs::copy(entry.path(), target)?;
        }
    }
    Ok(())
}

/// Replaces `dir` by a fresh copy of `pristine`.
pub fn reset_dir(pristine: &Path, dir: &Path) -> Result<()> {
    if dir.exists() {
        std::fs::remove_dir_all(dir)?;
    }
    copy_dir(pristine, dir)
}

/// One kind of damage to one file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Damage {
    /// One bit (0x20) flipped in the byte at this offset.
    Flip(u64),
    /// The file cut to this length.
    Truncate(u64),
    /// The 4 KiB page holding this offset zeroed (as far as the file goes).
    ZeroPage(u64),
}

impl Damage {
    /// Does it to `path`.
    pub fn apply(self, path: &Path) -> Result<()> {
        let mut bytes = std::fs::read(path)?;
        match self {
            Damage::Flip(at) => {
                let Some(byte) = bytes.get_mut(at as usize) else {
                    bail!("{} has no byte {at}", path.display());
                };
                *byte ^= 0x20;
            }
            Damage::Truncate(len) => bytes.truncate(len as usize),
            Damage::ZeroPage(at) => {
                let start = (at as usize / 4096) * 4096;
                let end = (start + 4096).min(bytes.len());
                if start < end {
                    bytes[start..end].fill(0);
                }
            }
        }
        std::fs::write(path, &bytes)?;
        Ok(())
    }
}

/// `n` offsets spread evenly over a file of `len` bytes, always with its
/// first bytes and its last (where headers and checksums live): a sample
/// instead of every byte, so that a suite's server starts stay bounded.
pub fn spread(len: u64, n: u64) -> Vec<u64> {
    if len == 0 {
        return Vec::new();
    }
    let mut out: Vec<u64> = [0, 1, 7, 8, 9, 15, 16]
        .into_iter()
        .chain((0..n).map(|i| i * len / n.max(1)))
        .chain([len.saturating_sub(5), len.saturating_sub(4), len - 1])
        .filter(|o| *o < len)
        .collect();
    out.sort_unstable();
    out.dedup();
    out
}
