//! Load tool of bench/propagation.sh: N light sidecars on a Meshwork
//! cluster, each doing what a sidecar's policy does with config entries and
//! nothing else — register an instance, follow the discovery chain's config
//! entry kinds (one watch stream per kind), and report the index of each
//! kind it has applied with `Agent.ReportApplied` whenever it changes.
//!
//! Then, per round, ONE `PUT /v1/config` (a `service-router` entry) through
//! server ((round - 1) mod S) + 1, and three times counted from just before
//! the PUT is sent:
//!   received  each sidecar's watch stream delivering the change;
//!   acked     each sidecar's ReportApplied for it answered by its server
//!             (the change applied, and the registry knowing it);
//!   complete  `GET /v1/mesh/propagation?index=N` (asked of another server
//!             right after the PUT's answer) answering Complete: what
//!             `meshctl config apply --wait` waits for.
//! Sidecar i uses server i mod S, over connection (i / S) mod C of it.
//!
//!   propagation --grpc H:P,H:P,H:P --http H:P,H:P,H:P [--sidecars 1000]
//!               [--conns 16] [--rounds 5] [--timeout-s 30]
//!
//! Prints one JSON object (per-round percentiles) on stdout; progress on
//! stderr. Every wait is bounded.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Mutex;
use tonic::transport::{Channel, Endpoint};

mod pb {
    tonic::include_proto!("meshwork.v1");
}

use pb::agent_client::AgentClient;
use pb::watch_client::WatchClient;
use pb::watch_event::Kind;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The kinds a sidecar with an HTTP upstream follows for its chain.
const KINDS: [&str; 4] = [
    "service-router",
    "service-splitter",
    "service-resolver",
    "service-defaults",
];

struct Args {
    grpc: Vec<String>,
    http: Vec<String>,
    sidecars: usize,
    conns: usize,
    rounds: usize,
    timeout: Duration,
}

fn parse_args() -> Args {
    let mut a = Args {
        grpc: Vec::new(),
        http: Vec::new(),
        sidecars: 1000,
        conns: 16,
        rounds: 5,
        timeout: Duration::from_secs(30),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().unwrap_or_else(|| usage(&format!("{flag} needs a value")));
        let number = |v: &str| -> usize {
            v.parse()
                .unwrap_or_else(|_| usage(&format!("{flag}: {v:?} is not a number")))
        };
        match flag.as_str() {
            "--grpc" => a.grpc = value.split(',').map(str::to_owned).collect(),
            "--http" => a.http = value.split(',').map(str::to_owned).collect(),
            "--sidecars" => a.sidecars = number(&value),
            "--conns" => a.conns = number(&value).max(1),
            "--rounds" => a.rounds = number(&value).max(1),
            "--timeout-s" => a.timeout = Duration::from_secs(number(&value) as u64),
            _ => usage(&format!("unknown flag {flag}")),
        }
    }
    if a.grpc.is_empty() || a.grpc.len() != a.http.len() {
        usage("give --grpc and --http, one address per server, in the same order");
    }
    a
}

fn usage(why: &str) -> ! {
    eprintln!("propagation: {why}\nusage: propagation --grpc H:P,... --http H:P,... [--sidecars N] [--conns C] [--rounds R] [--timeout-s S]");
    std::process::exit(2)
}

/// When each sidecar last received a router change and had its report of
/// it acked, with the change's index (the driver keeps those of its write:
/// a change may arrive before the PUT's own answer does).
#[derive(Default)]
struct Times {
    received: Vec<Option<(u64, Instant)>>,
    acked: Vec<Option<(u64, Instant)>>,
}

struct Shared {
    ready: AtomicUsize,
    failed: AtomicUsize,
    times: Mutex<Times>,
}

async fn sidecar(i: usize, channel: Channel, shared: Arc<Shared>) -> Result<(), BoxError> {
    let node = format!("bench-node-{i}");
    let service_id = format!("bench-web-{i}");
    let mut agent = AgentClient::new(channel.clone());
    agent
        .register(pb::RegisterRequest {
            node: node.clone(),
            node_address: "127.0.0.1".into(),
            service: Some(pb::AgentService {
                id: service_id.clone(),
                name: "bench-web".into(),
                address: "127.0.0.1".into(),
                port: 1,
                ..Default::default()
            }),
            ..Default::default()
        })
        .await?;
    // One stream per kind; their events merged into one channel.
    let (tx, mut events) = tokio::sync::mpsc::channel::<(usize, pb::WatchEvent)>(64);
    for (k, kind) in KINDS.iter().enumerate() {
        let mut watch = WatchClient::new(channel.clone());
        let request = pb::SubscribeRequest {
            topic: Some(pb::subscribe_request::Topic::ConfigEntries(
                pb::ConfigEntriesTopic {
                    kind: (*kind).into(),
                },
            )),
            since_index: 0,
        };
        let mut stream = watch.subscribe(request).await?.into_inner();
        let tx = tx.clone();
        tokio::spawn(async move {
            while let Ok(Some(event)) = stream.message().await {
                if tx.send((k, event)).await.is_err() {
                    return;
                }
            }
        });
    }
    drop(tx);
    let mut applied = [0u64; 4];
    let mut snapshot_done = [false; 4];
    let mut reported_ready = false;
    let report = |applied: [u64; 4]| pb::SidecarReport {
        node: node.clone(),
        service_id: service_id.clone(),
        service: "bench-web".into(),
        version: "bench".into(),
        mode: "sidecar".into(),
        applied: KINDS
            .iter()
            .zip(applied)
            .map(|(k, i)| ((*k).to_owned(), i))
            .collect(),
        ..Default::default()
    };
    loop {
        let Some((k, event)) = events.recv().await else {
            return Err("a watch stream ended".into());
        };
        let at = Instant::now();
        let kind = Kind::try_from(event.kind).unwrap_or(Kind::Unspecified);
        if matches!(kind, Kind::EndOfSnapshot) {
            snapshot_done[k] = true;
        }
        if event.index > applied[k] {
            applied[k] = event.index;
        }
        let router_change = k == 0 && kind == Kind::Change;
        if router_change {
            shared.times.lock().await.received[i] = Some((event.index, at));
        }
        if snapshot_done.iter().all(|d| *d) && (router_change || !reported_ready) {
            agent.report_applied(report(applied)).await?;
            if router_change {
                shared.times.lock().await.acked[i] = Some((event.index, Instant::now()));
            }
            if !reported_ready {
                reported_ready = true;
                shared.ready.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// One HTTP/1.1 request on a fresh connection: (status, X-Consul-Index,
/// body).
async fn http(
    addr: &str,
    method: &str,
    path: &str,
    body: &str,
) -> Result<(u16, Option<u64>, String), BoxError> {
    let mut conn = TcpStream::connect(addr).await?;
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    conn.write_all(request.as_bytes()).await?;
    let mut raw = Vec::new();
    conn.read_to_end(&mut raw).await?;
    let text = String::from_utf8_lossy(&raw).to_string();
    let (head, rest) = text.split_once("\r\n\r\n").ok_or("no response head")?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or("bad status line")?;
    let index = head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim()
            .eq_ignore_ascii_case("x-consul-index")
            .then(|| v.trim().parse().ok())?
    });
    // Chunked bodies are not decoded: only the JSON object inside is read.
    let body = match (rest.find('{'), rest.rfind('}')) {
        (Some(a), Some(b)) if b >= a => rest[a..=b].to_owned(),
        _ => rest.to_owned(),
    };
    Ok((status, index, body))
}

fn percentiles(mut v: Vec<f64>) -> Value {
    if v.is_empty() {
        return json!({"n": 0});
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let at = |p: f64| v[((p * (v.len() - 1) as f64).round() as usize).min(v.len() - 1)];
    let r = |x: f64| (x * 10.0).round() / 10.0;
    json!({"n": v.len(), "p50_ms": r(at(0.5)), "p90_ms": r(at(0.9)), "p99_ms": r(at(0.99)), "max_ms": r(at(1.0))})
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let args = parse_args();
    let servers = args.grpc.len();
    let mut channels = Vec::new();
    for addr in &args.grpc {
        let mut per_server = Vec::new();
        for _ in 0..args.conns {
            per_server.push(
                Endpoint::from_shared(format!("http://{addr}"))?
                    .connect()
                    .await?,
            );
        }
        channels.push(per_server);
    }
    let shared = Arc::new(Shared {
        ready: AtomicUsize::new(0),
        failed: AtomicUsize::new(0),
        times: Mutex::new(Times {
            received: vec![None; args.sidecars],
            acked: vec![None; args.sidecars],
        }),
    });
    let started = Instant::now();
    for i in 0..args.sidecars {
        let channel = channels[i % servers][(i / servers) % args.conns].clone();
        let shared = Arc::clone(&shared);
        tokio::spawn(async move {
            if let Err(e) = sidecar(i, channel, Arc::clone(&shared)).await {
                if shared.failed.fetch_add(1, Ordering::Relaxed) < 5 {
                    eprintln!("sidecar {i}: {e}");
                }
            }
        });
    }
    let setup_deadline = Instant::now() + args.timeout * 4;
    while shared.ready.load(Ordering::Relaxed) < args.sidecars {
        if Instant::now() > setup_deadline || shared.failed.load(Ordering::Relaxed) > 0 {
            return Err(format!(
                "{} of {} sidecars ready ({} failed)",
                shared.ready.load(Ordering::Relaxed),
                args.sidecars,
                shared.failed.load(Ordering::Relaxed)
            )
            .into());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!(
        "{} sidecars registered, following {} kinds, reported in {:?}",
        args.sidecars,
        KINDS.len(),
        started.elapsed()
    );
    tokio::time::sleep(Duration::from_secs(2)).await;

    let mut rounds = Vec::new();
    for round in 1..=args.rounds {
        let via = (round - 1) % servers;
        let asked = round % servers;
        let entry = json!({"Kind": "service-router", "Name": "bench-web", "Routes": [
            {"Match": {"HTTP": {"PathPrefix": format!("/round-{round}")}},
             "Destination": {"Service": "bench-web"}}]});
        let t0 = Instant::now();
        let (status, index, body) = http(&args.http[via], "PUT", "/v1/config", &entry.to_string()).await?;
        let put_ms = t0.elapsed().as_secs_f64() * 1000.0;
        let index = match (status, index) {
            (200, Some(index)) => index,
            _ => return Err(format!("PUT /v1/config: {status} {body}").into()),
        };
        let (_, _, answer) = http(
            &args.http[asked],
            "GET",
            &format!("/v1/mesh/propagation?index={index}&wait={}s", args.timeout.as_secs()),
            "",
        )
        .await?;
        let complete_ms = t0.elapsed().as_secs_f64() * 1000.0;
        let answer: Value = serde_json::from_str(&answer).unwrap_or(Value::Null);
        // Every sidecar's ack (bounded by the timeout).
        let deadline = t0 + args.timeout;
        loop {
            let done = shared
                .times
                .lock()
                .await
                .acked
                .iter()
                .all(|a| a.is_some_and(|(at, _)| at >= index));
            if done || Instant::now() > deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let times = shared.times.lock().await;
        let since = |t: &Option<(u64, Instant)>| {
            t.filter(|(at, _)| *at >= index)
                .map(|(_, t)| t.duration_since(t0).as_secs_f64() * 1000.0)
        };
        let received: Vec<f64> = times.received.iter().filter_map(since).collect();
        let acked: Vec<f64> = times.acked.iter().filter_map(since).collect();
        let missing = args.sidecars - acked.len();
        let result = json!({
            "round": round,
            "index": index,
            "put_via": via + 1,
            "propagation_asked_of": asked + 1,
            "put_ms": (put_ms * 10.0).round() / 10.0,
            "received": percentiles(received),
            "acked": percentiles(acked),
            "not_acked": missing,
            "propagation_complete": answer["Complete"],
            "propagation_sidecars": answer["Sidecars"],
            "propagation_answer_ms": (complete_ms * 10.0).round() / 10.0,
        });
        eprintln!("{result}");
        rounds.push(result);
        drop(times);
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    let summary: BTreeMap<&str, Value> = [
        ("sidecars", json!(args.sidecars)),
        ("servers", json!(servers)),
        ("conns_per_server", json!(args.conns)),
        ("kinds", json!(KINDS)),
        ("rounds", json!(rounds)),
    ]
    .into_iter()
    .collect();
    println!("{}", serde_json::to_string_pretty(&summary)?);
    Ok(())
}
