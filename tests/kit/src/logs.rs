//! Captures the log lines of the test binary, so that a test can check what was logged.

use std::io;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use crate::wait::wait_until;

/// The log lines of this test binary, captured from the moment [`logs`] was first called.
#[derive(Clone)]
pub struct Logs {
    buf: Arc<Mutex<Vec<u8>>>,
}

impl Logs {
    /// Every line captured so far.
    pub fn lines(&self) -> Vec<String> {
        let buf = self.buf.lock().unwrap_or_else(|p| p.into_inner());
        String::from_utf8_lossy(&buf)
            .lines()
            .map(str::to_string)
            .collect()
    }

    /// Whether one captured line contains every one of `needles`.
    pub fn has_line(&self, needles: &[&str]) -> bool {
        self.lines()
            .iter()
            .any(|line| needles.iter().all(|n| line.contains(n)))
    }

    /// Wait (at most 5 s) for a line that contains every one of `needles`.
    pub async fn wait_for_line(&self, needles: &[&str]) -> bool {
        wait_until(Duration::from_secs(5), || self.has_line(needles)).await
    }
}

struct LogWriter {
    buf: Arc<Mutex<Vec<u8>>>,
    echo: bool,
}

impl io::Write for LogWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.buf
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend_from_slice(data);
        if self.echo {
            io::stderr().write_all(data)?;
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Start capturing the log lines of this test binary (once; later calls share the capture).
/// Level `info`, or `RUST_LOG`. With `RESTPIPE_TEST_LOG=1` the lines also go to stderr.
pub fn logs() -> Logs {
    static LOGS: OnceLock<Logs> = OnceLock::new();
    LOGS.get_or_init(|| {
        let buf: Arc<Mutex<Vec<u8>>> = Arc::default();
        let echo = std::env::var_os("RESTPIPE_TEST_LOG").is_some();
        let writer_buf = buf.clone();
        let filter = tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_ansi(false)
            .with_writer(move || LogWriter {
                buf: writer_buf.clone(),
                echo,
            })
            .try_init();
        Logs { buf }
    })
    .clone()
}
