//! The light client (`--client light`): the same few lines for both systems.
//!
//! Every subscriber opens one gRPC stream over raw HTTP/2 (`h2`) with the
//! usual request headers (`:method POST`, `:path` of the method,
//! `content-type: application/grpc`, `te: trailers`) and sends the request
//! message, encoded ONCE up front, as its only DATA (then end of stream; etcd
//! keeps a watch whose client half-closed). It then reads the response's
//! DATA frames, releases their flow-control capacity as they are read,
//! splits them into gRPC messages by the 5-byte length prefixes (a message
//! split across frames is assembled from a small carry-over buffer) and
//! recognises messages by their bytes instead of decoding them:
//!
//! * subscribed = the first message whose top-level varint field F has the
//!   value V (Meshwork: `WatchEvent.kind` (1) = END_OF_SNAPSHOT (2); etcd:
//!   `WatchResponse.created` (3) = true (1)); earlier messages (Meshwork's
//!   snapshot) are skipped;
//! * received = the first later message that contains the needle bytes
//!   (Meshwork: the new instance's service ID; etcd: the written value).
//!
//! A system is described by a `Spec` (method path, request bytes, F/V,
//! needle); nothing else differs between the two systems. The HTTP/2
//! settings are hyper's client defaults, which tonic (both full clients)
//! uses: 2 MiB stream window, 5 MiB connection window, at most 100 streams
//! opened before the server's SETTINGS arrive, no server push.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::net::TcpStream;
use tokio::sync::{Semaphore, watch};

use crate::{BoxError, Shared};

/// What a light subscriber sends and looks for: the only per-system inputs.
pub struct Spec {
    /// The gRPC method, e.g. `/meshwork.v1.Watch/Subscribe`.
    pub path: &'static str,
    /// The request message with its 5-byte gRPC prefix, encoded once.
    pub request: Bytes,
    /// Subscribed: the first message whose top-level varint field `.0` is `.1`.
    pub subscribed: (u32, u64),
    /// A message with top-level varint field `.0` = `.1` ends the stream
    /// (etcd: `canceled` (4) = true). Checked only on messages that are
    /// neither the subscribed marker nor the change.
    pub canceled: Option<(u32, u64)>,
    /// Received: a message after the subscribed one that contains these bytes.
    pub needle: Vec<u8>,
}

impl Spec {
    /// `message` (already protobuf-encoded) with the gRPC prefix: flag 0
    /// (not compressed) and the big-endian u32 length.
    pub fn frame(message: &[u8]) -> Bytes {
        let mut b = Vec::with_capacity(5 + message.len());
        b.push(0);
        b.extend_from_slice(&(message.len() as u32).to_be_bytes());
        b.extend_from_slice(message);
        Bytes::from(b)
    }
}

/// One HTTP/2 connection to one server (clones share it).
#[derive(Clone)]
pub struct Conn {
    send: h2::client::SendRequest<Bytes>,
    uri: http::Uri,
}

pub async fn connect(addr: &str, path: &str) -> Result<Conn, BoxError> {
    let tcp = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(addr))
        .await
        .map_err(|_| format!("connect to {addr} timed out"))??;
    tcp.set_nodelay(true)?;
    // hyper's HTTP/2 client defaults (what tonic uses when nothing is set).
    let (send, conn) = h2::client::Builder::new()
        .initial_max_send_streams(100)
        .initial_window_size(2 << 20)
        .initial_connection_window_size(5 << 20)
        .max_header_list_size(16 << 10)
        .max_send_buffer_size(1 << 20)
        .enable_push(false)
        .handshake::<_, Bytes>(tcp)
        .await?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            eprintln!("light client: connection ended: {e}");
        }
    });
    let uri = format!("http://{addr}{path}").parse()?;
    Ok(Conn { send, uri })
}

/// Splits a gRPC response body into messages by their 5-byte prefixes.
#[derive(Default)]
struct Framer {
    /// The start of a message (or prefix) not complete yet.
    carry: Vec<u8>,
}

impl Framer {
    /// Calls `f` on each complete message, in order, until it returns true
    /// (then returns Ok(true); the rest of the data is not looked at).
    fn feed(&mut self, chunk: &[u8], mut f: impl FnMut(&[u8]) -> bool) -> Result<bool, String> {
        if self.carry.is_empty() {
            let (used, stop) = Self::split(chunk, &mut f)?;
            if !stop {
                self.carry.extend_from_slice(&chunk[used..]);
            }
            return Ok(stop);
        }
        self.carry.extend_from_slice(chunk);
        let buf = std::mem::take(&mut self.carry);
        let (used, stop) = Self::split(&buf, &mut f)?;
        if !stop {
            self.carry = buf;
            self.carry.drain(..used);
        }
        Ok(stop)
    }

    fn split(b: &[u8], f: &mut impl FnMut(&[u8]) -> bool) -> Result<(usize, bool), String> {
        let mut at = 0;
        while b.len() - at >= 5 {
            if b[at] != 0 {
                return Err(format!("compressed or unknown message flag {}", b[at]));
            }
            let len = u32::from_be_bytes([b[at + 1], b[at + 2], b[at + 3], b[at + 4]]) as usize;
            if len > 64 << 20 {
                return Err(format!("message of {len} bytes"));
            }
            if b.len() - at - 5 < len {
                break;
            }
            let msg = &b[at + 5..at + 5 + len];
            at += 5 + len;
            if f(msg) {
                return Ok((at, true));
            }
        }
        Ok((at, false))
    }
}

fn varint(b: &[u8], at: &mut usize) -> Option<u64> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let x = *b.get(*at)?;
        *at += 1;
        v |= u64::from(x & 0x7f) << shift;
        if x & 0x80 == 0 {
            return Some(v);
        }
    }
    None
}

/// Whether the message's top-level varint field `field` is `value` (walks
/// the top-level fields only, skipping the contents of nested ones).
fn has_varint(msg: &[u8], (field, value): (u32, u64)) -> bool {
    let mut at = 0;
    let mut found = false;
    while at < msg.len() {
        let Some(key) = varint(msg, &mut at) else {
            return false;
        };
        let num = key >> 3;
        match key & 7 {
            0 => {
                let Some(v) = varint(msg, &mut at) else {
                    return false;
                };
                if num == u64::from(field) {
                    found = v == value; // the last occurrence counts
                }
            }
            1 => at += 8,
            2 => {
                let Some(len) = varint(msg, &mut at) else {
                    return false;
                };
                at = at.saturating_add(len as usize);
            }
            5 => at += 4,
            _ => return false,
        }
    }
    found && at == msg.len()
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && hay.windows(needle.len()).any(|w| w == needle)
}

async fn start(conn: Conn, spec: &Spec) -> Result<h2::RecvStream, BoxError> {
    let mut send = conn.send.ready().await?;
    let req = http::Request::builder()
        .method(http::Method::POST)
        .uri(conn.uri)
        .header(http::header::CONTENT_TYPE, "application/grpc")
        .header(http::header::TE, "trailers")
        .body(())?;
    let (resp, mut body) = send.send_request(req, false)?;
    body.send_data(spec.request.clone(), true)?;
    let resp = resp.await?;
    if resp.status() != http::StatusCode::OK {
        return Err(format!("HTTP status {}", resp.status()).into());
    }
    // A "trailers-only" response (an immediate error) carries grpc-status here.
    if let Some(st) = resp.headers().get("grpc-status").filter(|s| s.as_bytes() != b"0") {
        let msg = resp
            .headers()
            .get("grpc-message")
            .map(|m| String::from_utf8_lossy(m.as_bytes()).into_owned());
        return Err(format!("grpc-status {:?}: {}", st, msg.unwrap_or_default()).into());
    }
    Ok(resp.into_body())
}

enum Outcome {
    Pending,
    Received,
    Canceled,
}

pub async fn subscriber(
    i: usize,
    conn: Conn,
    spec: Arc<Spec>,
    sh: Arc<Shared>,
    open: Arc<Semaphore>,
    mut close: watch::Receiver<bool>,
) {
    let Ok(permit) = open.acquire_owned().await else {
        return;
    };
    let mut permit = Some(permit);
    let mut body = tokio::select! {
        r = start(conn, &spec) => match r {
            Ok(b) => b,
            Err(e) => return sh.setup_failed("subscribe", e),
        },
        _ = close.changed() => return,
    };
    let mut framer = Framer::default();
    let mut subscribed = false;
    loop {
        let d = tokio::select! {
            d = body.data() => d,
            _ = close.changed() => return,
        };
        let t = Instant::now();
        let what = if subscribed { "watch" } else { "snapshot" };
        let chunk = match d {
            Some(Ok(c)) => c,
            Some(Err(e)) if subscribed => return sh.lost(what, e),
            Some(Err(e)) => return sh.setup_failed(what, e),
            None => {
                let tr = match tokio::time::timeout(Duration::from_secs(1), body.trailers()).await {
                    Ok(Ok(Some(h))) => format!(
                        " (grpc-status {:?} {:?})",
                        h.get("grpc-status"),
                        h.get("grpc-message")
                    ),
                    _ => String::new(),
                };
                let e = format!("stream ended{tr}");
                return if subscribed { sh.lost(what, e) } else { sh.setup_failed(what, e) };
            }
        };
        let _ = body.flow_control().release_capacity(chunk.len());
        let mut outcome = Outcome::Pending;
        let r = framer.feed(&chunk, |m| {
            if !subscribed {
                if has_varint(m, spec.subscribed) {
                    subscribed = true;
                    permit = None;
                    sh.subscribed();
                    return false;
                }
            } else if contains(m, &spec.needle) {
                outcome = Outcome::Received;
                return true;
            } else {
                sh.other_messages.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            if spec.canceled.is_some_and(|c| has_varint(m, c)) {
                outcome = Outcome::Canceled;
                return true;
            }
            false
        });
        match (r, outcome) {
            (Err(e), _) if subscribed => return sh.lost(what, e),
            (Err(e), _) => return sh.setup_failed(what, e),
            (Ok(_), Outcome::Received) => {
                sh.received(i, t);
                break;
            }
            (Ok(_), Outcome::Canceled) if subscribed => {
                return sh.lost("watch", "canceled by the server");
            }
            (Ok(_), Outcome::Canceled) => {
                return sh.setup_failed("watch", "canceled by the server");
            }
            (Ok(_), Outcome::Pending) => {}
        }
    }
    drop(permit);
    // Keep the stream open until the round ends (as the full client does).
    let _ = close.wait_for(|c| *c).await;
    drop(body);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msgs(parts: &[&[u8]]) -> Vec<Vec<u8>> {
        let mut f = Framer::default();
        let mut out = Vec::new();
        for p in parts {
            f.feed(p, |m| {
                out.push(m.to_vec());
                false
            })
            .unwrap();
        }
        out
    }

    #[test]
    fn framer_handles_any_split() {
        let a = Spec::frame(b"hello");
        let b = Spec::frame(b"");
        let c = Spec::frame(&[7u8; 300]);
        let all: Vec<u8> = [a.as_ref(), b.as_ref(), c.as_ref()].concat();
        let want = vec![b"hello".to_vec(), Vec::new(), vec![7u8; 300]];
        for cut1 in 0..all.len() {
            for cut2 in cut1..all.len() {
                assert_eq!(
                    msgs(&[&all[..cut1], &all[cut1..cut2], &all[cut2..]]),
                    want,
                    "{cut1} {cut2}"
                );
            }
        }
    }

    #[test]
    fn markers() {
        use prost::Message;
        let ev = crate::pb::WatchEvent {
            kind: crate::pb::watch_event::Kind::EndOfSnapshot as i32,
            index: 300,
            ..Default::default()
        };
        assert!(has_varint(&ev.encode_to_vec(), (1, 2)));
        let snap = crate::pb::WatchEvent {
            kind: crate::pb::watch_event::Kind::Snapshot as i32,
            index: 2,
            changes: vec![crate::pb::Change {
                change: Some(crate::pb::change::Change::EndpointRemoved("x".into())),
            }],
            ..Default::default()
        };
        assert!(!has_varint(&snap.encode_to_vec(), (1, 2)));
        let created = etcd_client::proto::PbWatchResponse {
            created: true,
            watch_id: 7,
            ..Default::default()
        };
        assert!(has_varint(&created.encode_to_vec(), (3, 1)));
        assert!(!has_varint(&created.encode_to_vec(), (4, 1)));
        assert!(contains(b"abcdef", b"cde") && !contains(b"abcdef", b"cdf"));
    }
}
