//! One live pipe connection: many requests in flight both ways, heartbeats, and a clean end.
//!
//! A [`Connection`] is a cheap handle onto a connection's shared state. Its work is done by two
//! tasks, both inside the future that [`open`] returns:
//!
//! - the *reader* decodes frames, completes the replies this side waits for, answers pings,
//!   and spawns one task per incoming event (bounded by `max_in_flight`; the excess is
//!   answered `OVERLOADED` at once). It never waits on the writer, so a slow handler or a
//!   full write queue never delays heartbeats or other replies. It also declares the peer dead
//!   when no byte has arrived for the heartbeat timeout (bytes, not whole frames: a large frame
//!   crossing a slow link is progress, not silence);
//! - the *writer* owns the write half. Every frame goes through its bounded queue, already
//!   encoded, and it writes whatever is queued in one go (write coalescing). Events and
//!   replies also wait for room in a byte budget (`WRITE_BUDGET`), so a peer that stops
//!   reading cannot make this node buffer without bound. A write that makes no progress for
//!   the heartbeat timeout means the peer is not reading, and ends the connection.
//!
//! When a connection ends, for whatever reason, every request still waiting on it fails at
//! once with [`CallError::PipeClosed`] and the reason.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::Poll;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use futures_util::StreamExt;
use restpipe_handler::{Context, Reply, Request, Side};
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf, ReadHalf, WriteHalf};
use tokio::sync::{mpsc, oneshot, Notify, OwnedSemaphorePermit, Semaphore};
use tokio_util::codec::{FramedRead, LengthDelimitedCodec};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::error::CallError;
use crate::node::NodeCore;
use crate::proto::{self, frame::Kind, Frame};
use crate::util::{epoch_secs, lock};
use crate::wire;

/// Frame parts written in one go at most.
const MAX_BATCH_FRAMES: usize = 128;
/// Frames up to this size are copied into the coalescing buffer; larger ones are written
/// directly.
const COALESCE_LIMIT: usize = 16 * 1024;
/// How long the writer keeps trying to flush its last frames once the connection is closing.
const FINAL_FLUSH: Duration = Duration::from_secs(1);
/// Bytes of frames a connection holds for its writer (queued or being written) from which an
/// event or a reply waits for room before it is queued; control frames never wait. A peer that
/// stops reading thus makes this node hold at most this much plus one frame for it, besides
/// the replies of the requests in flight (`max_in_flight`), until the write stalls for the
/// heartbeat timeout and the connection ends.
const WRITE_BUDGET: usize = 8 * 1024 * 1024;

static NEXT_CONNECTION_ID: AtomicU64 = AtomicU64::new(1);

type Pending = HashMap<u64, oneshot::Sender<Result<Reply, CallError>>>;
type Reader<S> = FramedRead<Progress<ReadHalf<S>>, LengthDelimitedCodec>;

/// A reader that remembers when bytes last arrived. The heartbeat timeout is measured from
/// there, so that a peer busy sending one large frame over a slow link is not taken for a
/// silent one (no whole frame may arrive for longer than the timeout).
struct Progress<R> {
    inner: R,
    last: tokio::time::Instant,
}

impl<R> Progress<R> {
    fn new(inner: R) -> Self {
        Progress {
            inner,
            last: tokio::time::Instant::now(),
        }
    }
}

impl<R: AsyncRead + Unpin> AsyncRead for Progress<R> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let poll = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.last = tokio::time::Instant::now();
        }
        poll
    }
}

/// Who is on the other end of a connection.
#[derive(Clone, Debug)]
pub struct PeerInfo {
    /// The peer's identity, from its certificate.
    pub identity: String,
    /// The peer's address.
    pub addr: SocketAddr,
    /// The software version the peer announced.
    pub software_version: String,
    /// When the connection was established.
    pub connected_at: SystemTime,
}

/// A snapshot of one connection, as `/status` and `/clients` show it.
#[derive(Clone, Debug, Serialize)]
pub struct ConnectionStatus {
    /// The peer's identity.
    pub identity: String,
    /// The peer's address.
    pub address: String,
    /// The peer's software version.
    pub software_version: String,
    /// Seconds since the epoch when the connection was established.
    pub connected_since: f64,
    /// The last heartbeat round trip in milliseconds, once one was measured.
    pub last_heartbeat_rtt_ms: Option<f64>,
    /// Requests this node sent that wait for a reply.
    pub requests_in_flight_out: u64,
    /// Requests from the peer that are being handled.
    pub requests_in_flight_in: u64,
    /// Requests sent to the peer.
    pub requests_sent: u64,
    /// Requests received from the peer.
    pub requests_received: u64,
}

/// A handle onto a live connection. Clones share it.
#[derive(Clone)]
pub struct Connection {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("id", &self.shared.id)
            .field("peer", &self.shared.info.identity)
            .field("addr", &self.shared.info.addr)
            .finish()
    }
}

struct Shared {
    id: u64,
    info: PeerInfo,
    core: Arc<NodeCore>,
    started: Instant,
    out: mpsc::Sender<wire::Encoded>,
    /// `None` once the connection is closed: nothing new can wait on it.
    pending: Mutex<Option<Pending>>,
    next_request: AtomicU64,
    closed: CancellationToken,
    close_reason: OnceLock<String>,
    draining: AtomicBool,
    inbound: Arc<Semaphore>,
    outbound: Arc<Semaphore>,
    peer_max_frame: usize,
    last_rtt_us: AtomicU64,
    requests_sent: AtomicU64,
    requests_received: AtomicU64,
    /// Bytes of the frames queued for the writer or being written (see [`WRITE_BUDGET`]).
    unwritten: AtomicUsize,
    /// Notified each time the writer has written a batch.
    written: Notify,
}

impl Connection {
    /// The peer at the other end.
    pub fn peer(&self) -> &PeerInfo {
        &self.shared.info
    }

    /// A number unique to this connection within the process.
    pub fn id(&self) -> u64 {
        self.shared.id
    }

    /// Whether the connection has ended.
    pub fn is_closed(&self) -> bool {
        self.shared.closed.is_cancelled()
    }

    /// Resolves when the connection has ended.
    pub async fn closed(&self) {
        self.shared.closed.cancelled().await
    }

    /// Why the connection ended, once it has.
    pub fn close_reason(&self) -> Option<String> {
        self.shared.close_reason.get().cloned()
    }

    /// Send `request` to the peer and wait for its reply, at most `timeout`.
    pub async fn call(&self, request: Request, timeout: Duration) -> Result<Reply, CallError> {
        let shared = &self.shared;
        let limit = shared.peer_max_frame;
        if request.body.len() > limit {
            return Err(CallError::TooLarge {
                size: request.body.len(),
                limit,
            });
        }
        let Ok(_permit) = shared.outbound.clone().try_acquire_owned() else {
            return Err(CallError::Overloaded(format!(
                "{} requests are already in flight to {}",
                shared.core.pipe.max_in_flight, shared.info.identity
            )));
        };
        let started = Instant::now();
        let id = shared.next_request.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        {
            let mut pending = lock(&shared.pending);
            match pending.as_mut() {
                Some(map) => map.insert(id, tx),
                None => return Err(shared.closed_error()),
            };
        }
        let _guard = PendingGuard { shared, id };
        let timeout_ms = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX);
        let frame = wire::encode_parts(wire::frame(
            id,
            Kind::Event(wire::event_from_request(request, timeout_ms)),
        ));
        shared.requests_sent.fetch_add(1, Ordering::Relaxed);
        let metrics = &shared.core.metrics;
        metrics.tick("message.send.tick");
        let exchange = async {
            shared.send(frame).await?;
            rx.await.map_err(|_| shared.closed_error())?
        };
        let result = match tokio::time::timeout(timeout, exchange).await {
            Ok(result) => result,
            Err(_) => Err(CallError::Timeout(timeout)),
        };
        metrics.timing("message.send.timing", started.elapsed());
        result
    }

    /// A snapshot for `/status`.
    pub fn status(&self) -> ConnectionStatus {
        let s = &self.shared;
        let rtt = s.last_rtt_us.load(Ordering::Relaxed);
        let max = s.core.pipe.max_in_flight as u64;
        ConnectionStatus {
            identity: s.info.identity.clone(),
            address: s.info.addr.to_string(),
            software_version: s.info.software_version.clone(),
            connected_since: epoch_secs(s.info.connected_at),
            last_heartbeat_rtt_ms: (rtt != 0).then(|| rtt as f64 / 1000.0),
            requests_in_flight_out: max - s.outbound.available_permits() as u64,
            requests_in_flight_in: max - s.inbound.available_permits() as u64,
            requests_sent: s.requests_sent.load(Ordering::Relaxed),
            requests_received: s.requests_received.load(Ordering::Relaxed),
        }
    }

    /// End the connection now: in-flight requests fail with `reason`.
    pub fn close(&self, reason: impl Into<String>) {
        self.shared.close(reason.into());
    }

    /// End the connection gracefully: take no new requests from the peer, let the ones being
    /// handled finish (at most `grace`), tell the peer why, then close.
    pub async fn drain(&self, grace: Duration, reason: &str) {
        let s = &self.shared;
        s.draining.store(true, Ordering::Release);
        let all = u32::try_from(s.core.pipe.max_in_flight).unwrap_or(u32::MAX);
        let finished = tokio::select! {
            r = tokio::time::timeout(grace, s.inbound.acquire_many(all)) => r.is_ok(),
            _ = s.closed.cancelled() => true,
        };
        if !finished {
            warn!(peer = %s.info.identity, "requests still in flight after the grace period");
        }
        s.send_now(&wire::frame(
            0,
            Kind::Close(proto::Close {
                reason: reason.to_string(),
            }),
        ));
        s.close(reason.to_string());
    }
}

/// The `Error` frame kinds as this crate uses them.
use proto::error::Kind as ErrorKind;

impl Shared {
    fn closed_error(&self) -> CallError {
        CallError::PipeClosed(
            self.close_reason
                .get()
                .cloned()
                .unwrap_or_else(|| "connection closed".into()),
        )
    }

    fn close(&self, reason: String) {
        if self.close_reason.set(reason).is_ok() {
            let reason = self.close_reason.get().cloned().unwrap_or_default();
            debug!(peer = %self.info.identity, %reason, "connection closing");
        }
        let pending = lock(&self.pending).take();
        self.closed.cancel();
        if let Some(pending) = pending {
            for (_, tx) in pending {
                let _ = tx.send(Err(self.closed_error()));
            }
        }
    }

    /// Requests in flight on this connection, both ways.
    fn in_flight(&self) -> usize {
        let max = self.core.pipe.max_in_flight;
        (max - self.outbound.available_permits()) + (max - self.inbound.available_permits())
    }

    /// Queue an encoded frame, waiting for room in the write budget and the queue; fails once
    /// the connection is closed.
    async fn send(&self, frame: wire::Encoded) -> Result<(), CallError> {
        let queue = async {
            self.reserve(frame.len()).await;
            self.out.send(frame).await
        };
        tokio::select! {
            r = queue => r.map_err(|_| self.closed_error()),
            _ = self.closed.cancelled() => Err(self.closed_error()),
        }
    }

    /// Wait until less than [`WRITE_BUDGET`] is held for the writer, and count `len` more
    /// bytes held.
    async fn reserve(&self, len: usize) {
        loop {
            let written = self.written.notified();
            tokio::pin!(written);
            // Registered before the check, so that a batch written in between wakes it.
            written.as_mut().enable();
            let room = |held: usize| (held < WRITE_BUDGET).then_some(held + len);
            if self
                .unwritten
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, room)
                .is_ok()
            {
                return;
            }
            written.await;
        }
    }

    /// The writer wrote `bytes`: room for the senders waiting.
    fn wrote(&self, bytes: usize) {
        let _ = self
            .unwritten
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |held| {
                Some(held.saturating_sub(bytes))
            });
        self.written.notify_waiters();
    }

    /// Queue a control frame without waiting. A full queue drops it: the peer's own timeout
    /// covers what it would have answered.
    fn send_now(&self, frame: &Frame) {
        let frame = wire::encode(frame);
        let len = frame.len();
        self.unwritten.fetch_add(len, Ordering::AcqRel);
        if self.out.try_send(frame.into()).is_err() {
            self.wrote(len);
            debug!(peer = %self.info.identity, "write queue full; control frame dropped");
        }
    }

    fn send_error(&self, id: u64, kind: ErrorKind, message: String) {
        self.send_now(&wire::frame(
            id,
            Kind::Error(proto::Error {
                kind: kind as i32,
                message,
            }),
        ));
    }

    fn complete(&self, id: u64, result: Result<Reply, CallError>) {
        let tx = lock(&self.pending).as_mut().and_then(|m| m.remove(&id));
        match tx {
            Some(tx) => {
                let _ = tx.send(result);
            }
            None => debug!(peer = %self.info.identity, id, "reply for a request nobody waits for"),
        }
    }

    fn on_frame(self: &Arc<Self>, payload: Bytes) {
        let frame = match wire::decode(payload) {
            Ok(frame) => frame,
            Err(e) => {
                warn!(peer = %self.info.identity, cause = %e, "malformed frame ignored");
                self.send_error(0, ErrorKind::BadRequest, format!("malformed frame: {e}"));
                return;
            }
        };
        let id = frame.id;
        match frame.kind {
            Some(Kind::Event(event)) => self.on_event(id, event),
            Some(Kind::Reply(reply)) => self.complete(id, Ok(wire::reply_from_wire(reply))),
            Some(Kind::Error(err)) => {
                let message = err.message;
                let result = match ErrorKind::try_from(err.kind) {
                    Ok(ErrorKind::Overloaded) => CallError::Overloaded(message),
                    Ok(ErrorKind::ShuttingDown) => CallError::ShuttingDown(message),
                    _ => CallError::Refused(message),
                };
                if id == 0 {
                    warn!(peer = %self.info.identity, error = %result, "peer reported an error");
                } else {
                    self.complete(id, Err(result));
                }
            }
            Some(Kind::Ping(ping)) => self.send_now(&wire::frame(
                0,
                Kind::Pong(proto::Pong { nonce: ping.nonce }),
            )),
            Some(Kind::Pong(pong)) => {
                let now = self.started.elapsed().as_micros() as u64;
                let rtt = now.saturating_sub(pong.nonce).max(1);
                self.last_rtt_us.store(rtt, Ordering::Relaxed);
                self.core.metrics.heartbeat_ok(Duration::from_micros(rtt));
            }
            Some(Kind::Close(close)) => {
                info!(peer = %self.info.identity, reason = %close.reason, "peer closed the connection");
                self.close(format!("the peer closed the connection: {}", close.reason));
            }
            Some(Kind::Hello(_)) => {
                warn!(peer = %self.info.identity, "unexpected hello after the handshake ignored")
            }
            None => self.send_error(
                id,
                ErrorKind::UnknownMessage,
                "this node does not know that message type".into(),
            ),
        }
    }

    fn on_event(self: &Arc<Self>, id: u64, event: proto::Event) {
        self.requests_received.fetch_add(1, Ordering::Relaxed);
        self.core.metrics.tick("message.receive.tick");
        if self.draining.load(Ordering::Acquire) {
            return self.send_error(id, ErrorKind::ShuttingDown, "node is shutting down".into());
        }
        let permit = match self.inbound.clone().try_acquire_owned() {
            Ok(permit) => permit,
            Err(_) => {
                return self.send_error(
                    id,
                    ErrorKind::Overloaded,
                    format!(
                        "more than {} requests in flight on this connection",
                        self.core.pipe.max_in_flight
                    ),
                )
            }
        };
        let (request, timeout_ms) = match wire::request_from_event(event) {
            Ok(parts) => parts,
            Err(why) => return self.send_error(id, ErrorKind::BadRequest, why.into()),
        };
        let timeout = Duration::from_millis(timeout_ms).min(self.core.pipe.max_request_timeout);
        let ctx = Context {
            side: self.core.side,
            peer_identity: self.info.identity.clone(),
            peer_addr: Some(self.info.addr),
            request_id: id,
            deadline: Instant::now() + timeout,
        };
        let shared = Arc::clone(self);
        tokio::spawn(shared.handle(ctx, request, permit));
    }

    async fn handle(
        self: Arc<Self>,
        ctx: Context,
        request: Request,
        _permit: OwnedSemaphorePermit,
    ) {
        let id = ctx.request_id;
        let reply = tokio::select! {
            reply = self.core.dispatch(ctx, request) => reply,
            _ = self.closed.cancelled() => return,
        };
        let reply = if reply.body.len() > self.peer_max_frame {
            restpipe_handler::HandlerError::new(format!(
                "reply body of {} bytes is over the limit of {} bytes",
                reply.body.len(),
                self.peer_max_frame
            ))
            .with_class("ReplyTooLarge")
            .into_reply()
        } else {
            reply
        };
        let frame = wire::encode_parts(wire::frame(id, Kind::Reply(wire::reply_to_wire(reply))));
        let _ = self.send(frame).await;
    }
}

/// Removes a request from the pending map when its caller stops waiting, for whatever reason.
struct PendingGuard<'a> {
    shared: &'a Shared,
    id: u64,
}

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        if let Some(map) = lock(&self.shared.pending).as_mut() {
            map.remove(&self.id);
        }
    }
}

/// Why the hello exchange failed.
#[derive(Debug, thiserror::Error)]
pub enum HelloError {
    /// The peer refused us, and said why.
    #[error("refused by the peer: {0}")]
    RefusedByPeer(String),
    /// We refused the peer.
    #[error("{0}")]
    Incompatible(String),
    /// No hello in time, or the stream broke.
    #[error("hello exchange failed: {0}")]
    Io(String),
}

/// Run the hello exchange on a fresh TLS stream and start the connection.
///
/// Returns the connection handle and the future that runs it; the future ends when the
/// connection does.
pub(crate) async fn open<S>(
    core: Arc<NodeCore>,
    stream: S,
    peer_identity: String,
    peer_addr: SocketAddr,
) -> Result<(Connection, impl Future<Output = ()> + Send + 'static), HelloError>
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let timeout = core.pipe.handshake_timeout;
    let (read_half, mut write_half) = tokio::io::split(stream);
    let mut reader = wire::frame_reader(Progress::new(read_half), core.pipe.max_frame);

    let role = |side: Side| match side {
        Side::Server => proto::Role::Server,
        Side::Client => proto::Role::Client,
    };
    let hello = wire::encode(&wire::frame(
        0,
        Kind::Hello(proto::Hello {
            protocol_version: wire::PROTOCOL_VERSION,
            role: role(core.side) as i32,
            software_version: env!("CARGO_PKG_VERSION").into(),
            identity: core.identity.clone(),
            max_frame_bytes: core.pipe.max_frame as u64,
        }),
    ));
    let exchange = async {
        write_half.write_all(&hello).await?;
        write_half.flush().await?;
        match reader.next().await {
            Some(Ok(payload)) => Ok(payload.freeze()),
            Some(Err(e)) => Err(e),
            None => Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "the peer hung up before its hello",
            )),
        }
    };
    let payload = tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| HelloError::Io(format!("no hello from the peer within {timeout:?}")))?
        .map_err(|e| HelloError::Io(e.to_string()))?;
    let peer_hello = match wire::decode(payload) {
        Ok(Frame {
            kind: Some(Kind::Hello(h)),
            ..
        }) => h,
        Ok(Frame {
            kind: Some(Kind::Close(c)),
            ..
        }) => return Err(HelloError::RefusedByPeer(c.reason)),
        Ok(_) => {
            return Err(HelloError::Io(
                "the peer's first frame is not a hello".into(),
            ))
        }
        Err(e) => return Err(HelloError::Io(format!("malformed hello: {e}"))),
    };
    let refusal = if peer_hello.protocol_version != wire::PROTOCOL_VERSION {
        Some(format!(
            "protocol version mismatch: this node ({} {}) speaks version {}, the peer ({}) speaks version {}; run the same restpipe release on both sides",
            core.side,
            env!("CARGO_PKG_VERSION"),
            wire::PROTOCOL_VERSION,
            peer_hello.software_version,
            peer_hello.protocol_version
        ))
    } else if peer_hello.role != role(core.side.peer()) as i32 {
        Some(format!(
            "role mismatch: this node is a {} and expects a {} peer",
            core.side,
            core.side.peer()
        ))
    } else {
        None
    };
    if let Some(reason) = refusal {
        let close = wire::encode(&wire::frame(
            0,
            Kind::Close(proto::Close {
                reason: reason.clone(),
            }),
        ));
        let _ = tokio::time::timeout(timeout, async {
            write_half.write_all(&close).await?;
            write_half.shutdown().await
        })
        .await;
        return Err(HelloError::Incompatible(reason));
    }

    let peer_max_frame = usize::try_from(peer_hello.max_frame_bytes)
        .unwrap_or(usize::MAX)
        .min(core.pipe.max_frame)
        .max(1024);
    let (out, rx) = mpsc::channel(core.pipe.write_queue);
    let max_in_flight = core.pipe.max_in_flight;
    let shared = Arc::new(Shared {
        id: NEXT_CONNECTION_ID.fetch_add(1, Ordering::Relaxed),
        info: PeerInfo {
            identity: peer_identity,
            addr: peer_addr,
            software_version: peer_hello.software_version,
            connected_at: SystemTime::now(),
        },
        core,
        started: Instant::now(),
        out,
        pending: Mutex::new(Some(HashMap::new())),
        next_request: AtomicU64::new(1),
        closed: CancellationToken::new(),
        close_reason: OnceLock::new(),
        draining: AtomicBool::new(false),
        inbound: Arc::new(Semaphore::new(max_in_flight)),
        outbound: Arc::new(Semaphore::new(max_in_flight)),
        peer_max_frame,
        last_rtt_us: AtomicU64::new(0),
        requests_sent: AtomicU64::new(0),
        requests_received: AtomicU64::new(0),
        unwritten: AtomicUsize::new(0),
        written: Notify::new(),
    });
    let conn = Connection {
        shared: shared.clone(),
    };
    let run = async move {
        let writer = tokio::spawn(write_loop(shared.clone(), rx, write_half));
        let reason = read_loop(&shared, reader).await;
        if let Some(reason) = reason {
            shared.close(reason);
        }
        let _ = writer.await;
        let reason = shared.close_reason.get().cloned().unwrap_or_default();
        info!(peer = %shared.info.identity, addr = %shared.info.addr, %reason, "connection ended");
    };
    Ok((conn, run))
}

/// Read frames until the connection ends; returns the reason when the end was found here.
async fn read_loop<S: AsyncRead>(shared: &Arc<Shared>, mut reader: Reader<S>) -> Option<String> {
    let pipe = &shared.core.pipe;
    let mut ticker = tokio::time::interval_at(
        tokio::time::Instant::now() + pipe.heartbeat_interval,
        pipe.heartbeat_interval,
    );
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let dead_line = tokio::time::sleep_until(reader.get_ref().last + pipe.heartbeat_timeout);
    tokio::pin!(dead_line);
    loop {
        tokio::select! {
            _ = shared.closed.cancelled() => return None,
            next = reader.next() => match next {
                Some(Ok(payload)) => shared.on_frame(payload.freeze()),
                Some(Err(e)) if e.kind() == std::io::ErrorKind::InvalidData => {
                    warn!(peer = %shared.info.identity, cause = %e, "frame over the size limit");
                    return Some(format!(
                        "the peer sent a frame over the limit of {} bytes",
                        pipe.max_frame + wire::ENVELOPE_ALLOWANCE
                    ));
                }
                Some(Err(e)) => return Some(format!("read failed: {e}")),
                None => return Some("the peer hung up".into()),
            },
            _ = ticker.tick() => {
                let nonce = shared.started.elapsed().as_micros() as u64;
                shared.send_now(&wire::frame(0, Kind::Ping(proto::Ping { nonce })));
            }
            _ = &mut dead_line => {
                let due = reader.get_ref().last + pipe.heartbeat_timeout;
                if tokio::time::Instant::now() >= due {
                    shared.core.metrics.heartbeat_failed();
                    warn!(peer = %shared.info.identity, timeout = ?pipe.heartbeat_timeout, "peer silent past the heartbeat timeout");
                    return Some(format!(
                        "nothing heard from the peer for {:?} (heartbeat timeout)",
                        pipe.heartbeat_timeout
                    ));
                }
                dead_line.as_mut().reset(due);
            }
        }
    }
}

/// Write queued frames until the connection ends, then flush what is left and say goodbye.
async fn write_loop<S: AsyncWrite>(
    shared: Arc<Shared>,
    mut rx: mpsc::Receiver<wire::Encoded>,
    mut io: WriteHalf<S>,
) {
    let stall = shared.core.pipe.heartbeat_timeout;
    let mut batch: Vec<Bytes> = Vec::new();
    let mut buf: Vec<u8> = Vec::new();
    loop {
        let first = tokio::select! {
            biased;
            frame = rx.recv() => match frame {
                Some(frame) => frame,
                None => break,
            },
            _ = shared.closed.cancelled() => break,
        };
        batch.extend(first.parts());
        take_queued(&mut rx, &mut batch);
        // While other requests are in flight, more frames are likely on their way from tasks
        // that are ready to run: yield once so that they join this write. One write (and one
        // wake-up of the peer) then carries many frames; a lone request does not wait.
        if batch.len() < MAX_BATCH_FRAMES && shared.in_flight() > 1 {
            tokio::task::yield_now().await;
            take_queued(&mut rx, &mut batch);
        }
        let bytes = batch.iter().map(Bytes::len).sum();
        match write_batch(&mut io, &mut batch, &mut buf, stall).await {
            Ok(()) => shared.wrote(bytes),
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {
                warn!(peer = %shared.info.identity, "peer is not reading; closing");
                shared.close(format!(
                    "the peer read nothing for {stall:?} (write stalled)"
                ));
                return;
            }
            Err(e) => {
                shared.close(format!("write failed: {e}"));
                break;
            }
        }
        if buf.capacity() > 4 * COALESCE_LIMIT {
            buf = Vec::new();
        }
    }
    // Closing: flush what is queued (a Close frame among it), then end TLS cleanly.
    rx.close();
    while let Ok(frame) = rx.try_recv() {
        batch.extend(frame.parts());
    }
    let _ = tokio::time::timeout(FINAL_FLUSH, async {
        write_batch(&mut io, &mut batch, &mut buf, FINAL_FLUSH).await?;
        io.shutdown().await
    })
    .await;
}

/// Move the parts of the frames already queued into `batch`, up to [`MAX_BATCH_FRAMES`].
fn take_queued(rx: &mut mpsc::Receiver<wire::Encoded>, batch: &mut Vec<Bytes>) {
    while batch.len() < MAX_BATCH_FRAMES {
        match rx.try_recv() {
            Ok(frame) => batch.extend(frame.parts()),
            Err(_) => break,
        }
    }
}

/// Write a batch of frames, coalescing the small ones. Fails with `TimedOut` when the peer
/// takes nothing for `stall`: a single write or the flush makes no progress for that long. A
/// large frame that crosses a slow link slowly but steadily is not a stall.
async fn write_batch<W: AsyncWrite + Unpin>(
    io: &mut W,
    batch: &mut Vec<Bytes>,
    buf: &mut Vec<u8>,
    stall: Duration,
) -> std::io::Result<()> {
    for frame in batch.drain(..) {
        if frame.len() > COALESCE_LIMIT {
            if !buf.is_empty() {
                write_all(io, buf, stall).await?;
                buf.clear();
            }
            write_all(io, &frame, stall).await?;
        } else {
            buf.extend_from_slice(&frame);
        }
    }
    if !buf.is_empty() {
        write_all(io, buf, stall).await?;
        buf.clear();
    }
    tokio::time::timeout(stall, io.flush())
        .await
        .map_err(|_| std::io::ErrorKind::TimedOut)?
}

/// `write_all`, failing with `TimedOut` when one write makes no progress for `stall`.
async fn write_all<W: AsyncWrite + Unpin>(
    io: &mut W,
    mut data: &[u8],
    stall: Duration,
) -> std::io::Result<()> {
    while !data.is_empty() {
        let n = tokio::time::timeout(stall, io.write(data))
            .await
            .map_err(|_| std::io::ErrorKind::TimedOut)??;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        data = &data[n..];
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    /// A peer that reads steadily but slowly: the whole batch takes several times the stall
    /// limit, and still goes through, because every write makes progress.
    #[tokio::test]
    async fn a_slow_but_steady_reader_is_not_a_stall() {
        let (mut ours, mut theirs) = tokio::io::duplex(1024);
        let total = 64 * 1024;
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            let mut chunk = [0u8; 1024];
            while got.len() < total {
                tokio::time::sleep(Duration::from_millis(5)).await;
                let n = theirs.read(&mut chunk).await.unwrap();
                got.extend_from_slice(&chunk[..n]);
            }
            got
        });
        let frame = Bytes::from((0..total).map(|i| i as u8).collect::<Vec<u8>>());
        let stall = Duration::from_millis(100);
        let started = tokio::time::Instant::now();
        let mut batch = vec![frame.clone()];
        write_batch(&mut ours, &mut batch, &mut Vec::new(), stall)
            .await
            .unwrap();
        assert!(started.elapsed() > stall);
        assert_eq!(reader.await.unwrap(), frame);
    }

    /// A peer that reads nothing is a stall.
    #[tokio::test]
    async fn a_peer_that_reads_nothing_is_a_stall() {
        let (mut ours, _theirs) = tokio::io::duplex(1024);
        let mut batch = vec![Bytes::from(vec![7u8; 64 * 1024])];
        let err = write_batch(
            &mut ours,
            &mut batch,
            &mut Vec::new(),
            Duration::from_millis(50),
        )
        .await
        .unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::TimedOut);
    }
}
