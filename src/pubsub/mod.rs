//! Publish/subscribe: events published on any node fan out to every subscribed node
//! (docs/PUBSUB.md).
//!
//! The server is the hub. `POST /publish/{topic}` on the server appends the event to the
//! server's topic log; on a client it becomes a publish frame to the server, which appends it
//! there. Every reader of a log holds a cursor into it and is woken when something is
//! appended (pull by cursor, see [`log`]): on the server, one task per subscribed client
//! connection sends it the events its globs (and the policy) let through, with the
//! connection's own backpressure; on every node, one task delivers the events of the node's
//! own `--subscribe` globs to the `event_{topic}` handlers, and each `GET /events/{glob}`
//! listener reads the log at its own pace. A client keeps what the server sent it in a log of
//! its own (in memory), so that its listeners can resume, and remembers the id of the last
//! event it saw so that, when it reconnects, the server sends what it missed.
//!
//! Nothing grows per subscriber: the logs are bounded by count, age and bytes, a connection
//! holds at most its write budget, and a listener one chunk.

pub mod log;
pub mod store;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;
use globset::{GlobSet, GlobSetBuilder};
use restpipe_handler::{handler_name, Context, Reply, Request};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::connection::Connection;
use crate::error::CallError;
use crate::http::Pipe;
use crate::node::NodeCore;
use crate::util::lock;
use crate::wire::{self, limits, Published};
pub use log::{Batch, Entry, Log, Retention};

/// The default of [`PubsubSettings::max_publish_bytes`]: 1 MiB.
pub const DEFAULT_MAX_PUBLISH_BYTES: usize = 1024 * 1024;
/// The largest `--max-publish-bytes`: 16 MiB (an event crosses the pipe in one frame).
pub const MAX_PUBLISH_BYTES: usize = 16 * 1024 * 1024;
/// `GET /events` listeners a node serves at once; more are answered 503.
pub const MAX_LISTENERS: usize = 1024;
/// How often an idle `GET /events` stream sends a `: keep-alive` comment.
pub const KEEP_ALIVE: Duration = Duration::from_secs(15);
/// Events a reader takes from the log at once.
const BATCH: usize = 64;

/// The settings of a node's publish/subscribe.
#[derive(Clone, Debug, PartialEq)]
pub struct PubsubSettings {
    /// The topic globs this node subscribes to (`--subscribe`): a client asks the server for
    /// them; every node delivers them to its `event_{topic}` handlers.
    pub subscribe: Vec<String>,
    /// The largest body of a published event (`--max-publish-bytes`); larger is 413.
    pub max_publish_bytes: usize,
    /// Events the topic log keeps at most (`--pubsub-retain-count`).
    pub retain_count: usize,
    /// How long the topic log keeps an event (`--pubsub-retain-age`).
    pub retain_age: Duration,
    /// Bytes the topic log keeps at most (`--pubsub-retain-bytes`).
    pub retain_bytes: u64,
    /// A `GET /events` listener that takes no byte for this long while events wait for it is
    /// cut (`--pubsub-stall`).
    pub stall: Duration,
    /// Server: the directory of the log's store (the queue's `--data-dir`); `None` keeps the
    /// log in memory only (as on a client).
    pub data_dir: Option<std::path::PathBuf>,
}

impl Default for PubsubSettings {
    fn default() -> Self {
        PubsubSettings {
            subscribe: Vec::new(),
            max_publish_bytes: DEFAULT_MAX_PUBLISH_BYTES,
            retain_count: 10_000,
            retain_age: Duration::from_secs(3600),
            retain_bytes: 64 * 1024 * 1024,
            stall: Duration::from_secs(10),
            data_dir: None,
        }
    }
}

impl PubsubSettings {
    /// Refuse settings that cannot work, with a line that says which.
    pub fn validate(&self) -> Result<(), String> {
        if self.subscribe.len() > limits::SUBSCRIPTIONS {
            return Err(format!(
                "{} --subscribe globs, more than the {} a node may have",
                self.subscribe.len(),
                limits::SUBSCRIPTIONS
            ));
        }
        for glob in &self.subscribe {
            wire::check_topic_glob(glob).map_err(|e| format!("--subscribe {glob:?}: {e}"))?;
        }
        if self.max_publish_bytes == 0 || self.max_publish_bytes > MAX_PUBLISH_BYTES {
            return Err(format!(
                "--max-publish-bytes must be between 1 and {MAX_PUBLISH_BYTES}"
            ));
        }
        if self.retain_count == 0 || self.retain_count > 10_000_000 {
            return Err("--pubsub-retain-count must be between 1 and 10000000".into());
        }
        if self.retain_age.is_zero() || self.retain_bytes == 0 || self.stall.is_zero() {
            return Err(
                "--pubsub-retain-age, --pubsub-retain-bytes and --pubsub-stall must not be zero"
                    .into(),
            );
        }
        Ok(())
    }

    fn retention(&self) -> Retention {
        Retention {
            count: self.retain_count,
            age: self.retain_age,
            bytes: self.retain_bytes,
        }
    }
}

/// Why a publish was refused; each maps to one HTTP status.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// The topic breaks the grammar (400).
    #[error("{0}")]
    BadTopic(String),
    /// The body is over `--max-publish-bytes` (413).
    #[error("{0}")]
    TooLarge(String),
    /// The policy does not let the publisher publish to the topic (403).
    #[error("{0}")]
    Forbidden(String),
    /// The server cannot be reached, or does not speak pub/sub (503).
    #[error("{0}")]
    Unavailable(String),
    /// The server's store could not write the event (a full disk, say) (507).
    #[error("{0}")]
    NoSpace(String),
    /// The server answered with this status and body.
    #[error("the server answered {0}")]
    Server(u16, Bytes),
}

/// A node's publish/subscribe hub. Clones share it.
#[derive(Clone)]
pub struct Pubsub {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Pubsub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pubsub")
            .field("settings", &self.inner.settings)
            .finish_non_exhaustive()
    }
}

struct Inner {
    settings: PubsubSettings,
    log: Log,
    /// The node's own `--subscribe` globs.
    local: GlobSet,
    core: Weak<NodeCore>,
    /// The client's pipe (to publish through the server); `None` on the server. Weak: the
    /// node holds the hub.
    client: Option<crate::client::WeakClient>,
    /// The part of event ids that names this process (random at start).
    origin: u32,
    counter: AtomicU64,
    /// Server: the task sending each subscribed connection its events, by connection id.
    subscribers: Mutex<HashMap<u64, CancellationToken>>,
    /// Client: the id of the last event the server sent.
    last_seen: Mutex<String>,
    listeners: Arc<tokio::sync::Semaphore>,
    /// Server: the log on disk, once opened; `None` inside when it cannot be (the log is then
    /// kept in memory only, and that is logged).
    store: tokio::sync::OnceCell<Option<Arc<store::Store>>>,
    /// Server: where the store is.
    data_dir: Option<std::path::PathBuf>,
    /// Events published here go to these too (the cluster's fan-out), once set.
    forward: std::sync::OnceLock<Forward>,
    stop: CancellationToken,
}

type Opened = Result<(store::Store, Vec<Published>), store::StoreError>;

/// Open (or make) the store in `dir`, with what it holds.
fn open_disk(dir: &std::path::Path, keep: usize) -> Opened {
    crate::queue::make_dir(dir)
        .map_err(|e| store::StoreError(e.to_string()))
        .and_then(|()| store::Store::open(dir, keep))
}

/// Open the store in `dir` and append what it holds to `log`; `None` (logged) when it cannot
/// be opened: the log is then kept in memory only.
fn open_store(dir: &std::path::Path, keep: usize, log: &Log) -> Option<Arc<store::Store>> {
    adopt_into(log, dir, open_disk(dir, keep))
}

fn adopt_into(log: &Log, dir: &std::path::Path, opened: Opened) -> Option<Arc<store::Store>> {
    match opened {
        Ok((store, events)) => {
            let restored = events.len();
            for event in events {
                log.append(event);
            }
            info!(dir = %dir.display(), restored, "topic log store open");
            Some(Arc::new(store))
        }
        Err(e) => {
            warn!(dir = %dir.display(), cause = %e, "the topic log's store cannot be opened; the topic log is kept in memory only");
            None
        }
    }
}

/// Where events published on this node also go (the cluster).
pub type Forward = Box<dyn Fn(&Published) + Send + Sync>;

/// Topic globs compiled as one set (`*` within a segment, `**` across).
pub fn glob_set(globs: &[String]) -> Result<GlobSet, String> {
    let mut set = GlobSetBuilder::new();
    for glob in globs {
        wire::check_topic_glob(glob)?;
        let compiled = globset::GlobBuilder::new(glob)
            .literal_separator(true)
            .build()
            .map_err(|e| e.to_string())?;
        set.add(compiled);
    }
    set.build().map_err(|e| e.to_string())
}

/// The handler that gets the events of `topic`: `event_` and the topic, each `/` a `_`, as
/// the noun of a call maps to its handler.
pub fn event_handler_name(topic: &str) -> String {
    handler_name("EVENT", topic)
}

impl Pubsub {
    /// Start the hub of the node whose pipe is `pipe`: from now on its connections take
    /// pub/sub frames, its `--subscribe` handlers get their events, and a client sends its
    /// subscription at every connect.
    pub fn start(pipe: &Pipe, settings: PubsubSettings) -> Result<Pubsub, String> {
        settings.validate()?;
        let local = glob_set(&settings.subscribe)?;
        let core = pipe.core();
        let log = Log::new(settings.retention(), 1);
        let data_dir = match pipe {
            Pipe::Server(_) => settings.data_dir.clone(),
            Pipe::Client(_) => None,
        };
        // A store left by an earlier run is opened now, so that what it holds is served
        // again; otherwise it is made at the first publish (a server that never publishes
        // writes nothing).
        let store = tokio::sync::OnceCell::new();
        if let Some(dir) = data_dir
            .as_ref()
            .filter(|d| d.join(store::FILE_NAME).exists())
        {
            let _ = store.set(open_store(dir, settings.retain_count, &log));
        }
        let inner = Arc::new(Inner {
            log,
            store,
            data_dir,
            settings,
            local,
            core: Arc::downgrade(core),
            client: match pipe {
                Pipe::Client(c) => Some(c.downgrade()),
                Pipe::Server(_) => None,
            },
            origin: rand::random(),
            counter: AtomicU64::new(0),
            subscribers: Mutex::new(HashMap::new()),
            last_seen: Mutex::new(String::new()),
            listeners: Arc::new(tokio::sync::Semaphore::new(MAX_LISTENERS)),
            forward: std::sync::OnceLock::new(),
            stop: CancellationToken::new(),
        });
        let hub = Pubsub { inner };
        core.pubsub
            .set(hub.clone())
            .map_err(|_| "this node already has a publish/subscribe hub".to_string())?;
        if !hub.inner.settings.subscribe.is_empty() {
            tokio::spawn(deliver_locally(hub.inner.clone()));
        }
        if let Pipe::Client(client) = pipe {
            tokio::spawn(send_subscriptions(hub.inner.clone(), client.connections()));
        }
        info!(subscribe = ?hub.inner.settings.subscribe, "publish/subscribe ready");
        Ok(hub)
    }

    /// The hub's settings.
    pub fn settings(&self) -> &PubsubSettings {
        &self.inner.settings
    }

    /// The node's topic log.
    pub fn log(&self) -> &Log {
        &self.inner.log
    }

    /// Stop the hub's tasks.
    pub fn shutdown(&self) {
        self.inner.stop.cancel();
    }

    /// Also hand every event published on this node to `forward` (the cluster: other
    /// replicas append it to their logs). At most once.
    pub fn set_forward(&self, forward: Forward) {
        let _ = self.inner.forward.set(forward);
    }

    /// Publish at this node's front door: on the server, appended to the log (and so sent to
    /// every subscriber); on a client, sent to the server, which does that. Returns the
    /// event's id.
    pub async fn publish(
        &self,
        topic: String,
        content_type: String,
        body: Bytes,
    ) -> Result<String, PublishError> {
        let inner = &self.inner;
        wire::check_topic(&topic).map_err(PublishError::BadTopic)?;
        if content_type.len() > limits::CONTENT_TYPE {
            return Err(PublishError::BadTopic(format!(
                "the content type is longer than {} bytes",
                limits::CONTENT_TYPE
            )));
        }
        inner.check_size(body.len())?;
        let event = Published {
            topic,
            content_type,
            body,
            id: String::new(),
            published_ms: 0,
        };
        let Some(client) = &inner.client else {
            return inner.append_new(event).await;
        };
        let Some(client) = client.upgrade() else {
            return Err(PublishError::Unavailable(
                "the client node has stopped".into(),
            ));
        };
        // A client: the server has it, or the caller hears at once that it is away.
        let conn = client.connection().ok_or_else(|| {
            PublishError::Unavailable(format!(
                "the pipe to the server {} is down; nothing was published",
                client.server()
            ))
        })?;
        let timeout = client.pipe().request_timeout;
        let reply = conn.publish(event, timeout).await.map_err(|e| match e {
            CallError::TooLarge { .. } | CallError::FrameTooLarge { .. } => {
                PublishError::TooLarge(e.to_string())
            }
            e => PublishError::Unavailable(format!("{e}; the event may not be published")),
        })?;
        let status = reply.status.unwrap_or(500);
        if status != 202 {
            return Err(PublishError::Server(status, reply.body));
        }
        let id = serde_json::from_slice::<serde_json::Value>(&reply.body)
            .ok()
            .and_then(|v| v["id"].as_str().map(str::to_string))
            .ok_or_else(|| {
                PublishError::Server(
                    502,
                    Bytes::from_static(b"{\"error\":\"the server's answer has no id\"}"),
                )
            })?;
        Ok(id)
    }

    /// Server: the subscription of the client on `conn`, which replaces its last one. Globs
    /// the policy does not let it have are dropped, logged, and answered with an error frame.
    pub(crate) fn subscribe(&self, conn: Connection, globs: Vec<String>, resume_after: String) {
        let inner = &self.inner;
        let Some(core) = inner.core.upgrade() else {
            return;
        };
        let identity = conn.peer().identity.clone();
        let policy = core.policy.load();
        let (allowed, refused): (Vec<String>, Vec<String>) = globs
            .into_iter()
            .partition(|g| policy.may_subscribe_glob(&identity, g));
        if !refused.is_empty() {
            core.metrics.tick("pubsub.refused.tick");
            warn!(peer = %identity, ?refused, "subscription globs refused by the policy");
            let conn = conn.clone();
            let message = format!("the policy does not let {identity} subscribe to {refused:?}");
            tokio::spawn(async move { conn.send_refusal(message).await });
        }
        let set = match glob_set(&allowed) {
            Ok(set) => set,
            Err(e) => {
                warn!(peer = %identity, cause = %e, "subscription refused");
                return;
            }
        };
        let from = match resume_after.as_str() {
            "" => inner.log.next_seq(),
            id => inner.log.resume_after(id),
        };
        let stop = inner.stop.child_token();
        if let Some(old) = lock(&inner.subscribers).insert(conn.id(), stop.clone()) {
            old.cancel();
        }
        debug!(peer = %identity, globs = ?allowed, from, "client subscribed");
        tokio::spawn(send_to_client(inner.clone(), conn, set, from, stop));
    }

    /// Server: a client's publish request `id`, answered with a reply of that id (202 and
    /// the event's id, or the refusal).
    pub(crate) fn publish_from_client(&self, conn: Connection, id: u64, event: Published) {
        let inner = self.inner.clone();
        tokio::spawn(async move {
            let reply = inner.take_from_client(&conn, event).await;
            let _ = conn.send_reply(id, reply).await;
        });
    }

    /// Client: an event the server sent, kept in this node's log.
    pub(crate) fn received(&self, event: Published) {
        let id = event.id.clone();
        if self.inner.log.append(event).is_some() {
            *lock(&self.inner.last_seen) = id;
        }
    }

    /// A place for one `GET /events` listener, or `None` when [`MAX_LISTENERS`] are open.
    pub fn listener_slot(&self) -> Option<tokio::sync::OwnedSemaphorePermit> {
        self.inner.listeners.clone().try_acquire_owned().ok()
    }

    /// Count and log a listener cut for being slow.
    pub fn listener_cut(&self, why: &str) {
        if let Some(core) = self.inner.core.upgrade() {
            core.metrics.tick("pubsub.listener.cut.tick");
        }
        warn!(%why, "an events listener was cut");
    }

    /// What `GET /status` shows: the log's events and bytes, the subscribed connections
    /// (server), the open listeners, and the node's globs.
    pub fn status(&self) -> serde_json::Value {
        let inner = &self.inner;
        let (events, bytes) = inner.log.usage();
        serde_json::json!({
            "events": events,
            "bytes": bytes,
            "subscribed_connections": lock(&inner.subscribers).len(),
            "listeners": MAX_LISTENERS - inner.listeners.available_permits(),
            "subscribe": inner.settings.subscribe,
            "stored": inner.store.get().is_some_and(Option::is_some),
        })
    }

    /// Resolves when the hub stops.
    pub async fn stopped(&self) {
        self.inner.stop.cancelled().await
    }
}

impl Inner {
    fn check_size(&self, size: usize) -> Result<(), PublishError> {
        let limit = self.settings.max_publish_bytes;
        if size > limit {
            return Err(PublishError::TooLarge(format!(
                "a published event's body is at most {limit} bytes (--max-publish-bytes), this one has {size}; nothing was published"
            )));
        }
        Ok(())
    }

    /// Name a new event, store it (on the server with a data directory), append it, and hand
    /// it to the cluster. Returns its id.
    async fn append_new(&self, mut event: Published) -> Result<String, PublishError> {
        let now = log::now_ms();
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        event.id = format!("{now:013}-{:08x}-{n:08x}", self.origin);
        event.published_ms = now;
        let id = event.id.clone();
        let event = self.persist(event).await?;
        if let Some(core) = self.core.upgrade() {
            core.metrics.tick("pubsub.published.tick");
        }
        if let Some(forward) = self.forward.get() {
            forward(&event);
        }
        self.log.append(event);
        Ok(id)
    }

    /// A store just opened: what it holds appended to the log.
    fn adopt(&self, opened: Opened) -> Option<Arc<store::Store>> {
        let dir = self.data_dir.clone().unwrap_or_default();
        adopt_into(&self.log, &dir, opened)
    }

    /// Write `event` to the store, if there is one, before it is in the log.
    async fn persist(&self, event: Published) -> Result<Published, PublishError> {
        let Some(dir) = self.data_dir.clone() else {
            return Ok(event);
        };
        let store = self
            .store
            .get_or_init(|| async {
                let keep = self.settings.retain_count;
                let opened = tokio::task::spawn_blocking(move || open_disk(&dir, keep)).await;
                let opened = opened.unwrap_or_else(|e| Err(store::StoreError(e.to_string())));
                self.adopt(opened)
            })
            .await;
        let Some(store) = store.clone() else {
            return Ok(event);
        };
        let written = tokio::task::spawn_blocking(move || store.append(&event).map(|()| event))
            .await
            .map_err(|e| PublishError::NoSpace(format!("the topic log's write failed: {e}")))?;
        written.map_err(|e| {
            warn!(cause = %e, "the topic log's store could not write an event");
            PublishError::NoSpace(format!(
                "the topic log's store could not write the event ({e}); the disk may be full; nothing was published"
            ))
        })
    }

    /// An event from another replica of the cluster: stored and appended unless already
    /// there.
    async fn append_remote(&self, event: Published) {
        if self.log.has(&event.id) {
            return;
        }
        if let Ok(event) = self.persist(event).await {
            self.log.append(event);
        }
    }

    async fn take_from_client(&self, conn: &Connection, event: Published) -> Reply {
        let identity = &conn.peer().identity;
        // The front door's own form of a refusal: `{"error": ...}` with its status.
        let refuse = |status: u16, message: String| Reply {
            content_type: "application/json".into(),
            status: Some(status),
            body: Bytes::from(serde_json::json!({ "error": message }).to_string()),
            ..Reply::default()
        };
        if let Err(e) = self.check_size(event.body.len()) {
            return refuse(413, e.to_string());
        }
        if let Some(core) = self.core.upgrade() {
            if !core.policy.load().may_publish(identity, &event.topic) {
                core.metrics.tick("pubsub.refused.tick");
                info!(peer = %identity, topic = %event.topic, "publish refused by the policy");
                return refuse(
                    403,
                    format!(
                        "the policy does not let {identity} publish to {:?}",
                        event.topic
                    ),
                );
            }
        }
        let id = match self.append_new(event).await {
            Ok(id) => id,
            Err(e) => return refuse(507, e.to_string()),
        };
        Reply {
            content_type: "application/json".into(),
            status: Some(202),
            body: Bytes::from(serde_json::json!({ "id": id }).to_string()),
            ..Reply::default()
        }
    }
}

impl Pubsub {
    /// Append an event another replica published (deduplicated by id).
    pub async fn append_remote(&self, event: Published) {
        self.inner.append_remote(event).await
    }
}

/// Server: send one subscribed client the events of its globs, from `from` on, until its
/// subscription changes or it leaves.
async fn send_to_client(
    inner: Arc<Inner>,
    conn: Connection,
    globs: GlobSet,
    mut from: u64,
    stop: CancellationToken,
) {
    /// Forgets the connection's subscription when its task ends, whatever the reason, unless
    /// a newer subscription replaced it.
    struct Forget<'a>(&'a Inner, u64, CancellationToken);
    impl Drop for Forget<'_> {
        fn drop(&mut self) {
            let mut subscribers = lock(&self.0.subscribers);
            if subscribers.get(&self.1).is_some_and(|t| *t == self.2) {
                subscribers.remove(&self.1);
            }
        }
    }
    let _forget = Forget(&inner, conn.id(), stop.clone());
    let identity = conn.peer().identity.clone();
    let mut appended = inner.log.watch();
    loop {
        appended.borrow_and_update();
        let batch = inner.log.read(from, BATCH);
        if batch.lagged {
            debug!(peer = %identity, "a subscriber missed events past the retention");
        }
        let policy = inner.core.upgrade().map(|c| c.policy.load_full());
        for entry in &batch.entries {
            let topic = &entry.event.topic;
            let allowed = policy
                .as_ref()
                .is_none_or(|p| p.may_subscribe(&identity, topic));
            if !globs.is_match(topic) || !allowed {
                continue;
            }
            tokio::select! {
                sent = conn.send_published(entry.event.clone()) => if sent.is_err() { return },
                _ = stop.cancelled() => return,
            }
        }
        from = batch.next;
        if batch.entries.is_empty() {
            tokio::select! {
                changed = appended.changed() => if changed.is_err() { return },
                _ = stop.cancelled() => return,
                _ = conn.closed() => return,
            }
        }
    }
}

/// Client: send the subscription at every connect, resuming after the last event seen.
async fn send_subscriptions(
    inner: Arc<Inner>,
    mut connections: tokio::sync::watch::Receiver<Option<Connection>>,
) {
    loop {
        let conn = connections.borrow_and_update().clone();
        if let Some(conn) = conn.filter(|c| !c.is_closed() && c.speaks_pubsub()) {
            let globs = inner.settings.subscribe.clone();
            let resume_after = lock(&inner.last_seen).clone();
            if !globs.is_empty() {
                if let Err(e) = conn.send_subscribe(globs, resume_after).await {
                    debug!(cause = %e, "the subscription was not sent");
                }
            }
        }
        tokio::select! {
            changed = connections.changed() => if changed.is_err() { return },
            _ = inner.stop.cancelled() => return,
        }
    }
}

/// Every node: deliver the events of its own `--subscribe` globs to its `event_{topic}`
/// handlers, one at a time, in the log's order. A reply is only logged.
async fn deliver_locally(inner: Arc<Inner>) {
    let mut appended = inner.log.watch();
    let mut from = inner.log.next_seq();
    loop {
        appended.borrow_and_update();
        let batch = inner.log.read(from, BATCH);
        if batch.lagged {
            warn!("the local event handlers fell behind the retention; events were skipped");
        }
        for entry in &batch.entries {
            if !inner.local.is_match(&entry.event.topic) {
                continue;
            }
            let Some(core) = inner.core.upgrade() else {
                return;
            };
            deliver_one(&core, entry).await;
        }
        from = batch.next;
        if batch.entries.is_empty() {
            tokio::select! {
                changed = appended.changed() => if changed.is_err() { return },
                _ = inner.stop.cancelled() => return,
            }
        }
    }
}

async fn deliver_one(core: &NodeCore, entry: &Entry) {
    let event = &entry.event;
    let name = event_handler_name(&event.topic);
    let Some(handler) = core.handlers.get(&name).cloned() else {
        return;
    };
    let started = Instant::now();
    let timeout = core.pipe.request_timeout;
    let ctx = Context {
        side: core.side,
        peer_identity: String::new(),
        peer_addr: None,
        request_id: entry.seq,
        deadline: started + timeout,
        delivery_id: None,
        event_id: Some(event.id.clone()),
    };
    let request = Request::new("POST", &event.topic)
        .with_body(event.content_type.clone(), event.body.clone());
    let call = std::panic::AssertUnwindSafe(handler.call(ctx, request, None));
    let outcome = tokio::time::timeout(timeout, futures_util::FutureExt::catch_unwind(call)).await;
    match outcome {
        Ok(Ok(Ok(reply))) => {
            debug!(handler = %name, id = %event.id, code = reply.code, "event handled")
        }
        Ok(Ok(Err(e))) => {
            warn!(handler = %name, id = %event.id, cause = %e, "event handler failed")
        }
        Ok(Err(_)) => warn!(handler = %name, id = %event.id, "event handler panicked"),
        Err(_) => warn!(handler = %name, id = %event.id, "event handler did not finish in time"),
    }
    core.metrics
        .handled(&core.handler_metrics, &name, started.elapsed());
}
