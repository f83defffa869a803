//! The wire: what crosses a pipe connection, and nothing else of the crate knows its format.
//!
//! - `framing`: the length prefix, the size limit checked before allocation, and encoding
//!   that never copies a large body;
//! - `message`: [`Message`], the domain type the rest of the crate speaks, decoded with
//!   validation on the way in (the noun grammar of [`restpipe_handler::grammar`], the verb
//!   list, non-zero request ids, and the bounds of [`limits`] on every peer string);
//! - `proto` (private): the types prost generates from `proto/restpipe.proto`.
//!
//! The protocol is described in `docs/PROTOCOL.md`.

mod framing;
mod message;
mod proto;

pub use framing::{codec, frame_reader, Encoded, PREFIX, SPLIT_BODY};
pub use message::{
    check_event_id, check_published, check_request, check_subscription, check_topic,
    check_topic_glob, decode, encode, DataEnd, DecodeError, ErrorKind, Hello, Message, Published,
    RequestError, Streamed,
};

/// The highest version of the wire protocol this build speaks.
pub const PROTOCOL_VERSION: u32 = 2;

/// The lowest version of the wire protocol this build speaks. A peer whose range of versions
/// does not meet `MIN_PROTOCOL_VERSION..=PROTOCOL_VERSION` is refused.
pub const MIN_PROTOCOL_VERSION: u32 = 1;

/// The optional features this build offers in its hello. Those the peer offers too are in use.
pub const FEATURES: &[&str] = &[TRACE_CONTEXT, PUBSUB, FINE_CREDIT];

/// The feature by which the receiver of a streamed body credits it back in steps of at most
/// [`CREDIT_STEP`], so that its sender may keep less than [`STREAM_WINDOW`] in flight
/// ([`SHARED_WINDOW`]) without waiting for credit that would come only past the window. A
/// sender keeps the whole window in flight to a peer that does not list it.
pub const FINE_CREDIT: &str = "fine-credit";

/// The feature by which a client subscribes to topics and either side sends published events
/// ([`Message::Subscribe`], [`Message::Publish`]; docs/PUBSUB.md). Neither frame is sent to a
/// peer that does not list it.
pub const PUBSUB: &str = "pubsub";

/// The feature by which events carry their trace context (`traceparent`, request id).
pub const TRACE_CONTEXT: &str = "trace-context";

/// The first version in which bodies may be streamed ([`Message::Data`], [`Message::Credit`],
/// [`Message::Cancel`]) and headers cross with events and replies.
pub const STREAMING_VERSION: u32 = 2;

/// The largest chunk a [`Message::Data`] frame carries: 256 KiB. Larger chunks are cut.
pub const DATA_CHUNK: usize = 256 * 1024;

/// The window of one streamed body: its sender may have this many bytes sent and not yet
/// credited back by the receiver (version 2).
pub const STREAM_WINDOW: u64 = 2 * 1024 * 1024;

/// What the sender of a body keeps in flight, at most, while the connection carries other
/// requests (with [`FINE_CREDIT`]): 256 KiB. Every frame sent after a body's data waits
/// behind the data already in the TCP stream, so a smaller window keeps other requests'
/// latency low while a large transfer shares their connection (docs/PERFORMANCE.md,
/// "Small calls during a large transfer").
pub const SHARED_WINDOW: u64 = 256 * 1024;

/// The largest chunk a [`Message::Data`] frame carries while its body keeps to
/// [`SHARED_WINDOW`]: 64 KiB, so that several are in flight at once.
pub const SHARED_CHUNK: usize = 64 * 1024;

/// The receiver of a body credits it back each time this much of it has been read (with
/// [`FINE_CREDIT`]; a release-2 node without it credited a quarter of [`STREAM_WINDOW`]).
pub const CREDIT_STEP: u64 = 64 * 1024;

/// The window of a connection: the bytes of every streamed body on it, both ways counted
/// apart, that a sender may have sent and not yet credited back (version 2).
pub const CONNECTION_WINDOW: u64 = 32 * 1024 * 1024;

/// The default limit on an event's or a reply's body: 16 MiB.
pub const DEFAULT_MAX_FRAME: usize = 16 * 1024 * 1024;

/// Room allowed on top of the body limit for the rest of a frame (verb, noun, parameters,
/// query, content type), so that a body of exactly the limit still fits.
pub const ENVELOPE_ALLOWANCE: usize = 64 * 1024;

/// Bounds on the strings and lists a peer controls, in bytes or items. A received frame past
/// one is refused (see [`DecodeError::Invalid`]); what this node sends is checked or cut to
/// them first.
pub mod limits {
    /// The software version in a hello.
    pub const SOFTWARE_VERSION: usize = 64;
    /// The identity in a hello (a DNS name is at most 253 bytes).
    pub const IDENTITY: usize = 255;
    /// Features listed in a hello.
    pub const FEATURES: usize = 32;
    /// The name of one feature.
    pub const FEATURE_NAME: usize = 64;
    /// Parameters of one event.
    pub const PARAMETERS: usize = 256;
    /// The query string of an event.
    pub const QUERY: usize = 8 * 1024;
    /// The content type of an event or a reply.
    pub const CONTENT_TYPE: usize = 256;
    /// The message of an error frame, and the reason of a close frame.
    pub const MESSAGE: usize = 1024;
    /// The delivery id of a queued event: 1 to this many visible ASCII characters.
    pub const DELIVERY_ID: usize = 128;
    /// A published event's topic.
    pub const TOPIC: usize = 256;
    /// One topic glob of a subscription.
    pub const GLOB: usize = 256;
    /// Topic globs in one subscription (a node's `--subscribe`, a client's subscribe frame).
    pub const SUBSCRIPTIONS: usize = 64;
    /// A published event's id.
    pub const EVENT_ID: usize = 64;
}
