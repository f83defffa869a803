//! The client node's pipe: dial the server, keep one connection up forever, and call the
//! server over it.
//!
//! The dial loop reconnects with exponential backoff and jitter, reset once a connection has
//! held for a while. Callers wait up to the connect wait for a connection before they get
//! [`CallError::NotConnected`].

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwap;
use restpipe_handler::{BodyStream, Lifecycle, Reply, Request, Side};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio_rustls::TlsConnector;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::backoff::Backoff;
use crate::connection::{self, Connection, ConnectionStatus};
use crate::error::{CallError, NodeError};
use crate::node::{NodeCore, NodeOptions};
use crate::policy::Policy;
use crate::tls::{self, TlsMaterial};

/// Settings of a client node.
pub struct ClientOptions {
    /// What every node has.
    pub node: NodeOptions,
    /// The server to dial, `host:port`.
    pub server: String,
    /// The name the server's certificate must carry; default: the host dialled.
    pub server_name: Option<String>,
    /// First reconnect delay (about; jitter applies).
    pub reconnect_initial: Duration,
    /// Longest reconnect delay.
    pub reconnect_max: Duration,
    /// A connection that held this long resets the backoff.
    pub stable_after: Duration,
}

impl ClientOptions {
    /// Options for a client of `server` (`host:port`) with default reconnect delays.
    pub fn new(node: NodeOptions, server: impl Into<String>) -> Self {
        ClientOptions {
            node,
            server: server.into(),
            server_name: None,
            reconnect_initial: Duration::from_millis(100),
            reconnect_max: Duration::from_secs(10),
            stable_after: Duration::from_secs(10),
        }
    }
}

/// A running client node's pipe. Clones share it.
#[derive(Clone)]
pub struct ClientNode {
    inner: Arc<Inner>,
}

struct Inner {
    core: Arc<NodeCore>,
    connector: ArcSwap<TlsConnector>,
    server: String,
    server_name: String,
    current: watch::Sender<Option<Connection>>,
    stop: CancellationToken,
    stopped: CancellationToken,
}

impl ClientNode {
    /// Start dialling the server; the node keeps reconnecting until [`ClientNode::shutdown`].
    pub fn start(options: ClientOptions) -> Result<ClientNode, NodeError> {
        let core = Arc::new(NodeCore::new(Side::Client, &options.node)?);
        let connector = options.node.tls.connector()?;
        let server_name = match options.server_name {
            Some(name) => name,
            None => host_of(&options.server)?,
        };
        let inner = Arc::new(Inner {
            core,
            connector: ArcSwap::from_pointee(connector),
            server: options.server,
            server_name,
            current: watch::Sender::new(None),
            stop: CancellationToken::new(),
            stopped: CancellationToken::new(),
        });
        let backoff = Backoff::new(options.reconnect_initial, options.reconnect_max);
        tokio::spawn(dial_loop(inner.clone(), backoff, options.stable_after));
        Ok(ClientNode { inner })
    }

    /// This node's identity, from its certificate.
    pub fn identity(&self) -> &str {
        &self.inner.core.identity
    }

    /// The server this node dials.
    pub fn server(&self) -> &str {
        &self.inner.server
    }

    /// The live connection, if there is one.
    pub fn connection(&self) -> Option<Connection> {
        self.inner
            .current
            .borrow()
            .as_ref()
            .filter(|c| !c.is_closed())
            .cloned()
    }

    /// Whether the pipe is up.
    pub fn is_connected(&self) -> bool {
        self.connection().is_some()
    }

    /// A snapshot of the connection to the server, if up.
    pub fn status(&self) -> Option<ConnectionStatus> {
        self.connection().map(|c| c.status())
    }

    /// The pipe's settings.
    pub fn pipe(&self) -> &crate::node::PipeConfig {
        &self.inner.core.pipe
    }

    /// The parts of the node its connections use.
    pub(crate) fn core(&self) -> &Arc<NodeCore> {
        &self.inner.core
    }

    /// Use `material` for every new connection from now on, and close the current one if the
    /// server's certificate is no longer accepted (revoked, or no longer chaining to the CA);
    /// its requests in flight fail with 502 and the node re-dials. Nothing changes when the
    /// material cannot be used. Returns the identities closed.
    pub fn reload_tls(&self, material: &TlsMaterial) -> Result<Vec<String>, NodeError> {
        self.inner.core.adopt_tls(
            material,
            |m| m.connector(),
            |connector| self.inner.connector.store(Arc::new(connector)),
            self.connection(),
            Some(&self.inner.server_name),
        )
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

    /// Wait up to `wait` for the pipe to be up.
    pub async fn wait_connected(&self, wait: Duration) -> Result<Connection, CallError> {
        let mut rx = self.inner.current.subscribe();
        let ready = async move {
            rx.wait_for(|c| c.as_ref().is_some_and(|c| !c.is_closed()))
                .await
                .ok()
                .and_then(|c| c.clone())
        };
        match tokio::time::timeout(wait, ready).await {
            Ok(Some(conn)) => Ok(conn),
            _ => Err(not_connected(&self.inner.server, wait)),
        }
    }

    /// Send `request` to the server and wait for its reply: up to the connect wait for the
    /// pipe to be up, then up to `timeout` (default: the request timeout) for the reply to
    /// start.
    pub async fn call(
        &self,
        request: Request,
        timeout: Option<Duration>,
    ) -> Result<Reply, CallError> {
        self.call_with_body(request, None, timeout).await
    }

    /// [`ClientNode::call`] with the request body as a stream (see
    /// [`Connection::call_with_body`]).
    pub async fn call_with_body(
        &self,
        request: Request,
        body: Option<BodyStream>,
        timeout: Option<Duration>,
    ) -> Result<Reply, CallError> {
        let pipe = &self.inner.core.pipe;
        let conn = self.wait_connected(pipe.connect_wait).await?;
        conn.call_with_body(request, body, timeout.unwrap_or(pipe.request_timeout))
            .await
    }

    /// Stop reconnecting, let requests being handled finish for at most `grace`, and close.
    pub async fn shutdown(&self, grace: Duration) {
        self.inner.stop.cancel();
        if let Some(conn) = self.connection() {
            conn.drain(grace, "the client is shutting down").await;
        }
        let _ = tokio::time::timeout(
            grace + Duration::from_secs(1),
            self.inner.stopped.cancelled(),
        )
        .await;
    }
}

fn not_connected(server: &str, wait: Duration) -> CallError {
    CallError::NotConnected(format!(
        "the pipe to the server {server} is down (waited {wait:?} for it to come back)"
    ))
}

/// The host part of `host:port` (brackets removed from an IPv6 address).
fn host_of(server: &str) -> Result<String, NodeError> {
    let host = match server.rsplit_once(':') {
        Some((host, port)) if port.parse::<u16>().is_ok() => host,
        _ => {
            return Err(NodeError::Config(format!(
                "server address {server:?} must be host:port"
            )))
        }
    };
    Ok(host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string())
}

async fn connect_once(
    inner: &Arc<Inner>,
) -> Result<(Connection, impl std::future::Future<Output = ()>), String> {
    let timeout = inner.core.pipe.handshake_timeout;
    let tcp = tokio::time::timeout(timeout, TcpStream::connect(&inner.server))
        .await
        .map_err(|_| format!("TCP connect timed out after {timeout:?}"))?
        .map_err(|e| format!("TCP connect failed: {e}"))?;
    let _ = tcp.set_nodelay(true);
    let addr = tcp.peer_addr().map_err(|e| e.to_string())?;
    let connector = inner.connector.load_full();
    let (stream, cert) = tls::connect(&connector, &inner.server_name, tcp, timeout)
        .await
        .map_err(|e| e.to_string())?;
    connection::open(inner.core.clone(), stream, cert, addr)
        .await
        .map_err(|e| e.to_string())
}

async fn dial_loop(inner: Arc<Inner>, mut backoff: Backoff, stable_after: Duration) {
    let core = inner.core.clone();
    let mut failures: u32 = 0;
    let mut disconnected_since: Option<SystemTime> = None;
    while !inner.stop.is_cancelled() {
        core.metrics.tick("client.connect.new.tick");
        let attempt = tokio::select! {
            _ = inner.stop.cancelled() => break,
            attempt = connect_once(&inner) => attempt,
        };
        match attempt {
            Ok((conn, run)) => {
                let peer = conn.peer().clone();
                info!(server = %inner.server, identity = %peer.identity, retries = failures, "connected");
                core.metrics.tick("client.connect.connected.tick");
                core.lifecycle(Lifecycle::ClientConnected {
                    retries: failures,
                    disconnected_since,
                });
                core.lifecycle(Lifecycle::ConnectionStarted {
                    peer_identity: peer.identity.clone(),
                    peer_addr: Some(peer.addr),
                });
                failures = 0;
                inner.current.send_replace(Some(conn.clone()));
                // A shutdown that began while this connection was being made may have looked
                // for a connection before it was published: let it go here.
                if inner.stop.is_cancelled() {
                    conn.drain(Duration::ZERO, "the client is shutting down")
                        .await;
                }
                let up = Instant::now();
                run.await;
                inner.current.send_replace(None);
                let reason = conn.close_reason().unwrap_or_default();
                core.lifecycle(Lifecycle::ConnectionStopped {
                    peer_identity: peer.identity,
                    peer_addr: Some(peer.addr),
                    reason: reason.clone(),
                });
                if inner.stop.is_cancelled() {
                    break;
                }
                core.metrics.tick("client.connect.broken.tick");
                warn!(server = %inner.server, %reason, "connection lost");
                disconnected_since = Some(SystemTime::now());
                if up.elapsed() >= stable_after {
                    backoff.reset();
                }
            }
            Err(error) => {
                failures = failures.saturating_add(1);
                core.lifecycle(Lifecycle::ClientConnectFailed {
                    retries: failures,
                    error: error.clone(),
                });
                // Log the first failures, then one in ten, so a long outage does not flood.
                if failures <= 3 || failures % 10 == 0 {
                    warn!(server = %inner.server, retries = failures, cause = %error, "cannot connect");
                }
            }
        }
        let delay = backoff.next_delay();
        tokio::select! {
            _ = inner.stop.cancelled() => break,
            _ = tokio::time::sleep(delay) => {}
        }
    }
    inner.stopped.cancel();
}
