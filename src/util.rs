//! Small helpers that several modules share: a lock that shrugs off poisoning, a map for the
//! per-request path, wall-clock time as the JSON endpoints show it, and the process's
//! open-files limit.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};
use std::time::SystemTime;

/// Lock `m`, using the data as it is if a panic poisoned the lock. Callers hold these locks
/// only for single map or counter operations, which a panic cannot leave half done.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A hash map for the per-request path (requests by id, handler names): foldhash, seeded at
/// random per process, costs a fraction of the standard SipHash on short keys (measured with
/// callgrind), and its seed keeps a peer from choosing colliding ids.
pub(crate) type FastMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

/// Seconds since the Unix epoch, as a float (0 for a time before it).
pub(crate) fn epoch_secs(t: SystemTime) -> f64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// Raise this process's open-files soft limit to its hard limit, where the system allows it,
/// and return the limit now in force: every pipe connection and HTTP connection is a
/// descriptor, and many systems start processes at a soft limit of 1024. The node logs the
/// figure in its ready line.
pub fn raise_open_files_limit() -> Result<u64, String> {
    rlimit::increase_nofile_limit(u64::MAX).map_err(|e| e.to_string())
}

/// The open-files soft limit in force, if the system says.
pub fn open_files_limit() -> Option<u64> {
    rlimit::getrlimit(rlimit::Resource::NOFILE)
        .ok()
        .map(|(soft, _)| soft)
}
