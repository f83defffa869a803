//! The messages of the pipe as the rest of the crate sees them, and their checked conversion
//! from and to the generated protobuf types.
//!
//! Decoding validates on the way in: an event from a peer is held to the same grammar as one
//! made at the HTTP front door (verb list, noun rule, non-zero id), and every string a peer
//! controls is bounded (see [`limits`](super::limits)). A frame that parses as protobuf but
//! breaks a rule is a [`DecodeError::Invalid`] that still names its request id, so that the
//! receiver can answer or fail exactly that request and keep the connection.

use std::ops::RangeInclusive;

use bytes::Bytes;
use prost::Message as _;
use restpipe_handler::{grammar, headers};
use restpipe_handler::{Headers, Reply, Request, Side, TraceContext};

use super::framing::{self, Encoded};
use super::limits;
use super::proto::{self, frame::Kind};

/// The first frame each side sends.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hello {
    /// The protocol versions the sender speaks, lowest to highest.
    pub versions: RangeInclusive<u32>,
    /// The sender's side.
    pub role: Side,
    /// The sender's software version, for logs and `/status`.
    pub software_version: String,
    /// The sender's identity, as its certificate says it (informational: the receiver takes
    /// the identity from the certificate itself).
    pub identity: String,
    /// The largest body the sender accepts, in bytes.
    pub max_frame_bytes: u64,
    /// The optional features the sender supports.
    pub features: Vec<String>,
}

/// Why a peer could not answer a request with a reply.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// The frame's kind is one the peer does not know.
    UnknownMessage,
    /// Too many requests are in flight on the connection.
    Overloaded,
    /// The event was malformed or broke the grammar.
    BadRequest,
    /// The peer is shutting down and takes no new requests.
    ShuttingDown,
    /// A kind this build does not know (a newer peer's), or none.
    Other,
}

/// A body that follows its event or its reply in [`Message::Data`] frames (version 2).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Streamed {
    /// The body's length, when its sender knows it.
    pub length: Option<u64>,
}

/// How a [`Message::Data`] frame stands in its body.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DataEnd {
    /// More frames follow.
    More,
    /// The last frame: the body is whole.
    Done,
    /// The last frame: the body is incomplete, for this reason.
    Aborted(String),
}

/// A published event as it crosses the pipe (feature `pubsub`, docs/PUBSUB.md).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Published {
    /// The topic: the noun grammar, at most [`limits::TOPIC`] bytes.
    pub topic: String,
    /// The body's content type.
    pub content_type: String,
    /// The body.
    pub body: Bytes,
    /// The event's id; empty in a publish request (the server names it).
    pub id: String,
    /// When it was published, ms since the epoch; 0 in a publish request.
    pub published_ms: u64,
}

/// One message on the pipe.
#[derive(Debug, PartialEq)]
pub enum Message {
    /// The opening of a connection.
    Hello(Hello),
    /// A request, with the id its answer will carry and the caller's timeout.
    Event {
        /// The request id, never 0.
        id: u64,
        /// The request.
        request: Request,
        /// How long the caller waits, in milliseconds.
        timeout_ms: u64,
        /// Whether the body follows in data frames (version 2) instead of `request.body`.
        streamed: Option<Streamed>,
    },
    /// A handler's answer to the event `id`.
    Reply {
        /// The id of the event answered.
        id: u64,
        /// The reply (its `stream`, if any, is not encoded: see `streamed`).
        reply: Reply,
        /// Whether the body follows in data frames (version 2) instead of `reply.body`.
        streamed: Option<Streamed>,
    },
    /// A chunk of one of the two bodies of request `id` (version 2).
    Data {
        /// The request.
        id: u64,
        /// True for the request body (sent by the caller), false for the reply body.
        from_caller: bool,
        /// The bytes.
        chunk: Bytes,
        /// Whether the body ends here.
        end: DataEnd,
    },
    /// Room for `bytes` more body bytes (version 2): on the connection when `id` is 0, else on
    /// one body of request `id` (the reply body when `from_caller`, else the request body).
    Credit {
        /// The request, or 0 for the connection.
        id: u64,
        /// Whether the caller of request `id` sends it.
        from_caller: bool,
        /// The bytes granted.
        bytes: u64,
    },
    /// Stop request `id` (version 2): from the caller, it no longer waits; from the answering
    /// side, it reads no more of the request body.
    Cancel {
        /// The request.
        id: u64,
        /// Whether the caller of request `id` sends it.
        from_caller: bool,
    },
    /// Why the event `id` (or, with id 0, no particular event) got no reply.
    Error {
        /// The event concerned, or 0.
        id: u64,
        /// What went wrong.
        kind: ErrorKind,
        /// A message for a person.
        message: String,
    },
    /// A keep-alive; its nonce comes back in a [`Message::Pong`].
    Ping(u64),
    /// The answer to a ping.
    Pong(u64),
    /// The sender is about to hang up, and says why.
    Close(String),
    /// Feature `pubsub`, client to server: the topic globs it subscribes to, replacing the
    /// last ones, and the id of the last event it saw (empty: from now on).
    Subscribe {
        /// The topic globs, at most [`limits::SUBSCRIPTIONS`].
        globs: Vec<String>,
        /// The id of the last published event the client saw, or empty.
        resume_after: String,
    },
    /// Feature `pubsub`: client to server with a non-zero `id`, a publish request answered by
    /// a [`Message::Reply`] of that id; server to client with `id` 0, a published event.
    Publish {
        /// The frame's request id; 0 for an event the server sends.
        id: u64,
        /// The event.
        event: Published,
    },
    /// A frame whose kind this build does not know (a newer peer's); answered with
    /// [`ErrorKind::UnknownMessage`].
    Unknown {
        /// Its id.
        id: u64,
    },
}

/// Why a frame's payload is not a message this node takes.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// Not protobuf, or not a `Frame`.
    #[error("malformed frame: {0}")]
    Malformed(String),
    /// Protobuf, but it breaks a rule of the protocol.
    #[error("invalid {what}: {reason}")]
    Invalid {
        /// The frame's request id (0 when it has none).
        id: u64,
        /// Which kind of frame it was: `hello`, `event`, `reply`, `error`, `close`,
        /// `subscribe`, `publish`.
        what: &'static str,
        /// What rule it breaks.
        reason: String,
    },
}

/// Decode one frame's payload (without its length prefix) into a checked message.
pub fn decode(payload: Bytes) -> Result<Message, DecodeError> {
    let frame = proto::Frame::decode(payload).map_err(|e| DecodeError::Malformed(e.to_string()))?;
    let id = frame.id;
    let invalid =
        |what: &'static str| move |reason: String| DecodeError::Invalid { id, what, reason };
    Ok(match frame.kind {
        None => Message::Unknown { id },
        Some(Kind::Hello(h)) => Message::Hello(hello_from_wire(h).map_err(invalid("hello"))?),
        Some(Kind::Event(e)) => {
            if id == 0 {
                return Err(invalid("event")("request id 0".into()));
            }
            let timeout_ms = e.timeout_ms;
            let streamed = e.streamed.then_some(Streamed {
                length: e.content_length,
            });
            let request = request_from_wire(e).map_err(invalid("event"))?;
            Message::Event {
                id,
                request,
                timeout_ms,
                streamed,
            }
        }
        Some(Kind::Reply(r)) => Message::Reply {
            id,
            streamed: r.streamed.then_some(Streamed {
                length: r.content_length,
            }),
            reply: reply_from_wire(r).map_err(invalid("reply"))?,
        },
        Some(Kind::Data(d)) => {
            if id == 0 {
                return Err(invalid("data")("request id 0".into()));
            }
            bounded("abort reason", &d.abort, limits::MESSAGE).map_err(invalid("data"))?;
            let end = match (d.end, d.abort.is_empty()) {
                (false, _) => DataEnd::More,
                (true, true) => DataEnd::Done,
                (true, false) => DataEnd::Aborted(d.abort),
            };
            Message::Data {
                id,
                from_caller: d.from_caller,
                chunk: d.chunk,
                end,
            }
        }
        Some(Kind::Credit(c)) => Message::Credit {
            id,
            from_caller: c.from_caller,
            bytes: c.bytes,
        },
        Some(Kind::Cancel(c)) => {
            if id == 0 {
                return Err(invalid("cancel")("request id 0".into()));
            }
            Message::Cancel {
                id,
                from_caller: c.from_caller,
            }
        }
        Some(Kind::Error(e)) => {
            bounded("error message", &e.message, limits::MESSAGE).map_err(invalid("error"))?;
            Message::Error {
                id,
                kind: match proto::error::Kind::try_from(e.kind) {
                    Ok(proto::error::Kind::UnknownMessage) => ErrorKind::UnknownMessage,
                    Ok(proto::error::Kind::Overloaded) => ErrorKind::Overloaded,
                    Ok(proto::error::Kind::BadRequest) => ErrorKind::BadRequest,
                    Ok(proto::error::Kind::ShuttingDown) => ErrorKind::ShuttingDown,
                    _ => ErrorKind::Other,
                },
                message: e.message,
            }
        }
        Some(Kind::Subscribe(s)) => {
            check_subscription(&s.globs, &s.resume_after).map_err(invalid("subscribe"))?;
            Message::Subscribe {
                globs: s.globs,
                resume_after: s.resume_after,
            }
        }
        Some(Kind::Publish(p)) => {
            let event = Published {
                topic: p.topic,
                content_type: p.content_type,
                body: p.body,
                id: p.id,
                published_ms: p.published_ms,
            };
            check_published(&event).map_err(invalid("publish"))?;
            // A request carries no id; an event from the server always does.
            if (id == 0) == event.id.is_empty() {
                return Err(invalid("publish")(
                    "a publish request has a frame id and no event id; a published event the reverse".into(),
                ));
            }
            Message::Publish { id, event }
        }
        Some(Kind::Ping(p)) => Message::Ping(p.nonce),
        Some(Kind::Pong(p)) => Message::Pong(p.nonce),
        Some(Kind::Close(c)) => {
            bounded("close reason", &c.reason, limits::MESSAGE).map_err(invalid("close"))?;
            Message::Close(c.reason)
        }
    })
}

/// Encode a message with its length prefix. A large event or reply body is not copied: it
/// becomes a part of its own (see [`Encoded`]).
pub fn encode(message: Message) -> Encoded {
    let (id, kind) = match message {
        Message::Hello(h) => (0, Kind::Hello(hello_to_wire(h))),
        Message::Event {
            id,
            request,
            timeout_ms,
            streamed,
        } => (
            id,
            Kind::Event(request_to_wire(request, timeout_ms, streamed)),
        ),
        Message::Reply {
            id,
            reply,
            streamed,
        } => (id, Kind::Reply(reply_to_wire(reply, streamed))),
        Message::Data {
            id,
            from_caller,
            chunk,
            end,
        } => {
            let (end, abort) = match end {
                DataEnd::More => (false, String::new()),
                DataEnd::Done => (true, String::new()),
                DataEnd::Aborted(why) => (true, truncate(why, limits::MESSAGE)),
            };
            (
                id,
                Kind::Data(proto::Data {
                    chunk,
                    from_caller,
                    end,
                    abort,
                }),
            )
        }
        Message::Credit {
            id,
            from_caller,
            bytes,
        } => (id, Kind::Credit(proto::Credit { bytes, from_caller })),
        Message::Cancel { id, from_caller } => (id, Kind::Cancel(proto::Cancel { from_caller })),
        Message::Error { id, kind, message } => (
            id,
            Kind::Error(proto::Error {
                kind: error_kind_to_wire(kind) as i32,
                message: truncate(message, limits::MESSAGE),
            }),
        ),
        Message::Subscribe {
            globs,
            resume_after,
        } => (
            0,
            Kind::Subscribe(proto::Subscribe {
                globs,
                resume_after,
            }),
        ),
        Message::Publish { id, event } => (
            id,
            Kind::Publish(proto::Publish {
                topic: event.topic,
                content_type: event.content_type,
                body: event.body,
                id: event.id,
                published_ms: event.published_ms,
            }),
        ),
        Message::Ping(nonce) => (0, Kind::Ping(proto::Ping { nonce })),
        Message::Pong(nonce) => (0, Kind::Pong(proto::Pong { nonce })),
        Message::Close(reason) => (
            0,
            Kind::Close(proto::Close {
                reason: truncate(reason, limits::MESSAGE),
            }),
        ),
        Message::Unknown { id } => return framing::encode_frame(proto::Frame { id, kind: None }),
    };
    framing::encode_frame(proto::Frame {
        id,
        kind: Some(kind),
    })
}

/// Why a request breaks the protocol's rules, by the part of an HTTP request it comes from.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    /// The verb, the noun or the parameters break the grammar or a bound.
    #[error("{0}")]
    Grammar(String),
    /// The query string is too long.
    #[error("{0}")]
    UriTooLong(String),
    /// A header carried with the event (the content type) is too long.
    #[error("{0}")]
    HeaderTooLarge(String),
}

/// Check a request against the grammar and the bounds, as a receiver will: a node runs this
/// before anything is sent, so that a peer never has to refuse what this node made.
pub fn check_request(request: &Request) -> Result<(), RequestError> {
    if !grammar::is_verb(&request.verb) {
        return Err(RequestError::Grammar(format!(
            "verb {:?} is not one of {}",
            truncate(request.verb.clone(), 16),
            grammar::ALLOW
        )));
    }
    grammar::check_noun(&request.noun)
        .map_err(|e| RequestError::Grammar(format!("bad noun: {e}")))?;
    if request.parameters.len() > limits::PARAMETERS {
        return Err(RequestError::Grammar(format!(
            "{} parameters, more than {}",
            request.parameters.len(),
            limits::PARAMETERS
        )));
    }
    bounded("query string", &request.query, limits::QUERY).map_err(RequestError::UriTooLong)?;
    bounded("content type", &request.content_type, limits::CONTENT_TYPE)
        .map_err(RequestError::HeaderTooLarge)?;
    check_headers(&request.headers).map_err(RequestError::HeaderTooLarge)?;
    if let Some(id) = &request.delivery_id {
        let visible = |c: char| c.is_ascii_graphic();
        if id.is_empty() || id.len() > limits::DELIVERY_ID || !id.chars().all(visible) {
            return Err(RequestError::Grammar(format!(
                "the delivery id must be 1 to {} visible ASCII characters",
                limits::DELIVERY_ID
            )));
        }
    }
    Ok(())
}

/// Check a topic: the noun grammar, and at most [`limits::TOPIC`] bytes.
pub fn check_topic(topic: &str) -> Result<(), String> {
    bounded("topic", topic, limits::TOPIC)?;
    grammar::check_noun(topic).map_err(|e| format!("bad topic: {e}"))
}

/// Check a topic glob: 1 to [`limits::GLOB`] visible ASCII characters that compile as a glob
/// (`*` and `?` within a segment, `**` across segments, `[...]`, `{a,b}`).
pub fn check_topic_glob(glob: &str) -> Result<globset::GlobMatcher, String> {
    if glob.is_empty() || glob.len() > limits::GLOB || !glob.chars().all(|c| c.is_ascii_graphic()) {
        return Err(format!(
            "a topic glob is 1 to {} visible ASCII characters",
            limits::GLOB
        ));
    }
    globset::GlobBuilder::new(glob)
        .literal_separator(true)
        .build()
        .map(|g| g.compile_matcher())
        .map_err(|e| format!("bad topic glob {glob:?}: {e}"))
}

/// Check an event id, or a `resume_after`: empty, or at most [`limits::EVENT_ID`] visible
/// ASCII characters.
pub fn check_event_id(id: &str) -> Result<(), String> {
    if id.len() > limits::EVENT_ID || !id.chars().all(|c| c.is_ascii_graphic()) {
        return Err(format!(
            "an event id is at most {} visible ASCII characters",
            limits::EVENT_ID
        ));
    }
    Ok(())
}

/// Check a subscription as the server will: at most [`limits::SUBSCRIPTIONS`] globs, each a
/// topic glob, and a well-formed `resume_after`.
pub fn check_subscription(globs: &[String], resume_after: &str) -> Result<(), String> {
    if globs.len() > limits::SUBSCRIPTIONS {
        return Err(format!(
            "{} topic globs, more than {}",
            globs.len(),
            limits::SUBSCRIPTIONS
        ));
    }
    for glob in globs {
        check_topic_glob(glob)?;
    }
    check_event_id(resume_after)
}

/// Check a published event's topic, content type and id (its body is bounded by the frame
/// limit here, and by the receiver's `--max-publish-bytes`).
pub fn check_published(event: &Published) -> Result<(), String> {
    check_topic(&event.topic)?;
    bounded("content type", &event.content_type, limits::CONTENT_TYPE)?;
    check_event_id(&event.id)
}

/// Check allow-listed headers as a receiver will (count, names, values).
fn check_headers(h: &Headers) -> Result<(), String> {
    if h.len() > headers::MAX_COUNT {
        return Err(format!(
            "{} headers, more than {}",
            h.len(),
            headers::MAX_COUNT
        ));
    }
    for (name, value) in h.iter() {
        headers::check(name, value).map_err(|e| e.to_string())?;
    }
    Ok(())
}

fn headers_to_wire(h: Headers) -> Vec<proto::Header> {
    h.iter()
        .map(|(name, value)| proto::Header {
            name: name.to_string(),
            value: value.to_string(),
        })
        .collect()
}

fn headers_from_wire(list: Vec<proto::Header>) -> Result<Headers, String> {
    if list.len() > headers::MAX_COUNT {
        return Err(format!(
            "{} headers, more than {}",
            list.len(),
            headers::MAX_COUNT
        ));
    }
    let mut h = Headers::new();
    for header in list {
        h.insert(&header.name, header.value)
            .map_err(|e| e.to_string())?;
    }
    Ok(h)
}

fn bounded(what: &str, value: &str, limit: usize) -> Result<(), String> {
    if value.len() > limit {
        return Err(format!(
            "the {what} is {} bytes, longer than {limit}",
            value.len()
        ));
    }
    Ok(())
}

/// `s` cut to at most `limit` bytes, on a character boundary.
fn truncate(mut s: String, limit: usize) -> String {
    if s.len() > limit {
        let mut end = limit;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
    s
}

fn side_to_wire(side: Side) -> proto::Role {
    match side {
        Side::Server => proto::Role::Server,
        Side::Client => proto::Role::Client,
    }
}

fn hello_to_wire(h: Hello) -> proto::Hello {
    proto::Hello {
        protocol_version: *h.versions.end(),
        min_protocol_version: *h.versions.start(),
        role: side_to_wire(h.role) as i32,
        software_version: h.software_version,
        identity: h.identity,
        max_frame_bytes: h.max_frame_bytes,
        features: h.features,
    }
}

fn hello_from_wire(h: proto::Hello) -> Result<Hello, String> {
    let role = match proto::Role::try_from(h.role) {
        Ok(proto::Role::Server) => Side::Server,
        Ok(proto::Role::Client) => Side::Client,
        _ => return Err(format!("role {} is neither server nor client", h.role)),
    };
    bounded(
        "software version",
        &h.software_version,
        limits::SOFTWARE_VERSION,
    )?;
    bounded("identity", &h.identity, limits::IDENTITY)?;
    if h.features.len() > limits::FEATURES {
        return Err(format!(
            "{} features, more than {}",
            h.features.len(),
            limits::FEATURES
        ));
    }
    for feature in &h.features {
        bounded("feature name", feature, limits::FEATURE_NAME)?;
    }
    // A release-1 peer has no minimum: it speaks exactly its version.
    let min = match h.min_protocol_version {
        0 => h.protocol_version,
        min => min,
    };
    if min > h.protocol_version {
        return Err(format!(
            "protocol versions {min}..={} are an empty range",
            h.protocol_version
        ));
    }
    Ok(Hello {
        versions: min..=h.protocol_version,
        role,
        software_version: h.software_version,
        identity: h.identity,
        max_frame_bytes: h.max_frame_bytes,
        features: h.features,
    })
}

fn request_to_wire(request: Request, timeout_ms: u64, streamed: Option<Streamed>) -> proto::Event {
    let (traceparent, request_id) = match &request.trace {
        // The request id is left out when it is the trace id: the far side derives it.
        Some(trace) => (
            trace.traceparent(),
            trace.custom_request_id().unwrap_or_default().to_owned(),
        ),
        None => (String::new(), String::new()),
    };
    proto::Event {
        traceparent,
        request_id,
        verb: request.verb,
        noun: request.noun,
        parameters: request.parameters,
        query: request.query,
        content_type: request.content_type,
        body: request.body,
        timeout_ms,
        streamed: streamed.is_some(),
        headers: headers_to_wire(request.headers),
        content_length: streamed.and_then(|s| s.length),
        delivery_id: request.delivery_id.unwrap_or_default(),
    }
}

fn request_from_wire(event: proto::Event) -> Result<Request, String> {
    let trace = match (event.traceparent.as_str(), event.request_id.as_str()) {
        ("", _) => None,
        (traceparent, "") => Some(TraceContext::parse(traceparent).map_err(|e| e.to_string())?),
        (traceparent, request_id) => Some(
            TraceContext::parse(traceparent)
                .and_then(|t| t.with_request_id(request_id))
                .map_err(|e| e.to_string())?,
        ),
    };
    let request = Request {
        trace,
        verb: event.verb,
        noun: event.noun,
        parameters: event.parameters,
        query: event.query,
        content_type: event.content_type,
        body: event.body,
        headers: headers_from_wire(event.headers)?,
        delivery_id: Some(event.delivery_id).filter(|id| !id.is_empty()),
    };
    check_request(&request).map_err(|e| e.to_string())?;
    Ok(request)
}

fn reply_to_wire(reply: Reply, streamed: Option<Streamed>) -> proto::Reply {
    proto::Reply {
        content_type: reply.content_type,
        code: reply.code,
        body: reply.body,
        http_status: reply.status.map(u32::from).unwrap_or(0),
        streamed: streamed.is_some(),
        headers: headers_to_wire(reply.headers),
        content_length: streamed.and_then(|s| s.length),
    }
}

/// A reply from the wire; an HTTP status outside 100..=599 is dropped.
fn reply_from_wire(reply: proto::Reply) -> Result<Reply, String> {
    bounded("content type", &reply.content_type, limits::CONTENT_TYPE)?;
    let status = u16::try_from(reply.http_status)
        .ok()
        .filter(|s| (100..=599).contains(s));
    Ok(Reply {
        content_type: reply.content_type,
        code: reply.code,
        body: reply.body,
        status,
        headers: headers_from_wire(reply.headers)?,
        stream: None,
    })
}

fn error_kind_to_wire(kind: ErrorKind) -> proto::error::Kind {
    match kind {
        ErrorKind::UnknownMessage => proto::error::Kind::UnknownMessage,
        ErrorKind::Overloaded => proto::error::Kind::Overloaded,
        ErrorKind::BadRequest => proto::error::Kind::BadRequest,
        ErrorKind::ShuttingDown => proto::error::Kind::ShuttingDown,
        ErrorKind::Other => proto::error::Kind::Unspecified,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn round_trip(message: Message) -> Result<Message, DecodeError> {
        let encoded: Vec<u8> = encode(message).parts().flat_map(|p| p.to_vec()).collect();
        decode(Bytes::from(encoded).slice(4..))
    }

    fn hello() -> Hello {
        Hello {
            versions: 1..=3,
            role: Side::Client,
            software_version: "0.1.0".into(),
            identity: "web-1".into(),
            max_frame_bytes: 1 << 20,
            features: vec!["streams".into()],
        }
    }

    #[test]
    fn every_message_round_trips() {
        let body = Bytes::from([0u8, 255, 1, 2].repeat(10_000));
        let messages = || {
            [
                Message::Hello(hello()),
                Message::Event {
                    id: 7,
                    request: Request {
                        trace: Some(
                            TraceContext::new([3; 16], [4; 8])
                                .with_request_id("req-1")
                                .unwrap(),
                        ),
                        ..Request::new("POST", "jobs/42")
                            .with_parameters(vec!["a b".into()])
                            .with_body("application/octet-stream", body.clone())
                    },
                    timeout_ms: 30_000,
                    streamed: None,
                },
                Message::Event {
                    id: 8,
                    request: Request {
                        headers: Headers::new().with("range", "bytes=0-99"),
                        delivery_id: Some("00000000000000070123456789abcdef".into()),
                        ..Request::new("HEAD", "files")
                    },
                    timeout_ms: 1,
                    streamed: Some(Streamed { length: Some(7) }),
                },
                Message::Reply {
                    id: 7,
                    reply: Reply::bytes("text/csv", body.clone()).with_status(201),
                    streamed: None,
                },
                Message::Reply {
                    id: 8,
                    reply: Reply::bytes("text/csv", "")
                        .with_header("etag", "\"v1\"")
                        .with_header("content-range", "bytes 0-99/1000"),
                    streamed: Some(Streamed { length: None }),
                },
                Message::Data {
                    id: 8,
                    from_caller: true,
                    chunk: body.clone(),
                    end: DataEnd::More,
                },
                Message::Data {
                    id: 8,
                    from_caller: false,
                    chunk: Bytes::new(),
                    end: DataEnd::Aborted("disk error".into()),
                },
                Message::Data {
                    id: 8,
                    from_caller: false,
                    chunk: Bytes::from_static(b"x"),
                    end: DataEnd::Done,
                },
                Message::Credit {
                    id: 0,
                    from_caller: false,
                    bytes: 1 << 20,
                },
                Message::Cancel {
                    id: 8,
                    from_caller: true,
                },
                Message::Error {
                    id: 9,
                    kind: ErrorKind::Overloaded,
                    message: "busy".into(),
                },
                Message::Ping(1),
                Message::Pong(2),
                Message::Close("bye".into()),
                Message::Unknown { id: 3 },
                Message::Subscribe {
                    globs: vec!["sensors/**".into(), "alerts".into()],
                    resume_after: "1700000000000-0000abcd-00000001".into(),
                },
                Message::Publish {
                    id: 12,
                    event: Published {
                        topic: "sensors/t1".into(),
                        content_type: "text/plain".into(),
                        body: body.clone(),
                        id: String::new(),
                        published_ms: 0,
                    },
                },
                Message::Publish {
                    id: 0,
                    event: Published {
                        topic: "sensors/t1".into(),
                        content_type: String::new(),
                        body: Bytes::from_static(b"x"),
                        id: "1700000000000-0000abcd-00000001".into(),
                        published_ms: 1_700_000_000_000,
                    },
                },
            ]
        };
        for (m, expected) in messages().into_iter().zip(messages()) {
            assert_eq!(round_trip(m).unwrap(), expected);
        }
    }

    #[test]
    fn a_release_1_hello_speaks_exactly_its_version() {
        let old = proto::Hello {
            protocol_version: 1,
            role: proto::Role::Server as i32,
            ..Default::default()
        };
        assert_eq!(hello_from_wire(old).unwrap().versions, 1..=1);
    }

    #[test]
    fn events_from_a_peer_follow_the_grammar() {
        let event = |verb: &str, noun: &str| {
            encode(Message::Event {
                id: 5,
                request: Request::new(verb, noun),
                timeout_ms: 1,
                streamed: None,
            })
        };
        for (verb, noun) in [
            ("GET", "a/../b"),
            ("GET", ""),
            ("OPTIONS", "time"),
            ("GET", "a b"),
        ] {
            let bytes: Vec<u8> = event(verb, noun).parts().flat_map(|p| p.to_vec()).collect();
            match decode(Bytes::from(bytes).slice(4..)) {
                Err(DecodeError::Invalid {
                    id: 5,
                    what: "event",
                    ..
                }) => {}
                other => panic!("{verb} {noun}: {other:?}"),
            }
        }
        let zero = Message::Event {
            id: 0,
            request: Request::new("GET", "time"),
            timeout_ms: 1,
            streamed: None,
        };
        assert!(matches!(
            round_trip(zero),
            Err(DecodeError::Invalid { id: 0, .. })
        ));
    }

    #[test]
    fn peer_strings_are_bounded() {
        let mut long = hello();
        long.software_version = "x".repeat(limits::SOFTWARE_VERSION + 1);
        let err = round_trip(Message::Hello(long)).unwrap_err();
        assert!(err.to_string().contains("software version"), "{err}");
        let mut long = hello();
        long.identity = "x".repeat(limits::IDENTITY + 1);
        assert!(round_trip(Message::Hello(long)).is_err());
        let mut query = Request::new("GET", "time");
        query.query = "q".repeat(limits::QUERY + 1);
        assert!(
            matches!(check_request(&query), Err(RequestError::UriTooLong(m)) if m.contains("query"))
        );
        let mut content_type = Request::new("GET", "time");
        content_type.content_type = "t".repeat(limits::CONTENT_TYPE + 1);
        assert!(matches!(
            check_request(&content_type),
            Err(RequestError::HeaderTooLarge(_))
        ));
        let params = Request::new("GET", "t").with_parameters(vec![String::new(); 257]);
        assert!(check_request(&params).is_err());
        // What this node sends is cut to the bound rather than refused by the peer.
        let close = round_trip(Message::Close("é".repeat(limits::MESSAGE))).unwrap();
        let Message::Close(reason) = close else {
            panic!()
        };
        assert!(reason.len() <= limits::MESSAGE);
    }

    #[test]
    fn pubsub_frames_are_checked() {
        let publish = |id: u64, topic: &str, event_id: &str| Message::Publish {
            id,
            event: Published {
                topic: topic.into(),
                content_type: String::new(),
                body: Bytes::new(),
                id: event_id.into(),
                published_ms: 0,
            },
        };
        for bad in [
            publish(1, "a/../b", ""),
            publish(1, &"t".repeat(limits::TOPIC + 1), ""),
            publish(1, "t", "an id"),
            publish(0, "t", ""),
            publish(2, "t", "1-2-3"),
        ] {
            assert!(matches!(
                round_trip(bad),
                Err(DecodeError::Invalid {
                    what: "publish",
                    ..
                })
            ),);
        }
        let subscribe = |globs: Vec<String>| Message::Subscribe {
            globs,
            resume_after: String::new(),
        };
        for bad in [
            vec!["a[".to_string()],
            vec![String::new()],
            vec!["x".to_string(); limits::SUBSCRIPTIONS + 1],
            vec!["g".repeat(limits::GLOB + 1)],
        ] {
            assert!(matches!(
                round_trip(subscribe(bad)),
                Err(DecodeError::Invalid {
                    what: "subscribe",
                    ..
                })
            ));
        }
    }

    #[test]
    fn garbage_is_malformed() {
        assert!(matches!(
            decode(Bytes::from_static(&[0xff, 0xff, 0xff])),
            Err(DecodeError::Malformed(_))
        ));
    }

    #[test]
    fn delivery_ids_are_bounded() {
        let with = |id: &str| Request {
            delivery_id: Some(id.into()),
            ..Request::new("GET", "time")
        };
        assert!(check_request(&with("00000000000000070123456789abcdef")).is_ok());
        for bad in ["", "has space", "caf\u{e9}", &"x".repeat(129)] {
            assert!(check_request(&with(bad)).is_err(), "{bad:?}");
        }
        // Empty on the wire is none.
        let event = Message::Event {
            id: 3,
            request: Request::new("GET", "time"),
            timeout_ms: 1,
            streamed: None,
        };
        let Ok(Message::Event { request, .. }) = round_trip(event) else {
            panic!("not an event");
        };
        assert_eq!(request.delivery_id, None);
        // A bad one from a peer is refused for its event.
        let event = Message::Event {
            id: 4,
            request: with("two words"),
            timeout_ms: 1,
            streamed: None,
        };
        assert!(matches!(
            round_trip(event),
            Err(DecodeError::Invalid { id: 4, .. })
        ));
    }

    #[test]
    fn bad_status_is_dropped() {
        let r = reply_from_wire(proto::Reply {
            http_status: 70000,
            ..Default::default()
        })
        .unwrap();
        assert_eq!(r.status, None);
    }
}
