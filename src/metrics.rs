//! Metrics to statsd through cadence, never blocking the pipe.
//!
//! Metrics go into a bounded queue that a cadence thread drains into a buffered UDP socket.
//! A full queue drops the metric and counts the drop; nothing here ever waits. With no statsd
//! host configured, every call is a no-op.

use std::net::{ToSocketAddrs, UdpSocket};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use cadence::prelude::*;
use cadence::{BufferedUdpMetricSink, QueuingMetricSink, StatsdClient};

/// Metrics queued at most before new ones are dropped.
const QUEUE_CAPACITY: usize = 16 * 1024;

/// A handle for emitting metrics. Clones share the sink. `Metrics::default()` is disabled.
#[derive(Clone, Default)]
pub struct Metrics {
    inner: Option<Arc<Inner>>,
}

struct Inner {
    client: StatsdClient,
    dropped: AtomicU64,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics")
            .field("enabled", &self.inner.is_some())
            .field("dropped", &self.dropped())
            .finish()
    }
}

impl Metrics {
    /// Metrics that go nowhere.
    pub fn disabled() -> Self {
        Metrics::default()
    }

    /// Metrics sent to statsd at `host:port`, every name prefixed with `prefix`.
    pub fn statsd(host: &str, port: u16, prefix: &str) -> Result<Self, String> {
        let addr = (host, port)
            .to_socket_addrs()
            .map_err(|e| format!("statsd host {host}:{port} does not resolve: {e}"))?
            .next()
            .ok_or_else(|| format!("statsd host {host}:{port} has no address"))?;
        let bind = if addr.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" };
        let socket =
            UdpSocket::bind(bind).map_err(|e| format!("cannot open a UDP socket for statsd: {e}"))?;
        socket
            .set_nonblocking(true)
            .map_err(|e| format!("cannot make the statsd socket non-blocking: {e}"))?;
        let udp = BufferedUdpMetricSink::from(addr, socket)
            .map_err(|e| format!("cannot set up the statsd sink: {e}"))?;
        let queued = QueuingMetricSink::with_capacity(udp, QUEUE_CAPACITY);
        let client = StatsdClient::from_sink(prefix, queued);
        Ok(Metrics {
            inner: Some(Arc::new(Inner {
                client,
                dropped: AtomicU64::new(0),
            })),
        })
    }

    /// Whether metrics go anywhere.
    pub fn is_enabled(&self) -> bool {
        self.inner.is_some()
    }

    /// Metrics dropped because the queue was full or the send failed.
    pub fn dropped(&self) -> u64 {
        self.inner
            .as_ref()
            .map(|i| i.dropped.load(Ordering::Relaxed))
            .unwrap_or(0)
    }

    /// Count one occurrence of `name` (`name:1|c`).
    pub fn tick(&self, name: &str) {
        if let Some(inner) = &self.inner {
            if inner.client.count(name, 1).is_err() {
                inner.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Record a duration under `name` (`name:<ms>|ms`).
    pub fn timing(&self, name: &str, duration: Duration) {
        if let Some(inner) = &self.inner {
            if inner.client.time(name, duration).is_err() {
                inner.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Set the gauge `name` (`name:<value>|g`).
    pub fn gauge(&self, name: &str, value: u64) {
        if let Some(inner) = &self.inner {
            if inner.client.gauge(name, value).is_err() {
                inner.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// A heartbeat came back after `rtt`.
    pub fn heartbeat_ok(&self, rtt: Duration) {
        self.timing("client.connect.heartbeat.timing", rtt);
        self.tick("client.connect.heartbeat.success.tick");
    }

    /// A peer stayed silent past the heartbeat timeout.
    pub fn heartbeat_failed(&self) {
        self.tick("client.connect.heartbeat.fail.tick");
    }
}
