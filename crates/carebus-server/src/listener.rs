//! The HTTP listener's defences against hostile clients, below axum and hyper.
//!
//! - **A bound on open connections.** A permit is taken *before* a connection is
//!   accepted, so at the bound the listener stops accepting: further connections wait
//!   in the kernel's accept queue (a well-behaved client sees latency, not a reset) and
//!   cost the process neither a file descriptor nor memory (except the one the listener
//!   has taken off the queue and holds until a slot frees). The permit travels with the
//!   connection and is given back when hyper drops it. The accept queue is 1024 long
//!   (std's default is 128); past it the kernel drops SYNs and clients retry.
//! - **A deadline for every request head** (slowloris): from the moment the server is
//!   waiting for a request — the connection was accepted, or it wrote its last response —
//!   the head (request line and headers, up to the empty line) must have arrived within
//!   the header timeout, however slowly the bytes trickle in; otherwise the connection is
//!   closed. An idle keep-alive connection is therefore closed after the same time, as
//!   hyper's own `header_read_timeout` would (axum's `serve` installs no timer, so that
//!   one never fires). Head size is left to hyper (about 400 KiB, then 431).
//!   A `100 Continue` written after a head does not start a new wait: the body follows.
//! - **A stalled write** (a client that stops reading its answers) is given up after the
//!   same timeout without progress.
//! - **Idle connections make room when the bound is reached.** While connections wait
//!   in the accept queue for a slot, a connection that has been waiting for its next
//!   request head for [`IDLE_GRACE_WHEN_CROWDED`] with no byte of it received is closed
//!   (cleanly: hyper sees the end of the stream between requests), instead of holding its
//!   slot for the whole header timeout. Without this, a client pool that had opened more
//!   connections than the bound kept its requests on the unaccepted ones waiting for 30 s
//!   while its accepted ones sat idle (seen in the W4 benchmark: 1,392 connections
//!   against a bound of 1,024, requests timing out).
//!
//! A long poll is not affected: once the head has arrived, nothing is timed until the
//! server writes the answer. A connection switched to another protocol (`101 Switching
//! Protocols`: the publish WebSocket) has no further heads; from then on only stalled
//! writes are timed here, and the WebSocket handler closes idle sockets itself.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::futures::OwnedNotified;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio::time::{Instant, Sleep};

/// More bytes than hyper ever buffers for one request head: past this many bytes since
/// the server last wrote, what arrives is a body (after `100 Continue`), not a head.
const MAX_HEAD_SCAN: usize = 1 << 20;

/// How long a connection may wait idle for its next request (no byte of it received)
/// while other connections wait in the accept queue for a slot.
pub const IDLE_GRACE_WHEN_CROWDED: Duration = Duration::from_secs(1);

/// What the listener and its connections share: whether connections are waiting for a
/// slot, and a signal to the idle connections when that starts.
#[derive(Debug, Default)]
struct Crowding {
    waiting: AtomicBool,
    started: Arc<Notify>,
}

/// Limits of the HTTP listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HttpLimits {
    /// Connections open at once; at the bound new ones wait in the kernel's queue.
    pub max_connections: usize,
    /// Time allowed for a request head (and for an idle keep-alive connection, and for
    /// a stalled write).
    pub header_timeout: Duration,
}

/// Default bound on open HTTP connections.
pub const DEFAULT_HTTP_MAX_CONNECTIONS: usize = 1024;
/// Default time allowed for a request head: 30 s, hyper's own default.
pub const DEFAULT_HTTP_HEADER_TIMEOUT: Duration = Duration::from_secs(30);

impl Default for HttpLimits {
    fn default() -> Self {
        HttpLimits {
            max_connections: DEFAULT_HTTP_MAX_CONNECTIONS,
            header_timeout: DEFAULT_HTTP_HEADER_TIMEOUT,
        }
    }
}

/// Length of the kernel's accept queue of the HTTP listener: where connections wait
/// while the bound is reached (std's default is 128; the kernel caps it at
/// `net.core.somaxconn`).
const ACCEPT_BACKLOG: u32 = 1024;

/// Binds a TCP listener (`SO_REUSEADDR`, as std does) with [`ACCEPT_BACKLOG`].
pub(crate) fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(ACCEPT_BACKLOG)
}

/// A TCP listener that applies [`HttpLimits`] (an [`axum::serve::Listener`]).
pub(crate) struct GuardedListener {
    inner: TcpListener,
    permits: Arc<Semaphore>,
    header_timeout: Duration,
    max_connections: usize,
    /// Set while a connection waits for a permit (and "limit reached" was logged for it).
    crowding: Arc<Crowding>,
    /// The connection taken off the queue at the bound, waiting for a permit; kept here
    /// so that an `accept` cancelled while it waits does not drop it.
    held: Option<(TcpStream, SocketAddr)>,
}

impl GuardedListener {
    pub(crate) fn new(inner: TcpListener, limits: HttpLimits) -> Self {
        let max_connections = limits.max_connections.max(1);
        GuardedListener {
            inner,
            permits: Arc::new(Semaphore::new(max_connections)),
            header_timeout: limits.header_timeout,
            max_connections,
            crowding: Arc::default(),
            held: None,
        }
    }

    /// At the bound: the connection taken off the queue waits here for a slot, and the
    /// idle connections are told to make room.
    async fn wait_for_a_slot(&self) -> Option<OwnedSemaphorePermit> {
        if !self.crowding.waiting.swap(true, Ordering::SeqCst) {
            tracing::warn!(
                max_connections = self.max_connections,
                "http connection limit reached: new connections wait until one closes \
                 (idle keep-alive connections are closed to make room)"
            );
        }
        self.crowding.started.notify_waiters();
        // The semaphore is never closed.
        let permit = Arc::clone(&self.permits).acquire_owned().await.ok();
        self.crowding.waiting.store(false, Ordering::SeqCst);
        permit
    }
}

impl axum::serve::Listener for GuardedListener {
    type Io = GuardedStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            // A free slot: accept. At the bound: take the next connection off the
            // kernel's queue first (one beyond the bound at most), so that idle
            // connections are asked to make room only for one that really waits.
            let free = Arc::clone(&self.permits).try_acquire_owned().ok();
            let accepted = match self.held.take() {
                Some(held) => Ok(held),
                None => self.inner.accept().await,
            };
            let permit = match (free, accepted) {
                (Some(permit), Ok(accepted)) => {
                    // After a cancelled wait the flag may still be up.
                    self.crowding.waiting.store(false, Ordering::SeqCst);
                    Ok((permit, accepted))
                }
                (None, Ok(accepted)) => {
                    self.held = Some(accepted);
                    match self.wait_for_a_slot().await {
                        Some(permit) => self.held.take().map(|a| (permit, a)).ok_or(None),
                        None => Err(None),
                    }
                }
                (_, Err(e)) => Err(Some(e)),
            };
            match permit {
                Ok((permit, (stream, peer))) => {
                    let _ = stream.set_nodelay(true);
                    return (
                        GuardedStream::new(
                            stream,
                            permit,
                            self.header_timeout,
                            Arc::clone(&self.crowding),
                        ),
                        peer,
                    );
                }
                Err(None) => {
                    // Unreachable (the semaphore is never closed); do not spin.
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(Some(e)) => {
                    if !matches!(
                        e.kind(),
                        io::ErrorKind::ConnectionRefused
                            | io::ErrorKind::ConnectionAborted
                            | io::ErrorKind::ConnectionReset
                    ) {
                        // E.g. out of file descriptors: wait for some to be closed.
                        tracing::error!(error = %e, "http accept failed");
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                }
            }
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.inner.local_addr()
    }
}

/// Finds the end of an HTTP/1 request head (an empty line) in bytes arriving in pieces.
#[derive(Debug, Default)]
struct HeadScan {
    /// A byte other than CR/LF was seen (empty lines before a request are skipped).
    started: bool,
    /// The last line ended and nothing but CR followed it yet.
    at_line_start: bool,
}

impl HeadScan {
    /// Feeds bytes; true once the empty line ending the head has been seen.
    fn feed(&mut self, bytes: &[u8]) -> bool {
        for &b in bytes {
            match b {
                b'\n' if self.started && self.at_line_start => return true,
                b'\n' => self.at_line_start = self.started,
                b'\r' => {}
                _ => {
                    self.started = true;
                    self.at_line_start = false;
                }
            }
        }
        false
    }
}

/// An accepted HTTP connection with its permit and deadlines.
pub(crate) struct GuardedStream {
    inner: TcpStream,
    _permit: OwnedSemaphorePermit,
    timeout: Duration,
    /// Waiting for a request head since `head_since`.
    awaiting_head: bool,
    /// Switched to another protocol: no more request heads.
    upgraded: bool,
    head_since: Instant,
    /// The timer of `head_since` + timeout, once polled.
    head_deadline: Option<Pin<Box<Sleep>>>,
    scan: HeadScan,
    head_bytes: usize,
    /// Set while a write is blocked, cleared by progress.
    write_deadline: Option<Pin<Box<Sleep>>>,
    crowding: Arc<Crowding>,
    /// Registered while idle: wakes this connection when the listener becomes crowded.
    crowding_signal: Option<Pin<Box<OwnedNotified>>>,
    /// The timer of `head_since` + [`IDLE_GRACE_WHEN_CROWDED`], while crowded.
    grace_deadline: Option<Pin<Box<Sleep>>>,
}

impl GuardedStream {
    fn new(
        inner: TcpStream,
        permit: OwnedSemaphorePermit,
        timeout: Duration,
        crowding: Arc<Crowding>,
    ) -> Self {
        GuardedStream {
            inner,
            _permit: permit,
            timeout,
            awaiting_head: true,
            upgraded: false,
            head_since: Instant::now(),
            head_deadline: None,
            scan: HeadScan::default(),
            head_bytes: 0,
            write_deadline: None,
            crowding,
            crowding_signal: None,
            grace_deadline: None,
        }
    }

    /// The server answered: the next request head is awaited from now. The deadline is
    /// registered with this task right away: hyper may not read again before the
    /// client sends something, and the timer must wake it.
    fn wrote(&mut self, cx: &mut Context<'_>, first: &[u8]) {
        self.write_deadline = None;
        if self.upgraded || (!self.awaiting_head && first.starts_with(b"HTTP/1.1 100 ")) {
            // `100 Continue`: the body follows, not a new head.
            return;
        }
        if !self.awaiting_head && first.starts_with(b"HTTP/1.1 101 ") {
            // The server switched protocols: what follows are WebSocket frames.
            self.upgraded = true;
            self.awaiting_head = false;
            self.head_deadline = None;
            return;
        }
        self.awaiting_head = true;
        self.scan = HeadScan::default();
        self.head_bytes = 0;
        self.head_since = Instant::now();
        self.head_deadline = None;
        self.grace_deadline = None;
        let _ = self.head_late(cx);
        // Likewise the crowding signal: when the answer came after an await (a publish
        // waiting for its fsync), hyper's last read was polled before this write, and it
        // may not read again until the client sends; the signal must wake it to give way.
        let _ = self.gives_way(cx);
    }

    /// Whether this connection, idle between requests (`awaiting_head`, no byte of the
    /// next head yet), should close to give its slot to a waiting one. Registers this
    /// task to be woken when the listener becomes crowded, and, while it is, when the
    /// grace ends.
    fn gives_way(&mut self, cx: &mut Context<'_>) -> bool {
        // Register for the signal before reading the flag: crowding that starts in
        // between still wakes this task. A signal already fired is replaced (twice at
        // most: `notify_waiters` only wakes futures registered before it).
        for _ in 0..2 {
            let started = Arc::clone(&self.crowding.started);
            let signal = self
                .crowding_signal
                .get_or_insert_with(|| Box::pin(started.notified_owned()));
            if signal.as_mut().poll(cx).is_pending() {
                break;
            }
            self.crowding_signal = None;
        }
        if !self.crowding.waiting.load(Ordering::SeqCst) {
            self.grace_deadline = None;
            return false;
        }
        let at = self.head_since + IDLE_GRACE_WHEN_CROWDED;
        self.grace_deadline
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(at)))
            .as_mut()
            .poll(cx)
            .is_ready()
    }

    fn head_late(&mut self, cx: &mut Context<'_>) -> bool {
        let deadline = self.head_since + self.timeout;
        self.head_deadline
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)))
            .as_mut()
            .poll(cx)
            .is_ready()
    }

    fn write_stalled(&mut self, cx: &mut Context<'_>) -> bool {
        let timeout = self.timeout;
        let deadline = self
            .write_deadline
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
        deadline.as_mut().poll(cx).is_ready()
    }
}

fn timed_out(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::TimedOut, what.to_owned())
}

impl AsyncRead for GuardedStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if this.awaiting_head {
                    let new = &buf.filled()[before..];
                    this.head_bytes = this.head_bytes.saturating_add(new.len());
                    if this.scan.feed(new) || this.head_bytes > MAX_HEAD_SCAN {
                        this.awaiting_head = false;
                    }
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => {
                if this.awaiting_head && this.head_late(cx) {
                    tracing::debug!(
                        received = this.head_bytes,
                        "http connection closed: no complete request head within the header timeout"
                    );
                    return Poll::Ready(Err(timed_out("request head not received in time")));
                }
                if this.awaiting_head && this.head_bytes == 0 && this.gives_way(cx) {
                    tracing::debug!(
                        "http connection closed: idle while connections wait for a slot"
                    );
                    // The end of the stream, between requests: hyper closes quietly.
                    return Poll::Ready(Ok(()));
                }
                Poll::Pending
            }
        }
    }
}

impl AsyncWrite for GuardedStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_write(cx, buf) {
            Poll::Ready(Ok(n)) => {
                if n > 0 {
                    this.wrote(cx, buf);
                }
                Poll::Ready(Ok(n))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => {
                if this.write_stalled(cx) {
                    tracing::debug!("http connection closed: the client stopped reading");
                    return Poll::Ready(Err(timed_out("client stopped reading")));
                }
                Poll::Pending
            }
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_write_vectored(cx, bufs) {
            Poll::Ready(Ok(n)) => {
                if n > 0 {
                    let first = bufs
                        .iter()
                        .find(|b| !b.is_empty())
                        .map_or(&[][..], |b| &b[..]);
                    this.wrote(cx, first);
                }
                Poll::Ready(Ok(n))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => {
                if this.write_stalled(cx) {
                    tracing::debug!("http connection closed: the client stopped reading");
                    return Poll::Ready(Err(timed_out("client stopped reading")));
                }
                Poll::Pending
            }
        }
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[test]
    fn the_head_ends_at_the_first_empty_line_in_any_split() {
        let head = b"\r\nGET /x HTTP/1.1\r\nHost: a\r\n\r\nBODY";
        for split in 0..head.len() {
            let mut s = HeadScan::default();
            let (a, b) = head.split_at(split);
            let done = s.feed(a) || s.feed(b);
            assert!(done, "split at {split}");
        }
        let mut s = HeadScan::default();
        assert!(!s.feed(b"GET /x HTTP/1.1\r\nHost: a\r\n"));
        assert!(s.feed(b"\n"), "bare LF line endings count too");
        let mut s = HeadScan::default();
        assert!(!s.feed(b"\r\n\r\n\n\n"), "leading empty lines are skipped");
    }

    async fn pair(limits: HttpLimits) -> (GuardedListener, SocketAddr) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        (GuardedListener::new(l, limits), addr)
    }

    /// A client socket and the server side of it, accepted by a listener with a 300 ms
    /// head timeout.
    async fn one_connection() -> (TcpStream, GuardedStream) {
        use axum::serve::Listener as _;
        let limits = HttpLimits {
            max_connections: 4,
            header_timeout: Duration::from_millis(300),
        };
        let (mut listener, addr) = pair(limits).await;
        let c = TcpStream::connect(addr).await.unwrap();
        let (io, _) = listener.accept().await;
        (c, io)
    }

    #[tokio::test]
    async fn a_trickled_head_is_cut_off_and_a_long_wait_after_a_head_is_not() {
        use axum::serve::Listener as _;
        let limits = HttpLimits {
            max_connections: 4,
            header_timeout: Duration::from_millis(300),
        };
        let (mut listener, addr) = pair(limits).await;
        let client = tokio::spawn(async move {
            let mut c = TcpStream::connect(addr).await.unwrap();
            for b in b"GET / HTTP/1.1\r\nHost: x\r\n" {
                if c.write_all(&[*b]).await.is_err() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            c
        });
        let (mut io, _) = listener.accept().await;
        let t0 = Instant::now();
        let mut buf = [0u8; 64];
        let err = loop {
            match io.read(&mut buf).await {
                Ok(0) => panic!("eof before the deadline"),
                Ok(_) => {}
                Err(e) => break e,
            }
        };
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert!(t0.elapsed() < Duration::from_secs(2));
        drop(client);

        // A complete head, then nothing for longer than the timeout: not cut off
        // (a long poll), and after the answer the deadline runs again.
        let mut c = TcpStream::connect(addr).await.unwrap();
        let (mut io, _) = listener.accept().await;
        c.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let n = io.read(&mut buf).await.unwrap();
        assert!(n > 0);
        let waited = tokio::time::timeout(Duration::from_millis(700), io.read(&mut buf)).await;
        assert!(waited.is_err(), "no deadline while the request is served");
        io.write_all(b"HTTP/1.1 204 No Content\r\n\r\n")
            .await
            .unwrap();
        let err = io.read(&mut buf).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
    }

    #[tokio::test]
    async fn after_switching_protocols_frames_are_not_taken_for_late_heads() {
        let (mut c, mut io) = one_connection().await;
        c.write_all(b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n\r\n")
            .await
            .unwrap();
        let mut buf = [0u8; 256];
        assert!(io.read(&mut buf).await.unwrap() > 0);
        io.write_all(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n")
            .await
            .unwrap();
        // Frames trickle in for longer than the head timeout, and the server answers
        // between them: the connection stays open.
        let sender = tokio::spawn(async move {
            for _ in 0..8 {
                c.write_all(b"\x81\x02hi").await.unwrap();
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            c
        });
        let mut got = 0;
        while got < 32 {
            got += io.read(&mut buf).await.unwrap();
            io.write_all(b"\x81\x02ok").await.unwrap();
        }
        let _c = sender.await.unwrap();
        // Quiet for longer than the head timeout: still not cut off by the listener.
        let waited = tokio::time::timeout(Duration::from_millis(700), io.read(&mut buf)).await;
        assert!(
            waited.is_err(),
            "no head deadline on an upgraded connection"
        );
    }

    #[tokio::test]
    async fn a_body_after_100_continue_is_not_taken_for_a_late_head() {
        let (mut c, mut io) = one_connection().await;
        c.write_all(
            b"POST / HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 100\r\n\r\n",
        )
        .await
        .unwrap();
        let mut buf = [0u8; 256];
        assert!(io.read(&mut buf).await.unwrap() > 0);
        io.write_all(b"HTTP/1.1 100 Continue\r\n\r\n")
            .await
            .unwrap();
        // The body comes slowly, without an empty line: no deadline.
        let sender = tokio::spawn(async move {
            for _ in 0..10 {
                c.write_all(b"0123456789").await.unwrap();
                tokio::time::sleep(Duration::from_millis(80)).await;
            }
            c
        });
        let mut got = 0;
        while got < 100 {
            got += io.read(&mut buf).await.unwrap();
        }
        let _c = sender.await.unwrap();
        // The answer starts the wait for the next head.
        io.write_all(b"HTTP/1.1 204 No Content\r\n\r\n")
            .await
            .unwrap();
        let err = io.read(&mut buf).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
    }

    #[tokio::test]
    async fn at_the_bound_connections_wait_until_one_closes() {
        use axum::serve::Listener as _;
        let limits = HttpLimits {
            max_connections: 1,
            header_timeout: Duration::from_secs(30),
        };
        let (mut listener, addr) = pair(limits).await;
        let _a = TcpStream::connect(addr).await.unwrap();
        let _b = TcpStream::connect(addr).await.unwrap();
        let (first, _) = listener.accept().await;
        let second = tokio::time::timeout(Duration::from_millis(300), listener.accept()).await;
        assert!(
            second.is_err(),
            "a second connection was accepted over the bound"
        );
        drop(first);
        let second = tokio::time::timeout(Duration::from_secs(5), listener.accept()).await;
        assert!(second.is_ok(), "the waiting connection was not accepted");
    }

    /// An axum server answering `GET /` with "ok" behind a listener with `max_connections`
    /// and a 30 s head timeout.
    async fn serve_ok(
        max_connections: usize,
    ) -> (tokio::task::JoinHandle<io::Result<()>>, SocketAddr) {
        serve_ok_after(max_connections, Duration::ZERO).await
    }

    /// Like [`serve_ok`], the answer given `delay` after the request (as a publish
    /// answers after its fsync).
    async fn serve_ok_after(
        max_connections: usize,
        delay: Duration,
    ) -> (tokio::task::JoinHandle<io::Result<()>>, SocketAddr) {
        let limits = HttpLimits {
            max_connections,
            header_timeout: Duration::from_secs(30),
        };
        let (listener, addr) = pair(limits).await;
        let app = axum::Router::new().route(
            "/",
            axum::routing::get(move || async move {
                if !delay.is_zero() {
                    tokio::time::sleep(delay).await;
                }
                "ok"
            }),
        );
        (
            tokio::spawn(async move { axum::serve(listener, app).await }),
            addr,
        )
    }

    /// Reads an answer up to its "ok" body.
    async fn read_ok(c: &mut TcpStream) -> io::Result<String> {
        let mut answer = Vec::new();
        let mut buf = [0u8; 512];
        while !answer.ends_with(b"ok") {
            let n = c.read(&mut buf).await?;
            if n == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            answer.extend_from_slice(&buf[..n]);
        }
        Ok(String::from_utf8_lossy(&answer).into_owned())
    }

    /// Sends `GET /` on a keep-alive connection and reads the answer.
    async fn get(c: &mut TcpStream) -> io::Result<String> {
        c.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await?;
        read_ok(c).await
    }

    /// Waiting requests were served within a few graces of `t0` (not the header timeout).
    fn assert_served_within_grace(t0: Instant) {
        assert!(
            t0.elapsed() < IDLE_GRACE_WHEN_CROWDED * 3,
            "served after {:?}",
            t0.elapsed()
        );
    }

    /// Whether the server closes `c` (end of stream) within `within`.
    async fn closed_within(c: &mut TcpStream, within: Duration) -> bool {
        let mut buf = [0u8; 64];
        matches!(
            tokio::time::timeout(within, c.read(&mut buf)).await,
            Ok(Ok(0) | Err(_))
        )
    }

    #[tokio::test]
    async fn at_the_bound_idle_keep_alive_connections_make_room_for_waiting_ones() {
        let (server, addr) = serve_ok(2).await;

        let mut a = TcpStream::connect(addr).await.unwrap();
        let mut b = TcpStream::connect(addr).await.unwrap();
        assert!(get(&mut a).await.unwrap().starts_with("HTTP/1.1 200"));
        assert!(get(&mut b).await.unwrap().starts_with("HTTP/1.1 200"));
        // The bound is reached but nobody waits: idle connections stay open past the
        // grace (and serve again).
        let wait = IDLE_GRACE_WHEN_CROWDED + Duration::from_millis(500);
        let (a_closed, b_closed) =
            tokio::join!(closed_within(&mut a, wait), closed_within(&mut b, wait));
        assert!(
            !a_closed && !b_closed,
            "idle connections closed with nobody waiting"
        );
        assert!(get(&mut b).await.unwrap().starts_with("HTTP/1.1 200"));

        // A third connection waits for a slot: `a` has been idle past the grace and
        // gives way at once; `b` when its grace ends. The waiting request is answered
        // long before the 30 s header timeout.
        let t0 = Instant::now();
        let mut c = TcpStream::connect(addr).await.unwrap();
        let answer = tokio::time::timeout(Duration::from_secs(10), get(&mut c))
            .await
            .expect("the waiting connection was not served within 10 s")
            .unwrap();
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert_served_within_grace(t0);
        assert!(
            closed_within(&mut a, Duration::from_secs(5)).await,
            "the idle connection stayed"
        );
        // The connection that got the slot keeps it while it is in use.
        assert!(get(&mut c).await.unwrap().starts_with("HTTP/1.1 200"));
        server.abort();
    }

    /// The case the benchmark hit: answers that come after an await (hyper polled its
    /// last read before the answer was written), and connections idle for less than the
    /// grace when another starts to wait. Each must give way when its grace ends.
    #[tokio::test]
    async fn at_the_bound_connections_answered_after_an_await_give_way_when_their_grace_ends() {
        let (server, addr) = serve_ok_after(3, Duration::from_millis(20)).await;
        let mut idle = Vec::new();
        for _ in 0..3 {
            let mut c = TcpStream::connect(addr).await.unwrap();
            assert!(get(&mut c).await.unwrap().starts_with("HTTP/1.1 200"));
            idle.push(c);
        }
        // Two connections wait, each with a request already sent.
        let t0 = Instant::now();
        let mut waiting = Vec::new();
        for _ in 0..2 {
            let mut c = TcpStream::connect(addr).await.unwrap();
            c.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                .await
                .unwrap();
            waiting.push(c);
        }
        for c in &mut waiting {
            let answer = tokio::time::timeout(Duration::from_secs(10), read_ok(c))
                .await
                .expect("a waiting connection was not served within 10 s")
                .unwrap();
            assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        }
        assert_served_within_grace(t0);
        let mut closed = 0;
        for c in &mut idle {
            if closed_within(c, Duration::from_millis(100)).await {
                closed += 1;
            }
        }
        assert!(closed >= 2, "only {closed} idle connections gave way");
        server.abort();
    }

    #[tokio::test]
    async fn at_the_bound_a_connection_in_the_middle_of_a_head_is_not_closed_early() {
        let (server, addr) = serve_ok(1).await;
        let mut a = TcpStream::connect(addr).await.unwrap();
        a.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
        let _waiting = TcpStream::connect(addr).await.unwrap();
        // A head has begun on `a`: it is a request in progress, not an idle connection.
        assert!(!closed_within(&mut a, IDLE_GRACE_WHEN_CROWDED * 2).await);
        a.write_all(b"Host: x\r\n\r\n").await.unwrap();
        let answer = tokio::time::timeout(Duration::from_secs(5), read_ok(&mut a))
            .await
            .expect("no answer within 5 s")
            .expect("closed before answering");
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        server.abort();
    }
}
