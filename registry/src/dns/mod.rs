//! The DNS interface (UDP and TCP): every server answers from its own copy
//! of the state (stale reads, no request to the leader), so an applied
//! change shows in the next answer with no polling. Names outside the
//! domain go to the configured recursors, or are refused.
//!
//! Packets are parsed and built with hickory-proto; the socket loops are
//! our own so that every malformed packet gets an answer (or is dropped)
//! by rules we control, and UDP answers respect 512 bytes without EDNS.

pub mod answer;
pub mod cache;

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::raft::state_machine::SharedState;
pub use answer::DnsConfig;
use answer::{Outcome, Transport};
use cache::AnswerCache;

/// Concurrent TCP connections served; more wait in the accept queue.
const MAX_TCP_CONNECTIONS: usize = 512;
/// A TCP connection idle this long is closed.
const TCP_IDLE: Duration = Duration::from_secs(10);
/// TCP connections one source address may hold: a resolver multiplexes
/// its queries over a few (RFC 7766); more is one client taking the pool.
const MAX_TCP_PER_SOURCE: usize = 16;
/// How long a recursor gets to answer.
const RECURSOR_TIMEOUT: Duration = Duration::from_secs(2);
/// UDP receive workers sharing the socket.
const UDP_WORKERS: usize = 2;

/// Serves DNS on both sockets until `shutdown`.
pub async fn serve(
    udp: UdpSocket,
    tcp: TcpListener,
    state: Arc<SharedState>,
    config: Arc<DnsConfig>,
    shutdown: CancellationToken,
) {
    let udp = Arc::new(udp);
    let cache = AnswerCache::new(cache::DEFAULT_BUDGET);
    let mut tasks = JoinSet::new();
    for _ in 0..UDP_WORKERS {
        tasks.spawn(udp_worker(
            Arc::clone(&udp),
            (Arc::clone(&state), Arc::clone(&cache)),
            Arc::clone(&config),
            shutdown.clone(),
        ));
    }
    tasks.spawn(tcp_acceptor(tcp, (state, cache), config, shutdown.clone()));
    while tasks.join_next().await.is_some() {}
}

/// The state answers come from, and the answers kept from it.
type Source = (Arc<SharedState>, Arc<AnswerCache>);

async fn udp_worker(
    socket: Arc<UdpSocket>,
    (state, cache): Source,
    config: Arc<DnsConfig>,
    shutdown: CancellationToken,
) {
    let mut buf = vec![0u8; 65_535];
    // Each answer is written here (kept answers are copied, not made).
    let mut out = Vec::with_capacity(4096);
    let mut forwards = JoinSet::new();
    loop {
        let (len, src) = tokio::select! {
            () = shutdown.cancelled() => break,
            Some(_) = forwards.join_next(), if !forwards.is_empty() => continue,
            received = socket.recv_from(&mut buf) => match received {
                Ok(r) => r,
                Err(e) => {
                    // ICMP errors from earlier sends surface here; keep serving.
                    tracing::debug!(error = %e, "dns udp receive failed");
                    continue;
                }
            },
        };
        let packet = &buf[..len];
        let outcome = {
            let state = state.read();
            cache.answer(packet, &state, &config, Transport::Udp, &mut out)
        };
        match outcome {
            Outcome::Placed | Outcome::Reply(_) => {
                let bytes = match &outcome {
                    Outcome::Reply(bytes) => bytes,
                    _ => &out,
                };
                count_answer(packet, bytes);
                if let Err(e) = socket.send_to(bytes, src).await {
                    tracing::debug!(error = %e, %src, "dns udp send failed");
                }
            }
            Outcome::Forward if forwards.len() < 256 => {
                let packet = packet.to_vec();
                let socket = Arc::clone(&socket);
                let recursors = config.recursors.clone();
                forwards.spawn(async move {
                    let reply = forward(&packet, &recursors)
                        .await
                        .unwrap_or_else(|| servfail(&packet));
                    let _ = socket.send_to(&reply, src).await;
                });
            }
            Outcome::Forward => {
                let _ = socket.send_to(&servfail(packet), src).await;
            }
            Outcome::Drop => {}
        }
    }
    forwards.abort_all();
}

/// The open TCP connections: how many per source, and in opening order
/// whether each is idle (waiting for a query), so that a full pool makes
/// room by closing the oldest idle one rather than making new clients wait.
#[derive(Default)]
struct TcpConnections {
    per_source: HashMap<IpAddr, usize>,
    open: VecDeque<(u64, Arc<TcpConnState>)>,
    next_id: u64,
}

struct TcpConnState {
    idle: AtomicBool,
    close: CancellationToken,
}

impl TcpConnections {
    /// Registers a connection from `source`; `None` when the source already
    /// holds its share.
    fn open(&mut self, source: IpAddr) -> Option<(u64, Arc<TcpConnState>)> {
        let count = self.per_source.entry(source).or_insert(0);
        if *count >= MAX_TCP_PER_SOURCE {
            return None;
        }
        *count += 1;
        self.next_id += 1;
        let state = Arc::new(TcpConnState {
            idle: AtomicBool::new(true),
            close: CancellationToken::new(),
        });
        self.open.push_back((self.next_id, Arc::clone(&state)));
        Some((self.next_id, state))
    }

    fn closed(&mut self, id: u64, source: IpAddr) {
        self.open.retain(|(i, _)| *i != id);
        if let Some(count) = self.per_source.get_mut(&source) {
            *count -= 1;
            if *count == 0 {
                self.per_source.remove(&source);
            }
        }
    }

    /// Closes the oldest idle connection; false when every one is busy.
    fn close_oldest_idle(&self) -> bool {
        match self
            .open
            .iter()
            .find(|(_, c)| c.idle.load(Ordering::Relaxed))
        {
            Some((_, c)) => {
                c.close.cancel();
                true
            }
            None => false,
        }
    }
}

fn lock(t: &Mutex<TcpConnections>) -> std::sync::MutexGuard<'_, TcpConnections> {
    t.lock().unwrap_or_else(|e| e.into_inner())
}

async fn tcp_acceptor(
    listener: TcpListener,
    (state, cache): Source,
    config: Arc<DnsConfig>,
    shutdown: CancellationToken,
) {
    let permits = Arc::new(Semaphore::new(MAX_TCP_CONNECTIONS));
    let tracked = Arc::new(Mutex::new(TcpConnections::default()));
    let mut connections = JoinSet::new();
    loop {
        let (stream, peer) = tokio::select! {
            () = shutdown.cancelled() => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::debug!(error = %e, "dns tcp accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Some((id, conn)) = lock(&tracked).open(peer.ip()) else {
            tracing::debug!(source = %peer.ip(), "dns tcp: this source holds its share of connections; closing");
            continue;
        };
        // A full pool makes room: the oldest idle connection goes.
        if permits.available_permits() == 0 {
            lock(&tracked).close_oldest_idle();
        }
        let permit = tokio::select! {
            () = shutdown.cancelled() => break,
            permit = Arc::clone(&permits).acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break,
            },
        };
        let source = (Arc::clone(&state), Arc::clone(&cache));
        let config = Arc::clone(&config);
        let token = shutdown.clone();
        let tracked = Arc::clone(&tracked);
        connections.spawn(async move {
            tokio::select! {
                () = token.cancelled() => {}
                () = conn.close.cancelled() => {}
                () = tcp_connection(stream, source, config, &conn.idle) => {}
            }
            lock(&tracked).closed(id, peer.ip());
            drop(permit);
        });
    }
    connections.abort_all();
}

/// Serves length-prefixed queries on one connection until it closes,
/// idles, or sends something that is not DNS.
async fn tcp_connection(
    mut stream: TcpStream,
    (state, cache): Source,
    config: Arc<DnsConfig>,
    idle: &AtomicBool,
) {
    let _ = stream.set_nodelay(true);
    let mut out = Vec::new();
    loop {
        let mut len = [0u8; 2];
        idle.store(true, Ordering::Relaxed);
        match tokio::time::timeout(TCP_IDLE, stream.read_exact(&mut len)).await {
            Ok(Ok(_)) => {}
            _ => return,
        }
        idle.store(false, Ordering::Relaxed);
        let len = usize::from(u16::from_be_bytes(len));
        let mut packet = vec![0u8; len];
        match tokio::time::timeout(TCP_IDLE, stream.read_exact(&mut packet)).await {
            Ok(Ok(_)) => {}
            _ => return,
        }
        let outcome = {
            let state = state.read();
            cache.answer(&packet, &state, &config, Transport::Tcp, &mut out)
        };
        let reply = match outcome {
            Outcome::Reply(bytes) => {
                count_answer(&packet, &bytes);
                bytes
            }
            Outcome::Placed => {
                count_answer(&packet, &out);
                std::mem::take(&mut out)
            }
            Outcome::Forward => forward(&packet, &config.recursors)
                .await
                .unwrap_or_else(|| servfail(&packet)),
            Outcome::Drop => return,
        };
        let Ok(reply_len) = u16::try_from(reply.len()) else {
            return;
        };
        let mut framed = Vec::with_capacity(reply.len() + 2);
        framed.extend_from_slice(&reply_len.to_be_bytes());
        framed.extend_from_slice(&reply);
        if stream.write_all(&framed).await.is_err() {
            return;
        }
    }
}

/// Asks each recursor in turn over UDP; the first answer with our id wins.
async fn forward(packet: &[u8], recursors: &[SocketAddr]) -> Option<Vec<u8>> {
    for recursor in recursors {
        let bind: SocketAddr = if recursor.is_ipv4() {
            ([0, 0, 0, 0], 0).into()
        } else {
            ([0u16; 8], 0).into()
        };
        let Ok(socket) = UdpSocket::bind(bind).await else {
            continue;
        };
        if socket.send_to(packet, recursor).await.is_err() {
            continue;
        }
        let mut buf = vec![0u8; 65_535];
        if let Ok(Ok((len, from))) =
            tokio::time::timeout(RECURSOR_TIMEOUT, socket.recv_from(&mut buf)).await
            && from == *recursor
            && len >= 2
            && buf[..2] == packet[..2]
        {
            buf.truncate(len);
            return Some(buf);
        }
        tracing::debug!(%recursor, "recursor did not answer");
    }
    None
}

fn servfail(packet: &[u8]) -> Vec<u8> {
    let mut out = vec![0u8; 12];
    out[0] = packet.first().copied().unwrap_or(0);
    out[1] = packet.get(1).copied().unwrap_or(0);
    out[2] = 0x80 | (packet.get(2).copied().unwrap_or(0) & 0x79);
    out[3] = 0x80 | 2;
    out
}

/// Counts an answer by the question's type and the answer's rcode, read
/// straight off the wire (both packets were already validated).
fn count_answer(query: &[u8], reply: &[u8]) {
    let rcode = match reply.get(3).map(|b| b & 0x0f) {
        Some(0) => "NOERROR",
        Some(1) => "FORMERR",
        Some(2) => "SERVFAIL",
        Some(3) => "NXDOMAIN",
        Some(4) => "NOTIMP",
        Some(5) => "REFUSED",
        _ => "OTHER",
    };
    crate::metrics::METRICS.dns_answer(qtype(query), rcode);
}

/// The first question's type, by name.
fn qtype(query: &[u8]) -> &'static str {
    let mut at = 12usize;
    // Bounded: a name has at most 128 labels.
    for _ in 0..128 {
        match query.get(at) {
            Some(0) => break,
            Some(len) if len & 0xc0 == 0 => at += 1 + usize::from(*len),
            _ => return "OTHER",
        }
    }
    let code = match (query.get(at + 1), query.get(at + 2)) {
        (Some(hi), Some(lo)) => u16::from_be_bytes([*hi, *lo]),
        _ => return "OTHER",
    };
    match code {
        1 => "A",
        2 => "NS",
        5 => "CNAME",
        6 => "SOA",
        12 => "PTR",
        15 => "MX",
        16 => "TXT",
        28 => "AAAA",
        33 => "SRV",
        255 => "ANY",
        _ => "OTHER",
    }
}
