//! Streamed request bodies on the HTTP/1.1 client: once the head is
//! written, the connection is split and a task pumps the client's body
//! into the write half (as it comes, `Content-Length` or chunked, trailers
//! included) while the exchange reads the response from the read half. An
//! upstream may answer before the upload ends (RFC 9112 §9.5 lets it).
//!
//! What the pump's end means:
//! - sent: the halves are joined again ([`Split::rejoin`]) and the
//!   connection may be pooled;
//! - the client's body broke off or was malformed: the exchange, if still
//!   waiting for the head, ends with [`Error::BodyBroke`] at once (the
//!   client's failure, never counted against the endpoint), and the
//!   upstream sees the request cut short;
//! - a write failed: the upstream closed or reset; its answer, if any, is
//!   still read.
//!
//! A response that ends while the body still streams leaves the pump to
//! finish on its own (the upstream gets the whole body); an exchange that
//! is abandoned — timed out, failed, or its response dropped half read —
//! stops the pump.

use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use http_body_util::BodyExt;
use hyper::HeaderMap;
use hyper::body::Body;
use tokio::io::AsyncWriteExt;
use tokio::sync::Notify;
use tokio::task::AbortHandle;

use super::Length;
use crate::tls::expiry::LeafStamp;
use crate::tls::stream::{ReadHalf as OwnedReadHalf, WriteHalf as OwnedWriteHalf};
use crate::upstream::BoxError;
use crate::upstream::cluster::OwnedGauge;
use crate::upstream::dial::Counted;

/// A connection whose request body is still being pumped.
pub struct Split {
    read: OwnedReadHalf,
    pump: Guard,
    /// The leaf the connection was made with, for the whole one again.
    leaf: Option<LeafStamp>,
}

/// The exchange's hold on the pump: dropped before the pump has ended, it
/// stops it (an abandoned exchange), unless the response completed
/// ([`Split::detach`]).
struct Guard {
    shared: Arc<Shared>,
    task: AbortHandle,
    /// The connection's place in the cluster's count of open connections;
    /// handed to a detached pump, which holds the socket's other half.
    slot: Option<OwnedGauge>,
    detached: bool,
}

/// What the pump and the exchange share.
pub struct Shared {
    state: Mutex<State>,
    /// Told once, when the pump ends.
    ended: Notify,
}

enum State {
    /// Still streaming; holds the connection's slot once the exchange has
    /// gone.
    Running(Option<OwnedGauge>),
    /// The whole body went out: the write half, to join again.
    Sent(OwnedWriteHalf),
    Failed(Failure),
    /// The write half was taken back.
    Joined,
}

/// Why the pump stopped before the body's end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Failure {
    /// The client's body broke off, was malformed, or did not match its
    /// declared length.
    Client,
    /// Writing to the upstream failed.
    Write,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Splits `io` and starts pumping `body` into its write half.
pub fn start<B>(io: Counted, body: B, length: Length) -> Split
where
    B: Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<BoxError>,
{
    let (stream, slot, leaf) = io.into_parts();
    let (read, write) = stream.into_split();
    let shared = Arc::new(Shared {
        state: Mutex::new(State::Running(None)),
        ended: Notify::new(),
    });
    let task = tokio::spawn(pump(write, body, length, Arc::clone(&shared))).abort_handle();
    Split {
        read,
        pump: Guard {
            shared,
            task,
            slot: Some(slot),
            detached: false,
        },
        leaf,
    }
}

async fn pump<B>(mut write: OwnedWriteHalf, body: B, length: Length, shared: Arc<Shared>)
where
    B: Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<BoxError>,
{
    let next = match send_body(&mut write, body, length).await {
        Ok(()) => State::Sent(write),
        Err(failure) => {
            tracing::debug!(?failure, "a streamed request body was cut short");
            // The write half closes here: the upstream sees the request
            // end early.
            State::Failed(failure)
        }
    };
    let kept_slot = match std::mem::replace(&mut *shared.lock(), next) {
        State::Running(slot) => slot,
        _ => None,
    };
    drop(kept_slot);
    shared.ended.notify_one();
}

/// Writes the body as `length` frames it.
async fn send_body<B>(
    write: &mut OwnedWriteHalf,
    mut body: B,
    length: Length,
) -> Result<(), Failure>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    let mut sent = 0u64;
    loop {
        let frame = match body.frame().await {
            Some(Ok(frame)) => frame,
            Some(Err(_)) => return Err(Failure::Client),
            None => break,
        };
        let frame = match frame.into_data() {
            Ok(data) if data.is_empty() => continue,
            Ok(data) => {
                sent += data.len() as u64;
                let written = match length {
                    Length::Exact(n) if sent > n => return Err(Failure::Client),
                    Length::Exact(_) => write.write_all(&data).await,
                    Length::Chunked => write_chunk(write, data).await,
                    // A body said to be empty that has data after all.
                    Length::None => return Err(Failure::Client),
                };
                written.map_err(|_| Failure::Write)?;
                continue;
            }
            Err(frame) => frame,
        };
        if let (Ok(trailers), Length::Chunked) = (frame.into_trailers(), length) {
            return write_last_chunk(write, Some(&trailers)).await;
        }
        // Trailers on a body with a length have no place in HTTP/1.1.
    }
    match length {
        Length::Exact(n) if sent != n => Err(Failure::Client),
        Length::Chunked => write_last_chunk(write, None).await,
        _ => Ok(()),
    }
}

/// One chunk: its size line, the data and its CRLF, in one vectored write.
async fn write_chunk(write: &mut OwnedWriteHalf, data: Bytes) -> io::Result<()> {
    let mut line = [0u8; 18];
    let size = chunk_size_line(data.len(), &mut line);
    let mut out = size.chain(data).chain(&b"\r\n"[..]);
    write.write_all_buf(&mut out).await
}

/// `<hex size>\r\n`.
fn chunk_size_line(n: usize, buf: &mut [u8; 18]) -> &[u8] {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut i = buf.len() - 2;
    buf[i..].copy_from_slice(b"\r\n");
    let mut n = n;
    loop {
        i -= 1;
        buf[i] = HEX[n & 0xf];
        n >>= 4;
        if n == 0 {
            return &buf[i..];
        }
    }
}

/// The last chunk and the trailer section.
async fn write_last_chunk(
    write: &mut OwnedWriteHalf,
    trailers: Option<&HeaderMap>,
) -> Result<(), Failure> {
    let mut out = Vec::with_capacity(64);
    out.extend_from_slice(b"0\r\n");
    for (name, value) in trailers.into_iter().flatten() {
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
    write.write_all(&out).await.map_err(|_| Failure::Write)
}

impl Split {
    pub fn poll_read_buf(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut BytesMut,
    ) -> Poll<io::Result<usize>> {
        tokio_util::io::poll_read_buf(Pin::new(&mut self.read), cx, buf)
    }

    pub fn shared(&self) -> Arc<Shared> {
        Arc::clone(&self.pump.shared)
    }

    /// The response is complete: a pump still running goes on to the end
    /// of the body when this is dropped.
    pub fn detach(&mut self) {
        self.pump.detached = true;
    }

    /// The whole connection again, once the body has gone out;
    /// `Err(Some)` while it still streams, `Err(None)` when it failed.
    pub fn rejoin(self) -> Result<Counted, Option<Split>> {
        let mut state = self.pump.shared.lock();
        let write = match std::mem::replace(&mut *state, State::Joined) {
            State::Sent(write) => write,
            other @ State::Running(_) => {
                *state = other;
                drop(state);
                return Err(Some(self));
            }
            other => {
                *state = other;
                return Err(None);
            }
        };
        drop(state);
        let Split {
            read,
            mut pump,
            leaf,
        } = self;
        match (read.reunite(write), pump.slot.take()) {
            (Some(stream), Some(slot)) => Ok(Counted::from_parts(stream, slot, leaf)),
            // Halves of one stream, and the slot is only given up on drop:
            // neither can fail; the connection would just close.
            _ => Err(None),
        }
    }

    /// The whole connection once the pump has ended (a tunnel: nothing
    /// more may be read before the request has been sent); `None` if the
    /// body could not be sent.
    pub async fn finished(self) -> Option<Counted> {
        let shared = self.shared();
        let mut split = self;
        loop {
            let waiting = shared.ended.notified();
            match split.rejoin() {
                Ok(io) => return Some(io),
                Err(Some(back)) => split = back,
                Err(None) => return None,
            }
            waiting.await;
        }
    }
}

/// Whether the pump has stopped because of the client's body: a head read
/// that failed meanwhile (the upstream closing on the cut-short request)
/// is the client's failure too.
pub fn client_failed(shared: &Shared) -> bool {
    matches!(&*shared.lock(), State::Failed(Failure::Client))
}

/// Resolves when the pump has stopped because of the client's body (and
/// never otherwise): a head still awaited will not come.
pub async fn client_broke(shared: &Shared) {
    loop {
        let waiting = shared.ended.notified();
        match &*shared.lock() {
            State::Failed(Failure::Client) => return,
            State::Running(_) => {}
            _ => break,
        }
        waiting.await;
    }
    std::future::pending::<()>().await;
}

impl Drop for Guard {
    fn drop(&mut self) {
        let mut state = self.shared.lock();
        if let State::Running(kept) = &mut *state {
            if self.detached {
                *kept = self.slot.take();
            } else {
                self.task.abort();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_size_lines_are_hex() {
        let mut buf = [0u8; 18];
        assert_eq!(chunk_size_line(0, &mut buf), b"0\r\n");
        assert_eq!(chunk_size_line(0x1a2f, &mut buf), b"1a2f\r\n");
        assert_eq!(
            chunk_size_line(usize::MAX, &mut buf),
            b"ffffffffffffffff\r\n"
        );
    }
}
