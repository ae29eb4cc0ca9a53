//! Running commands on the host for the suites that drive scripts and
//! system tools (the deploy suite): run with a time limit and output in
//! temp files, look tools up on `PATH`, check for root, and skip (or, under
//! CI, fail) when a prerequisite is missing.

use std::fs;
use std::io::{Read, Seek};
use std::path::PathBuf;
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};

/// What a finished command printed.
#[derive(Debug)]
pub struct Outcome {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Outcome {
    /// `self`, or an error with both outputs when the command failed.
    pub fn ok(self, what: &str) -> Result<Self> {
        ensure!(
            self.status.success(),
            "{what} failed ({}):\n--- stdout\n{}\n--- stderr\n{}",
            self.status,
            self.stdout,
            self.stderr
        );
        Ok(self)
    }
}

/// Runs `cmd` to completion, killing it after `limit`. Output goes to
/// anonymous temp files, not pipes, so a chatty child never blocks and a
/// background process it leaves behind cannot hold the test up.
pub fn run(cmd: &mut Command, limit: Duration) -> Result<Outcome> {
    let mut out = tempfile::tempfile()?;
    let mut err = tempfile::tempfile()?;
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(err.try_clone()?)
        .spawn()
        .with_context(|| format!("spawn {cmd:?}"))?;
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("{cmd:?} did not finish within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let read = |f: &mut fs::File| -> Result<String> {
        let mut text = String::new();
        f.rewind()?;
        f.read_to_string(&mut text)?;
        Ok(text)
    };
    Ok(Outcome {
        status,
        stdout: read(&mut out)?,
        stderr: read(&mut err)?,
    })
}

/// `tool`'s path on `PATH`, if there.
pub fn which(tool: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(tool))
            .find(|p| p.metadata().is_ok_and(|m| m.is_file()))
    })
}

/// Whether this process runs as root.
pub fn is_root() -> bool {
    fs::read_to_string("/proc/self/status").is_ok_and(|status| {
        status
            .lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .and_then(|ids| ids.split_whitespace().next().map(|uid| uid == "0"))
            .unwrap_or(false)
    })
}

/// `Some(reason)` when the test cannot run here; under CI that is a failure.
pub fn missing(need_root: bool, tools: &[&str]) -> Option<String> {
    let mut reasons = Vec::new();
    if need_root && !is_root() {
        reasons.push("needs root (network namespaces)".to_owned());
    }
    for tool in tools {
        if which(tool).is_none() {
            reasons.push(format!("`{tool}` not found (scripts/install-test-deps.sh)"));
        }
    }
    if reasons.is_empty() {
        return None;
    }
    let reason = reasons.join("; ");
    assert!(
        std::env::var_os("CI").is_none(),
        "cannot run under CI: {reason}"
    );
    eprintln!("skipped: {reason}");
    Some(reason)
}

/// Whether `pid` is a live process (a zombie waiting for its parent,
/// which for the lab's daemons is PID 1, to reap it is not).
pub fn running(pid: u32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        // "pid (comm) S …": the state follows the last ')'.
        stat.rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X")
    })
}
