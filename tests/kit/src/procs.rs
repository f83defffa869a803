//! The process harness: real processes for the reliability tests, the soak and the bench.
//!
//! - [`Process`]: one child process with its output appended to a log file; SIGKILL, SIGTERM,
//!   relaunch, waiting for a line it prints, and what `/proc/<pid>` says of it (memory, file
//!   descriptors, CPU time);
//! - [`Node`]: a `restpipe server` or `restpipe client` process. It is started on port 0
//!   (`--http 127.0.0.1:0`, `--bind-port 0`) and its bound addresses are read from the line
//!   it prints when ready (`HTTP endpoint ready http=… pipe=…`); an older `restpipe` that does
//!   not put `pipe=` on that line gives its pipe address on the line it logs before it,
//!   `pipe listening addr=…` ([`PIPE_LINE`]). A restart reuses the ports the first start got.
//!
//! The `restpipe` binary is the one cargo built next to the test or bench executable
//! ([`restpipe_bin`]), unless another is given ([`Node::start_bin`]).

use std::io::{Read, Seek, SeekFrom};
use std::net::SocketAddr;
use std::ops::{Deref, DerefMut};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use crate::certs::{CertFiles, Certs};

/// What a `restpipe` node prints once its HTTP front door (and, for a server, its pipe) is
/// bound.
pub const READY_LINE: &str = "HTTP endpoint ready";

/// What a `restpipe` server node logs once its pipe is bound, with `addr=<address>`: where an
/// older binary, whose [`READY_LINE`] has no `pipe=`, gives its pipe address.
pub const PIPE_LINE: &str = "pipe listening";

/// How long a node may take to print [`READY_LINE`].
pub const READY_WITHIN: Duration = Duration::from_secs(30);

/// Heartbeats and handshakes short enough for the process tests: a heartbeat every 0.5 s, a
/// peer dead after 3 s of silence, a handshake within 2 s.
pub const QUICK_TIMINGS: [&str; 6] = [
    "--heartbeat-interval",
    "0.5",
    "--heartbeat-timeout",
    "3",
    "--handshake-timeout",
    "2",
];

/// [`QUICK_TIMINGS`], and requests that wait `connect_wait` seconds for the pipe
/// (`--connect-wait`).
pub fn quick_timings(connect_wait: &'static str) -> Vec<&'static str> {
    let mut flags = QUICK_TIMINGS.to_vec();
    flags.extend(["--connect-wait", connect_wait]);
    flags
}

/// The `restpipe` binary cargo built for the running test or bench: `restpipe` in the
/// directory above the executable's `deps/`.
pub fn restpipe_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("the test executable's path");
    let mut dir = exe
        .parent()
        .expect("the executable's directory")
        .to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    let bin = dir.join(format!("restpipe{}", std::env::consts::EXE_SUFFIX));
    assert!(
        bin.exists(),
        "no restpipe binary at {} (run through cargo test or cargo bench)",
        bin.display()
    );
    bin
}

/// `127.0.0.1:port`.
pub fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// The value of the field `key=value` of a log line.
pub fn log_field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split_whitespace()
        .find_map(|word| word.strip_prefix(key)?.strip_prefix('='))
}

// ----------------------------------------------------------------------------------------
// Any process

/// A child process, its stdout and stderr appended to `<dir>/<name>.log`. Killed (SIGKILL)
/// when dropped; with `RESTPIPE_TEST_LOG` set, its log is then printed.
pub struct Process {
    /// A name for messages and the log file.
    pub name: String,
    program: PathBuf,
    args: Vec<String>,
    log: PathBuf,
    /// Where the log file ended when the current run started.
    log_from: u64,
    child: Option<Child>,
    /// How many times it was started.
    pub starts: u32,
}

impl Process {
    /// Start `program args` in `dir` with a clean environment (`PATH` only: the log level is
    /// the node's own, info unless its settings ask for debug).
    pub fn spawn(dir: &Path, name: &str, program: &Path, args: Vec<String>) -> Process {
        let mut process = Process {
            name: name.to_string(),
            program: program.to_path_buf(),
            args,
            log: dir.join(format!("{name}.log")),
            log_from: 0,
            child: None,
            starts: 0,
        };
        process.launch();
        process
    }

    /// Start it again with the same arguments, once it has been stopped.
    pub fn relaunch(&mut self) {
        self.launch();
    }

    fn launch(&mut self) {
        assert!(self.child.is_none(), "{} is already running", self.name);
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("open the log file");
        self.log_from = out.metadata().map(|m| m.len()).unwrap_or(0);
        let child = Command::new(&self.program)
            .args(&self.args)
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .current_dir(self.log.parent().expect("log directory"))
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("clone the log file"))
            .stderr(out)
            .spawn()
            .unwrap_or_else(|e| panic!("start {}: {e}", self.name));
        self.child = Some(child);
        self.starts += 1;
    }

    /// Its arguments.
    pub fn args(&self) -> &[String] {
        &self.args
    }

    /// Other arguments for the next start.
    pub fn set_args(&mut self, args: Vec<String>) {
        self.args = args;
    }

    /// The process id of the running process.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("the process is running").id()
    }

    /// Whether the process is running.
    pub fn is_running(&mut self) -> bool {
        self.exit_status().is_none() && self.child.is_some()
    }

    /// How it exited, if it has.
    pub fn exit_status(&mut self) -> Option<ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
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
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// `kill -TERM <pid>`, and wait (at most 15 s) for it to exit; returns whether it exited
    /// with status 0.
    pub async fn terminate(&mut self) -> bool {
        self.signal("-TERM");
        let mut child = self.child.take().expect("the process is running");
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

    /// Everything it logged, over every start.
    pub fn log_text(&self) -> String {
        self.log_text_from(0)
    }

    fn log_text_from(&self, offset: u64) -> String {
        let mut text = String::new();
        if let Ok(mut file) = std::fs::File::open(&self.log) {
            let _ = file.seek(SeekFrom::Start(offset));
            let _ = file.read_to_string(&mut text);
        }
        text
    }

    /// The last `n` lines of its log, for an error message.
    pub fn log_tail(&self, n: usize) -> String {
        let text = self.log_text();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// Log lines that contain every one of `needles`.
    pub fn log_count(&self, needles: &[&str]) -> usize {
        self.log_text()
            .lines()
            .filter(|line| needles.iter().all(|n| line.contains(n)))
            .count()
    }

    /// Wait (at most `limit`) until the current run has logged a line that contains every one
    /// of `needles`, and return it. Fails the test, with the log, if the process exits first
    /// or nothing comes.
    pub async fn wait_line(&mut self, needles: &[&str], limit: Duration) -> String {
        let deadline = Instant::now() + limit;
        loop {
            let text = self.log_text_from(self.log_from);
            // Only whole lines: the last one may still be being written.
            let whole = text.rsplit_once('\n').map_or("", |(done, _)| done);
            if let Some(line) = whole
                .lines()
                .find(|line| needles.iter().all(|n| line.contains(n)))
            {
                return line.to_string();
            }
            if let Some(status) = self.exit_status() {
                panic!(
                    "{} exited with {status} before it logged {needles:?}; its log:\n{}",
                    self.name,
                    self.log_text()
                );
            }
            assert!(
                Instant::now() < deadline,
                "{} did not log {needles:?} within {limit:?}; its log:\n{}",
                self.name,
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
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

    /// Whether the process has `path` open: one of its `/proc/<pid>/fd` links points to it
    /// (`path` as the kernel shows it: absolute, symbolic links resolved).
    pub fn has_open(&self, path: &Path) -> bool {
        open_paths(self.pid()).iter().any(|p| p == path)
    }

    /// Mark its memory now, to measure how much more it takes from here on
    /// ([`MemoryMark::growth_kib`]).
    pub fn memory_mark(&self) -> MemoryMark {
        MemoryMark::of(self.pid())
    }
}

/// What the `/proc/<pid>/fd` links of `pid` point to.
pub fn open_paths(pid: u32) -> Vec<PathBuf> {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return Vec::new();
    };
    dir.filter_map(|entry| std::fs::read_link(entry.ok()?.path()).ok())
        .collect()
}

/// The resident memory of a process at a point in time, to measure its growth from there: the
/// peak resident memory later (`VmHWM`) less the resident memory then (`VmRSS`).
///
/// Taking the mark resets the process's peak to its current resident memory (`5` written to
/// `/proc/<pid>/clear_refs`), so a peak reached before the mark (at start-up, say) is not
/// counted. Where the kernel refuses that, the old peak stays and the growth is overstated,
/// never understated.
#[derive(Clone, Copy, Debug)]
pub struct MemoryMark {
    pid: u32,
    /// `VmRSS` at the mark, KiB.
    pub rss_kib: u64,
    /// Whether the peak was reset at the mark.
    pub peak_reset: bool,
}

impl MemoryMark {
    /// Mark the process `pid` now.
    pub fn of(pid: u32) -> MemoryMark {
        let peak_reset = std::fs::write(format!("/proc/{pid}/clear_refs"), "5").is_ok();
        MemoryMark {
            pid,
            rss_kib: proc_status(pid, "VmRSS"),
            peak_reset,
        }
    }

    /// The peak resident memory since the mark less the resident memory at the mark, KiB.
    pub fn growth_kib(&self) -> u64 {
        proc_status(self.pid, "VmHWM").saturating_sub(self.rss_kib)
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill();
        if std::env::var_os("RESTPIPE_TEST_LOG").is_some() {
            eprintln!("---- log of {} ----\n{}", self.name, self.log_text());
        }
    }
}

/// A `kB` field of `/proc/<pid>/status`; 0 if it cannot be read.
pub fn proc_status(pid: u32, field: &str) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    text.lines()
        .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// CPU time of `pid` so far, user plus system (`/proc/<pid>/stat`), with `ticks_per_s` clock
/// ticks per second ([`clock_ticks`]); `None` if it cannot be read.
pub fn cpu_time(pid: u32, ticks_per_s: f64) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let after = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = after.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line: 12 and 13 after ')'.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(Duration::from_secs_f64(
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

// ----------------------------------------------------------------------------------------
// restpipe nodes

/// A `restpipe server` process with the dev set's server certificate, on port 0, with `extra`
/// flags. Returns the node and its pipe port.
pub async fn start_server(certs: &Certs, extra: &[&str]) -> (Node, u16) {
    let node = Node::start(certs.dir(), "server", server_args(certs, extra)).await;
    let port = node.pipe_addr().port();
    (node, port)
}

/// The flags of a server node: pipe on `127.0.0.1` port 0, HTTP on `127.0.0.1:0`, the dev
/// set's server certificate, metrics off unless `extra` holds `--statsd-host`. `extra` is
/// appended; clap refuses a flag given twice, so it must not repeat one set here.
pub fn server_args(certs: &Certs, extra: &[&str]) -> Vec<String> {
    let p = &certs.paths;
    let mut args: Vec<String> = vec![
        "server".into(),
        "--bind-interface".into(),
        "127.0.0.1".into(),
        "--bind-port".into(),
        "0".into(),
        "--http".into(),
        loopback(0).to_string(),
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
/// `localhost`), HTTP on `127.0.0.1:0`, metrics off unless `extra` sets them.
pub fn client_args(
    certs: &Certs,
    cert: &CertFiles,
    server: SocketAddr,
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
        loopback(0).to_string(),
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

/// A `restpipe` node process: a [`Process`] (which it dereferences to) with the addresses
/// it bound.
pub struct Node {
    process: Process,
    /// Its HTTP endpoint.
    pub http: SocketAddr,
    /// The pipe address of a server node.
    pipe: Option<SocketAddr>,
}

impl Node {
    /// Start `restpipe <args>` in `dir` (log `<dir>/<name>.log`) and wait until it prints
    /// [`READY_LINE`]; its HTTP address (and a server's pipe address) come from that line.
    /// The flags `--http` and `--bind-port` are then set to the bound addresses, so that a
    /// restart gets the same ports.
    pub async fn start(dir: &Path, name: &str, args: Vec<String>) -> Node {
        Node::start_bin(dir, name, &restpipe_bin(), args).await
    }

    /// [`Node::start`] with another `restpipe` binary, `program` (an older build, to compare
    /// against).
    pub async fn start_bin(dir: &Path, name: &str, program: &Path, args: Vec<String>) -> Node {
        let process = Process::spawn(dir, name, program, args);
        let mut node = Node {
            process,
            http: loopback(0),
            pipe: None,
        };
        node.await_ready().await;
        let http = node.http.to_string();
        set_flag(&mut node.process.args, "--http", &http);
        if let Some(pipe) = node.pipe {
            set_flag(
                &mut node.process.args,
                "--bind-port",
                &pipe.port().to_string(),
            );
        }
        node
    }

    async fn await_ready(&mut self) {
        let line = self.process.wait_line(&[READY_LINE], READY_WITHIN).await;
        let addr = |key: &str| -> Option<SocketAddr> {
            let value = log_field(&line, key)?;
            Some(value.parse().unwrap_or_else(|e| {
                panic!("{}: {key}={value} in {line:?}: {e}", self.process.name)
            }))
        };
        let http = addr("http").unwrap_or_else(|| panic!("no http= in {line:?}"));
        let pipe = addr("pipe").or_else(|| {
            // An older binary: the pipe address is on the line logged when it was bound,
            // before the ready line, in this run.
            let text = self.process.log_text_from(self.process.log_from);
            let bound = text.lines().find(|l| l.contains(PIPE_LINE))?;
            let value = log_field(bound, "addr")?;
            Some(value.parse().unwrap_or_else(|e| {
                panic!("{}: addr={value} in {bound:?}: {e}", self.process.name)
            }))
        });
        self.http = http;
        self.pipe = pipe;
    }

    /// Start it again with the same flags (same ports), once it has been stopped, and wait
    /// until it is ready.
    pub async fn restart(&mut self) {
        let (http, pipe) = (self.http, self.pipe);
        self.process.relaunch();
        self.await_ready().await;
        assert_eq!(
            (self.http, self.pipe),
            (http, pipe),
            "{} came back on other ports",
            self.process.name
        );
    }

    /// The pipe address of a server node, as it printed it.
    pub fn pipe_addr(&self) -> SocketAddr {
        self.pipe
            .unwrap_or_else(|| panic!("{} is not a server node", self.process.name))
    }

    /// `http://<its HTTP endpoint><path>`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.http, path)
    }
}

impl Deref for Node {
    type Target = Process;

    fn deref(&self) -> &Process {
        &self.process
    }
}

impl DerefMut for Node {
    fn deref_mut(&mut self) -> &mut Process {
        &mut self.process
    }
}

/// Set the value that follows `flag` in `args` (the flag must be there).
fn set_flag(args: &mut [String], flag: &str, value: &str) {
    let at = args
        .iter()
        .position(|a| a == flag)
        .unwrap_or_else(|| panic!("no {flag} in {args:?}"));
    args[at + 1] = value.to_string();
}
