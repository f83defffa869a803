//! Real `restpipe` processes for the reliability tests (`tests/reliability_*.rs`) and the soak
//! (`tests/soak.rs`): the binary cargo built, started as `server` and `client` on free
//! loopback ports with certificate files, so that a test can kill one with SIGKILL, restart it
//! on the same port, and read its memory and file descriptors from `/proc/<pid>`.
//!
//! - [`Certs`]: a development set (CA, `localhost` server, `dev-client`) written to a temporary
//!   directory by `restpipe_certs::write_dev_set`, and more client identities on demand;
//! - [`Node`]: one child process, its log file, `/proc` figures, SIGKILL, SIGTERM, restart;
//! - [`Load`]: HTTP workers that count every request sent and every answer, by kind, each
//!   request bounded by an outer timeout that counts it as hung;
//! - [`Statsd`]: a UDP socket standing in for statsd, to count the metrics a node sends.
//!
//! Each test binary uses a part of this module, so unused items are allowed.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::fmt;
use std::io::{Read, Seek};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use restpipe::TlsMaterial;
use restpipe_certs::{CertificateAuthority, DevOutcome, DevPaths, IssueOptions};
use tokio::task::JoinHandle;

/// The `restpipe` binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_restpipe");

/// A port on 127.0.0.1 that was free a moment ago (the child process binds it itself).
pub fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    listener.local_addr().expect("local address").port()
}

/// `127.0.0.1:port`.
pub fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

// ----------------------------------------------------------------------------------------
// Certificates

/// A certificate and its key, as files.
#[derive(Clone, Debug)]
pub struct CertFiles {
    /// The identity (subject CN).
    pub identity: String,
    /// The certificate, PEM.
    pub cert: PathBuf,
    /// The private key, PEM.
    pub key: PathBuf,
}

/// A development certificate set in a temporary directory, and its CA to issue more.
pub struct Certs {
    dir: tempfile::TempDir,
    /// The six files of the dev set.
    pub paths: DevPaths,
    ca: CertificateAuthority,
}

impl Certs {
    /// `restpipe_certs::write_dev_set` into a fresh temporary directory.
    pub fn new() -> Certs {
        let dir = tempfile::tempdir().expect("temporary directory");
        let paths = match restpipe_certs::write_dev_set(&dir.path().join("certs"), false)
            .expect("write the dev set")
        {
            DevOutcome::Written(paths) => paths,
            DevOutcome::AlreadyPresent(files) => panic!("a fresh directory holds {files:?}"),
        };
        let ca = CertificateAuthority::load(&paths.ca_cert, &paths.ca_key).expect("load the CA");
        Certs { dir, paths, ca }
    }

    /// The scratch directory (logs, files to serve).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The CA certificate, PEM text.
    pub fn ca_pem(&self) -> &str {
        self.ca.cert_pem()
    }

    /// A client certificate for `identity`, valid as usual, written as `<identity>.pem/.key`.
    pub fn client(&self, identity: &str) -> CertFiles {
        self.client_with(identity, &IssueOptions::default())
    }

    /// A client certificate for `identity` with these options (an expired one, say).
    pub fn client_with(&self, identity: &str, options: &IssueOptions) -> CertFiles {
        let issued = self
            .ca
            .issue_client(identity, options)
            .expect("issue a client certificate");
        write_pair(&self.dir.path().join("certs"), identity, &issued)
    }

    /// Client TLS material for `identity`, for a hand-driven peer in the test process.
    pub fn material(&self, identity: &str) -> TlsMaterial {
        let issued = self
            .ca
            .issue_client(identity, &IssueOptions::default())
            .expect("issue a client certificate");
        TlsMaterial::from_pem(self.ca_pem(), &issued.cert_pem, &issued.key_pem)
            .expect("client TLS material")
    }

    /// A connector for a hand-driven peer with a certificate for `identity`.
    pub fn connector(&self, identity: &str) -> tokio_rustls::TlsConnector {
        self.material(identity).connector().expect("connector")
    }
}

/// Write `issued` as `<dir>/<name>.pem` and `<dir>/<name>.key`.
pub fn write_pair(dir: &Path, name: &str, issued: &restpipe_certs::IssuedCert) -> CertFiles {
    let cert = dir.join(format!("{name}.pem"));
    let key = dir.join(format!("{name}.key"));
    restpipe_certs::write_certificate(&cert, &issued.cert_pem, true).expect("write certificate");
    restpipe_certs::write_private_key(&key, &issued.key_pem, true).expect("write key");
    CertFiles {
        identity: name.to_string(),
        cert,
        key,
    }
}

/// Issue options whose validity ended a day ago (it began 30 days ago).
pub fn expired_options() -> IssueOptions {
    let now = IssueOptions::valid_for_days(1);
    let day = Duration::from_secs(24 * 3600);
    IssueOptions {
        not_before: now.not_before - 30 * day,
        not_after: now.not_before - day,
        ..now
    }
}

// ----------------------------------------------------------------------------------------
// Nodes

/// A `restpipe server` process on free loopback ports, with `extra` flags. Returns the node and
/// its pipe port.
pub async fn start_server(certs: &Certs, extra: &[&str]) -> (Node, u16) {
    let (pipe_port, http_port) = (free_port(), free_port());
    let args = server_args(certs, pipe_port, http_port, extra);
    let node = Node::start(certs.dir(), "server", loopback(http_port), args).await;
    (node, pipe_port)
}

/// The flags of a server node on `127.0.0.1:pipe_port`, HTTP on `127.0.0.1:http_port`, with
/// the dev set's server certificate and metrics off unless `extra` holds `--statsd-host`.
/// `extra` is appended; clap refuses a flag given twice, so it must not repeat one set here.
pub fn server_args(certs: &Certs, pipe_port: u16, http_port: u16, extra: &[&str]) -> Vec<String> {
    let p = &certs.paths;
    let mut args: Vec<String> = vec![
        "server".into(),
        "--bind-interface".into(),
        "127.0.0.1".into(),
        "--bind-port".into(),
        pipe_port.to_string(),
        "--http".into(),
        loopback(http_port).to_string(),
        "--ca".into(),
        path(&p.ca_cert),
        "--cert".into(),
        path(&p.server_cert),
        "--key".into(),
        path(&p.server_key),
    ];
    if !extra.contains(&"--statsd-host") {
        args.extend(["--statsd-host".into(), String::new()]);
    }
    args.extend(extra.iter().map(|a| a.to_string()));
    args
}

/// The flags of a client node with the certificate `cert`, dialling `server` (verified as
/// `localhost`), HTTP on `127.0.0.1:http_port`, metrics off unless `extra` sets them.
pub fn client_args(
    certs: &Certs,
    cert: &CertFiles,
    server: SocketAddr,
    http_port: u16,
    extra: &[&str],
) -> Vec<String> {
    let mut args: Vec<String> = vec![
        "client".into(),
        "--server-host".into(),
        server.ip().to_string(),
        "--server-port".into(),
        server.port().to_string(),
        "--server-name".into(),
        "localhost".into(),
        "--http".into(),
        loopback(http_port).to_string(),
        "--ca".into(),
        path(&certs.paths.ca_cert),
        "--cert".into(),
        path(&cert.cert),
        "--key".into(),
        path(&cert.key),
    ];
    if !extra.contains(&"--statsd-host") {
        args.extend(["--statsd-host".into(), String::new()]);
    }
    args.extend(extra.iter().map(|a| a.to_string()));
    args
}

fn path(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

/// A `restpipe` child process. Killed (SIGKILL) when dropped.
pub struct Node {
    /// A name for messages and the log file.
    pub name: String,
    /// Its HTTP endpoint.
    pub http: SocketAddr,
    args: Vec<String>,
    log: PathBuf,
    child: Option<Child>,
    /// How many times it was started.
    pub starts: u32,
}

impl Node {
    /// Start `restpipe <args>` with a clean environment (`RUST_LOG=info`), its output appended
    /// to `<dir>/<name>.log`, and wait until its HTTP endpoint accepts connections.
    pub async fn start(dir: &Path, name: &str, http: SocketAddr, args: Vec<String>) -> Node {
        let mut node = Node {
            name: name.to_string(),
            http,
            args,
            log: dir.join(format!("{name}.log")),
            child: None,
            starts: 0,
        };
        node.spawn().await;
        node
    }

    async fn spawn(&mut self) {
        assert!(self.child.is_none(), "{} is already running", self.name);
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("open the log file");
        let child = Command::new(BIN)
            .args(&self.args)
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("RUST_LOG", "info")
            .current_dir(self.log.parent().expect("log directory"))
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("clone the log file"))
            .stderr(out)
            .spawn()
            .unwrap_or_else(|e| panic!("start {}: {e}", self.name));
        self.child = Some(child);
        self.starts += 1;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if tokio::net::TcpStream::connect(self.http).await.is_ok() {
                return;
            }
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!(
                    "{} exited with {status} before it served HTTP; its log:\n{}",
                    self.name,
                    self.log_text()
                );
            }
            assert!(
                Instant::now() < deadline,
                "{} did not serve HTTP within 30 s; its log:\n{}",
                self.name,
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The process id of the running process.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("the node is running").id()
    }

    /// Whether the process is running.
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    fn signal(&self, signal: &str) {
        let pid = self.pid();
        let status = Command::new("kill")
            .args([signal, &pid.to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill {signal} {pid} failed");
    }

    /// `kill -KILL <pid>`, and reap it.
    pub fn kill(&mut self) {
        self.signal("-KILL");
        if let Some(mut child) = self.child.take() {
            let _ = child.wait();
        }
    }

    /// `kill -TERM <pid>`, and wait (at most 15 s) for it to exit; returns whether it exited
    /// with status 0.
    pub async fn terminate(&mut self) -> bool {
        self.signal("-TERM");
        let mut child = self.child.take().expect("the node is running");
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return status.success();
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Start it again with the same flags (same ports), once it has been stopped.
    pub async fn restart(&mut self) {
        self.spawn().await;
    }

    /// Everything it logged, over every start.
    pub fn log_text(&self) -> String {
        let mut text = String::new();
        if let Ok(mut file) = std::fs::File::open(&self.log) {
            let _ = file.rewind();
            let _ = file.read_to_string(&mut text);
        }
        text
    }

    /// Log lines that contain every one of `needles`.
    pub fn log_count(&self, needles: &[&str]) -> usize {
        self.log_text()
            .lines()
            .filter(|line| needles.iter().all(|n| line.contains(n)))
            .count()
    }

    /// Resident memory now, in KiB (`VmRSS`).
    pub fn rss_kib(&self) -> u64 {
        proc_status(self.pid(), "VmRSS")
    }

    /// Peak resident memory, in KiB (`VmHWM`).
    pub fn peak_rss_kib(&self) -> u64 {
        proc_status(self.pid(), "VmHWM")
    }

    /// Open file descriptors (entries of `/proc/<pid>/fd`).
    pub fn fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .map(|d| d.count())
            .unwrap_or(0)
    }

    /// The pipe address of a server node: `127.0.0.1:<its --bind-port>`.
    pub fn pipe_addr(&self) -> SocketAddr {
        let port = self
            .args
            .windows(2)
            .find(|w| w[0] == "--bind-port")
            .and_then(|w| w[1].parse().ok())
            .expect("a server node with --bind-port");
        loopback(port)
    }

    /// `http://<its HTTP endpoint><path>`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.http, path)
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::env::var_os("RESTPIPE_TEST_LOG").is_some() {
            eprintln!("---- log of {} ----\n{}", self.name, self.log_text());
        }
    }
}

/// A `kB` field of `/proc/<pid>/status`.
fn proc_status(pid: u32, field: &str) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    text.lines()
        .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

// ----------------------------------------------------------------------------------------
// HTTP

/// An HTTP client that ignores any proxy of the environment, without a timeout of its own
/// (callers bound each request).
pub fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .build()
        .expect("HTTP client")
}

/// `GET url` within 30 s: status and body. Panics on a transport error or a hang.
pub async fn get(client: &reqwest::Client, url: &str) -> (u16, String) {
    let fut = async {
        let response = client.get(url).send().await?;
        let status = response.status().as_u16();
        let body = response.text().await?;
        Ok::<_, reqwest::Error>((status, body))
    };
    match tokio::time::timeout(Duration::from_secs(30), fut).await {
        Ok(Ok(answer)) => answer,
        Ok(Err(e)) => panic!("GET {url}: {e}"),
        Err(_) => panic!("GET {url} hung for 30 s"),
    }
}

/// `GET url` and parse the body as JSON (any status).
pub async fn get_json(client: &reqwest::Client, url: &str) -> serde_json::Value {
    let (status, body) = get(client, url).await;
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("GET {url} ({status}): {e}: {body}"))
}

/// The identities the server node lists at `/clients`.
pub async fn listed_clients(client: &reqwest::Client, server: &Node) -> Vec<String> {
    let list = get_json(client, &server.url("/clients")).await;
    let mut names: Vec<String> = list
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|c| c["identity"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

/// How one request ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Outcome {
    /// An HTTP status.
    Status(u16),
    /// No HTTP answer: the connection to the node failed.
    Transport,
    /// No answer within the outer timeout.
    Hung,
}

/// One request of a [`Load`].
#[derive(Clone, Copy, Debug)]
pub struct Record {
    /// When it was sent, since the load started.
    pub sent_at: Duration,
    /// How long it took.
    pub latency: Duration,
    /// How it ended.
    pub outcome: Outcome,
    /// Which URL (index into the load's URLs).
    pub target: usize,
}

/// Requests sent and answers by kind.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Tally {
    /// Requests sent.
    pub sent: u64,
    /// Requests that ended, whichever way.
    pub answered: u64,
    /// Answers by kind.
    pub by_outcome: BTreeMap<Outcome, u64>,
}

impl Tally {
    /// The tally of `records`, of which `sent` were sent.
    pub fn of(sent: u64, records: &[Record]) -> Tally {
        let mut by_outcome = BTreeMap::new();
        for r in records {
            *by_outcome.entry(r.outcome).or_insert(0) += 1;
        }
        Tally {
            sent,
            answered: records.len() as u64,
            by_outcome,
        }
    }

    /// Answers of HTTP status `status`.
    pub fn status(&self, status: u16) -> u64 {
        self.by_outcome
            .get(&Outcome::Status(status))
            .copied()
            .unwrap_or(0)
    }

    /// Answers that are neither 200 nor 502, 503 or 504: other statuses, transport errors and
    /// hangs.
    pub fn unexpected(&self) -> u64 {
        self.by_outcome
            .iter()
            .filter(|(o, _)| !matches!(o, Outcome::Status(200 | 502 | 503 | 504)))
            .map(|(_, n)| n)
            .sum()
    }

    /// Requests sent that never ended.
    pub fn lost(&self) -> u64 {
        self.sent - self.answered
    }
}

impl fmt::Display for Tally {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sent {}, answered {}", self.sent, self.answered)?;
        for (outcome, n) in &self.by_outcome {
            match outcome {
                Outcome::Status(s) => write!(f, ", {s}: {n}")?,
                Outcome::Transport => write!(f, ", transport errors: {n}")?,
                Outcome::Hung => write!(f, ", hung: {n}")?,
            }
        }
        Ok(())
    }
}

/// What a [`Load`] sends.
#[derive(Clone, Debug)]
pub struct LoadSpec {
    /// URLs, taken in turn.
    pub urls: Vec<String>,
    /// Workers, each with one request outstanding at a time.
    pub workers: usize,
    /// `X-Event-Timeout-Ms` of every request.
    pub timeout_ms: u64,
    /// A request with no answer after this long is counted as hung.
    pub outer: Duration,
    /// Pause of a worker between two requests.
    pub pause: Duration,
}

/// HTTP workers sending requests until stopped, recording every request.
pub struct Load {
    sent: Arc<AtomicU64>,
    records: Arc<Mutex<Vec<Record>>>,
    stop: Arc<AtomicBool>,
    tasks: Vec<JoinHandle<()>>,
}

impl Load {
    /// Start the workers.
    pub fn start(spec: LoadSpec) -> Load {
        let sent = Arc::new(AtomicU64::new(0));
        let records: Arc<Mutex<Vec<Record>>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let client = http_client();
        let started = Instant::now();
        let spec = Arc::new(spec);
        let tasks = (0..spec.workers)
            .map(|w| {
                let (sent, records, stop) = (sent.clone(), records.clone(), stop.clone());
                let (client, spec) = (client.clone(), spec.clone());
                tokio::spawn(async move {
                    let mut i = w;
                    while !stop.load(Ordering::Relaxed) {
                        let target = i % spec.urls.len();
                        i += 1;
                        sent.fetch_add(1, Ordering::Relaxed);
                        let at = Instant::now();
                        let outcome = one_request(&client, &spec, &spec.urls[target]).await;
                        let record = Record {
                            sent_at: at - started,
                            latency: at.elapsed(),
                            outcome,
                            target,
                        };
                        records
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .push(record);
                        if !spec.pause.is_zero() {
                            tokio::time::sleep(spec.pause).await;
                        }
                    }
                })
            })
            .collect();
        Load {
            sent,
            records,
            stop,
            tasks,
        }
    }

    /// Requests recorded so far.
    pub fn len(&self) -> usize {
        self.records.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// The records from index `from` on.
    pub fn records_from(&self, from: usize) -> Vec<Record> {
        let records = self.records.lock().unwrap_or_else(|p| p.into_inner());
        records[from.min(records.len())..].to_vec()
    }

    /// Wait (at most `limit`) until `n` more requests than `from` are recorded; returns them.
    pub async fn next_records(&self, from: usize, n: usize, limit: Duration) -> Vec<Record> {
        let deadline = Instant::now() + limit;
        while self.len() < from + n {
            assert!(
                Instant::now() < deadline,
                "only {} requests in {limit:?}",
                self.len() - from
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let mut records = self.records_from(from);
        records.truncate(n);
        records
    }

    /// Stop, wait for every worker's last request to end, and return the tally and the records.
    pub async fn finish(self) -> (Tally, Vec<Record>) {
        self.stop.store(true, Ordering::Relaxed);
        for task in self.tasks {
            task.await.expect("a load worker panicked");
        }
        let records = std::mem::take(&mut *self.records.lock().unwrap_or_else(|p| p.into_inner()));
        (
            Tally::of(self.sent.load(Ordering::Relaxed), &records),
            records,
        )
    }
}

async fn one_request(client: &reqwest::Client, spec: &LoadSpec, url: &str) -> Outcome {
    let fut = async {
        let response = client
            .get(url)
            .header("X-Event-Timeout-Ms", spec.timeout_ms.to_string())
            .send()
            .await?;
        let status = response.status().as_u16();
        response.bytes().await?;
        Ok::<_, reqwest::Error>(status)
    };
    match tokio::time::timeout(spec.outer, fut).await {
        Ok(Ok(status)) => Outcome::Status(status),
        Ok(Err(_)) => Outcome::Transport,
        Err(_) => Outcome::Hung,
    }
}

// ----------------------------------------------------------------------------------------
// statsd

/// A UDP socket on 127.0.0.1 standing in for statsd; keeps every line it receives.
pub struct Statsd {
    port: u16,
    lines: Arc<Mutex<Vec<String>>>,
    task: JoinHandle<()>,
}

impl Statsd {
    /// Bind and start receiving.
    pub async fn start() -> Statsd {
        let socket = tokio::net::UdpSocket::bind("127.0.0.1:0")
            .await
            .expect("bind statsd");
        let port = socket.local_addr().expect("statsd address").port();
        let lines: Arc<Mutex<Vec<String>>> = Arc::default();
        let task = tokio::spawn({
            let lines = lines.clone();
            async move {
                let mut buf = vec![0u8; 64 * 1024];
                while let Ok(n) = socket.recv(&mut buf).await {
                    let text = String::from_utf8_lossy(&buf[..n]);
                    lines
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .extend(text.lines().filter(|l| !l.is_empty()).map(str::to_string));
                }
            }
        });
        Statsd { port, lines, task }
    }

    /// The flags that send a node's metrics here.
    pub fn flags(&self) -> [String; 4] {
        [
            "--statsd-host".into(),
            "127.0.0.1".into(),
            "--statsd-port".into(),
            self.port.to_string(),
        ]
    }

    /// The sum of the counter `restpipe.<name>` received so far.
    pub fn counter(&self, name: &str) -> u64 {
        let prefix = format!("restpipe.{name}:");
        self.lines
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter_map(|l| {
                l.strip_prefix(&prefix)?
                    .strip_suffix("|c")?
                    .parse::<u64>()
                    .ok()
            })
            .sum()
    }

    /// Every counter name that starts with `restpipe.<prefix>`, with its sum.
    pub fn counters(&self, prefix: &str) -> BTreeMap<String, u64> {
        let full = format!("restpipe.{prefix}");
        let mut sums = BTreeMap::new();
        for line in self.lines.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            let Some(rest) = line.strip_prefix(&full) else {
                continue;
            };
            let Some((name, value)) = rest.split_once(':') else {
                continue;
            };
            let Some(n) = value.strip_suffix("|c").and_then(|v| v.parse::<u64>().ok()) else {
                continue;
            };
            *sums.entry(format!("{prefix}{name}")).or_insert(0) += n;
        }
        sums
    }
}

impl Drop for Statsd {
    fn drop(&mut self) {
        self.task.abort();
    }
}
