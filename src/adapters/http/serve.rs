//! The connection layer: our own accept loop in place of `axum::serve`, so that every connection
//! is served with the limits we choose. HTTP/1.1 and h2c (prior knowledge) on one port,
//! `TCP_NODELAY`, `ConnectInfo<SocketAddr>` for the extractors, a request-head limit answered with
//! a 431 problem, the open connection count as a gauge, and graceful shutdown that lets open
//! responses (event streams included) finish.
//!
//! Two clocks bound a connection that sends nothing. The header read timeout bounds sending a
//! request head: a new connection's first, or on a kept-alive one, the rest of a head once its
//! first byte came. The idle timeout bounds the quiet between requests on a kept-alive
//! connection, and is longer: a proxy's pool (an ingress, a gateway) keeps idle upstream
//! connections for a minute or more, and must not meet a socket we closed. HTTP/2 follows the
//! same two clocks (a first stream within the header timeout, then no stream for the idle
//! timeout), and pings a peer whose streams stay open, to find one that vanished.
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
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio::time::{Instant, Sleep};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::Service;

use crate::ports::ConnectionMetrics;

use super::problem;

/// The HTTP/2 connection preface a prior-knowledge (h2c) client opens with.
const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// Request body bytes read and thrown away after a 431, so the client reads the answer instead
/// of a reset; past this the connection is closed anyway.
const REJECT_DRAIN_BYTES: usize = 1024 * 1024;
/// An HTTP/2 peer with open streams is pinged this often, and dropped when a ping goes
/// unanswered this long (a peer that vanished without a FIN).
const H2_PING_INTERVAL: Duration = Duration::from_secs(30);
const H2_PING_TIMEOUT: Duration = Duration::from_secs(20);

/// Limits every connection is served with.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    /// Largest request head (request line and headers), in bytes; larger ones get a 431.
    pub max_head_bytes: usize,
    /// Time a client has to send a whole request head: from connecting, or on a kept-alive
    /// connection from the head's first byte.
    pub header_read_timeout: Duration,
    /// Time a kept-alive connection may stay quiet between a response and the next request.
    pub idle_timeout: Duration,
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
    let connections = TaskTracker::new();
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
        let shutdown = shutdown.clone();
        connections.spawn(async move {
            let _open = open;
            let protocol = tokio::select! {
                _ = shutdown.cancelled() => return,
                protocol = tokio::time::timeout(server.limits.header_read_timeout, sniff(&tcp)) => protocol,
            };
            let exchanges = Arc::new(Exchanges::default());
            match protocol {
                Ok(Ok(Protocol::Http1)) => {
                    let io = HeadLimit::new(tcp, exchanges.clone(), &server);
                    let connection = server
                        .http1
                        .serve_connection(TokioIo::new(io), server.service(peer, exchanges.clone()));
                    // The head limit ends an idle HTTP/1 connection itself.
                    let idle = std::future::pending();
                    finished(drive(connection, &shutdown, &exchanges, idle).await, peer);
                }
                Ok(Ok(Protocol::Http2)) => {
                    let connection = server
                        .http2
                        .serve_connection(TokioIo::new(tcp), server.service(peer, exchanges.clone()));
                    let idle = exchanges.clone().quiet_for(server.limits);
                    finished(drive(connection, &shutdown, &exchanges, idle).await, peer);
                }
                Ok(Err(error)) => {
                    tracing::debug!(%peer, %error, "connection closed before a request")
                }
                Err(_) => tracing::debug!(%peer, "no request head within the header read timeout"),
            }
        });
    }
    drop(listener);
    connections.close();
    connections.wait().await;
}

/// A hyper connection that can be asked to finish what it has and close.
trait Graceful: Future<Output = Result<(), hyper::Error>> {
    fn graceful_shutdown(self: Pin<&mut Self>);
}

impl Graceful for http1::Connection<TokioIo<HeadLimit>, ConnectionService> {
    fn graceful_shutdown(self: Pin<&mut Self>) {
        http1::Connection::graceful_shutdown(self);
    }
}

impl Graceful for http2::Connection<TokioIo<TcpStream>, ConnectionService, TokioExecutor> {
    fn graceful_shutdown(self: Pin<&mut Self>) {
        http2::Connection::graceful_shutdown(self);
    }
}

/// Serves a connection to its end. When the server shuts down, or `idle` says the connection
/// has nothing to do, it is asked to finish its open responses and close; one that never asked
/// anything is dropped (an HTTP/2 handshake the peer never finished would wait for it).
async fn drive(
    connection: impl Graceful,
    shutdown: &CancellationToken,
    exchanges: &Exchanges,
    idle: impl Future<Output = ()>,
) -> Result<(), hyper::Error> {
    let mut connection = std::pin::pin!(connection);
    tokio::select! {
        result = connection.as_mut() => return result,
        _ = shutdown.cancelled() => {}
        _ = idle => {}
    }
    if !exchanges.began.load(Ordering::Acquire) {
        return Ok(());
    }
    connection.as_mut().graceful_shutdown();
    connection.await
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
            // Ours, in the head limit: hyper's runs from the end of a response, so it would
            // close an idle kept-alive connection at the header timeout.
            .header_read_timeout(None)
            // The head limit is ours (a 431 problem); hyper's own, a bare 431, only stops a
            // head that slipped past ours (pipelined behind a request body).
            .max_buf_size(limits.max_head_bytes.saturating_add(8192));
        let mut h2 = http2::Builder::new(TokioExecutor::new());
        h2.timer(TokioTimer::new())
            .keep_alive_interval(H2_PING_INTERVAL)
            .keep_alive_timeout(H2_PING_TIMEOUT)
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

    /// The per-connection service: the router, with the peer address for the extractors and
    /// the exchange count the connection's clocks read.
    fn service(&self, peer: SocketAddr, exchanges: Arc<Exchanges>) -> ConnectionService {
        ConnectionService {
            router: self.router.clone(),
            peer,
            exchanges,
        }
    }
}

#[derive(Clone)]
struct ConnectionService {
    router: Router,
    peer: SocketAddr,
    exchanges: Arc<Exchanges>,
}

impl hyper::service::Service<hyper::Request<Incoming>> for ConnectionService {
    type Response = hyper::Response<ExchangeBody>;
    type Error = Infallible;
    type Future = ExchangeFuture;

    fn call(&self, mut request: hyper::Request<Incoming>) -> ExchangeFuture {
        request.extensions_mut().insert(ConnectInfo(self.peer));
        ExchangeFuture {
            inner: self.router.clone().call(request),
            done: Some(self.exchanges.clone().begin()),
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
/// the preface within its first two bytes, so the first bytes nearly always decide; a preface
/// split across segments waits for the socket to have more (the caller bounds the wait).
async fn sniff(tcp: &TcpStream) -> io::Result<Protocol> {
    tcp.async_io(Interest::READABLE, || {
        let mut seen = [0u8; H2_PREFACE.len()];
        let n = peek(tcp, &mut seen)?;
        if n == 0 {
            Err(io::ErrorKind::UnexpectedEof.into())
        } else if seen[..n] != H2_PREFACE[..n] {
            Ok(Protocol::Http1)
        } else if n == H2_PREFACE.len() {
            Ok(Protocol::Http2)
        } else {
            // Part of a preface: `WouldBlock` clears the readiness seen, so the next try waits
            // for the next segment (tokio keeps a readiness that arrived meanwhile).
            Err(io::ErrorKind::WouldBlock.into())
        }
    })
    .await
}

/// `recv(2)` with `MSG_PEEK`: what is queued on the socket, left there. `WouldBlock` when
/// nothing is.
fn peek(tcp: &TcpStream, into: &mut [u8]) -> io::Result<usize> {
    use std::os::fd::AsRawFd;
    // SAFETY: recv writes at most `into.len()` bytes into `into`, which outlives the call; the
    // descriptor is the stream's, open while `tcp` is borrowed.
    let n = unsafe {
        libc::recv(
            tcp.as_raw_fd(),
            into.as_mut_ptr().cast(),
            into.len(),
            libc::MSG_PEEK,
        )
    };
    usize::try_from(n).map_err(|_| io::Error::last_os_error())
}

/// Where a connection's exchanges stand. HTTP/1: a response has ended (or none began), so the
/// next bytes read are a request head, which the head limit applies to. HTTP/2: how many
/// streams are open, for the idle clock.
#[derive(Debug)]
struct Exchanges {
    head_next: AtomicBool,
    /// Some exchange began on this connection.
    began: AtomicBool,
    open: std::sync::atomic::AtomicUsize,
    /// Some exchange began or ended.
    changed: Notify,
    /// The HTTP/1 reader, woken when a response ends: hyper may have read (and found nothing)
    /// before that, and must read again for the head limit to start the idle clock.
    reader: futures::task::AtomicWaker,
}

impl Default for Exchanges {
    fn default() -> Self {
        Self {
            head_next: AtomicBool::new(true),
            began: AtomicBool::new(false),
            open: std::sync::atomic::AtomicUsize::new(0),
            changed: Notify::new(),
            reader: futures::task::AtomicWaker::new(),
        }
    }
}

impl Exchanges {
    fn begin(self: Arc<Self>) -> ExchangeDone {
        self.began.store(true, Ordering::Release);
        self.open.fetch_add(1, Ordering::AcqRel);
        self.changed.notify_waiters();
        ExchangeDone(self)
    }

    /// Resolves once no exchange has been open for a while: the header read timeout before
    /// the first one (a client that connects must ask something), the idle timeout after.
    async fn quiet_for(self: Arc<Self>, limits: ConnectionLimits) {
        let mut quiet_limit = limits.header_read_timeout;
        loop {
            let changed = self.changed.notified();
            let mut changed = std::pin::pin!(changed);
            changed.as_mut().enable();
            if self.open.load(Ordering::Acquire) > 0 {
                changed.await;
                quiet_limit = limits.idle_timeout;
                continue;
            }
            tokio::select! {
                _ = changed => quiet_limit = limits.idle_timeout,
                _ = tokio::time::sleep(quiet_limit) => return,
            }
        }
    }
}

/// Dropped with the response body (when hyper has sent it, or the client went away): the
/// exchange is over, and on HTTP/1 the next bytes are the next request head.
struct ExchangeDone(Arc<Exchanges>);

impl Drop for ExchangeDone {
    fn drop(&mut self) {
        self.0.head_next.store(true, Ordering::Relaxed);
        self.0.open.fetch_sub(1, Ordering::AcqRel);
        self.0.changed.notify_waiters();
        self.0.reader.wake();
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

/// An HTTP/1 socket that counts the bytes of each request head and keeps the connection's two
/// clocks. Past the head limit the client gets a 431 problem with `Connection: close`, the
/// write side is shut, what the client still sends is drained (up to [`REJECT_DRAIN_BYTES`],
/// within the header read timeout) so the close is a FIN and not a reset, and hyper sees the
/// connection fail. A kept-alive connection quiet for the idle timeout reads as closed by the
/// client (hyper ends it cleanly); a head not whole within the header read timeout is an error.
struct HeadLimit {
    tcp: TcpStream,
    exchanges: Arc<Exchanges>,
    limit: usize,
    header_read_timeout: Duration,
    idle_timeout: Duration,
    /// A head is awaited and none of it came yet, after a first exchange: the idle clock runs.
    idle: bool,
    /// The clock of the awaited head; none while a request or response is under way, so an
    /// open event stream holds no timer.
    deadline: Option<Pin<Box<Sleep>>>,
    /// At least one head was read: the wait for the next one is idle time first.
    kept_alive: bool,
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
    fn new(tcp: TcpStream, exchanges: Arc<Exchanges>, server: &Server) -> Self {
        Self {
            tcp,
            exchanges,
            limit: server.limits.max_head_bytes,
            header_read_timeout: server.limits.header_read_timeout,
            idle_timeout: server.limits.idle_timeout,
            idle: false,
            deadline: None,
            kept_alive: false,
            in_head: false,
            head_bytes: 0,
            blank_line: 0,
            head_too_large: server.head_too_large.clone(),
            write_blocked: false,
            rejecting: None,
        }
    }

    /// Starts (or restarts) the clock of the awaited head.
    fn arm(&mut self, after: Duration) {
        let at = Instant::now() + after;
        match &mut self.deadline {
            Some(deadline) => deadline.as_mut().reset(at),
            None => self.deadline = Some(Box::pin(tokio::time::sleep_until(at))),
        }
    }

    /// Whether the awaited head's clock ran out (registering for its wake-up if not).
    fn expired(&mut self, cx: &mut Context<'_>) -> bool {
        let expired = self
            .deadline
            .as_mut()
            .is_some_and(|deadline| deadline.as_mut().poll(cx).is_ready());
        if expired {
            self.deadline = None;
        }
        expired
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
            let rejected = this.poll_reject(cx);
            if rejected.is_pending() && this.expired(cx) {
                return Poll::Ready(Err(io::ErrorKind::TimedOut.into()));
            }
            return rejected;
        }
        if !this.in_head && this.exchanges.head_next.swap(false, Ordering::Relaxed) {
            this.in_head = true;
            this.head_bytes = 0;
            this.blank_line = 0;
            this.idle = this.kept_alive;
            this.arm(if this.idle {
                this.idle_timeout
            } else {
                this.header_read_timeout
            });
        }
        if !this.in_head {
            this.exchanges.reader.register(cx.waker());
        }
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.tcp).poll_read(cx, buf);
        if polled.is_pending() {
            if !this.expired(cx) {
                return Poll::Pending;
            }
            if this.idle {
                tracing::debug!("kept-alive connection idle past the idle timeout");
                return Poll::Ready(Ok(()));
            }
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "no whole request head within the header read timeout",
            )));
        }
        ready!(polled)?;
        if !this.in_head {
            return Poll::Ready(Ok(()));
        }
        let read = &buf.filled()[before..];
        if this.idle && !read.is_empty() {
            // The next request began: its head has the header read timeout from here.
            this.idle = false;
            this.arm(this.header_read_timeout);
        }
        let head = match this.scan(read) {
            Some(end) => {
                // The rest of this read is a body or a pipelined request: hyper's own
                // `max_buf_size` bounds those.
                this.in_head = false;
                this.kept_alive = true;
                this.deadline = None;
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
