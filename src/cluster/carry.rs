//! A call carried from one replica to another over NATS, bodies of any size included.
//!
//! NATS caps a message at its `max_payload` (1 MiB by default), so a body crosses as a stream
//! of chunks on two private inboxes, with credit-based flow control, as bodies cross the pipe:
//!
//! 1. The requester subscribes to its own inbox `R` and publishes the `call` (the event's
//!    head, and its body when small) on the subject of the client's identity, reply `R`.
//!    Nobody subscribed there: NATS answers "no responders" at once.
//! 2. The holder subscribes to its own inbox `H` and answers `accept` with `H` on `R`.
//! 3. A streamed request body goes as `chunk` messages (numbered from 0) then `end` (or
//!    `abort`) to `H`; the holder sends a `credit` to `R` for each chunk it has passed on.
//! 4. The reply goes to `R`: a `reply` head (whole body inline when small) or an `error` (a
//!    [`CallError`], so that the requester answers exactly what a single node would), then a
//!    streamed reply body as `chunk` messages, credited by the requester on `H`.
//! 5. A requester that goes away sends `cancel` to `H`.
//!
//! At most [`WINDOW`] chunks are in flight one way on a call. A gap in the numbering, a chunk
//! larger than agreed, a message that does not decode, or silence past the stream idle
//! timeout ends the body as incomplete: never a hang, never a wrong byte passed on as whole.
//! Everything that comes off NATS is checked here as if it came from a stranger (see
//! docs/CLUSTER.md, trust model).

use std::sync::Arc;
use std::time::Duration;

use async_nats::{Client, HeaderMap, Subscriber};
use bytes::{Buf, BufMut, Bytes, BytesMut};
use futures_util::StreamExt;
use restpipe_handler::body::BodyError;
use restpipe_handler::headers::Headers;
use restpipe_handler::trace::TraceContext;
use restpipe_handler::{BodyStream, Reply, Request};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, Semaphore};

use crate::error::CallError;

/// The header that says what a message is.
pub(crate) const KIND: &str = "Rp-Kind";
/// The header with a chunk's number.
const SEQ: &str = "Rp-Seq";

/// Chunks in flight one way on one call, at most.
pub(crate) const WINDOW: usize = 8;
/// The largest chunk sent, bytes (smaller when the NATS server's `max_payload` is).
pub(crate) const MAX_CHUNK: usize = 256 * 1024;
/// A body up to this size travels inside its head.
pub(crate) const INLINE_MAX: usize = 64 * 1024;
/// The largest head (JSON) taken.
const MAX_HEAD: usize = 256 * 1024;
/// Longest wait for the holder's `accept` once NATS delivered the call.
pub(crate) const ACCEPT_WAIT: Duration = Duration::from_secs(5);
/// How long after the deadline the requester still waits for the holder's own 504.
const DEADLINE_SLACK: Duration = Duration::from_secs(2);
/// The longest inbox subject taken from a message.
const MAX_INBOX: usize = 256;

/// The head of a call: the event without its streamed body.
#[derive(Serialize, Deserialize, Debug)]
pub(crate) struct CallHead {
    /// The client's identity.
    pub identity: String,
    /// The replica asking.
    pub from: String,
    pub verb: String,
    pub noun: String,
    pub parameters: Vec<String>,
    pub query: String,
    pub content_type: String,
    pub headers: Vec<(String, String)>,
    pub traceparent: Option<String>,
    pub request_id: Option<String>,
    /// The queued delivery's id (docs/QUEUE.md), when the call delivers a queued event.
    #[serde(default)]
    pub delivery_id: Option<String>,
    /// The request's deadline, milliseconds.
    pub timeout_ms: u64,
    /// Whether a body follows as chunks (else it is inline, maybe empty).
    pub streamed: bool,
    /// The streamed body's length, when known.
    pub length: Option<u64>,
    /// The largest chunk the requester takes.
    pub max_chunk: usize,
}

/// The holder's `accept`.
#[derive(Serialize, Deserialize, Debug)]
pub(crate) struct Accept {
    /// Where the requester sends body chunks, credits and cancel.
    pub inbox: String,
    /// The holder's replica name.
    pub replica: String,
    /// The largest chunk the holder takes.
    pub max_chunk: usize,
}

/// The head of a reply.
#[derive(Serialize, Deserialize, Debug)]
struct ReplyHead {
    content_type: String,
    code: u32,
    status: Option<u16>,
    headers: Vec<(String, String)>,
    streamed: bool,
    length: Option<u64>,
}

/// A head (JSON) and an inline body in one payload: `u32` length of the head, head, body.
pub(crate) fn pack<T: Serialize>(head: &T, body: &[u8]) -> Bytes {
    let json = serde_json::to_vec(head).unwrap_or_default();
    let mut out = BytesMut::with_capacity(4 + json.len() + body.len());
    out.put_u32(json.len() as u32);
    out.put_slice(&json);
    out.put_slice(body);
    out.freeze()
}

/// The head and the inline body of a payload made by [`pack`].
pub(crate) fn unpack<T: for<'de> Deserialize<'de>>(
    mut payload: Bytes,
) -> Result<(T, Bytes), String> {
    if payload.len() < 4 {
        return Err("message too short".into());
    }
    let n = payload.get_u32() as usize;
    if n > MAX_HEAD || n > payload.len() {
        return Err(format!("head of {n} bytes is out of bounds"));
    }
    let head = payload.split_to(n);
    let head = serde_json::from_slice(&head).map_err(|e| format!("head does not decode: {e}"))?;
    Ok((head, payload))
}

/// The kind of a message, from its headers.
pub(crate) fn kind(message: &async_nats::Message) -> &str {
    message
        .headers
        .as_ref()
        .and_then(|h| h.get(KIND))
        .map(|v| v.as_str())
        .unwrap_or("")
}

fn seq_of(message: &async_nats::Message) -> Option<u64> {
    message
        .headers
        .as_ref()
        .and_then(|h| h.get(SEQ))
        .and_then(|v| v.as_str().parse().ok())
}

pub(crate) fn headers(kind: &str) -> HeaderMap {
    let mut map = HeaderMap::new();
    map.insert(KIND, kind);
    map
}

/// Whether `subject` can be an inbox we publish to: bounded, made of subject-safe characters
/// and without wildcards.
pub(crate) fn valid_inbox(subject: &str) -> bool {
    !subject.is_empty()
        && subject.len() <= MAX_INBOX
        && subject
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        && !subject.split('.').any(str::is_empty)
}

/// Publish, within a bound: the NATS client buffers while it is disconnected.
pub(crate) async fn send(client: &Client, subject: String, kind: &str, payload: Bytes) -> bool {
    let publish = client.publish_with_headers(subject, headers(kind), payload);
    matches!(
        tokio::time::timeout(Duration::from_secs(2), publish).await,
        Ok(Ok(()))
    )
}

async fn send_chunk(client: &Client, subject: &str, seq: u64, chunk: Bytes) -> bool {
    let mut map = headers("chunk");
    map.insert(SEQ, seq.to_string().as_str());
    let publish = client.publish_with_headers(subject.to_string(), map, chunk);
    matches!(
        tokio::time::timeout(Duration::from_secs(2), publish).await,
        Ok(Ok(()))
    )
}

/// Messages of one inbox, sorted: credits to a semaphore, cancel to a flag, the rest to a
/// bounded queue. A peer that sends more than the window allows is cut off.
struct Demux {
    queue: mpsc::Receiver<async_nats::Message>,
    credits: Arc<Semaphore>,
    cancelled: tokio_util::sync::CancellationToken,
    /// The task that sorts; aborted when the owner of it is dropped.
    task: Option<tokio::task::AbortHandle>,
}

impl Demux {
    fn start(mut subscriber: Subscriber) -> Demux {
        let (tx, queue) = mpsc::channel(WINDOW + 4);
        let credits = Arc::new(Semaphore::new(WINDOW));
        let cancelled = tokio_util::sync::CancellationToken::new();
        let (c, x) = (credits.clone(), cancelled.clone());
        let task = tokio::spawn(async move {
            while let Some(message) = subscriber.next().await {
                match kind(&message) {
                    // At most the window: a peer cannot grant itself more.
                    "credit" if c.available_permits() < WINDOW => c.add_permits(1),
                    "credit" => {}
                    "cancel" => {
                        x.cancel();
                        break;
                    }
                    _ => match tx.try_send(message) {
                        Ok(()) => {}
                        // A body nobody reads any more: what comes for it is dropped.
                        Err(mpsc::error::TrySendError::Closed(_)) => {}
                        // Over the window: a broken or hostile peer.
                        Err(mpsc::error::TrySendError::Full(_)) => {
                            x.cancel();
                            break;
                        }
                    },
                }
            }
            // The subscriber is dropped here: unsubscribed.
        });
        Demux {
            queue,
            credits,
            cancelled,
            task: Some(task.abort_handle()),
        }
    }
}

impl Drop for Demux {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

/// A body arriving as chunks from `queue`, credited on `credit_to`; `guard` lives as long as
/// the stream (its drop tells the far side).
fn incoming_body(
    client: Client,
    credit_to: String,
    queue_owner: Demux,
    length: Option<u64>,
    max_chunk: usize,
    idle: Duration,
    guard: Option<CancelOnDrop>,
) -> BodyStream {
    struct State {
        client: Client,
        credit_to: String,
        demux: Demux,
        next: u64,
        done: bool,
        max_chunk: usize,
        idle: Duration,
        guard: Option<CancelOnDrop>,
    }
    let state = State {
        client,
        credit_to,
        demux: queue_owner,
        next: 0,
        done: false,
        max_chunk,
        idle,
        guard,
    };
    let stream = futures_util::stream::unfold(state, |mut s| async move {
        if s.done {
            return None;
        }
        let fail = |s: &mut State, why: String| {
            s.done = true;
            Some(Err(BodyError::Aborted(format!("cluster: {why}"))))
        };
        let item = match tokio::time::timeout(s.idle, s.demux.queue.recv()).await {
            Err(_) => {
                let why = format!("the body brought no byte for {:?}", s.idle);
                fail(&mut s, why)
            }
            Ok(None) => fail(&mut s, "the other replica went away mid-body".into()),
            Ok(Some(message)) => match kind(&message) {
                "chunk" if seq_of(&message) != Some(s.next) => {
                    fail(&mut s, "a chunk of the body was lost".into())
                }
                "chunk" if message.payload.len() > s.max_chunk => {
                    fail(&mut s, "a chunk over the agreed size".into())
                }
                "chunk" => {
                    s.next += 1;
                    let _ = send(&s.client, s.credit_to.clone(), "credit", Bytes::new()).await;
                    Some(Ok(message.payload))
                }
                "end" => {
                    s.done = true;
                    if let Some(g) = s.guard.as_mut() {
                        g.disarm();
                    }
                    None
                }
                "abort" => {
                    let why = String::from_utf8_lossy(&message.payload).into_owned();
                    s.done = true;
                    if let Some(g) = s.guard.as_mut() {
                        g.disarm();
                    }
                    Some(Err(BodyError::Aborted(why)))
                }
                other => fail(&mut s, format!("unexpected message {other:?} mid-body")),
            },
        };
        item.map(|item| (item, s))
    });
    BodyStream::new(stream, length)
}

/// Send `body` to `to` as chunks of at most `max_chunk`, within the credits; `end` when it is
/// whole, `abort` with the reason when it is not.
async fn send_body(
    client: Client,
    to: String,
    mut body: BodyStream,
    credits: Arc<Semaphore>,
    max_chunk: usize,
    idle: Duration,
) {
    let mut seq = 0u64;
    while let Some(chunk) = body.chunk().await {
        let mut chunk = match chunk {
            Ok(chunk) => chunk,
            Err(e) => {
                let _ = send(&client, to, "abort", Bytes::from(e.to_string())).await;
                return;
            }
        };
        while !chunk.is_empty() {
            let part = chunk.split_to(chunk.len().min(max_chunk));
            match tokio::time::timeout(idle, credits.acquire()).await {
                Ok(Ok(permit)) => permit.forget(),
                _ => {
                    let why = format!("cluster: the other replica took no chunk for {idle:?}");
                    let _ = send(&client, to, "abort", Bytes::from(why)).await;
                    return;
                }
            }
            if !send_chunk(&client, &to, seq, part).await {
                return;
            }
            seq += 1;
        }
    }
    let _ = send(&client, to, "end", Bytes::new()).await;
}

/// Sends `cancel` to the far side when dropped before it is disarmed.
struct CancelOnDrop {
    client: Client,
    to: String,
    armed: bool,
    sender: Option<tokio::task::AbortHandle>,
}

impl CancelOnDrop {
    fn disarm(&mut self) {
        self.armed = false;
    }
}

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        if let Some(sender) = self.sender.take() {
            sender.abort();
        }
        if self.armed {
            let (client, to) = (self.client.clone(), std::mem::take(&mut self.to));
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                rt.spawn(async move { send(&client, to, "cancel", Bytes::new()).await });
            }
        }
    }
}

/// How one attempt to reach the holder went.
pub(crate) enum Attempt {
    /// Nobody holds the client now (no responders, or the replica that got it no longer
    /// holds it): the body comes back untouched, to try again.
    Nobody(Option<BodyStream>),
    /// The call was carried: its outcome.
    Done(Result<Reply, CallError>),
}

/// Everything the requester needs for one attempt.
pub(crate) struct Outgoing<'a> {
    pub client: &'a Client,
    pub subject: String,
    pub head: &'a CallHead,
    pub inline: Bytes,
    pub body: Option<BodyStream>,
    pub timeout: Duration,
    pub idle: Duration,
    pub max_chunk: usize,
}

/// One attempt: publish the call and carry it through, on the requester's side.
pub(crate) async fn request(out: Outgoing<'_>) -> Attempt {
    let unreachable = |why: &str| {
        Attempt::Done(Err(CallError::NotConnected(format!(
            "the cluster is unreachable ({why}); client {} is not connected to this replica",
            out.head.identity
        ))))
    };
    let inbox = out.client.new_inbox();
    let subscriber =
        match tokio::time::timeout(Duration::from_secs(2), out.client.subscribe(inbox.clone()))
            .await
        {
            Ok(Ok(s)) => s,
            _ => return unreachable("cannot subscribe on NATS"),
        };
    let mut demux = Demux::start(subscriber);
    let payload = pack(out.head, &out.inline);
    let publish = out.client.publish_with_reply_and_headers(
        out.subject.clone(),
        inbox.clone(),
        headers("call"),
        payload,
    );
    if !matches!(
        tokio::time::timeout(Duration::from_secs(2), publish).await,
        Ok(Ok(()))
    ) {
        return unreachable("cannot publish on NATS");
    }
    // The first answer: no responders, moved, or accept.
    let first = tokio::time::timeout(out.timeout.min(ACCEPT_WAIT), demux.queue.recv()).await;
    let accept: Accept = match first {
        Err(_) | Ok(None) => {
            return Attempt::Done(Err(CallError::NotConnected(format!(
                "client {}: the replica holding it did not take the call within {:?} (the cluster may be partitioned)",
                out.head.identity,
                out.timeout.min(ACCEPT_WAIT)
            ))))
        }
        Ok(Some(m)) if m.status == Some(async_nats::StatusCode::NO_RESPONDERS) => {
            return Attempt::Nobody(out.body)
        }
        Ok(Some(m)) if kind(&m) == "moved" => return Attempt::Nobody(out.body),
        Ok(Some(m)) if kind(&m) == "accept" => match unpack::<Accept>(m.payload) {
            Ok((a, _)) if valid_inbox(&a.inbox) && a.max_chunk > 0 => a,
            _ => return Attempt::Done(Err(CallError::Refused("cluster: a bad accept".into()))),
        },
        Ok(Some(m)) => {
            return Attempt::Done(Err(CallError::Refused(format!(
                "cluster: unexpected message {:?} instead of accept",
                kind(&m)
            ))))
        }
    };
    let mut guard = CancelOnDrop {
        client: out.client.clone(),
        to: accept.inbox.clone(),
        armed: true,
        sender: None,
    };
    if let Some(body) = out.body {
        let task = tokio::spawn(send_body(
            out.client.clone(),
            accept.inbox.clone(),
            body,
            demux.credits.clone(),
            out.max_chunk.min(accept.max_chunk),
            out.idle,
        ));
        guard.sender = Some(task.abort_handle());
    }
    let wait = out.timeout + DEADLINE_SLACK;
    let head = tokio::select! {
        head = tokio::time::timeout(wait, demux.queue.recv()) => head,
        _ = demux.cancelled.cancelled() => {
            return Attempt::Done(Err(CallError::PipeClosed(
                "cluster: the other replica broke the call off".into(),
            )))
        }
    };
    let message = match head {
        Err(_) => return Attempt::Done(Err(CallError::Timeout(out.timeout))),
        Ok(None) => {
            return Attempt::Done(Err(CallError::PipeClosed(
                "cluster: the other replica went away".into(),
            )))
        }
        Ok(Some(m)) => m,
    };
    match kind(&message) {
        "error" => {
            guard.disarm();
            let error = unpack::<CallError>(message.payload)
                .map(|(e, _)| e)
                .unwrap_or_else(|e| CallError::Refused(format!("cluster: {e}")));
            Attempt::Done(Err(error))
        }
        "reply" => {
            let (head, inline) = match unpack::<ReplyHead>(message.payload) {
                Ok(x) => x,
                Err(e) => return Attempt::Done(Err(CallError::Refused(format!("cluster: {e}")))),
            };
            let mut reply = Reply::bytes(head.content_type, Bytes::new());
            reply.code = head.code;
            reply.status = head.status;
            reply.headers = to_headers(&head.headers);
            if head.streamed {
                let to = accept.inbox.clone();
                reply.stream = Some(incoming_body(
                    out.client.clone(),
                    to,
                    demux,
                    head.length,
                    out.max_chunk,
                    out.idle,
                    Some(guard),
                ));
            } else {
                guard.disarm();
                reply.body = inline;
            }
            Attempt::Done(Ok(reply))
        }
        other => Attempt::Done(Err(CallError::Refused(format!(
            "cluster: unexpected message {other:?} instead of a reply"
        )))),
    }
}

/// Allow-listed, checked headers from a list that came off NATS; others are dropped.
fn to_headers(list: &[(String, String)]) -> Headers {
    let mut headers = Headers::new();
    for (name, value) in list.iter().take(64) {
        let _ = headers.insert(name, value.clone());
    }
    headers
}

/// The head of `request` to send to the holder.
pub(crate) fn call_head(
    identity: &str,
    from: &str,
    request: &Request,
    body: Option<&BodyStream>,
    timeout: Duration,
    max_chunk: usize,
) -> CallHead {
    CallHead {
        identity: identity.to_string(),
        from: from.to_string(),
        verb: request.verb.clone(),
        noun: request.noun.clone(),
        parameters: request.parameters.clone(),
        query: request.query.clone(),
        content_type: request.content_type.clone(),
        headers: request
            .headers
            .iter()
            .map(|(n, v)| (n.to_string(), v.to_string()))
            .collect(),
        traceparent: request.trace.as_ref().map(TraceContext::traceparent),
        request_id: request.trace.as_ref().map(|t| t.request_id().to_string()),
        delivery_id: request.delivery_id.clone(),
        timeout_ms: u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX),
        streamed: body.is_some(),
        length: body.and_then(BodyStream::length),
        max_chunk,
    }
}

/// What the holder runs a carried call with: the local call.
pub(crate) type LocalCall = Box<
    dyn FnOnce(
            Request,
            Option<BodyStream>,
            Duration,
        ) -> futures_util::future::BoxFuture<'static, Result<Reply, CallError>>
        + Send,
>;

/// The holder's settings for carried calls.
pub(crate) struct Holder {
    /// This replica's name.
    pub replica: String,
    /// The longest deadline a requester may ask for.
    pub max_timeout: Duration,
    /// The stream idle timeout.
    pub idle: Duration,
    /// The largest chunk taken.
    pub max_chunk: usize,
}

/// The holder's side of one carried call: `message` is the `call`; `local` runs it on the
/// client's connection here; `holder.max_timeout` bounds the deadline the requester asks
/// for.
pub(crate) async fn serve(
    client: Client,
    message: async_nats::Message,
    head: CallHead,
    inline: Bytes,
    local: LocalCall,
    holder: Holder,
) {
    let Some(reply_to) = message.reply.map(|r| r.to_string()) else {
        return;
    };
    let inbox = client.new_inbox();
    let Ok(Ok(subscriber)) =
        tokio::time::timeout(Duration::from_secs(2), client.subscribe(inbox.clone())).await
    else {
        return;
    };
    let mut demux = Demux::start(subscriber);
    let Holder {
        replica,
        max_timeout,
        idle,
        max_chunk,
    } = holder;
    let accept = Accept {
        inbox,
        replica,
        max_chunk,
    };
    if !send(&client, reply_to.clone(), "accept", pack(&accept, &[])).await {
        return;
    }
    let timeout = Duration::from_millis(head.timeout_ms).min(max_timeout);
    let mut headers = Headers::new();
    for (name, value) in head.headers.iter().take(64) {
        let _ = headers.insert(name, value.clone());
    }
    let trace = head
        .traceparent
        .as_deref()
        .and_then(|t| TraceContext::parse(t).ok())
        .map(|t| match head.request_id.as_deref() {
            Some(id) => t.clone().with_request_id(id).unwrap_or(t),
            None => t,
        });
    let request = Request {
        verb: head.verb,
        noun: head.noun,
        parameters: head.parameters,
        query: head.query,
        content_type: head.content_type,
        body: inline,
        headers,
        trace,
        delivery_id: head.delivery_id,
    };
    let cancelled = demux.cancelled.clone();
    let credits = demux.credits.clone();
    let chunk_limit = head.max_chunk.clamp(1, max_chunk);
    let body = head.streamed.then(|| {
        // The demux's queue goes to the body; a new, empty one stays (no other message
        // should come on it).
        let (_tx, empty) = mpsc::channel(1);
        let queue = std::mem::replace(&mut demux.queue, empty);
        let owner = Demux {
            queue,
            credits: credits.clone(),
            cancelled: cancelled.clone(),
            task: None,
        };
        incoming_body(
            client.clone(),
            reply_to.clone(),
            owner,
            head.length,
            max_chunk,
            idle,
            None,
        )
    });
    let outcome = tokio::select! {
        outcome = local(request, body, timeout) => outcome,
        _ = cancelled.cancelled() => return,
    };
    match outcome {
        Err(e) => {
            let _ = send(&client, reply_to, "error", pack(&e, &[])).await;
        }
        Ok(reply) => {
            let stream = match reply.stream {
                Some(stream) => Some(stream),
                None if reply.body.len() > INLINE_MAX => Some(BodyStream::once(reply.body.clone())),
                None => None,
            };
            let head = ReplyHead {
                content_type: reply.content_type,
                code: reply.code,
                status: reply.status,
                headers: reply
                    .headers
                    .iter()
                    .map(|(n, v)| (n.to_string(), v.to_string()))
                    .collect(),
                streamed: stream.is_some(),
                length: stream.as_ref().and_then(BodyStream::length),
            };
            let inline = if stream.is_some() {
                Bytes::new()
            } else {
                reply.body
            };
            if !send(&client, reply_to.clone(), "reply", pack(&head, &inline)).await {
                return;
            }
            if let Some(stream) = stream {
                let sending = send_body(client, reply_to, stream, credits, chunk_limit, idle);
                tokio::select! {
                    _ = sending => {}
                    _ = cancelled.cancelled() => {}
                }
            }
        }
    }
    drop(demux);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heads_pack_and_unpack_and_bad_ones_are_refused() {
        let head = ReplyHead {
            content_type: "text/plain".into(),
            code: 0,
            status: Some(201),
            headers: vec![("etag".into(), "\"x\"".into())],
            streamed: false,
            length: None,
        };
        let packed = pack(&head, b"body");
        let (back, body): (ReplyHead, Bytes) = unpack(packed).unwrap();
        assert_eq!((back.status, &body[..]), (Some(201), &b"body"[..]));
        assert!(unpack::<ReplyHead>(Bytes::from_static(b"\x00\x00")).is_err());
        assert!(unpack::<ReplyHead>(Bytes::from_static(b"\xff\xff\xff\xff{}")).is_err());
        assert!(unpack::<ReplyHead>(Bytes::from_static(b"\x00\x00\x00\x02{}")).is_err());
        let err = CallError::Timeout(Duration::from_millis(1500));
        let (back, _): (CallError, Bytes) = unpack(pack(&err, &[])).unwrap();
        assert_eq!(back, err);
    }

    #[test]
    fn inboxes_are_checked() {
        assert!(valid_inbox("_INBOX.abc.def"));
        for bad in ["", "a.*", "a.>", "a..b", "a b", ".a", &"x".repeat(300)] {
            assert!(!valid_inbox(bad), "{bad}");
        }
    }
}
