//! A throw-away network of Linux network namespaces for the fault suite:
//! one namespace per host, all on one bridge that lives in a "switch"
//! namespace of its own, addresses in 198.18.0.0/15. Nothing is created in
//! the caller's namespace (no bridge, no veth, no route), so the host's own
//! network is never touched and the lab has no uplink.
//!
//! It owns the namespaces and the links and firewall rules inside them,
//! and removes all of it on drop (also on panic). It does not own the
//! processes started in it; whoever started them ends them first (a process
//! still running in a namespace at drop is killed, as a last resort, by the
//! pids the kernel lists for that namespace).
//!
//! Every lab's names start with `mwf<pid>x`, so a lab left behind by a test
//! process that died without unwinding (SIGKILL by a test runner's timeout)
//! is recognised by its dead pid and swept by the next [`Lab::create`].
//!
//! Needs root, `ip` (iproute2), and `iptables` for one-way loss and
//! server-to-server splits (installed by scripts/install-test-deps.sh).
//!
//! Why not `deploy-vm/lab/{up,down,partition,heal}.sh`: the lab is one
//! long-lived fleet per `LAB_DIR` (fixed names, its bridge and an address in
//! the host's namespace, release binaries, sidecars and apps), whose
//! processes belong to the scripts (pid files, restart by re-running
//! up.sh). The fault suite needs to own its servers (kill -9 and restart
//! two hundred times in a couple of minutes, SIGSTOP, a fourth server that
//! joins and leaves), to cut servers apart while the client still reaches
//! both sides and to drop one direction only (partition.sh moves whole
//! hosts to another bridge, client included), to run several labs at once
//! with unique names, and to remove everything when a test panics. It
//! follows the lab's layout (one namespace per host, `eth0` on a bridge,
//! 198.18.0.0/15, no uplink).

use std::net::Ipv4Addr;
use std::os::fd::AsFd;
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};

/// Prefix of every name a lab makes.
const PREFIX: &str = "mwf";

/// One host of the lab.
#[derive(Debug, Clone)]
pub struct Host {
    /// Short name, e.g. `n1` or `client`.
    pub name: String,
    /// Its network namespace.
    pub netns: String,
    pub ip: Ipv4Addr,
    /// Its port on the bridge (in the switch namespace).
    port: String,
}

/// The namespaces, bridge and links of one lab.
#[derive(Debug)]
pub struct Lab {
    /// `mwf<pid>x<random>`: the prefix of every namespace of this lab.
    pub prefix: String,
    switch: String,
    pub hosts: Vec<Host>,
    /// Whether `iptables` works here (one-way loss and splits need it).
    pub iptables: bool,
}

/// Runs `ip` (or another tool) and fails with its stderr.
fn run(program: &str, args: &[&str]) -> Result<()> {
    let output = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("run {program}"))?;
    if !output.status.success() {
        bail!(
            "{program} {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(())
}

fn output(program: &str, args: &[&str]) -> Result<String> {
    let output = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("run {program}"))?;
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// Pids of the processes in a namespace, as `ip netns pids` lists them.
fn pids_in(netns: &str) -> Vec<u32> {
    output("ip", &["netns", "pids", netns])
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

/// SIGKILL by pid to every process in `netns`, then deletes it.
fn remove_netns(netns: &str) {
    for pid in pids_in(netns) {
        let _ = run("kill", &["-KILL", &pid.to_string()]);
    }
    let _ = run("ip", &["netns", "del", netns]);
}

/// Removes labs whose creating process is gone.
fn sweep_dead_labs() {
    let list = output("ip", &["netns", "list"]).unwrap_or_default();
    for name in list.lines().filter_map(|l| l.split_whitespace().next()) {
        let Some(rest) = name.strip_prefix(PREFIX) else {
            continue;
        };
        let Some((pid, _)) = rest.split_once('x') else {
            continue;
        };
        let Ok(pid) = pid.parse::<u32>() else {
            continue;
        };
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            eprintln!("netns: removing {name}, left behind by dead process {pid}");
            remove_netns(name);
        }
    }
}

impl Lab {
    /// Whether this machine can make labs: root and `ip netns` work.
    pub fn available() -> bool {
        rustix::process::geteuid().is_root()
            && Command::new("ip")
                .args(["netns", "list"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
    }

    /// Makes one namespace per host name, each with `eth0` on the lab's
    /// bridge and the address `198.18.<subnet>.<i + 1>/24`.
    pub fn create(names: &[&str]) -> Result<Lab> {
        sweep_dead_labs();
        let random = std::collections::hash_map::RandomState::new();
        let salt = std::hash::BuildHasher::hash_one(&random, std::time::SystemTime::now());
        let prefix = format!("{PREFIX}{}x{:04x}", std::process::id(), salt & 0xffff);
        // Any /24 of 198.18.0.0/15 will do: each lab is its own network.
        let subnet = (salt >> 16) as u8;
        let switch = format!("{prefix}-sw");
        let mut lab = Lab {
            prefix: prefix.clone(),
            switch: switch.clone(),
            hosts: Vec::new(),
            iptables: false,
        };
        run("ip", &["netns", "add", &switch])?;
        run("ip", &["-n", &switch, "link", "set", "lo", "up"])?;
        run(
            "ip",
            &["-n", &switch, "link", "add", "br0", "type", "bridge"],
        )?;
        run("ip", &["-n", &switch, "link", "set", "br0", "up"])?;
        for (i, name) in names.iter().enumerate() {
            lab.add_host(name, Ipv4Addr::new(198, 18, subnet, i as u8 + 1))?;
        }
        lab.iptables = names.first().is_some_and(|first| {
            let netns = format!("{prefix}-{first}");
            run(
                "ip",
                &["netns", "exec", &netns, "iptables", "-w", "-L", "-n"],
            )
            .is_ok()
        });
        Ok(lab)
    }

    fn add_host(&mut self, name: &str, ip: Ipv4Addr) -> Result<()> {
        let netns = format!("{}-{name}", self.prefix);
        let port = format!("p{}", self.hosts.len() + 1);
        run("ip", &["netns", "add", &netns])?;
        self.hosts.push(Host {
            name: name.to_owned(),
            netns: netns.clone(),
            ip,
            port: port.clone(),
        });
        let sw = self.switch.as_str();
        run(
            "ip",
            &[
                "-n", sw, "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns",
                &netns,
            ],
        )?;
        run("ip", &["-n", sw, "link", "set", &port, "master", "br0"])?;
        run("ip", &["-n", sw, "link", "set", &port, "up"])?;
        run("ip", &["-n", &netns, "link", "set", "lo", "up"])?;
        run(
            "ip",
            &[
                "-n",
                &netns,
                "addr",
                "add",
                &format!("{ip}/24"),
                "dev",
                "eth0",
            ],
        )?;
        run("ip", &["-n", &netns, "link", "set", "eth0", "up"])?;
        Ok(())
    }

    pub fn host(&self, name: &str) -> Result<&Host> {
        self.hosts
            .iter()
            .find(|h| h.name == name)
            .with_context(|| format!("no host {name} in the lab"))
    }

    /// A command that runs `program` inside `host`'s namespace, killed by
    /// the kernel if the thread that started it goes away (so a test
    /// process killed without unwinding leaves no server running).
    pub fn command(
        &self,
        host: &str,
        program: &std::path::Path,
    ) -> Result<tokio::process::Command> {
        let netns = &self.host(host)?.netns;
        let mut command = tokio::process::Command::new("ip");
        command
            .args([
                "netns",
                "exec",
                netns,
                "setpriv",
                "--pdeathsig",
                "KILL",
                "--",
            ])
            .arg(program);
        Ok(command)
    }

    /// Moves the calling thread into `host`'s network namespace: sockets
    /// it opens from then on live there. Threads it spawns afterwards
    /// inherit the namespace.
    pub fn enter(&self, host: &str) -> Result<()> {
        let path = format!("/run/netns/{}", self.host(host)?.netns);
        let file = std::fs::File::open(&path).with_context(|| format!("open {path}"))?;
        rustix::thread::move_into_link_name_space(
            file.as_fd(),
            Some(rustix::thread::LinkNameSpaceType::Network),
        )
        .with_context(|| format!("setns into {path}"))?;
        Ok(())
    }

    /// Takes `host` off the bridge (its port goes down): nobody reaches it.
    pub fn isolate(&self, host: &str) -> Result<()> {
        let port = &self.host(host)?.port;
        run("ip", &["-n", &self.switch, "link", "set", port, "down"])
    }

    /// `to` drops every packet from `from` (one direction only).
    pub fn drop_from(&self, from: &str, to: &str) -> Result<()> {
        if !self.iptables {
            bail!("iptables is not available (scripts/install-test-deps.sh installs it)");
        }
        let source = self.host(from)?.ip.to_string();
        let netns = &self.host(to)?.netns;
        run(
            "ip",
            &[
                "netns", "exec", netns, "iptables", "-w", "-A", "INPUT", "-s", &source, "-j",
                "DROP",
            ],
        )
    }

    /// Cuts `a` and `b` apart in both directions (each still reaches the
    /// hosts not named).
    pub fn split(&self, a: &[&str], b: &[&str]) -> Result<()> {
        for x in a {
            for y in b {
                self.drop_from(x, y)?;
                self.drop_from(y, x)?;
            }
        }
        Ok(())
    }

    /// Undoes every fault: all ports up, all firewall rules gone.
    pub fn heal(&self) -> Result<()> {
        for host in &self.hosts {
            run("ip", &["-n", &self.switch, "link", "set", &host.port, "up"])?;
            if self.iptables {
                run(
                    "ip",
                    &[
                        "netns",
                        "exec",
                        &host.netns,
                        "iptables",
                        "-w",
                        "-F",
                        "INPUT",
                    ],
                )?;
            }
        }
        Ok(())
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for host in &self.hosts {
            remove_netns(&host.netns);
        }
        remove_netns(&self.switch);
    }
}
