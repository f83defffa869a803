//! The durable store of queued events: one redb database file, `queue.redb` in the data
//! directory. Every write is one transaction committed with `Durability::Immediate` (fsync
//! before the commit returns), so an event acknowledged with 202 survives a crash, and a
//! failed write (a full disk) leaves the store as it was before it.
//!
//! Tables:
//!
//! - `records`: sequence number → the event's record (JSON: peer, verb, noun, ..., state,
//!   attempts, reply head);
//! - `bodies`: sequence number → the request body, while the event is pending;
//! - `replies`: sequence number → the body of the stored reply;
//! - `pending`: (peer, sequence number) → expiry (ms since the epoch): the pending events of
//!   each peer, in order;
//! - `finished`: (finish time in ms, sequence number) → (): what pruning walks, oldest first;
//! - `meta`: `next_seq`.
//!
//! Every function here blocks on the disk; the queue calls them on the blocking pool.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::RwLock;

use redb::{
    Database, Durability, ReadTransaction, ReadableTable, ReadableTableMetadata, TableDefinition,
    WriteTransaction,
};
use serde::{Deserialize, Serialize};

const RECORDS: TableDefinition<u64, &[u8]> = TableDefinition::new("records");
const BODIES: TableDefinition<u64, &[u8]> = TableDefinition::new("bodies");
const REPLIES: TableDefinition<u64, &[u8]> = TableDefinition::new("replies");
const PENDING: TableDefinition<(&str, u64), u64> = TableDefinition::new("pending");
const FINISHED: TableDefinition<(u64, u64), ()> = TableDefinition::new("finished");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");

/// The name of the database file in the data directory.
pub const FILE_NAME: &str = "queue.redb";

/// Where a queued event is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    /// Waiting for its peer, or being delivered.
    Pending,
    /// A reply crossed the pipe; it is stored.
    Delivered,
    /// Its TTL passed before it was delivered.
    Expired,
    /// It can never be delivered (see docs/QUEUE.md).
    Failed,
}

impl State {
    /// The state as `GET /queued/{id}` names it.
    pub fn as_str(self) -> &'static str {
        match self {
            State::Pending => "pending",
            State::Delivered => "delivered",
            State::Expired => "expired",
            State::Failed => "failed",
        }
    }
}

/// The head of a stored reply; its body is kept apart.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StoredReply {
    /// The HTTP status the reply maps to.
    pub status: u16,
    /// The return code.
    pub code: u32,
    /// The reply's content type.
    pub content_type: String,
    /// Why the body was not kept (over the queue's body limit, or cut short), if it was not.
    pub body_dropped: Option<String>,
}

/// One queued event, as stored.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Record {
    /// The random half of its id (the other half is its sequence number).
    pub token: u64,
    /// The peer it goes to: a client's identity (or address) on a server node, `server` on a
    /// client node.
    pub peer: String,
    /// When it was queued, ms since the epoch.
    pub created_ms: u64,
    /// When it expires if not delivered, ms since the epoch.
    pub expires_ms: u64,
    /// The deadline of each attempt, ms.
    pub timeout_ms: u64,
    /// The event.
    pub verb: String,
    /// The event's noun.
    pub noun: String,
    /// The event's parameters.
    pub parameters: Vec<String>,
    /// The event's query string.
    pub query: String,
    /// The body's content type.
    pub content_type: String,
    /// The allow-listed headers.
    pub headers: Vec<(String, String)>,
    /// The bytes it counts against its peer's cap.
    pub size: u64,
    /// Where it is.
    pub state: State,
    /// Sends that ended (a send cut by a crash is not counted).
    pub attempts: u32,
    /// Why the last attempt failed, or why it failed or expired.
    pub last_error: Option<String>,
    /// When it was delivered, expired or failed, ms since the epoch.
    pub finished_ms: Option<u64>,
    /// The reply, once delivered.
    pub reply: Option<StoredReply>,
}

/// Why the store could not do something.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct StoreError(pub String);

impl<E: Into<redb::Error>> From<E> for StoreError {
    fn from(e: E) -> Self {
        StoreError(e.into().to_string())
    }
}

/// Pending events of a peer, by count and bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    /// Events pending.
    pub count: u64,
    /// Their bytes.
    pub bytes: u64,
}

/// A stored event's record, and the body of its reply if it has one.
pub type Stored = (Record, Option<Vec<u8>>);

/// The database.
///
/// After a failed operation (a full disk, say) redb refuses every later one ("previous I/O
/// error") until the database is opened again; so a failure closes it here, and the next
/// operation opens it again (redb's repair brings it back to its last commit). A node whose
/// disk filled up goes on serving what it stored, and takes new events once there is room.
pub struct Store {
    path: PathBuf,
    /// `None` after a failure, until the next operation opens it again.
    db: RwLock<Option<Database>>,
    /// Closed for good ([`Store::close`]): never opened again by this handle.
    closed: AtomicBool,
}

/// Why a store cannot be opened while another process holds it.
fn held_message(path: &Path) -> String {
    format!(
        "the queue's store {} is held by another process: in a cluster with --queue-shared-dir, a replica that adopted it while this one was away, which hands it back once its delivery in flight ends (docs/CLUSTER.md); else another node on the same directory",
        path.display()
    )
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("path", &self.path)
            .field("closed", &self.closed.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

fn encode(record: &Record) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(record).map_err(|e| StoreError(format!("cannot encode a record: {e}")))
}

fn decode(bytes: &[u8]) -> Result<Record, StoreError> {
    serde_json::from_slice(bytes)
        .map_err(|e| StoreError(format!("a stored record is damaged: {e}")))
}

impl Store {
    /// Open (or create) the store in `dir`, which must exist.
    pub fn open(dir: &Path) -> Result<Store, StoreError> {
        Store::open_with(dir, true)?.ok_or_else(|| StoreError(held_message(&dir.join(FILE_NAME))))
    }

    /// Open the store in `dir` (creating it when `create`), or `None` when another process
    /// (or another handle in this one) holds it: redb takes an exclusive lock on the file
    /// (`flock`) for as long as it is open, and that lock is what fences the hand-over of a
    /// replica's store (docs/CLUSTER.md). Without `create`, a missing file is an error.
    pub fn open_with(dir: &Path, create: bool) -> Result<Option<Store>, StoreError> {
        let path = dir.join(FILE_NAME);
        let opened = if create {
            Database::create(&path)
        } else {
            Database::open(&path)
        };
        let db = match opened {
            Ok(db) => db,
            Err(redb::DatabaseError::DatabaseAlreadyOpen) => return Ok(None),
            Err(e) => return Err(StoreError(format!("cannot open {}: {e}", path.display()))),
        };
        let store = Store {
            path,
            db: RwLock::new(Some(db)),
            closed: AtomicBool::new(false),
        };
        // Every table exists from the start, so that readers never meet a missing one.
        store.write(|tx| {
            tx.open_table(RECORDS)?;
            tx.open_table(BODIES)?;
            tx.open_table(REPLIES)?;
            tx.open_table(PENDING)?;
            tx.open_table(FINISHED)?;
            tx.open_table(META)?;
            Ok(())
        })?;
        Ok(Some(store))
    }

    /// Close the database for good, now, whoever still holds this handle: its file lock is
    /// released (another process may open it), and every later operation here fails.
    pub fn close(&self) {
        self.closed.store(true, Ordering::Release);
        *self.db.write().unwrap_or_else(|e| e.into_inner()) = None;
    }

    /// Run `f` with the database, opened again first if a failure closed it.
    fn with_db<T>(
        &self,
        f: impl FnOnce(&Database) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        {
            let db = self.db.read().unwrap_or_else(|e| e.into_inner());
            if let Some(db) = db.as_ref() {
                return f(db);
            }
        }
        let mut db = self.db.write().unwrap_or_else(|e| e.into_inner());
        if self.closed.load(Ordering::Acquire) {
            return Err(StoreError(format!(
                "the queue's store {} is closed (handed back)",
                self.path.display()
            )));
        }
        if db.is_none() {
            let opened = Database::create(&self.path).map_err(|e| match e {
                redb::DatabaseError::DatabaseAlreadyOpen => StoreError(held_message(&self.path)),
                e => StoreError(format!("cannot open {} again: {e}", self.path.display())),
            })?;
            tracing::info!(path = %self.path.display(), "the queue's store is open again");
            *db = Some(opened);
        }
        match db.as_ref() {
            Some(db) => f(db),
            None => Err(StoreError("the queue's store is closed".into())),
        }
    }

    /// Close the database after a failure: redb takes nothing more until it is opened again.
    fn closed_on_failure<T>(&self, result: Result<T, StoreError>) -> Result<T, StoreError> {
        if result.is_err() {
            *self.db.write().unwrap_or_else(|e| e.into_inner()) = None;
        }
        result
    }

    fn begin_read(&self) -> Result<ReadTransaction, StoreError> {
        let tx = self.with_db(|db| Ok(db.begin_read()?));
        self.closed_on_failure(tx)
    }

    /// Run `f` in one write transaction, committed durably (fsync) before this returns. A
    /// failure leaves the store as it was (the transaction is not committed).
    fn write<T>(
        &self,
        f: impl FnOnce(&WriteTransaction) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let result = self.with_db(|db| {
            let mut tx = db.begin_write()?;
            tx.set_durability(Durability::Immediate);
            let out = f(&tx)?;
            tx.commit()?;
            Ok(out)
        });
        self.closed_on_failure(result)
    }

    /// Store a new pending event with its body; returns its sequence number.
    pub fn insert(&self, record: &Record, body: &[u8]) -> Result<u64, StoreError> {
        let value = encode(record)?;
        self.write(|tx| {
            let mut meta = tx.open_table(META)?;
            let seq = meta.get("next_seq")?.map(|v| v.value()).unwrap_or(1);
            meta.insert("next_seq", seq + 1)?;
            tx.open_table(RECORDS)?.insert(seq, value.as_slice())?;
            tx.open_table(BODIES)?.insert(seq, body)?;
            tx.open_table(PENDING)?
                .insert((record.peer.as_str(), seq), record.expires_ms)?;
            Ok(seq)
        })
    }

    /// The pending events of every peer, by count and bytes.
    pub fn usage(&self) -> Result<HashMap<String, Usage>, StoreError> {
        let tx = self.begin_read()?;
        let pending = tx.open_table(PENDING)?;
        let records = tx.open_table(RECORDS)?;
        let mut usage: HashMap<String, Usage> = HashMap::new();
        for item in pending.iter()? {
            let (key, _) = item?;
            let (peer, seq) = key.value();
            let size = match records.get(seq)? {
                Some(v) => decode(v.value())?.size,
                None => 0,
            };
            let u = usage.entry(peer.to_string()).or_default();
            u.count += 1;
            u.bytes += size;
        }
        Ok(usage)
    }

    /// The first pending event of `peer`: its sequence number, record and body.
    pub fn head(&self, peer: &str) -> Result<Option<(u64, Record, Vec<u8>)>, StoreError> {
        let tx = self.begin_read()?;
        let pending = tx.open_table(PENDING)?;
        let first = pending.range((peer, 0u64)..=(peer, u64::MAX))?.next();
        let Some(item) = first else {
            return Ok(None);
        };
        let seq = item?.0.value().1;
        let record = match tx.open_table(RECORDS)?.get(seq)? {
            Some(v) => decode(v.value())?,
            None => return Err(StoreError(format!("pending event {seq} has no record"))),
        };
        let body = tx
            .open_table(BODIES)?
            .get(seq)?
            .map(|v| v.value().to_vec())
            .unwrap_or_default();
        Ok(Some((seq, record, body)))
    }

    /// The record of event `seq` and the body of its reply, if there is one.
    pub fn get(&self, seq: u64) -> Result<Option<Stored>, StoreError> {
        let tx = self.begin_read()?;
        let Some(record) = tx.open_table(RECORDS)?.get(seq)?.map(|v| decode(v.value())) else {
            return Ok(None);
        };
        let reply = tx
            .open_table(REPLIES)?
            .get(seq)?
            .map(|v| v.value().to_vec());
        Ok(Some((record?, reply)))
    }

    /// Replace the record of a pending event (its attempts and last error).
    pub fn update(&self, seq: u64, record: &Record) -> Result<(), StoreError> {
        let value = encode(record)?;
        self.write(|tx| {
            tx.open_table(RECORDS)?.insert(seq, value.as_slice())?;
            Ok(())
        })
    }

    /// Finish event `seq` (delivered, expired or failed): its record replaced by `record`,
    /// its reply body stored, its request body dropped and its place in its peer's queue
    /// freed, in one transaction.
    pub fn finish(
        &self,
        seq: u64,
        record: &Record,
        reply_body: Option<&[u8]>,
    ) -> Result<(), StoreError> {
        let value = encode(record)?;
        let at = record.finished_ms.unwrap_or(0);
        self.write(|tx| {
            tx.open_table(RECORDS)?.insert(seq, value.as_slice())?;
            tx.open_table(BODIES)?.remove(seq)?;
            if let Some(body) = reply_body {
                tx.open_table(REPLIES)?.insert(seq, body)?;
            }
            tx.open_table(PENDING)?
                .remove((record.peer.as_str(), seq))?;
            tx.open_table(FINISHED)?.insert((at, seq), ())?;
            Ok(())
        })
    }

    /// Mark every pending event of `peer` whose expiry is at or before `now_ms` expired, in
    /// one transaction; returns how many and their bytes.
    pub fn expire_due(&self, peer: &str, now_ms: u64) -> Result<Usage, StoreError> {
        let due: Vec<u64> = {
            let tx = self.begin_read()?;
            let pending = tx.open_table(PENDING)?;
            let mut due = Vec::new();
            for item in pending.range((peer, 0u64)..=(peer, u64::MAX))? {
                let (key, expires) = item?;
                if expires.value() <= now_ms {
                    due.push(key.value().1);
                }
            }
            due
        };
        if due.is_empty() {
            return Ok(Usage::default());
        }
        self.write(|tx| {
            let mut records = tx.open_table(RECORDS)?;
            let mut bodies = tx.open_table(BODIES)?;
            let mut pending = tx.open_table(PENDING)?;
            let mut finished = tx.open_table(FINISHED)?;
            let mut freed = Usage::default();
            for seq in due {
                let Some(mut record) = records.get(seq)?.map(|v| decode(v.value())).transpose()?
                else {
                    continue;
                };
                record.state = State::Expired;
                record.finished_ms = Some(now_ms);
                record.last_error = Some("its TTL passed before it could be delivered".into());
                records.insert(seq, encode(&record)?.as_slice())?;
                bodies.remove(seq)?;
                pending.remove((peer, seq))?;
                finished.insert((now_ms, seq), ())?;
                freed.count += 1;
                freed.bytes += record.size;
            }
            Ok(freed)
        })
    }

    /// Forget finished events that finished before `before_ms`, and the oldest beyond
    /// `keep` finished events; returns how many were forgotten.
    pub fn prune(&self, before_ms: u64, keep: u64) -> Result<u64, StoreError> {
        self.write(|tx| {
            let mut finished = tx.open_table(FINISHED)?;
            let mut records = tx.open_table(RECORDS)?;
            let mut replies = tx.open_table(REPLIES)?;
            let total = finished.len()?;
            let mut over = total.saturating_sub(keep);
            let mut gone = Vec::new();
            for item in finished.iter()? {
                let (key, _) = item?;
                let (at, seq) = key.value();
                if at >= before_ms && over == 0 {
                    break;
                }
                over = over.saturating_sub(1);
                gone.push((at, seq));
                // One transaction stays small.
                if gone.len() >= 10_000 {
                    break;
                }
            }
            for (at, seq) in &gone {
                finished.remove((*at, *seq))?;
                records.remove(*seq)?;
                replies.remove(*seq)?;
            }
            Ok(gone.len() as u64)
        })
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A pending event for `peer`, with a small body, for the queue's unit tests.
    pub(crate) fn record(peer: &str, expires_ms: u64) -> Record {
        Record {
            token: 7,
            peer: peer.into(),
            created_ms: 1,
            expires_ms,
            timeout_ms: 1000,
            verb: "POST".into(),
            noun: "jobs".into(),
            parameters: vec!["a".into()],
            query: String::new(),
            content_type: "text/plain".into(),
            headers: Vec::new(),
            size: 10,
            state: State::Pending,
            attempts: 0,
            last_error: None,
            finished_ms: None,
            reply: None,
        }
    }

    #[test]
    fn events_keep_their_order_and_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let a = store.insert(&record("web-1", 100), b"one").unwrap();
        let b = store.insert(&record("web-1", 100), b"two").unwrap();
        let c = store.insert(&record("web-2", 50), b"three").unwrap();
        assert!(a < b && b < c);
        drop(store);
        let store = Store::open(dir.path()).unwrap();
        let (seq, _, body) = store.head("web-1").unwrap().unwrap();
        assert_eq!((seq, body.as_slice()), (a, &b"one"[..]));
        let usage = store.usage().unwrap();
        assert_eq!(
            usage["web-1"],
            Usage {
                count: 2,
                bytes: 20
            }
        );

        let mut done = store.get(a).unwrap().unwrap().0;
        done.state = State::Delivered;
        done.finished_ms = Some(10);
        store.finish(a, &done, Some(b"reply")).unwrap();
        let (seq, _, _) = store.head("web-1").unwrap().unwrap();
        assert_eq!(seq, b);
        let (got, reply) = store.get(a).unwrap().unwrap();
        assert_eq!(
            (got.state, reply.as_deref()),
            (State::Delivered, Some(&b"reply"[..]))
        );

        assert_eq!(store.expire_due("web-2", 49).unwrap().count, 0);
        assert_eq!(store.expire_due("web-2", 50).unwrap().count, 1);
        assert!(store.head("web-2").unwrap().is_none());
        assert_eq!(store.get(c).unwrap().unwrap().0.state, State::Expired);

        // Two finished: pruning by age forgets the one that finished first.
        assert_eq!(store.prune(11, 100).unwrap(), 1);
        assert!(store.get(a).unwrap().is_none());
        assert_eq!(store.prune(0, 0).unwrap(), 1);
        assert!(store.get(c).unwrap().is_none());
        assert!(store.get(b).unwrap().is_some());
    }
}
