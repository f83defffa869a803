//! A node's topic log: the published events it keeps, in the order it got them, bounded by
//! count, age and bytes (docs/PUBSUB.md).
//!
//! Every reader (a client connection on the server, an SSE listener, the node's own handler
//! delivery) holds a cursor, the sequence number of the next entry it reads, and is woken by
//! a `watch` when something is appended; nothing is queued per reader. A reader whose cursor
//! fell out of the log (what it had not read was dropped by retention) is told it lagged.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;

use crate::util::lock;
use crate::wire::Published;

/// One event of the log.
#[derive(Debug)]
pub struct Entry {
    /// Its place in this node's log: contiguous, from 1.
    pub seq: u64,
    /// The event.
    pub event: Published,
}

impl Entry {
    /// The bytes it counts against the log's byte bound.
    fn size(&self) -> u64 {
        let e = &self.event;
        (e.body.len() + e.topic.len() + e.content_type.len() + e.id.len() + 64) as u64
    }
}

/// How much a log keeps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Retention {
    /// Events kept at most.
    pub count: usize,
    /// How long an event is kept.
    pub age: Duration,
    /// Bytes kept at most (bodies and names).
    pub bytes: u64,
}

/// What a reader gets from [`Log::read`].
#[derive(Debug, Default)]
pub struct Batch {
    /// The entries from its cursor on, in order.
    pub entries: Vec<Arc<Entry>>,
    /// Entries it had not read were dropped by retention before it read them.
    pub lagged: bool,
    /// Its cursor after this batch.
    pub next: u64,
}

struct State {
    entries: VecDeque<Arc<Entry>>,
    ids: HashMap<String, u64>,
    next: u64,
    bytes: u64,
}

/// A node's topic log.
pub struct Log {
    state: Mutex<State>,
    retention: Retention,
    appended: watch::Sender<u64>,
}

/// Milliseconds since the epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// The publication time an event id starts with (`{ms:013}-...`), if it has one.
pub fn id_time(id: &str) -> Option<u64> {
    id.split('-').next()?.parse().ok()
}

impl Log {
    /// An empty log whose first entry will be `first_seq`.
    pub fn new(retention: Retention, first_seq: u64) -> Log {
        Log {
            state: Mutex::new(State {
                entries: VecDeque::new(),
                ids: HashMap::new(),
                next: first_seq.max(1),
                bytes: 0,
            }),
            retention,
            appended: watch::Sender::new(first_seq.max(1)),
        }
    }

    /// Append `event`; `None` when an event of the same id is already in the log (a
    /// duplicate, from the cluster or a client that sent it twice).
    pub fn append(&self, event: Published) -> Option<Arc<Entry>> {
        let entry = {
            let mut state = lock(&self.state);
            if state.ids.contains_key(&event.id) {
                return None;
            }
            let entry = Arc::new(Entry {
                seq: state.next,
                event,
            });
            state.next += 1;
            state.bytes += entry.size();
            state.ids.insert(entry.event.id.clone(), entry.seq);
            state.entries.push_back(entry.clone());
            self.prune(&mut state, now_ms());
            self.appended.send_replace(state.next);
            entry
        };
        Some(entry)
    }

    fn prune(&self, state: &mut State, now: u64) {
        let oldest_ms =
            now.saturating_sub(u64::try_from(self.retention.age.as_millis()).unwrap_or(u64::MAX));
        while let Some(front) = state.entries.front() {
            let over = state.entries.len() > self.retention.count
                || state.bytes > self.retention.bytes
                || front.event.published_ms < oldest_ms;
            if !over {
                break;
            }
            let size = front.size();
            let id = front.event.id.clone();
            state.entries.pop_front();
            state.bytes = state.bytes.saturating_sub(size);
            state.ids.remove(&id);
        }
    }

    /// Whether the log holds an event of this id.
    pub fn has(&self, id: &str) -> bool {
        lock(&self.state).ids.contains_key(id)
    }

    /// The cursor of a reader that starts from now.
    pub fn next_seq(&self) -> u64 {
        lock(&self.state).next
    }

    /// A receiver woken at every append (its value: the next sequence number).
    pub fn watch(&self) -> watch::Receiver<u64> {
        self.appended.subscribe()
    }

    /// Events and bytes held now.
    pub fn usage(&self) -> (usize, u64) {
        let state = lock(&self.state);
        (state.entries.len(), state.bytes)
    }

    /// The cursor that resumes after the event `id`: just after it when the log holds it;
    /// otherwise at the first event published after the time the id starts with, or at the
    /// oldest event kept when the id has no time.
    pub fn resume_after(&self, id: &str) -> u64 {
        let state = lock(&self.state);
        if let Some(seq) = state.ids.get(id) {
            return seq + 1;
        }
        let oldest = state.entries.front().map_or(state.next, |e| e.seq);
        match id_time(id) {
            Some(ms) => state
                .entries
                .iter()
                .find(|e| e.event.published_ms > ms)
                .map_or(state.next, |e| e.seq),
            None => oldest,
        }
    }

    /// At most `max` entries from the cursor `from` on.
    pub fn read(&self, from: u64, max: usize) -> Batch {
        let mut state = lock(&self.state);
        self.prune(&mut state, now_ms());
        let oldest = state.entries.front().map_or(state.next, |e| e.seq);
        let start = from.max(oldest);
        let lagged = from < oldest;
        let skip = usize::try_from(start - oldest).unwrap_or(usize::MAX);
        let entries: Vec<Arc<Entry>> = state.entries.iter().skip(skip).take(max).cloned().collect();
        let next = entries.last().map_or(start.min(state.next), |e| e.seq + 1);
        Batch {
            entries,
            lagged,
            next,
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn event(id: &str, ms: u64) -> Published {
        Published {
            topic: "t".into(),
            content_type: String::new(),
            body: bytes::Bytes::from_static(b"x"),
            id: id.into(),
            published_ms: ms,
        }
    }

    fn retention(count: usize) -> Retention {
        Retention {
            count,
            age: Duration::from_secs(3600),
            bytes: 1 << 20,
        }
    }

    #[test]
    fn readers_resume_and_lag() {
        let now = now_ms();
        let log = Log::new(retention(3), 1);
        for i in 0..5u64 {
            let id = format!("{:013}-00000000-{i:08x}", now + i);
            assert!(log.append(event(&id, now + i)).is_some());
        }
        // Duplicates are dropped.
        let dup = format!("{:013}-00000000-{:08x}", now + 4, 4);
        assert!(log.append(event(&dup, now + 4)).is_none());
        // Three are kept: 3, 4, 5.
        let batch = log.read(1, 10);
        assert!(batch.lagged);
        assert_eq!(
            batch.entries.iter().map(|e| e.seq).collect::<Vec<_>>(),
            [3, 4, 5]
        );
        assert_eq!(batch.next, 6);
        let after = format!("{:013}-00000000-{:08x}", now + 3, 3);
        assert_eq!(log.resume_after(&after), 5);
        // Unknown id: from the first event published after its time.
        assert_eq!(log.resume_after(&format!("{:013}-ffffffff-0", now + 2)), 4);
        assert_eq!(log.resume_after("garbage"), 3);
        let empty = log.read(6, 10);
        assert!(!empty.lagged && empty.entries.is_empty() && empty.next == 6);
    }
}
