//! The connection layer: our own accept loop in place of `axum::serve`, so that every connection
//! is served with the limits we choose. HTTP/1.1 and h2c (prior knowledge) on one port,
//! `TCP_NODELAY`, `ConnectInfo<SocketAddr>` for the extractors, a request-head limit answered with
//! a 431 problem, a header read timeout (which also ends idle keep-alive connections), the open
//! connection count as a gauge, and graceful shutdown that lets open responses (event streams
//! included) finish.
//!
//! The protocol is told apart by peeking at the first bytes, not by reading and replaying them
//! as hyper-util's auto builder does: a replayed prefix makes hyper's first read fill only those
//! bytes, and its next read then doubles the buffer to 16 KiB for the life of the connection.

use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::ConnectInfo;
use bytes::Bytes;
use http_body::{Frame, SizeHint};
use hyper::body::Incoming;
use hyper::server::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tower::Service;

use crate::ports::ConnectionMetrics;

use super::problem;

/// The HTTP/2 connection preface a prior-knowledge (h2c) client opens with.
const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// Request body bytes read and thrown away after a 431, so the client reads the answer instead
/// of a reset; past this the connection is closed anyway.
const REJECT_DRAIN_BYTES: usize = 1024 * 1024;

/// Limits every connection is served with.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    /// Largest request head (request line and headers), in bytes; larger ones get a 431.
    pub max_head_bytes: usize,
    /// Time a client has to send a whole request head, from connecting or from the end of the
    /// previous response on a kept-alive connection.
    pub header_read_timeout: Duration,
}

/// Serves `router` on `listener` until `shutdown` is cancelled, then stops accepting and waits
/// for the open connections to finish their responses.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: ConnectionLimits,
    metrics: Arc<dyn ConnectionMetrics>,
    shutdown: CancellationToken,
) {
    let server = Arc::new(Server::new(router, limits, metrics));
    let graceful = GracefulShutdown::new();
    loop {
        let (tcp, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    accept_failed(error).await;
                    continue;
                }
            },
        };
        // Small SSE events must leave at once, not wait for the peer's delayed ACK (Nagle).
        if let Err(error) = tcp.set_nodelay(true) {
            tracing::warn!(%error, "cannot set TCP_NODELAY");
        }
        let open = OpenConnection::new(server.metrics.clone());
        let server = server.clone();
        let watcher = graceful.watcher();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let _open = open;
            let protocol = tokio::select! {
                _ = shutdown.cancelled() => return,
                protocol = tokio::time::timeout(server.limits.header_read_timeout, sniff(&tcp)) => protocol,
            };
            match protocol {
                Ok(Ok(Protocol::Http1)) => {
                    let exchange = Arc::new(Exchange::default());
                    let io = HeadLimit::new(tcp, exchange.clone(), &server);
                    let connection = server
                        .http1
                        .serve_connection(TokioIo::new(io), server.service(peer, Some(exchange)));
                    finished(watcher.watch(connection).await, peer);
                }
                Ok(Ok(Protocol::Http2)) => {
                    let connection = server
                        .http2
                        .serve_connection(TokioIo::new(tcp), server.service(peer, None));
                    finished(watcher.watch(connection).await, peer);
                }
                Ok(Err(error)) => {
                    tracing::debug!(%peer, %error, "connection closed before a request")
                }
                Err(_) => tracing::debug!(%peer, "no request head within the header read timeout"),
            }
        });
    }
    drop(listener);
    graceful.shutdown().await;
}

/// An accept error: one connection's (it went away in the queue) is skipped; others (out of
/// file descriptors) are logged and retried after a pause, as `axum::serve` does.
async fn accept_failed(error: io::Error) {
    use io::ErrorKind::{ConnectionAborted, ConnectionRefused, ConnectionReset};
    if matches!(
        error.kind(),
        ConnectionAborted | ConnectionRefused | ConnectionReset
    ) {
        return;
    }
    tracing::error!(%error, "accept failed; retrying in a second");
    tokio::time::sleep(Duration::from_secs(1)).await;
}

fn finished(result: Result<(), hyper::Error>, peer: SocketAddr) {
    if let Err(error) = result {
        tracing::debug!(%peer, %error, "connection ended with an error");
    }
}

/// What every connection shares: the router, the protocol builders and the canned 431.
struct Server {
    router: Router,
    limits: ConnectionLimits,
    metrics: Arc<dyn ConnectionMetrics>,
    http1: http1::Builder,
    http2: http2::Builder<TokioExecutor>,
    head_too_large: Bytes,
}

impl Server {
    fn new(router: Router, limits: ConnectionLimits, metrics: Arc<dyn ConnectionMetrics>) -> Self {
        let mut h1 = http1::Builder::new();
        h1.timer(TokioTimer::new())
            .header_read_timeout(limits.header_read_timeout)
            // The head limit is ours (a 431 problem); hyper's own, a bare 431, only stops a
            // head that slipped past ours (pipelined behind a request body).
            .max_buf_size(limits.max_head_bytes.saturating_add(8192));
        let mut h2 = http2::Builder::new(TokioExecutor::new());
        h2.timer(TokioTimer::new())
            .max_header_list_size(u32::try_from(limits.max_head_bytes).unwrap_or(u32::MAX));
        Self {
            router,
            limits,
            metrics,
            http1: h1,
            http2: h2,
            head_too_large: problem::head_too_large_http1(limits.max_head_bytes),
        }
    }

    /// The per-connection service: the router, with the peer address for the extractors and,
    /// on HTTP/1, the exchange state the head limit reads.
    fn service(&self, peer: SocketAddr, exchange: Option<Arc<Exchange>>) -> ConnectionService {
        ConnectionService {
            router: self.router.clone(),
            peer,
            exchange,
        }
    }
}

#[derive(Clone)]
struct ConnectionService {
    router: Router,
    peer: SocketAddr,
    exchange: Option<Arc<Exchange>>,
}

impl hyper::service::Service<hyper::Request<Incoming>> for ConnectionService {
    type Response = hyper::Response<ExchangeBody>;
    type Error = Infallible;
    type Future = ExchangeFuture;

    fn call(&self, mut request: hyper::Request<Incoming>) -> ExchangeFuture {
        request.extensions_mut().insert(ConnectInfo(self.peer));
        let done = self.exchange.clone().map(Exchange::begin);
        ExchangeFuture {
            inner: self.router.clone().call(request),
            done,
        }
    }
}

/// The router's response future, handing the end-of-exchange marker on to the body.
struct ExchangeFuture {
    inner: axum::routing::future::RouteFuture<Infallible>,
    done: Option<ExchangeDone>,
}

impl Future for ExchangeFuture {
    type Output = Result<hyper::Response<ExchangeBody>, Infallible>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let response = match ready!(Pin::new(&mut self.inner).poll(cx)) {
            Ok(response) => response,
            Err(never) => match never {},
        };
        let done = self.done.take();
        Poll::Ready(Ok(response.map(|inner| ExchangeBody { inner, _done: done })))
    }
}

/// Counts a connection in `rdev_http_connections_active` while it lives.
struct OpenConnection(Arc<dyn ConnectionMetrics>);

impl OpenConnection {
    fn new(metrics: Arc<dyn ConnectionMetrics>) -> Self {
        metrics.connection_opened();
        Self(metrics)
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.connection_closed();
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Protocol {
    Http1,
    Http2,
}

/// Tells HTTP/1 from an h2c preface without consuming a byte. Every HTTP/1 method differs from
/// the preface within its first two bytes, so one peek nearly always decides.
async fn sniff(tcp: &TcpStream) -> io::Result<Protocol> {
    let mut seen = [0u8; H2_PREFACE.len()];
    loop {
        let n = tcp.peek(&mut seen).await?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        if seen[..n] != H2_PREFACE[..n] {
            return Ok(Protocol::Http1);
        }
        if n == H2_PREFACE.len() {
            return Ok(Protocol::Http2);
        }
        // A preface split across segments: the rest is on its way.
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// Where an HTTP/1 connection stands: set when a response has ended (or at the start), so the
/// next bytes read are a request head, which the head limit applies to.
#[derive(Debug)]
struct Exchange {
    head_next: AtomicBool,
}

impl Default for Exchange {
    fn default() -> Self {
        Self {
            head_next: AtomicBool::new(true),
        }
    }
}

impl Exchange {
    fn begin(self: Arc<Self>) -> ExchangeDone {
        ExchangeDone(self)
    }
}

/// Dropped with the response body (when hyper has sent it, or the client went away): the next
/// bytes are the next request head.
struct ExchangeDone(Arc<Exchange>);

impl Drop for ExchangeDone {
    fn drop(&mut self) {
        self.0.head_next.store(true, Ordering::Relaxed);
    }
}

/// The router's response body, holding the end-of-exchange marker.
pub struct ExchangeBody {
    inner: Body,
    _done: Option<ExchangeDone>,
}

impl http_body::Body for ExchangeBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// An HTTP/1 socket that counts the bytes of each request head. Past the limit the client gets
/// a 431 problem with `Connection: close`, the write side is shut, what the client still sends
/// is drained (up to [`REJECT_DRAIN_BYTES`], within the header read timeout) so the close is a
/// FIN and not a reset, and hyper sees the connection fail.
struct HeadLimit {
    tcp: TcpStream,
    exchange: Arc<Exchange>,
    limit: usize,
    /// A request head is being read: from the end of a response to the blank line.
    in_head: bool,
    /// Bytes of the current head read so far.
    head_bytes: usize,
    /// How much of a blank line ended the bytes read so far (see [`HeadLimit::scan`]).
    blank_line: u8,
    head_too_large: Bytes,
    /// A write returned `Pending`: hyper still holds output, so a 431 must not be interleaved.
    write_blocked: bool,
    rejecting: Option<Reject>,
}

#[derive(Debug, Clone, Copy)]
enum Reject {
    Answer { written: usize },
    Shutdown,
    Drain { drained: usize },
}

impl HeadLimit {
    fn new(tcp: TcpStream, exchange: Arc<Exchange>, server: &Server) -> Self {
        Self {
            tcp,
            exchange,
            limit: server.limits.max_head_bytes,
            in_head: false,
            head_bytes: 0,
            blank_line: 0,
            head_too_large: server.head_too_large.clone(),
            write_blocked: false,
            rejecting: None,
        }
    }

    /// Finds the blank line ending the head in `read` (`\r\n\r\n`, or `\n\n` as hyper also
    /// takes), carrying a partial match over from the previous read; returns how many bytes of
    /// `read` belong to the head when it ends here.
    fn scan(&mut self, read: &[u8]) -> Option<usize> {
        for (i, byte) in read.iter().enumerate() {
            // 1: after a line feed; 2: after a line feed and a carriage return.
            self.blank_line = match (self.blank_line, byte) {
                (1 | 2, b'\n') => return Some(i + 1),
                (_, b'\n') => 1,
                (1, b'\r') => 2,
                _ => 0,
            };
        }
        None
    }

    fn poll_reject(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            let Some(state) = self.rejecting else {
                return Poll::Ready(Ok(()));
            };
            self.rejecting = Some(match state {
                Reject::Answer { written } if written < self.head_too_large.len() => {
                    let rest = &self.head_too_large[written..];
                    let n = ready!(Pin::new(&mut self.tcp).poll_write(cx, rest))?;
                    if n == 0 {
                        return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                    }
                    Reject::Answer {
                        written: written + n,
                    }
                }
                Reject::Answer { .. } => Reject::Shutdown,
                Reject::Shutdown => {
                    ready!(Pin::new(&mut self.tcp).poll_shutdown(cx))?;
                    Reject::Drain { drained: 0 }
                }
                Reject::Drain { drained } => {
                    let mut scratch = [0u8; 8192];
                    let mut buf = ReadBuf::new(&mut scratch);
                    ready!(Pin::new(&mut self.tcp).poll_read(cx, &mut buf))?;
                    let n = buf.filled().len();
                    if n == 0 || drained + n >= REJECT_DRAIN_BYTES {
                        return Poll::Ready(Err(io::Error::new(
                            io::ErrorKind::InvalidData,
                            "request head over the limit",
                        )));
                    }
                    Reject::Drain {
                        drained: drained + n,
                    }
                }
            });
        }
    }
}

impl AsyncRead for HeadLimit {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.rejecting.is_some() {
            return this.poll_reject(cx);
        }
        let before = buf.filled().len();
        ready!(Pin::new(&mut this.tcp).poll_read(cx, buf))?;
        if !this.in_head && this.exchange.head_next.swap(false, Ordering::Relaxed) {
            this.in_head = true;
            this.head_bytes = 0;
            this.blank_line = 0;
        }
        if !this.in_head {
            return Poll::Ready(Ok(()));
        }
        let read = &buf.filled()[before..];
        let head = match this.scan(read) {
            Some(end) => {
                // The rest of this read is a body or a pipelined request: hyper's own
                // `max_buf_size` bounds those.
                this.in_head = false;
                end
            }
            None => read.len(),
        };
        this.head_bytes += head;
        if this.head_bytes <= this.limit {
            return Poll::Ready(Ok(()));
        }
        // Hyper never sees the bytes past the limit.
        buf.set_filled(before);
        if this.write_blocked {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "request head over the limit while a response is unsent",
            )));
        }
        tracing::debug!(limit = this.limit, "request head over the limit: 431");
        this.rejecting = Some(Reject::Answer { written: 0 });
        this.poll_reject(cx)
    }
}

impl AsyncWrite for HeadLimit {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let result = Pin::new(&mut this.tcp).poll_write(cx, buf);
        this.write_blocked = result.is_pending();
        result
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let result = Pin::new(&mut this.tcp).poll_write_vectored(cx, bufs);
        this.write_blocked = result.is_pending();
        result
    }

    fn is_write_vectored(&self) -> bool {
        self.tcp.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_shutdown(cx)
    }
}
