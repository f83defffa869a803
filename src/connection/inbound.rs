//! The reader of a connection: frames in, each one dispatched to what it concerns.
//!
//! It completes the replies this side waits for, answers pings, and spawns one task per
//! incoming event, bounded by `max_in_flight` (the excess is answered `OVERLOADED` at once).
//! It never waits on the writer, so a slow handler or a full write queue never delays
//! heartbeats or other replies. It sends this side's heartbeats, and declares the peer dead
//! when no byte has arrived for the heartbeat timeout: bytes, not whole frames, so a large
//! frame crossing a slow link is progress, not silence.

use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::StreamExt;
use restpipe_handler::{BodyError, BodyStream, Context, HandlerError, Reply, Request};
use tokio::io::{AsyncRead, ReadBuf, ReadHalf};
use tokio::sync::OwnedSemaphorePermit;
use tokio_util::codec::{FramedRead, LengthDelimitedCodec};
use tokio_util::sync::CancellationToken;
use tracing::{debug, debug_span, info, warn, Instrument};

use super::{budget_permit, stream, Shared};
use crate::error::CallError;
use crate::util::lock;
use crate::wire::{self, DecodeError, ErrorKind, Message};

/// The frame stream of a connection's read half.
pub(super) type Reader<S> = FramedRead<Progress<ReadHalf<S>>, LengthDelimitedCodec>;

/// A reader that remembers when bytes last arrived. The heartbeat timeout is measured from
/// there, so that a peer busy sending one large frame over a slow link is not taken for a
/// silent one (no whole frame may arrive for longer than the timeout).
pub(super) struct Progress<R> {
    inner: R,
    last: tokio::time::Instant,
}

impl<R> Progress<R> {
    pub(super) fn new(inner: R) -> Self {
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

/// Read frames until the connection ends; returns the reason when the end was found here.
pub(super) async fn read_loop<S: AsyncRead>(
    shared: &Arc<Shared>,
    mut reader: Reader<S>,
) -> Option<String> {
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
                Some(Ok(payload)) => {
                    if let Some(reason) = shared.on_frame(payload.freeze()) {
                        warn!(parent: &shared.span, %reason, "protocol broken by the peer");
                        return Some(reason);
                    }
                }
                Some(Err(e)) if e.kind() == std::io::ErrorKind::InvalidData => {
                    warn!(parent: &shared.span, cause = %e, "frame over the size limit");
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
                shared.send_now(Message::Ping(nonce));
            }
            _ = &mut dead_line => {
                let due = reader.get_ref().last + pipe.heartbeat_timeout;
                if tokio::time::Instant::now() >= due {
                    shared.core.metrics.heartbeat_failed();
                    warn!(parent: &shared.span, timeout = ?pipe.heartbeat_timeout, "peer silent past the heartbeat timeout");
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

impl Shared {
    /// Handle one frame; returns the reason to end the connection when the peer broke the
    /// protocol so that it cannot go on.
    fn on_frame(self: &Arc<Self>, payload: Bytes) -> Option<String> {
        let size = payload.len();
        let message = match wire::decode(payload) {
            Ok(message) => message,
            Err(e) => {
                self.on_bad_frame(e);
                return None;
            }
        };
        match message {
            Message::Event {
                id,
                request,
                timeout_ms,
                streamed,
            } => self.on_event(id, request, timeout_ms, streamed, size),
            Message::Reply {
                id,
                reply,
                streamed,
            } => self.on_reply(id, reply, streamed),
            Message::Data { .. } | Message::Credit { .. } | Message::Cancel { .. }
                if !self.streaming =>
            {
                return Some(
                    "the peer sent a frame of protocol version 2 on a version 1 connection".into(),
                );
            }
            Message::Data {
                id,
                from_caller,
                chunk,
                end,
            } => return self.on_data((from_caller, id), chunk, end).err(),
            Message::Credit {
                id,
                from_caller,
                bytes,
            } => self.on_credit(id, from_caller, bytes),
            Message::Cancel { id, from_caller } => self.on_cancel(id, from_caller),
            Message::Subscribe { .. } | Message::Publish { .. } if !self.pubsub => {
                return Some(
                    "the peer sent a pub/sub frame on a connection without the pubsub feature"
                        .into(),
                );
            }
            Message::Subscribe {
                globs,
                resume_after,
            } => return self.on_subscribe(globs, resume_after),
            Message::Publish { id, event } => return self.on_publish(id, event),
            Message::Error { id, kind, message } => {
                let result = match kind {
                    ErrorKind::Overloaded => CallError::Overloaded(message),
                    ErrorKind::ShuttingDown => CallError::ShuttingDown(message),
                    _ => CallError::Refused(message),
                };
                if id == 0 {
                    warn!(parent: &self.span, error = %result, "peer reported an error");
                } else {
                    self.complete(id, Err(result));
                }
            }
            Message::Ping(nonce) => self.send_now(Message::Pong(nonce)),
            Message::Pong(nonce) => {
                let now = self.started.elapsed().as_micros() as u64;
                let rtt = now.saturating_sub(nonce).max(1);
                self.last_rtt_us.store(rtt, Ordering::Relaxed);
                self.core.metrics.heartbeat_ok(Duration::from_micros(rtt));
                if !self.closed.is_cancelled() {
                    self.core.metrics.registry().rtt_sample(
                        self.id,
                        &self.info.identity,
                        &self.info.addr.to_string(),
                        Duration::from_micros(rtt),
                    );
                }
            }
            Message::Close(reason) => {
                info!(parent: &self.span, %reason, "peer closed the connection");
                self.close(format!("the peer closed the connection: {reason}"));
            }
            Message::Hello(_) => {
                warn!(parent: &self.span, "unexpected hello after the handshake ignored")
            }
            Message::Unknown { id } => self.send_error(
                id,
                ErrorKind::UnknownMessage,
                "this node does not know that message type".into(),
            ),
        }
        None
    }

    /// A client's subscription (feature `pubsub`): handed to the server's hub, which starts
    /// sending it what it subscribed to. Only a client subscribes.
    fn on_subscribe(self: &Arc<Self>, globs: Vec<String>, resume_after: String) -> Option<String> {
        if self.core.side != restpipe_handler::Side::Server {
            return Some("the server sent a subscribe frame".into());
        }
        match self.core.pubsub.get() {
            Some(hub) => hub.subscribe(self.connection(), globs, resume_after),
            None => self.send_error(
                0,
                ErrorKind::BadRequest,
                "this server has no publish/subscribe hub".into(),
            ),
        }
        None
    }

    /// A publish frame: on the server, a client's publish request (answered by the hub with
    /// a reply of the same id); on a client, an event the server sends.
    fn on_publish(self: &Arc<Self>, id: u64, event: wire::Published) -> Option<String> {
        let Some(hub) = self.core.pubsub.get() else {
            if id != 0 {
                self.send_error(
                    id,
                    ErrorKind::BadRequest,
                    "this node has no publish/subscribe hub".into(),
                );
            }
            return None;
        };
        match (self.core.side, id) {
            (restpipe_handler::Side::Server, 0) => {
                Some("the client sent a published event without a request id".into())
            }
            (restpipe_handler::Side::Server, id) => {
                hub.publish_from_client(self.connection(), id, event);
                None
            }
            (restpipe_handler::Side::Client, 0) => {
                hub.received(event);
                None
            }
            (restpipe_handler::Side::Client, _) => Some("the server sent a publish request".into()),
        }
    }

    /// A handle onto this connection.
    fn connection(self: &Arc<Self>) -> super::Connection {
        super::Connection {
            shared: Arc::clone(self),
        }
    }

    /// The reply to one of this side's requests: handed to its caller, with its body's
    /// receiving end opened first when the body follows in data frames.
    fn on_reply(self: &Arc<Self>, id: u64, mut reply: Reply, streamed: Option<wire::Streamed>) {
        let tx = lock(&self.pending).as_mut().and_then(|m| m.remove(&id));
        let Some(tx) = tx else {
            debug!(parent: &self.span, id, "reply for a request nobody waits for");
            if streamed.is_some() {
                self.send_now(Message::Cancel {
                    id,
                    from_caller: true,
                });
            }
            return;
        };
        if let Some(s) = streamed {
            reply.stream = Some(self.open_incoming((false, id), s.length, None));
        }
        // A caller gone in between drops the reply, and with it the body's receiving end,
        // which cancels the request.
        let _ = tx.send(Ok(reply));
    }

    /// A frame that is not protobuf, or that breaks a rule: answer or fail exactly what it
    /// concerns, and keep the connection.
    fn on_bad_frame(&self, error: DecodeError) {
        match error {
            DecodeError::Malformed(_) => {
                warn!(parent: &self.span, cause = %error, "malformed frame ignored");
                self.send_error(0, ErrorKind::BadRequest, error.to_string());
            }
            DecodeError::Invalid {
                id, what: "event", ..
            } => {
                self.requests_received.fetch_add(1, Ordering::Relaxed);
                warn!(parent: &self.span, cause = %error, "event refused");
                self.send_error(id, ErrorKind::BadRequest, error.to_string());
            }
            DecodeError::Invalid {
                id,
                what: "reply" | "error",
                ..
            } if id != 0 => {
                warn!(parent: &self.span, cause = %error, "invalid answer from the peer");
                self.complete(
                    id,
                    Err(CallError::Refused(format!("the peer's answer: {error}"))),
                );
            }
            DecodeError::Invalid {
                id,
                what: "publish",
                ..
            } if id != 0 => {
                warn!(parent: &self.span, cause = %error, "publish request refused");
                self.send_error(id, ErrorKind::BadRequest, error.to_string());
            }
            DecodeError::Invalid {
                what: "subscribe", ..
            } => {
                warn!(parent: &self.span, cause = %error, "subscription refused");
                self.send_error(0, ErrorKind::BadRequest, error.to_string());
            }
            DecodeError::Invalid { what: "close", .. } => {
                self.close(format!("the peer closed the connection ({error})"));
            }
            DecodeError::Invalid { .. } => {
                warn!(parent: &self.span, cause = %error, "invalid frame ignored")
            }
        }
    }

    fn on_event(
        self: &Arc<Self>,
        id: u64,
        request: Request,
        timeout_ms: u64,
        streamed: Option<wire::Streamed>,
        size: usize,
    ) {
        self.requests_received.fetch_add(1, Ordering::Relaxed);
        self.core.metrics.tick("message.receive.tick");
        if self.draining.load(Ordering::Acquire) {
            return self.send_error(id, ErrorKind::ShuttingDown, "node is shutting down".into());
        }
        let Ok(permit) = self.inbound.clone().try_acquire_owned() else {
            return self.send_error(
                id,
                ErrorKind::Overloaded,
                format!(
                    "more than {} requests in flight on this connection",
                    self.core.pipe.max_in_flight
                ),
            );
        };
        let Some(bytes) = budget_permit(&self.inbound_bytes, size) else {
            return self.send_error(
                id,
                ErrorKind::Overloaded,
                format!(
                    "the requests in flight on this connection already hold {} bytes, its budget",
                    self.core.pipe.byte_budget()
                ),
            );
        };
        if !self.streaming && streamed.is_some() {
            return self.send_error(
                id,
                ErrorKind::BadRequest,
                "a streamed body on a version 1 connection".into(),
            );
        }
        let max_body = self.core.pipe.max_body;
        if let Some(length) = streamed.and_then(|s| s.length).filter(|&n| n > max_body) {
            // Refused before the handler runs; the body's frames that follow find no sink
            // and are credited back.
            let reply = HandlerError::new(format!(
                "the request body of {length} bytes is over this node's limit of {max_body} bytes"
            ))
            .with_class("BodyTooLarge")
            .with_status(413)
            .into_reply();
            let shared = Arc::clone(self);
            tokio::spawn(async move {
                let _ = shared
                    .send(wire::encode(Message::Reply {
                        id,
                        reply,
                        streamed: None,
                    }))
                    .await;
                drop((permit, bytes));
            });
            self.send_now(Message::Cancel {
                id,
                from_caller: false,
            });
            return;
        }
        let body = streamed.map(|s| self.open_incoming((true, id), s.length, Some(max_body)));
        let timeout = Duration::from_millis(timeout_ms).min(self.core.pipe.max_request_timeout);
        let ctx = Context {
            side: self.core.side,
            peer_identity: self.info.identity.clone(),
            peer_addr: Some(self.info.addr),
            request_id: id,
            deadline: Instant::now() + timeout,
            delivery_id: request.delivery_id.clone(),
            event_id: None,
        };
        // Debug level, like the front door's: see `http::guard`.
        let span = debug_span!(
            parent: &self.span,
            "request",
            id,
            handler = %request.handler_name(),
            request_id = tracing::field::Empty,
            trace_id = tracing::field::Empty,
        );
        if let Some(trace) = request.trace.as_ref().filter(|_| !span.is_disabled()) {
            span.record("request_id", tracing::field::display(trace.request_id()));
            span.record("trace_id", tracing::field::display(trace.trace_id_str()));
        }
        let cancel = self.start_handling(id);
        let shared = Arc::clone(self);
        // Boxed before it is spawned: the task then holds a pointer, not the whole future,
        // which it would otherwise copy as it starts and again as it ends (measured with
        // callgrind: docs/PERFORMANCE.md).
        tokio::spawn(Box::pin(
            shared
                .handle(ctx, request, body, cancel, (permit, bytes))
                .instrument(span),
        ));
    }

    /// Run the handler and send its reply. The reply is held against the connection's byte
    /// budget until it is queued for the writer; one that does not fit (the peer reads too
    /// slowly to drain the replies before it) is answered 503 instead of being held.
    ///
    /// A streamed reply (version 2) is sent as its head, then its body within the flow
    /// control; the request's permits are held until the body is all sent, so that
    /// `max_in_flight` bounds the bodies being sent too. `cancel` stops it all when the caller
    /// gives up or the connection ends.
    async fn handle(
        self: Arc<Self>,
        ctx: Context,
        request: Request,
        body: Option<BodyStream>,
        cancel: CancellationToken,
        mut permits: (OwnedSemaphorePermit, OwnedSemaphorePermit),
    ) {
        let id = ctx.request_id;
        let head_only = request.verb == "HEAD";
        let reply = tokio::select! {
            reply = self.core.dispatch(ctx, request, body) => Some(reply),
            _ = cancel.cancelled() => None,
            _ = self.closed.cancelled() => None,
        };
        let Some(mut reply) = reply else {
            debug!("cancelled by the caller before its reply");
            return self.end_handling(id);
        };
        if head_only {
            // No body answers a HEAD; its length, when known, still says what a GET would get.
            reply.body = Bytes::new();
            reply.stream = reply
                .stream
                .take()
                .map(|s| BodyStream::new(futures_util::stream::empty(), s.length()));
        }
        let stream = match reply.stream.take() {
            Some(stream) if self.streaming => Some(stream),
            Some(stream) => {
                // A release-1 peer takes the body whole, within its frame limit.
                match Box::pin(stream.collect(self.peer_max_frame)).await {
                    Ok(body) => reply.body = body,
                    Err(e) => reply = body_failed_reply(e),
                }
                None
            }
            None => None,
        };
        let reply = match self.admit_reply(reply) {
            Ok((reply, more)) => {
                permits.1.merge(more);
                reply
            }
            Err(refusal) => refusal,
        };
        debug!(
            code = reply.code,
            status = reply.status,
            streamed = stream.is_some(),
            "handled"
        );
        let Some(stream) = stream else {
            let _ = self
                .send(wire::encode(Message::Reply {
                    id,
                    reply,
                    streamed: None,
                }))
                .await;
            return self.end_handling(id);
        };
        // Boxed: a streamed reply's state stays out of the future of every small request.
        Box::pin(self.send_streamed_reply(id, reply, stream, head_only, cancel)).await;
    }

    /// Send a reply whose body follows in data frames: its head, then the body within the
    /// flow control, until it ends or `cancel` stops it.
    async fn send_streamed_reply(
        self: &Arc<Self>,
        id: u64,
        reply: Reply,
        stream: BodyStream,
        head_only: bool,
        cancel: CancellationToken,
    ) {
        let key = (false, id);
        let (credit, stop) = self.open_pump(key);
        let streamed = Some(wire::Streamed {
            length: stream.length(),
        });
        let head = wire::encode(Message::Reply {
            id,
            reply,
            streamed,
        });
        // A HEAD's body is its length alone: the caller expects no data frame.
        if self.send(head).await.is_ok() && !head_only {
            let pump = stream::pump(self.clone(), key, stream, credit, stop.clone());
            // The pump's own token follows the connection's.
            tokio::select! {
                _ = pump => {}
                _ = cancel.cancelled() => stop.cancel(),
            }
        }
        self.stop_pump(key);
        self.end_handling(id);
    }

    /// A handler's reply as it may be sent, with the budget it holds; or, when it may not be
    /// sent, the error reply that replaces it. Taking the reply by value means a refused one is
    /// freed here, not held while its replacement waits for the writer.
    fn admit_reply(&self, reply: Reply) -> Result<(Reply, OwnedSemaphorePermit), Reply> {
        if reply.headers.len() > restpipe_handler::headers::MAX_COUNT {
            return Err(HandlerError::new("the reply has too many headers")
                .with_class("ReplyInvalid")
                .into_reply());
        }
        if reply.body.len() > self.peer_max_frame {
            return Err(HandlerError::new(format!(
                "reply body of {} bytes is over the limit of {} bytes",
                reply.body.len(),
                self.peer_max_frame
            ))
            .with_class("ReplyTooLarge")
            .into_reply());
        }
        if reply.content_type.len() > wire::limits::CONTENT_TYPE {
            return Err(HandlerError::new(format!(
                "the reply's content type is {} bytes, longer than {}",
                reply.content_type.len(),
                wire::limits::CONTENT_TYPE
            ))
            .with_class("ReplyInvalid")
            .into_reply());
        }
        let held = reply.body.len() + reply.content_type.len();
        match budget_permit(&self.inbound_bytes, held) {
            Some(permit) => Ok((reply, permit)),
            None => Err(HandlerError::new(format!(
                "the reply of {held} bytes does not fit in the {} bytes this connection may hold for a peer that reads slowly",
                self.core.pipe.byte_budget()
            ))
            .with_class("Overloaded")
            .with_status(503)
            .into_reply()),
        }
    }
}

/// The reply that replaces a handler's streamed reply that could not be read whole for a
/// release-1 peer.
fn body_failed_reply(err: BodyError) -> Reply {
    let status = match err {
        BodyError::TooLarge { .. } => 502,
        _ => 500,
    };
    HandlerError::new(format!(
        "the reply could not be sent whole to a release-1 peer: {err}"
    ))
    .with_class("ReplyTooLarge")
    .with_status(status)
    .into_reply()
}
