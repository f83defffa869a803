//! Streamed bodies on a connection (protocol version 2): a body of any size crosses as
//! [`Message::Data`] frames, with credit-based flow control per body and per connection, both
//! ways, and either end may stop it.
//!
//! - The *sending* end of a body is a [`pump`]: it reads the [`BodyStream`] a caller or a
//!   handler gave, cuts it into chunks of at most [`wire::DATA_CHUNK`] bytes, and sends each one
//!   only once it holds credit for it, on the body ([`wire::STREAM_WINDOW`]) and on the
//!   connection ([`wire::CONNECTION_WINDOW`]). A body that fails mid-way ends with an aborted
//!   last frame, never with a normal end.
//! - While another request has started on the connection within [`SHARED_HOLD`], and the
//!   peer speaks [`wire::FINE_CREDIT`], a pump keeps at most [`wire::SHARED_WINDOW`] in flight,
//!   in chunks of [`wire::SHARED_CHUNK`]: every frame sent after its data waits behind the
//!   data already in the TCP stream, so a whole window there would hold other requests'
//!   events and replies back by as long as the window takes to cross. A body alone on its
//!   connection uses the whole window.
//! - The *receiving* end is an [`Incoming`] stream, which the reader fills and the front door
//!   or the handler reads. Credit goes back to the sender as the chunks are *read*, not as they
//!   arrive, so what this node holds of a body is bounded by its window whatever its size. A
//!   peer that sends past a window breaks the protocol, and the connection ends.
//! - Dropping an [`Incoming`] before its end sends a [`Message::Cancel`]: the caller's
//!   cancels the request on the far node (its handler and its reply stop), the handler's stops
//!   the caller's pump.
//!
//! Bodies are keyed by `(from_caller, id)`: the request body of request `id` when
//! `from_caller`, its reply body otherwise. Ids are the caller's, so `id` alone names a request
//! only together with who opened it, which `from_caller` and the direction of the frame say.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::Stream;
use restpipe_handler::{BodyError, BodyStream};
use tokio::sync::{mpsc, Semaphore};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::Shared;
use crate::util::lock;
use crate::wire::{self, DataEnd, Message};

/// How long a body being sent keeps to [`wire::SHARED_WINDOW`] after another request started
/// on its connection: calls that come closer together than this find little of the body
/// ahead of them.
pub(super) const SHARED_HOLD: Duration = Duration::from_secs(1);

/// Credit on the connection is sent back in batches of this much.
const CONNECTION_CREDIT_BATCH: u64 = wire::CONNECTION_WINDOW / 8;

/// A body's key on its connection: `(from_caller, id)`.
pub(super) type Key = (bool, u64);

/// The streamed bodies of one connection.
pub(super) struct Streams {
    /// Bodies arriving: where the reader hands their chunks.
    sinks: Mutex<HashMap<Key, Sink>>,
    /// Bodies leaving: their credit, and the token that stops their pump.
    pumps: Mutex<HashMap<Key, PumpControl>>,
    /// Requests from the peer being handled, by id: cancelled when the caller gives up.
    handling: Mutex<crate::util::FastMap<u64, CancellationToken>>,
    /// Credit to send data on the connection, in bytes.
    send_credit: Arc<Semaphore>,
    /// Bytes received on the connection and not yet read.
    unread: AtomicU64,
    /// Bytes read and not yet credited back on the connection.
    uncredited: AtomicU64,
}

impl Default for Streams {
    fn default() -> Self {
        Streams {
            sinks: Mutex::default(),
            pumps: Mutex::default(),
            handling: Mutex::default(),
            send_credit: Arc::new(Semaphore::new(wire::CONNECTION_WINDOW as usize)),
            unread: AtomicU64::new(0),
            uncredited: AtomicU64::new(0),
        }
    }
}

/// Where the reader puts the chunks of one arriving body.
struct Sink {
    tx: mpsc::UnboundedSender<Result<Bytes, BodyError>>,
    /// Bytes received and not yet read, shared with the reading [`Incoming`].
    unread: Arc<AtomicU64>,
}

/// What a leaving body has seen of the other requests on its connection, from the
/// connection's count of requests started (see [`Shared::shares_connection`]).
struct Others {
    seen: u64,
    /// When the body last saw that count change.
    last_seen_start: Option<Instant>,
}

/// What controls one leaving body.
#[derive(Clone)]
struct PumpControl {
    credit: Arc<Semaphore>,
    stop: CancellationToken,
}

/// The receiving end of a streamed body, as a stream of chunks. See the module docs.
pub(super) struct Incoming {
    shared: Arc<Shared>,
    key: Key,
    rx: mpsc::UnboundedReceiver<Result<Bytes, BodyError>>,
    unread: Arc<AtomicU64>,
    /// Bytes read since credit was last sent for this body.
    to_credit: u64,
    /// Bytes read in all, and the length the sender announced.
    read: u64,
    length: Option<u64>,
    /// The most this end takes, when bounded.
    limit: Option<u64>,
    /// How long a read may wait for the next chunk.
    idle: Duration,
    sleep: Pin<Box<tokio::time::Sleep>>,
    /// Ended (normally or not): nothing to cancel when dropped.
    finished: bool,
}

impl Shared {
    /// Requests started on this connection so far, both ways.
    fn requests_started(&self) -> u64 {
        self.requests_sent.load(Ordering::Relaxed) + self.requests_received.load(Ordering::Relaxed)
    }

    /// Whether the body that `others` watches shares the connection now: another request
    /// started after it began, within [`SHARED_HOLD`], and the peer credits in steps small
    /// enough for the shared window.
    fn shares_connection(&self, others: &mut Others) -> bool {
        if !self.fine_credit {
            return false;
        }
        let started = self.requests_started();
        if started != others.seen {
            others.seen = started;
            others.last_seen_start = Some(Instant::now());
        }
        others
            .last_seen_start
            .is_some_and(|at| at.elapsed() < SHARED_HOLD)
    }

    /// Open the receiving end of body `key`, before the frame that announces it is handed
    /// on, so that no chunk of it can arrive unannounced.
    pub(super) fn open_incoming(
        self: &Arc<Self>,
        key: Key,
        length: Option<u64>,
        limit: Option<u64>,
    ) -> BodyStream {
        let (tx, rx) = mpsc::unbounded_channel();
        let unread = Arc::new(AtomicU64::new(0));
        lock(&self.streams.sinks).insert(
            key,
            Sink {
                tx,
                unread: unread.clone(),
            },
        );
        let idle = self.core.pipe.stream_idle_timeout;
        let incoming = Incoming {
            shared: self.clone(),
            key,
            rx,
            unread,
            to_credit: 0,
            read: 0,
            length,
            limit,
            idle,
            sleep: Box::pin(tokio::time::sleep(idle)),
            finished: false,
        };
        BodyStream::new(incoming, length)
    }

    /// A [`Message::Data`] frame from the peer. Returns the reason to end the connection when
    /// the peer broke flow control.
    pub(super) fn on_data(&self, key: Key, chunk: Bytes, end: DataEnd) -> Result<(), String> {
        let len = chunk.len() as u64;
        let streams = &self.streams;
        let held = streams.unread.fetch_add(len, Ordering::AcqRel) + len;
        if held > wire::CONNECTION_WINDOW {
            return Err(format!(
                "the peer sent {held} bytes of bodies not yet read, past the connection's window of {}",
                wire::CONNECTION_WINDOW
            ));
        }
        let mut sinks = lock(&streams.sinks);
        let Some(sink) = sinks.get(&key) else {
            drop(sinks);
            // A body this end stopped reading (its cancel crossed this frame): the bytes
            // still count on the connection, so credit them back at once.
            self.consumed(len);
            return Ok(());
        };
        if len > 0 {
            let unread = sink.unread.fetch_add(len, Ordering::AcqRel) + len;
            if unread > wire::STREAM_WINDOW {
                return Err(format!(
                    "the peer sent {unread} bytes of one body not yet read, past its window of {}",
                    wire::STREAM_WINDOW
                ));
            }
            // A receiver that is gone will find its sink removed by its own drop.
            let _ = sink.tx.send(Ok(chunk));
        }
        match end {
            DataEnd::More => {}
            DataEnd::Done => {
                sinks.remove(&key);
            }
            DataEnd::Aborted(why) => {
                if let Some(sink) = sinks.remove(&key) {
                    let _ = sink
                        .tx
                        .send(Err(BodyError::Aborted(format!("the sender: {why}"))));
                }
            }
        }
        Ok(())
    }

    /// `bytes` of bodies were read (or dropped unread): room on the connection again.
    fn consumed(&self, bytes: u64) {
        let streams = &self.streams;
        let _ = streams
            .unread
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |u| {
                Some(u.saturating_sub(bytes))
            });
        let owed = streams.uncredited.fetch_add(bytes, Ordering::AcqRel) + bytes;
        if owed >= CONNECTION_CREDIT_BATCH
            && streams
                .uncredited
                .compare_exchange(owed, 0, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            self.send_now(Message::Credit {
                id: 0,
                from_caller: false,
                bytes: owed,
            });
        }
    }

    /// A [`Message::Credit`] from the peer: room to send more. Credit past a window is cut to
    /// the window (a peer cannot make this node send more than the window allows at once).
    pub(super) fn on_credit(&self, id: u64, from_caller: bool, bytes: u64) {
        let (credit, window) = if id == 0 {
            (self.streams.send_credit.clone(), wire::CONNECTION_WINDOW)
        } else {
            // Credit from the caller is for the reply body this end sends.
            let key = (!from_caller, id);
            match lock(&self.streams.pumps).get(&key) {
                Some(pump) => (pump.credit.clone(), wire::STREAM_WINDOW),
                None => return,
            }
        };
        let room = window.saturating_sub(credit.available_permits() as u64);
        let add = bytes.min(room) as usize;
        if add > 0 {
            credit.add_permits(add);
        }
    }

    /// A [`Message::Cancel`] from the peer.
    pub(super) fn on_cancel(&self, id: u64, from_caller: bool) {
        if from_caller {
            // The caller of request `id` gave up: stop its handler and its reply body.
            if let Some(token) = lock(&self.streams.handling).remove(&id) {
                token.cancel();
            }
            if let Some(pump) = lock(&self.streams.pumps).remove(&(false, id)) {
                pump.stop.cancel();
            }
        } else if let Some(pump) = lock(&self.streams.pumps).remove(&(true, id)) {
            // The handler of our request `id` reads no more of its body.
            pump.stop.cancel();
        }
    }

    /// Register request `id` from the peer as being handled: the token is cancelled when the
    /// caller cancels it. (Not a child of the connection's token, which costs a lock on a
    /// tree shared by every request: the handler watches both.)
    pub(super) fn start_handling(&self, id: u64) -> CancellationToken {
        let token = CancellationToken::new();
        lock(&self.streams.handling).insert(id, token.clone());
        token
    }

    /// Request `id` from the peer is answered, body and all.
    pub(super) fn end_handling(&self, id: u64) {
        lock(&self.streams.handling).remove(&id);
    }

    /// Register the leaving body `key` before the frame that announces it is sent, so that
    /// its credit and its cancel find it.
    pub(super) fn open_pump(&self, key: Key) -> (Arc<Semaphore>, CancellationToken) {
        let control = PumpControl {
            credit: Arc::new(Semaphore::new(wire::STREAM_WINDOW as usize)),
            stop: self.closed.child_token(),
        };
        let out = (control.credit.clone(), control.stop.clone());
        lock(&self.streams.pumps).insert(key, control);
        out
    }

    /// Stop the leaving body `key`, if it is still going.
    pub(super) fn stop_pump(&self, key: Key) {
        if let Some(pump) = lock(&self.streams.pumps).remove(&key) {
            pump.stop.cancel();
        }
    }

    /// The reading end of body `key` is gone before its end: tell the sender to stop, and
    /// give back the connection room its unread bytes held.
    fn incoming_dropped(&self, key: Key, unread: u64) {
        let known = lock(&self.streams.sinks).remove(&key).is_some();
        if unread > 0 {
            self.consumed(unread);
        }
        if known && !self.closed.is_cancelled() {
            // We received this body: the sender is the other party, so the cancel comes
            // from the side opposite to the body's.
            self.send_now(Message::Cancel {
                id: key.1,
                from_caller: !key.0,
            });
        }
    }
}

impl Incoming {
    fn credit(&mut self, len: u64) {
        let shared = &self.shared;
        let _ = self
            .unread
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |u| {
                Some(u.saturating_sub(len))
            });
        shared.consumed(len);
        self.to_credit += len;
        if self.to_credit >= wire::CREDIT_STEP {
            shared.send_now(Message::Credit {
                id: self.key.1,
                from_caller: !self.key.0,
                bytes: self.to_credit,
            });
            self.to_credit = 0;
        }
    }

    /// End the stream with an error (after which it yields nothing), dropping what it holds.
    fn fail(&mut self, err: BodyError) -> Poll<Option<Result<Bytes, BodyError>>> {
        self.finished = true;
        let unread = self.unread.swap(0, Ordering::AcqRel);
        self.rx.close();
        self.shared.incoming_dropped(self.key, unread);
        Poll::Ready(Some(Err(err)))
    }
}

impl Stream for Incoming {
    type Item = Result<Bytes, BodyError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.finished {
            return Poll::Ready(None);
        }
        match self.rx.poll_recv(cx) {
            Poll::Ready(Some(Ok(chunk))) => {
                let len = chunk.len() as u64;
                self.credit(len);
                self.read += len;
                if let Some(limit) = self.limit.filter(|&l| self.read > l) {
                    return self.fail(BodyError::TooLarge { limit });
                }
                if self.length.is_some_and(|n| self.read > n) {
                    return self.fail(BodyError::Aborted(
                        "the sender sent more than the length it announced".into(),
                    ));
                }
                let deadline = tokio::time::Instant::now() + self.idle;
                self.sleep.as_mut().reset(deadline);
                Poll::Ready(Some(Ok(chunk)))
            }
            Poll::Ready(Some(Err(err))) => {
                self.finished = true;
                Poll::Ready(Some(Err(err)))
            }
            Poll::Ready(None) => {
                // The sink is dropped after an error item (which came first) or at a normal
                // end.
                self.finished = true;
                match self.length {
                    Some(n) if self.read != n => {
                        Poll::Ready(Some(Err(BodyError::Aborted(format!(
                            "the body ended after {} of the {n} bytes announced",
                            self.read
                        )))))
                    }
                    _ => Poll::Ready(None),
                }
            }
            Poll::Pending => {
                if std::future::Future::poll(self.sleep.as_mut(), cx).is_ready() {
                    let idle = self.idle;
                    return self.fail(BodyError::Aborted(format!(
                        "no byte of the body arrived for {idle:?}"
                    )));
                }
                Poll::Pending
            }
        }
    }
}

impl Drop for Incoming {
    fn drop(&mut self) {
        if !self.finished {
            let unread = self.unread.swap(0, Ordering::AcqRel);
            self.shared.incoming_dropped(self.key, unread);
        } else {
            lock(&self.shared.streams.sinks).remove(&self.key);
        }
    }
}

impl Shared {
    /// The error a body being received gets when its connection ends under it.
    fn body_cut(&self) -> BodyError {
        BodyError::Aborted(
            self.close_reason
                .get()
                .cloned()
                .unwrap_or_else(|| "the connection closed".into()),
        )
    }

    /// Fail every body still arriving on a connection that ends: their readers see an
    /// incomplete body, never a normal end.
    pub(super) fn cut_incoming(&self) {
        let sinks: Vec<Sink> = lock(&self.streams.sinks).drain().map(|(_, s)| s).collect();
        for sink in sinks {
            let _ = sink.tx.send(Err(self.body_cut()));
        }
    }
}

/// Wait for the credit to send the next piece of a body, of at most `len` bytes, and take
/// it; returns the piece's length. While the body shares its connection (see the module docs)
/// the piece is at most [`wire::SHARED_CHUNK`], and it waits until at most
/// [`wire::SHARED_WINDOW`] is in flight with it, by taking the rest of the window too and
/// giving it straight back. Sharing that starts or ends during the wait makes it decide again.
async fn room(
    shared: &Shared,
    credit: &Semaphore,
    others: &mut Others,
    len: usize,
) -> Result<u32, tokio::sync::AcquireError> {
    let n = loop {
        let sharing = shared.shares_connection(others);
        let (most, spare) = if sharing {
            (
                wire::SHARED_CHUNK,
                wire::STREAM_WINDOW - wire::SHARED_WINDOW,
            )
        } else {
            (wire::DATA_CHUNK, 0)
        };
        // At most DATA_CHUNK: fits.
        let n = len.min(most) as u32;
        let mut held = credit.acquire_many(n + spare as u32).await?;
        if sharing != shared.shares_connection(others) {
            continue;
        }
        if let Some(used) = held.split(n as usize) {
            used.forget();
        }
        break n;
    };
    shared.streams.send_credit.acquire_many(n).await?.forget();
    Ok(n)
}

/// Send `body` as body `key`, chunk by chunk within the credit it is given, until its end, a
/// failure of its source (an aborted last frame), or `stop` (the peer cancelled it, or the
/// connection ended). `credit` and `stop` come from [`Shared::open_pump`].
pub(super) async fn pump(
    shared: Arc<Shared>,
    key: Key,
    mut body: BodyStream,
    credit: Arc<Semaphore>,
    stop: CancellationToken,
) {
    let (from_caller, id) = key;
    let length = body.length();
    let mut others = Others {
        seen: shared.requests_started(),
        last_seen_start: None,
    };
    let mut sent = 0u64;
    let end = loop {
        let next = tokio::select! {
            next = body.chunk() => next,
            _ = stop.cancelled() => break None,
        };
        let mut chunk = match next {
            None => match length {
                Some(n) if sent != n => {
                    break Some(DataEnd::Aborted(format!(
                        "the body ended after {sent} of the {n} bytes announced"
                    )))
                }
                _ => break Some(DataEnd::Done),
            },
            Some(Err(e)) => break Some(DataEnd::Aborted(e.to_string())),
            Some(Ok(chunk)) => chunk,
        };
        if length.is_some_and(|n| sent + chunk.len() as u64 > n) {
            break Some(DataEnd::Aborted(
                "the body is longer than the length announced".into(),
            ));
        }
        while !chunk.is_empty() {
            let room = room(&shared, &credit, &mut others, chunk.len());
            let n = tokio::select! {
                r = room => r.ok(),
                _ = stop.cancelled() => None,
            };
            let Some(n) = n else {
                break;
            };
            let piece = chunk.split_to(n as usize);
            sent += u64::from(n);
            let frame = wire::encode(Message::Data {
                id,
                from_caller,
                chunk: piece,
                end: DataEnd::More,
            });
            if shared.send(frame).await.is_err() {
                break;
            }
        }
        if stop.is_cancelled() || shared.closed.is_cancelled() {
            break None;
        }
    };
    lock(&shared.streams.pumps).remove(&key);
    match end {
        Some(end) => {
            if let DataEnd::Aborted(why) = &end {
                warn!(parent: &shared.span, id, from_caller, %why, "body aborted at its source");
            }
            let _ = shared
                .send(wire::encode(Message::Data {
                    id,
                    from_caller,
                    chunk: Bytes::new(),
                    end,
                }))
                .await;
        }
        None => debug!(
            parent: &shared.span,
            id,
            from_caller, sent, "body stopped by the peer or the connection"
        ),
    }
}
