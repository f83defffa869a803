//! `cargo bench --bench pipe`: restpipe's pipe against a bare HTTP server, in one run.
//!
//! Every server runs in its own process (the `restpipe` binary cargo built, or this binary
//! re-executed as the bare axum baseline or the plain rustls copy server); the load generator
//! is the same for all of them, in this process. Scenarios:
//!
//! - `keepalive`: `GET .../time` at 1, 32 and 256 keep-alive connections: the baseline, the
//!   pipe client→server and server→client, and client→server with metrics on (statsd to a
//!   UDP socket this process reads and discards);
//! - `close`: a new TCP connection per request at 8 connections, baseline vs pipe;
//! - `bulk`: 1 MiB, 16 MiB and a large file (1 GiB in a full run, 256 MiB in a quick one, none
//!   in a smoke run) through the pipe vs a plain rustls copy, and once per run small calls
//!   beside the largest transfer on the same pipe (their p99 against idle: fairness);
//! - `scale`: server memory and CPU with 1,000 and 10,000 idle heartbeating client nodes (and
//!   so the server's memory per idle connection), and their reconnect times after the server
//!   is killed and restarted;
//! - `h2`: the same shape on HTTP/2 ([`http2`]: an HTTP/1 front door forwarding over one
//!   shared HTTP/2 connection to an h2 server, two processes as the pair of nodes), measured
//!   side by side with the pipe: its target joins the keepalive points (with `keepalive` not
//!   asked for, `h2` runs them for the baseline, the pipe client→server and HTTP/2 only) and
//!   its column the bulk points (run for all sizes even if `bulk` is not asked for);
//! - `yamux`: the same with yamux streams, HTTP/1.1 on each ([`yamux_pair`]);
//! - `cluster`: three `restpipe server --cluster` replicas over a real nats-server: a call
//!   routed across replicas against a local one (req/s ratio at 32 connections, p50 added at
//!   1), idle clients spread over the replicas (each replica's RSS and CPU, and nats-server's),
//!   and the return of a killed replica's clients ([`cluster`]; skipped, saying why, when
//!   there is no nats-server and `CI` is not `true`);
//! - `queue`: queued delivery (`X-Event-Delivery: queued`, fsync'd before the 202) at 1 and 8
//!   connections, accepted and delivered events/s, against a raw redb commit loop in this
//!   process, in the same runs ([`queue`]);
//! - `fanout`: `POST /publish/{topic}` on a `restpipe server` process fanned out to 1,000
//!   subscribed client nodes in this process (200 in a quick run, 20 in a smoke run), paced
//!   and in one burst: events/s published, deliveries/s, and the publication-to-handler
//!   latency's p50, p99 and max ([`fanout`]).
//!
//! Flags (after `--`): `--smoke` (every scenario, tiny: for CI), `--quick`, nothing (full),
//! `--only keepalive,close,bulk,scale,h2,yamux,cluster,queue,fanout`, `--out FILE`
//! (markdown; a full run defaults to `docs/BENCHMARKS.md`, between its `bench:pipe` markers),
//! `--compare-bin PATH`, `--policy-rules N`.
//!
//! `--compare-bin PATH` (with the `keepalive` scenario) also runs a pair of nodes of another
//! `restpipe` binary, an older build, through the keepalive points in both directions,
//! interleaved run by run with the new pair and the baseline, so that before and after are
//! measured in the same run (old and new swap places on every other run):
//! `cargo bench --bench pipe -- --only keepalive --compare-bin /path/to/old/restpipe`. The
//! report then has a table with, per point, req/s and p50 of the baseline, the old and the new
//! binary, and the ratios new/baseline, old/baseline and new/old with their min–max over runs.
//! Such a run writes no file unless given `--out` (the results between the `bench:pipe`
//! markers are those of this binary alone). The older binary must take the same flags
//! (`server`/`client`, `--bind-port`, `--http`, `--ca`, `--cert`, `--key`, `--statsd-host`,
//! `--server-host`, `--server-port`, `--server-name`) and log its bound addresses as the test
//! kit's [`restpipe_testkit::procs::Node`] expects.
//!
//! `--scale-clients N,N` (with the `scale` scenario) measures these idle client counts instead
//! of the mode's, e.g. `--only scale --scale-clients 10000,25000` for the slope past 10,000
//! (one source address: about 28,000 at most; raise the open-file limit as root first).
//!
//! `--policy-rules N` (with the `keepalive` scenario) writes a policy file of N `[[allow]]`
//! rules (N - 1 for peers that never call, then, last, the one that allows the bench's client
//! and server, so that every call walks every rule) and runs a pair of nodes whose server and
//! client both run with `--policy FILE`, through the keepalive points in both directions,
//! interleaved run by run with the baseline and the policy-free pair (the two pairs swap
//! places on every other run; the metrics-on pair is left out):
//! `cargo bench --bench pipe -- --only keepalive --policy-rules 100`. The report then has a
//! table with, per point, req/s and p50 with and without the policy and the ratio
//! policy / no policy with its min–max over runs. Such a run writes no file unless given
//! `--out`.
//!
//! A reference pair (HTTP/2, yamux) that exits or fails a point does not end the run: the
//! report says when and why it stopped (its log's last lines), keeps its earlier runs, and
//! leaves it out of the runs that follow. A restpipe node that exits still ends the run.
//!
//! Every load point fails if any request is answered with a status other than 200 (the nodes'
//! front door refuses a foreign `Host` with 403): figures of refusals would be meaningless.
//!
//! The modules: [`load`] (the load generator), [`procs`] (child processes, `/proc`),
//! [`servers`] (the reference servers), [`http2`] and [`yamux_pair`] (the reference pairs on
//! other multiplexers), [`bulk`], [`scale`], [`cluster`], [`queue`], [`fanout`], [`report`].

mod bulk;
mod cluster;
mod fanout;
mod http2;
mod load;
mod procs;
mod queue;
mod report;
mod scale;
mod servers;
mod yamux_pair;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context as _};
use http2::Proto;
use load::ConnMode;
use report::{Bulk, RefBulk, Report, Run, Series};

const SCENARIOS: [&str; 9] = [
    "keepalive",
    "close",
    "bulk",
    "scale",
    "h2",
    "yamux",
    "cluster",
    "queue",
    "fanout",
];
const MIB: usize = 1024 * 1024;

/// How long and how often each point is measured.
struct Plan {
    mode: &'static str,
    runs: usize,
    warmup: Duration,
    window: Duration,
    conns: Vec<usize>,
    close_conns: usize,
    bulk_sizes: Vec<usize>,
    bulk_window: Duration,
    bulk_min_reps: usize,
    scale: scale::Plan,
    /// Connections of the queued-delivery points.
    queue_conns: Vec<usize>,
    cluster: cluster::Plan,
    /// Keep-alive connections of the routed and local cluster points.
    cluster_conns: Vec<usize>,
    fanout: fanout::Plan,
}

impl Plan {
    fn new(mode: &'static str) -> Plan {
        let ms = Duration::from_millis;
        let s = Duration::from_secs;
        let cluster = |idle, back, settle, window| cluster::Plan {
            replicas: 3,
            idle,
            back,
            settle,
            window,
        };
        let cluster = match mode {
            "smoke" => cluster(30, 5, ms(500), s(1)),
            "quick" => cluster(1000, 200, s(3), s(5)),
            _ => cluster(10_000, 1000, s(6), s(15)),
        };
        let fanout = |clients, paced, rate, burst| fanout::Plan {
            clients,
            paced,
            rate,
            burst,
        };
        let fanout = match mode {
            "smoke" => fanout(20, 10, 100.0, 10),
            "quick" => fanout(200, 200, 50.0, 200),
            _ => fanout(1000, 300, 20.0, 500),
        };
        let (runs, warmup, window, bulk_window, bulk_min_reps, scale, large) = match mode {
            "smoke" => (
                1,
                ms(100),
                ms(300),
                ms(0),
                1,
                scale::Plan {
                    counts: vec![20, 100],
                    settle: ms(500),
                    window: s(1),
                },
                None,
            ),
            "quick" => (
                3,
                ms(300),
                s(1),
                s(1),
                3,
                scale::Plan {
                    counts: vec![1000],
                    settle: s(6),
                    window: s(5),
                },
                Some(256 * MIB),
            ),
            _ => (
                5,
                ms(500),
                s(3),
                s(2),
                3,
                scale::Plan {
                    counts: vec![1000, 10000],
                    settle: s(6),
                    window: s(15),
                },
                Some(1024 * MIB),
            ),
        };
        Plan {
            mode,
            runs,
            warmup,
            window,
            conns: vec![1, 32, 256],
            close_conns: 8,
            bulk_sizes: [MIB, 16 * MIB].into_iter().chain(large).collect(),
            bulk_window,
            bulk_min_reps,
            scale,
            queue_conns: vec![1, 8],
            cluster,
            cluster_conns: vec![1, 32],
            fanout,
        }
    }

    fn method(&self) -> String {
        format!(
            "Each request point: {} run(s) of {:.1} s after {:.1} s of warm-up, closed loop (each connection sends its next request when the last answer is read), the targets interleaved run by run; the table gives the median run and the min–max over runs; latencies come from an HDR histogram per run (median over runs). CPU µs/req: CPU time (user + system, from `/proc`, 10 ms ticks) of the processes serving the target (the baseline's one, a pair's two) over the window, per request answered (median over runs). Ratios are per run against the baseline of the same run. Bulk: {} run(s) per size of at least {} transfer(s) and {:.1} s on one connection, after one unmeasured transfer (from {} up: no warm-up, at least one transfer). Scale: {:.1} s settle, {:.0} s CPU window. Cluster: {} replicas; the routed and local points as the request points; {} idle clients, {:.1} s settle, {:.0} s CPU window; {} clients of the killed replica watched. Queue: {} run(s) of {:.1} s per point, no warm-up. Fanout: {} subscribed clients, {} events of {} B at {:.0}/s, then a burst of {}, one run.",
            self.runs,
            self.window.as_secs_f64(),
            self.warmup.as_secs_f64(),
            self.runs,
            self.bulk_min_reps,
            self.bulk_window.as_secs_f64(),
            bulk::size_label(bulk::LARGE),
            self.scale.settle.as_secs_f64(),
            self.scale.window.as_secs_f64(),
            self.cluster.replicas,
            self.cluster.idle,
            self.cluster.settle.as_secs_f64(),
            self.cluster.window.as_secs_f64(),
            self.cluster.back,
            self.runs,
            self.window.as_secs_f64(),
            self.fanout.clients,
            self.fanout.paced,
            fanout::BODY,
            self.fanout.rate,
            self.fanout.burst,
        )
    }
}

struct Options {
    mode: &'static str,
    only: Vec<String>,
    out: Option<PathBuf>,
    /// Another `restpipe` binary to compare with on the keepalive points.
    compare: Option<PathBuf>,
    /// Rules of the policy to measure against none on the keepalive points.
    policy_rules: Option<usize>,
    /// Idle client counts of the scale scenario instead of the mode's (`--scale-clients`).
    scale_clients: Option<Vec<usize>>,
    /// The arguments given, for the report.
    args: Vec<String>,
}

const USAGE: &str = "usage: cargo bench --bench pipe [-- [--smoke|--quick] [--only keepalive,close,bulk,scale,h2,yamux,cluster,queue,fanout] [--out FILE] [--compare-bin OLD_RESTPIPE] [--policy-rules N] [--scale-clients N,N]]";

fn parse(args: &[String]) -> anyhow::Result<Options> {
    let mut options = Options {
        mode: "full",
        only: SCENARIOS.iter().map(|s| s.to_string()).collect(),
        out: None,
        compare: None,
        policy_rules: None,
        scale_clients: None,
        args: args.to_vec(),
    };
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--smoke" => options.mode = "smoke",
            "--quick" => options.mode = "quick",
            "--full" => options.mode = "full",
            "--only" => {
                let list = it.next().context("--only needs a scenario list")?;
                options.only = list.split(',').map(|s| s.trim().to_string()).collect();
                for s in &options.only {
                    if !SCENARIOS.contains(&s.as_str()) {
                        bail!(
                            "unknown scenario {s:?}; scenarios: {}",
                            SCENARIOS.join(", ")
                        );
                    }
                }
            }
            "--out" => options.out = Some(it.next().context("--out needs a file")?.into()),
            "--compare-bin" => {
                let bin = PathBuf::from(it.next().context("--compare-bin needs a binary")?);
                if !bin.is_file() {
                    bail!("--compare-bin: no file at {}", bin.display());
                }
                // Absolute, since the nodes run in the scratch directory.
                options.compare = Some(std::fs::canonicalize(&bin)?);
            }
            "--policy-rules" => {
                let n = it
                    .next()
                    .context("--policy-rules needs a number of rules")?;
                let n: usize = n
                    .parse()
                    .with_context(|| format!("--policy-rules: {n:?} is not a number"))?;
                if n == 0 {
                    bail!("--policy-rules needs at least 1 rule (the one that allows the bench)");
                }
                options.policy_rules = Some(n);
            }
            "--scale-clients" => {
                let list = it
                    .next()
                    .context("--scale-clients needs a list of client counts")?;
                let counts = list
                    .split(',')
                    .map(|n| {
                        n.trim()
                            .parse::<usize>()
                            .ok()
                            .filter(|&n| n > 0)
                            .with_context(|| format!("--scale-clients: {n:?} is not a count"))
                    })
                    .collect::<anyhow::Result<Vec<usize>>>()?;
                let mut counts = counts;
                counts.sort_unstable();
                counts.dedup();
                options.scale_clients = Some(counts);
            }
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => bail!("unknown argument {other:?}\n{USAGE}"),
        }
    }
    if options.compare.is_some() && !options.only.iter().any(|s| s == "keepalive") {
        bail!("--compare-bin compares the keepalive points: add keepalive to --only");
    }
    if options.policy_rules.is_some() && !options.only.iter().any(|s| s == "keepalive") {
        bail!("--policy-rules measures the keepalive points: add keepalive to --only");
    }
    if options.policy_rules.is_some() && options.compare.is_some() {
        bail!("--policy-rules and --compare-bin: one comparison per run");
    }
    Ok(options)
}

fn main() -> ExitCode {
    // cargo passes `--bench` to a harness-less bench.
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    let result = match args.first().map(String::as_str) {
        Some("--serve-baseline") => port(&args).and_then(servers::baseline),
        Some("--serve-rustls") => port(&args).and_then(|p| {
            let dir = args.get(2).context("--serve-rustls PORT CERT_DIR")?;
            servers::rustls_copy(p, std::path::Path::new(dir))
        }),
        Some("--serve-h2") => port(&args).and_then(|p| {
            let usage = "--serve-h2 PORT CERT_DIR FILES_DIR";
            let certs = args.get(2).context(usage)?;
            let files = args.get(3).context(usage)?;
            http2::serve_server(p, std::path::Path::new(certs), std::path::Path::new(files))
        }),
        Some("--serve-h2-front") => port(&args).and_then(|p| {
            let usage = "--serve-h2-front PORT CERT_DIR H2_ADDR";
            let certs = args.get(2).context(usage)?;
            let upstream = args.get(3).context(usage)?.parse()?;
            http2::serve_front(p, std::path::Path::new(certs), upstream)
        }),
        Some("--serve-yamux") => port(&args).and_then(|p| {
            let usage = "--serve-yamux PORT CERT_DIR FILES_DIR";
            let certs = args.get(2).context(usage)?;
            let files = args.get(3).context(usage)?;
            yamux_pair::serve_server(p, std::path::Path::new(certs), std::path::Path::new(files))
        }),
        Some("--serve-yamux-front") => port(&args).and_then(|p| {
            let usage = "--serve-yamux-front PORT CERT_DIR ADDR";
            let certs = args.get(2).context(usage)?;
            let upstream = args.get(3).context(usage)?.parse()?;
            yamux_pair::serve_front(p, std::path::Path::new(certs), upstream)
        }),
        Some("--load") => load_only(&args),
        Some("--load-bulk") => load_bulk(&args),
        Some("--raw-redb") => raw_redb(&args),
        _ => parse(&args).and_then(bench),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// `--load ADDR PATH CONNS SECS`: only the load generator, against a server started by hand
/// (for profiling one).
fn load_only(args: &[String]) -> anyhow::Result<()> {
    let usage = "--load ADDR PATH CONNS SECS";
    let addr: std::net::SocketAddr = args.get(1).context(usage)?.parse()?;
    let path = args.get(2).context(usage)?;
    let conns: usize = args.get(3).context(usage)?.parse()?;
    let secs: f64 = args.get(4).context(usage)?.parse()?;
    let _ = rlimit::increase_nofile_limit(u64::MAX);
    let sample = tokio::runtime::Runtime::new()?.block_on(load::run(
        addr,
        path,
        conns,
        ConnMode::KeepAlive,
        (Duration::from_millis(200), Duration::from_secs_f64(secs)),
        &[],
    ))?;
    println!(
        "{:.0} req/s, p50 {:.0} µs, p99 {:.0} µs, errors {}",
        sample.rps(),
        sample.micros(0.5),
        sample.micros(0.99),
        sample.errors
    );
    Ok(())
}

/// `--load-bulk ADDR PATH SECS`: fetch `PATH` again and again on one connection for `SECS`,
/// and print MB/s (for profiling a node by hand).
fn load_bulk(args: &[String]) -> anyhow::Result<()> {
    let usage = "--load-bulk ADDR PATH SECS";
    let addr: std::net::SocketAddr = args.get(1).context(usage)?.parse()?;
    let path = args.get(2).context(usage)?;
    let secs: f64 = args.get(3).context(usage)?.parse()?;
    tokio::runtime::Runtime::new()?.block_on(async {
        let mut sender = load::connect(addr).await?;
        load::get(&mut sender, path, false).await?;
        let started = std::time::Instant::now();
        let mut bytes = 0;
        while started.elapsed().as_secs_f64() < secs {
            bytes += load::get(&mut sender, path, false).await?.1;
        }
        println!(
            "{:.0} MB/s",
            bytes as f64 / started.elapsed().as_secs_f64() / 1e6
        );
        anyhow::Ok(())
    })
}

/// `--raw-redb DIR SECS`: only the queue scenario's raw redb commit loop, into `DIR/raw.redb`
/// (for comparing file systems by hand).
fn raw_redb(args: &[String]) -> anyhow::Result<()> {
    let usage = "--raw-redb DIR SECS";
    let dir = PathBuf::from(args.get(1).context(usage)?);
    let secs: f64 = args.get(2).context(usage)?.parse()?;
    let (alone, awake) = queue::raw_rate(&dir, Duration::from_secs_f64(secs))?;
    println!("{alone:.0} commits/s alone, {awake:.0} with a busy thread beside");
    Ok(())
}

fn port(args: &[String]) -> anyhow::Result<u16> {
    args.get(1)
        .context("a port is needed")?
        .parse()
        .context("bad port")
}

fn bench(options: Options) -> anyhow::Result<()> {
    // Thousands of sockets: raise the soft limit on open files to the hard one (the server
    // processes started from here inherit it).
    let nofile = rlimit::increase_nofile_limit(u64::MAX).unwrap_or(0);
    let mut plan = Plan::new(options.mode);
    if let Some(counts) = &options.scale_clients {
        plan.scale.counts = counts.clone();
    }
    let runtime = tokio::runtime::Runtime::new()?;
    let started = std::time::Instant::now();
    let mut report = runtime.block_on(run(&plan, &options))?;
    report.machine.load.1 = loadavg();
    let text = report.markdown();
    println!("\n{text}");
    let out = match (&options.out, plan.mode) {
        (Some(path), _) => Some(path.clone()),
        (None, "full") if options.compare.is_none() && options.policy_rules.is_none() => {
            Some(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("docs/BENCHMARKS.md"))
        }
        (None, _) => None,
    };
    if let Some(path) = out {
        report::write(&path, &text)?;
        println!("written to {}", path.display());
    }
    println!(
        "{} mode took {:.0} s (open-file limit {nofile})",
        plan.mode,
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().map(str::to_string))
        .unwrap_or_else(|| "?".into())
}

fn machine() -> report::Machine {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into());
    let rustc =
        std::process::Command::new(std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into()))
            .arg("--version")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|| "rustc (unknown version)".into());
    report::Machine {
        cores: std::thread::available_parallelism().map_or(0, |n| n.get()),
        cpu,
        kernel,
        rustc,
        date: utc_now(),
        load: (loadavg(), String::new()),
    }
}

/// `2026-11-21 08:14 UTC`, from the system clock.
fn utc_now() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let days = (secs / 86_400) as i64;
    let (hh, mm) = ((secs % 86_400) / 3600, (secs % 3600) / 60);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02} {hh:02}:{mm:02} UTC")
}

async fn run(plan: &Plan, options: &Options) -> anyhow::Result<Report> {
    let work = restpipe_testkit::certs::Certs::new();
    let wants = |s: &str| options.only.iter().any(|o| o == s);
    let mut report = Report {
        mode: plan.mode,
        method: plan.method(),
        machine: machine(),
        command: if options.args.is_empty() {
            "cargo bench --bench pipe".into()
        } else {
            format!("cargo bench --bench pipe -- {}", options.args.join(" "))
        },
        compare: options.compare.as_ref().map(|p| p.display().to_string()),
        policy_rules: options.policy_rules,
        ..Report::default()
    };
    println!(
        "restpipe pipe bench, {} mode; scenarios: {}; scratch {}",
        plan.mode,
        options.only.join(", "),
        work.dir().display()
    );
    // The reference pairs on other multiplexers asked for.
    let refs: Vec<Proto> = [Proto::H2, Proto::Yamux]
        .into_iter()
        .filter(|p| wants(p.key()))
        .collect();
    if wants("keepalive") || wants("close") || !refs.is_empty() {
        let others = Others {
            compare: options.compare.as_deref(),
            policy_rules: options.policy_rules,
            refs: &refs,
        };
        requests(
            plan,
            &work,
            (wants("keepalive"), wants("close")),
            &others,
            &mut report,
        )
        .await?;
    }
    if wants("bulk") || !refs.is_empty() {
        report.bulk = bulk_points(
            plan,
            &work,
            &refs,
            &mut report.refs_stopped,
            &mut report.beside,
        )
        .await?;
    }
    if wants("scale") {
        println!("scale: {:?} idle clients", plan.scale.counts);
        report.scale =
            Some(scale::run(&work, &plan.scale, restpipe_testkit::procs::clock_ticks()).await?);
    }
    if wants("cluster") {
        println!(
            "cluster: {} replicas over nats-server, {} idle clients",
            plan.cluster.replicas, plan.cluster.idle
        );
        let requests = cluster::Requests {
            runs: plan.runs,
            windows: (plan.warmup, plan.window),
            conns: &plan.cluster_conns,
        };
        let ticks = restpipe_testkit::procs::clock_ticks();
        report.cluster = cluster::run(&work, &plan.cluster, &requests, ticks).await?;
        report.cluster_skipped = report.cluster.is_none();
    }
    if wants("queue") {
        println!("queue: queued delivery at {:?} conns", plan.queue_conns);
        report.queue = Some(queue::run(&work, plan.runs, plan.window, &plan.queue_conns).await?);
    }
    if wants("fanout") {
        let f = &plan.fanout;
        println!(
            "fanout: publish to {} subscribed clients, {} events at {:.0}/s, then a burst of {}",
            f.clients, f.paced, f.rate, f.burst
        );
        let ticks = restpipe_testkit::procs::clock_ticks();
        report.fanout = Some(fanout::run(&work, f, ticks).await?);
    }
    Ok(report)
}

/// A request target: what answers, and the path to ask.
struct Target {
    key: &'static str,
    label: &'static str,
    addr: std::net::SocketAddr,
    path: &'static str,
    /// The processes that serve it, whose CPU time is measured.
    pids: Vec<u32>,
}

/// The other node pairs measured on the keepalive points, besides the policy-free pair of the
/// binary cargo built.
struct Others<'a> {
    /// A pair of this older binary's nodes (`--compare-bin`).
    compare: Option<&'a std::path::Path>,
    /// A pair of nodes with a policy of this many rules (`--policy-rules`).
    policy_rules: Option<usize>,
    /// The reference pairs on other multiplexers too (`h2`, `yamux`).
    refs: &'a [Proto],
}

/// The request points: `keepalive` and/or `close`; with `others`, the keepalive points of an
/// older binary's pair, of a pair with a policy or of the HTTP/2 pair too. The HTTP/2 pair
/// alone (`keepalive` not asked for) runs the keepalive points for the baseline, the pipe
/// client→server and HTTP/2.
async fn requests(
    plan: &Plan,
    work: &restpipe_testkit::certs::Certs,
    (keepalive, close): (bool, bool),
    others: &Others<'_>,
    report: &mut Report,
) -> anyhow::Result<()> {
    let compare = others.compare;
    // Only the pipe's client→server direction is compared with HTTP/2: the same direction,
    // front door to the far side's handler.
    let refs_only = !others.refs.is_empty() && !keepalive;
    let keepalive = keepalive || !others.refs.is_empty();
    let sink = restpipe_testkit::statsd::Statsd::counting().await;
    let (baseline_process, baseline) = procs::baseline(work).await?;
    let mut plain = procs::pair(
        work,
        &procs::PairOptions {
            name: "pipe".into(),
            ..Default::default()
        },
    )
    .await?;
    // With a policy, the metrics pair is left out: it is not what is compared, and the run
    // stays within minutes.
    let mut metered = if keepalive && !refs_only && others.policy_rules.is_none() {
        Some(
            procs::pair(
                work,
                &procs::PairOptions {
                    name: "pipe-metrics".into(),
                    statsd: Some(sink.port()),
                    ..Default::default()
                },
            )
            .await?,
        )
    } else {
        None
    };
    let mut old = match compare {
        Some(bin) if keepalive => Some(
            procs::pair(
                work,
                &procs::PairOptions {
                    name: "old-pipe".into(),
                    bin: Some(bin.to_path_buf()),
                    ..Default::default()
                },
            )
            .await?,
        ),
        _ => None,
    };
    let mut policed = match others.policy_rules {
        Some(rules) if keepalive => {
            let file = procs::policy_file(work, rules)?;
            Some(
                procs::pair(
                    work,
                    &procs::PairOptions {
                        name: "pipe-policy".into(),
                        extra: vec!["--policy".into(), file.display().to_string()],
                        ..Default::default()
                    },
                )
                .await?,
            )
        }
        _ => None,
    };
    let mut refs = Vec::new();
    for &proto in others.refs {
        let files = work.dir().join("files");
        refs.push((proto, http2::start(work, proto, proto.key(), &files).await?));
    }
    let mut targets = vec![Target {
        key: "baseline",
        label: "baseline (bare axum)",
        addr: baseline,
        path: "/server/time",
        pids: vec![baseline_process.pid()],
    }];
    if let Some(o) = &old {
        targets.push(Target {
            key: "old-c2s",
            label: "old binary, client→server",
            addr: o.client_http,
            path: "/server/time",
            pids: vec![o.server.pid(), o.client.pid()],
        });
    }
    targets.push(Target {
        key: "c2s",
        label: "pipe client→server",
        addr: plain.client_http,
        path: "/server/time",
        pids: vec![plain.server.pid(), plain.client.pid()],
    });
    if !refs_only {
        targets.push(Target {
            key: "s2c",
            label: "pipe server→client",
            addr: plain.server_http,
            path: "/client/dev-client/time",
            pids: vec![plain.server.pid(), plain.client.pid()],
        });
    }
    for (proto, pair) in &refs {
        targets.push(Target {
            key: proto.key(),
            label: proto.label(),
            addr: pair.http,
            path: "/server/time",
            pids: pair.pids().to_vec(),
        });
    }
    if let Some(o) = &old {
        // Between the new pair's two directions, so that old and new alternate.
        targets.insert(
            3,
            Target {
                key: "old-s2c",
                label: "old binary, server→client",
                addr: o.server_http,
                path: "/client/dev-client/time",
                pids: vec![o.server.pid(), o.client.pid()],
            },
        );
    }
    if let Some(p) = &policed {
        // Each right after the policy-free pair's same direction.
        for (after, target) in [
            (
                "c2s",
                Target {
                    key: "pol-c2s",
                    label: "pipe client→server, with the policy",
                    addr: p.client_http,
                    path: "/server/time",
                    pids: vec![p.server.pid(), p.client.pid()],
                },
            ),
            (
                "s2c",
                Target {
                    key: "pol-s2c",
                    label: "pipe server→client, with the policy",
                    addr: p.server_http,
                    path: "/client/dev-client/time",
                    pids: vec![p.server.pid(), p.client.pid()],
                },
            ),
        ] {
            let at = targets
                .iter()
                .position(|t| t.key == after)
                .map_or(targets.len(), |i| i + 1);
            targets.insert(at, target);
        }
    }
    if let Some(m) = &metered {
        targets.push(Target {
            key: "c2s-metrics",
            label: "pipe client→server, metrics on",
            addr: m.client_http,
            path: "/server/time",
            pids: vec![m.server.pid(), m.client.pid()],
        });
    }
    for t in &targets {
        let (status, body) = load::fetch(t.addr, t.path).await?;
        let text = String::from_utf8_lossy(&body);
        if status != hyper::StatusCode::OK || !text.contains("\"time_from_") {
            bail!("{}: GET {} answered {status} {text}", t.label, t.path);
        }
    }
    let mut points: Vec<(usize, ConnMode)> = Vec::new();
    if keepalive {
        points.extend(plan.conns.iter().map(|&c| (c, ConnMode::KeepAlive)));
    }
    if close {
        points.push((plan.close_conns, ConnMode::Close));
    }
    for &(conns, mode) in &points {
        for t in &targets {
            if mode == ConnMode::Close && !matches!(t.key, "baseline" | "c2s") {
                continue;
            }
            report.series.push(Series {
                key: t.key,
                label: t.label,
                conns,
                mode,
                runs: Vec::new(),
            });
        }
    }
    // The floor of one request's added latency, measured in every run beside the 1-conn
    // points (issue 17): the plain rustls server, one small record each way.
    let floor_server = if keepalive && plan.conns.contains(&1) {
        Some(procs::rustls_copy(work).await?)
    } else {
        None
    };
    // The reference pairs that stopped (died or failed a point): left out of later runs.
    let mut stopped: Vec<Proto> = Vec::new();
    for run in 1..=plan.runs {
        if let Some((_, addr)) = &floor_server {
            let p50 = bulk::round_trip_p50(work, *addr, (plan.warmup, plan.window)).await?;
            println!(
                "  run {run}/{}: floor: one small TLS record each way, p50 {p50:.0} µs",
                plan.runs
            );
            report.floor.push(p50);
        }
        // With an older binary to compare with, old and new swap places on every other run,
        // so that neither always runs right after the other; so do the pairs with and
        // without a policy.
        let mut order: Vec<usize> = (0..report.series.len()).collect();
        if run % 2 == 0 {
            for i in 0..order.len().saturating_sub(1) {
                let (a, b) = (&report.series[i], &report.series[i + 1]);
                let paired = a.key.strip_prefix("old-") == Some(b.key)
                    || b.key.strip_prefix("pol-") == Some(a.key);
                if paired && a.conns == b.conns {
                    order.swap(i, i + 1);
                }
            }
        }
        for &i in &order {
            let series = &mut report.series[i];
            let t = targets
                .iter()
                .find(|t| t.key == series.key)
                .context("target")?;
            let reference = refs.iter_mut().find(|(p, _)| p.key() == t.key);
            if reference.as_ref().is_some_and(|(p, _)| stopped.contains(p)) {
                continue;
            }
            let sample = load::run(
                t.addr,
                t.path,
                series.conns,
                series.mode,
                (plan.warmup, plan.window),
                &t.pids,
            )
            .await;
            let sample = match (sample, reference) {
                (Ok(sample), _) => sample,
                (Err(e), Some((proto, pair))) => {
                    // A reference pair that fails is reported, not the end of the run.
                    let why = pair.check_alive().err().unwrap_or(e);
                    let why = format!("run {run}, {} conns: {why:#}", series.conns);
                    stop_ref(*proto, why, &mut stopped, &mut report.refs_stopped);
                    continue;
                }
                (Err(e), None) => {
                    // A node that exited says why in its log.
                    plain.check_alive()?;
                    if let Some(p) = policed.as_mut() {
                        p.check_alive()?;
                    }
                    return Err(e.context(format!("{} at {} conns", t.label, series.conns)));
                }
            };
            if let (refused @ 1.., Some(status)) = sample.refused {
                bail!(
                    "{} at {} conns: {refused} request(s) answered {status}, not 200: the figures would be those of refusals",
                    t.label,
                    series.conns
                );
            }
            let r = Run::from(&sample);
            println!(
                "  run {run}/{}: {:<32} {:>3} conns {:<10} {:>9.0} req/s  p50 {:>6.0} µs  p99 {:>7.0} µs  CPU {:>5.1} µs/req (load generator {:.1})  errors {}",
                plan.runs,
                t.label,
                series.conns,
                if series.mode == ConnMode::Close { "close" } else { "keep-alive" },
                r.rps,
                r.p50,
                r.p99,
                r.cpu_us,
                r.load_cpu_us,
                r.errors
            );
            series.runs.push(r);
        }
        plain.check_alive()?;
        if let Some(m) = metered.as_mut() {
            m.check_alive()?;
        }
        if let Some(o) = old.as_mut() {
            o.check_alive()?;
        }
        if let Some(p) = policed.as_mut() {
            p.check_alive()?;
        }
        stop_dead_refs(&mut refs, &mut stopped, &mut report.refs_stopped, run);
    }
    report.statsd_datagrams = sink.datagrams();
    Ok(())
}

/// The bulk points: every size through the pipe and over plain rustls, and through the
/// reference pairs `refs`, interleaved run by run. The files are deleted at the end.
async fn bulk_points(
    plan: &Plan,
    work: &restpipe_testkit::certs::Certs,
    refs: &[Proto],
    refs_stopped: &mut Vec<(Proto, String)>,
    beside: &mut Vec<bulk::Beside>,
) -> anyhow::Result<Vec<Bulk>> {
    let files = bulk::write_files(work, &plan.bulk_sizes)?;
    // The nodes' defaults: `get_file` streams a file of any size in Data frames.
    let mut pair = procs::pair(
        work,
        &procs::PairOptions {
            name: "pipe-bulk".into(),
            client_extra: vec![
                "--handlers".into(),
                "time,files".into(),
                "--files-root".into(),
                files.dir.display().to_string(),
            ],
            ..Default::default()
        },
    )
    .await?;
    let (copy_server, copy) = procs::rustls_copy(work).await?;
    let mut pairs = Vec::new();
    for &proto in refs {
        let name = format!("{}-bulk", proto.key());
        pairs.push((proto, http2::start(work, proto, &name, &files.dir).await?));
    }
    let mut points: Vec<Bulk> = plan
        .bulk_sizes
        .iter()
        .map(|&size| Bulk {
            size,
            refs: refs.iter().map(|&proto| RefBulk::new(proto)).collect(),
            ..Bulk::default()
        })
        .collect();
    let mut stopped: Vec<Proto> = Vec::new();
    for run in 1..=plan.runs {
        for point in points.iter_mut() {
            let size = point.size;
            let label = bulk::size_label(size);
            let reps = (plan.bulk_window, plan.bulk_min_reps);
            let pids = [pair.server.pid(), pair.client.pid()];
            let p = bulk::fetch(pair.server_http, &bulk::pipe_path(size), size, reps, &pids)
                .await
                .with_context(|| format!("bulk {label} through the pipe"))?;
            let r = bulk::rustls(work, (copy, copy_server.pid()), size, reps.0, reps.1)
                .await
                .with_context(|| format!("bulk {label} over rustls"))?;
            let mut others = String::new();
            for ((proto, pair), figures) in pairs.iter_mut().zip(point.refs.iter_mut()) {
                let path = http2::RefPair::file_path(&bulk::file_name(size));
                let name = proto.name();
                if stopped.contains(proto) {
                    // A run without a figure, so that the runs stay aligned.
                    figures.mbps.push(f64::NAN);
                    figures.cpu.push(f64::NAN);
                    continue;
                }
                let got = match bulk::fetch(pair.http, &path, size, reps, &pair.pids()).await {
                    Ok(Some(got)) => got,
                    failed => {
                        // A reference pair that fails is reported, not the end of the run.
                        let why = match (pair.check_alive(), failed) {
                            (Err(dead), _) => dead,
                            (Ok(()), Err(e)) => e,
                            (Ok(()), Ok(_)) => anyhow::anyhow!("413"),
                        };
                        let why = format!("run {run}, bulk {label}: {why:#}");
                        stop_ref(*proto, why, &mut stopped, refs_stopped);
                        figures.mbps.push(f64::NAN);
                        figures.cpu.push(f64::NAN);
                        continue;
                    }
                };
                others.push_str(&format!(
                    ", {name} {:>6.0} MB/s ({:.2} CPU s/GB)",
                    got.mb_per_s, got.cpu_s_per_gb
                ));
                figures.mbps.push(got.mb_per_s);
                figures.cpu.push(got.cpu_s_per_gb);
            }
            let shown = |x: Option<bulk::Fetched>| {
                x.map_or("413 (refused)".into(), |x| {
                    format!("{:>6.0} MB/s ({:.2} CPU s/GB)", x.mb_per_s, x.cpu_s_per_gb)
                })
            };
            println!(
                "  run {run}/{}: bulk {label:>7}: pipe {} (load generator {}), plain rustls {:>6.0} MB/s ({:.2} + {:.2} CPU s/GB){others}",
                plan.runs,
                shown(p),
                p.map_or("-".into(), |p| format!("{:.2}", p.receiver_cpu_s_per_gb)),
                r.mb_per_s,
                r.cpu_s_per_gb,
                r.receiver_cpu_s_per_gb,
            );
            // A refusal is a run without a figure (NaN), so that the runs stay aligned.
            point.pipe.push(p.map_or(f64::NAN, |p| p.mb_per_s));
            point.pipe_cpu.push(p.map_or(f64::NAN, |p| p.cpu_s_per_gb));
            point
                .pipe_load_cpu
                .push(p.map_or(f64::NAN, |p| p.receiver_cpu_s_per_gb));
            point.pipe_refused |= p.is_none();
            point.rustls.push(r.mb_per_s);
            point
                .rustls_cpu
                .push(r.cpu_s_per_gb + r.receiver_cpu_s_per_gb);
        }
        if let Some(&size) = plan.bulk_sizes.iter().max() {
            let b = bulk::calls_beside(pair.server_http, size, bulk::BESIDE_CALLS)
                .await
                .context("small calls beside a transfer")?;
            println!(
                "  run {run}/{}: calls beside a {} transfer: p99 idle {:.0} µs, during {:.0} µs ({} calls), transfer {:.0} MB/s",
                plan.runs,
                bulk::size_label(size),
                b.idle_p99_us,
                b.busy_p99_us,
                b.busy_calls,
                b.mb_per_s
            );
            beside.push(b);
        }
        pair.check_alive()?;
        stop_dead_refs(&mut pairs, &mut stopped, refs_stopped, run);
    }
    drop(files);
    Ok(points)
}

/// Mark the reference pairs of `refs` that have exited since as stopped, with their logs'
/// last lines in `report`; the pipe's own figures go on without them.
fn stop_dead_refs(
    refs: &mut [(Proto, http2::RefPair)],
    stopped: &mut Vec<Proto>,
    report: &mut Vec<(Proto, String)>,
    run: usize,
) {
    for (proto, pair) in refs.iter_mut() {
        if stopped.contains(proto) {
            continue;
        }
        if let Err(dead) = pair.check_alive() {
            stop_ref(
                *proto,
                format!("after run {run}: {dead:#}"),
                stopped,
                report,
            );
        }
    }
}

/// Stop measuring the reference pair `proto` for the rest of the run, saying `why` now and
/// in `report`.
fn stop_ref(
    proto: Proto,
    why: String,
    stopped: &mut Vec<Proto>,
    report: &mut Vec<(Proto, String)>,
) {
    println!(
        "  {} stopped ({why}); left out of the runs that follow",
        proto.name()
    );
    report.push((proto, why));
    stopped.push(proto);
}
