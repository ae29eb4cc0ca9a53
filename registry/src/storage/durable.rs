//! The one place where the registry makes data durable: `fdatasync` of a
//! file ([`sync_data`]) and `fsync` of a directory ([`sync_dir`]). Every
//! file the registry keeps is written by its own code (the Raft metadata
//! too, since it left sled), so the image below sees every write.
//!
//! It is also the **power-loss seam**. A `kill -9` leaves the page cache
//! to the kernel, so a crash test would pass with every sync deleted. A
//! debug build started with `MESHWORK_TEST_POWER_LOSS_IMAGE=<dir>` keeps in
//! `<dir>` the image its data dir would have if the power failed at this
//! moment, and a test that kills the process then puts that image in place
//! of the data dir ([`restore_image`]) before restarting it. The image
//! follows the strict POSIX rules (the ones etcd's failpoints,
//! TigerBeetle's storage simulator and Jepsen's LazyFS test against):
//!
//! - a file's bytes and length are those its last `fdatasync`/`fsync`
//!   saw: what was written after it is gone, and overwritten bytes are
//!   back to their synced value (a file never synced is empty);
//! - a directory's entries are those its last `fsync` saw: a new file, a
//!   rename or a removal not followed by a sync of its directory is undone
//!   (a renamed file then keeps its old name, with whatever of its new
//!   content was synced under the new one);
//! - directories themselves are assumed to exist once created (they are
//!   made once, when the data dir is new).
//!
//! Writes the image should see must be reported with [`wrote`] (the WAL
//! does; a file with no reported write is copied whole at each sync).
//! Missing a report can only make the image lose data, never gain it, so
//! a mistake here shows up as a test failure, not as a false pass. Release
//! builds refuse to start with the variable set; in a normal run every
//! function here is the plain system call and one relaxed atomic load.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::File;
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{LazyLock, Mutex, MutexGuard};

/// The environment variable that turns the seam on (debug builds only).
pub const IMAGE_ENV: &str = "MESHWORK_TEST_POWER_LOSS_IMAGE";

/// `fdatasync`: the file's data and length are durable when this returns.
pub fn sync_data(file: &File) -> io::Result<()> {
    file.sync_data()?;
    if ACTIVE.load(Ordering::Relaxed) {
        seam_synced_file(file)?;
    }
    Ok(())
}

/// `fsync`: as [`sync_data`], plus the file's other metadata.
pub fn sync_all(file: &File) -> io::Result<()> {
    file.sync_all()?;
    if ACTIVE.load(Ordering::Relaxed) {
        seam_synced_file(file)?;
    }
    Ok(())
}

/// `fsync` of a directory: its entries (new files, renames, removals) are
/// durable when this returns.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()?;
    if ACTIVE.load(Ordering::Relaxed) {
        seam_synced_dir(dir)?;
    }
    Ok(())
}

/// Says that `len` bytes at `offset` of `file` were written (for the
/// power-loss image; nothing otherwise).
pub fn wrote(file: &File, offset: u64, len: u64) {
    if !ACTIVE.load(Ordering::Relaxed) || len == 0 {
        return;
    }
    if let Ok(meta) = file.metadata() {
        let key = key_of(&meta);
        let mut seam = lock();
        let ranges = seam.dirty.entry(key).or_default();
        // Appends are contiguous: extend the last range when they touch.
        match ranges.last_mut() {
            Some((from, to)) if *to == offset => *to = offset + len,
            _ => ranges.push((offset, offset + len)),
        }
    }
}

/// Everything under `dir` (files and names) is durable now. Walks the
/// tree only when the seam is on.
fn synced_tree(dir: &Path) -> io::Result<()> {
    if !ACTIVE.load(Ordering::Relaxed) {
        return Ok(());
    }
    let mut dirs = vec![dir.to_owned()];
    while let Some(d) = dirs.pop() {
        for entry in std::fs::read_dir(&d)? {
            let entry = entry?;
            let path = entry.path();
            if entry.file_type()?.is_dir() {
                dirs.push(path);
            } else if entry.file_type()?.is_file() {
                match File::open(&path) {
                    Ok(file) => seam_copy_whole(&file)?,
                    // Renamed away since the listing.
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => return Err(e),
                }
            }
        }
        seam_synced_dir(&d)?;
    }
    Ok(())
}

/// Starts the power-loss image of `root` if [`IMAGE_ENV`] asks for one.
/// Refused in release builds: the seam costs a copy per sync.
pub fn start_image_from_env(root: &Path) -> io::Result<()> {
    let Some(image) = std::env::var_os(IMAGE_ENV) else {
        return Ok(());
    };
    if !cfg!(debug_assertions) {
        return Err(io::Error::other(format!(
            "{IMAGE_ENV} is a test hook of debug builds; unset it"
        )));
    }
    tracing::warn!(image = %Path::new(&image).display(), "keeping a power-loss image of the data dir (tests only)");
    start_image(root, Path::new(&image))
}

/// Starts keeping the power-loss image of the data dir `root` in `image`.
/// Everything in `root` now counts as durable.
///
/// The new image is built beside the old one (`<image>.next`) and swapped
/// in only once it is whole: a process killed while starting (the harness
/// kills at any moment) leaves the previous image usable — deleting it
/// first once left a half-deleted image whose restore made an empty WAL
/// segment out of a synced one. [`restore_image`] takes `<image>.next`
/// when the swap was cut between its two renames.
pub fn start_image(root: &Path, image: &Path) -> io::Result<()> {
    let root = root.canonicalize()?;
    let next = sibling(image, "next");
    if next.exists() {
        std::fs::remove_dir_all(&next)?;
    }
    std::fs::create_dir_all(next.join(CONTENT))?;
    let next = next.canonicalize()?;
    {
        let mut seam = lock();
        seam.images.retain(|i| i.root != root);
        seam.images.push(Image {
            root: root.clone(),
            dir: next.clone(),
            names: BTreeMap::new(),
            dirs: BTreeSet::new(),
        });
    }
    ACTIVE.store(true, Ordering::Relaxed);
    synced_tree(&root)?;
    // Whole: swap it in, under the seam's lock (no sync writes into the
    // image while its directory moves).
    let old = sibling(image, "old");
    let mut seam = lock();
    if old.exists() {
        std::fs::remove_dir_all(&old)?;
    }
    if image.exists() {
        std::fs::rename(image, &old)?;
    }
    std::fs::rename(&next, image)?;
    let image = image.canonicalize()?;
    if let Some(kept) = seam.images.iter_mut().find(|i| i.root == root) {
        kept.dir = image;
    }
    drop(seam);
    if old.exists() {
        std::fs::remove_dir_all(&old)?;
    }
    Ok(())
}

/// `<image>.<what>`, beside `image`.
fn sibling(image: &Path, what: &str) -> PathBuf {
    let mut name = image.as_os_str().to_owned();
    name.push(".");
    name.push(what);
    PathBuf::from(name)
}

/// Stops keeping the image of `root` (unit tests reuse one process).
pub fn stop_image(root: &Path) {
    let root = root.canonicalize().unwrap_or_else(|_| root.to_owned());
    let mut seam = lock();
    seam.images.retain(|i| i.root != root);
    if seam.images.is_empty() {
        ACTIVE.store(false, Ordering::Relaxed);
    }
}

/// The power loss: replaces everything in `root` with the image kept in
/// `image`. The process that kept it must be dead (or, in a unit test,
/// everything it had open dropped).
pub fn restore_image(image: &Path, root: &Path) -> io::Result<()> {
    // A start killed between the two renames of its swap left the new,
    // whole image at `<image>.next` and none at `image`.
    let next = sibling(image, "next");
    let image = if !image.exists() && next.join(MANIFEST).exists() {
        next.as_path()
    } else {
        image
    };
    let manifest: Manifest = serde_json::from_slice(&std::fs::read(image.join(MANIFEST))?)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    for entry in std::fs::read_dir(root)? {
        let path = entry?.path();
        if path.is_dir() {
            std::fs::remove_dir_all(&path)?;
        } else {
            std::fs::remove_file(&path)?;
        }
    }
    for dir in &manifest.dirs {
        std::fs::create_dir_all(root.join(dir))?;
    }
    for (name, key) in &manifest.names {
        let to = root.join(name);
        if let Some(parent) = to.parent() {
            std::fs::create_dir_all(parent)?;
        }
        match std::fs::copy(image.join(CONTENT).join(key), &to) {
            Ok(_) => {}
            // Named by a synced directory, data never synced: empty.
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                File::create(&to)?;
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

const CONTENT: &str = "content";
const MANIFEST: &str = "names.json";

static ACTIVE: AtomicBool = AtomicBool::new(false);

#[derive(Default)]
struct Seam {
    images: Vec<Image>,
    /// Ranges written since the file's last sync, by file key. A key
    /// present (even empty) means the file's writes are reported.
    dirty: HashMap<String, Vec<(u64, u64)>>,
}

struct Image {
    root: PathBuf,
    dir: PathBuf,
    /// Durable names (relative to root) → file key.
    names: BTreeMap<PathBuf, String>,
    /// Directories (relative to root) that exist in the image.
    dirs: BTreeSet<PathBuf>,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct Manifest {
    names: BTreeMap<PathBuf, String>,
    dirs: BTreeSet<PathBuf>,
}

fn lock() -> MutexGuard<'static, Seam> {
    static SEAM: LazyLock<Mutex<Seam>> = LazyLock::new(Mutex::default);
    // A poisoned seam is a failed test anyway; keep its state.
    SEAM.lock().unwrap_or_else(|e| e.into_inner())
}

/// A file's identity across renames: device, inode and birth time (an
/// inode number alone may be reused after a removal).
fn key_of(meta: &std::fs::Metadata) -> String {
    let born = meta
        .created()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos());
    format!("{:x}-{}-{born}", meta.dev(), meta.ino())
}

/// The path a file descriptor has now (Linux), if any.
fn path_of(file: &File) -> Option<PathBuf> {
    use std::os::fd::AsRawFd;
    let link = std::fs::read_link(format!("/proc/self/fd/{}", file.as_raw_fd())).ok()?;
    (!link.to_string_lossy().ends_with(" (deleted)")).then_some(link)
}

impl Seam {
    fn image_of(&mut self, path: &Path) -> Option<&mut Image> {
        self.images.iter_mut().find(|i| path.starts_with(&i.root))
    }
}

fn seam_synced_file(file: &File) -> io::Result<()> {
    let meta = file.metadata()?;
    let key = key_of(&meta);
    let mut seam = lock();
    let ranges = seam.dirty.get_mut(&key).map(std::mem::take);
    // A file not (or no longer) named in a data dir: where does it go? The
    // first image whose root holds it; a removed file needs no image.
    let Some(path) = path_of(file) else {
        return Ok(());
    };
    let Some(image) = seam.image_of(&path) else {
        return Ok(());
    };
    let to = image.dir.join(CONTENT).join(&key);
    let file = &readable(file)?;
    let out = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(false)
        .open(&to)?;
    match ranges {
        Some(ranges) => {
            for (from, end) in ranges {
                copy_range(file, &out, from, end.min(meta.len()))?;
            }
        }
        None => copy_range(file, &out, 0, meta.len())?,
    }
    out.set_len(meta.len())
}

fn seam_copy_whole(file: &File) -> io::Result<()> {
    let meta = file.metadata()?;
    let key = key_of(&meta);
    let mut seam = lock();
    let Some(path) = path_of(file) else {
        return Ok(());
    };
    let Some(image) = seam.image_of(&path) else {
        return Ok(());
    };
    let out = File::create(image.dir.join(CONTENT).join(&key))?;
    copy_range(&readable(file)?, &out, 0, meta.len())
}

/// The same file opened for reading (it may have been opened write-only).
fn readable(file: &File) -> io::Result<File> {
    use std::os::fd::AsRawFd;
    File::open(format!("/proc/self/fd/{}", file.as_raw_fd()))
}

fn copy_range(from: &File, to: &File, start: u64, end: u64) -> io::Result<()> {
    let mut buf = vec![0u8; (end.saturating_sub(start)).min(1 << 20) as usize];
    let mut at = start;
    while at < end {
        let n = ((end - at) as usize).min(buf.len());
        from.read_exact_at(&mut buf[..n], at)?;
        to.write_all_at(&buf[..n], at)?;
        at += n as u64;
    }
    Ok(())
}

fn seam_synced_dir(dir: &Path) -> io::Result<()> {
    let dir = dir.canonicalize()?;
    let mut entries = Vec::new();
    let mut subdirs = Vec::new();
    for entry in std::fs::read_dir(&dir)? {
        let entry = entry?;
        let kind = entry.file_type()?;
        if kind.is_file() {
            // Renamed away by another thread since the listing: not here.
            match entry.metadata() {
                Ok(meta) => entries.push((entry.file_name(), key_of(&meta))),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        } else if kind.is_dir() {
            subdirs.push(entry.file_name());
        }
    }
    let mut seam = lock();
    let Some(image) = seam.image_of(&dir) else {
        return Ok(());
    };
    let rel = dir
        .strip_prefix(&image.root)
        .unwrap_or(Path::new(""))
        .to_owned();
    image
        .names
        .retain(|name, _| name.parent() != Some(rel.as_path()));
    for (name, key) in entries {
        image.names.insert(rel.join(name), key);
    }
    image.dirs.insert(rel.clone());
    for sub in subdirs {
        image.dirs.insert(rel.join(sub));
    }
    let manifest = Manifest {
        names: image.names.clone(),
        dirs: image.dirs.clone(),
    };
    let bytes = serde_json::to_vec(&manifest).map_err(io::Error::other)?;
    // The harness reads it after a kill -9: replaced whole, never torn.
    let tmp = image.dir.join("names.json.tmp");
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, image.dir.join(MANIFEST))
}
