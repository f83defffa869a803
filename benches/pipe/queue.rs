//! Queue: queued delivery (`X-Event-Delivery: queued`, docs/QUEUE.md) with its fsync, against
//! the store's own raw write rate on this machine, measured in the same run.
//!
//! A pair of nodes ([`procs::pair`]): the server node queues, in its store under
//! `--data-dir` in the scratch directory, and delivers to the connected client node. Each
//! point is the load generator ([`load::run_call`]) with `conns` closed-loop connections
//! sending queued `GET /client/dev-client/time` (a real handler, `get_time`, answers each
//! delivery) for the window, no warm-up: every request answered 202 is an event committed
//! durably (fsync) before its answer. Then the bench polls the server's `/status`
//! (`queue.pending`) until every event is delivered. Figures per point:
//!
//! - **accepted**: 202s per second over the window (and their p50, one durable commit each);
//! - **delivered**: events accepted / (from the start of the load until the queue is empty):
//!   the rate at which events get through, accept and delivery sharing one store.
//!
//! The **raw** rate is a tiny redb write loop in this process: the same redb as the node, one
//! small record per write transaction committed with `Durability::Immediate` (fsync), as the
//! node's store commits, into a file in the same scratch directory (so the same file system
//! as the node's `--data-dir`), for the same window; then the same with a spinning thread
//! beside it (see [`raw_commits`]). Runs interleave raw and queued points.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use hyper::header::{HeaderName, HeaderValue};
use hyper::{Method, StatusCode};
use redb::{Database, Durability, TableDefinition};
use restpipe_testkit::certs::Certs;

use crate::load::{self, Call, ConnMode};
use crate::procs;

/// What is queued, to the pair's client.
const PATH: &str = "/client/dev-client/time";
/// The raw loop's table: a sequence number to a small record.
const RAW: TableDefinition<u64, &[u8]> = TableDefinition::new("raw");
/// The raw loop's record: about the size of a small queued event's record.
pub const RAW_RECORD: usize = 200;
/// The longest wait for the queue to drain after a point.
const DRAIN_LIMIT: Duration = Duration::from_secs(120);

/// One point: queued calls on `conns` connections.
#[derive(Clone, Debug, Default)]
pub struct Point {
    /// Connections.
    pub conns: usize,
    /// Events accepted (202) per second, per run.
    pub accepted: Vec<f64>,
    /// p50 of the 202, µs, per run.
    pub p50: Vec<f64>,
    /// Events delivered per second from the start of the load to the empty queue, per run.
    pub delivered: Vec<f64>,
}

/// Everything the queue scenario measured.
#[derive(Clone, Debug, Default)]
pub struct Outcome {
    /// Raw redb commits per second, per run.
    pub raw: Vec<f64>,
    /// The same with a spinning thread beside the loop, per run.
    pub raw_awake: Vec<f64>,
    /// One per connection count.
    pub points: Vec<Point>,
    /// The scratch directory (the store's and the raw loop's) and its file system type.
    pub place: (String, String),
}

/// The type of the file system that holds `path` (the longest mount point above it in
/// `/proc/mounts`), or `?`.
fn fs_type(path: &Path) -> String {
    let Ok(mounts) = std::fs::read_to_string("/proc/mounts") else {
        return "?".into();
    };
    mounts
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let (_, at, kind) = (f.next()?, f.next()?, f.next()?);
            path.starts_with(at).then(|| (at.len(), kind.to_string()))
        })
        .max_by_key(|(len, _)| *len)
        .map_or_else(|| "?".into(), |(_, kind)| kind)
}

/// Commits per second of one small record per durable write transaction into `db`, for
/// `window`, the keys from `from` on; and the next key. With `awake`, a thread of this
/// process spins beside the loop meanwhile: on this VM a loop alone waits on every fsync
/// with its vCPU halted and is woken late (measured by hand with `--raw-redb` on the shared
/// machine: 260–320 commits/s alone, 540–2,700 with busy cores beside it), while the node's
/// store commits among busy threads.
fn raw_commits(
    db: &Database,
    window: Duration,
    from: u64,
    awake: bool,
) -> anyhow::Result<(f64, u64)> {
    let stop = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|s| {
        if awake {
            s.spawn(|| {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    std::hint::spin_loop();
                }
            });
        }
        let result = (|| {
            let record = [0x5a_u8; RAW_RECORD];
            let started = Instant::now();
            let mut n = from;
            while started.elapsed() < window {
                let mut tx = db.begin_write()?;
                tx.set_durability(Durability::Immediate);
                {
                    let mut table = tx.open_table(RAW)?;
                    table.insert(n, record.as_slice())?;
                }
                tx.commit()?;
                n += 1;
            }
            anyhow::Ok(((n - from) as f64 / started.elapsed().as_secs_f64(), n))
        })();
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        result
    })
}

/// [`raw_commits`] into a new `dir/raw.redb` for `window`: commits per second alone, and
/// with a spinning thread beside it.
pub fn raw_rate(dir: &Path, window: Duration) -> anyhow::Result<(f64, f64)> {
    std::fs::create_dir_all(dir).with_context(|| format!("{}", dir.display()))?;
    let db = Database::create(dir.join("raw.redb")).context("creating the raw redb file")?;
    let (alone, next) = raw_commits(&db, window, 0, false)?;
    let (awake, _) = raw_commits(&db, window, next, true)?;
    Ok((alone, awake))
}

/// Events the server's `/status` says are pending.
async fn pending(http: std::net::SocketAddr) -> anyhow::Result<u64> {
    let value = load::status_json(http).await?;
    // No queue yet (nothing queued since the start) is none pending.
    Ok(value["queue"]["pending"].as_u64().unwrap_or(0))
}

/// Wait until nothing is pending on the server at `http`, at most [`DRAIN_LIMIT`].
async fn drained(pair: &mut procs::Pair) -> anyhow::Result<()> {
    let until = Instant::now() + DRAIN_LIMIT;
    loop {
        let left = pending(pair.server_http).await?;
        if left == 0 {
            return Ok(());
        }
        pair.check_alive()?;
        if Instant::now() >= until {
            bail!("{left} queued event(s) still pending after {DRAIN_LIMIT:?}");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// A queued call, answered 202.
fn queued() -> Call {
    Call {
        method: Method::GET,
        headers: vec![(
            HeaderName::from_static("x-event-delivery"),
            HeaderValue::from_static("queued"),
        )],
        expect: StatusCode::ACCEPTED,
    }
}

/// Queue one event, wait for its delivery, and check that the client's handler answered it.
async fn check(pair: &mut procs::Pair) -> anyhow::Result<()> {
    let (status, body) = load::fetch_call(pair.server_http, PATH, &queued()).await?;
    let text = String::from_utf8_lossy(&body);
    if status != StatusCode::ACCEPTED {
        bail!("a queued GET {PATH} answered {status}: {text}");
    }
    let value: serde_json::Value = serde_json::from_slice(&body).context("the 202's JSON")?;
    let id = value["id"]
        .as_str()
        .with_context(|| format!("no id in the 202: {text}"))?
        .to_string();
    drained(pair).await?;
    let (status, body) = load::fetch(pair.server_http, &format!("/queued/{id}")).await?;
    let view: serde_json::Value =
        serde_json::from_slice(&body).with_context(|| format!("/queued/{id} answered {status}"))?;
    if view["state"] != "delivered" || view["reply"]["status"] != 200 {
        bail!("the queued event {id} is not delivered with a 200: {view}");
    }
    Ok(())
}

/// Run the scenario: `runs` runs of `window` each for the raw loop and every count of
/// `conns`, interleaved.
pub async fn run(
    work: &Certs,
    runs: usize,
    window: Duration,
    conns: &[usize],
) -> anyhow::Result<Outcome> {
    let data = work.dir().join("queue-data");
    let mut pair = procs::pair(
        work,
        &procs::PairOptions {
            name: "queue".into(),
            server_extra: vec![
                "--data-dir".into(),
                data.display().to_string(),
                // Room for every event a fast disk accepts in a window.
                "--queue-max-events".into(),
                "10000000".into(),
            ],
            ..Default::default()
        },
    )
    .await?;
    check(&mut pair).await?;
    let raw_dir: PathBuf = work.dir().join("raw-redb");
    std::fs::create_dir_all(&raw_dir).with_context(|| format!("{}", raw_dir.display()))?;
    let db =
        Arc::new(Database::create(raw_dir.join("raw.redb")).context("creating the raw redb file")?);
    let mut outcome = Outcome {
        place: (work.dir().display().to_string(), fs_type(work.dir())),
        points: conns
            .iter()
            .map(|&conns| Point {
                conns,
                ..Point::default()
            })
            .collect(),
        ..Outcome::default()
    };
    let pids = [pair.server.pid(), pair.client.pid()];
    let mut seq = 0;
    for run in 1..=runs {
        let db2 = db.clone();
        let ((raw, awake), next) = tokio::task::spawn_blocking(move || {
            let (raw, next) = raw_commits(&db2, window, seq, false)?;
            let (awake, next) = raw_commits(&db2, window, next, true)?;
            anyhow::Ok(((raw, awake), next))
        })
        .await??;
        seq = next;
        println!(
            "  run {run}/{runs}: queue: raw redb {raw:>7.0} commits/s (1 record, fsync), {awake:>7.0} with a busy thread beside"
        );
        outcome.raw.push(raw);
        outcome.raw_awake.push(awake);
        for point in outcome.points.iter_mut() {
            let c = point.conns;
            let started = Instant::now();
            let sample = load::run_call(
                pair.server_http,
                PATH,
                &queued(),
                c,
                ConnMode::KeepAlive,
                (Duration::ZERO, window),
                &pids,
            )
            .await
            .with_context(|| format!("queued calls at {c} conns"))?;
            if let (refused @ 1.., Some(status)) = sample.refused {
                bail!("queued calls at {c} conns: {refused} answered {status}, not 202");
            }
            drained(&mut pair)
                .await
                .with_context(|| format!("after queued calls at {c} conns"))?;
            let delivered = sample.requests as f64 / started.elapsed().as_secs_f64();
            println!(
                "  run {run}/{runs}: queue: {c:>3} conns: accepted {:>7.0} events/s (p50 {:>6.0} µs), delivered {delivered:>7.0} events/s ({} events, errors {})",
                sample.rps(),
                sample.micros(0.5),
                sample.requests,
                sample.errors
            );
            point.accepted.push(sample.rps());
            point.p50.push(sample.micros(0.5));
            point.delivered.push(delivered);
        }
        pair.check_alive()?;
    }
    Ok(outcome)
}
