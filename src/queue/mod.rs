//! Queued delivery: events kept for a peer that is away, delivered when it is back.
//!
//! A call made with `X-Event-Delivery: queued` is not sent at once: the front door hands it
//! to the node's [`Queue`], which commits it to its store (redb, fsync'd) and answers 202
//! with its id. A delivery task per peer then sends the peer's events one at a time, in the
//! order they were queued, as soon as the peer is connected, and stores each reply. A failure
//! of the transport (the pipe closed, the peer overloaded or shutting down, no reply in
//! time) is retried with backoff, the event staying at the head of its peer's queue; a reply
//! that crossed the pipe, whatever its status, is final. Delivery is at least once: an event
//! sent just before a crash is sent again after the restart, with the same id, which the
//! handler sees as [`restpipe_handler::Context::delivery_id`].
//!
//! Everything is bounded: the body of a queued event (`--queue-max-body`), the events and
//! bytes pending per peer (`--queue-max-events`, `--queue-max-bytes`), the peers with pending
//! events ([`MAX_PEERS`]), each event's life (`--queue-ttl`, `X-Event-TTL-S`), its attempts
//! (`--queue-max-attempts`), the stored reply body, and how long finished events are kept
//! ([`QueueSettings::retention`], [`MAX_FINISHED`]). docs/QUEUE.md is the contract.

mod deliver;
pub mod handover;
pub mod store;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use base64::Engine as _;
use restpipe_handler::{codes, BodyError, Headers, Reply, Request, Side};
use serde_json::{json, Value};
use tokio::sync::{Notify, OnceCell};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::backoff::Backoff;
use crate::connection::Connection;
use crate::error::CallError;
use crate::http::Pipe;
use crate::util::lock;
use store::{Record, State, Store, StoreError, StoredReply, Usage};

/// Peers that may have events pending at once; a new one past it is refused with 429.
pub const MAX_PEERS: usize = 4096;
/// Finished events kept at most (the oldest are forgotten first).
pub const MAX_FINISHED: u64 = 1_000_000;
/// The longest TTL an event may have, by setting or header: 30 days.
pub const MAX_TTL: Duration = Duration::from_secs(30 * 86_400);
/// The header that asks for queued delivery.
pub const DELIVERY_HEADER: &str = "x-event-delivery";
/// The header that sets an event's TTL, in seconds.
pub const TTL_HEADER: &str = "x-event-ttl-s";

/// The first and the longest delay between two attempts to deliver an event.
const RETRY_FIRST: Duration = Duration::from_millis(200);
const RETRY_MAX: Duration = Duration::from_secs(30);
/// How often a waiting delivery task looks for expired events and at the connection.
const CHECK_EVERY: Duration = Duration::from_secs(1);
/// How often finished events past their retention are forgotten.
const PRUNE_EVERY: Duration = Duration::from_secs(600);

/// The settings of a node's queue.
#[derive(Clone, Debug, PartialEq)]
pub struct QueueSettings {
    /// The directory of the store (`--data-dir`), made (mode 0700) when the first event is
    /// queued.
    pub data_dir: PathBuf,
    /// The largest body of a queued event, and of a stored reply, in bytes.
    pub max_body: u64,
    /// Events pending per peer.
    pub max_events: u64,
    /// Bytes pending per peer (bodies, nouns, parameters, queries, headers).
    pub max_bytes: u64,
    /// The TTL of an event that does not send `X-Event-TTL-S`.
    pub ttl: Duration,
    /// Sends that may fail in transport before the event is `failed`.
    pub max_attempts: u32,
    /// How long a delivered, expired or failed event stays readable.
    pub retention: Duration,
}

impl QueueSettings {
    /// The defaults, with the store in `data_dir`: 1 MiB bodies, 10,000 events and 256 MiB
    /// per peer, a TTL of 24 h, 20 attempts, finished events kept 24 h.
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        QueueSettings {
            data_dir: data_dir.into(),
            max_body: 1024 * 1024,
            max_events: 10_000,
            max_bytes: 256 * 1024 * 1024,
            ttl: Duration::from_secs(86_400),
            max_attempts: 20,
            retention: Duration::from_secs(86_400),
        }
    }

    /// The default data directory of a node of `side`: `$XDG_STATE_HOME/restpipe/<side>`
    /// when that variable is an absolute path, else `$HOME/.local/state/restpipe/<side>`,
    /// else `./restpipe-data/<side>`.
    pub fn default_data_dir(side: Side) -> PathBuf {
        let absolute = |name: &str| {
            std::env::var_os(name)
                .map(PathBuf::from)
                .filter(|p| p.is_absolute())
        };
        if let Some(state) = absolute("XDG_STATE_HOME") {
            return state.join("restpipe").join(side.as_str());
        }
        if let Some(home) = absolute("HOME") {
            return home.join(".local/state/restpipe").join(side.as_str());
        }
        Path::new("restpipe-data").join(side.as_str())
    }

    /// Refuse settings that cannot work, with a line that says which.
    pub fn validate(&self) -> Result<(), String> {
        if self.max_body == 0 || self.max_body > 1024 * 1024 * 1024 {
            return Err("--queue-max-body must be between 1 byte and 1 GiB".into());
        }
        if self.max_events == 0 || self.max_bytes == 0 {
            return Err("--queue-max-events and --queue-max-bytes must be at least 1".into());
        }
        if self.ttl.is_zero() || self.ttl > MAX_TTL {
            return Err(format!(
                "--queue-ttl must be more than 0 and at most {} seconds",
                MAX_TTL.as_secs()
            ));
        }
        if self.max_attempts == 0 {
            return Err("--queue-max-attempts must be at least 1".into());
        }
        Ok(())
    }
}

/// A call to queue: the event (its body whole), the peer, each attempt's deadline, and its
/// TTL (the setting's when `None`).
#[derive(Debug)]
pub struct NewEvent {
    /// A client's identity (or address) on a server node; ignored on a client node.
    pub peer: Option<String>,
    /// The event.
    pub request: Request,
    /// Each attempt's deadline.
    pub timeout: Duration,
    /// How long it may wait to be delivered.
    pub ttl: Option<Duration>,
}

/// Why an event was not queued, or cannot be read. Each maps to one HTTP status.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    /// The peer's queue holds `--queue-max-events`, or too many peers have events (429).
    #[error("{0}")]
    Full(String),
    /// The peer's queue holds `--queue-max-bytes`, or the disk is full (507).
    #[error("{0}")]
    NoSpace(String),
    /// The body is over `--queue-max-body` (413).
    #[error("{0}")]
    TooLarge(String),
    /// The store cannot be opened or read (503).
    #[error("{0}")]
    Unavailable(String),
}

/// A node's queue. Clones share it.
#[derive(Clone)]
pub struct Queue {
    inner: Arc<Inner>,
    /// In a cluster with `--queue-shared-dir`: the stores of dead replicas this one adopts.
    handover: Option<Arc<handover::Handover>>,
}

impl std::fmt::Debug for Queue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Queue")
            .field("settings", &self.inner.settings)
            .finish_non_exhaustive()
    }
}

struct Inner {
    pipe: Pipe,
    settings: QueueSettings,
    store: OnceCell<Arc<Store>>,
    /// What each peer has pending: the caps are checked (and the room reserved) here before
    /// the event is written.
    usage: Mutex<HashMap<String, Usage>>,
    workers: Mutex<HashMap<String, Arc<Worker>>>,
    /// Stops everything at once, a send in flight included (the node shuts down).
    stop: CancellationToken,
    /// A child of `stop`: the delivery tasks end, each after recording the send it has in
    /// flight (an adopted store handed back).
    drain: CancellationToken,
    /// The replica whose store this is, when this replica adopted it (`--queue-shared-dir`):
    /// it takes no new event, and keeps no pruning of its own.
    owner: Option<String>,
}

/// A peer's delivery task, as the queue sees it.
struct Worker {
    wake: Notify,
    /// Bumped by every wake, so that a task about to end sees an event queued meanwhile.
    generation: AtomicU64,
}

/// A stored event's id: its sequence number and a random token, 32 hex digits.
fn id_of(seq: u64, token: u64) -> String {
    format!("{seq:016x}{token:016x}")
}

/// The sequence number and token of an id, if it is one.
pub fn parse_id(id: &str) -> Option<(u64, u64)> {
    let ok = id.len() == 32
        && id
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    if !ok {
        return None;
    }
    let seq = u64::from_str_radix(&id[..16], 16).ok()?;
    let token = u64::from_str_radix(&id[16..], 16).ok()?;
    Some((seq, token))
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Run a blocking store operation on the blocking pool.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StoreError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| StoreError(format!("a store task failed: {e}")))?
}

impl Queue {
    /// The queue of the node whose pipe is `pipe`. When the data directory already holds a
    /// store, it is opened now and the delivery of what it holds starts; otherwise the store
    /// is made when the first event is queued (a node that never queues writes nothing).
    pub async fn start(pipe: Pipe, settings: QueueSettings) -> Result<Queue, String> {
        let queue = Queue::start_unopened(pipe, settings)?;
        let file = queue.inner.settings.data_dir.join(store::FILE_NAME);
        if file.exists() {
            queue.inner.store().await.map_err(|e| e.to_string())?;
        }
        Ok(queue)
    }

    /// The queue of the node whose pipe is `pipe`, its store not opened yet.
    fn start_unopened(pipe: Pipe, settings: QueueSettings) -> Result<Queue, String> {
        settings.validate()?;
        let stop = CancellationToken::new();
        Ok(Queue {
            inner: Arc::new(Inner {
                pipe,
                settings,
                store: OnceCell::new(),
                usage: Mutex::new(HashMap::new()),
                workers: Mutex::new(HashMap::new()),
                drain: stop.child_token(),
                stop,
                owner: None,
            }),
            handover: None,
        })
    }

    /// The queue's settings.
    pub fn settings(&self) -> &QueueSettings {
        &self.inner.settings
    }

    /// Stop the delivery tasks (what they were sending stays pending, and goes again after a
    /// restart).
    pub fn shutdown(&self) {
        self.inner.stop.cancel();
    }

    /// Events and bytes pending, over every peer.
    pub fn pending(&self) -> Usage {
        self.inner.pending_usage()
    }

    /// Queue `event`: checked against the caps, committed to the store (fsync'd), and handed
    /// to its peer's delivery task. Returns its id.
    pub async fn enqueue(&self, event: NewEvent) -> Result<String, QueueError> {
        let inner = &self.inner;
        let settings = &inner.settings;
        let request = event.request;
        let peer = match inner.pipe {
            Pipe::Client(_) => "server".to_string(),
            Pipe::Server(_) => event.peer.unwrap_or_default(),
        };
        if request.body.len() as u64 > settings.max_body {
            return Err(QueueError::TooLarge(format!(
                "a queued event's body is at most {} bytes (--queue-max-body), this one has {}; nothing was queued",
                settings.max_body,
                request.body.len()
            )));
        }
        let headers: Vec<(String, String)> = request
            .headers
            .iter()
            .map(|(n, v)| (n.to_string(), v.to_string()))
            .collect();
        let size = (request.body.len()
            + request.noun.len()
            + request.query.len()
            + request.content_type.len()
            + request.parameters.iter().map(String::len).sum::<usize>()
            + headers
                .iter()
                .map(|(n, v)| n.len() + v.len())
                .sum::<usize>()) as u64;
        let store = inner
            .store()
            .await
            .map_err(|e| QueueError::Unavailable(e.to_string()))?;
        // Reserve the room first: two calls at once cannot both take the last place.
        {
            let mut usage = lock(&inner.usage);
            if !usage.contains_key(&peer) && usage.len() >= MAX_PEERS {
                return Err(QueueError::Full(format!(
                    "events are pending for {MAX_PEERS} peers already, the most this node keeps; nothing was queued"
                )));
            }
            let u = usage.get(&peer).copied().unwrap_or_default();
            if u.count >= settings.max_events {
                return Err(QueueError::Full(format!(
                    "{} events are pending for {peer}, the most --queue-max-events allows; nothing was queued",
                    u.count
                )));
            }
            if u.bytes + size > settings.max_bytes {
                return Err(QueueError::NoSpace(format!(
                    "the events pending for {peer} hold {} bytes, and this one needs {size} more than the {} bytes --queue-max-bytes allows; nothing was queued",
                    u.bytes, settings.max_bytes
                )));
            }
            usage.insert(
                peer.clone(),
                Usage {
                    count: u.count + 1,
                    bytes: u.bytes + size,
                },
            );
        }
        let now = now_ms();
        let ttl = event.ttl.unwrap_or(settings.ttl).min(MAX_TTL);
        let record = Record {
            token: rand::random(),
            peer: peer.clone(),
            created_ms: now,
            expires_ms: now.saturating_add(millis(ttl)),
            timeout_ms: millis(event.timeout),
            verb: request.verb,
            noun: request.noun,
            parameters: request.parameters,
            query: request.query,
            content_type: request.content_type,
            headers,
            size,
            state: State::Pending,
            attempts: 0,
            last_error: None,
            finished_ms: None,
            reply: None,
        };
        let token = record.token;
        let body = request.body;
        // On a task of its own: a caller that goes away mid-write does not leave the event
        // written but its peer's delivery task not told (or its room not given back).
        let write = tokio::spawn({
            let (inner, peer) = (inner.clone(), peer.clone());
            async move {
                let written = blocking(move || store.insert(&record, &body)).await;
                match &written {
                    Ok(_) => inner.wake(&peer),
                    Err(_) => inner.release(
                        &peer,
                        Usage {
                            count: 1,
                            bytes: size,
                        },
                    ),
                }
                written
            }
        });
        let seq = match write.await {
            Ok(Ok(seq)) => seq,
            Ok(Err(e)) => {
                warn!(cause = %e, "the queue's store could not write an event");
                return Err(QueueError::NoSpace(format!(
                    "the queue's store could not write the event ({e}); the disk may be full; nothing was queued"
                )));
            }
            Err(e) => {
                return Err(QueueError::Unavailable(format!(
                    "the queue's write failed ({e}); the event may or may not be queued"
                )))
            }
        };
        Ok(id_of(seq, token))
    }

    /// What `GET /queued/{id}` answers for `id` (already parsed): `None` when there is no
    /// such event.
    /// In a cluster with `--queue-shared-dir`, an id of a store this replica has adopted is
    /// answered too.
    pub async fn get(&self, seq: u64, token: u64) -> Result<Option<Value>, QueueError> {
        let own = self.inner.get(seq, token).await;
        if matches!(own, Ok(Some(_))) {
            return own;
        }
        if let Some(handover) = &self.handover {
            for adopted in handover.holding() {
                if let Ok(Some(view)) = adopted.get(seq, token).await {
                    return Ok(Some(view));
                }
            }
        }
        own
    }
}

impl Inner {
    /// What `GET /queued/{id}` answers for `id` from this store.
    async fn get(self: &Arc<Self>, seq: u64, token: u64) -> Result<Option<Value>, QueueError> {
        let inner = self;
        let file = inner.settings.data_dir.join(store::FILE_NAME);
        if inner.store.get().is_none() && !file.exists() {
            return Ok(None);
        }
        // An adopted store is read only while it is held: a lookup never opens one (that is
        // the scan's job, behind its checks).
        let store = match (&inner.owner, inner.store.get()) {
            (Some(_), None) => return Ok(None),
            (Some(_), Some(store)) => store.clone(),
            (None, _) => inner
                .store()
                .await
                .map_err(|e| QueueError::Unavailable(e.to_string()))?,
        };
        let found = blocking(move || store.get(seq))
            .await
            .map_err(|e| QueueError::Unavailable(format!("the queue's store: {e}")))?;
        let Some((record, reply_body)) = found.filter(|(r, _)| r.token == token) else {
            return Ok(None);
        };
        Ok(Some(view(seq, &record, reply_body.as_deref())))
    }
}

/// The JSON of a stored event. A pending event past its TTL shows as expired before the
/// delivery task gets to it.
fn view(seq: u64, record: &Record, reply_body: Option<&[u8]>) -> Value {
    let secs = |ms: u64| ms as f64 / 1000.0;
    let state = match record.state {
        State::Pending if now_ms() >= record.expires_ms => State::Expired,
        state => state,
    };
    let mut value = json!({
        "id": id_of(seq, record.token),
        "state": state.as_str(),
        "peer": record.peer,
        "verb": record.verb,
        "noun": record.noun,
        "created": secs(record.created_ms),
        "expires": secs(record.expires_ms),
        "attempts": record.attempts,
    });
    if let Some(error) = &record.last_error {
        value["error"] = json!(error);
    }
    if let Some(at) = record.finished_ms {
        value["finished"] = json!(secs(at));
    }
    if let Some(reply) = &record.reply {
        let body = reply_body.unwrap_or_default();
        let (body, encoding) = match std::str::from_utf8(body) {
            Ok(text) => (text.to_string(), "utf-8"),
            Err(_) => (
                base64::engine::general_purpose::STANDARD.encode(body),
                "base64",
            ),
        };
        value["reply"] = json!({
            "status": reply.status,
            "code": reply.code,
            "content_type": reply.content_type,
            "body": body,
            "body_encoding": encoding,
        });
        if let Some(why) = &reply.body_dropped {
            value["reply"]["body_dropped"] = json!(why);
        }
    }
    value
}

impl Inner {
    /// Events and bytes pending in this store, over every peer.
    fn pending_usage(&self) -> Usage {
        lock(&self.usage)
            .values()
            .fold(Usage::default(), |a, u| Usage {
                count: a.count + u.count,
                bytes: a.bytes + u.bytes,
            })
    }

    /// The store, opened (and its directory made) on first use; the delivery of what it
    /// holds starts when it is opened.
    async fn store(self: &Arc<Self>) -> Result<Arc<Store>, StoreError> {
        let store = self
            .store
            .get_or_try_init(|| async {
                let dir = self.settings.data_dir.clone();
                let store = blocking(move || {
                    make_dir(&dir)?;
                    Store::open(&dir)
                })
                .await?;
                self.opened(store).await
            })
            .await?;
        Ok(store.clone())
    }

    /// Use `store`, opened elsewhere, unless a store is in use already (then `store` is
    /// closed).
    async fn install(self: &Arc<Self>, store: Store) -> Result<Arc<Store>, StoreError> {
        let mut spare = Some(store);
        let installed = self
            .store
            .get_or_try_init(|| {
                let store = spare.take();
                async move {
                    match store {
                        Some(store) => self.opened(store).await,
                        None => Err(StoreError("no store to install".into())),
                    }
                }
            })
            .await?
            .clone();
        if let Some(spare) = spare {
            spare.close();
        }
        Ok(installed)
    }

    /// A store just opened: what it holds pending is counted and its delivery starts.
    async fn opened(self: &Arc<Self>, store: Store) -> Result<Arc<Store>, StoreError> {
        let store = Arc::new(store);
        let usage = blocking({
            let store = store.clone();
            move || store.usage()
        })
        .await?;
        let pending: u64 = usage.values().map(|u| u.count).sum();
        if self.owner.is_none() {
            info!(dir = %self.settings.data_dir.display(), pending, peers = usage.len(), "queue store open");
        }
        let peers: Vec<String> = usage.keys().cloned().collect();
        *lock(&self.usage) = usage;
        for peer in peers {
            self.wake(&peer);
        }
        if self.owner.is_none() {
            tokio::spawn(deliver::prune_loop(self.clone(), store.clone()));
        }
        Ok(store)
    }

    /// Give back the room of events that left `peer`'s queue.
    fn release(&self, peer: &str, freed: Usage) {
        let mut usage = lock(&self.usage);
        if let Some(u) = usage.get_mut(peer) {
            u.count = u.count.saturating_sub(freed.count);
            u.bytes = u.bytes.saturating_sub(freed.bytes);
            if u.count == 0 {
                usage.remove(peer);
            }
        }
    }

    /// Tell `peer`'s delivery task that there is work, starting it if it is not running.
    fn wake(self: &Arc<Self>, peer: &str) {
        if self.drain.is_cancelled() {
            return;
        }
        let mut workers = lock(&self.workers);
        if let Some(worker) = workers.get(peer) {
            worker.generation.fetch_add(1, Ordering::AcqRel);
            worker.wake.notify_one();
            return;
        }
        let worker = Arc::new(Worker {
            wake: Notify::new(),
            generation: AtomicU64::new(0),
        });
        workers.insert(peer.to_string(), worker.clone());
        tokio::spawn(deliver::deliver(self.clone(), peer.to_string(), worker));
    }
}

/// Make the data directory (mode 0700 where it is made), refusing a path that is not a
/// directory.
pub(crate) fn make_dir(dir: &Path) -> Result<(), StoreError> {
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        builder.mode(0o700);
    }
    builder.create(dir).map_err(|e| {
        StoreError(format!(
            "cannot make the data directory {}: {e}",
            dir.display()
        ))
    })?;
    if !dir.is_dir() {
        return Err(StoreError(format!("{} is not a directory", dir.display())));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip_and_strangers_are_refused() {
        let id = id_of(42, 0xdead_beef);
        assert_eq!(parse_id(&id), Some((42, 0xdead_beef)));
        for bad in [
            "",
            "42",
            &id.to_uppercase(),
            &format!("{id}0"),
            "000000000000002g00000000deadbeef",
        ] {
            assert_eq!(parse_id(bad), None, "{bad}");
        }
    }

    #[test]
    fn settings_are_checked() {
        let ok = QueueSettings::new("/tmp/x");
        assert!(ok.validate().is_ok());
        for bad in [
            QueueSettings {
                max_body: 0,
                ..ok.clone()
            },
            QueueSettings {
                max_events: 0,
                ..ok.clone()
            },
            QueueSettings {
                ttl: Duration::ZERO,
                ..ok.clone()
            },
            QueueSettings {
                ttl: MAX_TTL * 2,
                ..ok.clone()
            },
            QueueSettings {
                max_attempts: 0,
                ..ok.clone()
            },
        ] {
            assert!(bad.validate().is_err(), "{bad:?}");
        }
    }
}
