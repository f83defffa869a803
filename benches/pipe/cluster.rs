//! Cluster: server replicas over a real NATS (`restpipe server --cluster`, docs/CLUSTER.md).
//!
//! A real nats-server (the test kit's [`NatsServer`]: `$NATS_SERVER`, `PATH` or `/usr/sbin`)
//! and `restpipe server --cluster nats://... --replica-name rN` processes started with the
//! bench's process harness ([`procs::server_node`]). Three measurements:
//!
//! 1. **Routing**: a `restpipe client` process (`dev-client`) connected to replica r2 only;
//!    the load generator calls `GET /client/dev-client/time` on r2 (local: the replica that
//!    holds the client) and on r1 (routed: r1 carries the call over NATS to r2), interleaved
//!    run by run (the order swapped on every other run), at 1 and 32 keep-alive connections.
//!    The routed / local ratio of req/s is per run; the p50 added is routed p50 - local p50.
//! 2. **Idle**: `idle` client nodes in this process (as [`crate::scale`] makes them, each with
//!    its own certificate), each knowing every replica (`r1,r2,r3`: a random one first); once
//!    the replicas' `/health` count them all and after a settle time, every replica's RSS and
//!    CPU over the window, and nats-server's own, from `/proc`.
//! 3. **Failover**: of the clients of the replica that holds the most, `back` are kept (the
//!    rest of that replica's clients are shut down first, the other replicas' stay), then that
//!    replica is killed with SIGKILL. Each kept client's reconnect moment is recorded; the
//!    survivors' `/health` must count every client again. Reported: the time until all are
//!    back, the per-second reconnect profile from the kill, and the survivors' spread.
//!
//! Without a nats-server binary the scenario is skipped with the reason printed, unless
//! `CI=true`, where it fails: CI installs it (`.ci/run`).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use hyper::StatusCode;
use restpipe::ClientNode;
use restpipe_certs::CertificateAuthority;
use restpipe_testkit::certs::Certs;
use restpipe_testkit::nats::{nats_server_bin, NatsServer};
use restpipe_testkit::procs::Node;

use crate::load::{self, ConnMode};
use crate::report::{Run, Series};
use crate::{procs, scale};

/// What the routed and local calls ask for.
const PATH: &str = "/client/dev-client/time";
/// How long a group of clients may take to be counted, or to come back.
const COUNT_LIMIT: Duration = Duration::from_secs(120);

/// The sizes of the scenario.
pub struct Plan {
    /// Server replicas (at least 2).
    pub replicas: usize,
    /// Idle clients over the replicas.
    pub idle: usize,
    /// Clients of the killed replica watched coming back (at most those it holds).
    pub back: usize,
    /// Wait after connecting the idle clients before measuring (heartbeats start).
    pub settle: Duration,
    /// The idle CPU window.
    pub window: Duration,
}

/// How the request points are measured (the bench's request plan).
pub struct Requests<'a> {
    /// Runs.
    pub runs: usize,
    /// Warm-up and window of each point.
    pub windows: (Duration, Duration),
    /// Keep-alive connections of the points.
    pub conns: &'a [usize],
}

/// One replica with the idle clients.
#[derive(Clone, Debug)]
pub struct Replica {
    /// Its `--replica-name`.
    pub name: String,
    /// Clients connected to it.
    pub clients: u64,
    /// RSS just after it started, bytes.
    pub rss_start: u64,
    /// RSS with the idle clients, bytes.
    pub rss: u64,
    /// CPU over the idle window, % of one core.
    pub cpu_pct: f64,
}

/// A replica killed with SIGKILL, and its clients' return.
#[derive(Clone, Debug, Default)]
pub struct Failover {
    /// The replica killed.
    pub killed: String,
    /// Its clients watched coming back.
    pub clients: usize,
    /// Clients of the other replicas, left alone.
    pub others: usize,
    /// Each watched client's reconnect, seconds from the kill (sorted).
    pub times: Vec<f64>,
    /// Watched clients not back within the limit.
    pub missing: usize,
    /// Seconds from the kill until the survivors' `/health` counted every client.
    pub counted_secs: f64,
    /// Reconnects per second from the kill.
    pub per_second: Vec<usize>,
    /// The most reconnects in any 100 ms.
    pub peak_per_100ms: usize,
    /// The survivors and the clients each holds afterwards.
    pub spread: Vec<(String, u64)>,
}

/// Everything the cluster scenario measured.
#[derive(Clone, Debug)]
pub struct Outcome {
    /// Replicas.
    pub replicas: usize,
    /// Routed and local calls (`cluster-local`, `cluster-routed`), per connection count.
    pub series: Vec<Series>,
    /// Idle clients, the seconds to issue their certificates and to connect them.
    pub idle: (usize, f64, f64),
    /// Each replica with the idle clients.
    pub idle_replicas: Vec<Replica>,
    /// nats-server: RSS at the start and with the idle clients (bytes), CPU over the window.
    pub nats: (u64, u64, f64),
    /// This process (the idle client nodes) over the window, % of one core.
    pub clients_cpu_pct: f64,
    /// The idle window, seconds.
    pub window_secs: f64,
    /// The failover.
    pub failover: Failover,
}

/// `/health`'s client counts of `replicas`, in order (`None` for one that did not answer).
async fn counts(replicas: &[SocketAddr]) -> Vec<Option<u64>> {
    let mut out = Vec::with_capacity(replicas.len());
    for &http in replicas {
        out.push(scale::server_count(http).await);
    }
    out
}

/// Wait until the replicas at `https` together count `n` clients, at most `limit`; the
/// counts.
async fn wait_total(https: &[SocketAddr], n: usize, limit: Duration) -> anyhow::Result<Vec<u64>> {
    let until = Instant::now() + limit;
    loop {
        let seen = counts(https).await;
        let total: u64 = seen.iter().map(|c| c.unwrap_or(0)).sum();
        if total == n as u64 && seen.iter().all(Option::is_some) {
            return Ok(seen.into_iter().flatten().collect());
        }
        if Instant::now() >= until {
            bail!("the replicas count {seen:?} clients, not {n} in all, after {limit:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn check_all(replicas: &mut [Node]) -> anyhow::Result<()> {
    for r in replicas.iter_mut() {
        procs::check_alive(r)?;
    }
    Ok(())
}

/// Run the scenario; `None` when skipped (no nats-server outside CI).
pub async fn run(
    work: &Certs,
    plan: &Plan,
    requests: &Requests<'_>,
    ticks: f64,
) -> anyhow::Result<Option<Outcome>> {
    if plan.replicas < 2 {
        bail!("a cluster of {} replica(s) cannot fail over", plan.replicas);
    }
    if nats_server_bin().is_none() {
        let why = "no nats-server: set NATS_SERVER or install it (`apt-get install nats-server`, as .ci/run does)";
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            bail!("{why}; CI=true, so the cluster scenario must not skip");
        }
        println!("  cluster: skipped: {why}");
        return Ok(None);
    }
    let mut nats = NatsServer::start(work.dir())
        .await
        .context("nats-server did not start")?;
    let nats_rss_start = procs::rss_bytes(nats.process())?;
    let url = nats.url();
    let mut replicas: Vec<Node> = Vec::with_capacity(plan.replicas);
    let mut names = Vec::with_capacity(plan.replicas);
    for i in 1..=plan.replicas {
        let name = format!("r{i}");
        let extra: Vec<String> = [
            "--cluster",
            &url,
            "--cluster-name",
            "bench",
            "--replica-name",
            &name,
        ]
        .map(String::from)
        .to_vec();
        let node = procs::server_node(work, &format!("cluster-{name}"), (0, 0), None, &extra, None)
            .await?;
        replicas.push(node);
        names.push(name);
    }
    let rss_start = replicas
        .iter()
        .map(|r| procs::rss_bytes(r))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let https: Vec<SocketAddr> = replicas.iter().map(|r| r.http).collect();

    let series = routing(work, &mut replicas, &mut nats, requests).await?;

    // Idle clients, each knowing every replica.
    let ca = CertificateAuthority::load(&work.paths.ca_cert, &work.paths.ca_key)?;
    let started = Instant::now();
    let mut materials = scale::issue(&ca, plan.idle)?.into_iter();
    let issued_secs = started.elapsed().as_secs_f64();
    let list = replicas
        .iter()
        .map(|r| r.pipe_addr().to_string())
        .collect::<Vec<_>>()
        .join(",");
    let started = Instant::now();
    let mut clients: Vec<ClientNode> = Vec::with_capacity(plan.idle);
    scale::start_clients(&mut materials, plan.idle, &list, &mut clients).await?;
    let held = wait_total(&https, plan.idle, COUNT_LIMIT).await?;
    let connect_secs = started.elapsed().as_secs_f64();
    println!(
        "  cluster: {} idle clients connected in {connect_secs:.1} s (certificates {issued_secs:.1} s): {held:?} on {names:?}",
        plan.idle
    );
    tokio::time::sleep(plan.settle).await;
    check_all(&mut replicas)?;
    let mut pids: Vec<u32> = replicas.iter().map(|r| r.pid()).collect();
    pids.push(nats.process().pid());
    pids.push(std::process::id());
    let cpu = procs::cpu_pct_over(&pids, plan.window, ticks).await?;
    check_all(&mut replicas)?;
    let held = wait_total(&https, plan.idle, COUNT_LIMIT).await?;
    let mut idle_replicas = Vec::with_capacity(replicas.len());
    for (i, r) in replicas.iter().enumerate() {
        idle_replicas.push(Replica {
            name: names[i].clone(),
            clients: held[i],
            rss_start: rss_start[i],
            rss: procs::rss_bytes(r)?,
            cpu_pct: cpu[i],
        });
    }
    let nats_figures = (
        nats_rss_start,
        procs::rss_bytes(nats.process())?,
        cpu[replicas.len()],
    );
    for r in &idle_replicas {
        println!(
            "  cluster: idle: {} holds {} clients: RSS {:.1} MiB, CPU {:.2}%",
            r.name,
            r.clients,
            r.rss as f64 / 1048576.0,
            r.cpu_pct
        );
    }
    println!(
        "  cluster: idle: nats-server RSS {:.1} MiB, CPU {:.2}%; client nodes (bench) CPU {:.2}%",
        nats_figures.1 as f64 / 1048576.0,
        nats_figures.2,
        cpu[replicas.len() + 1]
    );

    let failover = failover(plan, &mut replicas, &names, clients).await?;
    Ok(Some(Outcome {
        replicas: plan.replicas,
        series,
        idle: (plan.idle, issued_secs, connect_secs),
        idle_replicas,
        nats: nats_figures,
        clients_cpu_pct: cpu[replicas.len() + 1],
        window_secs: plan.window.as_secs_f64(),
        failover,
    }))
}

/// The routed and local points: a client process on r2, called through r2 and through r1.
async fn routing(
    work: &Certs,
    replicas: &mut [Node],
    nats: &mut NatsServer,
    requests: &Requests<'_>,
) -> anyhow::Result<Vec<Series>> {
    let (a, b) = (0, 1);
    let args = restpipe_testkit::procs::client_args(
        work,
        &procs::dev_client(work),
        replicas[b].pipe_addr(),
        &[],
    );
    let mut client = Node::start(work.dir(), "cluster-client", args).await;
    let client_http = client.http;
    procs::wait_for(
        &mut client,
        client_http,
        "/health",
        Duration::from_secs(20),
        |s, _| s == StatusCode::OK,
    )
    .await?;
    let answered = |s: StatusCode, body: &[u8]| {
        s == StatusCode::OK && String::from_utf8_lossy(body).contains("\"time_from_client\"")
    };
    // r2 holds it; r1 reaches it through NATS once r2 subscribed for it.
    for i in [b, a] {
        let http = replicas[i].http;
        procs::wait_for(
            &mut replicas[i],
            http,
            PATH,
            Duration::from_secs(20),
            answered,
        )
        .await?;
    }
    let nats_pid = nats.process().pid();
    let targets: [(&'static str, &'static str, SocketAddr, Vec<u32>); 2] = [
        (
            "cluster-local",
            "local: called on the replica holding the client",
            replicas[b].http,
            vec![replicas[b].pid(), client.pid()],
        ),
        (
            "cluster-routed",
            "routed: called on another replica, over NATS",
            replicas[a].http,
            vec![replicas[a].pid(), replicas[b].pid(), client.pid(), nats_pid],
        ),
    ];
    let mut series: Vec<Series> = Vec::new();
    for &conns in requests.conns {
        for (key, label, _, _) in &targets {
            series.push(Series {
                key,
                label,
                conns,
                mode: ConnMode::KeepAlive,
                runs: Vec::new(),
            });
        }
    }
    for run in 1..=requests.runs {
        let mut order: Vec<usize> = (0..series.len()).collect();
        if run % 2 == 0 {
            for pair in order.chunks_mut(2) {
                pair.reverse();
            }
        }
        for i in order {
            let s = &mut series[i];
            let (_, label, addr, pids) = targets
                .iter()
                .find(|t| t.0 == s.key)
                .context("cluster target")?;
            let sample = load::run(
                *addr,
                PATH,
                s.conns,
                ConnMode::KeepAlive,
                requests.windows,
                pids,
            )
            .await;
            let sample = match sample {
                Ok(sample) => sample,
                Err(e) => {
                    check_all(replicas)?;
                    procs::check_alive(&mut client)?;
                    return Err(e.context(format!("cluster {label} at {} conns", s.conns)));
                }
            };
            if let (refused @ 1.., Some(status)) = sample.refused {
                bail!(
                    "cluster {label} at {} conns: {refused} request(s) answered {status}, not 200",
                    s.conns
                );
            }
            let r = Run::from(&sample);
            println!(
                "  run {run}/{}: cluster {:<48} {:>3} conns {:>9.0} req/s  p50 {:>6.0} µs  p99 {:>7.0} µs  CPU {:>5.1} µs/req  errors {}",
                requests.runs, label, s.conns, r.rps, r.p50, r.p99, r.cpu_us, r.errors
            );
            s.runs.push(r);
        }
        check_all(replicas)?;
        procs::check_alive(&mut client)?;
    }
    client.kill();
    Ok(series)
}

/// Keep `plan.back` clients on the replica that holds the most, kill it, and time their
/// return on the others.
async fn failover(
    plan: &Plan,
    replicas: &mut [Node],
    names: &[String],
    clients: Vec<ClientNode>,
) -> anyhow::Result<Failover> {
    let https: Vec<SocketAddr> = replicas.iter().map(|r| r.http).collect();
    let held = wait_total(&https, clients.len(), COUNT_LIMIT).await?;
    let victim = held
        .iter()
        .enumerate()
        .max_by_key(|(_, n)| **n)
        .map_or(0, |(i, _)| i);
    let victim_addr = replicas[victim].pipe_addr().to_string();
    let (on_victim, others): (Vec<ClientNode>, Vec<ClientNode>) = clients
        .into_iter()
        .partition(|c| c.status().is_some_and(|s| s.address == victim_addr));
    let keep_n = on_victim.len().min(plan.back);
    let mut kept = on_victim;
    let dropped = kept.split_off(keep_n);
    futures_util::future::join_all(dropped.iter().map(|c| c.shutdown(Duration::ZERO))).await;
    drop(dropped);
    let total = kept.len() + others.len();
    // The victim holds exactly the clients kept, the others theirs.
    let until = Instant::now() + COUNT_LIMIT;
    loop {
        let seen = scale::server_count(https[victim]).await;
        if seen == Some(kept.len() as u64) {
            break;
        }
        if Instant::now() >= until {
            bail!(
                "{} counts {seen:?} clients, not the {} kept on it",
                names[victim],
                kept.len()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    wait_total(&https, total, COUNT_LIMIT).await?;
    if kept.is_empty() {
        bail!("{} holds no client to watch coming back", names[victim]);
    }

    let watchers = scale::reconnect_watchers(&kept, COUNT_LIMIT);
    let killed = Instant::now();
    replicas[victim].kill();
    let survivors: Vec<SocketAddr> = https
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != victim)
        .map(|(_, h)| *h)
        .collect();
    let spread_counts = wait_total(&survivors, total, COUNT_LIMIT)
        .await
        .with_context(|| format!("after {} was killed", names[victim]))?;
    let counted_secs = killed.elapsed().as_secs_f64();
    let mut times = Vec::with_capacity(kept.len());
    let mut missing = 0;
    for watcher in futures_util::future::join_all(watchers).await {
        match watcher? {
            Some(at) => times.push(at.saturating_duration_since(killed).as_secs_f64()),
            None => missing += 1,
        }
    }
    times.sort_by(f64::total_cmp);
    let (per_second, peak_per_100ms) = scale::profile(&times);
    let spread: Vec<(String, u64)> = names
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != victim)
        .map(|(_, n)| n.clone())
        .zip(spread_counts)
        .collect();
    let f = Failover {
        killed: names[victim].clone(),
        clients: kept.len(),
        others: others.len(),
        times,
        missing,
        counted_secs,
        per_second,
        peak_per_100ms,
        spread,
    };
    println!(
        "  cluster: failover: {} killed; {} of its {} clients back, all within {:.2} s (p50 {:.2} s); survivors counted all {total} at {:.2} s: {:?}; per second {:?}",
        f.killed,
        f.times.len(),
        f.clients,
        scale::quantile(&f.times, 1.0),
        scale::quantile(&f.times, 0.5),
        f.counted_secs,
        f.spread,
        f.per_second
    );
    let stops = kept
        .iter()
        .chain(&others)
        .map(|c| c.shutdown(Duration::ZERO));
    futures_util::future::join_all(stops).await;
    Ok(f)
}
