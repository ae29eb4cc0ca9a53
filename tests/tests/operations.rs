//! Operator procedures on real three-server clusters: snapshot save, wipe,
//! restore; damaged and foreign snapshots refused; a rolling restart under
//! steady writes loses no acknowledged write.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use meshwork_tests::{Cluster, wait_for};
use serde_json::Value;

/// Every key with its value and flags, as server `i` has it (stale read,
/// so each server answers from its own state).
async fn kv_dump(cluster: &Cluster, i: usize) -> Result<BTreeMap<String, (String, u64)>> {
    let url = format!("{}/v1/kv/?recurse&stale", cluster.servers[i].http());
    let resp = cluster.http.get(url).send().await?;
    if resp.status().as_u16() == 404 {
        return Ok(BTreeMap::new());
    }
    let entries: Value = resp.error_for_status()?.json().await?;
    let mut out = BTreeMap::new();
    for e in entries.as_array().into_iter().flatten() {
        let key = e["Key"].as_str().context("Key")?.to_owned();
        let value = e["Value"].as_str().unwrap_or("").to_owned();
        out.insert(key, (value, e["Flags"].as_u64().unwrap_or(0)));
    }
    Ok(out)
}

/// The catalog's services on server `i`: id → (name, address, port, tags,
/// check statuses), without indexes.
async fn catalog_dump(cluster: &Cluster, i: usize) -> Result<BTreeMap<String, Value>> {
    let base = cluster.servers[i].http();
    let names: Value = cluster
        .http
        .get(format!("{base}/v1/catalog/services?stale"))
        .send()
        .await?
        .json()
        .await?;
    let mut out = BTreeMap::new();
    for name in names.as_object().into_iter().flatten().map(|(n, _)| n) {
        let entries: Value = cluster
            .http
            .get(format!("{base}/v1/health/service/{name}?stale"))
            .send()
            .await?
            .json()
            .await?;
        for e in entries.as_array().into_iter().flatten() {
            let svc = &e["Service"];
            let checks: Vec<(Value, Value)> = e["Checks"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|c| (c["CheckID"].clone(), c["Status"].clone()))
                .collect();
            out.insert(
                format!("{}/{}", e["Node"]["Node"], svc["ID"]),
                serde_json::json!([
                    svc["Service"],
                    svc["Address"],
                    svc["Port"],
                    svc["Tags"],
                    svc["Meta"],
                    checks
                ]),
            );
        }
    }
    Ok(out)
}

async fn get_snapshot(cluster: &Cluster, i: usize) -> Result<Vec<u8>> {
    let resp = cluster
        .http
        .get(format!("{}/v1/snapshot", cluster.servers[i].http()))
        .send()
        .await?;
    if resp.status().as_u16() != 200 {
        bail!("GET /v1/snapshot: {} {}", resp.status(), resp.text().await?);
    }
    assert!(resp.headers().contains_key("x-consul-index"));
    Ok(resp.bytes().await?.to_vec())
}

async fn put_snapshot(
    cluster: &Cluster,
    i: usize,
    body: &[u8],
    query: &str,
) -> Result<(u16, String)> {
    let resp = cluster
        .http
        .put(format!("{}/v1/snapshot{query}", cluster.servers[i].http()))
        .body(body.to_vec())
        .send()
        .await?;
    let status = resp.status().as_u16();
    Ok((status, resp.text().await?))
}

/// Waits until every running server holds exactly `kv` and `catalog`.
async fn wait_converged(
    cluster: &Cluster,
    kv: &BTreeMap<String, (String, u64)>,
    catalog: &BTreeMap<String, Value>,
) -> Result<()> {
    for i in 0..cluster.servers.len() {
        wait_for(
            &format!("server {} to hold the restored data", i + 1),
            Duration::from_secs(20),
            || async {
                let same_kv = kv_dump(cluster, i).await.ok()? == *kv;
                let same_catalog = catalog_dump(cluster, i).await.ok()? == *catalog;
                (same_kv && same_catalog).then_some(())
            },
        )
        .await?;
    }
    Ok(())
}

#[tokio::test]
async fn snapshot_save_wipe_restore_gives_identical_data() -> Result<()> {
    let old = Cluster::start(3, &[]).await?;
    let leader = old.wait_leader(Duration::from_secs(20)).await?;
    for n in 0..50 {
        old.must_put(n % 3, &format!("cfg/{n:02}"), &format!("value {n}"))
            .await?;
    }
    // Big values too, so the restore travels as several Raft entries.
    for n in 0..20u8 {
        let value = vec![b'a' + n; 100 * 1024];
        let key = format!("big/{n:02}");
        let (status, body) = old.put(usize::from(n) % 3, &key, &value, "").await?;
        assert_eq!((status, body.trim()), (200, "true"));
    }
    let (status, _) = old
        .put(leader, "cfg/flagged", b"\x00\x01binary", "?flags=42")
        .await?;
    assert_eq!(status, 200);
    for (node, id, port) in [
        ("vm-1", "web-1", 8080),
        ("vm-2", "web-2", 8081),
        ("vm-2", "db-1", 5432),
    ] {
        let name = id.split('-').next().unwrap_or(id);
        let reg = serde_json::json!({
            "Node": node, "Address": "10.0.0.9",
            "Service": {"ID": id, "Service": name, "Tags": ["blue"], "Port": port, "Meta": {"v": "1"}},
            "Check": {"CheckID": format!("{id}-ok"), "Name": "ok", "Status": "passing", "ServiceID": id},
        });
        let resp = old
            .http
            .put(format!(
                "{}/v1/catalog/register",
                old.servers[leader].http()
            ))
            .json(&reg)
            .send()
            .await?;
        assert_eq!(resp.status().as_u16(), 200);
    }
    let resp = old
        .http
        .put(format!("{}/v1/config", old.servers[leader].http()))
        .json(&serde_json::json!({"Kind": "service-defaults", "Name": "web", "Protocol": "grpc"}))
        .send()
        .await?;
    assert_eq!(resp.text().await?.trim(), "true");
    let kv_before = kv_dump(&old, leader).await?;
    let catalog_before = catalog_dump(&old, leader).await?;
    assert_eq!(kv_before.len(), 71);
    assert_eq!(catalog_before.len(), 3);
    // Saved through a follower (forwarded consistency: a leader read).
    let archive = get_snapshot(&old, (leader + 1) % 3).await?;
    old.done();
    // Wipe: the old cluster's processes and data dirs are gone.

    let mut new = Cluster::start(3, &[]).await?;
    let leader = new.wait_leader(Duration::from_secs(20)).await?;
    new.must_put(leader, "only/in/new", "x").await?;
    let kv_new = kv_dump(&new, leader).await?;

    // Damaged archives are refused, and nothing changes.
    let truncated = &archive[..archive.len() * 2 / 3];
    let mut flipped = archive.clone();
    let middle = flipped.len() / 2;
    flipped[middle] ^= 0x20;
    for (what, body) in [
        ("truncated", truncated),
        ("corrupt", &flipped[..]),
        ("empty", &[][..]),
        ("not a snapshot", b"{\"Key\":\"x\"}"),
    ] {
        let (status, message) = put_snapshot(&new, leader, body, "?force").await?;
        assert_eq!(status, 400, "{what}: {message}");
        assert!(message.contains("nothing was changed"), "{what}: {message}");
    }
    // Another cluster's snapshot needs ?force.
    let (status, message) = put_snapshot(&new, (leader + 1) % 3, &archive, "").await?;
    assert_eq!(status, 409, "{message}");
    assert!(message.contains("?force"), "{message}");
    assert_eq!(kv_dump(&new, leader).await?, kv_new);

    // Restore through a follower; every server converges on the old data.
    let (status, message) = put_snapshot(&new, (leader + 1) % 3, &archive, "?force").await?;
    assert_eq!(status, 200, "{message}");
    wait_converged(&new, &kv_before, &catalog_before).await?;
    for server in &new.servers {
        let entry: Value = new
            .http
            .get(format!(
                "{}/v1/config/service-defaults/web?stale",
                server.http()
            ))
            .send()
            .await?
            .json()
            .await?;
        assert_eq!(
            entry["Protocol"], "grpc",
            "config entries are restored too: {entry}"
        );
    }

    // The restored cluster keeps working: indexes move forward from here.
    let before = new
        .http
        .get(format!("{}/v1/kv/cfg/00", new.servers[leader].http()))
        .send()
        .await?;
    let index: u64 = before.headers()["x-consul-index"].to_str()?.parse()?;
    new.must_put(leader, "cfg/00", "changed").await?;
    let after = new
        .http
        .get(format!("{}/v1/kv/cfg/00", new.servers[leader].http()))
        .send()
        .await?;
    let index_after: u64 = after.headers()["x-consul-index"].to_str()?.parse()?;
    assert!(index_after > index, "{index_after} <= {index}");

    // A Raft snapshot forced on every server covers the restore, so the
    // restart below comes back from snapshots.
    for server in &new.servers {
        let resp = new
            .http
            .put(format!("{}/v1/operator/raft/snapshot", server.http()))
            .send()
            .await?;
        assert_eq!(resp.status().as_u16(), 200);
        let taken: Value = resp.json().await?;
        assert!(taken["Index"].as_u64() > Some(0), "{taken}");
    }

    // And it survives a full restart (the restore is in the log / snapshot).
    for server in &mut new.servers {
        server.stop().await?;
    }
    for server in &mut new.servers {
        server.start(&[])?;
    }
    new.wait_leader(Duration::from_secs(20)).await?;
    let mut expected = kv_before.clone();
    if let Some(entry) = expected.get_mut("cfg/00") {
        entry.0 = "Y2hhbmdlZA==".into(); // base64("changed")
    }
    wait_converged(&new, &expected, &catalog_before).await?;
    new.done();
    Ok(())
}

#[tokio::test]
async fn rolling_restart_under_steady_writes_loses_no_acknowledged_write() -> Result<()> {
    let mut cluster = Cluster::start(3, &[]).await?;
    cluster.wait_leader(Duration::from_secs(20)).await?;
    let urls: Vec<String> = cluster.servers.iter().map(|s| s.http()).collect();
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()?;
    let stop = Arc::new(AtomicBool::new(false));

    // Two writers, each through its own rotation of servers; a write is
    // acknowledged only by a 200 "true".
    let mut writers = Vec::new();
    for w in 0..2usize {
        let (urls, http, stop) = (urls.clone(), http.clone(), Arc::clone(&stop));
        writers.push(tokio::spawn(async move {
            let mut acked = Vec::new();
            let mut attempts = 0u64;
            let started = Instant::now();
            while !stop.load(Ordering::Relaxed) && started.elapsed() < Duration::from_secs(180) {
                let n = attempts;
                attempts += 1;
                let url = &urls[(n as usize + w) % urls.len()];
                let key = format!("rolling/{w}/{n:06}");
                let result = http
                    .put(format!("{url}/v1/kv/{key}"))
                    .body(format!("v{n}"))
                    .send()
                    .await;
                if let Ok(resp) = result
                    && resp.status().as_u16() == 200
                    && resp.text().await.is_ok_and(|b| b.trim() == "true")
                {
                    acked.push((key, format!("v{n}")));
                } else {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
            (acked, attempts)
        }));
    }

    // Restart each server in turn (SIGTERM, start), waiting until the
    // cluster is whole again before the next.
    tokio::time::sleep(Duration::from_millis(500)).await;
    for (i, url) in urls.iter().enumerate() {
        cluster.servers[i].stop().await?;
        tokio::time::sleep(Duration::from_millis(300)).await;
        cluster.servers[i].start(&[])?;
        cluster.wait_leader(Duration::from_secs(30)).await?;
        let health_url = format!("{url}/v1/operator/autopilot/health");
        wait_for(
            &format!("server {} healthy again after its restart", i + 1),
            Duration::from_secs(30),
            || async {
                let resp = http.get(&health_url).send().await.ok()?;
                (resp.status().as_u16() == 200).then_some(())
            },
        )
        .await?;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);

    let mut acked = Vec::new();
    for writer in writers {
        let (keys, attempts) = writer.await?;
        eprintln!("writer: {} of {attempts} writes acknowledged", keys.len());
        acked.extend(keys);
    }
    assert!(
        acked.len() >= 50,
        "too few writes got through: {}",
        acked.len()
    );

    // Every acknowledged write is on every server.
    for i in 0..cluster.servers.len() {
        let want = acked.len();
        wait_for(
            &format!("server {} to hold all {want} acknowledged writes", i + 1),
            Duration::from_secs(20),
            || async {
                let dump = kv_dump(&cluster, i).await.ok()?;
                let decoded = |b64: &str| {
                    use base64::Engine;
                    base64::engine::general_purpose::STANDARD
                        .decode(b64)
                        .ok()
                        .and_then(|v| String::from_utf8(v).ok())
                };
                let missing = acked
                    .iter()
                    .filter(|(k, v)| {
                        dump.get(k).and_then(|(b, _)| decoded(b)).as_deref() != Some(v)
                    })
                    .count();
                (missing == 0).then_some(())
            },
        )
        .await?;
    }
    cluster.done();
    Ok(())
}

#[tokio::test]
async fn a_follower_catches_up_on_large_entries() -> Result<()> {
    let mut cluster = Cluster::start(3, &[]).await?;
    let leader = cluster.wait_leader(Duration::from_secs(20)).await?;
    let follower = cluster.followers(leader)[0];
    cluster.servers[follower].stop().await?;
    // 40 values of 200 KiB while it is away: ~11 MB of log entries, far
    // more than one AppendEntries can carry within a heartbeat.
    for n in 0..40u8 {
        let value = vec![b'A' + n % 26; 200 * 1024];
        let (status, body) = cluster
            .put(leader, &format!("large/{n:02}"), &value, "")
            .await?;
        assert_eq!((status, body.trim()), (200, "true"));
    }
    cluster.servers[follower].start(&[])?;
    wait_for(
        "the restarted follower to hold all 40 large values",
        Duration::from_secs(60),
        || async {
            let dump = kv_dump(&cluster, follower).await.ok()?;
            (dump.keys().filter(|k| k.starts_with("large/")).count() == 40).then_some(())
        },
    )
    .await?;
    cluster.done();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_with_a_damaged_log_refuses_unchanged_and_is_rebuilt_from_the_others() -> Result<()>
{
    let mut cluster = Cluster::start(3, &[]).await?;
    let leader = cluster.wait_leader(Duration::from_secs(20)).await?;
    for i in 0..20 {
        cluster
            .must_put(leader, &format!("damaged/k{i}"), &format!("v{i}"))
            .await?;
    }
    let f = cluster.followers(leader)[0];
    let want = kv_dump(&cluster, leader).await?;
    wait_for(
        "the follower to hold every key",
        Duration::from_secs(10),
        || async { (kv_dump(&cluster, f).await.ok()? == want).then_some(()) },
    )
    .await?;
    cluster.servers[f].stop().await?;

    // Flip one byte inside a record in the middle of its log (a committed
    // write, with committed writes after it).
    let data_dir = cluster.servers[f].data_dir.clone();
    let wal = data_dir.join("wal");
    let mut segments: Vec<_> = std::fs::read_dir(&wal)?
        .map(|e| e.map(|e| e.path()))
        .collect::<std::io::Result<_>>()?;
    segments.retain(|p| p.extension().is_some_and(|x| x == "seg"));
    segments.sort();
    let segment = segments.last().context("a WAL segment")?.clone();
    let mut bytes = std::fs::read(&segment)?;
    let mut records = Vec::new();
    let mut at = 0usize;
    while at + 16 <= bytes.len() && records.len() < 100_000 {
        let len = u32::from_le_bytes(bytes[at..at + 4].try_into()?) as usize;
        if len == 0 {
            break;
        }
        records.push(at);
        at += 16 + len;
    }
    if records.len() < 4 {
        bail!("only {} records in {}", records.len(), segment.display());
    }
    let victim = records[records.len() / 2];
    bytes[victim + 16] ^= 0x20;
    std::fs::write(&segment, &bytes)?;
    let before = meshwork_tests::damage::files(&data_dir)?;

    // It refuses to start, says why and what to do, and changes nothing.
    cluster.servers[f].start(&[])?;
    let mut status = None;
    for _ in 0..200 {
        status = cluster.servers[f].try_exit_status();
        if status.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let status = status.context("the damaged server kept running")?;
    let log = cluster.servers[f].log_tail(30);
    if status.success() {
        bail!("a damaged log exited 0:\n{log}");
    }
    for needed in [
        "the log is damaged, not torn by a crash; nothing was changed",
        &format!("offset {victim}"),
        "--join",
    ] {
        if !log.contains(needed) {
            bail!("the refusal does not say {needed:?}:\n{log}");
        }
    }
    let after = meshwork_tests::damage::files(&data_dir)?;
    let changed: Vec<_> = before
        .keys()
        .chain(after.keys())
        .filter(|p| before.get(*p) != after.get(*p))
        .collect();
    if !changed.is_empty() {
        bail!("refusing to start changed the data dir: {changed:?}");
    }

    // The way out it names: the data dir aside, and `--join`.
    std::fs::rename(&data_dir, data_dir.with_extension("damaged"))?;
    let via = cluster.servers[leader].raft_addr();
    let args = &mut cluster.servers[f].args;
    let peers = args
        .iter()
        .position(|a| a == "--peers")
        .context("--peers")?;
    args.drain(peers..peers + 2);
    args.extend(["--join".to_owned(), via]);
    cluster.servers[f].start(&[])?;
    wait_for(
        "the rebuilt server to hold every key",
        Duration::from_secs(30),
        || async { (kv_dump(&cluster, f).await.ok()? == want).then_some(()) },
    )
    .await?;
    // A voter again, and writes go on.
    let leader = cluster.wait_leader(Duration::from_secs(20)).await?;
    cluster.must_put(leader, "damaged/after", "yes").await?;
    wait_for(
        "the rebuilt server to take new writes",
        Duration::from_secs(10),
        || async {
            kv_dump(&cluster, f)
                .await
                .ok()?
                .contains_key("damaged/after")
                .then_some(())
        },
    )
    .await?;
    cluster.done();
    Ok(())
}

/// Resident memory of a server process, in MiB.
fn rss_mib(pid: u32) -> Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .context("VmRSS")?;
    Ok(kib / 1024.0)
}

/// Restores are checked as they stream in, one at a time per server: a
/// second upload gets 429 while one runs, garbage is refused at its first
/// byte without being read, and eight 100 MiB garbage uploads in parallel
/// leave the server's memory where it was (they used to be buffered whole:
/// 907 MB).
#[tokio::test]
async fn restores_stream_one_at_a_time_and_garbage_is_refused_at_once() -> Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let cluster = Cluster::start(3, &[]).await?;
    let target = &cluster.servers[0];
    let addr = format!("{}:{}", target.ip, meshwork_tests::HTTP_PORT);
    let head = |len: u64| {
        format!("PUT /v1/snapshot?force HTTP/1.1\r\nhost: x\r\ncontent-length: {len}\r\n\r\n")
    };
    // Reads the status line (bounded in time).
    async fn status(s: &mut tokio::net::TcpStream) -> Result<String> {
        let mut buf = vec![0u8; 4096];
        let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf)).await??;
        Ok(String::from_utf8_lossy(&buf[..n])
            .lines()
            .next()
            .unwrap_or("")
            .to_owned())
    }
    // A valid start that then stalls holds the server's one restore slot.
    let mut slow = tokio::net::TcpStream::connect(&addr).await?;
    let meta = br#"{"ClusterId":null,"Index":1,"Datacenter":"dc1","Server":"s","Version":"0","CreatedAt":0,"KvEntries":0,"Nodes":0}"#;
    let mut start = head(1 << 20).into_bytes();
    start.extend_from_slice(b"MWBACKUP1\n");
    start.extend_from_slice(&(meta.len() as u64).to_be_bytes());
    start.extend_from_slice(meta);
    start.extend_from_slice(&1000u64.to_be_bytes());
    slow.write_all(&start).await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut second = tokio::net::TcpStream::connect(&addr).await?;
    second.write_all(head(16).as_bytes()).await?;
    second.write_all(b"MWBACKUP1\nxxxxxx").await?;
    let line = status(&mut second).await?;
    anyhow::ensure!(line.contains(" 429 "), "a second restore got {line:?}");
    drop(slow);

    // Eight parallel 100 MiB garbage uploads: each refused at once.
    let pid = target.pid().context("server pid")?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = rss_mib(pid)?;
    let mut uploads = tokio::task::JoinSet::new();
    for i in 0..8 {
        let addr = addr.clone();
        let head = head(100 << 20);
        uploads.spawn(async move {
            let mut s = tokio::net::TcpStream::connect(&addr).await?;
            s.write_all(head.as_bytes()).await?;
            let garbage = vec![b'g' ^ (i as u8); 1 << 20];
            let started = Instant::now();
            // Send until the answer comes (or the server stops reading).
            let mut sent = 0usize;
            for _ in 0..100 {
                match tokio::time::timeout(Duration::from_millis(200), s.write_all(&garbage)).await
                {
                    Ok(Ok(())) => sent += garbage.len(),
                    _ => break,
                }
            }
            let line = status(&mut s).await.unwrap_or_default();
            Ok::<_, anyhow::Error>((line, sent, started.elapsed()))
        });
    }
    let mut answers = Vec::new();
    while let Some(done) = uploads.join_next().await {
        answers.push(done??);
    }
    let after = rss_mib(pid)?;
    for (line, sent, took) in &answers {
        // The first upload to get the slot is refused as garbage (400); the
        // others meanwhile as busy (429), or as garbage once it is free.
        anyhow::ensure!(
            line.contains(" 400 ") || line.contains(" 429 "),
            "garbage answered {line:?} after {sent} bytes ({took:?})"
        );
    }
    anyhow::ensure!(
        after - before < 64.0,
        "memory grew from {before:.0} to {after:.0} MiB"
    );
    cluster.done();
    Ok(())
}

/// A full data dir does not leave a zombie: the write that hits it fails
/// (500, "No space left on device"), the server exits non-zero at once (its
/// unit's `Restart=on-failure` restarts it) instead of answering on with a
/// stopped consensus core, and once there is space again it starts from
/// its data dir with every acknowledged write. On a small tmpfs in a mount
/// namespace of the test's own.
#[tokio::test]
async fn a_full_disk_stops_the_server_which_restarts_with_every_acknowledged_write() -> Result<()> {
    if meshwork_tests::host::missing(true, &["unshare", "mount", "curl"]).is_some() {
        return Ok(());
    }
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("data");
    std::fs::create_dir(&data)?;
    let bin = meshwork_tests::registry_bin();
    let ip = format!("127.{}.{}.9", 30 + rand_byte() % 200, rand_byte());
    let script = format!(
        r#"set -u
D={data}
mount -t tmpfs -o size=40m tmpfs "$D" || exit 90
run() {{ {bin} --node-id 1 --data-dir "$D" --http-addr {ip}:28500 --grpc-addr {ip}:28502 \
    --raft-addr {ip}:28300 --dns-addr {ip}:28600 --peers 1@{ip}:28300 >>{log} 2>&1 & P=$!; \
    for i in $(seq 1 100); do curl -s {ip}:28500/v1/status/leader | grep -q 28300 && return; sleep 0.1; done; }}
run
head -c 300000 /dev/zero | tr '\0' v > {dir}/value
for i in $(seq 1 400); do
  code=$(curl -s -o {dir}/resp -w '%{{http_code}}' -X PUT --data-binary @{dir}/value {ip}:28500/v1/kv/k$i)
  if [ "$code" != 200 ]; then echo "PUT_FAILED $i $code $(head -c 200 {dir}/resp)"; break; fi
done
for i in $(seq 1 300); do kill -0 $P 2>/dev/null || break; sleep 0.1; done
if kill -0 $P 2>/dev/null; then echo "STILL_RUNNING"; kill $P; exit 0; fi
wait $P; echo "EXITED $?"
mount -o remount,size=160m "$D"
run
echo "KEYS $(curl -s "{ip}:28500/v1/kv/?keys" | tr ',' '\n' | grep -c '"k')"
echo "AFTER $(curl -s -X PUT --data-binary x {ip}:28500/v1/kv/after)"
kill $P; wait $P
"#,
        data = data.display(),
        bin = bin.display(),
        dir = dir.path().display(),
        log = dir.path().join("registry.log").display(),
    );
    let run = tokio::process::Command::new("unshare")
        .args(["--mount", "--propagation", "private", "bash", "-c", &script])
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(Duration::from_secs(180), run)
        .await
        .context("the full-disk scenario did not finish within 180 s")??;
    let out = String::from_utf8_lossy(&output.stdout).into_owned();
    let log = std::fs::read_to_string(dir.path().join("registry.log")).unwrap_or_default();
    let field = |name: &str| -> Option<String> {
        out.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ').map(str::to_owned))
    };
    let failed = field("PUT_FAILED").with_context(|| format!("the disk never filled:\n{out}"))?;
    let failed_at: usize = failed.split(' ').next().unwrap_or("0").parse()?;
    anyhow::ensure!(
        failed.contains("500") && failed.contains("No space left"),
        "the write that filled the disk answered {failed}"
    );
    anyhow::ensure!(
        !out.contains("STILL_RUNNING"),
        "the server stayed up with a stopped core:\n{out}\n{log}"
    );
    let exited = field("EXITED").context("no exit status")?;
    anyhow::ensure!(exited != "0", "exited with status 0");
    anyhow::ensure!(log.contains("the Raft core stopped"), "{log}");
    let keys: usize = field("KEYS").context("no key count")?.trim().parse()?;
    anyhow::ensure!(
        keys >= failed_at - 1 && keys <= failed_at,
        "{} writes were acknowledged, {keys} keys after the restart",
        failed_at - 1
    );
    anyhow::ensure!(field("AFTER").as_deref() == Some("true"), "{out}");
    Ok(())
}

fn rand_byte() -> u8 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(7, |d| (d.subsec_nanos() / 7 % 251) as u8)
}
