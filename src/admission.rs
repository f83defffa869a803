//! Admission on the server's pipe port: who may hold a pending handshake, and how refusals are
//! logged.
//!
//! A TCP connection that has not finished its TLS handshake and hello holds a *handshake slot*.
//! Slots are capped in total and per source address, apart from the cap on established
//! connections, so that idle sockets from one address can neither fill the server nor lock
//! real clients out: past its cap a source's new sockets are closed at once. Refused
//! handshakes are counted in metrics every time, but logged at a bounded rate, so that a flood
//! of them cannot flood the log.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use crate::util::lock;

/// Handshake slots: a total and a per-source cap.
#[derive(Debug)]
pub(crate) struct Handshakes {
    max_total: usize,
    max_per_source: usize,
    pending: Mutex<Pending>,
}

#[derive(Debug, Default)]
struct Pending {
    total: usize,
    by_source: HashMap<IpAddr, usize>,
}

/// Why no handshake slot was given.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Refused {
    /// The server holds its maximum of pending handshakes.
    Total,
    /// This source holds its maximum of pending handshakes.
    PerSource,
}

impl Refused {
    /// The word logs and metrics use.
    pub(crate) fn reason(self) -> &'static str {
        match self {
            Refused::Total => "handshake_limit",
            Refused::PerSource => "source_limit",
        }
    }
}

/// A handshake slot, given back when dropped.
#[derive(Debug)]
pub(crate) struct Slot {
    handshakes: Arc<Handshakes>,
    source: IpAddr,
}

impl Handshakes {
    /// At most `max_total` pending handshakes, and `max_per_source` from one address.
    pub(crate) fn new(max_total: usize, max_per_source: usize) -> Arc<Self> {
        Arc::new(Handshakes {
            max_total: max_total.max(1),
            max_per_source: max_per_source.max(1),
            pending: Mutex::new(Pending::default()),
        })
    }

    /// A slot for a handshake from `source`, if the caps allow one. IPv4-mapped IPv6
    /// addresses count as their IPv4 address.
    pub(crate) fn admit(self: &Arc<Self>, source: IpAddr) -> Result<Slot, Refused> {
        let source = source.to_canonical();
        let mut pending = lock(&self.pending);
        if pending.total >= self.max_total {
            return Err(Refused::Total);
        }
        let count = pending.by_source.entry(source).or_insert(0);
        if *count >= self.max_per_source {
            return Err(Refused::PerSource);
        }
        *count += 1;
        pending.total += 1;
        Ok(Slot {
            handshakes: self.clone(),
            source,
        })
    }

    /// Pending handshakes now.
    pub(crate) fn pending(&self) -> usize {
        lock(&self.pending).total
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut pending = lock(&self.handshakes.pending);
        pending.total = pending.total.saturating_sub(1);
        if let Some(count) = pending.by_source.get_mut(&self.source) {
            *count -= 1;
            if *count == 0 {
                pending.by_source.remove(&self.source);
            }
        }
    }
}

/// A log-line budget: `burst` lines at once, refilled at `per_second`. What it holds back is
/// counted and reported with the next line it lets through.
#[derive(Debug)]
pub(crate) struct LogLimiter {
    burst: f64,
    per_second: f64,
    state: Mutex<Bucket>,
}

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    at: Instant,
    held_back: u64,
}

impl LogLimiter {
    /// A limiter of `burst` lines, refilled at `per_second` lines a second.
    pub(crate) fn new(burst: u32, per_second: u32) -> Self {
        LogLimiter {
            burst: f64::from(burst.max(1)),
            per_second: f64::from(per_second.max(1)),
            state: Mutex::new(Bucket {
                tokens: f64::from(burst.max(1)),
                at: Instant::now(),
                held_back: 0,
            }),
        }
    }

    /// Whether a line may be logged now: `Some(lines held back since the last one)`, or `None`
    /// when this one is held back too.
    pub(crate) fn allow(&self) -> Option<u64> {
        self.allow_at(Instant::now())
    }

    fn allow_at(&self, now: Instant) -> Option<u64> {
        let mut b = lock(&self.state);
        let elapsed = now.saturating_duration_since(b.at).as_secs_f64();
        b.tokens = (b.tokens + elapsed * self.per_second).min(self.burst);
        b.at = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            Some(std::mem::take(&mut b.held_back))
        } else {
            b.held_back += 1;
            None
        }
    }
}

/// The default burst of refused-handshake log lines.
pub(crate) const LOG_BURST: u32 = 50;
/// The default refill of refused-handshake log lines, per second.
pub(crate) const LOG_PER_SECOND: u32 = 10;

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn caps_per_source_and_in_total() {
        let h = Handshakes::new(3, 2);
        let a: IpAddr = "127.0.0.2".parse().unwrap();
        let b: IpAddr = "127.0.0.3".parse().unwrap();
        let a1 = h.admit(a).unwrap();
        let _a2 = h.admit(a).unwrap();
        assert_eq!(h.admit(a).unwrap_err(), Refused::PerSource);
        // The same address written as IPv4-mapped IPv6 is the same source.
        let mapped: IpAddr = "::ffff:127.0.0.2".parse().unwrap();
        assert_eq!(h.admit(mapped).unwrap_err(), Refused::PerSource);
        let _b1 = h.admit(b).unwrap();
        assert_eq!(h.admit(b).unwrap_err(), Refused::Total);
        drop(a1);
        assert_eq!(h.pending(), 2);
        let _b2 = h.admit(b).unwrap();
        assert_eq!(h.pending(), 3);
    }

    #[test]
    fn log_lines_are_rate_limited_and_counted() {
        let l = LogLimiter::new(2, 1);
        let t0 = Instant::now();
        assert_eq!(l.allow_at(t0), Some(0));
        assert_eq!(l.allow_at(t0), Some(0));
        assert_eq!(l.allow_at(t0), None);
        assert_eq!(l.allow_at(t0), None);
        assert_eq!(l.allow_at(t0 + Duration::from_millis(1100)), Some(2));
        assert_eq!(l.allow_at(t0 + Duration::from_millis(1100)), None);
    }
}
