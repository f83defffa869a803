//! Scale: one `restpipe server` process with thousands of idle, heartbeating clients.
//!
//! The clients are real [`ClientNode`]s in this process, each with its own certificate issued
//! here by the dev CA. The server's memory (`VmRSS`) and CPU time (`utime + stime`) come from
//! `/proc`. Then the server is killed and restarted on the same port, and every client's
//! reconnect time is recorded.

use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use hyper::StatusCode;
use restpipe::{ClientNode, ClientOptions, NodeOptions, TlsMaterial};
use restpipe_certs::{CertificateAuthority, IssueOptions};

use crate::load;
use restpipe_testkit::certs::Certs as Workdir;

use crate::procs;

/// Clients started together before waiting for them to connect.
const BATCH: usize = 250;

/// The server with `n` idle clients.
#[derive(Clone, Debug)]
pub struct Point {
    /// Clients connected.
    pub clients: usize,
    /// The server's RSS, bytes.
    pub rss: u64,
    /// `(rss - rss with no client) / clients`.
    pub bytes_per_client: f64,
    /// The server's CPU over the window, in % of one core.
    pub server_cpu_pct: f64,
    /// This process's CPU (the client nodes) over the window, in % of one core.
    pub clients_cpu_pct: f64,
    /// Seconds to connect the clients added for this point.
    pub connect_secs: f64,
}

/// Reconnects after the server was killed and restarted.
#[derive(Clone, Debug)]
pub struct Restart {
    /// Clients that were connected.
    pub clients: usize,
    /// Seconds from the kill to the new server answering `/health`.
    pub server_ready_secs: f64,
    /// Each client's reconnect time, seconds from the restart (sorted).
    pub times: Vec<f64>,
    /// Clients that did not reconnect within the limit.
    pub missing: usize,
    /// Seconds from the restart until the server's `/health` counted every client.
    pub server_counted_secs: f64,
    /// The most reconnects in any 100 ms.
    pub peak_per_100ms: usize,
    /// Reconnects per second from the restart: `[0 s, 1 s)`, `[1 s, 2 s)`, ...
    pub per_second: Vec<usize>,
    /// The new server's RSS with every client back, bytes.
    pub rss_after: u64,
}

impl Restart {
    /// The reconnect time at quantile `q`, seconds.
    pub fn quantile(&self, q: f64) -> f64 {
        quantile(&self.times, q)
    }
}

/// Everything the scale scenario measured.
#[derive(Clone, Debug)]
pub struct Outcome {
    /// Certificates issued, and the seconds it took.
    pub issued: (usize, f64),
    /// The server's RSS with no client, bytes.
    pub rss_empty: u64,
    /// The server's CPU with no client, % of one core.
    pub cpu_empty_pct: f64,
    /// One point per client count.
    pub points: Vec<Point>,
    /// The restart at the largest count.
    pub restart: Restart,
}

/// Timing knobs of the scenario.
pub struct Plan {
    /// Client counts, increasing.
    pub counts: Vec<usize>,
    /// Wait after connecting before measuring (heartbeats start).
    pub settle: Duration,
    /// CPU window.
    pub window: Duration,
}

/// Issue `n` client certificates from `ca` on every core; PEM (certificate, key) pairs.
pub fn issue(ca: &CertificateAuthority, n: usize) -> anyhow::Result<Vec<TlsMaterial>> {
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    let chunk = n.div_ceil(threads).max(1);
    let indices: Vec<usize> = (0..n).collect();
    let opts = IssueOptions::default();
    std::thread::scope(|s| {
        let handles: Vec<_> = indices
            .chunks(chunk)
            .map(|ids| {
                let opts = &opts;
                s.spawn(move || {
                    ids.iter()
                        .map(|i| {
                            let cert = ca.issue_client(&format!("idle-{i:05}"), opts)?;
                            Ok(TlsMaterial::from_pem(
                                ca.cert_pem(),
                                &cert.cert_pem,
                                &cert.key_pem,
                            )?)
                        })
                        .collect::<anyhow::Result<Vec<_>>>()
                })
            })
            .collect();
        let mut all = Vec::with_capacity(n);
        for handle in handles {
            match handle.join() {
                Ok(part) => all.extend(part?),
                Err(_) => bail!("a certificate thread panicked"),
            }
        }
        Ok(all)
    })
}

/// How many clients the server's `/health` counts.
pub async fn server_count(http: std::net::SocketAddr) -> Option<u64> {
    let (status, body) = load::fetch(http, "/health").await.ok()?;
    if status != StatusCode::OK {
        return None;
    }
    let value: serde_json::Value = serde_json::from_slice(&body).ok()?;
    value.get("clients")?.as_u64()
}

async fn wait_count(http: std::net::SocketAddr, n: usize, within: Duration) -> anyhow::Result<()> {
    let until = Instant::now() + within;
    loop {
        let seen = server_count(http).await;
        if seen == Some(n as u64) {
            return Ok(());
        }
        if Instant::now() >= until {
            bail!("the server counts {seen:?} clients, not {n}, after {within:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// CPU of `pid` and of this process over `window`, % of one core each.
async fn cpu_over(pid: u32, window: Duration, ticks: f64) -> anyhow::Result<(f64, f64)> {
    let pcts = procs::cpu_pct_over(&[pid, std::process::id()], window, ticks).await?;
    Ok((pcts[0], pcts[1]))
}

/// Start `n` client nodes of the certificates `materials` yields (in batches of [`BATCH`],
/// each waited for), dialling `server` (`host:port`, or several, comma separated), into
/// `clients`.
pub async fn start_clients(
    materials: &mut impl Iterator<Item = TlsMaterial>,
    n: usize,
    server: &str,
    clients: &mut Vec<ClientNode>,
) -> anyhow::Result<()> {
    start_clients_with(materials, n, server, clients, |options| {
        Ok(ClientNode::start(options)?)
    })
    .await
}

/// [`start_clients`], each node started by `start` from its options (which may add
/// handlers, or start more on the node, before it connects).
pub async fn start_clients_with(
    materials: &mut impl Iterator<Item = TlsMaterial>,
    n: usize,
    server: &str,
    clients: &mut Vec<ClientNode>,
    mut start: impl FnMut(ClientOptions) -> anyhow::Result<ClientNode>,
) -> anyhow::Result<()> {
    let mut left = n;
    while left > 0 {
        let batch = left.min(BATCH);
        let mut fresh = Vec::with_capacity(batch);
        for tls in materials.by_ref().take(batch) {
            let mut options = ClientOptions::new(NodeOptions::new(tls), server.to_string());
            options.server_name = Some("localhost".into());
            fresh.push(start(options)?);
        }
        if fresh.len() < batch {
            bail!("{n} clients asked for, but too few certificates");
        }
        let waits = fresh
            .iter()
            .map(|c| c.wait_connected(Duration::from_secs(60)));
        for result in futures_util::future::join_all(waits).await {
            result.map_err(|e| anyhow::anyhow!("a client did not connect: {e}"))?;
        }
        clients.extend(fresh);
        left -= batch;
    }
    Ok(())
}

/// A watcher per client of `clients`: once the client's current connection closes, the
/// moment it is connected again (`None` if not within `limit`).
pub fn reconnect_watchers(
    clients: &[ClientNode],
    limit: Duration,
) -> Vec<tokio::task::JoinHandle<Option<Instant>>> {
    clients
        .iter()
        .map(|client| {
            let client = client.clone();
            let old = client.connection();
            tokio::spawn(async move {
                if let Some(old) = old {
                    old.closed().await;
                }
                client
                    .wait_connected(limit)
                    .await
                    .ok()
                    .map(|_| Instant::now())
            })
        })
        .collect()
}

/// Reconnects per second of `times` (seconds from an event): `[0 s, 1 s)`, `[1 s, 2 s)`,
/// ...; and the most in any 100 ms.
pub fn profile(times: &[f64]) -> (Vec<usize>, usize) {
    let mut per_second = Vec::new();
    let mut per_100ms = std::collections::HashMap::<u64, usize>::new();
    for &t in times {
        let s = t as usize;
        if per_second.len() <= s {
            per_second.resize(s + 1, 0);
        }
        per_second[s] += 1;
        *per_100ms.entry((t * 10.0) as u64).or_default() += 1;
    }
    (per_second, per_100ms.values().copied().max().unwrap_or(0))
}

/// The value at quantile `q` of `sorted`; NaN if empty.
pub fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() - 1) as f64 * q).round() as usize;
    sorted[i]
}

/// Run the scenario.
pub async fn run(work: &Workdir, plan: &Plan, ticks: f64) -> anyhow::Result<Outcome> {
    let max = *plan.counts.last().context("no client count")?;
    let ca = CertificateAuthority::load(&work.paths.ca_cert, &work.paths.ca_key)?;
    let started = Instant::now();
    let mut materials = issue(&ca, max)?.into_iter();
    let issued = (max, started.elapsed().as_secs_f64());
    println!(
        "  scale: issued {max} client certificates in {:.1} s",
        issued.1
    );

    let mut server = procs::server_node(work, "scale-server", (0, 0), None, &[], None).await?;
    let (pipe_port, http) = (server.pipe_addr().port(), server.http);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss_empty = procs::rss_bytes(&server)?;
    let (cpu_empty_pct, _) =
        cpu_over(server.pid(), plan.window.min(Duration::from_secs(5)), ticks).await?;

    let server_addr = format!("127.0.0.1:{pipe_port}");
    let mut clients: Vec<ClientNode> = Vec::with_capacity(max);
    let mut points = Vec::new();
    for &n in &plan.counts {
        let started = Instant::now();
        let more = n.saturating_sub(clients.len());
        start_clients(&mut materials, more, &server_addr, &mut clients).await?;
        let connect_secs = started.elapsed().as_secs_f64();
        wait_count(http, n, Duration::from_secs(30)).await?;
        tokio::time::sleep(plan.settle).await;
        procs::check_alive(&mut server)?;
        let rss = procs::rss_bytes(&server)?;
        let (server_cpu_pct, clients_cpu_pct) = cpu_over(server.pid(), plan.window, ticks).await?;
        let point = Point {
            clients: n,
            rss,
            bytes_per_client: (rss as f64 - rss_empty as f64) / n as f64,
            server_cpu_pct,
            clients_cpu_pct,
            connect_secs,
        };
        println!(
            "  scale: {n} clients: RSS {:.1} MiB, {:.0} B/client, server CPU {:.2}%, connected in {connect_secs:.1} s",
            rss as f64 / 1048576.0,
            point.bytes_per_client,
            server_cpu_pct
        );
        points.push(point);
    }

    // Kill the server, start it again on the same ports, and time every client's return.
    let watchers = reconnect_watchers(&clients, Duration::from_secs(120));
    let killed = Instant::now();
    server.kill();
    let restarted = Instant::now();
    // The ports the first server got from port 0: the clients dial that pipe port.
    let mut server = procs::server_node(
        work,
        "scale-server-restarted",
        (pipe_port, http.port()),
        None,
        &[],
        None,
    )
    .await?;
    let server_ready_secs = killed.elapsed().as_secs_f64();
    let mut times = Vec::with_capacity(max);
    let mut missing = 0;
    for watcher in futures_util::future::join_all(watchers).await {
        match watcher? {
            Some(at) => times.push(at.saturating_duration_since(restarted).as_secs_f64()),
            None => missing += 1,
        }
    }
    times.sort_by(f64::total_cmp);
    wait_count(http, max, Duration::from_secs(60)).await?;
    let server_counted_secs = restarted.elapsed().as_secs_f64();
    let (per_second, peak_per_100ms) = profile(&times);
    tokio::time::sleep(plan.settle).await;
    let rss_after = procs::rss_bytes(&server)?;
    let restart = Restart {
        clients: max,
        server_ready_secs,
        times,
        missing,
        server_counted_secs,
        peak_per_100ms,
        per_second,
        rss_after,
    };
    println!(
        "  scale: restart: {} of {max} back, all within {:.1} s (p50 {:.2} s), server counted all at {:.1} s",
        restart.times.len(),
        restart.quantile(1.0),
        restart.quantile(0.5),
        server_counted_secs
    );

    let stops = clients.iter().map(|c| c.shutdown(Duration::ZERO));
    futures_util::future::join_all(stops).await;
    server.kill();
    Ok(Outcome {
        issued,
        rss_empty,
        cpu_empty_pct,
        points,
        restart,
    })
}
