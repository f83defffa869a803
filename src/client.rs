//! The client node's pipe: dial the server, keep one connection up forever, and call the
//! server over it.
//!
//! The server may be several (`host:port,host:port`, replicas of a cluster): the node starts
//! at a random one, goes on to the next when one cannot be reached, and backs off only once
//! every one has failed in a row; after a lost connection it starts again at a random one, so
//! that the clients of a replica that died spread over the survivors instead of all landing
//! on the next. A host name with several addresses counts as several: with several servers,
//! each attempt tries its addresses in a random order.
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
    /// The server to dial, `host:port`, or several, comma separated.
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
    /// Where to dial: `host:port` and the name its certificate must carry.
    targets: Vec<Target>,
    /// The name the certificate of the server connected now carries (for a reload).
    connected_name: std::sync::Mutex<String>,
    current: watch::Sender<Option<Connection>>,
    stop: CancellationToken,
    stopped: CancellationToken,
}

/// A client node that does not keep it alive: what its publish/subscribe hub holds (the
/// node holds the hub).
#[derive(Clone)]
pub(crate) struct WeakClient(std::sync::Weak<Inner>);

impl WeakClient {
    /// The client, if it still runs.
    pub(crate) fn upgrade(&self) -> Option<ClientNode> {
        self.0.upgrade().map(|inner| ClientNode { inner })
    }
}

impl ClientNode {
    pub(crate) fn downgrade(&self) -> WeakClient {
        WeakClient(Arc::downgrade(&self.inner))
    }

    /// Start dialling the server; the node keeps reconnecting until [`ClientNode::shutdown`].
    pub fn start(options: ClientOptions) -> Result<ClientNode, NodeError> {
        let core = Arc::new(NodeCore::new(Side::Client, &options.node)?);
        let connector = options.node.tls.connector()?;
        let targets = targets(&options.server, options.server_name.as_deref())?;
        let first_name = targets.first().map(|t| t.name.clone()).unwrap_or_default();
        let inner = Arc::new(Inner {
            core,
            connector: ArcSwap::from_pointee(connector),
            server: options.server,
            targets,
            connected_name: std::sync::Mutex::new(first_name),
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
            Some(&crate::util::lock(&self.inner.connected_name).clone()),
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

    /// The node's publish/subscribe hub, once started ([`crate::pubsub::Pubsub::start`]).
    pub fn pubsub(&self) -> Option<crate::pubsub::Pubsub> {
        self.inner.core.pubsub.get().cloned()
    }

    /// A receiver of the connection to the server, changed at every connect and disconnect.
    pub(crate) fn connections(&self) -> watch::Receiver<Option<Connection>> {
        self.inner.current.subscribe()
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
        // The pipe is nearly always up: no waiting future then. Waiting is boxed, so that its
        // state stays out of every call's future (moved whole as it starts).
        let conn = match self.connection() {
            Some(conn) => conn,
            None => {
                // Boxed in a statement of its own: a temporary lives (and takes room in this
                // future) until the end of its statement, which would include the await.
                let wait = Box::pin(self.wait_connected(pipe.connect_wait));
                wait.await?
            }
        };
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

/// One server to dial.
#[derive(Clone, Debug, PartialEq)]
struct Target {
    /// `host:port`.
    dial: String,
    /// The name its certificate must carry.
    name: String,
}

/// The servers of `server` (`host:port`, comma separated), each with the name its certificate
/// must carry: `server_name` if given, else its host.
fn targets(server: &str, server_name: Option<&str>) -> Result<Vec<Target>, NodeError> {
    let mut out = Vec::new();
    for dial in server.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let name = match server_name {
            Some(name) => name.to_string(),
            None => host_of(dial)?,
        };
        out.push(Target {
            dial: dial.to_string(),
            name,
        });
    }
    if out.is_empty() {
        return Err(NodeError::Config(format!(
            "server address {server:?} names no server"
        )));
    }
    if out.len() > 64 {
        return Err(NodeError::Config("at most 64 servers".into()));
    }
    Ok(out)
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
    target: &Target,
) -> Result<(Connection, impl std::future::Future<Output = ()>), String> {
    let timeout = inner.core.pipe.handshake_timeout;
    // Every address of the name: with one server, in the resolver's order (as a plain
    // connect); with several, in a random order, so that a name with several addresses
    // counts as several servers and the clients spread over them.
    let mut addrs: Vec<std::net::SocketAddr> =
        tokio::time::timeout(timeout, tokio::net::lookup_host(&target.dial))
            .await
            .map_err(|_| format!("resolving {} timed out after {timeout:?}", target.dial))?
            .map_err(|e| format!("cannot resolve {}: {e}", target.dial))?
            .collect();
    if inner.targets.len() > 1 {
        use rand::seq::SliceRandom;
        addrs.shuffle(&mut rand::rng());
    }
    let mut failure = format!("{} has no address", target.dial);
    let mut connected = None;
    for addr in addrs {
        match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
            Ok(Ok(tcp)) => {
                connected = Some(tcp);
                break;
            }
            Ok(Err(e)) => failure = format!("TCP connect to {addr} failed: {e}"),
            Err(_) => failure = format!("TCP connect to {addr} timed out after {timeout:?}"),
        }
    }
    let tcp = connected.ok_or(failure)?;
    let _ = tcp.set_nodelay(true);
    let addr = tcp.peer_addr().map_err(|e| e.to_string())?;
    let connector = inner.connector.load_full();
    let (stream, cert) = tls::connect(&connector, &target.name, tcp, timeout)
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
    let count = inner.targets.len();
    // A random start, then the next one after each failure.
    let mut at = rand::random_range(0..count);
    // Failures in a row since the last full round: back off once every server failed.
    let mut round = 0usize;
    while !inner.stop.is_cancelled() {
        core.metrics.tick("client.connect.new.tick");
        let target = inner.targets[at % count].clone();
        let attempt = tokio::select! {
            _ = inner.stop.cancelled() => break,
            attempt = connect_once(&inner, &target) => attempt,
        };
        let mut quick = false;
        match attempt {
            Ok((conn, run)) => {
                let peer = conn.peer().clone();
                info!(server = %target.dial, identity = %peer.identity, retries = failures, "connected");
                *crate::util::lock(&inner.connected_name) = target.name.clone();
                round = 0;
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
                warn!(server = %target.dial, %reason, "connection lost");
                disconnected_since = Some(SystemTime::now());
                if up.elapsed() >= stable_after {
                    backoff.reset();
                }
                // Start again anywhere: the clients of a server that died spread out.
                at = rand::random_range(0..count);
            }
            Err(error) => {
                failures = failures.saturating_add(1);
                core.lifecycle(Lifecycle::ClientConnectFailed {
                    retries: failures,
                    error: error.clone(),
                });
                // Log the first failures, then one in ten, so a long outage does not flood.
                if failures <= 3 || failures % 10 == 0 {
                    warn!(server = %target.dial, retries = failures, cause = %error, "cannot connect");
                }
                at = (at + 1) % count;
                round += 1;
                // Another server not yet tried in this round: go on to it at once (after a
                // short pause, so that a list of dead servers does not spin).
                quick = round % count != 0;
            }
        }
        let delay = if quick {
            Duration::from_millis(50)
        } else {
            backoff.next_delay()
        };
        tokio::select! {
            _ = inner.stop.cancelled() => break,
            _ = tokio::time::sleep(delay) => {}
        }
    }
    inner.stopped.cancel();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_server_list_becomes_targets() {
        let t = targets("a:1,[::1]:2, b:3", None).unwrap();
        let names: Vec<&str> = t.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, ["a", "::1", "b"]);
        assert_eq!(t[2].dial, "b:3");
        let t = targets("a:1,b:2", Some("localhost")).unwrap();
        assert!(t.iter().all(|t| t.name == "localhost"));
        assert!(targets("", None).is_err());
        assert!(targets("a", None).is_err());
    }
}
