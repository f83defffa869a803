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
use restpipe_handler::{Context, HandlerError, Reply, Request};
use tokio::io::{AsyncRead, ReadBuf, ReadHalf};
use tokio::sync::OwnedSemaphorePermit;
use tokio_util::codec::{FramedRead, LengthDelimitedCodec};
use tracing::{debug, debug_span, info, warn, Instrument};

use super::{budget_permit, Shared};
use crate::error::CallError;
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
                Some(Ok(payload)) => shared.on_frame(payload.freeze()),
                Some(Err(e)) if e.kind() == std::io::ErrorKind::InvalidData => {
                    warn!(cause = %e, "frame over the size limit");
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
                    warn!(timeout = ?pipe.heartbeat_timeout, "peer silent past the heartbeat timeout");
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
    fn on_frame(self: &Arc<Self>, payload: Bytes) {
        let size = payload.len();
        let message = match wire::decode(payload) {
            Ok(message) => message,
            Err(e) => return self.on_bad_frame(e),
        };
        match message {
            Message::Event {
                id,
                request,
                timeout_ms,
            } => self.on_event(id, request, timeout_ms, size),
            Message::Reply { id, reply } => self.complete(id, Ok(reply)),
            Message::Error { id, kind, message } => {
                let result = match kind {
                    ErrorKind::Overloaded => CallError::Overloaded(message),
                    ErrorKind::ShuttingDown => CallError::ShuttingDown(message),
                    _ => CallError::Refused(message),
                };
                if id == 0 {
                    warn!(error = %result, "peer reported an error");
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
                info!(%reason, "peer closed the connection");
                self.close(format!("the peer closed the connection: {reason}"));
            }
            Message::Hello(_) => warn!("unexpected hello after the handshake ignored"),
            Message::Unknown { id } => self.send_error(
                id,
                ErrorKind::UnknownMessage,
                "this node does not know that message type".into(),
            ),
        }
    }

    /// A frame that is not protobuf, or that breaks a rule: answer or fail exactly what it
    /// concerns, and keep the connection.
    fn on_bad_frame(&self, error: DecodeError) {
        match error {
            DecodeError::Malformed(_) => {
                warn!(cause = %error, "malformed frame ignored");
                self.send_error(0, ErrorKind::BadRequest, error.to_string());
            }
            DecodeError::Invalid {
                id, what: "event", ..
            } => {
                self.requests_received.fetch_add(1, Ordering::Relaxed);
                warn!(cause = %error, "event refused");
                self.send_error(id, ErrorKind::BadRequest, error.to_string());
            }
            DecodeError::Invalid {
                id,
                what: "reply" | "error",
                ..
            } if id != 0 => {
                warn!(cause = %error, "invalid answer from the peer");
                self.complete(
                    id,
                    Err(CallError::Refused(format!("the peer's answer: {error}"))),
                );
            }
            DecodeError::Invalid { what: "close", .. } => {
                self.close(format!("the peer closed the connection ({error})"));
            }
            DecodeError::Invalid { .. } => warn!(cause = %error, "invalid frame ignored"),
        }
    }

    fn on_event(self: &Arc<Self>, id: u64, request: Request, timeout_ms: u64, size: usize) {
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
        let timeout = Duration::from_millis(timeout_ms).min(self.core.pipe.max_request_timeout);
        let ctx = Context {
            side: self.core.side,
            peer_identity: self.info.identity.clone(),
            peer_addr: Some(self.info.addr),
            request_id: id,
            deadline: Instant::now() + timeout,
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
        if let Some(trace) = &request.trace {
            span.record("request_id", tracing::field::display(trace.request_id()));
            span.record("trace_id", tracing::field::display(trace.trace_id_hex()));
        }
        let shared = Arc::clone(self);
        tokio::spawn(
            shared
                .handle(ctx, request, (permit, bytes))
                .instrument(span),
        );
    }

    /// Run the handler and send its reply. The reply is held against the connection's byte
    /// budget until it is queued for the writer; one that does not fit (the peer reads too
    /// slowly to drain the replies before it) is answered 503 instead of being held.
    async fn handle(
        self: Arc<Self>,
        ctx: Context,
        request: Request,
        mut permits: (OwnedSemaphorePermit, OwnedSemaphorePermit),
    ) {
        let id = ctx.request_id;
        let reply = tokio::select! {
            reply = self.core.dispatch(ctx, request) => reply,
            _ = self.closed.cancelled() => return,
        };
        let reply = match self.admit_reply(reply) {
            Ok((reply, more)) => {
                permits.1.merge(more);
                reply
            }
            Err(refusal) => refusal,
        };
        debug!(code = reply.code, status = reply.status, "handled");
        let _ = self.send(wire::encode(Message::Reply { id, reply })).await;
    }

    /// A handler's reply as it may be sent, with the budget it holds; or, when it may not be
    /// sent, the error reply that replaces it. Taking the reply by value means a refused one is
    /// freed here, not held while its replacement waits for the writer.
    fn admit_reply(&self, reply: Reply) -> Result<(Reply, OwnedSemaphorePermit), Reply> {
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
