//! TLS on the wire: accepting (plain or TLS connections as one stream for
//! tonic), the handshake with its deadline, and the connector that dials
//! another server over mutual TLS.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::Stream;
use hyper_util::rt::TokioIo;
use rustls::ServerConfig;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::Tls;

/// How long a client has to finish its TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Handshakes in progress at once per listener (past it, new connections
/// wait in the kernel's backlog).
const HANDSHAKES_MAX: usize = 256;

/// One accepted connection: plain TCP, or TLS over it.
#[derive(Debug)]
pub enum Conn {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

impl Conn {
    fn tcp(&self) -> &TcpStream {
        match self {
            Conn::Plain(s) => s,
            Conn::Tls(s) => s.get_ref().0,
        }
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_write(cx, data),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, data),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Conn::Plain(s) => s.is_write_vectored(),
            Conn::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_flush(cx),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

impl tonic::transport::server::Connected for Conn {
    type ConnectInfo = tonic::transport::server::TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        tonic::transport::server::TcpConnectInfo {
            local_addr: self.tcp().local_addr().ok(),
            remote_addr: self.tcp().peer_addr().ok(),
        }
    }
}

/// Why a handshake did not complete.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    #[error("plaintext HTTP on a TLS port")]
    Plaintext,
    #[error("no handshake within {0:?}")]
    Timeout(Duration),
    #[error("{0}")]
    Io(#[from] io::Error),
}

/// Finishes the server side of a handshake on `stream`. A client that
/// speaks plain HTTP to this port is told so in plain HTTP (as Go's
/// servers do) and closed.
pub async fn accept(
    stream: TcpStream,
    config: Arc<ServerConfig>,
) -> Result<tokio_rustls::server::TlsStream<TcpStream>, HandshakeError> {
    let work = async {
        let mut first = [0u8; 1];
        // A TLS client opens with a handshake record (0x16); an HTTP
        // client with a method name.
        let peeked = stream.peek(&mut first).await?;
        if peeked == 1 && first[0].is_ascii_uppercase() {
            let mut stream = stream;
            let _ = stream
                .write_all(
                    b"HTTP/1.0 400 Bad Request\r\nContent-Type: text/plain; charset=utf-8\r\n\
                      Connection: close\r\n\r\nClient sent an HTTP request to an HTTPS server.\n",
                )
                .await;
            let _ = stream.shutdown().await;
            return Err(HandshakeError::Plaintext);
        }
        Ok(tokio_rustls::TlsAcceptor::from(config)
            .accept(stream)
            .await?)
    };
    tokio::time::timeout(HANDSHAKE_TIMEOUT, work)
        .await
        .map_err(|_| HandshakeError::Timeout(HANDSHAKE_TIMEOUT))?
}

/// The connections of `listener` as a stream for tonic: plain, or (with
/// `tls`) each after its handshake, done in a task of its own so one slow
/// client holds up no other. Ends when `shutdown` is cancelled.
pub fn incoming(
    listener: TcpListener,
    tls: Option<Arc<ServerConfig>>,
    what: &'static str,
    shutdown: CancellationToken,
) -> impl Stream<Item = Result<Conn, io::Error>> + Send + 'static {
    let (tx, mut rx) = mpsc::channel::<Conn>(64);
    tokio::spawn(async move {
        let handshakes = Arc::new(tokio::sync::Semaphore::new(HANDSHAKES_MAX));
        loop {
            let accepted = tokio::select! {
                () = shutdown.cancelled() => return,
                () = tx.closed() => return,
                accepted = listener.accept() => accepted,
            };
            let stream = match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::warn!(listener = what, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let _ = stream.set_nodelay(true);
            match &tls {
                None => {
                    if tx.send(Conn::Plain(stream)).await.is_err() {
                        return;
                    }
                }
                Some(config) => {
                    let Ok(permit) = Arc::clone(&handshakes).acquire_owned().await else {
                        return;
                    };
                    let (tx, config) = (tx.clone(), Arc::clone(config));
                    tokio::spawn(async move {
                        let peer = stream.peer_addr().ok();
                        match accept(stream, config).await {
                            Ok(tls) => {
                                drop(permit);
                                let _ = tx.send(Conn::Tls(Box::new(tls))).await;
                            }
                            Err(e) => {
                                tracing::debug!(listener = what, ?peer, error = %e, "TLS handshake failed");
                            }
                        }
                    });
                }
            }
        }
    });
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx).map(|c| c.map(Ok)))
}

/// Dials other servers over mutual TLS, for tonic's channels: the URI's
/// host and port, then the handshake naming `server.<dc>.meshwork`.
pub fn connector(
    tls: Arc<Tls>,
) -> impl tower::Service<
    tonic::codegen::http::Uri,
    Response = TokioIo<tokio_rustls::client::TlsStream<TcpStream>>,
    Error = io::Error,
    Future = impl Future<Output = io::Result<TokioIo<tokio_rustls::client::TlsStream<TcpStream>>>>
             + Send,
> + Clone
+ Send
+ 'static {
    tower::service_fn(move |uri: tonic::codegen::http::Uri| {
        let tls = Arc::clone(&tls);
        async move {
            let host = uri
                .host()
                .unwrap_or_default()
                .trim_matches(|c| c == '[' || c == ']');
            let port = uri.port_u16().unwrap_or(8300);
            let tcp = TcpStream::connect((host, port)).await?;
            tcp.set_nodelay(true)?;
            let config = tls.client_config().map_err(io::Error::other)?;
            let name = tls.server_name().map_err(io::Error::other)?;
            let stream = tokio::time::timeout(
                HANDSHAKE_TIMEOUT,
                tokio_rustls::TlsConnector::from(config).connect(name, tcp),
            )
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "TLS handshake timed out"))??;
            Ok(TokioIo::new(stream))
        }
    })
}
