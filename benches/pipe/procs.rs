//! The servers under test, each in its own process: `restpipe server` and `restpipe client`
//! nodes, and this bench binary re-executed as the bare baseline server or the plain rustls
//! copy server. Also what `/proc` says about a process: RSS and CPU time.

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use hyper::StatusCode;

use crate::load;

/// The `restpipe` binary cargo built for this bench.
const RESTPIPE: &str = env!("CARGO_BIN_EXE_restpipe");

/// The certificates of a development set and the scratch directory of the run.
pub struct Workdir {
    /// Where the PEM files, the logs and the bulk files live.
    pub dir: PathBuf,
    /// The dev set: CA, `localhost` server, `dev-client` client.
    pub certs: restpipe_certs::DevPaths,
}

impl Workdir {
    /// A dev certificate set written into `dir`.
    pub fn new(dir: &Path) -> anyhow::Result<Workdir> {
        let certs = match restpipe_certs::write_dev_set(&dir.join("certs"), false)? {
            restpipe_certs::DevOutcome::Written(paths) => paths,
            restpipe_certs::DevOutcome::AlreadyPresent(files) => {
                bail!("certificates already present: {files:?}")
            }
        };
        Ok(Workdir {
            dir: dir.to_owned(),
            certs,
        })
    }
}

/// A child process, killed when dropped.
pub struct Proc {
    name: String,
    child: std::process::Child,
    log: PathBuf,
}

impl Proc {
    /// Start `program args`, stdout and stderr to `<dir>/<name>.log`, with a clean environment
    /// (no `RP_*` or `DEBUG` from the caller's).
    pub fn spawn(dir: &Path, name: &str, program: &Path, args: &[String]) -> anyhow::Result<Proc> {
        let log = dir.join(format!("{name}.log"));
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)?;
        let child = Command::new(program)
            .args(args)
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("start {name}: {}", program.display()))?;
        Ok(Proc {
            name: name.into(),
            child,
            log,
        })
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Kill it (SIGKILL) and reap it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// The last lines of its log, for an error message.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(15)..].join("\n")
    }

    /// Fails with its log if it has exited.
    pub fn check_alive(&mut self) -> anyhow::Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!("{} exited ({status}):\n{}", self.name, self.log_tail());
        }
        Ok(())
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A loopback port that was free a moment ago.
pub fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// A loopback address with a free port.
pub fn free_addr() -> anyhow::Result<SocketAddr> {
    Ok(SocketAddr::from(([127, 0, 0, 1], free_port()?)))
}

/// Poll `GET path` on `addr` until `ready` accepts the answer, at most `within`.
pub async fn wait_for(
    proc: &mut Proc,
    addr: SocketAddr,
    path: &str,
    within: Duration,
    ready: impl Fn(StatusCode, &[u8]) -> bool,
) -> anyhow::Result<()> {
    let until = Instant::now() + within;
    loop {
        proc.check_alive()?;
        if let Ok((status, body)) = load::fetch(addr, path).await {
            if ready(status, &body) {
                return Ok(());
            }
        }
        if Instant::now() >= until {
            bail!(
                "{} not ready on http://{addr}{path} within {within:?}:\n{}",
                proc.name,
                proc.log_tail()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The bare axum server answering `GET /server/time`, started from this binary.
pub async fn baseline(work: &Workdir) -> anyhow::Result<(Proc, SocketAddr)> {
    let addr = free_addr()?;
    let exe = std::env::current_exe()?;
    let mut proc = Proc::spawn(
        &work.dir,
        "baseline",
        &exe,
        &["--serve-baseline".into(), addr.port().to_string()],
    )?;
    wait_for(
        &mut proc,
        addr,
        "/server/time",
        Duration::from_secs(10),
        |s, _| s == StatusCode::OK,
    )
    .await?;
    Ok((proc, addr))
}

/// The plain rustls copy server (mutual TLS with the dev set), started from this binary.
pub async fn rustls_copy(work: &Workdir) -> anyhow::Result<(Proc, SocketAddr)> {
    let addr = free_addr()?;
    let exe = std::env::current_exe()?;
    let mut proc = Proc::spawn(
        &work.dir,
        "rustls-copy",
        &exe,
        &[
            "--serve-rustls".into(),
            addr.port().to_string(),
            work.certs.dir.display().to_string(),
        ],
    )?;
    let until = Instant::now() + Duration::from_secs(10);
    while tokio::net::TcpStream::connect(addr).await.is_err() {
        proc.check_alive()?;
        if Instant::now() >= until {
            bail!(
                "the rustls copy server did not listen:\n{}",
                proc.log_tail()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok((proc, addr))
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
    /// More flags for the client node.
    pub client_extra: Vec<String>,
}

/// A server node and a client node connected to it.
pub struct Pair {
    /// The server node.
    pub server: Proc,
    /// The client node.
    pub client: Proc,
    /// The server node's HTTP address.
    pub server_http: SocketAddr,
    /// The client node's HTTP address.
    pub client_http: SocketAddr,
}

impl Pair {
    /// Fails with a node's log if either has exited.
    pub fn check_alive(&mut self) -> anyhow::Result<()> {
        self.server.check_alive()?;
        self.client.check_alive()
    }
}

/// Flags shared by every node: TLS files and metrics.
fn common_flags(
    certs: &restpipe_certs::DevPaths,
    server: bool,
    statsd: Option<u16>,
) -> Vec<String> {
    let (cert, key) = if server {
        (&certs.server_cert, &certs.server_key)
    } else {
        (&certs.client_cert, &certs.client_key)
    };
    let mut flags = vec![
        "--ca".into(),
        certs.ca_cert.display().to_string(),
        "--cert".into(),
        cert.display().to_string(),
        "--key".into(),
        key.display().to_string(),
    ];
    match statsd {
        Some(port) => flags.extend([
            "--statsd-host".into(),
            "127.0.0.1".into(),
            "--statsd-port".into(),
            port.to_string(),
        ]),
        None => flags.extend(["--statsd-host".into(), String::new()]),
    }
    flags
}

/// A `restpipe server` process on loopback.
pub async fn server_node(
    work: &Workdir,
    name: &str,
    pipe_port: u16,
    http: SocketAddr,
    statsd: Option<u16>,
    extra: &[String],
) -> anyhow::Result<Proc> {
    let mut args: Vec<String> = vec![
        "server".into(),
        "--bind-interface".into(),
        "127.0.0.1".into(),
        "--bind-port".into(),
        pipe_port.to_string(),
        "--http".into(),
        http.to_string(),
    ];
    args.extend(common_flags(&work.certs, true, statsd));
    args.extend_from_slice(extra);
    let mut proc = Proc::spawn(&work.dir, name, Path::new(RESTPIPE), &args)?;
    wait_for(
        &mut proc,
        http,
        "/health",
        Duration::from_secs(20),
        |s, _| s == StatusCode::OK,
    )
    .await?;
    Ok(proc)
}

/// A server node and a client node (identity `dev-client`), both with the `time` handlers,
/// connected.
pub async fn pair(work: &Workdir, options: &PairOptions) -> anyhow::Result<Pair> {
    let pipe_port = free_port()?;
    let server_http = free_addr()?;
    let client_http = free_addr()?;
    let server = server_node(
        work,
        &format!("{}-server", options.name),
        pipe_port,
        server_http,
        options.statsd,
        &options.extra,
    )
    .await?;
    let mut args: Vec<String> = vec![
        "client".into(),
        "--server-host".into(),
        "127.0.0.1".into(),
        "--server-port".into(),
        pipe_port.to_string(),
        "--server-name".into(),
        "localhost".into(),
        "--http".into(),
        client_http.to_string(),
    ];
    args.extend(common_flags(&work.certs, false, options.statsd));
    args.extend_from_slice(&options.extra);
    args.extend_from_slice(&options.client_extra);
    let mut client = Proc::spawn(
        &work.dir,
        &format!("{}-client", options.name),
        Path::new(RESTPIPE),
        &args,
    )?;
    wait_for(
        &mut client,
        client_http,
        "/health",
        Duration::from_secs(20),
        |s, _| s == StatusCode::OK,
    )
    .await?;
    Ok(Pair {
        server,
        client,
        server_http,
        client_http,
    })
}

/// Resident memory of `pid`, bytes (`VmRSS` of `/proc/<pid>/status`).
pub fn rss_bytes(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .context("no VmRSS line")?;
    let kb: u64 = line
        .split_whitespace()
        .nth(1)
        .context("malformed VmRSS line")?
        .parse()?;
    Ok(kb * 1024)
}

/// CPU time of `pid` so far, user plus system (`/proc/<pid>/stat`).
pub fn cpu_time(pid: u32, ticks_per_s: f64) -> anyhow::Result<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let after = stat.rsplit_once(')').context("malformed stat")?.1;
    let fields: Vec<&str> = after.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line: 12 and 13 after ')'.
    let utime: u64 = fields.get(11).context("no utime")?.parse()?;
    let stime: u64 = fields.get(12).context("no stime")?.parse()?;
    Ok(Duration::from_secs_f64(
        (utime + stime) as f64 / ticks_per_s,
    ))
}

/// Clock ticks per second of `/proc` CPU times (`getconf CLK_TCK`, 100 if that fails).
pub fn clock_ticks() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}
