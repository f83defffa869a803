//! A real `nats-server` for the cluster tests: found as `$NATS_SERVER` or on `PATH` (also
//! `/usr/sbin`, where the Debian package puts it), started on `127.0.0.1` on a port it picks
//! itself (`-p -1`, read back from its log), stopped on drop.
//!
//! Without the binary, [`NatsServer::start`] returns `None` after printing why, so that a
//! test can skip on a developer's machine; with `CI=true` it fails the test instead: CI
//! installs it (`.ci/run`), and a cluster test that silently skips there would prove nothing.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::procs::Process;

/// What nats-server logs once it takes clients, followed by the address.
const LISTENING: &str = "Listening for client connections on";

/// The nats-server binary: `$NATS_SERVER`, else `nats-server` on `PATH` or in `/usr/sbin`.
pub fn nats_server_bin() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("NATS_SERVER") {
        let path = PathBuf::from(path);
        return path.exists().then_some(path);
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/usr/local/bin")])
        .map(|dir| dir.join("nats-server"))
        .find(|p| p.is_file())
}

/// A running nats-server.
pub struct NatsServer {
    process: Process,
    /// The port it takes clients on, on 127.0.0.1.
    pub port: u16,
}

impl NatsServer {
    /// Start one in `dir` (log `<dir>/nats.log`) on a port of its choosing. `None` (with the
    /// reason printed) when there is no binary and `CI` is not `true`.
    pub async fn start(dir: &Path) -> Option<NatsServer> {
        let Some(bin) = nats_server_bin() else {
            let why = "no nats-server: set NATS_SERVER or install it (`apt-get install nats-server`, as .ci/run does)";
            if std::env::var("CI").is_ok_and(|v| v == "true") {
                panic!("{why}; CI=true, so the cluster tests must not skip");
            }
            eprintln!("skipped: {why}");
            return None;
        };
        let args = ["-a", "127.0.0.1", "-p", "-1"].map(String::from).to_vec();
        let mut process = Process::spawn(dir, "nats", &bin, args);
        let line = process
            .wait_line(&[LISTENING], Duration::from_secs(20))
            .await;
        let port: u16 = line
            .rsplit(':')
            .next()
            .and_then(|p| p.trim().parse().ok())
            .unwrap_or_else(|| panic!("no port in {line:?}"));
        // A restart takes the same port, so that the replicas find it again.
        let mut args: Vec<String> = process.args().to_vec();
        if let Some(at) = args.iter().position(|a| a == "-1") {
            args[at] = port.to_string();
        }
        let mut server = NatsServer { process, port };
        server.set_args(args);
        Some(server)
    }

    fn set_args(&mut self, args: Vec<String>) {
        self.process.set_args(args);
    }

    /// The nats-server process (its pid, memory).
    pub fn process(&self) -> &Process {
        &self.process
    }

    /// `nats://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Stop it (SIGKILL).
    pub fn stop(&mut self) {
        self.process.kill();
    }

    /// Start it again on the same port, and wait until it takes clients.
    pub async fn restart(&mut self) {
        self.process.relaunch();
        self.process
            .wait_line(&[LISTENING], Duration::from_secs(20))
            .await;
    }
}
