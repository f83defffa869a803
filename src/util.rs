//! Small helpers that several modules share: a lock that shrugs off poisoning, and wall-clock
//! time as the JSON endpoints show it.

use std::sync::{Mutex, MutexGuard};
use std::time::SystemTime;

/// Lock `m`, using the data as it is if a panic poisoned the lock. Callers hold these locks
/// only for single map or counter operations, which a panic cannot leave half done.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Seconds since the Unix epoch, as a float (0 for a time before it).
pub(crate) fn epoch_secs(t: SystemTime) -> f64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}
