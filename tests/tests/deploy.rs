//! `deploy-vm/`: the systemd units pass `systemd-analyze verify`,
//! `install.sh` into a temp `DESTDIR` is idempotent and keeps the
//! operator's configs, the example configs are accepted by the binaries,
//! and the network-namespace lab comes up (a leader, every app registered
//! and passing), carries requests app -> sidecar -> sidecar -> app both
//! ways, is safe to bring up again, survives partitions and a killed server,
//! heals, and `down.sh` leaves nothing behind.
//!
//! The lab needs root (network namespaces), `ip`, `curl` and `python3`;
//! the install and unit tests need `systemctl` and `systemd-analyze`.
//! Without them a test is skipped with the reason printed, except under CI
//! (`CI` set), where a missing prerequisite is a failure.

use std::collections::BTreeMap;
use std::fs;
use std::hash::{Hash, Hasher};
use std::io::{Read, Seek};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use meshwork_tests::registry_bin;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn deploy_dir() -> PathBuf {
    repo().join("deploy-vm")
}

/// What a finished command printed.
#[derive(Debug)]
struct Outcome {
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

impl Outcome {
    fn ok(self, what: &str) -> Result<Self> {
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
fn run(cmd: &mut Command, limit: Duration) -> Result<Outcome> {
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

fn which(tool: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(tool))
            .find(|p| p.metadata().is_ok_and(|m| m.is_file()))
    })
}

fn is_root() -> bool {
    fs::read_to_string("/proc/self/status").is_ok_and(|status| {
        status
            .lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .and_then(|ids| ids.split_whitespace().next().map(|uid| uid == "0"))
            .unwrap_or(false)
    })
}

/// `Some(reason)` when the test cannot run here; under CI that is a failure.
fn missing(need_root: bool, tools: &[&str]) -> Option<String> {
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

/// Stand-ins for the binaries: install.sh only copies them, and
/// `systemd-analyze verify` only needs them to exist and be executable.
fn stub_binaries(dir: &Path, marker: &str) -> Result<PathBuf> {
    let bin = dir.join("bin");
    fs::create_dir_all(&bin)?;
    for name in ["meshwork-registry", "meshwork-sidecar", "meshctl"] {
        let path = bin.join(name);
        fs::write(&path, format!("#!/bin/sh\n# {name} {marker}\nexit 0\n"))?;
        fs::set_permissions(&path, fs::Permissions::from_mode(0o755))?;
    }
    Ok(bin)
}

fn install(destdir: &Path, bin_dir: &Path, args: &[&str]) -> Result<Outcome> {
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
fn listing(root: &Path) -> Result<BTreeMap<String, String>> {
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

fn mode(path: &Path) -> Result<u32> {
    Ok(fs::metadata(path)
        .with_context(|| format!("{} is missing", path.display()))?
        .mode()
        & 0o7777)
}

#[test]
fn install_sh_twice_into_destdir_changes_nothing_the_second_time() -> Result<()> {
    if missing(false, &["systemctl"]).is_some() {
        return Ok(());
    }
    let dir = tempfile::tempdir()?;
    let bins = stub_binaries(dir.path(), "build 1")?;
    let root = dir.path().join("root");

    let first = install(&root, &bins, &["--registry", "--sidecar", "web"])?.ok("install.sh")?;
    assert!(first.stdout.contains("change(s)"), "{}", first.stdout);

    // What it put where.
    for bin in ["meshwork-registry", "meshwork-sidecar", "meshctl"] {
        assert_eq!(mode(&root.join("usr/local/bin").join(bin))?, 0o755, "{bin}");
    }
    let units = root.join("etc/systemd/system");
    for unit in ["meshwork-registry.service", "meshwork-sidecar@.service"] {
        assert_eq!(
            fs::read_to_string(units.join(unit))?,
            fs::read_to_string(deploy_dir().join("systemd").join(unit))?,
            "{unit} is installed unchanged"
        );
    }
    assert_eq!(
        fs::read_link(units.join("multi-user.target.wants/meshwork-registry.service"))?,
        Path::new("/etc/systemd/system/meshwork-registry.service")
    );
    assert_eq!(
        fs::read_link(units.join("multi-user.target.wants/meshwork-sidecar@web.service"))?,
        Path::new("/etc/systemd/system/meshwork-sidecar@.service")
    );
    assert_eq!(mode(&root.join("etc/meshwork"))?, 0o750);
    assert_eq!(mode(&root.join("etc/meshwork/sidecar"))?, 0o750);
    assert_eq!(mode(&root.join("var/lib/meshwork"))?, 0o750);
    assert_eq!(mode(&root.join("etc/meshwork/registry.toml"))?, 0o640);
    assert_eq!(
        fs::read_to_string(root.join("etc/meshwork/registry.toml"))?,
        fs::read_to_string(deploy_dir().join("config/registry-1.toml"))?
    );
    assert_eq!(
        fs::read_to_string(root.join("etc/meshwork/sidecar/web.toml"))?,
        fs::read_to_string(deploy_dir().join("config/web.toml"))?
    );
    for example in [
        "registry-1.toml",
        "registry-2.toml",
        "registry-3.toml",
        "web.toml",
    ] {
        assert!(
            root.join("usr/local/share/meshwork/examples")
                .join(example)
                .is_file(),
            "{example}"
        );
    }
    let sysusers = fs::read_to_string(root.join("etc/sysusers.d/meshwork.conf"))?;
    assert!(sysusers.contains("u meshwork"), "{sysusers}");

    // The second run: not one entry changes, not even an mtime.
    let before = listing(&root)?;
    let second = install(&root, &bins, &["--registry", "--sidecar", "web"])?.ok("install.sh")?;
    assert!(
        second.stdout.contains("nothing to change"),
        "{}",
        second.stdout
    );
    assert_eq!(listing(&root)?, before, "the second run changed something");

    // An operator's config is theirs; a new build replaces the binaries.
    let mine = "node_id = 2\n# edited by the operator\n";
    fs::write(root.join("etc/meshwork/registry.toml"), mine)?;
    let bins = stub_binaries(dir.path(), "build 2")?;
    let third = install(&root, &bins, &["--node-id", "3"])?.ok("install.sh")?;
    assert_eq!(
        fs::read_to_string(root.join("etc/meshwork/registry.toml"))?,
        mine
    );
    assert!(
        fs::read_to_string(root.join("usr/local/bin/meshwork-sidecar"))?.contains("build 2"),
        "{}",
        third.stdout
    );
    let written: Vec<&str> = third
        .stdout
        .lines()
        .filter_map(|l| l.trim().strip_prefix("wrote "))
        .collect();
    assert_eq!(written.len(), 3, "{}", third.stdout);
    assert!(
        written.iter().all(|p| p.contains("/usr/local/bin/")),
        "only the binaries change: {}",
        third.stdout
    );
    Ok(())
}

#[test]
fn install_sh_refuses_bad_input_with_a_clear_message() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let root = dir.path().join("root");

    let out = install(&root, &dir.path().join("nowhere"), &[])?;
    assert!(!out.status.success());
    assert!(
        out.stderr.contains("not found") && out.stderr.contains("cargo build"),
        "{}",
        out.stderr
    );

    let bins = stub_binaries(dir.path(), "x")?;
    let out = install(&root, &bins, &["--bogus"])?;
    assert!(!out.status.success());
    assert!(
        out.stderr.contains("unknown argument '--bogus'"),
        "{}",
        out.stderr
    );

    let out = install(&root, &bins, &["--node-id", "7"])?;
    assert!(!out.status.success());
    assert!(
        out.stderr.contains("no example config for --node-id 7"),
        "{}",
        out.stderr
    );

    let out = install(&root, &bins, &["--now"])?;
    assert!(!out.status.success());
    assert!(out.stderr.contains("--now"), "{}", out.stderr);
    Ok(())
}

#[test]
fn install_sh_follows_prefix_in_the_units() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let bins = stub_binaries(dir.path(), "prefix")?;
    let root = dir.path().join("root");
    run(
        Command::new(deploy_dir().join("install.sh"))
            .args(["--bin-dir", &bins.display().to_string()])
            .env("DESTDIR", &root)
            .env("PREFIX", "/opt/meshwork"),
        Duration::from_secs(60),
    )?
    .ok("install.sh with PREFIX")?;
    assert!(root.join("opt/meshwork/bin/meshwork-registry").is_file());
    assert!(
        root.join("opt/meshwork/share/meshwork/examples/web.toml")
            .is_file()
    );
    for unit in ["meshwork-registry.service", "meshwork-sidecar@.service"] {
        let text = fs::read_to_string(root.join("etc/systemd/system").join(unit))?;
        let exec = text
            .lines()
            .find(|l| l.starts_with("ExecStart="))
            .context("ExecStart")?;
        assert!(exec.starts_with("ExecStart=/opt/meshwork/bin/"), "{exec}");
    }
    Ok(())
}

#[test]
fn units_pass_systemd_analyze_verify() -> Result<()> {
    if missing(false, &["systemd-analyze", "systemctl"]).is_some() {
        return Ok(());
    }
    let dir = tempfile::tempdir()?;
    let bins = stub_binaries(dir.path(), "verify")?;
    let root = dir.path().join("root");
    install(&root, &bins, &["--registry", "--sidecar", "web"])?.ok("install.sh")?;

    // verify --root resolves ExecStart= and the units' dependencies
    // (sysinit.target, …) inside the root, so give it systemd's own units.
    let system_units = ["/usr/lib/systemd/system", "/lib/systemd/system"]
        .into_iter()
        .map(Path::new)
        .find(|p| p.join("sysinit.target").exists())
        .context("systemd's unit directory (with sysinit.target) not found")?;
    // ExecReload= names /bin/kill, which every target system has.
    fs::create_dir_all(root.join("bin"))?;
    fs::write(root.join("bin/kill"), "#!/bin/sh\n")?;
    fs::set_permissions(root.join("bin/kill"), fs::Permissions::from_mode(0o755))?;
    fs::create_dir_all(root.join("usr/lib/systemd"))?;
    run(
        Command::new("cp").args([
            "-a",
            &system_units.display().to_string(),
            &root.join("usr/lib/systemd/system").display().to_string(),
        ]),
        Duration::from_secs(30),
    )?
    .ok("copy systemd's units")?;

    let out = run(
        Command::new("systemd-analyze").args([
            "verify",
            "--man=no",
            &format!("--root={}", root.display()),
            "meshwork-registry.service",
            "meshwork-sidecar@web.service",
        ]),
        Duration::from_secs(60),
    )?
    .ok("systemd-analyze verify")?;
    // verify exits 0 on warnings ("Unknown key name …, ignoring"): none allowed.
    let complaints: Vec<&str> = out
        .stderr
        .lines()
        .chain(out.stdout.lines())
        .filter(|l| l.contains("meshwork"))
        .collect();
    assert!(complaints.is_empty(), "verify complained:\n{}", out.stderr);

    // The check has teeth: a unit whose binary is missing fails.
    fs::remove_file(root.join("usr/local/bin/meshwork-sidecar"))?;
    let out = run(
        Command::new("systemd-analyze").args([
            "verify",
            "--man=no",
            &format!("--root={}", root.display()),
            "meshwork-sidecar@web.service",
        ]),
        Duration::from_secs(60),
    )?;
    assert!(!out.status.success(), "{}", out.stderr);
    assert!(out.stderr.contains("meshwork-sidecar"), "{}", out.stderr);
    Ok(())
}

#[test]
fn example_configs_are_accepted_by_the_binaries() -> Result<()> {
    // The sidecar example, through the sidecar's own parser.
    let text = fs::read_to_string(deploy_dir().join("config/web.toml"))?;
    let web = meshwork_sidecar::config::Config::parse("web.toml", &text)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    assert_eq!(web.service_name, "web");
    let inbound = web.inbound.context("web.toml has [inbound]")?;
    assert_eq!(inbound.listen.port(), 21000);
    assert_eq!(inbound.app.to_string(), "127.0.0.1:8080");
    assert_eq!(web.upstreams.len(), 1);
    assert_eq!(web.upstreams[0].name, "api");

    // Each registry example, through the registry binary: a bad file exits
    // 2 at once; a good one binds (on loopback, port 0, flags win over the
    // file) and prints its banner.
    for n in 1..=3 {
        let dir = tempfile::tempdir()?;
        let config = deploy_dir().join(format!("config/registry-{n}.toml"));
        let stdout_path = dir.path().join("stdout");
        // The examples name peers on 10.0.0.x: as root, keep the server in
        // a network namespace of its own so it cannot dial them for real.
        let isolated = is_root() && which("unshare").is_some() && which("ip").is_some();
        let mut command = if isolated {
            let mut c = Command::new("unshare");
            c.args([
                "--net",
                "sh",
                "-c",
                "ip link set lo up && exec \"$0\" \"$@\"",
            ])
            .arg(registry_bin());
            c
        } else {
            Command::new(registry_bin())
        };
        let mut child = command
            .arg("--config")
            .arg(&config)
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .args(["--http-addr", "127.0.0.1:0", "--grpc-addr", "127.0.0.1:0"])
            .args(["--raft-addr", "127.0.0.1:0", "--dns-addr", "127.0.0.1:0"])
            .stdin(Stdio::null())
            .stdout(fs::File::create(&stdout_path)?)
            .stderr(fs::File::create(dir.path().join("stderr"))?)
            .spawn()?;
        let deadline = Instant::now() + Duration::from_secs(20);
        let banner = format!("node {n} (registry-{n})");
        let result = loop {
            let stdout = fs::read_to_string(&stdout_path).unwrap_or_default();
            if stdout.contains(&banner) {
                break Ok(());
            }
            if let Some(status) = child.try_wait()? {
                break Err(anyhow::anyhow!(
                    "registry-{n}.toml refused ({status}): {}",
                    fs::read_to_string(dir.path().join("stderr")).unwrap_or_default()
                ));
            }
            if Instant::now() >= deadline {
                break Err(anyhow::anyhow!("registry-{n}.toml: no banner within 20s"));
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let _ = child.kill();
        let _ = child.wait();
        result?;
    }
    Ok(())
}

/// Prefix of the labs' names in these tests (`mwd<pid>-reg1`, …).
const LAB_PREFIX: &str = "mwd";

/// A lab made by `deploy-vm/lab/up.sh` with its own name prefix and dir,
/// so it cannot clash with another lab (or another test's). Dropping it
/// runs `down.sh`, also when the test fails.
#[derive(Debug)]
struct Lab {
    /// `mwd<pid>`: unique to this test process, so concurrent runs of the
    /// suite cannot touch each other's labs.
    prefix: String,
    net: &'static str,
    dir: tempfile::TempDir,
    down: bool,
}

impl Lab {
    fn new(net: &'static str) -> Result<Self> {
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

    fn lab_dir(&self) -> PathBuf {
        self.dir.path().join("lab")
    }

    fn script(&self, name: &str, args: &[&str]) -> Result<Outcome> {
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
                .env("LAB_WAIT", "60")
                .env("BIN_DIR", bin_dir),
            Duration::from_secs(180),
        )
    }

    fn ip(&self, host: &str) -> String {
        let last = match host.as_bytes() {
            [b'r', b'e', b'g', n] => format!("1{}", *n as char),
            [b'a', b'p', b'p', n] => format!("2{}", *n as char),
            _ => "1".to_owned(),
        };
        format!("{}.{last}", self.net)
    }

    /// GET `url` with curl from inside `host`'s namespace.
    fn curl(&self, host: &str, url: &str) -> Result<String> {
        let out = run(
            Command::new("ip").args([
                "netns",
                "exec",
                &format!("{}-{host}", self.prefix),
                "curl",
                "-fsS",
                "--max-time",
                "2",
                url,
            ]),
            Duration::from_secs(10),
        )?;
        ensure!(
            out.status.success(),
            "GET {url} from {host}: {}",
            out.stderr.trim()
        );
        Ok(out.stdout)
    }

    fn leader_seen_by(&self, host: &str) -> Result<String> {
        let text = self.curl(
            host,
            &format!("http://{}:8500/v1/status/leader", self.ip(host)),
        )?;
        let leader: String = serde_json::from_str(&text)?;
        ensure!(!leader.is_empty(), "{host} knows no leader");
        Ok(leader)
    }

    /// The leader every server names, once they all name the same one.
    fn agreed_leader(&self) -> Result<String> {
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
    fn request_flows(&self, from: &str, port: u16, body: &str) -> Result<()> {
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
    fn leftovers(&self) -> Result<Vec<String>> {
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
    fn pids(&self) -> Result<Vec<u32>> {
        let mut pids = Vec::new();
        for host in ["reg1", "reg2", "reg3", "app1", "app2"] {
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
    fn down(mut self) -> Result<()> {
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

    fn print_logs(&self) {
        for host in ["reg1", "reg2", "reg3", "app1", "app2"] {
            for name in ["registry", "app", "sidecar"] {
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

/// Whether `pid` is a live process (a zombie waiting for its parent,
/// which for the lab's daemons is PID 1, to reap it is not).
fn running(pid: u32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        // "pid (comm) S …": the state follows the last ')'.
        stat.rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X")
    })
}

/// Polls `check` every 200 ms until it succeeds, at most `limit` long.
fn eventually<T>(what: &str, limit: Duration, mut check: impl FnMut() -> Result<T>) -> Result<T> {
    let deadline = Instant::now() + limit;
    loop {
        match check() {
            Ok(value) => return Ok(value),
            Err(e) if Instant::now() >= deadline => {
                bail!("{what}: still failing after {limit:?}: {e:#}")
            }
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    }
}

#[test]
fn lab_comes_up_carries_traffic_survives_partitions_and_goes_down() -> Result<()> {
    if missing(true, &["ip", "curl", "python3"]).is_some() {
        return Ok(());
    }
    let lab = Lab::new("198.19.250")?;
    let up = lab.script("up.sh", &[])?.ok("up.sh")?;
    assert!(up.stdout.contains("Meshwork lab is up"), "{}", up.stdout);

    // One leader, the same for all three servers, and three peers.
    lab.agreed_leader()?;
    let peers: Vec<String> = serde_json::from_str(&lab.curl(
        "reg2",
        &format!("http://{}:8500/v1/status/peers", lab.ip("reg2")),
    )?)?;
    assert_eq!(peers.len(), 3, "{peers:?}");

    // Both apps registered by their sidecars, at their hosts' addresses,
    // every check passing (asked of a follower or the leader alike).
    for app in ["app1", "app2"] {
        let text = lab.curl(
            "reg3",
            &format!(
                "http://{}:8500/v1/health/service/{app}?passing",
                lab.ip("reg3")
            ),
        )?;
        let entries: serde_json::Value = serde_json::from_str(&text)?;
        let entry = &entries[0];
        assert_eq!(entry["Service"]["ID"], app, "{text}");
        assert_eq!(entry["Service"]["Address"], lab.ip(app), "{text}");
        assert_eq!(entry["Node"]["Node"], app, "{text}");
        let checks = entry["Checks"].as_array().context("Checks")?;
        assert!(!checks.is_empty(), "{text}");
        assert!(checks.iter().all(|c| c["Status"] == "passing"), "{text}");
    }

    // The demo apps answer inside their hosts, and only there.
    assert_eq!(
        lab.curl("app1", "http://127.0.0.1:8080/")?.trim(),
        "hello from app1"
    );
    assert!(
        lab.curl("app1", &format!("http://{}:8080/", lab.ip("app2")))
            .is_err()
    );

    // app1 calls its upstream "app2" on 127.0.0.1:9102: app1's sidecar ->
    // app2's sidecar (inbound :21000) -> app2's app; and the other way.
    lab.request_flows("app1", 9102, "hello from app2")?;
    lab.request_flows("app2", 9101, "hello from app1")?;

    // up.sh again: everything is already running, nothing restarts.
    let pids = lab.pids()?;
    let again = lab.script("up.sh", &[])?.ok("the second up.sh")?;
    assert_eq!(
        again.stdout.matches("already running").count(),
        7,
        "{}",
        again.stdout
    );
    assert_eq!(lab.pids()?, pids);

    // Cut reg1 off: app1 cannot reach it, the other two keep a leader.
    lab.script("partition.sh", &["reg1"])?.ok("partition.sh")?;
    let reg1 = format!("http://{}:8500/v1/status/leader", lab.ip("reg1"));
    assert!(lab.curl("app1", &reg1).is_err(), "reg1 is cut off");
    eventually(
        "a leader among reg2 and reg3",
        Duration::from_secs(20),
        || {
            let leader = lab.leader_seen_by("reg2")?;
            ensure!(
                leader != format!("{}:8300", lab.ip("reg1")),
                "reg2 still names reg1"
            );
            ensure!(lab.leader_seen_by("reg3")? == leader, "reg3 disagrees");
            Ok(())
        },
    )?;
    // Isolate app2 as well: nobody reaches its sidecar.
    lab.script("partition.sh", &["--isolate", "app2"])?
        .ok("partition.sh --isolate")?;
    assert!(
        lab.curl("reg2", &format!("http://{}:21000/", lab.ip("app2")))
            .is_err(),
        "app2 is isolated"
    );

    // A server killed during the partition: up.sh starts it again (with
    // its data), without waiting for a leader it may not reach.
    let reg3_pid = fs::read_to_string(lab.lab_dir().join("reg3/registry.pid"))?;
    run(
        Command::new("kill").args(["-KILL", reg3_pid.trim()]),
        Duration::from_secs(5),
    )?
    .ok("kill reg3")?;
    let restart = lab.script("up.sh", &[])?.ok("up.sh during a partition")?;
    assert!(
        restart.stdout.contains("reg3: started registry") && restart.stdout.contains("partitioned"),
        "{}",
        restart.stdout
    );

    // Healed: one leader for all three again, traffic flows again.
    lab.script("heal.sh", &[])?.ok("heal.sh")?;
    eventually("one leader after heal", Duration::from_secs(30), || {
        lab.agreed_leader()
    })?;
    lab.curl("app1", &reg1)?;
    lab.request_flows("app1", 9102, "hello from app2")?;

    lab.down()
}

/// install.sh without DESTDIR, as on a VM: run in a private mount namespace
/// where /etc, /usr/local and /var/lib are overlays on a tmpfs, so the user,
/// the files and their owners are real but the host is left untouched.
#[test]
fn install_sh_on_a_real_root_creates_the_user_and_sets_owners() -> Result<()> {
    if missing(true, &["unshare", "systemctl", "getent"]).is_some() {
        return Ok(());
    }
    let host_files = || {
        [
            "/etc/sysusers.d/meshwork.conf",
            "/etc/meshwork",
            "/usr/local/share/meshwork",
        ]
        .map(|p| Path::new(p).exists())
    };
    let host_before = host_files();
    let dir = tempfile::tempdir()?;
    let bins = stub_binaries(dir.path(), "real root")?;
    let scratch = dir.path().join("overlays");
    fs::create_dir_all(&scratch)?;
    // Every mount must succeed before install.sh runs (set -e), or it
    // would write to the real /etc.
    let script = format!(
        r#"set -euo pipefail
mount -t tmpfs tmpfs {scratch}
for d in etc usr/local var/lib; do
    n=${{d//\//_}}
    mkdir -p {scratch}/$n-up {scratch}/$n-work
    mount -t overlay overlay -o lowerdir=/$d,upperdir={scratch}/$n-up,workdir={scratch}/$n-work /$d
done
echo mounted
{install} --bin-dir {bins} --node-id 2 --registry
echo "--- user"
getent passwd meshwork
echo "--- owners"
stat -c '%n %U:%G %a' /etc/meshwork /etc/meshwork/registry.toml /etc/meshwork/sidecar/web.toml /var/lib/meshwork /usr/local/bin/meshwork-registry
echo "--- again"
{install} --bin-dir {bins} --node-id 2 --registry
"#,
        scratch = scratch.display(),
        install = deploy_dir().join("install.sh").display(),
        bins = bins.display(),
    );
    let out = run(
        Command::new("unshare").args([
            "--mount",
            "--propagation",
            "private",
            "bash",
            "-c",
            &script,
        ]),
        Duration::from_secs(60),
    )?;
    if !out.stdout.contains("mounted") {
        // Overlays on tmpfs need a kernel and container that allow them.
        assert!(
            std::env::var_os("CI").is_none(),
            "cannot make the overlays under CI: {}",
            out.stderr
        );
        eprintln!(
            "skipped: cannot make the overlays here: {}",
            out.stderr.trim()
        );
        return Ok(());
    }
    let out = out.ok("install.sh on the overlaid root")?;
    let user = out
        .stdout
        .split("--- user\n")
        .nth(1)
        .and_then(|rest| rest.lines().next())
        .context("no user line")?;
    assert!(
        user.starts_with("meshwork:x:") && user.contains(":/var/lib/meshwork:"),
        "{user}"
    );
    for expected in [
        "/etc/meshwork root:meshwork 750",
        "/etc/meshwork/registry.toml root:meshwork 640",
        "/etc/meshwork/sidecar/web.toml root:meshwork 640",
        "/var/lib/meshwork meshwork:meshwork 750",
        "/usr/local/bin/meshwork-registry root:root 755",
    ] {
        assert!(out.stdout.contains(expected), "{expected}:\n{}", out.stdout);
    }
    let again = out.stdout.split("--- again\n").nth(1).unwrap_or_default();
    assert!(again.contains("nothing to change"), "{}", out.stdout);
    // And the host itself was not touched.
    assert_eq!(host_files(), host_before, "the host's own files changed");
    Ok(())
}

/// A throw-away container booted with the host's systemd as its init: its
/// own mount, PID, network, UTS, IPC and cgroup namespaces, its root an
/// overlay of / on a tmpfs. Dropping it kills its init, which ends every
/// process in it; the mounts go with its mount namespace.
#[derive(Debug)]
struct Container {
    /// `unshare`, whose child is the container's init.
    unshare: std::process::Child,
    /// The init's pid as seen from here.
    init: u32,
    dir: tempfile::TempDir,
}

impl Container {
    /// Boots systemd after `install.sh --registry --sidecar web` ran inside
    /// with the given configs; `Ok(None)` when systemd cannot boot here.
    fn boot(registry_toml: &str, web_toml: &str) -> Result<Option<Self>> {
        let dir = tempfile::tempdir()?;
        let repo = repo().canonicalize()?;
        let bins = registry_bin()
            .parent()
            .context("the binaries' directory")?
            .canonicalize()?;
        fs::write(dir.path().join("registry.toml"), registry_toml)?;
        fs::write(dir.path().join("web.toml"), web_toml)?;
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
mkdir -p $R/etc/meshwork/sidecar
cp $D/registry.toml $R/etc/meshwork/registry.toml
cp $D/web.toml $R/etc/meshwork/sidecar/web.toml
chroot $R {repo}/deploy-vm/install.sh --bin-dir {bins} --registry --sidecar web
# What cannot work in a container.
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

    fn console(&self) -> String {
        fs::read_to_string(self.dir.path().join("console.log")).unwrap_or_default()
    }

    /// Runs a command inside the container.
    fn exec(&self, args: &[&str], limit_secs: u64) -> Result<Outcome> {
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
    fn show(&self, unit: &str) -> Result<BTreeMap<String, String>> {
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

/// The units as systemd runs them: both become active through READY=1 as
/// the `meshwork` user under all the hardening; a crash is restarted;
/// `systemctl reload` reloads the registry in place; a stray SIGHUP does not
/// leave the sidecar stopped; a stopping sidecar deregisters; a bad config
/// fails without a restart loop.
#[test]
fn units_run_under_systemd() -> Result<()> {
    if missing(true, &["unshare", "nsenter", "chroot", "systemctl"]).is_some() {
        return Ok(());
    }
    if !Path::new("/lib/systemd/systemd").exists() {
        eprintln!("skipped: no /lib/systemd/systemd to boot");
        return Ok(());
    }
    let registry_toml = r#"node_id = 1
data_dir = "/var/lib/meshwork"
http_addr = "127.0.0.1:8500"
grpc_addr = "127.0.0.1:8502"
dns_addr = "127.0.0.1:8600"
raft_addr = "127.0.0.1:8300"
peers = ["1@127.0.0.1:8300"]
"#;
    // The sidecar fronts the registry's REST port as its "app", so a
    // request to its upstream goes sidecar -> sidecar -> registry.
    let web_toml = r#"[registry]
addresses = ["127.0.0.1:8502"]
[service]
name = "web"
port = 8500
[[service.checks]]
tcp = "127.0.0.1:8500"
interval = "1s"
[session]
node = "box"
[inbound]
listen = "127.0.0.1:21000"
app = "127.0.0.1:8500"
[[upstreams]]
name = "web"
listen = "127.0.0.1:9191"
"#;
    let Some(container) = Container::boot(registry_toml, web_toml)? else {
        return Ok(());
    };
    let result = check_units(&container);
    if result.is_err() {
        if let Ok(out) = container.exec(&["journalctl", "--no-pager", "-n", "60"], 20) {
            eprintln!("--- journal\n{}", out.stdout);
        }
        eprintln!("--- console\n{}", container.console());
    }
    result
}

fn check_units(c: &Container) -> Result<()> {
    let registry = "meshwork-registry.service";
    let sidecar = "meshwork-sidecar@web.service";
    for unit in [registry, sidecar] {
        let show = eventually(&format!("{unit} active"), Duration::from_secs(30), || {
            let show = c.show(unit)?;
            ensure!(
                show.get("SubState").map(String::as_str) == Some("running"),
                "{show:?}"
            );
            Ok(show)
        })?;
        assert_eq!(show["Type"], "notify", "{show:?}");
        assert_eq!(show["User"], "meshwork", "{show:?}");
        assert!(!show["StatusText"].is_empty(), "{show:?}");
    }
    // Traffic through the sidecar (its upstream "web" is itself).
    eventually(
        "a request through the sidecar",
        Duration::from_secs(20),
        || {
            let out = c.exec(
                &[
                    "curl",
                    "-fsS",
                    "-m",
                    "2",
                    "http://127.0.0.1:9191/v1/status/leader",
                ],
                10,
            )?;
            ensure!(out.stdout.contains("127.0.0.1:8300"), "{out:?}");
            Ok(())
        },
    )?;

    // kill -9: restarted.
    c.exec(&["systemctl", "kill", "-s", "KILL", registry], 20)?
        .ok("systemctl kill")?;
    eventually(
        "the registry back after kill -9",
        Duration::from_secs(30),
        || {
            let show = c.show(registry)?;
            ensure!(
                show["SubState"] == "running" && show["NRestarts"] == "1",
                "{show:?}"
            );
            Ok(())
        },
    )?;
    // systemctl reload: the same process rereads its config (registry and
    // sidecar alike).
    let reload_in_place = |unit: &str, logged: &str| -> Result<()> {
        let pid_before = c.show(unit)?["MainPID"].clone();
        c.exec(&["systemctl", "reload", unit], 30)?
            .ok("systemctl reload")?;
        eventually(
            &format!("{unit}'s reload in the journal"),
            Duration::from_secs(20),
            || {
                let journal = c
                    .exec(&["journalctl", "--no-pager", "-o", "cat", "-u", unit], 20)?
                    .ok("journalctl")?;
                ensure!(journal.stdout.contains(logged), "not yet");
                Ok(())
            },
        )?;
        let show = c.show(unit)?;
        assert_eq!(show["SubState"], "running", "{show:?}");
        assert_eq!(show["MainPID"], pid_before, "reload restarted it: {show:?}");
        Ok(())
    };
    reload_in_place(registry, "reloaded")?;
    assert_eq!(c.show(registry)?["NRestarts"], "1");
    reload_in_place(sidecar, "config reloaded")?;

    // Stopping the sidecar deregisters its instance.
    c.exec(&["systemctl", "stop", sidecar], 60)?
        .ok("systemctl stop")?;
    let journal = c
        .exec(
            &["journalctl", "--no-pager", "-o", "cat", "-u", sidecar],
            20,
        )?
        .ok("journalctl")?;
    assert!(
        journal.stdout.contains("deregistered"),
        "{}",
        journal.stdout
    );
    assert!(
        !journal.stdout.contains('\u{1b}'),
        "colour codes in the journal"
    );
    eventually("web gone from the catalog", Duration::from_secs(20), || {
        let out = c.exec(
            &[
                "curl",
                "-fsS",
                "-m",
                "2",
                "http://127.0.0.1:8500/v1/catalog/services",
            ],
            10,
        )?;
        let services: serde_json::Value = serde_json::from_str(&out.stdout)?;
        ensure!(services.get("web").is_none(), "{}", out.stdout);
        Ok(())
    })?;

    // A bad config: the start fails with exit 2 and is not retried.
    c.exec(
        &[
            "sh",
            "-c",
            "echo 'bogus = 1' >> /etc/meshwork/registry.toml",
        ],
        10,
    )?
    .ok("break the config")?;
    let restart = c.exec(&["systemctl", "restart", registry], 60)?;
    assert!(!restart.status.success(), "{restart:?}");
    std::thread::sleep(Duration::from_secs(5)); // two RestartSec= periods
    let show = c.show(registry)?;
    assert_eq!(show["ActiveState"], "failed", "{show:?}");
    assert_eq!(show["ExecMainStatus"], "2", "{show:?}");
    assert_eq!(show["NRestarts"], "0", "no restart loop: {show:?}");
    Ok(())
}
