//! Fanout: `POST /publish/{topic}` on a `restpipe server` process fanned out to many
//! subscribed client nodes (docs/PUBSUB.md; issue 15).
//!
//! The clients are real [`ClientNode`]s in this process, as [`crate::scale`] makes them (each
//! with its own certificate), each with a publish/subscribe hub subscribed to [`TOPIC`] and
//! an `event_{TOPIC}` handler. The server is a `restpipe server` process
//! ([`procs::server_node`], its topic log's store under `--data-dir` in the scratch
//! directory). Once the server's `/status` counts every client's subscription, the bench
//! publishes [`BODY`]-byte events on the server's front door on one keep-alive connection,
//! in two phases:
//!
//! - **paced**: `paced` events at `rate` per second;
//! - **burst**: `burst` events back to back, each sent as soon as the last was answered 202.
//!
//! Each event's body carries its sequence number and its send time (ns from an instant of
//! this process, taken just before the request is written); each client's handler records
//! now - send time into one HDR histogram, so a latency is publication (the `POST` leaving
//! the bench) to handler. A phase ends when every client's handler has had every event of
//! it (at most [`DRAIN_LIMIT`]); the phase fails unless every client got every event, each
//! once. Figures per phase: events published per second (events / the time to publish
//! them), deliveries per second and events delivered to all per second (events or
//! deliveries / the time from the first publish to the last delivery), and the delivery
//! latency's p50, p99 and max.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use bytes::Bytes;
use hdrhistogram::Histogram;
use hyper::StatusCode;
use restpipe::handler::{Context, HandlerError, Request};
use restpipe::http::Pipe;
use restpipe::pubsub::{event_handler_name, Pubsub, PubsubSettings};
use restpipe::ClientNode;
use restpipe_certs::CertificateAuthority;
use restpipe_testkit::certs::Certs;
use restpipe_testkit::procs::Node;
use tokio::sync::Notify;

use crate::{load, procs, scale};

/// The topic published and subscribed to.
pub const TOPIC: &str = "bench/fanout";
/// Bytes of each event's body.
pub const BODY: usize = 256;
/// The shortest phase whose CPU is reported.
pub const CPU_WINDOW: Duration = Duration::from_secs(1);
/// The longest wait for a phase's deliveries, and for the subscriptions.
const DRAIN_LIMIT: Duration = Duration::from_secs(120);

/// The sizes of the scenario.
#[derive(Clone, Debug)]
pub struct Plan {
    /// Subscribed client nodes.
    pub clients: usize,
    /// Events of the paced phase.
    pub paced: usize,
    /// Events per second of the paced phase.
    pub rate: f64,
    /// Events of the burst.
    pub burst: usize,
}

/// One phase of publishing.
#[derive(Clone, Debug)]
pub struct Phase {
    /// `paced` or `burst`.
    pub name: &'static str,
    /// The rate asked for (events/s); `None` for the burst.
    pub rate: Option<f64>,
    /// Events published.
    pub events: usize,
    /// Seconds to publish them (first request sent to last 202 read).
    pub publish_secs: f64,
    /// Seconds from the first publish to the last delivery.
    pub delivered_secs: f64,
    /// Handler calls (every client × every event).
    pub deliveries: u64,
    /// Delivery latency, µs: p50, p99, max.
    pub latency_us: (f64, f64, f64),
    /// Clients whose handler had every event of the phase.
    pub complete: usize,
    /// CPU from the first publish to the last delivery, % of one core: the server process,
    /// and this process (the publisher and every client node); `None` for a phase shorter
    /// than [`CPU_WINDOW`] (10 ms ticks say nothing of it).
    pub cpu_pct: Option<(f64, f64)>,
}

impl Phase {
    /// Events published per second.
    pub fn published_per_s(&self) -> f64 {
        self.events as f64 / self.publish_secs
    }

    /// Handler calls per second, from the first publish to the last delivery.
    pub fn deliveries_per_s(&self) -> f64 {
        self.deliveries as f64 / self.delivered_secs
    }

    /// Events delivered to every client per second, from the first publish to the last
    /// delivery.
    pub fn events_per_s(&self) -> f64 {
        self.events as f64 / self.delivered_secs
    }
}

/// Everything the fanout scenario measured.
#[derive(Clone, Debug)]
pub struct Outcome {
    /// Subscribed clients.
    pub clients: usize,
    /// Seconds to start and connect them, and until the server counted every subscription.
    pub subscribed_secs: f64,
    /// The paced phase, then the burst.
    pub phases: Vec<Phase>,
}

/// What one client's handler has seen.
#[derive(Default)]
struct Seen {
    /// The sequence number after the last event it had (0: none yet).
    next: AtomicU64,
    /// Events it had, each once, in order.
    got: AtomicU64,
}

/// What every handler records into.
struct Tally {
    /// The instant send times are measured from.
    base: Instant,
    /// Delivery latencies, ns.
    latency: Mutex<Histogram<u64>>,
    /// Events had, over all clients, each once.
    total: AtomicU64,
    /// Events had again, or out of order, and bodies that could not be read.
    anomalies: AtomicU64,
    /// `reached` is notified once `total` is at least this.
    goal: AtomicU64,
    reached: Notify,
}

impl Tally {
    fn new() -> anyhow::Result<Tally> {
        Ok(Tally {
            base: Instant::now(),
            latency: Mutex::new(
                Histogram::new_with_bounds(1, DRAIN_LIMIT.as_nanos() as u64 * 2, 3)
                    .context("the latency histogram")?,
            ),
            total: AtomicU64::new(0),
            anomalies: AtomicU64::new(0),
            goal: AtomicU64::new(u64::MAX),
            reached: Notify::new(),
        })
    }

    fn now_ns(&self) -> u64 {
        self.base.elapsed().as_nanos() as u64
    }

    /// A client's handler had `body`.
    fn record(&self, seen: &Seen, body: &[u8]) {
        let now = self.now_ns();
        let Some((seq, sent)) = parse(body) else {
            self.anomalies.fetch_add(1, Ordering::Relaxed);
            return;
        };
        if seen.next.fetch_max(seq + 1, Ordering::Relaxed) > seq {
            self.anomalies.fetch_add(1, Ordering::Relaxed);
            return;
        }
        seen.got.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut h) = self.latency.lock() {
            h.saturating_record(now.saturating_sub(sent).max(1));
        }
        let total = self.total.fetch_add(1, Ordering::AcqRel) + 1;
        if total >= self.goal.load(Ordering::Acquire) {
            self.reached.notify_one();
        }
    }

    /// Wait until `total` is at least `goal`, at most `limit`; whether it is.
    async fn wait_for(&self, goal: u64, limit: Duration) -> bool {
        self.goal.store(goal, Ordering::Release);
        let until = Instant::now() + limit;
        loop {
            if self.total.load(Ordering::Acquire) >= goal {
                return true;
            }
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            // A notification sent before this wait leaves a permit: none is lost.
            let _ = tokio::time::timeout(left, self.reached.notified()).await;
        }
    }
}

/// The body of event `seq` sent at `sent` ns: `"{seq} {sent}"`, padded with spaces to
/// [`BODY`] bytes.
fn body(seq: u64, sent: u64) -> Bytes {
    let text = format!("{seq} {sent}");
    let pad = " ".repeat(BODY.saturating_sub(text.len()));
    Bytes::from(text + &pad)
}

/// The sequence number and send time of a body of [`body`].
fn parse(body: &[u8]) -> Option<(u64, u64)> {
    let text = std::str::from_utf8(body).ok()?;
    let mut fields = text.split_whitespace();
    let seq = fields.next()?.parse().ok()?;
    let sent = fields.next()?.parse().ok()?;
    Some((seq, sent))
}

/// Subscribed connections the server's `/status` counts.
async fn subscribed(http: SocketAddr) -> anyhow::Result<u64> {
    let value = load::status_json(http).await?;
    Ok(value["pubsub"]["subscribed_connections"]
        .as_u64()
        .unwrap_or(0))
}

/// Wait until the server at `http` counts `n` subscribed connections, at most `limit`.
async fn wait_subscribed(
    server: &mut Node,
    http: SocketAddr,
    n: usize,
    limit: Duration,
) -> anyhow::Result<()> {
    let until = Instant::now() + limit;
    loop {
        let seen = subscribed(http).await?;
        if seen == n as u64 {
            return Ok(());
        }
        procs::check_alive(server)?;
        if Instant::now() >= until {
            bail!("the server counts {seen} subscribed clients, not {n}, after {limit:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Publish `events` events (sequence numbers from `*seq` on) on `conn`, at `rate` per second
/// or back to back; the seconds it took.
async fn publish(
    conn: &mut load::Conn<http_body_util::Full<Bytes>>,
    tally: &Tally,
    events: usize,
    rate: Option<f64>,
    seq: &mut u64,
) -> anyhow::Result<f64> {
    let path = format!("/publish/{TOPIC}");
    let mut pace = rate.map(|r| {
        let mut pace = tokio::time::interval(Duration::from_secs_f64(1.0 / r));
        pace.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        pace
    });
    let started = Instant::now();
    for _ in 0..events {
        if let Some(pace) = pace.as_mut() {
            pace.tick().await;
        }
        let (status, answer) = load::post(conn, &path, body(*seq, tally.now_ns()))
            .await
            .with_context(|| format!("POST {path}"))?;
        if status != StatusCode::ACCEPTED {
            bail!(
                "POST {path} answered {status}: {}",
                String::from_utf8_lossy(&answer)
            );
        }
        *seq += 1;
    }
    Ok(started.elapsed().as_secs_f64())
}

/// CPU time so far of each of `pids`.
fn cpu_times(pids: &[u32], ticks: f64) -> anyhow::Result<Vec<Duration>> {
    pids.iter()
        .map(|&pid| procs::cpu_time(pid, ticks))
        .collect()
}

/// Run the scenario.
pub async fn run(work: &Certs, plan: &Plan, ticks: f64) -> anyhow::Result<Outcome> {
    let n = plan.clients;
    let ca = CertificateAuthority::load(&work.paths.ca_cert, &work.paths.ca_key)?;
    let mut materials = scale::issue(&ca, n)?.into_iter();
    let data = work.dir().join("fanout-data");
    let mut server = procs::server_node(
        work,
        "fanout-server",
        (0, 0),
        None,
        &["--data-dir".into(), data.display().to_string()],
        None,
    )
    .await?;
    let http = server.http;
    let server_addr = format!("127.0.0.1:{}", server.pipe_addr().port());

    let tally = Arc::new(Tally::new()?);
    let mut seen: Vec<Arc<Seen>> = Vec::with_capacity(n);
    let mut hubs: Vec<Pubsub> = Vec::with_capacity(n);
    let mut clients: Vec<ClientNode> = Vec::with_capacity(n);
    let settings = PubsubSettings {
        subscribe: vec![TOPIC.into()],
        ..PubsubSettings::default()
    };
    let started = Instant::now();
    scale::start_clients_with(
        &mut materials,
        n,
        &server_addr,
        &mut clients,
        |mut options| {
            let mine = Arc::new(Seen::default());
            let (tally, me) = (tally.clone(), mine.clone());
            options.node.handlers.add(
                event_handler_name(TOPIC),
                move |_: Context, req: Request| {
                    tally.record(&me, &req.body);
                    async { Ok::<_, HandlerError>("ok") }
                },
            );
            let node = ClientNode::start(options)?;
            hubs.push(
                Pubsub::start(&Pipe::Client(node.clone()), settings.clone())
                    .map_err(anyhow::Error::msg)?,
            );
            seen.push(mine);
            Ok(node)
        },
    )
    .await?;
    wait_subscribed(&mut server, http, n, DRAIN_LIMIT).await?;
    let subscribed_secs = started.elapsed().as_secs_f64();
    println!("  fanout: {n} clients connected and subscribed in {subscribed_secs:.1} s");

    let mut conn = load::connect_with(http).await?;
    let mut seq = 0;
    let mut phases = Vec::new();
    let pids = [server.pid(), std::process::id()];
    for (name, events, rate) in [
        ("paced", plan.paced, Some(plan.rate)),
        ("burst", plan.burst, None),
    ] {
        if events == 0 {
            continue;
        }
        if let Ok(mut h) = tally.latency.lock() {
            h.reset();
        }
        let got_before: Vec<u64> = seen.iter().map(|s| s.got.load(Ordering::Relaxed)).collect();
        let total_before = tally.total.load(Ordering::Acquire);
        let goal = total_before + (n * events) as u64;
        let cpu_before = cpu_times(&pids, ticks)?;
        let started = Instant::now();
        let publish_secs = publish(&mut conn, &tally, events, rate, &mut seq)
            .await
            .with_context(|| format!("fanout {name}: publishing"))?;
        // In steps, so that a server that exits fails the phase at once.
        let until = Instant::now() + DRAIN_LIMIT;
        let done = loop {
            if tally.wait_for(goal, Duration::from_millis(500)).await {
                break true;
            }
            procs::check_alive(&mut server)?;
            if Instant::now() >= until {
                break false;
            }
        };
        let delivered_secs = started.elapsed().as_secs_f64();
        let cpu_after = cpu_times(&pids, ticks)?;
        let pct = |i: usize| {
            cpu_after[i].saturating_sub(cpu_before[i]).as_secs_f64() / delivered_secs * 100.0
        };
        let cpu_pct = (delivered_secs >= CPU_WINDOW.as_secs_f64()).then(|| (pct(0), pct(1)));
        procs::check_alive(&mut server)?;
        let deliveries = tally.total.load(Ordering::Acquire) - total_before;
        let complete = seen
            .iter()
            .zip(&got_before)
            .filter(|(s, &before)| s.got.load(Ordering::Relaxed) - before == events as u64)
            .count();
        let anomalies = tally.anomalies.load(Ordering::Relaxed);
        if !done || complete != n || anomalies > 0 {
            bail!(
                "fanout {name}: {complete} of {n} clients got all {events} events ({deliveries} of {} deliveries within {DRAIN_LIMIT:?}; {anomalies} repeated, out of order or unreadable)",
                n * events
            );
        }
        let latency_us = match tally.latency.lock() {
            Ok(h) => (
                h.value_at_quantile(0.5) as f64 / 1e3,
                h.value_at_quantile(0.99) as f64 / 1e3,
                h.max() as f64 / 1e3,
            ),
            Err(_) => bail!("a handler panicked while recording"),
        };
        let phase = Phase {
            name,
            rate,
            events,
            publish_secs,
            delivered_secs,
            deliveries,
            latency_us,
            complete,
            cpu_pct,
        };
        println!(
            "  fanout: {name:<5} {events} events to {n} clients: published {:.0} events/s, {:.0} deliveries/s ({:.1} events/s to all), latency p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms; {complete} of {n} clients got every event; CPU: {}",
            phase.published_per_s(),
            phase.deliveries_per_s(),
            phase.events_per_s(),
            latency_us.0 / 1e3,
            latency_us.1 / 1e3,
            latency_us.2 / 1e3,
            cpu_pct.map_or("phase too short to say".into(), |(server, bench)| format!(
                "server {server:.0}%, bench process {bench:.0}%"
            )),
        );
        phases.push(phase);
    }

    for hub in &hubs {
        hub.shutdown();
    }
    let stops = clients.iter().map(|c| c.shutdown(Duration::ZERO));
    futures_util::future::join_all(stops).await;
    server.kill();
    Ok(Outcome {
        clients: n,
        subscribed_secs,
        phases,
    })
}
