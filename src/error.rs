//! The errors of the library: why a call across the pipe failed, and why a node could not
//! start.

use std::time::Duration;

/// Why a call to the peer got no reply. Each kind maps to one HTTP status on the front door.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum CallError {
    /// The connection ended while the request was in flight (HTTP 502).
    #[error("the pipe closed while the request was in flight: {0}")]
    PipeClosed(String),
    /// No reply within the deadline (HTTP 504).
    #[error("no reply within {0:?}")]
    Timeout(Duration),
    /// The peer is not connected, and did not connect within the wait (HTTP 503).
    #[error("{0}")]
    NotConnected(String),
    /// Too many requests in flight on the connection (HTTP 503).
    #[error("overloaded: {0}")]
    Overloaded(String),
    /// The peer is shutting down (HTTP 503).
    #[error("the peer is shutting down: {0}")]
    ShuttingDown(String),
    /// The peer could not take the event (HTTP 502).
    #[error("the peer refused the event: {0}")]
    Refused(String),
    /// The body is over the frame limit (HTTP 413).
    #[error("body of {size} bytes is over the limit of {limit} bytes")]
    TooLarge {
        /// The body's size.
        size: usize,
        /// The limit.
        limit: usize,
    },
    /// The event breaks the protocol's grammar or bounds, so no peer would take it (HTTP 400);
    /// nothing was sent.
    #[error("the event cannot cross the pipe: {0}; nothing was sent")]
    BadRequest(String),
    /// The query string is over the protocol's bound (HTTP 414); nothing was sent.
    #[error("the event cannot cross the pipe: {0}; nothing was sent")]
    UriTooLong(String),
    /// A header carried with the event is over the protocol's bound (HTTP 431); nothing was
    /// sent.
    #[error("the event cannot cross the pipe: {0}; nothing was sent")]
    HeaderTooLarge(String),
    /// The encoded event would be over the peer's frame limit (HTTP 413); nothing was sent.
    #[error("the event would be a frame of {size} bytes, over the peer's limit of {limit} bytes; nothing was sent")]
    FrameTooLarge {
        /// The encoded frame's size.
        size: usize,
        /// The peer's limit.
        limit: usize,
    },
    /// A streamed body is over a limit (HTTP 413): this node's `--max-body`, or the frame
    /// limit of a release-1 peer, which takes bodies whole.
    #[error("the body is over the limit of {limit} bytes")]
    BodyTooLarge {
        /// The limit.
        limit: u64,
    },
    /// The request body could not be read whole from its source (HTTP 400): the HTTP caller
    /// went away or sent a malformed body.
    #[error("the request body could not be read: {0}")]
    BodyFailed(String),
    /// An IP address names more than one connected client (HTTP 409).
    #[error("{0}")]
    Ambiguous(String),
}

/// Why a node could not start.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// TLS material could not be loaded.
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    /// The pipe's listening socket could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The handler plug-ins do not fit together.
    #[error("handlers: {0}")]
    Handlers(String),
    /// A setting is invalid.
    #[error("{0}")]
    Config(String),
}
