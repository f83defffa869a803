//! Server replicas that act as one server, over NATS (`restpipe server --cluster nats://...`).
//!
//! Each replica is an ordinary server node; this module adds, over one NATS connection:
//!
//! - **presence**: on `restpipe.<cluster>.presence` each replica announces the clients it
//!   holds (`up`, `down`), and every [`REFRESH`] a `snapshot` of all of them, so that every
//!   replica's table converges even after lost messages; entries not refreshed for
//!   [`EXPIRE`] go (a replica killed outright);
//! - **routing**: the replica that holds a client subscribes to
//!   `restpipe.<cluster>.call.<identity>` (queue group `holders`); a replica asked for a
//!   client it does not hold publishes the call there and carries it through ([`carry`]);
//!   "no responders" means nobody holds it, and the call waits up to the connect wait for it
//!   to appear on any replica, then is 503, as on a single node;
//! - **fencing**: each connection gets an epoch, `max(now in ms, highest epoch seen for that
//!   identity + 1)`, ordered with the replica name as tie-break. A replica that hears of a
//!   newer epoch for a client it holds closes its own connection; an announcement older than
//!   what a replica knows is ignored, and a `down` removes only the entry of its own epoch,
//!   so a late message from the replica that lost cannot undo the one that won.
//!
//! docs/CLUSTER.md has the subjects, the trust model and what is lost while NATS is down.

pub(crate) mod carry;

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use async_nats::Client;
use bytes::Bytes;
use futures_util::StreamExt;
use restpipe_handler::{BodyStream, Reply, Request};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::error::{CallError, NodeError};
use crate::server::{ServerNode, WeakServer};

/// How often each replica sends the snapshot of its clients.
pub const REFRESH: Duration = Duration::from_secs(5);
/// An entry of another replica not refreshed for this long is dropped.
pub const EXPIRE: Duration = Duration::from_secs(16);
/// The longest identity, replica name or cluster name taken from NATS.
const MAX_NAME: usize = 256;
/// Entries in one presence message, at most.
const MAX_ENTRIES: usize = 2000;
/// Clients of other replicas held in the table, at most: a publisher on the cluster's
/// subjects cannot make it grow without bound.
const MAX_REMOTE: usize = 1_000_000;
/// Other replicas remembered as heard from, at most.
const MAX_REPLICAS: usize = 4096;

/// Settings of the cluster connection.
#[derive(Clone, Debug, Default)]
pub struct ClusterOptions {
    /// NATS server URLs (`nats://[user:pass@]host:4222`, `tls://...`).
    pub urls: Vec<String>,
    /// The cluster's name: the second token of every subject; replicas of one cluster share
    /// it.
    pub name: String,
    /// This replica's name, unique in the cluster.
    pub replica: String,
    /// A NATS credentials file (JWT and NKey seed).
    pub creds: Option<PathBuf>,
    /// A CA to verify the NATS server's certificate with (and TLS is then required).
    pub tls_ca: Option<PathBuf>,
}

/// Whether `name` can be a token of a subject: `A-Z a-z 0-9 _ -`, 1 to 64 characters.
pub fn valid_token(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// An identity as one subject token: bytes outside `A-Z a-z 0-9 _ -` become `~xx` (hex), so
/// that no identity can name a wildcard or another subject.
pub fn identity_token(identity: &str) -> String {
    let mut out = String::with_capacity(identity.len());
    for b in identity.bytes() {
        if b.is_ascii_alphanumeric() || b == b'_' || b == b'-' {
            out.push(b as char);
        } else {
            out.push_str(&format!("~{b:02x}"));
        }
    }
    out
}

/// A client held by another replica, as its announcements say.
#[derive(Clone, Debug, Serialize)]
pub struct RemoteClient {
    /// The client's identity.
    pub identity: String,
    /// The replica that holds it.
    pub replica: String,
    /// The client's address, as that replica sees it.
    pub address: String,
    /// Seconds since the epoch when it connected.
    pub connected_since: f64,
    /// Its connection epoch.
    pub epoch: u64,
    #[serde(skip)]
    seen: Option<Instant>,
}

/// One client in a presence message.
#[derive(Serialize, Deserialize, Debug, Clone)]
struct Seen {
    identity: String,
    epoch: u64,
    address: String,
    since: f64,
}

/// A presence message.
#[derive(Serialize, Deserialize, Debug)]
struct Presence {
    replica: String,
    /// `up`, `down`, `snapshot`, or `hello` (a replica (re)joined: send your snapshot).
    kind: String,
    clients: Vec<Seen>,
}

/// A client held here.
struct Local {
    conn_id: u64,
    epoch: u64,
    seen: Seen,
    subscription: tokio::task::AbortHandle,
}

/// A running cluster membership. Clones share it.
#[derive(Clone)]
pub struct Cluster {
    inner: Arc<Inner>,
}

/// Whoever holds more than one of `local`, `epochs` and `remote` at once takes them in that
/// order: the presence task and the reconcile task run on different worker threads, and two
/// orders deadlock them (both workers blocked, the replica dead but alive).
struct Inner {
    client: Client,
    options: ClusterOptions,
    server: WeakServer,
    remote: Mutex<HashMap<String, RemoteClient>>,
    local: Mutex<HashMap<String, Local>>,
    /// The highest epoch seen for each identity, here or elsewhere.
    epochs: Mutex<HashMap<String, u64>>,
    /// Connections closed here because a newer one won elsewhere: never announced again,
    /// even while they are still in the registry, on their way out.
    fenced: Mutex<std::collections::HashSet<u64>>,
    changed: watch::Sender<u64>,
    stop: CancellationToken,
    max_chunk: usize,
    /// Another replica (re)joined and asked for everyone's snapshot.
    snapshot_asked: tokio::sync::Notify,
    /// When each other replica was last heard from (any presence message: every replica sends
    /// a snapshot every [`REFRESH`], empty or not).
    replicas: Mutex<HashMap<String, Instant>>,
    /// Since when the NATS connection is up; `None` while it is down.
    connected_since: Arc<Mutex<Option<Instant>>>,
}

impl Cluster {
    /// Connect to NATS (in the background: a NATS that is down at start is retried, the
    /// replica serving its own clients meanwhile) and join the cluster as `server`.
    pub async fn start(options: ClusterOptions, server: &ServerNode) -> Result<Cluster, NodeError> {
        if options.urls.is_empty() {
            return Err(NodeError::Config("--cluster needs a NATS URL".into()));
        }
        if !valid_token(&options.name) {
            return Err(NodeError::Config(format!(
                "--cluster-name {:?} must be 1 to 64 of A-Z a-z 0-9 _ -",
                options.name
            )));
        }
        if options.replica.is_empty() || options.replica.len() > 128 {
            return Err(NodeError::Config(
                "--replica-name must be 1 to 128 characters".into(),
            ));
        }
        let (connected_tx, connected_rx) = watch::channel(0u64);
        let connected_since: Arc<Mutex<Option<Instant>>> = Arc::default();
        let since = connected_since.clone();
        let mut connect = async_nats::ConnectOptions::new()
            .name(format!("restpipe {}", options.replica))
            .retry_on_initial_connect()
            .max_reconnects(None)
            .connection_timeout(Duration::from_secs(2))
            .ping_interval(Duration::from_secs(5))
            .reconnect_delay_callback(|attempts| {
                Duration::from_millis((100u64 << attempts.min(4)).min(2000))
            })
            .event_callback(move |event| {
                let tx = connected_tx.clone();
                let since = since.clone();
                async move {
                    match event {
                        async_nats::Event::Connected => {
                            info!("cluster: connected to NATS");
                            *crate::util::lock(&since) = Some(Instant::now());
                            tx.send_modify(|n| *n += 1);
                        }
                        async_nats::Event::Disconnected => {
                            *crate::util::lock(&since) = None;
                            warn!(
                                "cluster: NATS is unreachable; serving this replica's clients only"
                            )
                        }
                        other => debug!(event = %other, "cluster: NATS event"),
                    }
                }
            });
        if let Some(creds) = &options.creds {
            connect = connect.credentials_file(creds).await.map_err(|e| {
                NodeError::Config(format!("--cluster-creds {}: {e}", creds.display()))
            })?;
        }
        if let Some(ca) = &options.tls_ca {
            connect = connect.add_root_certificates(ca.clone()).require_tls(true);
        }
        let client = connect
            .connect(options.urls.as_slice())
            .await
            .map_err(|e| NodeError::Config(format!("--cluster: {e}")))?;
        let inner = Arc::new(Inner {
            client,
            options,
            server: server.downgrade(),
            remote: Mutex::new(HashMap::new()),
            local: Mutex::new(HashMap::new()),
            epochs: Mutex::new(HashMap::new()),
            fenced: Mutex::new(std::collections::HashSet::new()),
            changed: watch::Sender::new(0),
            stop: CancellationToken::new(),
            max_chunk: carry::MAX_CHUNK,
            snapshot_asked: tokio::sync::Notify::new(),
            replicas: Mutex::new(HashMap::new()),
            connected_since,
        });
        tokio::spawn(presence_loop(inner.clone()));
        tokio::spawn(reconcile_loop(inner.clone(), server.registry().changes()));
        tokio::spawn(refresh_loop(inner.clone(), connected_rx));
        info!(
            replica = %inner.options.replica,
            cluster = %inner.options.name,
            nats = %inner.options.urls.join(","),
            "cluster: replica joining"
        );
        Ok(Cluster { inner })
    }

    /// This replica's name.
    pub fn replica(&self) -> &str {
        &self.inner.options.replica
    }

    /// Whether the NATS connection is up.
    pub fn is_connected(&self) -> bool {
        self.inner.client.connection_state() == async_nats::connection::State::Connected
    }

    /// Whether the replica `name` was heard from on NATS within [`EXPIRE`] (this replica
    /// counts as present).
    pub fn replica_present(&self, name: &str) -> bool {
        name == self.replica()
            || crate::util::lock(&self.inner.replicas)
                .get(name)
                .is_some_and(|at| at.elapsed() < EXPIRE)
    }

    /// Whether this replica has been on NATS long enough ([`EXPIRE`]) to have heard every
    /// live replica: before that, a replica not heard from may just not have spoken yet.
    pub fn presence_settled(&self) -> bool {
        self.is_connected()
            && crate::util::lock(&self.inner.connected_since).is_some_and(|t| t.elapsed() >= EXPIRE)
    }

    /// The clients other replicas hold, by identity.
    pub fn remote_clients(&self) -> Vec<RemoteClient> {
        let mut all: Vec<RemoteClient> = crate::util::lock(&self.inner.remote)
            .values()
            .cloned()
            .collect();
        all.sort_by(|a, b| a.identity.cmp(&b.identity));
        all
    }

    /// The connection epoch of a client held here.
    pub fn local_epoch(&self, identity: &str) -> Option<u64> {
        crate::util::lock(&self.inner.local)
            .get(identity)
            .map(|l| l.epoch)
    }

    /// What `/status` shows of the cluster.
    pub fn status(&self) -> serde_json::Value {
        let replicas: std::collections::BTreeSet<String> = crate::util::lock(&self.inner.remote)
            .values()
            .map(|r| r.replica.clone())
            .collect();
        // One lock at a time (see [`Inner`] for the order when several are held).
        let here = crate::util::lock(&self.inner.local).len();
        let elsewhere = crate::util::lock(&self.inner.remote).len();
        serde_json::json!({
            "replica": self.replica(),
            "name": self.inner.options.name,
            "nats": if self.is_connected() { "connected" } else { "unreachable" },
            "nats_urls": self.inner.options.urls.iter().map(|u| redact(u)).collect::<Vec<_>>(),
            "clients_here": here,
            "clients_elsewhere": elsewhere,
            "other_replicas_with_clients": replicas,
        })
    }

    /// Stop taking part: the tasks end; the NATS connection is flushed.
    pub async fn stop(&self) {
        let entries: Vec<Seen> = {
            let mut local = crate::util::lock(&self.inner.local);
            local
                .drain()
                .map(|(_, l)| {
                    l.subscription.abort();
                    l.seen
                })
                .collect()
        };
        if !entries.is_empty() {
            self.inner.announce("down", entries).await;
        }
        self.inner.stop.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(1), self.inner.client.flush()).await;
    }

    /// Call the client `target`, which is not connected here: through the replica that holds
    /// it, waiting up to the connect wait for it to appear on any replica (or here).
    pub(crate) async fn call(
        &self,
        server: &ServerNode,
        target: &str,
        mut request: Request,
        mut body: Option<BodyStream>,
        timeout: Duration,
    ) -> Result<Reply, CallError> {
        let inner = &self.inner;
        let wait = server.pipe().connect_wait;
        let deadline = tokio::time::Instant::now() + wait;
        // A body too large to go inline goes as a stream.
        if body.is_none() && request.body.len() > carry::INLINE_MAX {
            body = Some(BodyStream::once(std::mem::take(&mut request.body)));
        }
        // Clients are found across replicas by identity; an IP address names a client here.
        let by_identity = target.parse::<IpAddr>().is_err() && target.len() <= MAX_NAME;
        let subject = format!(
            "restpipe.{}.call.{}",
            inner.options.name,
            identity_token(target)
        );
        let mut registry_changes = server.registry().changes();
        let mut presence_changes = inner.changed.subscribe();
        let mut delay = Duration::from_millis(25);
        loop {
            match server.registry().find(target) {
                Ok(conn) if !conn.is_closed() => {
                    return conn.call_with_body(request, body, timeout).await
                }
                Err(e @ CallError::Ambiguous(_)) => return Err(e),
                _ => {}
            }
            let now = tokio::time::Instant::now();
            if by_identity && self.is_connected() {
                let head = carry::call_head(
                    target,
                    &inner.options.replica,
                    &request,
                    body.as_ref(),
                    timeout,
                    inner.max_chunk,
                );
                let attempt = carry::request(carry::Outgoing {
                    client: &inner.client,
                    subject: subject.clone(),
                    head: &head,
                    inline: request.body.clone(),
                    body,
                    timeout,
                    idle: server.pipe().stream_idle_timeout,
                    max_chunk: inner.max_chunk,
                })
                .await;
                match attempt {
                    carry::Attempt::Done(result) => return result,
                    carry::Attempt::Nobody(back) => body = back,
                }
            }
            if tokio::time::Instant::now() >= deadline || now >= deadline {
                return Err(CallError::NotConnected(
                    if !by_identity || self.is_connected() {
                        format!("client {target} is not connected to any replica (waited {wait:?})")
                    } else {
                        format!(
                        "client {target} is not connected to this replica, and the cluster is unreachable (NATS is down), so other replicas cannot be asked (waited {wait:?})"
                    )
                    },
                ));
            }
            // Something changed here or in the cluster, or a short, growing wait.
            let pause = tokio::time::sleep_until(deadline.min(tokio::time::Instant::now() + delay));
            tokio::select! {
                _ = pause => {}
                _ = registry_changes.changed() => {}
                _ = presence_changes.changed() => {}
            }
            delay = (delay * 2).min(Duration::from_millis(400));
        }
    }
}

/// A URL with its password hidden.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            format!("{}://<credentials>@{}", &url[..scheme], &url[at + 1..])
        }
        _ => url.to_string(),
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

impl Inner {
    fn subject(&self, what: &str) -> String {
        format!("restpipe.{}.{what}", self.options.name)
    }

    fn notify(&self) {
        self.changed.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// Publish presence entries, in messages of at most [`MAX_ENTRIES`].
    /// An empty snapshot still goes out: it says this replica is alive.
    async fn announce(&self, kind: &str, entries: Vec<Seen>) {
        let mut batches: Vec<&[Seen]> = entries.chunks(MAX_ENTRIES / 2).collect();
        if batches.is_empty() && kind == "snapshot" {
            batches.push(&[]);
        }
        for batch in batches {
            let message = Presence {
                replica: self.options.replica.clone(),
                kind: kind.to_string(),
                clients: batch.to_vec(),
            };
            let payload = Bytes::from(serde_json::to_vec(&message).unwrap_or_default());
            let publish = self.client.publish(self.subject("presence"), payload);
            if !matches!(
                tokio::time::timeout(Duration::from_secs(2), publish).await,
                Ok(Ok(()))
            ) {
                debug!("cluster: presence not published (NATS unreachable)");
                return;
            }
        }
    }

    /// A presence message from another replica.
    fn heard(self: &Arc<Self>, presence: Presence) {
        let replica = presence.replica;
        if replica == self.options.replica || replica.is_empty() || replica.len() > 128 {
            return;
        }
        {
            let mut replicas = crate::util::lock(&self.replicas);
            if replicas.len() >= MAX_REPLICAS && !replicas.contains_key(&replica) {
                replicas.retain(|_, at| at.elapsed() < EXPIRE);
            }
            if replicas.len() < MAX_REPLICAS || replicas.contains_key(&replica) {
                replicas.insert(replica.clone(), Instant::now());
            }
        }
        if presence.kind == "hello" {
            self.snapshot_asked.notify_one();
            return;
        }
        let mut fenced = Vec::new();
        {
            // The order of [`Inner`]: local, epochs, remote.
            let local = crate::util::lock(&self.local);
            let mut epochs = crate::util::lock(&self.epochs);
            let mut remote = crate::util::lock(&self.remote);
            for seen in presence.clients.into_iter().take(MAX_ENTRIES) {
                if seen.identity.is_empty() || seen.identity.len() > MAX_NAME {
                    continue;
                }
                let id = seen.identity.clone();
                if presence.kind == "down" {
                    if remote
                        .get(&id)
                        .is_some_and(|r| r.replica == replica && r.epoch == seen.epoch)
                    {
                        remote.remove(&id);
                    }
                    continue;
                }
                if epochs.len() < MAX_REMOTE || epochs.contains_key(&id) {
                    let highest = epochs.entry(id.clone()).or_insert(0);
                    *highest = (*highest).max(seen.epoch);
                }
                let theirs = (seen.epoch, replica.as_str());
                // Held here with an older epoch: fenced, ours closes. Held here with a
                // newer one: theirs is stale, and ours is announced again below.
                if let Some(mine) = local.get(&id) {
                    if theirs > (mine.epoch, self.options.replica.as_str()) {
                        fenced.push((id.clone(), mine.conn_id, replica.clone()));
                    } else {
                        continue;
                    }
                }
                let take = match remote.get(&id) {
                    None => remote.len() < MAX_REMOTE,
                    Some(r) => theirs >= (r.epoch, r.replica.as_str()),
                };
                if take {
                    remote.insert(
                        id.clone(),
                        RemoteClient {
                            identity: id,
                            replica: replica.clone(),
                            address: seen.address.chars().take(64).collect(),
                            connected_since: seen.since,
                            epoch: seen.epoch,
                            seen: Some(Instant::now()),
                        },
                    );
                }
            }
        }
        for (identity, conn_id, winner) in fenced {
            self.fence(&identity, conn_id, &winner);
        }
        self.notify();
    }

    /// Close the connection `conn_id` of `identity` here: a newer one lives on `winner`.
    fn fence(&self, identity: &str, conn_id: u64, winner: &str) {
        crate::util::lock(&self.fenced).insert(conn_id);
        if let Some(l) = crate::util::lock(&self.local).remove(identity) {
            l.subscription.abort();
        }
        let Some(server) = self.server.upgrade() else {
            return;
        };
        if let Ok(conn) = server.registry().find(identity) {
            if conn.id() == conn_id && conn.peer().identity == identity {
                info!(%identity, replica = %winner, "cluster: a newer connection on another replica wins; closing ours");
                server.core().metrics.tick("server.identity.replaced.tick");
                conn.close(format!(
                    "replaced by a newer connection with the same identity on replica {winner}"
                ));
            }
        }
    }

    /// Drop the entries of other replicas not refreshed for [`EXPIRE`].
    fn sweep(&self) {
        let mut remote = crate::util::lock(&self.remote);
        let before = remote.len();
        remote.retain(|_, r| r.seen.is_some_and(|s| s.elapsed() < EXPIRE));
        if remote.len() != before {
            drop(remote);
            self.notify();
        }
    }

    fn snapshot(&self) -> Vec<Seen> {
        crate::util::lock(&self.local)
            .values()
            .map(|l| l.seen.clone())
            .collect()
    }
}

async fn presence_loop(inner: Arc<Inner>) {
    let subject = inner.subject("presence");
    let handler = inner.clone();
    each_message(&inner, subject, "presence", |message| {
        match serde_json::from_slice::<Presence>(&message.payload) {
            Ok(p) if matches!(p.kind.as_str(), "up" | "down" | "snapshot" | "hello") => {
                handler.heard(p)
            }
            _ => debug!("cluster: a presence message that does not decode, ignored"),
        }
        std::future::ready(())
    })
    .await
}

/// Hand every message on `subject` to `handle`, one at a time, until the cluster stops;
/// subscribe again (every second while NATS refuses) whenever the subscription ends.
async fn each_message<F, Fut>(inner: &Inner, subject: String, what: &str, mut handle: F)
where
    F: FnMut(async_nats::Message) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    loop {
        let subscribed = tokio::select! {
            _ = inner.stop.cancelled() => return,
            s = inner.client.subscribe(subject.clone()) => s,
        };
        let mut subscriber = match subscribed {
            Ok(s) => s,
            Err(e) => {
                warn!(cause = %e, "cluster: cannot subscribe to {what}; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        loop {
            let message = tokio::select! {
                _ = inner.stop.cancelled() => return,
                m = subscriber.next() => m,
            };
            let Some(message) = message else { break };
            handle(message).await;
        }
    }
}

async fn refresh_loop(inner: Arc<Inner>, mut connected: watch::Receiver<u64>) {
    let mut every = tokio::time::interval(REFRESH);
    loop {
        tokio::select! {
            _ = inner.stop.cancelled() => return,
            _ = every.tick() => {}
            _ = inner.snapshot_asked.notified() => {}
            // Back on NATS: say at once what this replica holds, and ask the others for
            // theirs.
            Ok(()) = connected.changed() => {
                let hello = Presence {
                    replica: inner.options.replica.clone(),
                    kind: "hello".into(),
                    clients: Vec::new(),
                };
                let payload = Bytes::from(serde_json::to_vec(&hello).unwrap_or_default());
                let publish = inner.client.publish(inner.subject("presence"), payload);
                let _ = tokio::time::timeout(Duration::from_secs(2), publish).await;
            }
        }
        inner.sweep();
        let entries = inner.snapshot();
        inner.announce("snapshot", entries).await;
    }
}

/// Follow the registry: a client that connects here gets an epoch, a subscription on its
/// subject and an `up`; one that leaves, a `down`.
async fn reconcile_loop(inner: Arc<Inner>, mut changes: watch::Receiver<u64>) {
    loop {
        let Some(server) = inner.server.upgrade() else {
            return;
        };
        let mut current = server.registry().all();
        drop(server);
        {
            // A connection fenced, or closed and on its way out, is not announced.
            let mut fenced = crate::util::lock(&inner.fenced);
            let live: std::collections::HashSet<u64> = current.iter().map(|c| c.id()).collect();
            fenced.retain(|id| live.contains(id));
            current.retain(|c| !c.is_closed() && !fenced.contains(&c.id()));
        }
        let mut up = Vec::new();
        let mut down = Vec::new();
        {
            let mut local = crate::util::lock(&inner.local);
            let mut epochs = crate::util::lock(&inner.epochs);
            let mut remote = crate::util::lock(&inner.remote);
            let ids: std::collections::HashSet<&str> =
                current.iter().map(|c| c.peer().identity.as_str()).collect();
            local.retain(|id, l| {
                let keep = ids.contains(id.as_str());
                if !keep {
                    l.subscription.abort();
                    down.push(l.seen.clone());
                }
                keep
            });
            for conn in &current {
                let id = &conn.peer().identity;
                if local.get(id).is_some_and(|l| l.conn_id == conn.id()) {
                    continue;
                }
                let highest = epochs.entry(id.clone()).or_insert(0);
                let epoch = now_ms().max(highest.saturating_add(1));
                *highest = epoch;
                let status = conn.status();
                let seen = Seen {
                    identity: id.clone(),
                    epoch,
                    address: status.address,
                    since: status.connected_since,
                };
                let subscription = match local.remove(id) {
                    Some(old) => old.subscription,
                    None => tokio::spawn(hold(inner.clone(), id.clone())).abort_handle(),
                };
                remote.remove(id);
                up.push(seen.clone());
                local.insert(
                    id.clone(),
                    Local {
                        conn_id: conn.id(),
                        epoch,
                        seen,
                        subscription,
                    },
                );
            }
        }
        if !down.is_empty() {
            inner.announce("down", down).await;
        }
        if !up.is_empty() {
            inner.announce("up", up).await;
        }
        tokio::select! {
            _ = inner.stop.cancelled() => return,
            changed = changes.changed() => if changed.is_err() { return },
        }
    }
}

/// Take the calls for `identity` while it is held here.
async fn hold(inner: Arc<Inner>, identity: String) {
    let subject = inner.subject(&format!("call.{}", identity_token(&identity)));
    let mut subscriber = loop {
        match inner
            .client
            .queue_subscribe(subject.clone(), "holders".into())
            .await
        {
            Ok(s) => break s,
            Err(e) => {
                warn!(%identity, cause = %e, "cluster: cannot subscribe; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    };
    while let Some(message) = subscriber.next().await {
        if carry::kind(&message) != "call" {
            continue;
        }
        tokio::spawn(take_call(inner.clone(), identity.clone(), message));
    }
}

/// One call for a client held here (or that was).
async fn take_call(inner: Arc<Inner>, identity: String, message: async_nats::Message) {
    let Some(reply_to) = message.reply.as_ref().map(|r| r.to_string()) else {
        return;
    };
    if !carry::valid_inbox(&reply_to) {
        return;
    }
    let moved = || async {
        let _ = carry::send(&inner.client, reply_to.clone(), "moved", Bytes::new()).await;
    };
    let (head, inline) = match carry::unpack::<carry::CallHead>(message.payload.clone()) {
        Ok(x) if x.0.identity == identity => x,
        _ => {
            debug!(%identity, "cluster: a call that does not decode, or for another identity, ignored");
            return;
        }
    };
    let Some(server) = inner.server.upgrade() else {
        return moved().await;
    };
    let conn = match server.registry().find(&identity) {
        Ok(conn) if conn.peer().identity == identity && !conn.is_closed() => conn,
        _ => return moved().await,
    };
    let pipe = server.pipe().clone();
    drop(server);
    debug!(%identity, from = %head.from, "cluster: call from another replica");
    let local: carry::LocalCall = Box::new(move |request, body, timeout| {
        Box::pin(async move { conn.call_with_body(request, body, timeout).await })
    });
    carry::serve(
        inner.client.clone(),
        message,
        head,
        inline,
        local,
        carry::Holder {
            replica: inner.options.replica.clone(),
            max_timeout: pipe.max_request_timeout,
            idle: pipe.stream_idle_timeout,
            max_chunk: inner.max_chunk,
        },
    )
    .await;
}

/// The default replica name: the host name and the pipe's port.
pub fn default_replica_name(port: u16) -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "replica".into());
    format!("{host}:{port}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identities_become_one_safe_token() {
        assert_eq!(identity_token("worker-1_a"), "worker-1_a");
        assert_eq!(identity_token("a.b"), "a~2eb");
        assert_eq!(identity_token("*"), "~2a");
        assert_eq!(identity_token(">"), "~3e");
        assert_eq!(identity_token("é"), "~c3~a9");
        assert!(!identity_token("x.*.>").contains(['.', '*', '>']));
    }

    #[test]
    fn names_and_urls() {
        assert!(valid_token("prod-eu_1"));
        assert!(!valid_token("a.b") && !valid_token("") && !valid_token("*"));
        assert_eq!(
            redact("nats://u:secret@h:4222"),
            "nats://<credentials>@h:4222"
        );
        assert_eq!(redact("nats://h:4222"), "nats://h:4222");
        assert!(default_replica_name(1234).ends_with(":1234"));
    }
}

/// Events waiting to go to NATS, at most; past it a published event is not carried to the
/// other replicas (logged), never held without bound.
const PUBLISH_QUEUE: usize = 1024;

/// A published event as it crosses NATS, on `restpipe.<cluster>.publish`: the length of a
/// JSON head (4 bytes, big-endian), the head, then the body.
#[derive(Serialize, Deserialize)]
struct PublishedHead {
    replica: String,
    topic: String,
    content_type: String,
    id: String,
    published_ms: u64,
}

fn encode_published(replica: &str, event: &crate::wire::Published) -> Option<Bytes> {
    let head = serde_json::to_vec(&PublishedHead {
        replica: replica.to_string(),
        topic: event.topic.clone(),
        content_type: event.content_type.clone(),
        id: event.id.clone(),
        published_ms: event.published_ms,
    })
    .ok()?;
    let len = u32::try_from(head.len()).ok()?;
    let mut out = Vec::with_capacity(4 + head.len() + event.body.len());
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(&head);
    out.extend_from_slice(&event.body);
    Some(Bytes::from(out))
}

fn decode_published(payload: &Bytes) -> Option<(String, crate::wire::Published)> {
    let len = u32::from_be_bytes(payload.get(..4)?.try_into().ok()?) as usize;
    let head: PublishedHead = serde_json::from_slice(payload.get(4..4 + len)?).ok()?;
    let event = crate::wire::Published {
        topic: head.topic,
        content_type: head.content_type,
        body: payload.slice(4 + len..),
        id: head.id,
        published_ms: head.published_ms,
    };
    // Held to the pipe's rules: another replica is trusted, but its events are still checked.
    crate::wire::check_published(&event).ok()?;
    (!event.id.is_empty()).then_some((head.replica, event))
}

impl Cluster {
    /// Carry the publish/subscribe events of this replica to the others and theirs to it
    /// (docs/CLUSTER.md): every event published here goes out on `restpipe.<cluster>.publish`,
    /// and every event heard there from another replica is appended to this replica's log
    /// (deduplicated by id), from which its subscribed clients get it.
    pub fn carry_pubsub(&self, hub: &crate::pubsub::Pubsub) {
        let inner = self.inner.clone();
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Bytes>(PUBLISH_QUEUE);
        let replica = inner.options.replica.clone();
        hub.set_forward(Box::new(move |event| {
            let Some(payload) = encode_published(&replica, event) else {
                return;
            };
            if tx.try_send(payload).is_err() {
                warn!(id = %event.id, "cluster: the publish queue to NATS is full; the event stays on this replica");
            }
        }));
        let sender = inner.clone();
        tokio::spawn(async move {
            let subject = sender.subject("publish");
            loop {
                let payload = tokio::select! {
                    _ = sender.stop.cancelled() => return,
                    p = rx.recv() => match p { Some(p) => p, None => return },
                };
                let publish = sender.client.publish(subject.clone(), payload);
                match tokio::time::timeout(Duration::from_secs(2), publish).await {
                    Ok(Ok(())) => {}
                    _ => warn!("cluster: an event was not carried to the other replicas (NATS unreachable, or the event over its size limit)"),
                }
            }
        });
        let hub = hub.clone();
        tokio::spawn(async move {
            let subject = inner.subject("publish");
            let replica = inner.options.replica.clone();
            each_message(&inner, subject, "published events", |message| {
                let hub = hub.clone();
                let replica = replica.clone();
                async move {
                    match decode_published(&message.payload) {
                        Some((from, _)) if from == replica => {}
                        Some((_, event)) => hub.append_remote(event).await,
                        None => {
                            debug!("cluster: a published event that does not decode, ignored")
                        }
                    }
                }
            })
            .await
        });
    }
}
