//! `deploy-vm/` for the deploy suite: the directory, stand-in binaries,
//! `install.sh` into a `DESTDIR`, a listing of what it wrote, the
//! network-namespace lab (`deploy-vm/lab/*.sh`) and a throw-away container
//! booting systemd.

use std::collections::BTreeMap;
use std::fs;
use std::hash::{Hash, Hasher};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};

use crate::host::{Outcome, run, running};
use crate::{eventually, registry_bin};

/// The repository's root.
pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// `deploy-vm/` in the repository.
pub fn deploy_dir() -> PathBuf {
    repo().join("deploy-vm")
}

/// Stand-ins for the binaries: install.sh only copies them, and
/// `systemd-analyze verify` only needs them to exist and be executable.
pub fn stub_binaries(dir: &Path, marker: &str) -> Result<PathBuf> {
    let bin = dir.join("bin");
    fs::create_dir_all(&bin)?;
    for name in ["meshwork-registry", "meshwork-sidecar", "meshctl"] {
        let path = bin.join(name);
        fs::write(&path, format!("#!/bin/sh\n# {name} {marker}\nexit 0\n"))?;
        fs::set_permissions(&path, fs::Permissions::from_mode(0o755))?;
    }
    Ok(bin)
}

/// `deploy-vm/install.sh --bin-dir <bin_dir> <args>` with `DESTDIR` set
/// (and `PREFIX` unset), within 60 s.
pub fn install(destdir: &Path, bin_dir: &Path, args: &[&str]) -> Result<Outcome> {
    run(
        Command::new(deploy_dir().join("install.sh"))
            .args(["--bin-dir", &bin_dir.display().to_string()])
            .args(args)
            .env("DESTDIR", destdir)
            .env_remove("PREFIX"),
        Duration::from_secs(60),
    )
}

/// Every entry under `root`: type, mode, owner, inode, mtime, size and a
/// hash of the content (or the link target). Any rewrite changes the
/// inode (install.sh writes through a temp file) or the mtime.
pub fn listing(root: &Path) -> Result<BTreeMap<String, String>> {
    let mut entries = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in fs::read_dir(&dir)? {
            let path = entry?.path();
            let meta = fs::symlink_metadata(&path)?;
            let rel = path.strip_prefix(root)?.display().to_string();
            let content = if meta.file_type().is_symlink() {
                format!("-> {}", fs::read_link(&path)?.display())
            } else if meta.is_dir() {
                stack.push(path.clone());
                "dir".to_owned()
            } else {
                let mut hasher = std::collections::hash_map::DefaultHasher::new();
                fs::read(&path)?.hash(&mut hasher);
                format!("file {:016x}", hasher.finish())
            };
            entries.insert(
                rel,
                format!(
                    "{content} mode {:o} uid {} ino {} mtime {}.{:09} size {}",
                    meta.mode(),
                    meta.uid(),
                    meta.ino(),
                    meta.mtime(),
                    meta.mtime_nsec(),
                    meta.size()
                ),
            );
        }
    }
    Ok(entries)
}

/// `path`'s permission bits.
pub fn mode(path: &Path) -> Result<u32> {
    Ok(fs::metadata(path)
        .with_context(|| format!("{} is missing", path.display()))?
        .mode()
        & 0o7777)
}

/// Prefix of the labs' names in these tests (`mwd<pid>-reg1`, …).
pub const LAB_PREFIX: &str = "mwd";

/// The hosts of the tests' labs: 3 servers, 2 apps and the gateway.
const LAB_HOSTS: [&str; 6] = ["reg1", "reg2", "reg3", "app1", "app2", "gw"];

/// A lab made by `deploy-vm/lab/up.sh` with its own name prefix and dir,
/// so it cannot clash with another lab (or another test's). Dropping it
/// runs `down.sh`, also when the test fails.
#[derive(Debug)]
pub struct Lab {
    /// `mwd<pid>`: unique to this test process, so concurrent runs of the
    /// suite cannot touch each other's labs.
    prefix: String,
    net: &'static str,
    dir: tempfile::TempDir,
    down: bool,
}

impl Lab {
    /// A lab on `<net>.0/24` (not started: run `up.sh`), after sweeping
    /// the labs of dead test processes.
    pub fn new(net: &'static str) -> Result<Self> {
        let lab = Lab {
            prefix: format!("{LAB_PREFIX}{}", std::process::id()),
            net,
            dir: tempfile::tempdir()?,
            down: false,
        };
        lab.sweep_dead_labs()?;
        Ok(lab)
    }

    /// A test process killed before its guard could run down.sh (SIGKILL
    /// from a runner's timeout) leaves its lab behind: remove the labs
    /// whose process is gone.
    fn sweep_dead_labs(&self) -> Result<()> {
        let netns = run(
            Command::new("ip").args(["netns", "list"]),
            Duration::from_secs(10),
        )?
        .ok("ip netns list")?;
        let dead: std::collections::BTreeSet<u32> = netns
            .stdout
            .lines()
            .filter_map(|l| l.split_whitespace().next())
            .filter_map(|name| name.strip_prefix(LAB_PREFIX)?.split_once('-'))
            .filter_map(|(pid, _)| pid.parse::<u32>().ok())
            .filter(|pid| !running(*pid))
            .collect();
        for pid in dead {
            let out = run(
                Command::new(deploy_dir().join("lab/down.sh"))
                    .env("LAB_DIR", self.dir.path().join("sweep"))
                    .env("LAB_PREFIX", format!("{LAB_PREFIX}{pid}")),
                Duration::from_secs(60),
            )?;
            eprintln!(
                "swept the lab of dead test process {pid}: {}",
                out.stdout.trim()
            );
        }
        Ok(())
    }

    /// Where the lab keeps its hosts' files (`LAB_DIR`).
    pub fn lab_dir(&self) -> PathBuf {
        self.dir.path().join("lab")
    }

    /// Runs `deploy-vm/lab/<name> <args>` for this lab (3 servers, 2 apps,
    /// the gateway), within 180 s.
    pub fn script(&self, name: &str, args: &[&str]) -> Result<Outcome> {
        let bin_dir = registry_bin()
            .parent()
            .context("the binaries' directory")?
            .to_path_buf();
        run(
            Command::new(deploy_dir().join("lab").join(name))
                .args(args)
                .env("LAB_DIR", self.lab_dir())
                .env("LAB_PREFIX", &self.prefix)
                .env("LAB_NET", self.net)
                .env("LAB_SERVERS", "3")
                .env("LAB_APPS", "2")
                .env("LAB_GATEWAY", "1")
                .env("LAB_WAIT", "60")
                .env("BIN_DIR", bin_dir),
            Duration::from_secs(180),
        )
    }

    /// The address of `host` (`reg<n>`, `app<n>`, `gw`) on the lab's net.
    pub fn ip(&self, host: &str) -> String {
        let last = match host.as_bytes() {
            [b'r', b'e', b'g', n] => format!("1{}", *n as char),
            [b'a', b'p', b'p', n] => format!("2{}", *n as char),
            b"gw" => "30".to_owned(),
            _ => "1".to_owned(),
        };
        format!("{}.{last}", self.net)
    }

    /// GET `url` with curl from inside `host`'s namespace.
    pub fn curl(&self, host: &str, url: &str) -> Result<String> {
        let out = self.curl_with(host, &["-fsS", url])?;
        ensure!(
            out.status.success(),
            "GET {url} from {host}: {}",
            out.stderr.trim()
        );
        Ok(out.stdout)
    }

    /// `curl --max-time 2 <args>` from inside `host`'s namespace, whatever
    /// its outcome.
    pub fn curl_with(&self, host: &str, args: &[&str]) -> Result<Outcome> {
        run(
            Command::new("ip")
                .args(["netns", "exec", &format!("{}-{host}", self.prefix)])
                .args(["curl", "--max-time", "2"])
                .args(args),
            Duration::from_secs(10),
        )
    }

    /// `GET https://<name>/` from `from` to the lab's gateway, as an
    /// outside client does it: the name sent as SNI and `Host`, reaching
    /// the gateway's address through `--resolve` (no DNS), trusting the CA
    /// up.sh made for the lab (`gw/tls/ca.pem`).
    pub fn https_to_gateway(&self, from: &str, name: &str) -> Result<Outcome> {
        let ca = self.lab_dir().join("gw/tls/ca.pem");
        self.curl_with(
            from,
            &[
                "-sS",
                "--cacert",
                &ca.display().to_string(),
                "--resolve",
                &format!("{name}:443:{}", self.ip("gw")),
                &format!("https://{name}/"),
            ],
        )
    }

    /// `https://<app>.lab.test/` from `from` through the gateway comes back
    /// with `<app>`'s answer (within 15 s: the gateway's discovery may still
    /// be catching up).
    pub fn request_through_gateway(&self, from: &str, app: &str) -> Result<()> {
        let name = format!("{app}.lab.test");
        let got = eventually(
            &format!("{from} -> https://{name}/ through the gateway"),
            Duration::from_secs(15),
            || {
                let out = self.https_to_gateway(from, &name)?;
                ensure!(out.status.success(), "{}", out.stderr.trim());
                Ok(out.stdout)
            },
        )?;
        ensure!(
            got.trim() == format!("hello from {app}"),
            "{from} -> https://{name}/: {got:?}"
        );
        Ok(())
    }

    /// The leader `host`'s server names.
    pub fn leader_seen_by(&self, host: &str) -> Result<String> {
        let text = self.curl(
            host,
            &format!("http://{}:8500/v1/status/leader", self.ip(host)),
        )?;
        let leader: String = serde_json::from_str(&text)?;
        ensure!(!leader.is_empty(), "{host} knows no leader");
        Ok(leader)
    }

    /// The leader every server names, once they all name the same one.
    pub fn agreed_leader(&self) -> Result<String> {
        let leaders: Vec<String> = ["reg1", "reg2", "reg3"]
            .iter()
            .map(|h| self.leader_seen_by(h))
            .collect::<Result<_>>()?;
        ensure!(
            leaders.iter().all(|l| *l == leaders[0]),
            "servers disagree: {leaders:?}"
        );
        Ok(leaders[0].clone())
    }

    /// A GET to `from`'s upstream listener on `port` comes back with `body`
    /// (within 15 s: discovery may still be catching up).
    pub fn request_flows(&self, from: &str, port: u16, body: &str) -> Result<()> {
        let url = format!("http://127.0.0.1:{port}/");
        let got = eventually(
            &format!("{from} -> {url} through the sidecars"),
            Duration::from_secs(15),
            || self.curl(from, &url),
        )?;
        ensure!(got.trim() == body, "{from} -> {url}: {got:?}");
        Ok(())
    }

    /// Names of the lab's namespaces and links left on the host.
    pub fn leftovers(&self) -> Result<Vec<String>> {
        let netns = run(
            Command::new("ip").args(["netns", "list"]),
            Duration::from_secs(10),
        )?
        .ok("ip netns list")?;
        let links = run(
            Command::new("ip").args(["-o", "link", "show"]),
            Duration::from_secs(10),
        )?
        .ok("ip link show")?;
        let mine = format!("{}-", self.prefix);
        Ok(netns
            .stdout
            .lines()
            .filter_map(|l| l.split_whitespace().next())
            .chain(
                links
                    .stdout
                    .lines()
                    .filter_map(|l| l.split(": ").nth(1))
                    .map(|name| name.split('@').next().unwrap_or(name)),
            )
            .filter(|name| name.starts_with(&mine))
            .map(str::to_owned)
            .collect())
    }

    /// The pids up.sh recorded.
    pub fn pids(&self) -> Result<Vec<u32>> {
        let mut pids = Vec::new();
        for host in LAB_HOSTS {
            for entry in fs::read_dir(self.lab_dir().join(host))? {
                let path = entry?.path();
                if path.extension().is_some_and(|e| e == "pid") {
                    pids.push(fs::read_to_string(&path)?.trim().parse()?);
                }
            }
        }
        Ok(pids)
    }

    /// `down.sh`, then checks that nothing of the lab is left.
    pub fn down(mut self) -> Result<()> {
        let pids = self.pids()?;
        self.script("down.sh", &[])?.ok("down.sh")?;
        self.down = true;
        let left = self.leftovers()?;
        ensure!(left.is_empty(), "down.sh left {left:?}");
        ensure!(!self.lab_dir().exists(), "down.sh left the lab dir");
        let alive: Vec<u32> = pids.into_iter().filter(|pid| running(*pid)).collect();
        ensure!(alive.is_empty(), "processes left running: {alive:?}");
        // down.sh after down.sh is fine.
        self.script("down.sh", &[])?.ok("a second down.sh")?;
        Ok(())
    }

    /// The last lines of every host's logs, to stderr.
    pub fn print_logs(&self) {
        for host in LAB_HOSTS {
            for name in ["registry", "app", "sidecar", "gateway"] {
                let path = self.lab_dir().join(host).join(format!("{name}.log"));
                if let Ok(text) = fs::read_to_string(&path) {
                    let lines: Vec<&str> = text.lines().collect();
                    eprintln!("--- {} (last 20 lines)", path.display());
                    eprintln!("{}", lines[lines.len().saturating_sub(20)..].join("\n"));
                }
            }
        }
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if self.down {
            return;
        }
        self.print_logs();
        match self.script("down.sh", &[]) {
            Ok(out) if out.status.success() => {}
            Ok(out) => eprintln!("down.sh failed: {}{}", out.stdout, out.stderr),
            Err(e) => eprintln!("down.sh failed: {e:#}"),
        }
    }
}

/// A throw-away container booted with the host's systemd as its init: its
/// own mount, PID, network, UTS, IPC and cgroup namespaces, its root an
/// overlay of / on a tmpfs. Dropping it kills its init, which ends every
/// process in it; the mounts go with its mount namespace.
#[derive(Debug)]
pub struct Container {
    /// `unshare`, whose child is the container's init.
    unshare: std::process::Child,
    /// The init's pid as seen from here.
    init: u32,
    dir: tempfile::TempDir,
}

impl Container {
    /// Boots systemd after `install.sh <install_args>` ran inside, with
    /// `files` (absolute path in the container, content) put in place
    /// first, root:meshwork 0640 (configs, certificates and keys the units
    /// read as the meshwork user); `Ok(None)` when systemd cannot boot here.
    pub fn boot(files: &[(&str, String)], install_args: &[&str]) -> Result<Option<Self>> {
        let dir = tempfile::tempdir()?;
        let repo = repo().canonicalize()?;
        let bins = registry_bin()
            .parent()
            .context("the binaries' directory")?
            .canonicalize()?;
        let mut put_files = String::new();
        let mut own_files = String::new();
        for (i, (path, content)) in files.iter().enumerate() {
            ensure!(
                path.starts_with('/') && !path.contains(char::is_whitespace),
                "{path:?}: an absolute path without spaces"
            );
            fs::write(dir.path().join(format!("file-{i}")), content)?;
            put_files.push_str(&format!("install -D -m 0640 $D/file-{i} $R{path}\n"));
            own_files.push_str(&format!(" {path}"));
        }
        // The meshwork user exists once install.sh ran.
        if !own_files.is_empty() {
            own_files = format!("chroot $R chgrp meshwork{own_files}\n");
        }
        let script = format!(
            r#"set -euo pipefail
D={dir}
mkdir -p $D/mnt
mount -t tmpfs -o size=3g tmpfs $D/mnt
mkdir -p $D/mnt/up $D/mnt/work $D/mnt/root
mount -t overlay overlay -o lowerdir=/,upperdir=$D/mnt/up,workdir=$D/mnt/work $D/mnt/root
R=$D/mnt/root
# The checkout and the binaries may live on other mounts than /.
for p in {repo} {bins}; do mkdir -p "$R$p"; mount --bind "$p" "$R$p"; done
{put_files}chroot $R {repo}/deploy-vm/install.sh --bin-dir {bins} {install_args}
{own_files}# What cannot work in a container.
chroot $R systemctl mask --quiet systemd-udevd.service systemd-udev-trigger.service \
    systemd-networkd.service systemd-logind.service getty.target console-getty.service || true
mount -t proc proc $R/proc
mount --rbind /sys $R/sys
mount --rbind /dev $R/dev
echo booting
exec chroot $R /lib/systemd/systemd --system --unit=multi-user.target --log-target=console
"#,
            dir = dir.path().display(),
            repo = repo.display(),
            bins = bins.display(),
            install_args = install_args.join(" "),
        );
        fs::write(dir.path().join("boot.sh"), script)?;
        let console = fs::File::create(dir.path().join("console.log"))?;
        let unshare = Command::new("unshare")
            .args(["--mount", "--pid", "--net", "--uts", "--ipc", "--cgroup"])
            .args(["--fork", "--propagation", "private", "bash"])
            .arg(dir.path().join("boot.sh"))
            .stdin(Stdio::null())
            .stdout(console.try_clone()?)
            .stderr(console)
            .spawn()?;
        let unshare_pid = unshare.id();
        let mut container = Container {
            unshare,
            init: 0,
            dir,
        };
        // The init is unshare's only child.
        container.init = eventually("the container's init", Duration::from_secs(30), || {
            let children =
                fs::read_to_string(format!("/proc/{unshare_pid}/task/{unshare_pid}/children"))?;
            let pid: u32 = children
                .split_whitespace()
                .next()
                .context("no child yet")?
                .parse()?;
            let comm = fs::read_to_string(format!("/proc/{pid}/comm"))?;
            ensure!(comm.trim() == "systemd", "init is still {}", comm.trim());
            Ok(pid)
        })
        .map_err(|e| anyhow::anyhow!("{e:#}\n{}", container.console()))?;
        // `--wait` returns once start-up is over: running, or degraded when
        // some unit of the host's failed in here (not ours; checked below).
        // Until systemd has made /run/systemd/system and its bus, systemctl
        // says it was not booted or cannot connect: ask again.
        let deadline = Instant::now() + Duration::from_secs(60);
        let state = loop {
            let state = container.exec(&["systemctl", "is-system-running", "--wait"], 90)?;
            if matches!(state.stdout.trim(), "running" | "degraded") || Instant::now() >= deadline {
                break state;
            }
            std::thread::sleep(Duration::from_millis(250));
        };
        if !matches!(state.stdout.trim(), "running" | "degraded") {
            eprintln!(
                "skipped: systemd does not boot in a container here ({}{})",
                state.stdout.trim(),
                state.stderr.trim()
            );
            return Ok(None);
        }
        Ok(Some(container))
    }

    /// What the container's init printed.
    pub fn console(&self) -> String {
        fs::read_to_string(self.dir.path().join("console.log")).unwrap_or_default()
    }

    /// Runs a command inside the container.
    pub fn exec(&self, args: &[&str], limit_secs: u64) -> Result<Outcome> {
        run(
            Command::new("nsenter")
                .arg(format!("--target={}", self.init))
                .args([
                    "--mount", "--pid", "--net", "--uts", "--ipc", "--root", "--wd=/",
                ])
                .args(args),
            Duration::from_secs(limit_secs),
        )
    }

    /// `systemctl show -p …` as a map.
    pub fn show(&self, unit: &str) -> Result<BTreeMap<String, String>> {
        let out = self
            .exec(
                &[
                    "systemctl",
                    "show",
                    "-p",
                    "ActiveState,SubState,Type,User,NRestarts,ExecMainStatus,StatusText,MainPID",
                    unit,
                ],
                20,
            )?
            .ok("systemctl show")?;
        Ok(out
            .stdout
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect())
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        // SIGKILL to a PID namespace's init ends everything in it.
        if self.init != 0 {
            let _ = Command::new("kill")
                .args(["-KILL", &self.init.to_string()])
                .status();
        }
        let _ = self.unshare.kill();
        let _ = self.unshare.wait();
    }
}
