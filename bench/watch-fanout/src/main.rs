//! Watch fan-out load tool (driven by `bench/watch.sh`).
//!
//! ```text
//! watch-fanout meshwork --servers G1,G2,G3 --http H1,H2,H3 --write-server 1 \
//!     --new-id web-new-1 --new-node bench-n1 [--client full|light] [options]
//! watch-fanout etcd     --servers E1,E2,E3 --write-server 1 --key /bench/web \
//!     --value-tag r1 [options]
//! ```
//!
//! Opens `--subscribers` watch streams (default 10,000), spread round-robin
//! over the servers (subscriber i goes to server i mod 3) and multiplexed
//! over `--conns` HTTP/2 connections per server (subscriber i uses
//! connection (i / 3) mod C of its server). It waits until every stream is
//! subscribed (Meshwork: END_OF_SNAPSHOT received; etcd: the `created`
//! response received), samples the servers' memory, then makes ONE write
//! through server `--write-server` (1-based) over a connection opened and
//! used once beforehand, and records when the write was sent, when its
//! acknowledgement arrived, and when each subscriber received the change.
//! Prints one JSON object on stdout; progress and errors go to stderr.
//!
//! Meshwork: `meshwork.v1.Watch/Subscribe` with topic `service { name:
//! "web" }`; the write is `PUT /v1/catalog/register` of a new `web`
//! instance over HTTP/1.1; a subscriber has the change when it gets a CHANGE
//! carrying an endpoint with that service ID (HEARTBEATs are skipped).
//! etcd: one `Watch` stream per subscriber (etcd-client's `watch`, which
//! opens one gRPC stream per call) on `--key`; the write is a KV `Put` of the
//! same key over gRPC; a subscriber has the change when it gets an event for
//! the key with the written value.
//!
//! `--client full` (the default) subscribes with each system's usual Rust
//! client as above, decoding every message with prost; `--client light`
//! subscribes with the same raw-HTTP/2 gRPC code for both systems (module
//! `light`: request encoded once, messages recognised by their bytes), so
//! that the tool's own work per message is small and identical for both.
//! The connection layout, the timestamps and the write are the same in both
//! modes.
//!
//! Every wait is bounded: `--setup-timeout` for the subscriptions,
//! `--timeout` for the delivery of the change.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{Notify, Semaphore, watch};

mod light;

mod pb {
    tonic::include_proto!("meshwork.v1");
}

use pb::watch_client::WatchClient;
use pb::watch_event::Kind;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

// ------------------------------------------------------------------ arguments

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Meshwork,
    Etcd,
}

/// How the subscribers talk to the servers (the write is the same in both).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ClientKind {
    /// Each system's usual Rust client: tonic's generated `WatchClient`
    /// (Meshwork) and the `etcd-client` crate (etcd); every message is
    /// decoded with prost.
    Full,
    /// The same code for both systems: gRPC over raw HTTP/2 (`h2`), the
    /// request encoded once, messages found by their length prefixes and
    /// recognised by their bytes (see `light`).
    Light,
}

impl ClientKind {
    fn name(self) -> &'static str {
        match self {
            ClientKind::Full => "full",
            ClientKind::Light => "light",
        }
    }
}

#[derive(Debug, Clone)]
struct Args {
    mode: Mode,
    client: ClientKind,
    /// gRPC addresses (host:port), one per server.
    servers: Vec<String>,
    /// Meshwork only: HTTP addresses, same order as `servers`.
    http: Vec<String>,
    /// 1-based index into `servers` of the server that takes the write.
    write_server: usize,
    subscribers: usize,
    conns: usize,
    /// Subscriptions being opened at once (until subscribed).
    open_concurrency: usize,
    setup_timeout: Duration,
    timeout: Duration,
    /// After every stream is subscribed: wait this long, then sample memory.
    settle: Duration,
    /// After the memory sample: wait this long before the write (the CPU
    /// window checked for other processes starts here).
    hold: Duration,
    /// Server PIDs of the system under test (memory and CPU), same order.
    pids: Vec<u32>,
    /// PIDs of other processes of the benchmark (the other cluster): their
    /// CPU is not counted as "other processes".
    other_pids: Vec<u32>,
    clk_tck: f64,
    label: String,
    meta: BTreeMap<String, String>,
    // Meshwork
    service: String,
    new_id: String,
    new_node: String,
    new_address: String,
    // etcd
    key: String,
    value_tag: String,
}

fn usage() -> ! {
    eprintln!(
        "usage: watch-fanout meshwork|etcd --servers A,B,C [--http A,B,C] [--write-server 1] \
         [--client full|light] \
         [--subscribers 10000] [--conns 32] [--open-concurrency 512] [--setup-timeout 120] \
         [--timeout 30] [--settle-ms 2000] [--hold-ms 1000] [--pids P,P,P] [--other-pids P,..] \
         [--clk-tck 100] [--label L] [--meta k=v]... [--service web] [--new-id ID] \
         [--new-node NODE] [--new-address IP] [--key /bench/web] [--value-tag T]"
    );
    std::process::exit(64)
}

fn split_list(s: &str) -> Vec<String> {
    s.split(',').map(str::trim).filter(|x| !x.is_empty()).map(String::from).collect()
}

fn parse_pids(s: &str) -> Vec<u32> {
    split_list(s).iter().map(|p| p.parse().unwrap_or_else(|_| usage())).collect()
}

fn parse_args() -> Args {
    let mut it = std::env::args().skip(1);
    let mode = match it.next().as_deref() {
        Some("meshwork") => Mode::Meshwork,
        Some("etcd") => Mode::Etcd,
        _ => usage(),
    };
    let mut a = Args {
        mode,
        client: ClientKind::Full,
        servers: Vec::new(),
        http: Vec::new(),
        write_server: 1,
        subscribers: 10_000,
        conns: 32,
        open_concurrency: 512,
        setup_timeout: Duration::from_secs(120),
        timeout: Duration::from_secs(30),
        settle: Duration::from_millis(2000),
        hold: Duration::from_millis(1000),
        pids: Vec::new(),
        other_pids: Vec::new(),
        clk_tck: 100.0,
        label: String::new(),
        meta: BTreeMap::new(),
        service: "web".into(),
        new_id: "web-new-1".into(),
        new_node: "bench-n1".into(),
        new_address: "10.9.0.1".into(),
        key: "/bench/web".into(),
        value_tag: "1".into(),
    };
    while let Some(flag) = it.next() {
        let mut val = || it.next().unwrap_or_else(|| usage());
        let num = |v: String| -> u64 { v.parse().unwrap_or_else(|_| usage()) };
        match flag.as_str() {
            "--servers" => a.servers = split_list(&val()),
            "--client" => {
                a.client = match val().as_str() {
                    "full" => ClientKind::Full,
                    "light" => ClientKind::Light,
                    _ => usage(),
                }
            }
            "--http" => a.http = split_list(&val()),
            "--write-server" => a.write_server = num(val()) as usize,
            "--subscribers" => a.subscribers = num(val()) as usize,
            "--conns" => a.conns = num(val()) as usize,
            "--open-concurrency" => a.open_concurrency = num(val()).max(1) as usize,
            "--setup-timeout" => a.setup_timeout = Duration::from_secs(num(val())),
            "--timeout" => a.timeout = Duration::from_secs(num(val())),
            "--settle-ms" => a.settle = Duration::from_millis(num(val())),
            "--hold-ms" => a.hold = Duration::from_millis(num(val())),
            "--pids" => a.pids = parse_pids(&val()),
            "--other-pids" => a.other_pids = parse_pids(&val()),
            "--clk-tck" => a.clk_tck = num(val()) as f64,
            "--label" => a.label = val(),
            "--meta" => {
                let v = val();
                let (k, x) = v.split_once('=').unwrap_or_else(|| usage());
                a.meta.insert(k.into(), x.into());
            }
            "--service" => a.service = val(),
            "--new-id" => a.new_id = val(),
            "--new-node" => a.new_node = val(),
            "--new-address" => a.new_address = val(),
            "--key" => a.key = val(),
            "--value-tag" => a.value_tag = val(),
            _ => usage(),
        }
    }
    if a.servers.is_empty()
        || a.conns == 0
        || a.subscribers == 0
        || a.write_server == 0
        || a.write_server > a.servers.len()
        || (a.mode == Mode::Meshwork && a.http.len() != a.servers.len())
    {
        usage();
    }
    a
}

// ------------------------------------------------------------------ /proc

fn proc_status_kb(pid: u32, key: &str) -> u64 {
    let Ok(s) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
        return 0;
    };
    s.lines()
        .find_map(|l| {
            let rest = l.strip_prefix(key)?.strip_prefix(':')?;
            rest.split_whitespace().next()?.parse().ok()
        })
        .unwrap_or(0)
}

fn self_pid() -> u32 {
    std::process::id()
}

/// utime + stime of a process, in clock ticks.
fn proc_cpu_ticks(pid: u32) -> u64 {
    let Ok(s) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0;
    };
    // Fields after the command name (which may contain spaces) start at ')'.
    let Some(rest) = s.rfind(')').map(|i| &s[i + 1..]) else {
        return 0;
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    // rest[0] is field 3 (state); utime = field 14, stime = field 15.
    let get = |n: usize| f.get(n - 3).and_then(|x| x.parse::<u64>().ok()).unwrap_or(0);
    get(14) + get(15)
}

/// (total, idle) jiffies of the machine.
fn sys_cpu() -> (u64, u64) {
    let Ok(s) = std::fs::read_to_string("/proc/stat") else {
        return (0, 0);
    };
    let Some(line) = s.lines().find(|l| l.starts_with("cpu ")) else {
        return (0, 0);
    };
    let v: Vec<u64> = line.split_whitespace().skip(1).filter_map(|x| x.parse().ok()).collect();
    let total = v.iter().sum();
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    (total, idle)
}

#[derive(Debug, Clone)]
struct CpuSample {
    sys: (u64, u64),
    servers: Vec<u64>,
    others: Vec<u64>,
    me: u64,
}

fn cpu_sample(a: &Args) -> CpuSample {
    CpuSample {
        sys: sys_cpu(),
        servers: a.pids.iter().map(|&p| proc_cpu_ticks(p)).collect(),
        others: a.other_pids.iter().map(|&p| proc_cpu_ticks(p)).collect(),
        me: proc_cpu_ticks(self_pid()),
    }
}

/// CPU between two samples: seconds per server, of this tool, machine busy %
/// and the share of the machine used by processes that are not part of the
/// benchmark.
fn cpu_delta(a: &Args, x: &CpuSample, y: &CpuSample) -> Value {
    let t = a.clk_tck;
    let servers: Vec<f64> = x
        .servers
        .iter()
        .zip(&y.servers)
        .map(|(b, e)| round3(e.saturating_sub(*b) as f64 / t))
        .collect();
    let ours: u64 = x.servers.iter().zip(&y.servers).map(|(b, e)| e.saturating_sub(*b)).sum::<u64>()
        + x.others.iter().zip(&y.others).map(|(b, e)| e.saturating_sub(*b)).sum::<u64>()
        + y.me.saturating_sub(x.me);
    let dt = y.sys.0.saturating_sub(x.sys.0);
    let di = y.sys.1.saturating_sub(x.sys.1);
    let busy = dt.saturating_sub(di);
    let (busy_pct, foreign_pct) = if dt > 0 {
        (
            100.0 * busy as f64 / dt as f64,
            100.0 * busy.saturating_sub(ours) as f64 / dt as f64,
        )
    } else {
        (0.0, 0.0)
    };
    json!({
        "servers_s": servers,
        "client_s": round3(y.me.saturating_sub(x.me) as f64 / t),
        "machine_busy_pct": round1(busy_pct),
        "foreign_pct": round1(foreign_pct),
        "machine_jiffies": dt,
    })
}

fn mem_sample(a: &Args) -> Value {
    json!({
        "rss_kb": a.pids.iter().map(|&p| proc_status_kb(p, "VmRSS")).collect::<Vec<_>>(),
        "hwm_kb": a.pids.iter().map(|&p| proc_status_kb(p, "VmHWM")).collect::<Vec<_>>(),
        "client_rss_kb": proc_status_kb(self_pid(), "VmRSS"),
    })
}

fn round1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}
fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

// ------------------------------------------------------------------ shared state

struct Shared {
    base: Instant,
    subscribed: AtomicUsize,
    setup_failed: AtomicUsize,
    /// Streams that failed or ended after being subscribed, before the change.
    lost: AtomicUsize,
    received: AtomicUsize,
    /// Changes that were not the expected one (counted, not fatal).
    unexpected: AtomicUsize,
    /// Light client: messages after the subscribed marker that were not the
    /// change (Meshwork: heartbeats; not classified further).
    other_messages: AtomicUsize,
    /// Receive instants, ns since `base` + 1; 0 = not received.
    recv_ns: Vec<AtomicU64>,
    progress: Notify,
    errors: Mutex<BTreeMap<String, u64>>,
}

impl Shared {
    fn new(n: usize) -> Self {
        Self {
            base: Instant::now(),
            subscribed: AtomicUsize::new(0),
            setup_failed: AtomicUsize::new(0),
            lost: AtomicUsize::new(0),
            received: AtomicUsize::new(0),
            unexpected: AtomicUsize::new(0),
            other_messages: AtomicUsize::new(0),
            recv_ns: (0..n).map(|_| AtomicU64::new(0)).collect(),
            progress: Notify::new(),
            errors: Mutex::new(BTreeMap::new()),
        }
    }

    fn ns(&self, t: Instant) -> u64 {
        t.saturating_duration_since(self.base).as_nanos() as u64 + 1
    }

    fn error(&self, what: &str, e: impl std::fmt::Display) {
        let mut msg = format!("{what}: {e}");
        if msg.len() > 200 {
            msg.truncate(200);
        }
        if let Ok(mut m) = self.errors.lock() {
            *m.entry(msg).or_insert(0) += 1;
        }
    }

    fn setup_failed(&self, what: &str, e: impl std::fmt::Display) {
        self.error(what, e);
        self.setup_failed.fetch_add(1, Ordering::SeqCst);
        self.progress.notify_one();
    }

    fn subscribed(&self) {
        self.subscribed.fetch_add(1, Ordering::SeqCst);
        self.progress.notify_one();
    }

    fn lost(&self, what: &str, e: impl std::fmt::Display) {
        self.error(what, e);
        self.lost.fetch_add(1, Ordering::SeqCst);
        self.progress.notify_one();
    }

    fn received(&self, i: usize, t: Instant) {
        self.recv_ns[i].store(self.ns(t), Ordering::SeqCst);
        self.received.fetch_add(1, Ordering::SeqCst);
        self.progress.notify_one();
    }
}

/// Waits (bounded) until `done()` holds; false on timeout.
async fn wait_until(sh: &Shared, deadline: Instant, done: impl Fn() -> bool) -> bool {
    loop {
        let notified = sh.progress.notified();
        if done() {
            return true;
        }
        let now = Instant::now();
        if now >= deadline {
            return false;
        }
        // Re-check at least every 100 ms (notify_one may coalesce wake-ups).
        let step = (deadline - now).min(Duration::from_millis(100));
        let _ = tokio::time::timeout(step, notified).await;
    }
}

// ------------------------------------------------------------------ Meshwork

async fn meshwork_subscriber(
    i: usize,
    channel: tonic::transport::Channel,
    sh: Arc<Shared>,
    open: Arc<Semaphore>,
    args: Arc<Args>,
    mut close: watch::Receiver<bool>,
) {
    let request = pb::SubscribeRequest {
        topic: Some(pb::subscribe_request::Topic::Service(pb::ServiceTopic {
            name: args.service.clone(),
            passing_only: false,
        })),
        since_index: 0,
    };
    let Ok(permit) = open.acquire_owned().await else {
        return;
    };
    let mut client = WatchClient::new(channel).max_decoding_message_size(64 << 20);
    let mut stream = tokio::select! {
        r = client.subscribe(request) => match r {
            Ok(resp) => resp.into_inner(),
            Err(status) => return sh.setup_failed("subscribe", status),
        },
        _ = close.changed() => return,
    };
    // Snapshot, then END_OF_SNAPSHOT.
    loop {
        tokio::select! {
            m = stream.message() => match m {
                Ok(Some(ev)) if ev.kind == Kind::EndOfSnapshot as i32 => break,
                Ok(Some(ev)) if ev.kind == Kind::Snapshot as i32
                    || ev.kind == Kind::Heartbeat as i32 => continue,
                Ok(Some(ev)) => {
                    // A change before the snapshot ended: not expected.
                    sh.unexpected.fetch_add(1, Ordering::SeqCst);
                    sh.error("event before END_OF_SNAPSHOT", format!("kind {}", ev.kind));
                }
                Ok(None) => return sh.setup_failed("snapshot", "stream ended"),
                Err(status) => return sh.setup_failed("snapshot", status),
            },
            _ = close.changed() => return,
        }
    }
    drop(permit);
    sh.subscribed();
    // The change.
    loop {
        tokio::select! {
            m = stream.message() => {
                let t = Instant::now();
                match m {
                    Ok(Some(ev)) if ev.kind == Kind::Change as i32 => {
                        let ours = ev.changes.iter().any(|c| matches!(
                            &c.change,
                            Some(pb::change::Change::Endpoint(e)) if e.service_id == args.new_id
                        ));
                        if ours {
                            sh.received(i, t);
                            break;
                        }
                        sh.unexpected.fetch_add(1, Ordering::SeqCst);
                    }
                    Ok(Some(_)) => continue, // heartbeat
                    Ok(None) => return sh.lost("watch", "stream ended"),
                    Err(status) => return sh.lost("watch", status),
                }
            }
            _ = close.changed() => return,
        }
    }
    // Keep the stream open until the round ends.
    let _ = close.wait_for(|c| *c).await;
    drop(stream);
}

/// One HTTP/1.1 request on a keep-alive connection; returns status and body.
async fn http_request(
    conn: &mut TcpStream,
    host: &str,
    method: &str,
    path: &str,
    body: &[u8],
) -> Result<(u16, Vec<u8>), BoxError> {
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: watch-fanout\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    req.extend_from_slice(body);
    conn.write_all(&req).await?;
    let mut buf = Vec::with_capacity(4096);
    let mut tmp = [0u8; 4096];
    let head_end = loop {
        if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break p + 4;
        }
        let n = conn.read(&mut tmp).await?;
        if n == 0 {
            return Err("connection closed before the response head".into());
        }
        buf.extend_from_slice(&tmp[..n]);
        if buf.len() > 1 << 20 {
            return Err("response head too long".into());
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or("bad status line")?;
    let header = |name: &str| {
        head.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim().eq_ignore_ascii_case(name).then(|| v.trim().to_string())
        })
    };
    let mut rest = buf[head_end..].to_vec();
    if let Some(len) = header("content-length") {
        let len: usize = len.parse()?;
        while rest.len() < len {
            let n = conn.read(&mut tmp).await?;
            if n == 0 {
                return Err("connection closed in the body".into());
            }
            rest.extend_from_slice(&tmp[..n]);
        }
        rest.truncate(len);
        Ok((status, rest))
    } else if header("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
        // Minimal chunked decoding: read until the terminating 0-size chunk.
        let mut body = Vec::new();
        loop {
            let Some(p) = rest.windows(2).position(|w| w == b"\r\n") else {
                let n = conn.read(&mut tmp).await?;
                if n == 0 {
                    return Err("connection closed in a chunk".into());
                }
                rest.extend_from_slice(&tmp[..n]);
                continue;
            };
            let size_line = String::from_utf8_lossy(&rest[..p]).to_string();
            let size = usize::from_str_radix(size_line.split(';').next().unwrap_or("").trim(), 16)?;
            while rest.len() < p + 2 + size + 2 {
                let n = conn.read(&mut tmp).await?;
                if n == 0 {
                    return Err("connection closed in a chunk".into());
                }
                rest.extend_from_slice(&tmp[..n]);
            }
            if size == 0 {
                return Ok((status, body));
            }
            body.extend_from_slice(&rest[p + 2..p + 2 + size]);
            rest.drain(..p + 2 + size + 2);
        }
    } else {
        Err("response without Content-Length or chunked body".into())
    }
}

struct WriteTimes {
    send: Instant,
    ack: Instant,
    detail: Value,
}

/// The subscribers' connections, `[server][connection]`.
enum Subscribers {
    MeshworkFull(Vec<Vec<tonic::transport::Channel>>),
    EtcdFull(Vec<Vec<etcd_client::Client>>, Arc<Vec<u8>>),
    Light(Vec<Vec<light::Conn>>, Arc<light::Spec>),
}

impl Subscribers {
    /// Opens `conns` connections to every server (tonic channels, etcd
    /// clients or raw HTTP/2), one after another.
    async fn connect(
        args: &Args,
        light: Option<Arc<light::Spec>>,
        expect: Arc<Vec<u8>>,
    ) -> Result<Self, BoxError> {
        match (light, args.mode) {
            (Some(spec), _) => {
                let mut all = Vec::new();
                for addr in &args.servers {
                    let mut per = Vec::new();
                    for _ in 0..args.conns {
                        per.push(light::connect(addr, spec.path).await?);
                    }
                    all.push(per);
                }
                Ok(Subscribers::Light(all, spec))
            }
            (None, Mode::Meshwork) => {
                let mut all = Vec::new();
                for addr in &args.servers {
                    let mut per = Vec::new();
                    for _ in 0..args.conns {
                        let ch = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
                            .tcp_nodelay(true)
                            .connect_timeout(Duration::from_secs(5))
                            .connect()
                            .await?;
                        per.push(ch);
                    }
                    all.push(per);
                }
                Ok(Subscribers::MeshworkFull(all))
            }
            (None, Mode::Etcd) => {
                let mut all = Vec::new();
                for addr in &args.servers {
                    let mut per = Vec::new();
                    for _ in 0..args.conns {
                        per.push(etcd_connect(addr).await?);
                    }
                    all.push(per);
                }
                Ok(Subscribers::EtcdFull(all, expect))
            }
        }
    }

    /// One task per subscriber: subscriber i on server i mod S, connection
    /// (i / S) mod C of that server.
    fn spawn(
        &self,
        args: &Arc<Args>,
        sh: &Arc<Shared>,
        open: &Arc<Semaphore>,
        close: &watch::Receiver<bool>,
    ) -> tokio::task::JoinSet<()> {
        let ns = args.servers.len();
        let mut set = tokio::task::JoinSet::new();
        for i in 0..args.subscribers {
            let (s, c) = (i % ns, (i / ns) % args.conns);
            let (sh, open, close) = (Arc::clone(sh), Arc::clone(open), close.clone());
            match self {
                Subscribers::MeshworkFull(chs) => {
                    set.spawn(meshwork_subscriber(
                        i,
                        chs[s][c].clone(),
                        sh,
                        open,
                        Arc::clone(args),
                        close,
                    ));
                }
                Subscribers::EtcdFull(cls, expect) => {
                    set.spawn(etcd_subscriber(
                        i,
                        cls[s][c].clone(),
                        sh,
                        open,
                        Arc::clone(args),
                        Arc::clone(expect),
                        close,
                    ));
                }
                Subscribers::Light(conns, spec) => {
                    set.spawn(light::subscriber(
                        i,
                        conns[s][c].clone(),
                        Arc::clone(spec),
                        sh,
                        open,
                        close,
                    ));
                }
            }
        }
        set
    }
}

async fn meshwork_round(args: Arc<Args>, sh: Arc<Shared>) -> Result<Value, BoxError> {
    let request = pb::SubscribeRequest {
        topic: Some(pb::subscribe_request::Topic::Service(pb::ServiceTopic {
            name: args.service.clone(),
            passing_only: false,
        })),
        since_index: 0,
    };
    let light = (args.client == ClientKind::Light).then(|| {
        Arc::new(light::Spec {
            path: "/meshwork.v1.Watch/Subscribe",
            request: light::Spec::frame(&prost::Message::encode_to_vec(&request)),
            subscribed: (1, Kind::EndOfSnapshot as u64), // WatchEvent.kind
            canceled: None,
            needle: args.new_id.as_bytes().to_vec(),
        })
    });
    let t_connect = Instant::now();
    let subs = Subscribers::connect(&args, light, Arc::new(Vec::new())).await?;
    let connect_s = t_connect.elapsed().as_secs_f64();
    // The write's connection: opened and used once now, reused for the write.
    let waddr = args.http[args.write_server - 1].clone();
    let mut wconn = TcpStream::connect(&waddr).await?;
    wconn.set_nodelay(true)?;

    let body = json!({
        "Node": args.new_node,
        "Address": args.new_address,
        "Service": {"Service": args.service, "ID": args.new_id, "Port": 80},
    })
    .to_string();
    let write = async |wconn: &mut TcpStream| -> Result<WriteTimes, BoxError> {
        // Warm the connection (same path as the etcd mode's warm-up read).
        let (st, _) = http_request(wconn, &waddr, "GET", "/v1/status/leader", b"").await?;
        if st != 200 {
            return Err(format!("warm-up GET answered {st}").into());
        }
        let send = Instant::now();
        let (st, resp) =
            http_request(wconn, &waddr, "PUT", "/v1/catalog/register", body.as_bytes()).await?;
        let ack = Instant::now();
        let resp = String::from_utf8_lossy(&resp).trim().to_string();
        if st != 200 || resp != "true" {
            return Err(format!("register answered {st} {resp}").into());
        }
        Ok(WriteTimes { send, ack, detail: json!({"status": st, "body": resp}) })
    };
    run_round(
        &args,
        &sh,
        connect_s,
        |open, close| subs.spawn(&args, &sh, open, close),
        async || write(&mut wconn).await,
    )
    .await
}

// ------------------------------------------------------------------ etcd

async fn etcd_subscriber(
    i: usize,
    mut client: etcd_client::Client,
    sh: Arc<Shared>,
    open: Arc<Semaphore>,
    args: Arc<Args>,
    expect: Arc<Vec<u8>>,
    mut close: watch::Receiver<bool>,
) {
    let Ok(permit) = open.acquire_owned().await else {
        return;
    };
    let mut stream = tokio::select! {
        r = client.watch(args.key.as_bytes(), None) => match r {
            Ok(s) => s,
            Err(e) => return sh.setup_failed("watch", e),
        },
        _ = close.changed() => return,
    };
    loop {
        tokio::select! {
            m = stream.message() => match m {
                Ok(Some(r)) if r.created() => break,
                Ok(Some(r)) if r.canceled() => {
                    return sh.setup_failed("watch canceled", r.cancel_reason().to_string());
                }
                Ok(Some(_)) => {
                    sh.unexpected.fetch_add(1, Ordering::SeqCst);
                    sh.error("response before created", "");
                }
                Ok(None) => return sh.setup_failed("watch", "stream ended"),
                Err(e) => return sh.setup_failed("watch", e),
            },
            _ = close.changed() => return,
        }
    }
    drop(permit);
    sh.subscribed();
    loop {
        tokio::select! {
            m = stream.message() => {
                let t = Instant::now();
                match m {
                    Ok(Some(r)) if r.canceled() => {
                        return sh.lost("watch canceled", r.cancel_reason().to_string());
                    }
                    Ok(Some(r)) => {
                        let ours = r.events().iter().any(|e| {
                            e.kv().is_some_and(|kv| kv.key() == args.key.as_bytes()
                                && kv.value() == expect.as_slice())
                        });
                        if ours {
                            sh.received(i, t);
                            break;
                        }
                        if !r.events().is_empty() {
                            sh.unexpected.fetch_add(1, Ordering::SeqCst);
                        }
                    }
                    Ok(None) => return sh.lost("watch", "stream ended"),
                    Err(e) => return sh.lost("watch", e),
                }
            }
            _ = close.changed() => return,
        }
    }
    let _ = close.wait_for(|c| *c).await;
    drop(stream);
}

async fn etcd_connect(addr: &str) -> Result<etcd_client::Client, BoxError> {
    let opts = etcd_client::ConnectOptions::new()
        .with_connect_timeout(Duration::from_secs(5))
        .with_timeout(Duration::from_secs(600));
    let mut c = etcd_client::Client::connect([format!("http://{addr}")], Some(opts)).await?;
    // The channel connects lazily: one cheap call opens the connection now.
    c.status().await?;
    Ok(c)
}

async fn etcd_round(args: Arc<Args>, sh: Arc<Shared>) -> Result<Value, BoxError> {
    // The value written: the same JSON as Meshwork's registration.
    let value = json!({
        "Node": args.new_node,
        "Address": args.new_address,
        "Service": {"Service": args.service, "ID": args.new_id, "Port": 80},
        "Tag": args.value_tag,
    })
    .to_string()
    .into_bytes();
    let expect = Arc::new(value.clone());
    let light = (args.client == ClientKind::Light).then(|| {
        // Exactly the request etcd-client's `watch(key, None)` sends.
        let request = etcd_client::proto::PbWatchRequest::from(
            etcd_client::WatchOptions::new().with_key(args.key.as_bytes()),
        );
        Arc::new(light::Spec {
            path: "/etcdserverpb.Watch/Watch",
            request: light::Spec::frame(&prost::Message::encode_to_vec(&request)),
            subscribed: (3, 1),     // WatchResponse.created = true
            canceled: Some((4, 1)), // WatchResponse.canceled = true
            needle: value.clone(),
        })
    });
    let t_connect = Instant::now();
    let subs = Subscribers::connect(&args, light, Arc::clone(&expect)).await?;
    let connect_s = t_connect.elapsed().as_secs_f64();
    let mut wclient = etcd_connect(&args.servers[args.write_server - 1]).await?;
    let key = args.key.clone();
    run_round(
        &args,
        &sh,
        connect_s,
        |open, close| subs.spawn(&args, &sh, open, close),
        async || {
            // Warm the write's connection with one read of the key.
            wclient.get(key.as_bytes(), None).await?;
            let send = Instant::now();
            let resp = wclient.put(key.as_bytes(), value.clone(), None).await?;
            let ack = Instant::now();
            let rev = resp.header().map(|h| h.revision()).unwrap_or(0);
            Ok(WriteTimes { send, ack, detail: json!({"revision": rev}) })
        },
    )
    .await
}

// ------------------------------------------------------------------ common round

fn stats(v: &mut [f64]) -> Value {
    if v.is_empty() {
        return Value::Null;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    // Nearest rank.
    let q = |p: f64| v[(((p / 100.0) * n as f64).ceil() as usize).clamp(1, n) - 1];
    let mean = v.iter().sum::<f64>() / n as f64;
    json!({
        "n": n,
        "min": round3(v[0]),
        "p50": round3(q(50.0)),
        "p90": round3(q(90.0)),
        "p99": round3(q(99.0)),
        "p999": round3(q(99.9)),
        "max": round3(v[n - 1]),
        "mean": round3(mean),
    })
}

async fn run_round<S, W>(
    args: &Args,
    sh: &Arc<Shared>,
    connect_s: f64,
    spawn: S,
    write: W,
) -> Result<Value, BoxError>
where
    S: FnOnce(&Arc<Semaphore>, &watch::Receiver<bool>) -> tokio::task::JoinSet<()>,
    W: AsyncFnOnce() -> Result<WriteTimes, BoxError>,
{
    let n = args.subscribers;
    let open = Arc::new(Semaphore::new(args.open_concurrency));
    let (close_tx, close_rx) = watch::channel(false);

    let mem_before = mem_sample(args);
    let cpu0 = cpu_sample(args);
    let t_setup = Instant::now();
    let mut set = spawn(&open, &close_rx);
    let setup_ok = wait_until(sh, t_setup + args.setup_timeout, || {
        sh.subscribed.load(Ordering::SeqCst) + sh.setup_failed.load(Ordering::SeqCst) >= n
    })
    .await;
    let setup_s = t_setup.elapsed().as_secs_f64();
    let subscribed = sh.subscribed.load(Ordering::SeqCst);
    eprintln!(
        "[{}] {subscribed}/{n} subscribed in {setup_s:.2}s ({} failed{})",
        args.label,
        sh.setup_failed.load(Ordering::SeqCst),
        if setup_ok { "" } else { ", setup timed out" }
    );
    let cpu1 = cpu_sample(args);

    tokio::time::sleep(args.settle).await;
    let mem_held = mem_sample(args);
    let cpu2 = cpu_sample(args);
    tokio::time::sleep(args.hold).await;

    let mut result = json!({});
    let mut write_error = Value::Null;
    let mut delivery_ok = false;
    let mut times: Option<WriteTimes> = None;
    if subscribed == 0 {
        write_error = json!("no subscriber subscribed; no write made");
    } else {
        match tokio::time::timeout(args.timeout, write()).await {
            Ok(Ok(w)) => times = Some(w),
            Ok(Err(e)) => write_error = json!(e.to_string()),
            Err(_) => write_error = json!("write timed out"),
        }
    }
    let mut last_recv = None;
    if let Some(w) = &times {
        let deadline = w.ack.max(w.send) + args.timeout;
        delivery_ok = wait_until(sh, deadline, || {
            sh.received.load(Ordering::SeqCst) + sh.lost.load(Ordering::SeqCst)
                >= sh.subscribed.load(Ordering::SeqCst)
        })
        .await;
        last_recv = Some(Instant::now());
    }
    let cpu3 = cpu_sample(args);
    let mem_after = mem_sample(args);

    if let Some(w) = &times {
        let ack_ns = sh.ns(w.ack) as f64;
        let send_ns = sh.ns(w.send) as f64;
        let recv: Vec<f64> = sh
            .recv_ns
            .iter()
            .map(|x| x.load(Ordering::SeqCst))
            .filter(|&x| x > 0)
            .map(|x| x as f64)
            .collect();
        let mut from_ack: Vec<f64> = recv.iter().map(|r| (r - ack_ns) / 1e6).collect();
        let mut from_send: Vec<f64> = recv.iter().map(|r| (r - send_ns) / 1e6).collect();
        // Per server (subscriber i is on server i mod S).
        let ns = args.servers.len();
        let per_server: Vec<Value> = (0..ns)
            .map(|s| {
                let mut v: Vec<f64> = sh
                    .recv_ns
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| i % ns == s)
                    .map(|(_, x)| x.load(Ordering::SeqCst))
                    .filter(|&x| x > 0)
                    .map(|x| (x as f64 - ack_ns) / 1e6)
                    .collect();
                stats(&mut v)
            })
            .collect();
        result["write_rtt_ms"] = json!(round3((ack_ns - send_ns) / 1e6));
        result["from_ack_ms"] = stats(&mut from_ack);
        result["from_send_ms"] = stats(&mut from_send);
        result["from_ack_ms_per_server"] = json!(per_server);
        result["received_before_ack"] = json!(from_ack.iter().filter(|x| **x < 0.0).count());
        result["write"] = w.detail.clone();
        if let Some(l) = last_recv {
            result["wait_s"] = json!(round3(l.saturating_duration_since(w.ack).as_secs_f64()));
        }
    }

    // End the round: close every stream (bounded).
    let _ = close_tx.send(true);
    let t_close = Instant::now();
    let closed = tokio::time::timeout(Duration::from_secs(20), async {
        while set.join_next().await.is_some() {}
    })
    .await
    .is_ok();
    if !closed {
        set.abort_all();
    }

    let received = sh.received.load(Ordering::SeqCst);
    let errors: BTreeMap<String, u64> = sh.errors.lock().map(|m| m.clone()).unwrap_or_default();
    let error_count: u64 = errors.values().sum();
    let obj = result.as_object_mut().ok_or("result")?;
    let extra = json!({
        "kind": "round",
        "system": match args.mode { Mode::Meshwork => "meshwork", Mode::Etcd => "etcd" },
        "client": args.client.name(),
        "label": args.label,
        "meta": args.meta,
        "n": n,
        "servers": args.servers,
        "conns_per_server": args.conns,
        "open_concurrency": args.open_concurrency,
        "write_server": args.write_server,
        "connect_s": round3(connect_s),
        "setup_s": round3(setup_s),
        "setup_timed_out": !setup_ok,
        "subscribed": subscribed,
        "setup_failed": sh.setup_failed.load(Ordering::SeqCst),
        "received": received,
        "missing": n - received,
        "lost_after_subscribe": sh.lost.load(Ordering::SeqCst),
        "unexpected_events": sh.unexpected.load(Ordering::SeqCst),
        "other_messages": sh.other_messages.load(Ordering::SeqCst),
        "delivery_timed_out": times.is_some() && !delivery_ok,
        "write_error": write_error,
        "errors": error_count,
        "error_samples": errors,
        "mem": {"before": mem_before, "held": mem_held, "after": mem_after},
        "cpu": {
            "setup": cpu_delta(args, &cpu0, &cpu1),
            "held": cpu_delta(args, &cpu1, &cpu2),
            "fanout": cpu_delta(args, &cpu2, &cpu3),
        },
        "close_s": round3(t_close.elapsed().as_secs_f64()),
        "closed_cleanly": closed,
        "timeout_s": args.timeout.as_secs(),
    });
    for (k, v) in extra.as_object().ok_or("extra")? {
        obj.insert(k.clone(), v.clone());
    }
    Ok(result)
}

fn main() {
    let args = Arc::new(parse_args());
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("runtime: {e}");
            std::process::exit(1);
        }
    };
    let sh = Arc::new(Shared::new(args.subscribers));
    let res = rt.block_on(async {
        match args.mode {
            Mode::Meshwork => meshwork_round(Arc::clone(&args), Arc::clone(&sh)).await,
            Mode::Etcd => etcd_round(Arc::clone(&args), Arc::clone(&sh)).await,
        }
    });
    rt.shutdown_timeout(Duration::from_secs(5));
    match res {
        Ok(v) => {
            println!("{v}");
        }
        Err(e) => {
            eprintln!("[{}] failed: {e}", args.label);
            println!(
                "{}",
                json!({"kind": "failed", "label": args.label, "meta": args.meta,
                       "system": match args.mode { Mode::Meshwork => "meshwork", Mode::Etcd => "etcd" },
                       "client": args.client.name(), "error": e.to_string()})
            );
            std::process::exit(2);
        }
    }
}
