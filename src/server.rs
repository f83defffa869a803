//! The server node's pipe: the accept loop, the per-connection handshake, the registry of
//! clients, calls to a named client, and graceful shutdown.
//!
//! Accepting and handshaking are kept apart: each accepted socket gets its own task, so a slow
//! or hostile handshake never stalls the accept loop, and a semaphore caps the connections
//! (handshakes included) that the server holds at once.

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock, Weak};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use restpipe_handler::{BodyStream, Lifecycle, Reply, Request, Side};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::admission::{self, Handshakes, LogLimiter, Slot};
use crate::connection::{self, Connection, ConnectionStatus};
use crate::error::{CallError, NodeError};
use crate::node::{NodeCore, NodeOptions};
use crate::policy::Policy;
use crate::registry::Registry;
use crate::tls::{self, TlsMaterial};

/// Connections the kernel queues for `accept`, at most (it caps this at
/// `net.core.somaxconn`). After a server restart every client dials at once; with tokio's
/// default of 128 the kernel drops their SYNs and they try again a second or more later.
const LISTEN_BACKLOG: u32 = 4096;

/// The default cap on pending handshakes.
pub const DEFAULT_MAX_HANDSHAKES: usize = 1024;
/// The default cap on pending handshakes from one source address.
pub const DEFAULT_MAX_HANDSHAKES_PER_SOURCE: usize = 64;

/// How often the idle hook runs while no client is connected.
const IDLE_EVERY: Duration = Duration::from_secs(60);

/// Settings of a server node.
pub struct ServerOptions {
    /// What every node has.
    pub node: NodeOptions,
    /// Where the pipe listens.
    pub bind: SocketAddr,
    /// Established connections held at once; a client past it is refused after its TLS
    /// handshake.
    pub max_connections: usize,
    /// Handshakes pending at once (TCP accepted, TLS and hello not finished), in total.
    pub max_handshakes: usize,
    /// Handshakes pending at once from one source address.
    pub max_handshakes_per_source: usize,
}

impl ServerOptions {
    /// Options for a server listening on `bind`, with at most 16384 connections, 1024 pending
    /// handshakes, and 64 pending handshakes from one address.
    pub fn new(node: NodeOptions, bind: SocketAddr) -> Self {
        ServerOptions {
            node,
            bind,
            max_connections: 16384,
            max_handshakes: DEFAULT_MAX_HANDSHAKES,
            max_handshakes_per_source: DEFAULT_MAX_HANDSHAKES_PER_SOURCE,
        }
    }
}

/// A running server node's pipe. Clones share it.
#[derive(Clone)]
pub struct ServerNode {
    inner: Arc<Inner>,
}

struct Inner {
    core: Arc<NodeCore>,
    registry: Registry,
    acceptor: ArcSwap<TlsAcceptor>,
    local_addr: SocketAddr,
    stop_accepting: CancellationToken,
    tracker: TaskTracker,
    limit: Arc<Semaphore>,
    handshakes: Arc<Handshakes>,
    refusal_log: LogLimiter,
    /// The cluster this server is a replica of, when `--cluster` is given.
    cluster: OnceLock<crate::cluster::Cluster>,
}

/// A server node that does not keep it alive: what its cluster membership holds.
#[derive(Clone)]
pub(crate) struct WeakServer(Weak<Inner>);

impl WeakServer {
    /// The server, if it still runs.
    pub(crate) fn upgrade(&self) -> Option<ServerNode> {
        self.0.upgrade().map(|inner| ServerNode { inner })
    }
}

impl ServerNode {
    /// Bind the pipe's port and start accepting clients.
    pub async fn start(options: ServerOptions) -> Result<ServerNode, NodeError> {
        let core = Arc::new(NodeCore::new(Side::Server, &options.node)?);
        let acceptor = options.node.tls.acceptor()?;
        let listener = listen(options.bind).map_err(|source| NodeError::Bind {
            addr: options.bind.to_string(),
            source,
        })?;
        let local_addr = listener.local_addr().map_err(|source| NodeError::Bind {
            addr: options.bind.to_string(),
            source,
        })?;
        let inner = Arc::new(Inner {
            core,
            registry: Registry::default(),
            acceptor: ArcSwap::from_pointee(acceptor),
            local_addr,
            stop_accepting: CancellationToken::new(),
            tracker: TaskTracker::new(),
            limit: Arc::new(Semaphore::new(options.max_connections.max(1))),
            handshakes: Handshakes::new(options.max_handshakes, options.max_handshakes_per_source),
            refusal_log: LogLimiter::new(admission::LOG_BURST, admission::LOG_PER_SECOND),
            cluster: OnceLock::new(),
        });
        inner.core.metrics.gauge("server.clients.connected", 0);
        // Tracked, so that `shutdown` returns only once the listener is closed and the port
        // free to bind again.
        inner.tracker.spawn(accept_loop(inner.clone(), listener));
        tokio::spawn(idle_hook(inner.clone()));
        info!(addr = %local_addr, identity = %inner.core.identity, "pipe listening");
        Ok(ServerNode { inner })
    }

    /// Join a cluster of replicas (see [`crate::cluster`]): from now on a call to a client
    /// not connected here goes to the replica that holds it. At most once.
    pub async fn join_cluster(
        &self,
        options: crate::cluster::ClusterOptions,
    ) -> Result<crate::cluster::Cluster, NodeError> {
        if self.inner.cluster.get().is_some() {
            return Err(NodeError::Config(
                "this server already is in a cluster".into(),
            ));
        }
        let cluster = crate::cluster::Cluster::start(options, self).await?;
        let _ = self.inner.cluster.set(cluster.clone());
        Ok(cluster)
    }

    /// The node's publish/subscribe hub, once started ([`crate::pubsub::Pubsub::start`]).
    pub fn pubsub(&self) -> Option<crate::pubsub::Pubsub> {
        self.inner.core.pubsub.get().cloned()
    }

    /// The cluster this server is a replica of, if any.
    pub fn cluster(&self) -> Option<&crate::cluster::Cluster> {
        self.inner.cluster.get()
    }

    pub(crate) fn downgrade(&self) -> WeakServer {
        WeakServer(Arc::downgrade(&self.inner))
    }

    /// The address the pipe listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.inner.local_addr
    }

    /// This node's identity, from its certificate.
    pub fn identity(&self) -> &str {
        &self.inner.core.identity
    }

    /// Whether the pipe still accepts clients.
    pub fn is_listening(&self) -> bool {
        !self.inner.stop_accepting.is_cancelled()
    }

    /// The registry of connected clients.
    pub fn registry(&self) -> &Registry {
        &self.inner.registry
    }

    /// A snapshot of every connected client.
    pub fn clients(&self) -> Vec<ConnectionStatus> {
        self.inner
            .registry
            .all()
            .iter()
            .map(Connection::status)
            .collect()
    }

    /// The parts of the node its connections use.
    pub(crate) fn core(&self) -> &Arc<NodeCore> {
        &self.inner.core
    }

    /// Use `material` for every new handshake from now on, and close the connections whose
    /// client certificate it no longer accepts (revoked by a new CRL, or no longer chaining to
    /// the CA); their requests in flight fail with 502. Nothing changes when the material
    /// cannot be used (another identity, a certificate that does not fit its key). Returns the
    /// identities closed.
    pub fn reload_tls(&self, material: &TlsMaterial) -> Result<Vec<String>, NodeError> {
        self.inner.core.adopt_tls(
            material,
            |m| m.acceptor(),
            |acceptor| self.inner.acceptor.store(Arc::new(acceptor)),
            self.inner.registry.all(),
            None,
        )
    }

    /// Handshakes pending now (TCP accepted, TLS and hello not finished).
    pub fn pending_handshakes(&self) -> usize {
        self.inner.handshakes.pending()
    }

    /// The pipe's settings.
    pub fn pipe(&self) -> &crate::node::PipeConfig {
        &self.inner.core.pipe
    }

    /// Replace the policy: calls dispatched from now on are judged by `policy`; those already
    /// running go on. Check it first with [`Policy::load`] against [`Self::handler_names`].
    pub fn set_policy(&self, policy: Policy) {
        self.inner.core.policy.store(Arc::new(policy));
    }

    /// The policy in force.
    pub fn policy(&self) -> Arc<Policy> {
        self.inner.core.policy.load_full()
    }

    /// The names of this node's handlers, prefix handlers as `name*`: what a policy's handler
    /// patterns are checked against.
    pub fn handler_names(&self) -> Vec<String> {
        self.inner.core.handler_names()
    }

    /// Send `request` to the client named `target` (identity, or an unambiguous IP address)
    /// and wait for its reply. Waits up to the connect wait for the client to be connected,
    /// then up to `timeout` (default: the request timeout) for the reply to start.
    pub async fn call(
        &self,
        target: &str,
        request: Request,
        timeout: Option<Duration>,
    ) -> Result<Reply, CallError> {
        self.call_with_body(target, request, None, timeout).await
    }

    /// [`ServerNode::call`] with the request body as a stream (see
    /// [`Connection::call_with_body`]).
    pub async fn call_with_body(
        &self,
        target: &str,
        request: Request,
        body: Option<BodyStream>,
        timeout: Option<Duration>,
    ) -> Result<Reply, CallError> {
        let pipe = &self.inner.core.pipe;
        let timeout = timeout.unwrap_or(pipe.request_timeout);
        // A client connected here needs no waiting future; the other paths (through another
        // replica, or waiting for the client) are boxed, so that their state stays out of
        // every call's future (moved whole as it starts).
        let conn = match self.inner.registry.find(target) {
            Ok(conn) if !conn.is_closed() => conn,
            // Each boxed in a statement of its own: a temporary lives (and takes room in this
            // future) until the end of its statement, which would include the await.
            _ => match self.inner.cluster.get() {
                Some(cluster) => {
                    let routed = Box::pin(cluster.call(self, target, request, body, timeout));
                    return routed.await;
                }
                None => {
                    let wait = Box::pin(self.inner.registry.wait_for(target, pipe.connect_wait));
                    wait.await?
                }
            },
        };
        conn.call_with_body(request, body, timeout).await
    }

    /// Stop accepting, let requests being handled finish for at most `grace`, tell every
    /// client, and close.
    pub async fn shutdown(&self, grace: Duration) {
        let inner = &self.inner;
        inner.stop_accepting.cancel();
        let drains = inner
            .registry
            .all()
            .into_iter()
            .map(|c| async move { c.drain(grace, "the server is shutting down").await });
        futures_util::future::join_all(drains).await;
        if let Some(cluster) = inner.cluster.get() {
            cluster.stop().await;
        }
        inner.tracker.close();
        if tokio::time::timeout(grace + Duration::from_secs(1), inner.tracker.wait())
            .await
            .is_err()
        {
            warn!("connections still open after the grace period");
        }
        info!("pipe closed");
    }
}

/// A listener on `addr` with [`LISTEN_BACKLOG`] (and `SO_REUSEADDR`, as tokio sets it).
fn listen(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

async fn accept_loop(inner: Arc<Inner>, listener: TcpListener) {
    let mut failures = 0u32;
    loop {
        let accepted = tokio::select! {
            _ = inner.stop_accepting.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((tcp, addr)) => {
                failures = 0;
                let slot = match inner.handshakes.admit(addr.ip()) {
                    Ok(slot) => slot,
                    Err(refused) => {
                        inner.refused(addr, refused.reason(), &"too many pending handshakes");
                        continue;
                    }
                };
                let _ = tcp.set_nodelay(true);
                inner.tracker.spawn(serve(inner.clone(), tcp, addr, slot));
            }
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning.
                failures = failures.saturating_add(1);
                let delay = Duration::from_millis(10u64 << failures.min(7));
                warn!(cause = %e, ?delay, "accept failed");
                tokio::time::sleep(delay).await;
            }
        }
    }
    debug!("accept loop stopped");
}

impl Inner {
    /// Count a refused handshake, and log it within the log's rate.
    fn refused(&self, addr: SocketAddr, reason: &str, cause: &dyn std::fmt::Display) {
        self.core
            .metrics
            .tick(format!("tls.handshake.rejected.{reason}.tick"));
        let allowed = self.refusal_log.allow();
        if allowed.is_some() {
            // Within the log's rate, so that a flood of refusals costs the page nothing.
            self.core
                .metrics
                .error_event("handshake refused", &format!("{addr}: {reason}: {cause}"));
        }
        match allowed {
            Some(0) => info!(peer = %addr, %reason, %cause, "handshake refused"),
            Some(held_back) => {
                info!(peer = %addr, %reason, %cause, held_back, "handshake refused (and {held_back} more, not logged)")
            }
            None => self.core.metrics.tick("tls.handshake.log_held_back.tick"),
        }
    }
}

async fn serve(inner: Arc<Inner>, tcp: TcpStream, addr: SocketAddr, slot: Slot) {
    let core = &inner.core;
    let acceptor = inner.acceptor.load_full();
    // The handshake and the hello are boxed: their state (a TLS session being set up, the
    // hello frames) is freed once they end, instead of sizing this task's future for as long
    // as the connection lives (measured: ~3.5 KiB of every idle connection's memory).
    let accepting = Box::pin(tls::accept(&acceptor, tcp, core.pipe.handshake_timeout));
    let (stream, cert) = match accepting.await {
        Ok(accepted) => accepted,
        Err(e) => return inner.refused(addr, tls::refusal_reason(&e), &e),
    };
    drop(acceptor);
    let identity = cert.identity.clone();
    let Ok(_permit) = inner.limit.clone().try_acquire_owned() else {
        return inner.refused(
            addr,
            "limit",
            &"the server holds its maximum of connections",
        );
    };
    let opened = Box::pin(connection::open(core.clone(), stream, cert, addr)).await;
    drop(slot);
    let (conn, run) = match opened {
        Ok(opened) => opened,
        Err(e) => {
            warn!(peer = %addr, %identity, cause = %e, "hello refused");
            core.metrics.tick("tls.handshake.rejected.hello.tick");
            core.metrics
                .error_event("hello refused", &format!("{identity} ({addr}): {e}"));
            return;
        }
    };
    let (replaced, count) = inner.registry.insert(conn.clone());
    if let Some(old) = replaced {
        info!(
            %identity,
            old = %old.peer().addr,
            new = %addr,
            old_fingerprint = %old.peer().cert.fingerprint,
            new_fingerprint = %conn.peer().cert.fingerprint,
            "newer connection replaces the older"
        );
        core.metrics.tick("server.identity.replaced.tick");
        Box::pin(old.drain(
            Duration::ZERO,
            "replaced by a newer connection with the same identity",
        ))
        .await;
    }
    // A handshake that finished while the server began shutting down: the shutdown may have
    // listed the clients before this one was added, so let it go here. Added first, checked
    // second: either the shutdown saw it, or this sees the shutdown.
    if inner.stop_accepting.is_cancelled() {
        Box::pin(conn.drain(Duration::ZERO, "the server is shutting down")).await;
    }
    info!(%identity, peer = %addr, clients = count, "client connected");
    core.metrics.gauge("server.clients.connected", count as u64);
    core.lifecycle(Lifecycle::ConnectionStarted {
        peer_identity: identity.clone(),
        peer_addr: Some(addr),
    });
    core.lifecycle(Lifecycle::ServerConnectionAdded {
        identity: identity.clone(),
        count,
    });

    run.await;

    let reason = conn.close_reason().unwrap_or_default();
    if let Some(count) = inner.registry.remove(&conn) {
        core.metrics.gauge("server.clients.connected", count as u64);
        core.lifecycle(Lifecycle::ServerConnectionRemoved {
            identity: identity.clone(),
            count,
        });
    }
    core.lifecycle(Lifecycle::ConnectionStopped {
        peer_identity: identity,
        peer_addr: Some(addr),
        reason,
    });
}

async fn idle_hook(inner: Arc<Inner>) {
    let mut idle_since = SystemTime::now();
    let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + IDLE_EVERY, IDLE_EVERY);
    loop {
        tokio::select! {
            _ = inner.stop_accepting.cancelled() => return,
            _ = ticker.tick() => {}
        }
        if inner.registry.is_empty() {
            inner.core.lifecycle(Lifecycle::ServerIdle { idle_since });
        } else {
            idle_since = SystemTime::now();
        }
    }
}
