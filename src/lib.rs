//! restpipe: a durable, mutually authenticated pipe that carries REST calls between many
//! client nodes and one server node.
//!
//! Clients dial out and keep one TLS connection to the server alive; either side can call the
//! other. A call is an *event* (verb, noun, parameters, query, content type, body) that
//! crosses the pipe and is dispatched on the far side to a handler by name.
//!
//! The modules, from the wire up:
//!
//! - [`wire`]: framing (length prefix, size limit) and the checked [`wire::Message`] type;
//!   the protobuf types generated from `proto/restpipe.proto` are private to it;
//! - [`tls`]: PEM loading, rustls configurations, handshakes with a timeout;
//! - [`connection`]: one live connection, many requests in flight both ways, heartbeats;
//! - [`node`]: what both sides share: settings, handlers, dispatch;
//! - [`server`] and [`registry`]: the server's accept loop and its clients by identity;
//!   `admission` caps pending handshakes (in total and per source) and rate-limits their log;
//! - [`cluster`]: server replicas that act as one, with presence and routing over NATS
//!   (`--cluster`);
//! - [`client`] and [`backoff`]: the client's dial loop and its reconnect delays;
//! - [`metrics`]: statsd through cadence, never blocking;
//! - [`http`]: the local HTTP front door: axum routes behind a Host/Origin guard, served by
//!   our own hyper accept loop on TCP or a Unix socket;
//! - [`config`]: flags, environment variables and the TOML file;
//! - [`plugins`]: the handler plug-ins this build registers, one line each;
//! - [`policy`]: who may call what: the `--policy` file's rules on the pipe, and its scoped
//!   tokens at the front door;
//! - [`queue`]: queued delivery (`X-Event-Delivery: queued`): a durable store (redb) and a
//!   delivery task per peer;
//! - [`pubsub`]: publish/subscribe: each node's topic log (in redb on the server), read by
//!   cursor by the server's subscribed clients, the node's `event_{topic}` handlers and its
//!   `GET /events` listeners (docs/PUBSUB.md);
//! - [`app`]: whole nodes (pipe plus front door), the demo, graceful shutdown;
//! - [`error`]: why a call or a start failed.
//!
//! Handlers are written against the [`restpipe_handler`] crate, re-exported as [`handler`].

mod admission;
pub mod app;
pub mod backoff;
pub mod client;
pub mod cluster;
pub mod config;
pub mod connection;
pub mod error;
pub mod http;
pub mod metrics;
pub mod node;
pub mod plugins;
pub mod policy;
pub mod pubsub;
pub mod queue;
pub mod registry;
pub mod server;
pub mod tls;
pub mod util;
pub mod wire;

pub use restpipe_handler as handler;

pub use client::{ClientNode, ClientOptions};
pub use error::{CallError, NodeError};
pub use metrics::Metrics;
pub use node::{NodeOptions, PipeConfig};
pub use policy::Policy;
pub use server::{ServerNode, ServerOptions};
pub use tls::{TlsFiles, TlsMaterial};
