//! What server and client nodes share: pipe settings, handlers and plug-ins, metrics, and the
//! dispatch of an incoming event to its handler.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::{ArcSwap, ArcSwapOption};
use bytes::Bytes;
use futures_util::FutureExt;
use restpipe_handler::{
    codes, handler_name, no_handler_reply, BodyStream, Context, HandlerError, Handlers, Lifecycle,
    Plugin, Reply, Request, Side,
};
use serde::Serialize;
use tracing::{info, warn};

use crate::admission::{self, LogLimiter};
use crate::error::NodeError;
use crate::metrics::{HandlerMetrics, Metrics};
use crate::policy::Policy;
use crate::tls::{PeerCert, TlsMaterial};
use crate::wire;

/// Settings of the pipe, the same on both sides. Every field is bounded and has a default.
#[derive(Clone, Debug)]
pub struct PipeConfig {
    /// How often each side sends a heartbeat.
    pub heartbeat_interval: Duration,
    /// A peer silent for this long is dead; a write stalled this long ends the connection.
    pub heartbeat_timeout: Duration,
    /// Limit on the TCP connect, the TLS handshake and the hello exchange, each.
    pub handshake_timeout: Duration,
    /// Largest body of an event or reply sent whole in one frame, in bytes (larger ones are
    /// streamed, on connections of protocol version 2).
    pub max_frame: usize,
    /// Largest request body this node takes, from its HTTP callers and from its peer, in
    /// bytes (`--max-body`).
    pub max_body: u64,
    /// How long a streamed body may bring no byte before it is cut off as incomplete.
    pub stream_idle_timeout: Duration,
    /// Requests in flight per connection and per direction.
    pub max_in_flight: usize,
    /// Bytes of requests and replies a connection may hold, per direction (see
    /// [`PipeConfig::byte_budget`]).
    pub max_in_flight_bytes: usize,
    /// Frames queued for the writer of one connection.
    pub write_queue: usize,
    /// How long a request waits for the peer to be connected.
    pub connect_wait: Duration,
    /// Default deadline of a request.
    pub request_timeout: Duration,
    /// Longest deadline a request may ask for.
    pub max_request_timeout: Duration,
}

impl Default for PipeConfig {
    fn default() -> Self {
        PipeConfig {
            heartbeat_interval: Duration::from_secs(5),
            heartbeat_timeout: Duration::from_secs(10),
            handshake_timeout: Duration::from_secs(10),
            max_frame: wire::DEFAULT_MAX_FRAME,
            max_body: DEFAULT_MAX_BODY,
            stream_idle_timeout: Duration::from_secs(30),
            max_in_flight: 1024,
            max_in_flight_bytes: DEFAULT_MAX_IN_FLIGHT_BYTES,
            write_queue: 1024,
            connect_wait: Duration::from_secs(5),
            request_timeout: Duration::from_secs(30),
            max_request_timeout: Duration::from_secs(600),
        }
    }
}

/// The default of [`PipeConfig::max_body`]: 4 GiB.
pub const DEFAULT_MAX_BODY: u64 = 4 * 1024 * 1024 * 1024;

/// The default of [`PipeConfig::max_in_flight_bytes`]: 64 MiB.
pub const DEFAULT_MAX_IN_FLIGHT_BYTES: usize = 64 * 1024 * 1024;

impl PipeConfig {
    /// The byte budget of a connection, per direction: `max_in_flight_bytes`, and never less
    /// than one frame of the largest size, so that a body of the limit always fits alone.
    pub fn byte_budget(&self) -> usize {
        self.max_in_flight_bytes
            .max(self.max_frame + wire::ENVELOPE_ALLOWANCE + wire::PREFIX)
            .min(u32::MAX as usize)
    }

    /// Refuse settings that cannot work, with a message that says which and why.
    pub fn validate(&self) -> Result<(), NodeError> {
        let bad = |m: String| Err(NodeError::Config(m));
        if self.heartbeat_interval.is_zero() || self.heartbeat_timeout <= self.heartbeat_interval {
            return bad(format!(
                "the heartbeat timeout ({:?}) must be longer than the heartbeat interval ({:?}), which must not be zero",
                self.heartbeat_timeout, self.heartbeat_interval
            ));
        }
        if self.stream_idle_timeout.is_zero() || self.max_body == 0 {
            return bad(format!(
                "the stream idle timeout ({:?}) and the body limit ({} bytes) must not be zero",
                self.stream_idle_timeout, self.max_body
            ));
        }
        if self.handshake_timeout.is_zero() {
            return bad("the handshake timeout must not be zero".into());
        }
        if !(1024..=1024 * 1024 * 1024).contains(&self.max_frame) {
            return bad(format!(
                "the maximum frame size must be between 1 KiB and 1 GiB, not {} bytes",
                self.max_frame
            ));
        }
        if self.max_in_flight == 0 || self.max_in_flight > 1 << 20 {
            return bad("requests in flight must be between 1 and 1048576".into());
        }
        if self.write_queue == 0 || self.write_queue > 1 << 20 {
            return bad("the write queue must hold between 1 and 1048576 frames".into());
        }
        if self.request_timeout.is_zero() || self.request_timeout > self.max_request_timeout {
            return bad(format!(
                "the request timeout must be between 1 ms and {:?}",
                self.max_request_timeout
            ));
        }
        Ok(())
    }
}

/// What a node is made of, whichever its side.
pub struct NodeOptions {
    /// Its TLS material: CA, certificate, key.
    pub tls: TlsMaterial,
    /// Pipe settings.
    pub pipe: PipeConfig,
    /// Handlers registered directly.
    pub handlers: Handlers,
    /// Handler plug-ins; their handlers for this side are added to `handlers`.
    pub plugins: Vec<Arc<dyn Plugin>>,
    /// Where metrics go.
    pub metrics: Metrics,
    /// Which peers may call which handlers of this node ([`Policy::open`]: all of them).
    pub policy: Policy,
}

impl NodeOptions {
    /// Options with default settings, no handlers, the open policy and metrics off.
    pub fn new(tls: TlsMaterial) -> Self {
        NodeOptions {
            tls,
            pipe: PipeConfig::default(),
            handlers: Handlers::new(),
            plugins: Vec::new(),
            metrics: Metrics::disabled(),
            policy: Policy::open(),
        }
    }

    /// The handlers a node of `side` made from these options would have: those registered
    /// directly and those of the plug-ins, as [`Handlers::names`] gives them. What a policy is
    /// checked against before the node starts.
    pub fn handler_names(&self, side: Side) -> Result<Vec<String>, NodeError> {
        Ok(all_handlers(side, &self.handlers, &self.plugins)?.names())
    }
}

/// `handlers` with the plug-ins' handlers for `side` merged in.
fn all_handlers(
    side: Side,
    handlers: &Handlers,
    plugins: &[Arc<dyn Plugin>],
) -> Result<Handlers, NodeError> {
    let mut handlers = handlers.clone();
    for plugin in plugins {
        handlers
            .merge(plugin.handlers(side))
            .map_err(|e| NodeError::Handlers(format!("plug-in {}: {e}", plugin.name())))?;
    }
    Ok(handlers)
}

/// The parts of a node that its connections use.
pub(crate) struct NodeCore {
    pub(crate) side: Side,
    pub(crate) identity: String,
    pub(crate) handlers: Handlers,
    pub(crate) plugins: Vec<Arc<dyn Plugin>>,
    pub(crate) pipe: PipeConfig,
    pub(crate) metrics: Metrics,
    /// The per-handler metric names, made once.
    pub(crate) handler_metrics: HandlerMetrics,
    /// This node's own certificate, replaced at a reload.
    pub(crate) own_cert: ArcSwap<PeerCert>,
    /// The outcome of the last reload, if there was one.
    pub(crate) last_reload: ArcSwapOption<ReloadRecord>,
    /// Who may call what; swapped whole when the policy is reloaded.
    pub(crate) policy: ArcSwap<Policy>,
    /// The budget of "call refused" log lines.
    forbidden_log: LogLimiter,
    /// The node's publish/subscribe hub, once it is started (docs/PUBSUB.md).
    pub(crate) pubsub: std::sync::OnceLock<crate::pubsub::Pubsub>,
}

/// The outcome of a reload of the node's files (SIGHUP), as `/status` shows it.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct ReloadRecord {
    /// When it happened, seconds since the epoch.
    pub at: f64,
    /// Whether the new material is in use. When not, the node kept everything it had.
    pub ok: bool,
    /// Why it was refused.
    pub error: Option<String>,
    /// Peers closed because the new material no longer accepts their certificate.
    pub closed: Vec<String>,
}

impl NodeCore {
    pub(crate) fn new(side: Side, options: &NodeOptions) -> Result<Self, NodeError> {
        options.pipe.validate()?;
        let handlers = all_handlers(side, &options.handlers, &options.plugins)?;
        let handler_metrics = options.metrics.handler_metrics(handlers.names());
        let own_cert = options.tls.own_cert()?;
        Ok(NodeCore {
            side,
            identity: options.tls.identity().to_string(),
            handlers,
            plugins: options.plugins.clone(),
            pipe: options.pipe.clone(),
            metrics: options.metrics.clone(),
            handler_metrics,
            own_cert: ArcSwap::from_pointee(own_cert),
            last_reload: ArcSwapOption::empty(),
            policy: ArcSwap::from_pointee(options.policy.clone()),
            forbidden_log: LogLimiter::new(admission::LOG_BURST, admission::LOG_PER_SECOND),
            pubsub: std::sync::OnceLock::new(),
        })
    }

    /// The names of this node's handlers, prefix handlers as `name*`.
    pub(crate) fn handler_names(&self) -> Vec<String> {
        self.handlers.names()
    }

    /// Refuse new material that names another identity than the node's: routing, hellos and
    /// logs use it, so a new identity needs a restart.
    pub(crate) fn check_same_identity(&self, material: &TlsMaterial) -> Result<(), NodeError> {
        if material.identity() == self.identity {
            return Ok(());
        }
        Err(NodeError::Config(format!(
            "the new certificate names identity {:?}, and this node runs as {:?}; a new identity needs a restart",
            material.identity(),
            self.identity
        )))
    }

    /// Switch to new TLS material, whole or not at all: check its identity, `build` what this
    /// side needs from it (an acceptor, a connector), and only when all of it is usable
    /// `install` it and the new own certificate. Then close the connections among `peers`
    /// whose certificate the material no longer accepts (revoked by a new CRL, or no longer
    /// chaining to the CA); their requests in flight fail with 502. `server_name` is what a
    /// client node verifies the server against. Returns the identities closed.
    pub(crate) fn adopt_tls<T>(
        &self,
        material: &TlsMaterial,
        build: impl FnOnce(&TlsMaterial) -> Result<T, crate::tls::TlsError>,
        install: impl FnOnce(T),
        peers: impl IntoIterator<Item = crate::connection::Connection>,
        server_name: Option<&str>,
    ) -> Result<Vec<String>, NodeError> {
        self.check_same_identity(material)?;
        let built = build(material)?;
        let own = material.own_cert()?;
        install(built);
        self.own_cert.store(Arc::new(own));
        let peer = self.side.peer();
        let mut closed = Vec::new();
        for conn in peers {
            if let Err(why) = material.verify_peer(&conn.peer().cert, server_name) {
                warn!(peer = %conn.peer().identity, cause = %why, "the {peer}'s certificate is no longer accepted; closing");
                if self.side == Side::Server {
                    self.metrics.tick("server.identity.cut.tick");
                }
                conn.close(format!(
                    "the {peer}'s certificate is no longer accepted ({why})"
                ));
                closed.push(conn.peer().identity.clone());
            }
        }
        Ok(closed)
    }

    /// Record the outcome of a reload for `/status`, and log it.
    pub(crate) fn record_reload(&self, record: ReloadRecord) {
        match &record.error {
            None => tracing::info!(closed = ?record.closed, "reload: new material in use"),
            Some(e) => {
                warn!(cause = %e, "reload refused; the node keeps everything it had");
                self.metrics.error_event("reload refused", e);
            }
        }
        self.last_reload.store(Some(Arc::new(record)));
    }

    /// Tell every plug-in about a lifecycle moment. A plug-in that panics is logged and
    /// skipped.
    pub(crate) fn lifecycle(&self, event: Lifecycle) {
        for plugin in &self.plugins {
            let call = std::panic::catch_unwind(AssertUnwindSafe(|| plugin.on_lifecycle(&event)));
            if call.is_err() {
                warn!(plugin = plugin.name(), "lifecycle hook panicked");
            }
        }
    }

    /// Run the handler an event names and turn every outcome into a reply: refused by the
    /// policy (403, code 253; asked before the handler is looked up, so a refused peer does
    /// not learn which handlers exist), no handler (404, code 255), an error or a panic (500,
    /// code 251), the deadline passing (504, code 251).
    pub(crate) async fn dispatch(
        &self,
        ctx: Context,
        request: Request,
        body: Option<BodyStream>,
    ) -> Reply {
        let started = Instant::now();
        let name = request.handler_name();
        // A HEAD is a GET without its body: a peer that may GET may HEAD.
        let allowed = |name: &str| self.policy.load().allows(&ctx.peer_identity, name);
        let as_get = || request.verb == "HEAD" && allowed(&handler_name("GET", &request.noun));
        if !allowed(&name) && !as_get() {
            return self.forbidden(&ctx.peer_identity, &name);
        }
        let Some(handler) = self.handlers.resolve_named(&name, &request) else {
            return no_handler_reply(&name, self.side);
        };
        let deadline = tokio::time::Instant::from_std(ctx.deadline);
        let call = AssertUnwindSafe(handler.call(ctx, request, body)).catch_unwind();
        let reply = match tokio::time::timeout_at(deadline, call).await {
            Ok(Ok(Ok(reply))) => reply,
            Ok(Ok(Err(err))) => err.into_reply(),
            Ok(Err(panic)) => {
                let message = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "handler panicked".into());
                warn!(handler = %name, %message, "handler panicked");
                HandlerError::new(message).with_class("Panic").into_reply()
            }
            Err(_) => {
                HandlerError::new(format!("handler {name} did not finish before its deadline"))
                    .with_class("DeadlineExceeded")
                    .with_status(504)
                    .into_reply()
            }
        };
        self.metrics
            .handled(&self.handler_metrics, &name, started.elapsed());
        reply
    }

    /// The reply to a call the policy refuses: 403, code 253, counted, and logged within the
    /// log's rate.
    fn forbidden(&self, peer: &str, handler: &str) -> Reply {
        self.metrics.tick("message.receive.forbidden.tick");
        let message = format!(
            "peer {peer:?} may not call {handler} on the {} node {:?} (policy)",
            self.side, self.identity
        );
        match self.forbidden_log.allow() {
            Some(0) => info!(%peer, %handler, "call refused by the policy"),
            Some(held_back) => {
                info!(%peer, %handler, held_back, "call refused by the policy (and {held_back} more, not logged)")
            }
            None => {}
        }
        let body = serde_json::json!({ "error": message });
        Reply {
            content_type: "application/json".into(),
            code: codes::FORBIDDEN,
            body: Bytes::from(body.to_string()),
            status: Some(403),
            ..Reply::default()
        }
    }
}
