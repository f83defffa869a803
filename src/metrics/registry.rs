//! The in-process registry behind `GET /metrics` and the status page: fed by the same calls
//! that feed statsd, rendered in the Prometheus text exposition format on a scrape.
//!
//! Hand-rolled rather than the `prometheus-client` crate: every event the pipe emits is known
//! in advance, so each one is a fixed atomic (a counter, or the buckets of a fixed-bucket
//! histogram) found from its statsd name by a `match` on a static string. Recording is one or
//! two relaxed `fetch_add`s: no lock, no allocation, no name formatted per event. Label sets
//! are bounded: handlers (made once when the node starts), status classes and handshake
//! refusal reasons (both fixed lists). Gauges (peers, requests in flight, certificate days)
//! are read from the node at scrape time, so they cost nothing between scrapes.
//!
//! Beside the counters it keeps two small bounded records for the status page: the last
//! [`RECENT_ERRORS`] error events, and the heartbeat round trips of the last
//! [`RTT_SAMPLES`] heartbeats of each live connection (of the first [`RTT_PEERS`]). Both are touched only on rare events
//! (an error, a heartbeat every few seconds), never per request.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use serde::Serialize;

use crate::util::{epoch_secs, lock};

/// Error events kept for the status page, newest last.
pub const RECENT_ERRORS: usize = 50;
/// Heartbeat round trips kept per connection (five minutes at the default 5 s interval).
pub const RTT_SAMPLES: usize = 60;
/// Characters of an error's message kept.
const MESSAGE_CHARS: usize = 300;
/// A connection's round trips are forgotten when none came for this long (a connection whose
/// end was missed); live ones send a heartbeat every few seconds.
const RTT_STALE: Duration = Duration::from_secs(600);
/// Connections whose round trips are kept, at most: the status page shows a sparkline for
/// each; later connections get none. Without a bound, each of 10,000 idle connections held
/// about 1 KiB of samples, and every heartbeat swept them all.
pub const RTT_PEERS: usize = 256;
/// How often the stale round trips are swept, at most.
const RTT_SWEEP: Duration = Duration::from_secs(60);

/// Upper bounds of the latency buckets, in microseconds (100 µs to 30 s).
const BUCKETS_US: [u64; 17] = [
    100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000,
    1_000_000, 2_500_000, 5_000_000, 10_000_000, 30_000_000,
];
/// The same bounds as Prometheus `le` labels, in seconds.
const BUCKET_LABELS: [&str; 17] = [
    "0.0001", "0.00025", "0.0005", "0.001", "0.0025", "0.005", "0.01", "0.025", "0.05", "0.1",
    "0.25", "0.5", "1", "2.5", "5", "10", "30",
];

/// A latency histogram with the fixed buckets [`BUCKETS_US`] (and `+Inf`).
#[derive(Default)]
pub struct Histogram {
    /// Observations per bucket (not cumulative); the last is `+Inf`.
    buckets: [AtomicU64; 18],
    sum_us: AtomicU64,
}

impl Histogram {
    /// Record one duration: two relaxed atomic adds.
    pub fn observe(&self, d: Duration) {
        let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        let i = BUCKETS_US.partition_point(|&bound| bound < us);
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.sum_us.fetch_add(us, Ordering::Relaxed);
    }

    /// Observations so far.
    pub fn count(&self) -> u64 {
        self.buckets.iter().map(|b| b.load(Ordering::Relaxed)).sum()
    }

    fn render(&self, out: &mut String, name: &str, labels: &str) {
        let sep = if labels.is_empty() { "" } else { "," };
        let mut cumulative = 0;
        for (i, bucket) in self.buckets.iter().enumerate() {
            cumulative += bucket.load(Ordering::Relaxed);
            let le = BUCKET_LABELS.get(i).copied().unwrap_or("+Inf");
            let _ = writeln!(
                out,
                "{name}_bucket{{{labels}{sep}le=\"{le}\"}} {cumulative}"
            );
        }
        let sum = self.sum_us.load(Ordering::Relaxed) as f64 / 1e6;
        let braces = |l: &str| {
            if l.is_empty() {
                String::new()
            } else {
                format!("{{{l}}}")
            }
        };
        let _ = writeln!(out, "{name}_sum{} {sum}", braces(labels));
        let _ = writeln!(out, "{name}_count{} {cumulative}", braces(labels));
    }
}

/// The plain counters, one per statsd counter name: (statsd name, Prometheus name, help).
const COUNTERS: [(&str, &str, &str); 14] = [
    (
        "client.connect.new.tick",
        "restpipe_client_connect_attempts_total",
        "Dial attempts of a client node (TCP, TLS and hello).",
    ),
    (
        "client.connect.connected.tick",
        "restpipe_client_connect_connected_total",
        "Dial attempts of a client node that ended connected.",
    ),
    (
        "client.connect.broken.tick",
        "restpipe_client_connect_broken_total",
        "Established connections of a client node that were lost.",
    ),
    (
        "client.connect.heartbeat.success.tick",
        "restpipe_heartbeat_success_total",
        "Heartbeats that came back.",
    ),
    (
        "client.connect.heartbeat.fail.tick",
        "restpipe_heartbeat_fail_total",
        "Peers silent past the heartbeat timeout (the connection is closed).",
    ),
    (
        "message.send.tick",
        "restpipe_message_send_total",
        "Requests sent across the pipe.",
    ),
    (
        "message.receive.tick",
        "restpipe_message_receive_total",
        "Requests received from the peer, refused ones included.",
    ),
    (
        "message.receive.forbidden.tick",
        "restpipe_message_receive_forbidden_total",
        "Requests from the peer that this node's policy refused.",
    ),
    (
        "server.identity.cut.tick",
        "restpipe_server_identity_cut_total",
        "Server: identities cut to their length limit.",
    ),
    (
        "server.identity.replaced.tick",
        "restpipe_server_identity_replaced_total",
        "Server: connections replaced by a newer one with the same identity.",
    ),
    (
        "tls.handshake.log_held_back.tick",
        "restpipe_tls_handshake_log_held_back_total",
        "Server: refused handshakes not logged (over the log's rate).",
    ),
    (
        "pubsub.published.tick",
        "restpipe_pubsub_published_total",
        "Events published on this node (at its front door, or by a client through the server).",
    ),
    (
        "pubsub.listener.cut.tick",
        "restpipe_pubsub_listener_cut_total",
        "GET /events listeners cut for falling behind (stalled, or past the retention).",
    ),
    (
        "pubsub.refused.tick",
        "restpipe_pubsub_refused_total",
        "Server: publish requests and subscription globs the policy refused.",
    ),
];

/// The classes of `http.status.<class>.tick`.
const STATUS_CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

/// The reasons of `tls.handshake.rejected.<reason>.tick` (README, Metrics); anything else
/// counts as `other`.
const REJECT_REASONS: [&str; 15] = [
    "not_tls",
    "no_client_cert",
    "unknown_issuer",
    "expired",
    "bad_name",
    "bad_certificate",
    "incompatible",
    "alert",
    "tls_error",
    "io_error",
    "timeout",
    "no_identity",
    "hello",
    "limit",
    "other",
];

/// The time and count of one handler, shared by every name that resolves to it.
#[derive(Default)]
pub struct HandlerStats {
    /// Its time in the handler.
    pub duration: Histogram,
}

/// One error event, as the status page lists it.
#[derive(Clone, Debug, Serialize)]
pub struct ErrorEvent {
    /// Seconds since the epoch.
    pub at: f64,
    /// What kind of event: `handshake refused`, `connection ended`, `reload refused`, `http 5xx`, ...
    pub kind: &'static str,
    /// What happened, at most a few hundred characters.
    pub message: String,
}

/// The recent heartbeat round trips of one connection.
#[derive(Clone, Debug, Serialize)]
pub struct PeerRtts {
    /// The peer's identity.
    pub identity: String,
    /// The peer's address.
    pub address: String,
    /// `[seconds since the epoch, round trip in ms]`, oldest first.
    pub samples: VecDeque<(f64, f64)>,
}

/// The round trips kept for the status page, by connection.
#[derive(Default)]
struct Rtts {
    peers: HashMap<u64, PeerRtts>,
    /// When the stale ones were last swept, in seconds since the epoch.
    swept: f64,
}

/// The registry: every counter and histogram of one node (or of every node that shares the
/// [`Metrics`](super::Metrics) handle).
pub struct Registry {
    counters: [AtomicU64; COUNTERS.len()],
    status: [AtomicU64; STATUS_CLASSES.len()],
    rejected: [AtomicU64; REJECT_REASONS.len()],
    /// Names given to `tick` that no series carries (there should be none).
    unmapped: AtomicU64,
    send: Histogram,
    heartbeat: Histogram,
    /// By the handler's metric label; written when a node starts, read at scrapes.
    handlers: Mutex<BTreeMap<String, Arc<HandlerStats>>>,
    errors: Mutex<VecDeque<ErrorEvent>>,
    rtts: Mutex<Rtts>,
}

impl Default for Registry {
    fn default() -> Self {
        Registry {
            counters: Default::default(),
            status: Default::default(),
            rejected: Default::default(),
            unmapped: AtomicU64::new(0),
            send: Histogram::default(),
            heartbeat: Histogram::default(),
            handlers: Mutex::new(BTreeMap::new()),
            errors: Mutex::new(VecDeque::with_capacity(RECENT_ERRORS)),
            rtts: Mutex::default(),
        }
    }
}

/// Gauges read from the node at scrape time.
#[derive(Clone, Debug, Default)]
pub struct ScrapeGauges {
    /// `server` or `client`.
    pub role: &'static str,
    /// The node's identity.
    pub identity: String,
    /// Peers connected now.
    pub peers: u64,
    /// Requests this node sent that wait for their reply.
    pub in_flight_out: u64,
    /// Requests from peers being handled.
    pub in_flight_in: u64,
    /// Days left on this node's certificate.
    pub certificate_days_left: Option<i64>,
    /// The fewest days left on a connected peer's certificate.
    pub peer_certificate_days_left_min: Option<i64>,
    /// Metrics lost on the way to statsd.
    pub statsd_dropped: u64,
    /// Seconds since the front door started.
    pub uptime_s: f64,
}

impl Registry {
    /// Count one event under its statsd `name`. A `match` on the name: no hashing, no lock.
    pub fn tick(&self, name: &str) {
        let counter = match name {
            "client.connect.new.tick" => &self.counters[0],
            "client.connect.connected.tick" => &self.counters[1],
            "client.connect.broken.tick" => &self.counters[2],
            "client.connect.heartbeat.success.tick" => &self.counters[3],
            "client.connect.heartbeat.fail.tick" => &self.counters[4],
            "message.send.tick" => &self.counters[5],
            "message.receive.tick" => &self.counters[6],
            "message.receive.forbidden.tick" => &self.counters[7],
            "server.identity.cut.tick" => &self.counters[8],
            "server.identity.replaced.tick" => &self.counters[9],
            "tls.handshake.log_held_back.tick" => &self.counters[10],
            "pubsub.published.tick" => &self.counters[11],
            "pubsub.listener.cut.tick" => &self.counters[12],
            "pubsub.refused.tick" => &self.counters[13],
            "http.status.1xx.tick" => &self.status[0],
            "http.status.2xx.tick" => &self.status[1],
            "http.status.3xx.tick" => &self.status[2],
            "http.status.4xx.tick" => &self.status[3],
            "http.status.5xx.tick" => &self.status[4],
            other => match other
                .strip_prefix("tls.handshake.rejected.")
                .and_then(|r| r.strip_suffix(".tick"))
            {
                Some(reason) => {
                    let i = REJECT_REASONS
                        .iter()
                        .position(|r| *r == reason)
                        .unwrap_or(REJECT_REASONS.len() - 1);
                    &self.rejected[i]
                }
                None => &self.unmapped,
            },
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Record a duration under its statsd `name`; the per-handler timings go through
    /// [`HandlerStats`] instead.
    pub fn timing(&self, name: &str, d: Duration) {
        match name {
            "message.send.timing" => self.send.observe(d),
            "client.connect.heartbeat.timing" => self.heartbeat.observe(d),
            _ => {}
        }
    }

    /// The stats of the handler labelled `label`, made on first use (when a node starts).
    pub fn handler(&self, label: &str) -> Arc<HandlerStats> {
        lock(&self.handlers)
            .entry(label.to_string())
            .or_default()
            .clone()
    }

    /// Keep an error event for the status page; the oldest goes past [`RECENT_ERRORS`].
    pub fn error_event(&self, kind: &'static str, message: &str) {
        let message: String = message.chars().take(MESSAGE_CHARS).collect();
        let event = ErrorEvent {
            at: epoch_secs(SystemTime::now()),
            kind,
            message,
        };
        let mut errors = lock(&self.errors);
        if errors.len() >= RECENT_ERRORS {
            errors.pop_front();
        }
        errors.push_back(event);
    }

    /// The kept error events, oldest first.
    pub fn recent_errors(&self) -> Vec<ErrorEvent> {
        lock(&self.errors).iter().cloned().collect()
    }

    /// Keep a heartbeat round trip of connection `id` for the status page.
    pub fn rtt_sample(&self, id: u64, identity: &str, address: &str, rtt: Duration) {
        let now = epoch_secs(SystemTime::now());
        let mut rtts = lock(&self.rtts);
        if now - rtts.swept >= RTT_SWEEP.as_secs_f64() {
            let stale = now - RTT_STALE.as_secs_f64();
            rtts.peers
                .retain(|_, p| p.samples.back().is_some_and(|(at, _)| *at >= stale));
            rtts.swept = now;
        }
        if rtts.peers.len() >= RTT_PEERS && !rtts.peers.contains_key(&id) {
            return;
        }
        let peer = rtts.peers.entry(id).or_insert_with(|| PeerRtts {
            identity: identity.to_string(),
            address: address.to_string(),
            samples: VecDeque::with_capacity(RTT_SAMPLES),
        });
        if peer.samples.len() >= RTT_SAMPLES {
            peer.samples.pop_front();
        }
        peer.samples.push_back((now, rtt.as_secs_f64() * 1000.0));
    }

    /// Forget the round trips of connection `id`, which has ended.
    pub fn connection_ended(&self, id: u64) {
        lock(&self.rtts).peers.remove(&id);
    }

    /// The round trips of every live connection, by identity.
    pub fn rtts(&self) -> Vec<PeerRtts> {
        let mut all: Vec<PeerRtts> = lock(&self.rtts).peers.values().cloned().collect();
        all.sort_by(|a, b| a.identity.cmp(&b.identity));
        all
    }

    /// Everything in the Prometheus text exposition format (version 0.0.4).
    pub fn render(&self, gauges: &ScrapeGauges) -> String {
        let mut out = String::with_capacity(8 * 1024);
        let head = |out: &mut String, name: &str, kind: &str, help: &str| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        };
        for ((_, name, help), value) in COUNTERS.iter().zip(&self.counters) {
            head(&mut out, name, "counter", help);
            let _ = writeln!(out, "{name} {}", value.load(Ordering::Relaxed));
        }
        let name = "restpipe_http_responses_total";
        head(
            &mut out,
            name,
            "counter",
            "Answers of the front door, by status class.",
        );
        for (class, value) in STATUS_CLASSES.iter().zip(&self.status) {
            let _ = writeln!(
                out,
                "{name}{{class=\"{class}\"}} {}",
                value.load(Ordering::Relaxed)
            );
        }
        let name = "restpipe_tls_handshake_rejected_total";
        head(
            &mut out,
            name,
            "counter",
            "Server: connections refused before they joined, by reason.",
        );
        for (reason, value) in REJECT_REASONS.iter().zip(&self.rejected) {
            let _ = writeln!(
                out,
                "{name}{{reason=\"{reason}\"}} {}",
                value.load(Ordering::Relaxed)
            );
        }
        let name = "restpipe_unmapped_events_total";
        head(
            &mut out,
            name,
            "counter",
            "Events with a statsd name no series carries.",
        );
        let _ = writeln!(out, "{name} {}", self.unmapped.load(Ordering::Relaxed));

        let name = "restpipe_message_send_duration_seconds";
        head(
            &mut out,
            name,
            "histogram",
            "A request from sending to its reply, timeout or failure.",
        );
        self.send.render(&mut out, name, "");
        let name = "restpipe_heartbeat_rtt_seconds";
        head(
            &mut out,
            name,
            "histogram",
            "Heartbeat round trips (both sides measure).",
        );
        self.heartbeat.render(&mut out, name, "");
        let name = "restpipe_handler_duration_seconds";
        head(
            &mut out,
            name,
            "histogram",
            "Time of a received request in its handler, by handler.",
        );
        for (label, stats) in lock(&self.handlers).iter() {
            stats
                .duration
                .render(&mut out, name, &format!("handler=\"{label}\""));
        }

        let gauge = |out: &mut String, name: &str, help: &str, value: &dyn std::fmt::Display| {
            head(out, name, "gauge", help);
            let _ = writeln!(out, "{name} {value}");
        };
        let name = "restpipe_node_info";
        head(
            &mut out,
            name,
            "gauge",
            "This node: its role, identity and version (always 1).",
        );
        let _ = writeln!(
            out,
            "{name}{{role=\"{}\",identity=\"{}\",version=\"{}\"}} 1",
            gauges.role,
            escape_label(&gauges.identity),
            env!("CARGO_PKG_VERSION")
        );
        gauge(
            &mut out,
            "restpipe_peers_connected",
            "Peers connected now (a server's clients; 0 or 1 on a client).",
            &gauges.peers,
        );
        let name = "restpipe_requests_in_flight";
        head(
            &mut out,
            name,
            "gauge",
            "Requests in flight now: out (sent, waiting for the reply) and in (being handled).",
        );
        let _ = writeln!(out, "{name}{{direction=\"out\"}} {}", gauges.in_flight_out);
        let _ = writeln!(out, "{name}{{direction=\"in\"}} {}", gauges.in_flight_in);
        if let Some(days) = gauges.certificate_days_left {
            gauge(
                &mut out,
                "restpipe_certificate_days_left",
                "Days left on this node's certificate.",
                &days,
            );
        }
        if let Some(days) = gauges.peer_certificate_days_left_min {
            gauge(
                &mut out,
                "restpipe_peer_certificate_days_left_min",
                "The fewest days left on a connected peer's certificate.",
                &days,
            );
        }
        let name = "restpipe_statsd_dropped_total";
        head(
            &mut out,
            name,
            "counter",
            "Metrics lost on the way to statsd (queue full or send failed).",
        );
        let _ = writeln!(out, "{name} {}", gauges.statsd_dropped);
        gauge(
            &mut out,
            "restpipe_uptime_seconds",
            "Seconds since the front door started.",
            &gauges.uptime_s,
        );
        out
    }
}

/// A label value with `\`, `"` and newlines escaped, as the exposition format requires.
pub fn escape_label(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn every_statsd_counter_name_has_a_series() {
        let r = Registry::default();
        for (statsd, _, _) in COUNTERS {
            r.tick(statsd);
        }
        for class in STATUS_CLASSES {
            r.tick(&format!("http.status.{class}.tick"));
        }
        for reason in REJECT_REASONS {
            r.tick(&format!("tls.handshake.rejected.{reason}.tick"));
        }
        r.tick("tls.handshake.rejected.something_new.tick");
        assert_eq!(r.unmapped.load(Ordering::Relaxed), 0);
        assert!(r.counters.iter().all(|c| c.load(Ordering::Relaxed) == 1));
        assert_eq!(
            r.rejected[REJECT_REASONS.len() - 1].load(Ordering::Relaxed),
            2
        );
        r.tick("no.such.tick");
        assert_eq!(r.unmapped.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn histogram_buckets_are_cumulative_with_le_bounds_inclusive() {
        let h = Histogram::default();
        h.observe(Duration::from_micros(100));
        h.observe(Duration::from_micros(101));
        h.observe(Duration::from_secs(60));
        let mut out = String::new();
        h.render(&mut out, "x", "");
        assert!(out.contains("x_bucket{le=\"0.0001\"} 1\n"), "{out}");
        assert!(out.contains("x_bucket{le=\"0.00025\"} 2\n"), "{out}");
        assert!(out.contains("x_bucket{le=\"30\"} 2\n"), "{out}");
        assert!(out.contains("x_bucket{le=\"+Inf\"} 3\n"), "{out}");
        assert!(out.contains("x_count 3\n"), "{out}");
        assert_eq!(h.count(), 3);
    }

    #[test]
    fn the_error_ring_and_the_round_trips_are_bounded() {
        let r = Registry::default();
        for i in 0..RECENT_ERRORS + 7 {
            r.error_event("test", &format!("error {i} {}", "x".repeat(1000)));
        }
        let errors = r.recent_errors();
        assert_eq!(errors.len(), RECENT_ERRORS);
        assert!(errors[0].message.starts_with("error 7 "));
        assert_eq!(errors[0].message.chars().count(), MESSAGE_CHARS);
        for _ in 0..RTT_SAMPLES + 3 {
            r.rtt_sample(9, "c1", "127.0.0.1:1", Duration::from_millis(2));
        }
        assert_eq!(r.rtts()[0].samples.len(), RTT_SAMPLES);
        r.connection_ended(9);
        assert!(r.rtts().is_empty());
        for id in 0..RTT_PEERS as u64 + 10 {
            r.rtt_sample(id, "c", "127.0.0.1:1", Duration::from_millis(1));
        }
        assert_eq!(r.rtts().len(), RTT_PEERS);
        // A connection that ends makes room for the next one.
        r.connection_ended(0);
        r.rtt_sample(
            RTT_PEERS as u64 + 20,
            "late",
            "127.0.0.1:2",
            Duration::from_millis(1),
        );
        assert!(r.rtts().iter().any(|p| p.identity == "late"));
    }
}
