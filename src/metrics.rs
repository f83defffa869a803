//! Metrics to statsd through cadence, never blocking the pipe.
//!
//! A metric goes into a bounded lock-free queue as a name and a value, nothing formatted and
//! nothing allocated on the request path; a background thread drains it every
//! [`DRAIN_EVERY`], adds up the counts of each name, and formats the lines with cadence into a
//! buffered UDP sink ([`BufferedUdpMetricSink`]), which packs several metrics, one a line,
//! into each datagram. Formatting each metric where it happened (cadence's builder, then a
//! copy into the queue) cost the request path 16% of its instructions with statsd on
//! (callgrind); statsd adds counts up anyway (`name:5|c` is five ticks). Nothing here ever
//! waits: a full queue drops the metric and counts the drop ([`Metrics::dropped`],
//! [`Metrics::stats`]). The drain thread is never woken per metric (cadence's own queuing sink
//! is, and in the benchmark that cost the pipe about a sixth of its throughput); it sleeps
//! between drains, and sends the UDP buffer when it fills and at least every
//! [`FLUSH_EVERY`], so a metric never sits long on a quiet node. With no statsd host
//! configured every call is a no-op.
//!
//! The names are RestPipe's (the README's Metrics table); the README's "Metrics" section lists them.
//!
//! Every call also feeds the in-process [`registry::Registry`], whether statsd is on or
//! off: `GET /metrics` renders it in the Prometheus text format, and the status page reads its
//! recent errors and round trips.

pub mod registry;

use std::io;
use std::net::{SocketAddr, ToSocketAddrs, UdpSocket};
use std::panic::RefUnwindSafe;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use cadence::prelude::*;
use cadence::{BufferedUdpMetricSink, MetricSink, StatsdClient};
use crossbeam_queue::ArrayQueue;
use serde::Serialize;

use registry::{HandlerStats, Registry};

/// Metrics queued at most before new ones are dropped.
const QUEUE_CAPACITY: usize = 16 * 1024;
/// The longest a metric waits in the UDP buffer before it is sent.
pub const FLUSH_EVERY: Duration = Duration::from_secs(1);
/// Bytes of metrics packed into one datagram at most: what fits an Ethernet frame, the usual
/// statsd choice (cadence's default is 512).
const DATAGRAM_BYTES: usize = 1432;
/// How often the background thread moves queued metrics into the UDP buffer.
pub const DRAIN_EVERY: Duration = Duration::from_millis(20);

/// A handle for emitting metrics. Clones share the sink. `Metrics::default()` is disabled.
#[derive(Clone, Default)]
pub struct Metrics {
    inner: Option<Arc<Inner>>,
    /// Always there: `/metrics` works with statsd off.
    registry: Arc<Registry>,
}

struct Inner {
    sink: Arc<Sink>,
}

/// A metric's name: a literal, the usual case, or one made at run time (shared, so that
/// handing it to the queue allocates nothing).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum MetricName {
    /// A name known when the program was built.
    Static(&'static str),
    /// A name made at run time.
    Shared(Arc<str>),
}

impl MetricName {
    /// The name.
    pub fn as_str(&self) -> &str {
        match self {
            MetricName::Static(name) => name,
            MetricName::Shared(name) => name,
        }
    }
}

impl From<&'static str> for MetricName {
    fn from(name: &'static str) -> Self {
        MetricName::Static(name)
    }
}

impl From<String> for MetricName {
    fn from(name: String) -> Self {
        MetricName::Shared(name.into())
    }
}

/// One metric as the request path hands it to the drain thread.
enum Sample {
    Count(MetricName),
    Timing(MetricName, Duration),
    Gauge(MetricName, u64),
}

/// The queue in front of the UDP sink, and the counts of what was lost.
struct Sink {
    queue: ArrayQueue<Sample>,
    /// Formats the drained metrics into `udp`.
    client: StatsdClient,
    udp: Arc<dyn MetricSink + Send + Sync + RefUnwindSafe>,
    counts: Counts,
}

impl Sink {
    /// Send every queued metric to the UDP sink, counting the ones it refuses: the counts of
    /// each name added up into one line (in the order the names came), then the timings and
    /// gauges as they came.
    fn drain(&self) {
        let mut counts: Vec<(MetricName, i64)> = Vec::new();
        let mut others = Vec::new();
        // At most one queue's worth, so that a busy node still flushes between drains.
        for _ in 0..self.queue.capacity() {
            let Some(sample) = self.queue.pop() else {
                break;
            };
            match sample {
                Sample::Count(name) => match counts.iter_mut().find(|(n, _)| *n == name) {
                    Some((_, count)) => *count += 1,
                    None => counts.push((name, 1)),
                },
                other => others.push(other),
            }
        }
        for (name, count) in &counts {
            self.sent(self.client.count(name.as_str(), *count).map(|_| ()));
        }
        for sample in others {
            let sent = match &sample {
                Sample::Timing(name, duration) => {
                    self.client.time(name.as_str(), *duration).map(|_| ())
                }
                Sample::Gauge(name, value) => self.client.gauge(name.as_str(), *value).map(|_| ()),
                Sample::Count(_) => Ok(()),
            };
            self.sent(sent);
        }
    }

    fn sent(&self, result: cadence::MetricResult<()>) {
        if result.is_err() {
            self.counts.unsent.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Queue a metric for the drain thread, or count it as dropped.
    fn push(&self, sample: Sample) {
        if self.queue.push(sample).is_err() {
            self.counts.queue_full.fetch_add(1, Ordering::Relaxed);
        }
    }
}

#[derive(Default)]
struct Counts {
    /// Refused by a full queue (or a queue whose thread is gone).
    queue_full: AtomicU64,
    /// Taken from the queue but refused by the UDP sink (the send failed).
    unsent: AtomicU64,
}

/// What the cadence client writes into: the UDP sink, which [`Sink`] also keeps for its
/// flushes and its count of datagrams.
struct SharedSink(Arc<dyn MetricSink + Send + Sync + RefUnwindSafe>);

impl MetricSink for SharedSink {
    fn emit(&self, metric: &str) -> io::Result<usize> {
        self.0.emit(metric)
    }

    fn flush(&self) -> io::Result<()> {
        self.0.flush()
    }
}

/// A snapshot of the metrics pipeline, for `/status` and logs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct MetricsStats {
    /// Whether metrics go anywhere.
    pub enabled: bool,
    /// Metrics waiting in the queue (approximate).
    pub queued: u64,
    /// Metrics dropped because the queue was full.
    pub dropped_queue_full: u64,
    /// Metrics dropped because the UDP send failed.
    pub dropped_unsent: u64,
    /// Datagrams sent to statsd.
    pub packets_sent: u64,
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
    /// Metrics that go to no statsd (the in-process registry still counts them).
    pub fn disabled() -> Self {
        Metrics::default()
    }

    /// Metrics sent to statsd at `host:port`, every name prefixed with `prefix`. The host is
    /// resolved once, here (an IPv4 address is preferred); an error says why it cannot be
    /// used.
    pub fn statsd(host: &str, port: u16, prefix: &str) -> Result<Self, String> {
        let addrs: Vec<SocketAddr> = (host, port)
            .to_socket_addrs()
            .map_err(|e| format!("statsd host {host}:{port} does not resolve: {e}"))?
            .collect();
        let addr = addrs
            .iter()
            .find(|a| a.is_ipv4())
            .or(addrs.first())
            .copied()
            .ok_or_else(|| format!("statsd host {host}:{port} has no address"))?;
        let bind = if addr.is_ipv4() {
            "0.0.0.0:0"
        } else {
            "[::]:0"
        };
        let socket = UdpSocket::bind(bind)
            .map_err(|e| format!("cannot open a UDP socket for statsd: {e}"))?;
        socket
            .set_nonblocking(true)
            .map_err(|e| format!("cannot make the statsd socket non-blocking: {e}"))?;
        let udp = BufferedUdpMetricSink::with_capacity(addr, socket, DATAGRAM_BYTES)
            .map_err(|e| format!("cannot set up the statsd sink: {e}"))?;
        Self::with_sink(udp, QUEUE_CAPACITY, prefix)
    }

    /// Metrics through a queue of `capacity` into `sink`, drained every [`DRAIN_EVERY`] and
    /// flushed every [`FLUSH_EVERY`].
    fn with_sink<T>(sink: T, capacity: usize, prefix: &str) -> Result<Self, String>
    where
        T: MetricSink + Sync + Send + RefUnwindSafe + 'static,
    {
        let udp: Arc<dyn MetricSink + Send + Sync + RefUnwindSafe> = Arc::new(sink);
        let sink = Arc::new(Sink {
            queue: ArrayQueue::new(capacity.max(1)),
            client: StatsdClient::from_sink(prefix, SharedSink(udp.clone())),
            udp,
            counts: Counts::default(),
        });
        spawn_drainer(Arc::downgrade(&sink))?;
        Ok(Metrics {
            inner: Some(Arc::new(Inner { sink })),
            registry: Arc::default(),
        })
    }

    /// The in-process registry behind `/metrics` and the status page.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Keep an error event (`kind`: a few words) for the status page's last errors.
    pub fn error_event(&self, kind: &'static str, message: &str) {
        self.registry.error_event(kind, message);
    }

    /// Metric names for the handlers listed as `Handlers::names` lists them, their time
    /// recorded in this registry: see [`HandlerMetrics::new`].
    pub fn handler_metrics<S: AsRef<str>>(
        &self,
        registered: impl IntoIterator<Item = S>,
    ) -> HandlerMetrics {
        HandlerMetrics::build(registered, |label| self.registry.handler(label))
    }

    /// Whether metrics go anywhere.
    pub fn is_enabled(&self) -> bool {
        self.inner.is_some()
    }

    /// Metrics dropped so far: refused by a full queue, or by a failed UDP send.
    pub fn dropped(&self) -> u64 {
        let s = self.stats();
        s.dropped_queue_full + s.dropped_unsent
    }

    /// A snapshot of the queue and of what was sent and dropped.
    pub fn stats(&self) -> MetricsStats {
        let Some(inner) = &self.inner else {
            return MetricsStats::default();
        };
        let sink = &inner.sink;
        MetricsStats {
            enabled: true,
            queued: sink.queue.len() as u64,
            dropped_queue_full: sink.counts.queue_full.load(Ordering::Relaxed),
            dropped_unsent: sink.counts.unsent.load(Ordering::Relaxed),
            packets_sent: sink.udp.stats().packets_sent,
        }
    }

    /// Send what the queue and the UDP buffer hold now. Never waits on the network: the
    /// socket is non-blocking.
    pub fn flush(&self) {
        if let Some(inner) = &self.inner {
            inner.sink.drain();
            let _ = inner.sink.udp.flush();
        }
    }

    /// Count one occurrence of `name` (`name:1|c`; the occurrences of one drain are sent as
    /// one line, `name:<n>|c`).
    pub fn tick(&self, name: impl Into<MetricName>) {
        let name = name.into();
        self.registry.tick(name.as_str());
        if let Some(inner) = &self.inner {
            inner.sink.push(Sample::Count(name));
        }
    }

    /// Record a duration under `name` (`name:<ms>|ms`).
    pub fn timing(&self, name: impl Into<MetricName>, duration: Duration) {
        let name = name.into();
        self.registry.timing(name.as_str(), duration);
        if let Some(inner) = &self.inner {
            inner.sink.push(Sample::Timing(name, duration));
        }
    }

    /// Set the gauge `name` (`name:<value>|g`).
    pub fn gauge(&self, name: impl Into<MetricName>, value: u64) {
        if let Some(inner) = &self.inner {
            inner.sink.push(Sample::Gauge(name.into(), value));
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

    /// The handler `handler` (a request's handler name) ran for `elapsed`:
    /// `message.receive.handle.timing`, and the handler's own tick and timing under the
    /// names `names` made for it.
    pub fn handled(&self, names: &HandlerMetrics, handler: &str, elapsed: Duration) {
        let names = names.get(handler);
        names.stats.duration.observe(elapsed);
        if let Some(inner) = &self.inner {
            let sink = &inner.sink;
            sink.push(Sample::Timing(
                MetricName::Static("message.receive.handle.timing"),
                elapsed,
            ));
            sink.push(Sample::Count(MetricName::Shared(names.tick.clone())));
            sink.push(Sample::Timing(
                MetricName::Shared(names.timing.clone()),
                elapsed,
            ));
        }
    }
}

/// Drain the queue every [`DRAIN_EVERY`] and send the UDP buffer every [`FLUSH_EVERY`], until
/// the sink is gone.
fn spawn_drainer(sink: Weak<Sink>) -> Result<(), String> {
    std::thread::Builder::new()
        .name("restpipe-statsd".into())
        .spawn(move || {
            let mut flushed = Instant::now();
            loop {
                std::thread::sleep(DRAIN_EVERY);
                let Some(sink) = sink.upgrade() else { return };
                sink.drain();
                if flushed.elapsed() >= FLUSH_EVERY {
                    let _ = sink.udp.flush();
                    flushed = Instant::now();
                }
            }
        })
        .map(|_| ())
        .map_err(|e| format!("cannot start the statsd thread: {e}"))
}

/// The `message.received.handle.<handler>.tick` and `.timing` names of one handler, and its
/// time in the registry (`restpipe_handler_duration_seconds{handler=...}`).
#[derive(Clone)]
pub struct HandlerMetricNames {
    tick: Arc<str>,
    timing: Arc<str>,
    stats: Arc<HandlerStats>,
}

impl std::fmt::Debug for HandlerMetricNames {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HandlerMetricNames")
            .field("tick", &self.tick)
            .field("timing", &self.timing)
            .finish()
    }
}

impl PartialEq for HandlerMetricNames {
    fn eq(&self, other: &Self) -> bool {
        self.tick == other.tick && self.timing == other.timing
    }
}

impl Eq for HandlerMetricNames {}

impl HandlerMetricNames {
    fn new(handler: &str, stats: &mut impl FnMut(&str) -> Arc<HandlerStats>) -> Self {
        // Only characters that are safe in a statsd line and a Graphite path.
        let handler: String = handler
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.') {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        HandlerMetricNames {
            tick: format!("message.received.handle.{handler}.tick").into(),
            timing: format!("message.received.handle.{handler}.timing").into(),
            stats: stats(&handler),
        }
    }

    /// The tick's name.
    pub fn tick(&self) -> &str {
        &self.tick
    }

    /// The timing's name.
    pub fn timing(&self) -> &str {
        &self.timing
    }
}

/// The metric names of every registered handler, made once when the node starts, so that
/// dispatch formats no name, and so that all the nouns under a prefix handler (say
/// `GET jobs/...`) share its names (`get_jobs`) instead of each minting metrics of its own.
#[derive(Clone, Debug)]
pub struct HandlerMetrics {
    exact: crate::util::FastMap<String, HandlerMetricNames>,
    /// Longest first.
    prefixes: Vec<(String, HandlerMetricNames)>,
    other: HandlerMetricNames,
}

impl HandlerMetrics {
    /// Names for the handlers listed as `Handlers::names` lists them: `get_time` for a
    /// handler of that name, `get_jobs*` for the prefix handler of `GET jobs/...`.
    /// Their time is kept apart from any registry; a node uses
    /// [`Metrics::handler_metrics`] instead.
    pub fn new<S: AsRef<str>>(registered: impl IntoIterator<Item = S>) -> Self {
        Self::build(registered, |_| Arc::default())
    }

    fn build<S: AsRef<str>>(
        registered: impl IntoIterator<Item = S>,
        mut stats: impl FnMut(&str) -> Arc<HandlerStats>,
    ) -> Self {
        let mut exact = crate::util::FastMap::default();
        let mut prefixes = Vec::new();
        for name in registered {
            let name = name.as_ref();
            match name.strip_suffix('*') {
                Some(prefix) => prefixes.push((
                    prefix.to_string(),
                    HandlerMetricNames::new(prefix, &mut stats),
                )),
                None => {
                    exact.insert(name.to_string(), HandlerMetricNames::new(name, &mut stats));
                }
            }
        }
        prefixes.sort_by_key(|(prefix, _)| std::cmp::Reverse(prefix.len()));
        HandlerMetrics {
            exact,
            prefixes,
            other: HandlerMetricNames::new("other", &mut stats),
        }
    }

    /// The names for a request whose handler name is `handler` (`get_jobs_42` is served by
    /// the prefix `get_jobs`). A name no registered handler covers gets `other`'s names.
    pub fn get(&self, handler: &str) -> &HandlerMetricNames {
        if let Some(names) = self.exact.get(handler) {
            return names;
        }
        self.prefixes
            .iter()
            .find(|(prefix, _)| {
                handler
                    .strip_prefix(prefix.as_str())
                    .is_some_and(|rest| rest.is_empty() || rest.starts_with('_'))
            })
            .map_or(&self.other, |(_, names)| names)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use std::sync::mpsc;
    use std::sync::Mutex;
    use std::time::Instant;

    /// A sink that reports each metric it is handed, then blocks until the gate opens (its
    /// sender is dropped): a statsd that has stopped draining.
    struct GatedSink {
        entered: Mutex<mpsc::Sender<String>>,
        gate: Mutex<mpsc::Receiver<()>>,
    }

    impl MetricSink for GatedSink {
        fn emit(&self, metric: &str) -> io::Result<usize> {
            let _ = self.entered.lock().unwrap().send(metric.to_string());
            let _ = self.gate.lock().unwrap().recv();
            Ok(metric.len())
        }
    }

    #[test]
    fn a_full_queue_drops_and_counts_without_blocking() {
        const CAPACITY: usize = 4;
        const EXTRA: u64 = 10;
        let (entered_tx, entered) = mpsc::channel();
        let (gate_tx, gate_rx) = mpsc::channel::<()>();
        let sink = GatedSink {
            entered: Mutex::new(entered_tx),
            gate: Mutex::new(gate_rx),
        };
        let metrics = Metrics::with_sink(sink, CAPACITY, "t").unwrap();

        // The first metric is taken by the queue's thread, which then blocks in the sink.
        metrics.tick("first");
        let first = entered.recv_timeout(Duration::from_secs(5)).unwrap();
        assert_eq!(first, "t.first:1|c");

        // The queue fills up, and everything after it is dropped and counted, at once.
        let started = Instant::now();
        for _ in 0..CAPACITY {
            metrics.tick("queued");
        }
        for _ in 0..EXTRA {
            metrics.timing("dropped", Duration::from_millis(3));
        }
        assert!(
            started.elapsed() < Duration::from_millis(500),
            "emitting into a full queue took {:?}",
            started.elapsed()
        );
        assert_eq!(metrics.dropped(), EXTRA);
        let stats = metrics.stats();
        assert_eq!(stats.dropped_queue_full, EXTRA);
        assert_eq!(stats.dropped_unsent, 0);
        assert_eq!(stats.queued, CAPACITY as u64);

        // Once the sink drains again, what was queued is delivered and nothing more is lost.
        drop(gate_tx);
        // The ticks of one name that one drain found are one line.
        let m = entered.recv_timeout(Duration::from_secs(5)).unwrap();
        assert_eq!(m, format!("t.queued:{CAPACITY}|c"));
        metrics.tick("after");
        assert_eq!(
            entered.recv_timeout(Duration::from_secs(5)).unwrap(),
            "t.after:1|c"
        );
        assert_eq!(metrics.dropped(), EXTRA);
    }

    #[test]
    fn disabled_metrics_do_nothing() {
        let metrics = Metrics::disabled();
        metrics.tick("a");
        metrics.gauge("b", 1);
        metrics.flush();
        assert!(!metrics.is_enabled());
        assert_eq!(metrics.stats(), MetricsStats::default());
    }

    #[test]
    fn a_lone_metric_on_a_quiet_node_is_sent_within_the_flush_period() {
        let statsd = UdpSocket::bind("127.0.0.1:0").unwrap();
        statsd.set_read_timeout(Some(FLUSH_EVERY * 3)).unwrap();
        let port = statsd.local_addr().unwrap().port();
        let metrics = Metrics::statsd("127.0.0.1", port, "restpipe").unwrap();
        metrics.tick("message.send.tick");
        metrics.timing("message.send.timing", Duration::from_millis(42));
        metrics.gauge("server.clients.connected", 3);
        let mut lines = Vec::new();
        let mut buf = [0u8; 2048];
        while lines.len() < 3 {
            let n = statsd
                .recv(&mut buf)
                .expect("a datagram within the flush period");
            let text = std::str::from_utf8(&buf[..n]).unwrap();
            lines.extend(text.lines().map(str::to_string));
        }
        assert_eq!(
            lines,
            [
                "restpipe.message.send.tick:1|c",
                "restpipe.message.send.timing:42|ms",
                "restpipe.server.clients.connected:3|g",
            ]
        );
        // The count follows the send, which the datagram may overtake.
        let counted = Instant::now() + Duration::from_secs(2);
        while metrics.stats().packets_sent == 0 && Instant::now() < counted {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(metrics.stats().packets_sent >= 1);
        assert_eq!(metrics.dropped(), 0);
    }

    #[test]
    fn a_host_that_does_not_resolve_is_an_error() {
        let err = Metrics::statsd("statsd.does-not-exist.invalid", 8125, "restpipe").unwrap_err();
        assert!(err.contains("does not resolve"), "{err}");
    }

    #[test]
    fn handler_names_are_made_once_and_prefixes_share_theirs() {
        let names =
            HandlerMetrics::new(["get_time", "get_jobs*", "get_jobs_special*", "odd:na|me"]);
        assert_eq!(
            names.get("get_time").tick(),
            "message.received.handle.get_time.tick"
        );
        assert_eq!(
            names.get("get_time").timing(),
            "message.received.handle.get_time.timing"
        );
        assert_eq!(
            names.get("get_jobs_42_run").tick(),
            "message.received.handle.get_jobs.tick"
        );
        assert_eq!(
            names.get("get_jobs").tick(),
            "message.received.handle.get_jobs.tick"
        );
        assert_eq!(
            names.get("get_jobs_special_1").tick(),
            "message.received.handle.get_jobs_special.tick"
        );
        assert_eq!(
            names.get("get_jobsx").tick(),
            "message.received.handle.other.tick"
        );
        assert_eq!(
            names.get("odd:na|me").tick(),
            "message.received.handle.odd_na_me.tick"
        );
    }
}
