//! `deploy-vm/`: the systemd units pass `systemd-analyze verify` (the
//! gateway's keeps the sidecar's hardening, with only the capability to
//! bind ports below 1024), `install.sh` into a temp `DESTDIR` is idempotent
//! and keeps the operator's configs, the example configs (the gateway's
//! and its ingress-gateway entry too) are accepted by the binaries, the
//! units run under a booted systemd (the gateway serving HTTPS on 443 as the
//! meshwork user), and the network-namespace lab comes up (a leader, every
//! app registered and passing, the gateway), carries requests app ->
//! sidecar -> sidecar -> app both ways and outside client -> gateway (HTTPS,
//! by name) -> sidecar -> app, is safe to bring up again, survives
//! partitions and a killed server, heals, and `down.sh` leaves nothing
//! behind.
//!
//! The lab needs root (network namespaces), `ip`, `curl` and `python3`;
//! the install and unit tests need `systemctl` and `systemd-analyze`.
//! Without them a test is skipped with the reason printed, except under CI
//! (`CI` set), where a missing prerequisite is a failure.
//!
//! The plumbing (commands with time limits, the lab, the container) is in
//! `meshwork_tests::{host, deploy}`.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use meshwork_tests::deploy::{Container, Lab, deploy_dir, install, listing, mode, stub_binaries};
use meshwork_tests::host::{is_root, missing, run, which};
use meshwork_tests::http::http_client;
use meshwork_tests::{Cluster, eventually, meshctl_tls, registry_bin, sidecar_bin};

#[test]
fn install_sh_twice_into_destdir_changes_nothing_the_second_time() -> Result<()> {
    if missing(false, &["systemctl"]).is_some() {
        return Ok(());
    }
    let dir = tempfile::tempdir()?;
    let bins = stub_binaries(dir.path(), "build 1")?;
    let root = dir.path().join("root");

    let args = ["--registry", "--sidecar", "web", "--gateway", "edge"];
    let first = install(&root, &bins, &args)?.ok("install.sh")?;
    assert!(first.stdout.contains("change(s)"), "{}", first.stdout);

    // What it put where.
    for bin in ["meshwork-registry", "meshwork-sidecar", "meshctl"] {
        assert_eq!(mode(&root.join("usr/local/bin").join(bin))?, 0o755, "{bin}");
    }
    let units = root.join("etc/systemd/system");
    for unit in UNITS {
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
    assert_eq!(
        fs::read_link(units.join("multi-user.target.wants/meshwork-gateway@edge.service"))?,
        Path::new("/etc/systemd/system/meshwork-gateway@.service")
    );
    assert_eq!(mode(&root.join("etc/meshwork"))?, 0o750);
    assert_eq!(mode(&root.join("etc/meshwork/sidecar"))?, 0o750);
    assert_eq!(mode(&root.join("etc/meshwork/gateway"))?, 0o750);
    assert_eq!(mode(&root.join("etc/meshwork/gateway/edge.toml"))?, 0o640);
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
    assert_eq!(
        fs::read_to_string(root.join("etc/meshwork/gateway/edge.toml"))?,
        fs::read_to_string(deploy_dir().join("config/edge.toml"))?
    );
    for example in [
        "registry-1.toml",
        "registry-2.toml",
        "registry-3.toml",
        "web.toml",
        "edge.toml",
        "edge-ingress.json",
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
    let second = install(&root, &bins, &args)?.ok("install.sh")?;
    assert!(
        second.stdout.contains("nothing to change"),
        "{}",
        second.stdout
    );
    assert_eq!(listing(&root)?, before, "the second run changed something");

    // An operator's config is theirs; a new build replaces the binaries.
    let mine = "node_id = 2\n# edited by the operator\n";
    fs::write(root.join("etc/meshwork/registry.toml"), mine)?;
    fs::write(root.join("etc/meshwork/gateway/edge.toml"), mine)?;
    let bins = stub_binaries(dir.path(), "build 2")?;
    let third = install(&root, &bins, &["--node-id", "3"])?.ok("install.sh")?;
    assert_eq!(
        fs::read_to_string(root.join("etc/meshwork/registry.toml"))?,
        mine
    );
    assert_eq!(
        fs::read_to_string(root.join("etc/meshwork/gateway/edge.toml"))?,
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
    for unit in UNITS {
        let text = fs::read_to_string(root.join("etc/systemd/system").join(unit))?;
        let exec = text
            .lines()
            .find(|l| l.starts_with("ExecStart="))
            .context("ExecStart")?;
        assert!(exec.starts_with("ExecStart=/opt/meshwork/bin/"), "{exec}");
        // ExecReload's --check-config too: no line names /usr/local.
        assert!(!text.contains("/usr/local/"), "{unit}:\n{text}");
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
    install(
        &root,
        &bins,
        &["--registry", "--sidecar", "web", "--gateway", "edge"],
    )?
    .ok("install.sh")?;

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
            "meshwork-gateway@edge.service",
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

/// The units the repository ships.
const UNITS: [&str; 3] = [
    "meshwork-registry.service",
    "meshwork-sidecar@.service",
    "meshwork-gateway@.service",
];

/// `[Service]` settings of a unit file (comments and blank lines dropped),
/// in order.
fn service_settings(unit: &str) -> Result<Vec<String>> {
    let text = fs::read_to_string(deploy_dir().join("systemd").join(unit))?;
    Ok(text
        .lines()
        .skip_while(|l| *l != "[Service]")
        .skip(1)
        .take_while(|l| !l.starts_with('['))
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_owned)
        .collect())
}

/// The gateway's unit is the sidecar's, on its own config, without a
/// state dir (it keeps none, and one in /var/lib/meshwork would stop a
/// new registry server there: `units_run_under_systemd` runs both), with
/// one capability more: binding ports below 1024 (ambient, so it runs as
/// the meshwork user; bounding, so it can gain no other). Every hardening
/// setting of the sidecar's is there.
#[test]
fn the_gateway_unit_is_the_sidecars_with_only_the_low_port_capability() -> Result<()> {
    let sidecar = service_settings("meshwork-sidecar@.service")?;
    let gateway = service_settings("meshwork-gateway@.service")?;
    let expected: Vec<String> = sidecar
        .iter()
        .filter(|l| *l != "CapabilityBoundingSet=" && !l.starts_with("StateDirectory"))
        .map(|l| l.replace("/etc/meshwork/sidecar/", "/etc/meshwork/gateway/"))
        .collect();
    let missing: Vec<&String> = expected.iter().filter(|l| !gateway.contains(l)).collect();
    assert!(missing.is_empty(), "not in the gateway's unit: {missing:?}");
    let extra: Vec<&String> = gateway.iter().filter(|l| !expected.contains(l)).collect();
    assert_eq!(
        extra,
        [
            "AmbientCapabilities=CAP_NET_BIND_SERVICE",
            "CapabilityBoundingSet=CAP_NET_BIND_SERVICE"
        ],
        "the gateway's unit differs from the sidecar's in more than its capability"
    );
    assert!(
        gateway.contains(
            &"ExecStart=/usr/local/bin/meshwork-sidecar --config /etc/meshwork/gateway/%i.toml"
                .to_owned()
        ),
        "{gateway:?}"
    );
    assert!(
        !gateway.iter().any(|l| l.starts_with("StateDirectory")),
        "{gateway:?}"
    );
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
        // The examples name certificates under /etc/meshwork/tls (an
        // operator copies them there): here, ones made by meshctl.
        let certs = dir.path().join("tls");
        fs::create_dir(&certs)?;
        for args in [&["ca", "create"][..], &["cert", "create", "--server"][..]] {
            let out = Command::new(meshwork_tests::meshctl_bin())
                .arg("tls")
                .args(args)
                .arg("--dir")
                .arg(&certs)
                .output()?;
            assert!(out.status.success(), "meshctl tls {args:?}: {out:?}");
        }
        let mut child = command
            .arg("--config")
            .arg(&config)
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .arg("--tls-ca")
            .arg(certs.join("meshwork-agent-ca.pem"))
            .arg("--tls-cert")
            .arg(certs.join("dc1-server-meshwork-0.pem"))
            .arg("--tls-key")
            .arg(certs.join("dc1-server-meshwork-0-key.pem"))
            .args([
                "--https-addr",
                "127.0.0.1:0",
                "--grpc-tls-addr",
                "127.0.0.1:0",
            ])
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

/// `meshwork-sidecar --config FILE --check-config`: (exit code, stdout,
/// stderr).
fn check_config(file: &Path) -> Result<(i32, String, String)> {
    let out = run(
        Command::new(sidecar_bin())
            .arg("--config")
            .arg(file)
            .arg("--check-config"),
        Duration::from_secs(30),
    )?;
    Ok((out.status.code().unwrap_or(-1), out.stdout, out.stderr))
}

/// The certificates the example edge.toml names (shop.pem, shop-key.pem,
/// api.pem, api-key.pem) and the CA that signed them (ca.pem), made by
/// meshctl in `dir`.
fn edge_certificates(dir: &Path) -> Result<()> {
    fs::create_dir_all(dir)?;
    meshctl_tls(dir, &["ca", "create"])?;
    fs::copy(dir.join("meshwork-agent-ca.pem"), dir.join("ca.pem"))?;
    // meshctl names a certificate with the first free number: 0, once the
    // one before is renamed.
    for (name, host) in [("shop", "shop.example.com"), ("api", "*.api.example.com")] {
        meshctl_tls(
            dir,
            &["cert", "create", "--server", "--additional-dnsname", host],
        )?;
        for (made, wanted) in [
            ("dc1-server-meshwork-0.pem", format!("{name}.pem")),
            ("dc1-server-meshwork-0-key.pem", format!("{name}-key.pem")),
        ] {
            fs::rename(dir.join(made), dir.join(wanted))?;
        }
    }
    Ok(())
}

/// The sidecar and gateway examples pass the binary's `--check-config`
/// (what `systemctl reload` runs first); the gateway's with certificates
/// where it names them (here made by meshctl), and not without them or
/// with a key that is not its certificate's. The example ingress-gateway
/// entry is taken by a registry at `PUT /v1/config`.
#[tokio::test]
async fn gateway_examples_are_accepted_by_the_binaries() -> Result<()> {
    let (code, stdout, stderr) = check_config(&deploy_dir().join("config/web.toml"))?;
    assert_eq!(code, 0, "web.toml: {stdout}{stderr}");
    assert!(stdout.contains("valid"), "{stdout}");

    // As shipped, edge.toml names certificates under /etc/meshwork/tls,
    // which an operator puts there: without them the file is refused,
    // naming the file (exit 64, so the unit does not restart in a loop).
    let example = deploy_dir().join("config/edge.toml");
    let (code, stdout, stderr) = check_config(&example)?;
    assert_eq!(
        code, 64,
        "edge.toml without its certificates: {stdout}{stderr}"
    );
    assert!(stderr.contains("/etc/meshwork/tls/shop.pem"), "{stderr}");

    // With the certificates where it says (moved under a temp dir).
    let dir = tempfile::tempdir()?;
    let tls = dir.path().join("tls");
    edge_certificates(&tls)?;
    let text = fs::read_to_string(&example)?;
    ensure!(
        text.contains("\"/etc/meshwork/tls/"),
        "edge.toml names no certificate"
    );
    let edge = dir.path().join("edge.toml");
    fs::write(
        &edge,
        text.replace("\"/etc/meshwork/tls/", &format!("\"{}/", tls.display())),
    )?;
    let (code, stdout, stderr) = check_config(&edge)?;
    assert_eq!(code, 0, "edge.toml: {stdout}{stderr}");
    assert!(
        stdout.contains("valid") && stdout.contains("edge"),
        "{stdout}"
    );
    // A key that is not its certificate's: refused, naming both.
    fs::copy(tls.join("api-key.pem"), tls.join("shop-key.pem"))?;
    let (code, stdout, stderr) = check_config(&edge)?;
    assert_eq!(code, 64, "a mismatched key: {stdout}{stderr}");
    assert!(stderr.contains("shop-key.pem"), "{stderr}");

    // The entry the operator PUTs: taken by a registry server as it is.
    let entry: serde_json::Value = serde_json::from_str(&fs::read_to_string(
        deploy_dir().join("config/edge-ingress.json"),
    )?)?;
    let cluster = Cluster::start(1, &[]).await?;
    let registry = cluster.servers[0].http();
    let put = http_client()?
        .put(format!("{registry}/v1/config"))
        .json(&entry)
        .send()
        .await?;
    let status = put.status();
    let body = put.text().await?;
    assert_eq!(status, 200, "PUT edge-ingress.json: {body}");
    let stored: serde_json::Value = http_client()?
        .get(format!("{registry}/v1/config/ingress-gateway/edge"))
        .send()
        .await?
        .json()
        .await?;
    assert_eq!(stored["Listeners"], entry["Listeners"], "{stored}");
    cluster.done();
    Ok(())
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

    // The gateway, in a namespace of its own, registered as Consul
    // registers an ingress gateway, at its host's address.
    let text = lab.curl(
        "reg2",
        &format!("http://{}:8500/v1/catalog/service/edge", lab.ip("reg2")),
    )?;
    let edge: serde_json::Value = serde_json::from_str(&text)?;
    assert_eq!(edge[0]["ServiceKind"], "ingress-gateway", "{text}");
    assert_eq!(edge[0]["ServiceAddress"], lab.ip("gw"), "{text}");
    assert_eq!(edge[0]["ServicePort"], 443, "{text}");
    // Outside clients (hosts other than the gateway's) reach each app over
    // HTTPS by its name: the gateway terminates TLS with the lab's
    // certificate for *.lab.test and routes by host into the mesh (mutual
    // TLS to the app's sidecar).
    lab.request_through_gateway("reg1", "app1")?;
    lab.request_through_gateway("reg3", "app2")?;
    lab.request_through_gateway("app1", "app2")?;
    // TLS 1.3 with the lab's certificate, HTTP/2 by ALPN.
    let out = lab
        .https_to_gateway("reg1", "app2.lab.test")?
        .ok("https to the gateway")?;
    assert_eq!(out.stdout.trim(), "hello from app2");
    let ca = lab.lab_dir().join("gw/tls/ca.pem").display().to_string();
    let resolve = format!("app1.lab.test:443:{}", lab.ip("gw"));
    let out = lab
        .curl_with(
            "reg2",
            &[
                "-sS",
                "-o",
                "/dev/null",
                "-w",
                "%{http_version} %{ssl_verify_result}",
                "--cacert",
                &ca,
                "--resolve",
                &resolve,
                "https://app1.lab.test/",
            ],
        )?
        .ok("https to the gateway")?;
    assert_eq!(out.stdout, "2 0", "HTTP version and certificate check");
    // Plain HTTP on :80, routed by Host; a host no service has: 404.
    let plain = format!("http://{}:80/", lab.ip("gw"));
    let out = lab
        .curl_with("app2", &["-fsS", "-H", "Host: app1.lab.test", &plain])?
        .ok("http to the gateway")?;
    assert_eq!(out.stdout.trim(), "hello from app1");
    let out = lab.curl_with(
        "app2",
        &[
            "-sS",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "-H",
            "Host: nobody.lab.test",
            &plain,
        ],
    )?;
    assert_eq!(out.stdout, "404", "{}", out.stderr);
    // The entry up.sh wrote is in the registry.
    let text = lab.curl(
        "reg1",
        &format!(
            "http://{}:8500/v1/config/ingress-gateway/edge",
            lab.ip("reg1")
        ),
    )?;
    let entry: serde_json::Value = serde_json::from_str(&text)?;
    assert_eq!(entry["Listeners"][0]["Port"], 443, "{text}");

    // up.sh again: everything is already running, nothing restarts, the
    // gateway's entry is left as it is.
    let pids = lab.pids()?;
    let again = lab.script("up.sh", &[])?.ok("the second up.sh")?;
    assert_eq!(
        again.stdout.matches("already running").count(),
        8,
        "{}",
        again.stdout
    );
    assert!(again.stdout.contains("left as it is"), "{}", again.stdout);
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
    lab.request_through_gateway("reg2", "app2")?;

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

/// The units as systemd runs them: all three become active through READY=1
/// as the `meshwork` user under all the hardening; a crash is restarted;
/// `systemctl reload` reloads the registry in place; a stray SIGHUP does not
/// leave the sidecar stopped; a stopping sidecar deregisters; a bad config
/// fails without a restart loop. The gateway runs the example edge.toml
/// (only its registry addresses changed) with the example ingress-gateway
/// entry: HTTPS on 443 as the meshwork user, with no capability but
/// binding low ports; a reload with a broken certificate fails and keeps
/// it serving.
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
    let edge_toml = fs::read_to_string(deploy_dir().join("config/edge.toml"))?;
    let addresses = edge_toml
        .lines()
        .find(|l| l.starts_with("addresses = "))
        .context("edge.toml names its registry servers")?;
    let edge_toml = edge_toml.replace(addresses, r#"addresses = ["127.0.0.1:8502"]"#);
    let certs = tempfile::tempdir()?;
    edge_certificates(certs.path())?;
    let mut files = vec![
        ("/etc/meshwork/registry.toml", registry_toml.to_owned()),
        ("/etc/meshwork/sidecar/web.toml", web_toml.to_owned()),
        ("/etc/meshwork/gateway/edge.toml", edge_toml),
    ];
    for (name, path) in [
        ("ca.pem", "/etc/meshwork/tls/ca.pem"),
        ("shop.pem", "/etc/meshwork/tls/shop.pem"),
        ("shop-key.pem", "/etc/meshwork/tls/shop-key.pem"),
        ("api.pem", "/etc/meshwork/tls/api.pem"),
        ("api-key.pem", "/etc/meshwork/tls/api-key.pem"),
    ] {
        files.push((path, fs::read_to_string(certs.path().join(name))?));
    }
    let install_args = ["--registry", "--sidecar", "web", "--gateway", "edge"];
    let Some(container) = Container::boot(&files, &install_args)? else {
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

/// The gateway unit in the booted container: the example entry applied,
/// HTTPS on 443 into the mesh, its capabilities, reloads.
fn check_gateway(
    c: &Container,
    gateway: &str,
    reload_in_place: &dyn Fn(&str, &str) -> Result<()>,
) -> Result<()> {
    // The example entry, as install.sh put it among the examples: 443,
    // shop.example.com -> web (whose app here is the registry's REST port).
    c.exec(
        &[
            "curl",
            "-fsS",
            "-m",
            "5",
            "-X",
            "PUT",
            "--data-binary",
            "@/usr/local/share/meshwork/examples/edge-ingress.json",
            "http://127.0.0.1:8500/v1/config",
        ],
        10,
    )?
    .ok("PUT edge-ingress.json")?;
    let https = || {
        c.exec(
            &[
                "curl",
                "-fsS",
                "-m",
                "2",
                "--cacert",
                "/etc/meshwork/tls/ca.pem",
                "--resolve",
                "shop.example.com:443:127.0.0.1",
                "https://shop.example.com/v1/status/leader",
            ],
            10,
        )
    };
    eventually(
        "https://shop.example.com through the gateway",
        Duration::from_secs(20),
        || {
            let out = https()?;
            ensure!(out.stdout.contains("127.0.0.1:8300"), "{out:?}");
            Ok(())
        },
    )?;
    // Port 443 as the meshwork user: CAP_NET_BIND_SERVICE (bit 10) is its
    // one capability, effective, ambient and the bound.
    let pid = c.show(gateway)?["MainPID"].clone();
    let status = c
        .exec(&["cat", &format!("/proc/{pid}/status")], 10)?
        .ok("the gateway's /proc status")?;
    for cap in ["CapEff", "CapBnd", "CapAmb"] {
        let line = status
            .stdout
            .lines()
            .find(|l| l.starts_with(&format!("{cap}:")))
            .context("no capability line")?;
        assert!(line.ends_with("0000000000000400"), "{line}");
    }
    reload_in_place(gateway, "config reloaded")?;
    // A certificate that no longer parses: `systemctl reload` fails (its
    // --check-config), the gateway keeps running and serving.
    c.exec(
        &["sh", "-c", "echo garbage > /etc/meshwork/tls/shop.pem"],
        10,
    )?
    .ok("break the certificate")?;
    let reload = c.exec(&["systemctl", "reload", gateway], 30)?;
    assert!(!reload.status.success(), "{reload:?}");
    let show = c.show(gateway)?;
    assert_eq!(show["SubState"], "running", "{show:?}");
    assert_eq!(show["MainPID"], pid, "{show:?}");
    let out = https()?.ok("https after a refused reload")?;
    assert!(out.stdout.contains("127.0.0.1:8300"), "{out:?}");
    Ok(())
}

fn check_units(c: &Container) -> Result<()> {
    let registry = "meshwork-registry.service";
    let sidecar = "meshwork-sidecar@web.service";
    let gateway = "meshwork-gateway@edge.service";
    for unit in [registry, sidecar, gateway] {
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
    check_gateway(c, gateway, &reload_in_place)?;

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
