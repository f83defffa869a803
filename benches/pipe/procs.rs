//! The servers under test, each in its own process, started with the test kit's process
//! harness ([`restpipe_testkit::procs`]) on port 0: `restpipe server` and `restpipe client`
//! nodes (of the binary cargo built, or of another one given to compare with), and this bench
//! binary re-executed as the bare baseline server, the plain rustls copy server or the
//! HTTP/2 pair ([`crate::http2`]), which print the address they bound.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context as _};
use hyper::StatusCode;
use restpipe_testkit::certs::Certs;
use restpipe_testkit::procs::{self, loopback, Node, Process};

use crate::load;

/// What the baseline and the copy server print once bound: `listening on <addr>`.
pub const LISTENING: &str = "listening on";

/// Fails with the last lines of its log if `process` has exited.
pub fn check_alive(process: &mut Process) -> anyhow::Result<()> {
    if let Some(status) = process.exit_status() {
        bail!(
            "{} exited ({status}):\n{}",
            process.name,
            process.log_tail(15)
        );
    }
    Ok(())
}

/// Poll `GET path` on `addr` until `ready` accepts the answer, at most `within`.
pub async fn wait_for(
    process: &mut Process,
    addr: SocketAddr,
    path: &str,
    within: Duration,
    ready: impl Fn(StatusCode, &[u8]) -> bool,
) -> anyhow::Result<()> {
    let until = std::time::Instant::now() + within;
    loop {
        check_alive(process)?;
        if let Ok((status, body)) = load::fetch(addr, path).await {
            if ready(status, &body) {
                return Ok(());
            }
        }
        if std::time::Instant::now() >= until {
            bail!(
                "{} not ready on http://{addr}{path} within {within:?}:\n{}",
                process.name,
                process.log_tail(15)
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// This bench binary re-executed with `flag 0 more…`, and the address it printed it bound.
pub async fn reference_server(
    work: &Certs,
    name: &str,
    flag: &str,
    more: &[String],
) -> anyhow::Result<(Process, SocketAddr)> {
    let exe = std::env::current_exe()?;
    let mut args = vec![flag.to_string(), "0".into()];
    args.extend_from_slice(more);
    let mut process = Process::spawn(work.dir(), name, &exe, args);
    let line = process
        .wait_line(&[LISTENING], Duration::from_secs(10))
        .await;
    let addr = line
        .split_once(LISTENING)
        .and_then(|(_, addr)| addr.trim().parse().ok())
        .with_context(|| format!("{name} printed {line:?}"))?;
    Ok((process, addr))
}

/// The bare axum server answering `GET /server/time`, started from this binary.
pub async fn baseline(work: &Certs) -> anyhow::Result<(Process, SocketAddr)> {
    let (mut process, addr) = reference_server(work, "baseline", "--serve-baseline", &[]).await?;
    wait_for(
        &mut process,
        addr,
        "/server/time",
        Duration::from_secs(10),
        |s, _| s == StatusCode::OK,
    )
    .await?;
    Ok((process, addr))
}

/// The plain rustls copy server (mutual TLS with the dev set), started from this binary.
pub async fn rustls_copy(work: &Certs) -> anyhow::Result<(Process, SocketAddr)> {
    let dir = work.paths.dir.display().to_string();
    reference_server(work, "rustls-copy", "--serve-rustls", &[dir]).await
}

/// Write a policy file (docs/POLICY.md) of `rules` `[[allow]]` rules into the scratch
/// directory: `rules - 1` rules for peers that never call (`nobody-I-*`, on `get_t*`), then,
/// last, the one that lets the bench's client and server call `get_time` on each other, so
/// that every allowed call walks every rule. Returns its path.
pub fn policy_file(work: &Certs, rules: usize) -> anyhow::Result<PathBuf> {
    if rules == 0 {
        bail!("a policy for the bench needs at least 1 rule");
    }
    let mut text = format!(
        "# Written by the pipe bench: {} rule(s) that match no caller, then the one that does.\n",
        rules - 1
    );
    for i in 0..rules - 1 {
        text.push_str(&format!(
            "\n[[allow]]\npeers = [\"nobody-{i}-*\"]\nhandlers = [\"get_t*\"]\n"
        ));
    }
    text.push_str(&format!(
        "\n[[allow]]\npeers = [\"{}\", \"{}\"]\nhandlers = [\"get_time\"]\n",
        restpipe_certs::DEV_CLIENT_IDENTITY,
        restpipe_certs::DEV_SERVER_NAME
    ));
    let path = work.dir().join(format!("policy-{rules}-rules.toml"));
    std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

/// How to start a pair of nodes.
#[derive(Clone, Debug, Default)]
pub struct PairOptions {
    /// The name of the pair, for the logs.
    pub name: String,
    /// A statsd port on 127.0.0.1 to send metrics to; `None` disables metrics.
    pub statsd: Option<u16>,
    /// More flags for both nodes.
    pub extra: Vec<String>,
    /// More flags for the server node.
    pub server_extra: Vec<String>,
    /// More flags for the client node.
    pub client_extra: Vec<String>,
    /// The `restpipe` binary of both nodes; `None` for the one cargo built.
    pub bin: Option<PathBuf>,
}

/// A server node and a client node connected to it.
pub struct Pair {
    /// The server node.
    pub server: Node,
    /// The client node.
    pub client: Node,
    /// The server node's HTTP address.
    pub server_http: SocketAddr,
    /// The client node's HTTP address.
    pub client_http: SocketAddr,
}

impl Pair {
    /// Fails with a node's log if either has exited.
    pub fn check_alive(&mut self) -> anyhow::Result<()> {
        check_alive(&mut self.server)?;
        check_alive(&mut self.client)
    }
}

/// Metrics flags: to 127.0.0.1:`port`, or off.
fn statsd_flags(statsd: Option<u16>) -> Vec<String> {
    match statsd {
        Some(port) => vec![
            "--statsd-host".into(),
            "127.0.0.1".into(),
            "--statsd-port".into(),
            port.to_string(),
        ],
        None => Vec::new(),
    }
}

/// Start a node of `bin` (`None`: the `restpipe` cargo built) with `args`.
async fn start_node(work: &Certs, name: &str, bin: Option<&Path>, args: Vec<String>) -> Node {
    match bin {
        Some(bin) => Node::start_bin(work.dir(), name, bin, args).await,
        None => Node::start(work.dir(), name, args).await,
    }
}

/// A `restpipe server` process of `bin` (`None`: the one cargo built) on loopback (pipe on
/// `pipe_port`, HTTP on `http_port`, 0 for any), ready once `/health` answers 200.
pub async fn server_node(
    work: &Certs,
    name: &str,
    (pipe_port, http_port): (u16, u16),
    statsd: Option<u16>,
    extra: &[String],
    bin: Option<&Path>,
) -> anyhow::Result<Node> {
    let mut flags = statsd_flags(statsd);
    flags.extend_from_slice(extra);
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let mut args = procs::server_args(work, &flags);
    set_flag(&mut args, "--bind-port", &pipe_port.to_string());
    set_flag(&mut args, "--http", &loopback(http_port).to_string());
    let mut node = start_node(work, name, bin, args).await;
    let http = node.http;
    wait_for(
        &mut node,
        http,
        "/health",
        Duration::from_secs(20),
        |s, _| s == StatusCode::OK,
    )
    .await?;
    Ok(node)
}

fn set_flag(args: &mut [String], flag: &str, value: &str) {
    if let Some(at) = args.iter().position(|a| a == flag) {
        args[at + 1] = value.to_string();
    }
}

/// The dev set's client certificate (identity `dev-client`).
pub fn dev_client(work: &Certs) -> restpipe_testkit::certs::CertFiles {
    restpipe_testkit::certs::CertFiles {
        identity: restpipe_certs::DEV_CLIENT_IDENTITY.into(),
        cert: work.paths.client_cert.clone(),
        key: work.paths.client_key.clone(),
    }
}

/// A server node and a client node (identity `dev-client`), both with the `time` handlers,
/// connected, both of `options.bin`.
pub async fn pair(work: &Certs, options: &PairOptions) -> anyhow::Result<Pair> {
    let server_flags = [options.extra.as_slice(), &options.server_extra].concat();
    let server = server_node(
        work,
        &format!("{}-server", options.name),
        (0, 0),
        options.statsd,
        &server_flags,
        options.bin.as_deref(),
    )
    .await?;
    let mut flags = statsd_flags(options.statsd);
    flags.extend_from_slice(&options.extra);
    flags.extend_from_slice(&options.client_extra);
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let args = procs::client_args(work, &dev_client(work), server.pipe_addr(), &flags);
    let mut client = start_node(
        work,
        &format!("{}-client", options.name),
        options.bin.as_deref(),
        args,
    )
    .await;
    let client_http = client.http;
    wait_for(
        &mut client,
        client_http,
        "/health",
        Duration::from_secs(20),
        |s, _| s == StatusCode::OK,
    )
    .await?;
    Ok(Pair {
        server_http: server.http,
        server,
        client,
        client_http,
    })
}

/// Resident memory of `process`, bytes (`VmRSS`).
pub fn rss_bytes(process: &Process) -> anyhow::Result<u64> {
    match process.rss_kib() {
        0 => bail!("no VmRSS for {}", process.name),
        kib => Ok(kib * 1024),
    }
}

/// CPU time of `pid` so far, user plus system.
pub fn cpu_time(pid: u32, ticks_per_s: f64) -> anyhow::Result<Duration> {
    procs::cpu_time(pid, ticks_per_s).with_context(|| format!("CPU time of {pid}"))
}

/// CPU of each of `pids` over `window`, % of one core each, in the same order.
pub async fn cpu_pct_over(pids: &[u32], window: Duration, ticks: f64) -> anyhow::Result<Vec<f64>> {
    let before = pids
        .iter()
        .map(|&pid| cpu_time(pid, ticks))
        .collect::<anyhow::Result<Vec<_>>>()?;
    tokio::time::sleep(window).await;
    let mut pcts = Vec::with_capacity(pids.len());
    for (&pid, from) in pids.iter().zip(before) {
        let to = cpu_time(pid, ticks)?;
        pcts.push(to.saturating_sub(from).as_secs_f64() / window.as_secs_f64() * 100.0);
    }
    Ok(pcts)
}
