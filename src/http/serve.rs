//! The accept loop of the front door, on TCP or a Unix socket, with the timers axum's own
//! `serve` lacks: a connection must finish each request's headers within the header timeout
//! (counted from its accept, or from the first byte of a later request), may sit idle between
//! requests for the idle timeout, and a request body that brings no byte for the body timeout
//! is answered 408. At most `max_connections` connections are served at once; the next ones
//! are answered a 503 and closed (or, when even those answers are too many, closed at once).
//!
//! Every connection is served by hyper's HTTP/1.1 server on a task of its own. Stopping
//! closes the listener and the idle connections at once, and lets requests in flight finish
//! (the caller bounds that by the grace period).

use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::http::Request;
use bytes::Bytes;
use hyper::body::{Frame, Incoming, SizeHint};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt as _, ReadBuf};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio::time::{Instant, Sleep};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::FrontDoor;

/// Timeouts and the connection cap of the front door.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HttpLimits {
    /// Time to receive a request's headers, from the accept or the first byte of the request.
    pub header_timeout: Duration,
    /// Time a request body may go without bringing a byte; then 408 and nothing is sent.
    pub body_timeout: Duration,
    /// Time a kept-alive connection may wait for its next request.
    pub idle_timeout: Duration,
    /// Connections served at once; more are answered 503 and closed.
    pub max_connections: usize,
}

impl Default for HttpLimits {
    fn default() -> Self {
        HttpLimits {
            header_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            max_connections: 4096,
        }
    }
}

/// How many connections beyond the cap may be waiting for their 503 at once; past that an
/// excess connection is closed without a word.
const MAX_REFUSALS: usize = 64;
/// How long the 503 of an excess connection may take, in all.
const REFUSAL_TIME: Duration = Duration::from_secs(1);

/// The body of the 503 given to a connection past the cap.
const BUSY: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1\r\nconnection: close\r\ncontent-length: 88\r\n\r\n{\"error\":\"too many HTTP connections at once (--http-max-connections); try again shortly\"}";

/// Connections the front door is serving, shared with `/status`.
#[derive(Debug, Default)]
pub struct HttpGauge {
    open: AtomicUsize,
    refused: AtomicUsize,
}

impl HttpGauge {
    /// Connections being served now.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    /// Connections turned away at the cap since the start.
    pub fn refused(&self) -> usize {
        self.refused.load(Ordering::Relaxed)
    }
}

/// A bound listener: TCP, or a Unix socket whose file is removed when this is dropped.
pub enum Listener {
    /// A TCP listener.
    Tcp(TcpListener),
    /// A Unix socket listener and the path of its file.
    Unix(UnixListener, SocketFile),
}

/// The file of a Unix socket this process made; dropping it removes the file.
#[derive(Debug)]
pub struct SocketFile(PathBuf);

impl Drop for SocketFile {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_file(&self.0) {
            if e.kind() != io::ErrorKind::NotFound {
                warn!(path = %self.0.display(), cause = %e, "cannot remove the HTTP socket");
            }
        }
    }
}

/// Bind a Unix socket at `path` with permissions `mode`.
///
/// A path that exists is refused unless it is a socket that nobody answers on (a stale socket
/// left by a process that died), which is removed. The socket is made under a temporary name
/// in the same directory, given its mode, then renamed into place, so that it is never
/// reachable with the wider permissions of the umask.
pub fn bind_unix(path: &Path, mode: u32) -> anyhow::Result<Listener> {
    use anyhow::{bail, Context as _};
    use std::os::unix::fs::{FileTypeExt as _, PermissionsExt as _};

    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            match std::os::unix::net::UnixStream::connect(path) {
                Ok(_) => bail!(
                    "cannot listen for HTTP on {}: another process is listening there",
                    path.display()
                ),
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                    std::fs::remove_file(path).with_context(|| {
                        format!("cannot remove the stale socket {}", path.display())
                    })?;
                    warn!(path = %path.display(), "removed a stale HTTP socket");
                }
                Err(e) => bail!(
                    "cannot listen for HTTP on {}: it is a socket that cannot be checked ({e})",
                    path.display()
                ),
            }
        }
        Ok(_) => bail!(
            "cannot listen for HTTP on {}: the path exists and is not a socket",
            path.display()
        ),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => bail!("cannot listen for HTTP on {}: {e}", path.display()),
    }
    let name = path
        .file_name()
        .with_context(|| format!("{} names no file", path.display()))?;
    let staging = path.with_file_name(format!(
        ".{}.{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let _ = std::fs::remove_file(&staging);
    let listener = UnixListener::bind(&staging)
        .with_context(|| format!("cannot listen for HTTP on {}", path.display()))?;
    let placed = std::fs::set_permissions(&staging, std::fs::Permissions::from_mode(mode))
        .and_then(|()| std::fs::rename(&staging, path));
    if let Err(e) = placed {
        let _ = std::fs::remove_file(&staging);
        bail!("cannot set up the HTTP socket {}: {e}", path.display());
    }
    Ok(Listener::Unix(listener, SocketFile(path.to_path_buf())))
}

/// Serve `door` on `listener` until `stop` is cancelled, then let the requests in flight
/// finish and return. Dropping the returned future closes every connection at once.
pub async fn serve(
    listener: Listener,
    door: FrontDoor,
    limits: HttpLimits,
    gauge: Arc<HttpGauge>,
    stop: CancellationToken,
) {
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let refusals = Arc::new(Semaphore::new(MAX_REFUSALS));
    let mut connections = JoinSet::new();
    // The socket file, if any, lives as long as this future.
    let (tcp, unix) = match listener {
        Listener::Tcp(tcp) => (Some(tcp), None),
        Listener::Unix(unix, file) => (None, Some((unix, file))),
    };
    loop {
        let accepted = tokio::select! {
            () = stop.cancelled() => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
            accepted = accept(tcp.as_ref(), unix.as_ref().map(|(l, _)| l)) => accepted,
        };
        let io = match accepted {
            Ok(io) => io,
            Err(e) => {
                // Out of file descriptors, say: wait a little rather than spin.
                warn!(cause = %e, "cannot accept an HTTP connection");
                tokio::select! {
                    () = stop.cancelled() => break,
                    () = tokio::time::sleep(Duration::from_millis(100)) => continue,
                }
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            gauge.refused.fetch_add(1, Ordering::Relaxed);
            if let Ok(permit) = refusals.clone().try_acquire_owned() {
                connections.spawn(async move {
                    let _permit = permit;
                    refuse(io).await;
                });
            }
            continue;
        };
        let door = door.clone();
        let gauge = gauge.clone();
        let stop = stop.clone();
        connections.spawn(async move {
            gauge.open.fetch_add(1, Ordering::Relaxed);
            serve_connection(io, door, limits, stop).await;
            gauge.open.fetch_sub(1, Ordering::Relaxed);
            drop(slot);
        });
    }
    drop(tcp);
    while connections.join_next().await.is_some() {}
    drop(unix);
}

/// An accepted stream of either kind.
enum Stream {
    Tcp(tokio::net::TcpStream),
    Unix(tokio::net::UnixStream),
}

async fn accept(tcp: Option<&TcpListener>, unix: Option<&UnixListener>) -> io::Result<Stream> {
    match (tcp, unix) {
        (Some(tcp), _) => {
            let (stream, _) = tcp.accept().await?;
            // Replies are small writes that must not wait for an ACK (Nagle).
            let _ = stream.set_nodelay(true);
            Ok(Stream::Tcp(stream))
        }
        (None, Some(unix)) => Ok(Stream::Unix(unix.accept().await?.0)),
        (None, None) => std::future::pending().await,
    }
}

/// Answer a connection past the cap with a 503 and close it, within [`REFUSAL_TIME`].
async fn refuse(stream: Stream) {
    async fn answer<S: AsyncRead + AsyncWrite + Unpin>(mut stream: S) {
        if stream.write_all(BUSY).await.is_err() || stream.shutdown().await.is_err() {
            return;
        }
        // Read what the client sent until it closes, so that closing does not reset the
        // connection before the client has read the answer.
        let mut sink = [0u8; 1024];
        while matches!(
            tokio::io::AsyncReadExt::read(&mut stream, &mut sink).await,
            Ok(n) if n > 0
        ) {}
    }
    let _ = match stream {
        Stream::Tcp(s) => tokio::time::timeout(REFUSAL_TIME, answer(s)).await,
        Stream::Unix(s) => tokio::time::timeout(REFUSAL_TIME, answer(s)).await,
    };
}

/// Where a connection is between requests, for its timers.
#[derive(Clone, Copy, Debug)]
enum Phase {
    /// Receiving a request's headers since then.
    Head(Instant),
    /// Serving this many requests (their bodies have their own timer).
    Busy(usize),
    /// Waiting for the next request since then.
    Idle(Instant),
}

/// The phase of one connection, moved on by its I/O and its requests and watched by its
/// task.
struct Clock {
    phase: Mutex<Phase>,
    /// When the connection started, the origin of `write_blocked_ms`.
    born: Instant,
    /// Since when (ms after `born`, plus one) a write has found the socket full with nothing
    /// accepted since; 0 while writes go through.
    write_blocked_ms: AtomicU64,
}

/// A response (an event stream, a large body) whose peer accepts no byte of it for this long
/// closes its connection: what it holds (the socket's buffers, one chunk) is freed, and the
/// connection no longer counts against the cap.
pub const WRITE_STALL: Duration = Duration::from_secs(60);

impl Clock {
    fn set(&self, update: impl FnOnce(Phase) -> Phase) {
        let mut phase = self.phase.lock().unwrap_or_else(|e| e.into_inner());
        *phase = update(*phase);
    }

    fn get(&self) -> Phase {
        *self.phase.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Bytes arrived: an idle connection starts its next request's headers.
    fn read_some(&self) {
        if matches!(self.get(), Phase::Idle(_)) {
            self.set(|phase| match phase {
                Phase::Idle(_) => Phase::Head(Instant::now()),
                other => other,
            });
        }
    }

    fn request_started(&self) {
        self.set(|phase| match phase {
            Phase::Busy(n) => Phase::Busy(n + 1),
            _ => Phase::Busy(1),
        });
    }

    /// A write found the socket full.
    fn write_blocked(&self) {
        if self.write_blocked_ms.load(Ordering::Relaxed) == 0 {
            let ms = u64::try_from(self.born.elapsed().as_millis()).unwrap_or(u64::MAX - 1);
            self.write_blocked_ms.store(ms + 1, Ordering::Relaxed);
        }
    }

    /// A write went through.
    fn write_done(&self) {
        if self.write_blocked_ms.load(Ordering::Relaxed) != 0 {
            self.write_blocked_ms.store(0, Ordering::Relaxed);
        }
    }

    /// Whether writes have been blocked for `WRITE_STALL` or more.
    fn write_stalled(&self) -> bool {
        match self.write_blocked_ms.load(Ordering::Relaxed) {
            0 => false,
            since => {
                let now = u64::try_from(self.born.elapsed().as_millis()).unwrap_or(u64::MAX);
                now.saturating_sub(since - 1) >= WRITE_STALL.as_millis() as u64
            }
        }
    }

    fn request_done(&self) {
        self.set(|phase| match phase {
            Phase::Busy(n) if n > 1 => Phase::Busy(n - 1),
            _ => Phase::Idle(Instant::now()),
        });
    }
}

/// Marks a request in progress on its connection's clock until dropped.
struct InRequest(Arc<Clock>);

/// A response body that keeps its request in progress until it is dropped.
struct Tracked {
    body: Body,
    _in_request: InRequest,
}

impl hyper::body::Body for Tracked {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

impl Drop for InRequest {
    fn drop(&mut self) {
        self.0.request_done();
    }
}

/// A stream that tells its connection's clock when bytes arrive, and when writes block.
struct Watched<S> {
    inner: S,
    clock: Arc<Clock>,
}

impl<S> Watched<S> {
    fn note_write(&self, polled: &Poll<io::Result<usize>>) {
        match polled {
            Poll::Pending => self.clock.write_blocked(),
            Poll::Ready(_) => self.clock.write_done(),
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Watched<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.clock.read_some();
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Watched<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.note_write(&polled);
        polled
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.note_write(&polled);
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

async fn serve_connection(
    stream: Stream,
    door: FrontDoor,
    limits: HttpLimits,
    stop: CancellationToken,
) {
    match stream {
        Stream::Tcp(s) => serve_stream(s, door, limits, stop).await,
        Stream::Unix(s) => serve_stream(s, door, limits, stop).await,
    }
}

/// Serve one connection until it closes, a timer runs out, or `stop` (then requests in
/// flight finish first).
async fn serve_stream<S>(stream: S, door: FrontDoor, limits: HttpLimits, stop: CancellationToken)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let clock = Arc::new(Clock {
        born: Instant::now(),
        write_blocked_ms: AtomicU64::new(0),
        phase: Mutex::new(Phase::Head(Instant::now())),
    });
    let io = TokioIo::new(Watched {
        inner: stream,
        clock: clock.clone(),
    });
    let service = {
        let clock = clock.clone();
        hyper::service::service_fn(move |request: Request<Incoming>| {
            clock.request_started();
            let in_request = InRequest(clock.clone());
            let request = request.map(|body| Body::new(StallTimed::new(body, limits.body_timeout)));
            let answered = door.clone().handle(request);
            async move {
                // The request is in progress until its response body is written whole (or
                // dropped): a streamed response is not an idle connection.
                let response = answered.await.map(|body| {
                    Body::new(Tracked {
                        body,
                        _in_request: in_request,
                    })
                });
                Ok::<_, std::convert::Infallible>(response)
            }
        })
    };
    let connection = hyper::server::conn::http1::Builder::new()
        // The timers are ours (they tell idle from slow), not hyper's.
        .header_read_timeout(None)
        .serve_connection(io, service);
    tokio::pin!(connection);
    // One timer, checked lazily: the phase changes several times per request, and waking this
    // loop or re-registering a timer on each change cost the front door measurable
    // throughput. When the timer fires, the deadline of the phase the connection is in now
    // decides: past it, the connection ends; otherwise the timer is set to it, but never
    // further than the shorter timeout, since the phase may change to one with a nearer
    // deadline meanwhile (an idle connection checked every `recheck` at most).
    let recheck = limits.header_timeout.min(limits.idle_timeout);
    let timer = tokio::time::sleep(recheck);
    tokio::pin!(timer);
    let mut stopping = false;
    loop {
        tokio::select! {
            served = connection.as_mut() => {
                if let Err(e) = served {
                    debug!(cause = %e, "HTTP connection ended with an error");
                }
                return;
            }
            () = timer.as_mut() => {
                let now = Instant::now();
                let deadline = match clock.get() {
                    Phase::Head(since) => since + limits.header_timeout,
                    Phase::Idle(since) => since + limits.idle_timeout,
                    Phase::Busy(_) if clock.write_stalled() => {
                        debug!("HTTP connection closed: its peer took no byte of the response for {WRITE_STALL:?}");
                        return;
                    }
                    Phase::Busy(_) => now + recheck,
                };
                if now >= deadline {
                    debug!("HTTP connection closed by its header or idle timeout");
                    return;
                }
                timer.as_mut().reset(deadline.min(now + recheck));
            }
            () = stop.cancelled(), if !stopping => {
                stopping = true;
                if !matches!(clock.get(), Phase::Busy(_)) {
                    return;
                }
                connection.as_mut().graceful_shutdown();
            }
        }
    }
}

/// The error of a request body that brought no byte for the body timeout.
#[derive(Debug)]
pub struct BodyStalled(pub Duration);

impl std::fmt::Display for BodyStalled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the request body brought no byte for {:.1} s (--http-body-timeout)",
            self.0.as_secs_f64()
        )
    }
}

impl std::error::Error for BodyStalled {}

/// A request body that fails with [`BodyStalled`] when no frame arrives for `timeout` while
/// it is being read.
struct StallTimed {
    inner: Incoming,
    timeout: Duration,
    timer: Option<Pin<Box<Sleep>>>,
}

impl StallTimed {
    fn new(inner: Incoming, timeout: Duration) -> Self {
        StallTimed {
            inner,
            timeout,
            timer: None,
        }
    }
}

impl hyper::body::Body for StallTimed {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(frame) => {
                this.timer = None;
                Poll::Ready(frame.map(|f| f.map_err(Into::into)))
            }
            Poll::Pending => {
                let timeout = this.timeout;
                let timer = this
                    .timer
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
                match timer.as_mut().poll(cx) {
                    Poll::Ready(()) => Poll::Ready(Some(Err(Box::new(BodyStalled(timeout))))),
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
