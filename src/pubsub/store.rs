//! The server's topic log on disk: `pubsub.redb` in the data directory (the queue's
//! `--data-dir`), so that the events a client has not yet seen survive a restart of the
//! server (within the retention). One table, `events`: a key in the order events were
//! appended → the event (the length of a JSON head, 4 bytes big-endian, the head, the body).
//!
//! Writes are committed with redb's `Durability::Eventual`: the 202 of a publish does not
//! wait for an fsync (published events are a stream, not a queue; docs/PUBSUB.md), so a crash
//! of the machine may lose the last events. Every function here blocks on the disk.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use redb::{Database, Durability, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

use crate::wire::Published;

const EVENTS: TableDefinition<u64, &[u8]> = TableDefinition::new("events");

/// The name of the database file in the data directory.
pub const FILE_NAME: &str = "pubsub.redb";

/// Why the store could not do something.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct StoreError(pub String);

impl<E: Into<redb::Error>> From<E> for StoreError {
    fn from(e: E) -> Self {
        StoreError(e.into().to_string())
    }
}

#[derive(Serialize, Deserialize)]
struct Head {
    topic: String,
    content_type: String,
    id: String,
    published_ms: u64,
}

/// The server's topic log on disk.
pub struct Store {
    db: Database,
    next: AtomicU64,
    keep: u64,
}

fn encode(event: &Published) -> Result<Vec<u8>, StoreError> {
    let head = serde_json::to_vec(&Head {
        topic: event.topic.clone(),
        content_type: event.content_type.clone(),
        id: event.id.clone(),
        published_ms: event.published_ms,
    })
    .map_err(|e| StoreError(e.to_string()))?;
    let len = u32::try_from(head.len()).map_err(|e| StoreError(e.to_string()))?;
    let mut out = Vec::with_capacity(4 + head.len() + event.body.len());
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(&head);
    out.extend_from_slice(&event.body);
    Ok(out)
}

fn decode(bytes: &[u8]) -> Option<Published> {
    let len = u32::from_be_bytes(bytes.get(..4)?.try_into().ok()?) as usize;
    let head: Head = serde_json::from_slice(bytes.get(4..4 + len)?).ok()?;
    let event = Published {
        topic: head.topic,
        content_type: head.content_type,
        body: Bytes::copy_from_slice(bytes.get(4 + len..)?),
        id: head.id,
        published_ms: head.published_ms,
    };
    crate::wire::check_published(&event).ok()?;
    Some(event)
}

impl Store {
    /// Open (or create) the store in `dir`, which must exist, keeping at most `keep` events.
    /// Returns it and the events it holds, oldest first (a damaged one is skipped).
    pub fn open(dir: &Path, keep: usize) -> Result<(Store, Vec<Published>), StoreError> {
        let path = dir.join(FILE_NAME);
        let db = Database::create(&path)
            .map_err(|e| StoreError(format!("cannot open {}: {e}", path.display())))?;
        let tx = db.begin_write()?;
        tx.open_table(EVENTS)?;
        tx.commit()?;
        let keep = keep as u64;
        let (events, next) = {
            let tx = db.begin_read()?;
            let table = tx.open_table(EVENTS)?;
            let next = table.last()?.map_or(1, |(k, _)| k.value() + 1);
            let from = next.saturating_sub(keep);
            let mut events = Vec::new();
            for row in table.range(from..)? {
                let (_, value) = row?;
                if let Some(event) = decode(value.value()) {
                    events.push(event);
                }
            }
            (events, next)
        };
        Ok((
            Store {
                db,
                next: AtomicU64::new(next),
                keep,
            },
            events,
        ))
    }

    /// Write one event, and forget those past the count kept.
    pub fn append(&self, event: &Published) -> Result<(), StoreError> {
        let value = encode(event)?;
        let key = self.next.fetch_add(1, Ordering::AcqRel);
        let mut tx = self.db.begin_write()?;
        tx.set_durability(Durability::Eventual);
        {
            let mut table = tx.open_table(EVENTS)?;
            table.insert(key, value.as_slice())?;
            // Amortised: every 64 events, drop what is past the count kept.
            if key % 64 == 0 {
                let below = key.saturating_sub(self.keep);
                table.retain_in(..below, |_, _| false)?;
            }
        }
        tx.commit()?;
        Ok(())
    }
}
