//! One live pipe connection: many requests in flight both ways, heartbeats, and a clean end.
//!
//! A [`Connection`] is a cheap handle onto a connection's shared state. The work is split
//! along the connection's seams, one file each:
//!
//! - this file: the handle, calls to the peer and their pending replies, status, close and
//!   drain;
//! - `hello`: the hello exchange that opens a connection (version range and features
//!   negotiated, role checked) and the start of its tasks;
//! - `inbound`: the *reader*, which decodes frames, completes the replies this side waits
//!   for, answers pings, and spawns one task per incoming event (bounded by `max_in_flight`;
//!   the excess is answered `OVERLOADED` at once). It never waits on the writer, and it
//!   declares the peer dead when no byte has arrived for the heartbeat timeout;
//! - `writer`: the *writer*, which owns the write half, coalesces queued frames into few
//!   writes, and holds the byte budget that keeps a peer that stops reading from making this
//!   node buffer without bound.
//!
//! Every connection runs inside a `conn` tracing span (peer identity and address), and every
//! incoming request inside a `request` span (id and handler), so log lines carry them.
//!
//! When a connection ends, for whatever reason, every request still waiting on it fails at
//! once with [`CallError::PipeClosed`] and the reason.

mod hello;
mod inbound;
mod stream;
mod writer;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use restpipe_handler::{BodyError, BodyStream, Headers, Reply, Request};
use serde::Serialize;
use tokio::sync::{oneshot, Notify, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::error::CallError;
use crate::node::NodeCore;
use crate::tls::{CertSummary, PeerCert};
use crate::util::{epoch_secs, lock};
use crate::wire::{self, Message};

pub(crate) use hello::open;
pub use hello::HelloError;

static NEXT_CONNECTION_ID: AtomicU64 = AtomicU64::new(1);

type Pending = crate::util::FastMap<u64, oneshot::Sender<Result<Reply, CallError>>>;

/// Who is on the other end of a connection.
#[derive(Clone, Debug)]
pub struct PeerInfo {
    /// The peer's identity, from its certificate.
    pub identity: String,
    /// The peer's address.
    pub addr: SocketAddr,
    /// The software version the peer announced.
    pub software_version: String,
    /// The protocol version both sides speak on this connection.
    pub protocol_version: u32,
    /// The optional features both sides support.
    pub features: Vec<String>,
    /// When the connection was established.
    pub connected_at: SystemTime,
    /// The certificate the peer presented.
    pub cert: Arc<PeerCert>,
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
    /// The protocol version in use.
    pub protocol_version: u32,
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
    /// The peer's certificate: fingerprint and expiry.
    pub certificate: CertSummary,
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

/// The state a connection's handle, reader and writer share.
struct Shared {
    id: u64,
    info: PeerInfo,
    core: Arc<NodeCore>,
    /// The connection's span: every task of the connection runs inside it.
    span: tracing::Span,
    started: Instant,
    out: writer::WriteQueue,
    /// `None` once the connection is closed: nothing new can wait on it.
    pending: Mutex<Option<Pending>>,
    next_request: AtomicU64,
    closed: CancellationToken,
    close_reason: OnceLock<String>,
    draining: AtomicBool,
    inbound: Arc<Semaphore>,
    outbound: Arc<Semaphore>,
    /// Bytes of incoming events and of their replies held by this node (see
    /// [`budget_permit`]).
    inbound_bytes: Arc<Semaphore>,
    /// Bytes of outgoing events that wait for their reply.
    outbound_bytes: Arc<Semaphore>,
    peer_max_frame: usize,
    /// Whether both sides speak the `trace-context` feature (decided once, at the hello).
    trace_context: bool,
    /// Whether both sides speak the `pubsub` feature (decided once, at the hello).
    pubsub: bool,
    /// Whether bodies may be streamed and headers carried (protocol version 2 and up).
    streaming: bool,
    /// Whether both sides speak the `fine-credit` feature (decided once, at the hello): the
    /// bodies this node sends may then keep to [`wire::SHARED_WINDOW`].
    fine_credit: bool,
    /// The streamed bodies on the connection, both ways.
    streams: stream::Streams,
    last_rtt_us: AtomicU64,
    requests_sent: AtomicU64,
    requests_received: AtomicU64,
    /// Bytes of the frames queued for the writer or being written (see `writer`).
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

    /// Send `request` to the peer and wait for its reply, at most `timeout` until the reply
    /// starts (see [`Connection::call_with_body`]).
    pub async fn call(&self, request: Request, timeout: Duration) -> Result<Reply, CallError> {
        self.call_with_body(request, None, timeout).await
    }

    /// Send `request` to the peer and wait for its reply, at most `timeout` until the reply
    /// starts. With `body`, the request body is that stream instead of `request.body`, sent
    /// as it is read; a streamed reply comes back as [`Reply::stream`], whose chunks wait at
    /// most the pipe's `stream_idle_timeout` each.
    ///
    /// The request is checked as the peer will check it (grammar and bounds) before anything
    /// is sent. A release-1 peer takes no stream: the body is then read whole first, within
    /// its frame limit, and `HEAD` goes as `GET`.
    pub async fn call_with_body(
        &self,
        mut request: Request,
        mut body: Option<BodyStream>,
        timeout: Duration,
    ) -> Result<Reply, CallError> {
        let shared = &self.shared;
        if !shared.trace_context {
            // A peer that does not speak it (a release-1 node) would drop it anyway.
            request.trace = None;
        }
        let limit = shared.peer_max_frame;
        let head = shared.streaming && request.verb == "HEAD";
        if !shared.streaming {
            request.headers = Headers::default();
            // Field 13 is a version 2 addition; a release-1 peer would drop it anyway.
            request.delivery_id = None;
            if request.verb == "HEAD" {
                request.verb = "GET".into();
            }
            if let Some(body) = body.take() {
                // Boxed, like the pump below: the rare path's state stays out of every call's
                // future, which is moved whole several times per request.
                request.body = Box::pin(body.collect(limit)).await.map_err(|e| match e {
                    BodyError::TooLarge { limit } => CallError::BodyTooLarge { limit },
                    e => CallError::BodyFailed(e.to_string()),
                })?;
            }
        }
        if request.body.len() > limit {
            return Err(CallError::TooLarge {
                size: request.body.len(),
                limit,
            });
        }
        wire::check_request(&request).map_err(|e| match e {
            wire::RequestError::Grammar(m) => CallError::BadRequest(m),
            wire::RequestError::UriTooLong(m) => CallError::UriTooLong(m),
            wire::RequestError::HeaderTooLarge(m) => CallError::HeaderTooLarge(m),
        })?;
        let Ok(_permit) = shared.outbound.clone().try_acquire_owned() else {
            return Err(CallError::Overloaded(format!(
                "{} requests are already in flight to {}",
                shared.core.pipe.max_in_flight, shared.info.identity
            )));
        };
        let started = Instant::now();
        let id = shared.next_request.fetch_add(1, Ordering::Relaxed);
        let timeout_ms = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX);
        let streamed = body.as_ref().map(|b| wire::Streamed { length: b.length() });
        let frame = wire::encode(Message::Event {
            id,
            request,
            timeout_ms,
            streamed,
        });
        // The peer refuses a frame over its limit by closing the connection: refuse it here
        // instead, so that one request never drops the pipe for every other.
        let size = frame.len() - wire::PREFIX;
        let limit = shared.peer_max_frame + wire::ENVELOPE_ALLOWANCE;
        if size > limit {
            return Err(CallError::FrameTooLarge { size, limit });
        }
        let Some(_bytes) = budget_permit(&shared.outbound_bytes, frame.len()) else {
            return Err(CallError::Overloaded(format!(
                "the requests in flight to {} already hold {} bytes, the connection's budget; this one needs {}",
                shared.info.identity,
                shared.core.pipe.byte_budget(),
                frame.len()
            )));
        };
        // Registered only once the request will be sent (a refused one leaves nothing to
        // cancel), and before it is: its reply, and the peer's credit or cancel of its body,
        // may come before this task runs again.
        let (tx, rx) = oneshot::channel();
        {
            let mut pending = lock(&shared.pending);
            match pending.as_mut() {
                Some(map) => map.insert(id, tx),
                None => return Err(shared.closed_error()),
            };
        }
        let _guard = PendingGuard { shared, id };
        let pump = body.map(|body| {
            let key = (true, id);
            let (credit, stop) = shared.open_pump(key);
            Box::pin(stream::pump(self.shared.clone(), key, body, credit, stop))
        });
        shared.requests_sent.fetch_add(1, Ordering::Relaxed);
        let metrics = &shared.core.metrics;
        metrics.tick("message.send.tick");
        let exchange = async {
            shared.send(frame).await?;
            if let Some(pump) = pump {
                // On its own: the reply may start before the body is all sent.
                tokio::spawn(pump);
            }
            rx.await.map_err(|_| shared.closed_error())?
        };
        let mut result = match tokio::time::timeout(timeout, exchange).await {
            Ok(result) => result,
            Err(_) => Err(CallError::Timeout(timeout)),
        };
        if let (true, Ok(reply)) = (head, &mut result) {
            // No data follows a HEAD's reply: its stream is its length alone.
            if let Some(stream) = reply.stream.take() {
                reply.stream = Some(BodyStream::new(
                    futures_util::stream::empty(),
                    stream.length(),
                ));
            }
        }
        metrics.timing("message.send.timing", started.elapsed());
        result
    }

    /// Whether both sides speak the `pubsub` feature: only then may pub/sub frames cross.
    pub fn speaks_pubsub(&self) -> bool {
        self.shared.pubsub
    }

    /// Send a subscription (client to server; feature `pubsub`). Nothing is sent to a peer
    /// without the feature.
    pub(crate) async fn send_subscribe(
        &self,
        globs: Vec<String>,
        resume_after: String,
    ) -> Result<(), CallError> {
        if !self.shared.pubsub {
            return Ok(());
        }
        self.shared
            .send(wire::encode(Message::Subscribe {
                globs,
                resume_after,
            }))
            .await
    }

    /// Send a published event (server to client; feature `pubsub`), waiting for room in the
    /// connection's write budget: the backpressure of a subscriber that reads slowly.
    pub(crate) async fn send_published(&self, event: wire::Published) -> Result<(), CallError> {
        if !self.shared.pubsub {
            return Ok(());
        }
        self.shared
            .send(wire::encode(Message::Publish { id: 0, event }))
            .await
    }

    /// Tell the peer that something it sent without a request id (a subscription) was
    /// refused, and why.
    pub(crate) async fn send_refusal(&self, message: String) {
        self.shared
            .send_error(0, wire::ErrorKind::BadRequest, message);
    }

    /// Answer the peer's request `id` (a publish request) with `reply`.
    pub(crate) async fn send_reply(&self, id: u64, reply: Reply) -> Result<(), CallError> {
        self.shared
            .send(wire::encode(Message::Reply {
                id,
                reply,
                streamed: None,
            }))
            .await
    }

    /// Ask the server to publish `event` (client to server; feature `pubsub`) and wait at
    /// most `timeout` for its answer: a reply whose status is 202 (and body `{"id": ...}`)
    /// once the server has it, or the status of its refusal.
    pub(crate) async fn publish(
        &self,
        event: wire::Published,
        timeout: Duration,
    ) -> Result<Reply, CallError> {
        let shared = &self.shared;
        if !shared.pubsub {
            return Err(CallError::Refused(
                "the server does not speak the pubsub feature (an older release)".into(),
            ));
        }
        let frame_limit = shared.peer_max_frame + wire::ENVELOPE_ALLOWANCE;
        if event.body.len() > shared.peer_max_frame {
            return Err(CallError::TooLarge {
                size: event.body.len(),
                limit: shared.peer_max_frame,
            });
        }
        let id = shared.next_request.fetch_add(1, Ordering::Relaxed);
        let frame = wire::encode(Message::Publish { id, event });
        let size = frame.len() - wire::PREFIX;
        if size > frame_limit {
            return Err(CallError::FrameTooLarge {
                size,
                limit: frame_limit,
            });
        }
        let (tx, rx) = oneshot::channel();
        {
            let mut pending = lock(&shared.pending);
            match pending.as_mut() {
                Some(map) => map.insert(id, tx),
                None => return Err(shared.closed_error()),
            };
        }
        let _guard = PendingGuard { shared, id };
        let exchange = async {
            shared.send(frame).await?;
            rx.await.map_err(|_| shared.closed_error())?
        };
        match tokio::time::timeout(timeout, exchange).await {
            Ok(result) => result,
            Err(_) => Err(CallError::Timeout(timeout)),
        }
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
            protocol_version: s.info.protocol_version,
            connected_since: epoch_secs(s.info.connected_at),
            last_heartbeat_rtt_ms: (rtt != 0).then(|| rtt as f64 / 1000.0),
            requests_in_flight_out: max - s.outbound.available_permits() as u64,
            requests_in_flight_in: max - s.inbound.available_permits() as u64,
            requests_sent: s.requests_sent.load(Ordering::Relaxed),
            requests_received: s.requests_received.load(Ordering::Relaxed),
            certificate: s.info.cert.summary(),
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
            warn!(parent: &s.span, "requests still in flight after the grace period");
        }
        s.send_now(Message::Close(reason.to_string()));
        s.close(reason.to_string());
    }
}

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
            debug!(parent: &self.span, %reason, "connection closing");
            let metrics = &self.core.metrics;
            metrics.registry().connection_ended(self.id);
            metrics.error_event(
                "connection ended",
                &format!("{} ({}): {reason}", self.info.identity, self.info.addr),
            );
        }
        let pending = lock(&self.pending).take();
        self.closed.cancel();
        self.cut_incoming();
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

    /// Hand the answer to request `id` to whoever waits for it.
    fn complete(&self, id: u64, result: Result<Reply, CallError>) {
        let tx = lock(&self.pending).as_mut().and_then(|m| m.remove(&id));
        match tx {
            Some(tx) => {
                let _ = tx.send(result);
            }
            None => debug!(parent: &self.span, id, "reply for a request nobody waits for"),
        }
    }
}

/// Take `bytes` from a connection's byte budget at once, or `None` when it does not hold that
/// much. Each connection has two budgets, one per direction, of
/// [`PipeConfig::byte_budget`](crate::node::PipeConfig::byte_budget) bytes: what this node
/// holds for its peer, requests and replies together, is bounded by bytes as well as by count,
/// whatever the peer reads or sends.
fn budget_permit(budget: &Arc<Semaphore>, bytes: usize) -> Option<OwnedSemaphorePermit> {
    let bytes = u32::try_from(bytes).ok()?;
    budget.clone().try_acquire_many_owned(bytes).ok()
}

/// Removes a request from the pending map when its caller stops waiting, for whatever reason.
struct PendingGuard<'a> {
    shared: &'a Shared,
    id: u64,
}

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        let unanswered = lock(&self.shared.pending)
            .as_mut()
            .and_then(|map| map.remove(&self.id))
            .is_some();
        let shared = self.shared;
        if unanswered && shared.streaming && !shared.closed.is_cancelled() {
            // The caller gave up before the reply: the far node stops the handler, and this
            // end stops sending the request body.
            shared.stop_pump((true, self.id));
            shared.send_now(Message::Cancel {
                id: self.id,
                from_caller: true,
            });
        }
    }
}
