//! The hand-over of queued events between server replicas (`--queue-shared-dir`,
//! docs/CLUSTER.md): what keeps the events queued on a replica durable, and moving, when that
//! replica dies.
//!
//! Each replica keeps its store in a directory of its own under the shared directory,
//! `DIR/<replica name as one path component>/queue.redb` ([`store_dir_name`]). Every
//! [`SCAN_EVERY`] a replica looks at the other stores there. A store is **adopted** when its
//! owner has not been heard from on NATS for [`crate::cluster::EXPIRE`] and the store can be
//! opened: redb holds an exclusive lock (`flock`) on the file for as long as a process has it
//! open, so the store of a live owner (partitioned from NATS, say) cannot be opened, and two
//! survivors never hold the same store ([`try_adopt`]). The adopter runs the queue's delivery
//! tasks over it (per-peer order, at least once, retries, TTL expiry, replies stored in that
//! store), through its own pipe, and takes no new event into it. It hands the store back
//! (closes it) when nothing is pending in it any more, or when the owner is heard from again:
//! each delivery task first records the send it has in flight. An owner that starts while its
//! store is held waits for it (its queued calls are 503 meanwhile, with the reason).
//!
//! Bounded: [`MAX_ADOPTED`] stores at once, a scan every [`SCAN_EVERY`], the owner's quick
//! retries for its own store for [`OWN_STORE_WAIT`] (then slower, with an error logged), and
//! the wait for a send in flight at a hand-back, [`RELEASE_WAIT`].

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::OnceCell;
use tracing::{error, info, warn};

use super::store::{self, Store, StoreError};
use super::{blocking, make_dir, Inner, Queue, QueueSettings};
use crate::cluster::Cluster;
use crate::http::Pipe;
use crate::util::lock;

/// How often a replica looks for stores to adopt and at the stores it holds.
pub const SCAN_EVERY: Duration = Duration::from_secs(2);
/// Stores of other replicas held at once, at most.
pub const MAX_ADOPTED: usize = 16;
/// How long a replica that starts tries its own store every [`OWN_STORE_RETRY`] while another
/// replica holds it, before it logs an error (and tries every [`OWN_STORE_RETRY_LATE`]).
pub const OWN_STORE_WAIT: Duration = Duration::from_secs(60);
const OWN_STORE_RETRY: Duration = Duration::from_millis(250);
const OWN_STORE_RETRY_LATE: Duration = Duration::from_secs(10);
/// How long a store being handed back waits for the sends in flight to be recorded.
pub const RELEASE_WAIT: Duration = Duration::from_secs(600);
/// The longest directory name a store may have.
const MAX_DIR_NAME: usize = 255;
/// Entries of the shared directory looked at in one scan, at most.
const MAX_SCAN: usize = 4096;

/// The user this process runs as (the owner of `/proc/self`), when the system says.
fn process_uid() -> Option<u32> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").ok().map(|m| m.uid())
}

/// Why the store directory `dir` is not trusted, if it is not: a store is trusted like this
/// replica's own only when `dir` is a real directory (no symlink) of the user this process
/// runs as, writable by no one else, and holds a regular file of that user as its store. An
/// adopted store's events go out through this replica's pipe: a store that another local user
/// could have written is never adopted, nor used as this replica's own.
pub fn untrusted(dir: &Path, uid: Option<u32>) -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    let ours = |m: &std::fs::Metadata| uid.is_none_or(|uid| m.uid() == uid);
    let why = match std::fs::symlink_metadata(dir) {
        Err(e) => format!("cannot be read: {e}"),
        Ok(m) if !m.is_dir() => "is not a directory (a symlink, say)".to_string(),
        Ok(m) if !ours(&m) => format!("belongs to user {}, not to this replica's", m.uid()),
        Ok(m) if m.mode() & 0o022 != 0 => {
            format!("is writable by other users (mode {:o})", m.mode() & 0o777)
        }
        Ok(_) => match std::fs::symlink_metadata(dir.join(store::FILE_NAME)) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
            Err(e) => format!("has a store that cannot be read: {e}"),
            Ok(f) if !f.file_type().is_file() => "has a store that is not a regular file".into(),
            Ok(f) if !ours(&f) => format!("has a store of user {}", f.uid()),
            Ok(_) => return None,
        },
    };
    Some(format!("the store directory {} {why}", dir.display()))
}

/// The directory name of a replica's store under the shared directory: the replica name with
/// every byte outside `A-Z a-z 0-9 _ -` as `~xx` (hex), as the cluster makes identities into
/// subject tokens ([`crate::cluster::identity_token`]); no name can be `.`, `..` or hold a
/// `/`, and two names never share one.
pub fn store_dir_name(replica: &str) -> String {
    crate::cluster::identity_token(replica)
}

/// The replica whose store directory is `name`, if `name` is one ([`store_dir_name`] undone).
pub fn replica_of_dir(name: &str) -> Option<String> {
    let bytes = name.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b == b'~' {
            let hex = name.get(i + 1..i + 3)?;
            let byte = u8::from_str_radix(hex, 16).ok()?;
            // Only what the escaping makes: lower-case hex of a byte it escapes.
            if hex != format!("{byte:02x}")
                || byte.is_ascii_alphanumeric()
                || byte == b'_'
                || byte == b'-'
            {
                return None;
            }
            out.push(byte);
            i += 3;
        } else if b.is_ascii_alphanumeric() || b == b'_' || b == b'-' {
            out.push(b);
            i += 1;
        } else {
            return None;
        }
    }
    let replica = String::from_utf8(out).ok()?;
    (!replica.is_empty()).then_some(replica)
}

/// What [`try_adopt`] found.
#[derive(Debug)]
pub enum Adoption {
    /// The store is open here now, with this many events pending.
    Adopted(Store, u64),
    /// Another process (or handle) holds it: its owner is alive, or another replica adopted
    /// it. Left alone.
    Held,
    /// It could be opened but nothing is pending in it; it was closed again.
    Idle,
}

/// Try to adopt the store in `dir` (which must hold one): open it unless another process
/// holds it (the lock is the fence), and keep it open when events are pending in it.
pub fn try_adopt(dir: &Path) -> Result<Adoption, StoreError> {
    let Some(store) = Store::open_with(dir, false)? else {
        return Ok(Adoption::Held);
    };
    let pending = match store.usage() {
        // As many peers as a queue admits, at most: a store made to hold more would start a
        // delivery task for each.
        Ok(usage) if usage.len() > super::MAX_PEERS => {
            store.close();
            return Err(StoreError(format!(
                "it holds events for {} peers, more than a queue admits ({})",
                usage.len(),
                super::MAX_PEERS
            )));
        }
        Ok(usage) => usage.values().map(|u| u.count).sum::<u64>(),
        Err(e) => {
            store.close();
            return Err(e);
        }
    };
    if pending == 0 {
        store.close();
        return Ok(Adoption::Idle);
    }
    Ok(Adoption::Adopted(store, pending))
}

/// A store this replica holds for another.
struct Adopted {
    inner: Arc<Inner>,
    /// Being handed back.
    releasing: bool,
}

/// The hand-over state of a replica's queue.
pub(super) struct Handover {
    /// The shared directory.
    dir: PathBuf,
    /// This replica's own store directory.
    own_dir: PathBuf,
    cluster: Cluster,
    /// By owner.
    adopted: Mutex<HashMap<String, Adopted>>,
    /// Stores found idle, damaged or unreadable, with their file's modification time: not
    /// opened again until it changes.
    skip: Mutex<HashMap<PathBuf, Option<SystemTime>>>,
}

impl Handover {
    /// The stores held for others now (those being handed back included).
    pub(super) fn holding(&self) -> Vec<Arc<Inner>> {
        lock(&self.adopted)
            .values()
            .map(|a| a.inner.clone())
            .collect()
    }

    /// The stores held for others, by owner, with their pending events, for `/status`.
    pub(super) fn status(&self) -> serde_json::Value {
        let mut held: Vec<serde_json::Value> = lock(&self.adopted)
            .iter()
            .map(|(owner, a)| {
                let pending = a.inner.pending_usage();
                serde_json::json!({
                    "replica": owner,
                    "pending": pending.count,
                    "pending_bytes": pending.bytes,
                    "releasing": a.releasing,
                })
            })
            .collect();
        held.sort_by(|a, b| a["replica"].as_str().cmp(&b["replica"].as_str()));
        serde_json::json!({
            "shared_dir": self.dir.display().to_string(),
            "adopted": held,
        })
    }
}

fn modified(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

impl Queue {
    /// The queue of a replica of `cluster` that keeps its store under the shared directory
    /// `shared` (`--queue-shared-dir`), in `shared/<replica>` ([`store_dir_name`]), and adopts
    /// the stores of dead replicas there (see the module). Its own store is opened now, and
    /// made if missing; when another replica holds it (it adopted it while this one was
    /// away), this returns at once and the store is opened as soon as it is handed back, the
    /// queue answering 503 meanwhile.
    pub async fn start_shared(
        pipe: Pipe,
        mut settings: QueueSettings,
        shared: &Path,
        cluster: Cluster,
    ) -> Result<Queue, String> {
        let name = store_dir_name(cluster.replica());
        if name.len() > MAX_DIR_NAME {
            return Err(format!(
                "the replica name {:?} is too long to name a directory under --queue-shared-dir ({} bytes once escaped, at most {MAX_DIR_NAME})",
                cluster.replica(),
                name.len()
            ));
        }
        let own_dir = shared.join(&name);
        settings.data_dir = own_dir.clone();
        let mut queue = Queue::start_unopened(pipe, settings)?;
        let opened = blocking({
            let (shared, own_dir) = (shared.to_path_buf(), own_dir.clone());
            move || {
                make_dir(&shared)?;
                make_dir(&own_dir)?;
                if let Some(why) = untrusted(&own_dir, process_uid()) {
                    return Err(StoreError(format!("{why}: this replica does not use it")));
                }
                Store::open_with(&own_dir, true)
            }
        })
        .await
        .map_err(|e| e.to_string())?;
        match opened {
            Some(store) => {
                queue
                    .inner
                    .install(store)
                    .await
                    .map_err(|e| e.to_string())?;
            }
            None => {
                warn!(
                    replica = %cluster.replica(),
                    dir = %own_dir.display(),
                    "the queue's store is held by another replica (adopted while this one was away); waiting for it to hand it back, queued calls are 503 meanwhile"
                );
                tokio::spawn(wait_for_own(queue.inner.clone()));
            }
        }
        let handover = Arc::new(Handover {
            dir: shared.to_path_buf(),
            own_dir,
            cluster,
            adopted: Mutex::new(HashMap::new()),
            skip: Mutex::new(HashMap::new()),
        });
        tokio::spawn(scan_loop(queue.inner.clone(), handover.clone()));
        queue.handover = Some(handover);
        Ok(queue)
    }

    /// The hand-over state for `/status`, when the queue is under `--queue-shared-dir`.
    pub fn handover_status(&self) -> Option<serde_json::Value> {
        self.handover.as_ref().map(|h| h.status())
    }
}

/// Try the replica's own store until it is handed back: every [`OWN_STORE_RETRY`] for
/// [`OWN_STORE_WAIT`], then every [`OWN_STORE_RETRY_LATE`], with an error logged.
async fn wait_for_own(inner: Arc<Inner>) {
    let started = Instant::now();
    let mut late = false;
    loop {
        let every = if late {
            OWN_STORE_RETRY_LATE
        } else {
            OWN_STORE_RETRY
        };
        if super::deliver::pause(&inner, every).await {
            return;
        }
        if inner.store.initialized() {
            info!(
                waited_s = started.elapsed().as_secs_f64(),
                "the queue's store was handed back; it is open here again"
            );
            return;
        }
        let dir = inner.settings.data_dir.clone();
        match blocking(move || Store::open_with(&dir, true)).await {
            Ok(Some(store)) => {
                match inner.install(store).await {
                    Ok(_) => info!(
                        waited_s = started.elapsed().as_secs_f64(),
                        "the queue's store was handed back; it is open here again"
                    ),
                    Err(e) => {
                        warn!(cause = %e, "the queue's store was handed back but cannot be read")
                    }
                }
                if inner.store.initialized() {
                    return;
                }
            }
            Ok(None) => {}
            Err(e) => warn!(cause = %e, "the queue's store cannot be opened; trying again"),
        }
        if !late && started.elapsed() >= OWN_STORE_WAIT {
            late = true;
            error!(
                dir = %inner.settings.data_dir.display(),
                waited_s = OWN_STORE_WAIT.as_secs(),
                "the queue's store is still held by another process: a replica that cannot hear this one on NATS, or another process with this replica's name; queued calls stay 503 until it is released (tried again every {} s)",
                OWN_STORE_RETRY_LATE.as_secs()
            );
        }
    }
}

/// Every [`SCAN_EVERY`]: hand back what should go back, adopt what should be adopted. When
/// the node stops, every adopted store is closed.
async fn scan_loop(own: Arc<Inner>, handover: Arc<Handover>) {
    loop {
        tokio::select! {
            _ = own.stop.cancelled() => break,
            _ = tokio::time::sleep(SCAN_EVERY) => {}
        }
        handover.hand_back(&own);
        handover.adopt(&own).await;
    }
    let held: Vec<Arc<Inner>> = lock(&handover.adopted)
        .drain()
        .map(|(_, a)| a.inner)
        .collect();
    for inner in held {
        if let Some(store) = inner.store.get().cloned() {
            let _ = blocking(move || {
                store.close();
                Ok(())
            })
            .await;
        }
    }
}

impl Handover {
    /// Start handing back every store whose owner is back or that has nothing pending.
    fn hand_back(self: &Arc<Self>, own: &Arc<Inner>) {
        let mut adopted = lock(&self.adopted);
        for (owner, held) in adopted.iter_mut() {
            if held.releasing {
                continue;
            }
            let back = self.cluster.replica_present(owner);
            let pending = held.inner.pending_usage().count;
            if !back && pending > 0 {
                continue;
            }
            held.releasing = true;
            let why = if back {
                "its replica is back"
            } else {
                "nothing is pending in it"
            };
            tokio::spawn(release(
                self.clone(),
                own.clone(),
                owner.clone(),
                held.inner.clone(),
                why,
            ));
        }
    }

    /// Adopt the stores of replicas not heard from whose lock is free, up to [`MAX_ADOPTED`].
    async fn adopt(&self, own: &Arc<Inner>) {
        // A replica that has just joined may not have heard the others yet.
        if !self.cluster.presence_settled() {
            return;
        }
        let room = MAX_ADOPTED.saturating_sub(lock(&self.adopted).len());
        if room == 0 {
            return;
        }
        let dir = self.dir.clone();
        let listed = blocking(move || {
            let entries = std::fs::read_dir(&dir).map_err(|e| {
                StoreError(format!(
                    "cannot read --queue-shared-dir {}: {e}",
                    dir.display()
                ))
            })?;
            Ok(entries
                .take(MAX_SCAN)
                .filter_map(|e| e.ok())
                .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                .map(|e| e.path())
                .collect::<Vec<PathBuf>>())
        })
        .await;
        let dirs = match listed {
            Ok(dirs) => dirs,
            Err(e) => {
                warn!(cause = %e, "cluster: the shared queue directory cannot be read");
                return;
            }
        };
        let mut adopted_now = 0;
        for path in dirs {
            if adopted_now >= room {
                break;
            }
            if path == self.own_dir {
                continue;
            }
            let Some(owner) = path
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(replica_of_dir)
            else {
                continue;
            };
            if lock(&self.adopted).contains_key(&owner) || self.cluster.replica_present(&owner) {
                continue;
            }
            let file = path.join(store::FILE_NAME);
            let stamp = modified(&file);
            if stamp.is_none() {
                continue;
            }
            if lock(&self.skip).get(&path).is_some_and(|s| *s == stamp) {
                continue;
            }
            let tried = blocking({
                let path = path.clone();
                move || match untrusted(&path, process_uid()) {
                    Some(why) => Err(StoreError(why)),
                    None => try_adopt(&path),
                }
            })
            .await;
            match tried {
                Ok(Adoption::Held) => {}
                Ok(Adoption::Idle) => {
                    lock(&self.skip).insert(path, modified(&file));
                }
                Ok(Adoption::Adopted(store, pending)) => {
                    lock(&self.skip).remove(&path);
                    let inner = adopted_inner(own, path.clone(), owner.clone());
                    lock(&self.adopted).insert(
                        owner.clone(),
                        Adopted {
                            inner: inner.clone(),
                            releasing: false,
                        },
                    );
                    info!(
                        replica = %owner,
                        pending,
                        dir = %path.display(),
                        "cluster: adopted the queue of a replica not heard from; delivering its events"
                    );
                    if let Err(e) = inner.install(store).await {
                        warn!(replica = %owner, cause = %e, "cluster: an adopted queue cannot be read; handing it back");
                    }
                    adopted_now += 1;
                }
                Err(e) => {
                    warn!(replica = %owner, dir = %path.display(), cause = %e, "cluster: the queue of a replica not heard from cannot be opened; left alone until its file changes");
                    lock(&self.skip).insert(path, stamp);
                }
            }
        }
    }
}

/// An [`Inner`] over the store of `owner` in `dir`, delivering through `own`'s pipe and
/// stopping with it.
fn adopted_inner(own: &Arc<Inner>, dir: PathBuf, owner: String) -> Arc<Inner> {
    let stop = own.stop.child_token();
    Arc::new(Inner {
        pipe: own.pipe.clone(),
        settings: QueueSettings {
            data_dir: dir,
            ..own.settings.clone()
        },
        store: OnceCell::new(),
        usage: Mutex::new(HashMap::new()),
        workers: Mutex::new(HashMap::new()),
        drain: stop.child_token(),
        stop,
        owner: Some(owner),
    })
}

/// Hand the store of `owner` back: each delivery task ends once it has recorded the send it
/// has in flight (at most [`RELEASE_WAIT`]), then the store is closed, which frees its lock.
async fn release(
    handover: Arc<Handover>,
    own: Arc<Inner>,
    owner: String,
    inner: Arc<Inner>,
    why: &'static str,
) {
    inner.drain.cancel();
    let deadline = Instant::now() + RELEASE_WAIT;
    while !lock(&inner.workers).is_empty() {
        if Instant::now() >= deadline || own.stop.is_cancelled() {
            warn!(replica = %owner, "cluster: a delivery to hand back did not end in time; stopped (it goes again, with the same id)");
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    inner.stop.cancel();
    let pending = inner.pending_usage().count;
    if let Some(store) = inner.store.get().cloned() {
        let _ = blocking(move || {
            store.close();
            Ok(())
        })
        .await;
    }
    let file = inner.settings.data_dir.join(store::FILE_NAME);
    if pending == 0 {
        lock(&handover.skip).insert(inner.settings.data_dir.clone(), modified(&file));
    }
    lock(&handover.adopted).remove(&owner);
    info!(replica = %owner, pending, why, "cluster: handed an adopted queue back");
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::queue::store::tests::record;
    use crate::queue::store::State;

    /// What another local user could have placed in the shared directory is not trusted: a
    /// symlink for a directory or for the store, a directory others may write, one of
    /// another user.
    #[test]
    fn only_a_private_directory_of_this_user_is_trusted() {
        use std::os::unix::fs::{symlink, PermissionsExt};
        let shared = tempfile::tempdir().unwrap();
        let uid = process_uid();
        let good = shared.path().join("r1");
        make_dir(&good).unwrap();
        assert_eq!(untrusted(&good, uid), None, "empty, not yet a store");
        drop(Store::open(&good).unwrap());
        assert_eq!(untrusted(&good, uid), None);
        let someone_else = uid.map(|u| u.wrapping_add(1)).or(Some(1));
        assert!(untrusted(&good, someone_else)
            .unwrap()
            .contains("belongs to user"));

        let link = shared.path().join("r2");
        symlink(&good, &link).unwrap();
        assert!(untrusted(&link, uid).unwrap().contains("not a directory"));

        let open = shared.path().join("r3");
        make_dir(&open).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
        assert!(untrusted(&open, uid)
            .unwrap()
            .contains("writable by other users"));

        let linked_store = shared.path().join("r4");
        make_dir(&linked_store).unwrap();
        symlink(
            good.join(store::FILE_NAME),
            linked_store.join(store::FILE_NAME),
        )
        .unwrap();
        assert!(untrusted(&linked_store, uid)
            .unwrap()
            .contains("not a regular file"));
    }

    #[test]
    fn store_dir_names_round_trip_and_stay_one_component() {
        for name in ["r1", "host:1234", "a/b", "..", ".", "é~x", "a b"] {
            let dir = store_dir_name(name);
            assert!(!dir.contains(['/', '.']) && dir != "..", "{dir}");
            assert_eq!(replica_of_dir(&dir).as_deref(), Some(name), "{dir}");
        }
        for stranger in ["", "a.b", "~2", "~zz", "~41", "~2E", "lost+found"] {
            assert_eq!(replica_of_dir(stranger), None, "{stranger}");
        }
    }

    #[test]
    fn a_store_held_open_is_never_adopted_and_a_free_one_is() {
        let dir = tempfile::tempdir().unwrap();
        let owner = Store::open(dir.path()).unwrap();
        owner.insert(&record("c1", u64::MAX), b"one").unwrap();
        // The owner holds it: the fence.
        assert!(matches!(try_adopt(dir.path()).unwrap(), Adoption::Held));
        assert!(matches!(try_adopt(dir.path()).unwrap(), Adoption::Held));
        // The owner is gone: adopted, with its pending event; a second adopter is fenced.
        owner.close();
        let Adoption::Adopted(adopter, pending) = try_adopt(dir.path()).unwrap() else {
            panic!("a free store with a pending event was not adopted");
        };
        assert_eq!(pending, 1);
        assert!(matches!(try_adopt(dir.path()).unwrap(), Adoption::Held));
        // The owner cannot have it back until the adopter closes it.
        assert!(Store::open_with(dir.path(), true).unwrap().is_none());
        let (seq, mut done, _) = adopter.head("c1").unwrap().unwrap();
        done.state = State::Delivered;
        done.finished_ms = Some(5);
        adopter.finish(seq, &done, Some(b"ok")).unwrap();
        adopter.close();
        assert!(adopter.head("c1").is_err(), "a closed store stays closed");
        // Nothing pending: not kept.
        assert!(matches!(try_adopt(dir.path()).unwrap(), Adoption::Idle));
        let back = Store::open_with(dir.path(), true).unwrap().unwrap();
        assert_eq!(back.get(seq).unwrap().unwrap().0.state, State::Delivered);
    }

    #[test]
    fn a_directory_without_a_store_is_an_error_not_an_adoption() {
        let dir = tempfile::tempdir().unwrap();
        assert!(try_adopt(dir.path()).is_err());
        assert!(!dir.path().join(store::FILE_NAME).exists());
    }
}
