//! A UDP socket on 127.0.0.1 standing in for statsd: it receives every datagram a node sends,
//! counts them and (unless made with [`Statsd::counting`]) keeps every line, so that a test
//! can wait for a line, sum counters, or check that every line is well formed.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// How long [`Statsd::expect`] waits for a line: a node's sink sends its buffer at least
/// every second.
pub const ARRIVAL: Duration = Duration::from_secs(10);

#[derive(Default)]
struct Received {
    lines: Vec<String>,
    /// Lines before this index are forgotten by [`Statsd::expect`].
    from: usize,
}

/// The statsd stand-in. Stops receiving when dropped.
pub struct Statsd {
    port: u16,
    received: Arc<Mutex<Received>>,
    /// How many lines were kept so far; changes wake [`Statsd::expect`].
    kept: watch::Receiver<usize>,
    datagrams: Arc<AtomicU64>,
    not_utf8: Arc<AtomicU64>,
    task: JoinHandle<()>,
}

impl Statsd {
    /// Bind `127.0.0.1:0` and receive, keeping every line.
    pub async fn start() -> Statsd {
        Statsd::bind(true).await
    }

    /// Bind `127.0.0.1:0` and receive, only counting datagrams (for a load that sends a lot
    /// of metrics: nothing is kept).
    pub async fn counting() -> Statsd {
        Statsd::bind(false).await
    }

    async fn bind(keep: bool) -> Statsd {
        let socket = tokio::net::UdpSocket::bind("127.0.0.1:0")
            .await
            .expect("bind statsd");
        let port = socket.local_addr().expect("statsd address").port();
        let received: Arc<Mutex<Received>> = Arc::default();
        let datagrams = Arc::new(AtomicU64::new(0));
        let not_utf8 = Arc::new(AtomicU64::new(0));
        let (kept_tx, kept) = watch::channel(0);
        let task = tokio::spawn({
            let (received, datagrams, not_utf8) =
                (received.clone(), datagrams.clone(), not_utf8.clone());
            async move {
                let mut buf = vec![0u8; 64 * 1024];
                while let Ok(n) = socket.recv(&mut buf).await {
                    datagrams.fetch_add(1, Ordering::Relaxed);
                    if !keep {
                        continue;
                    }
                    let text = match std::str::from_utf8(&buf[..n]) {
                        Ok(text) => text,
                        Err(_) => {
                            not_utf8.fetch_add(1, Ordering::Relaxed);
                            continue;
                        }
                    };
                    let mut received = received.lock().unwrap_or_else(|p| p.into_inner());
                    received
                        .lines
                        .extend(text.lines().filter(|l| !l.is_empty()).map(str::to_string));
                    kept_tx.send_replace(received.lines.len());
                }
            }
        });
        Statsd {
            port,
            received,
            kept,
            datagrams,
            not_utf8,
            task,
        }
    }

    /// The UDP port it listens on, on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The flags that send a `restpipe` process's metrics here.
    pub fn flags(&self) -> [String; 4] {
        [
            "--statsd-host".into(),
            "127.0.0.1".into(),
            "--statsd-port".into(),
            self.port.to_string(),
        ]
    }

    /// Datagrams received so far.
    pub fn datagrams(&self) -> u64 {
        self.datagrams.load(Ordering::Relaxed)
    }

    /// Every line kept so far.
    pub fn lines(&self) -> Vec<String> {
        self.received
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .lines
            .clone()
    }

    /// The sum of the counter `restpipe.<name>` received so far.
    pub fn counter(&self, name: &str) -> u64 {
        let prefix = format!("restpipe.{name}:");
        self.received
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .lines
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
        let received = self.received.lock().unwrap_or_else(|p| p.into_inner());
        for line in &received.lines {
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

    /// From now on, [`Statsd::expect`] looks only at lines that arrive later.
    pub fn forget(&self) {
        let mut received = self.received.lock().unwrap_or_else(|p| p.into_inner());
        received.from = received.lines.len();
    }

    /// Wait (at most [`ARRIVAL`]) for a line that `matches` and return it. Fails the test,
    /// listing the lines seen, if none comes, or if a datagram was not UTF-8.
    pub async fn expect(&self, what: &str, matches: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + ARRIVAL;
        let mut kept = self.kept.clone();
        loop {
            self.assert_utf8();
            {
                let received = self.received.lock().unwrap_or_else(|p| p.into_inner());
                if let Some(line) = received.lines[received.from..].iter().find(|l| matches(l)) {
                    return line.clone();
                }
            }
            match tokio::time::timeout_at(deadline, kept.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => panic!("the statsd socket stopped receiving"),
                Err(_) => {
                    let received = self.received.lock().unwrap_or_else(|p| p.into_inner());
                    panic!(
                        "statsd never received {what} within {ARRIVAL:?}; it received:\n{}",
                        received.lines[received.from..].join("\n")
                    )
                }
            }
        }
    }

    /// Wait for exactly `line`.
    pub async fn expect_line(&self, line: &str) {
        self.expect(line, |l| l == line).await;
    }

    /// Wait for a count `name:<n>|c` (a node sends the ticks of a name that it drains at once
    /// as one line); return `n`.
    pub async fn expect_count(&self, name: &str) -> u64 {
        let line = self
            .expect(&format!("{name}:<n>|c"), |l| count_of(l, name).is_some())
            .await;
        count_of(&line, name).expect("a count")
    }

    /// Wait for a timing `name:<ms>|ms`; return the milliseconds.
    pub async fn expect_timing(&self, name: &str) -> u64 {
        let line = self
            .expect(&format!("{name}:<ms>|ms"), |l| timing_of(l, name).is_some())
            .await;
        timing_of(&line, name).expect("a timing")
    }

    /// Every line received is `restpipe.<name>:<value>|<c, ms or g>`, and every datagram
    /// was UTF-8.
    pub fn assert_all_well_formed(&self) {
        self.assert_utf8();
        for line in &self.lines() {
            let (name, rest) = line.split_once(':').expect("name:value|type");
            let (value, kind) = rest.split_once('|').expect("name:value|type");
            assert!(name.starts_with("restpipe."), "{line}");
            assert!(
                name.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c)),
                "{line}"
            );
            assert!(value.parse::<u64>().is_ok(), "{line}");
            assert!(["c", "ms", "g"].contains(&kind), "{line}");
        }
    }

    fn assert_utf8(&self) {
        let bad = self.not_utf8.load(Ordering::Relaxed);
        assert_eq!(bad, 0, "statsd lines are UTF-8: {bad} datagrams were not");
    }
}

impl Drop for Statsd {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The count of `line` if it is the count `name`, one or more.
pub fn count_of(line: &str, name: &str) -> Option<u64> {
    line.strip_prefix(name)?
        .strip_prefix(':')?
        .strip_suffix("|c")?
        .parse()
        .ok()
        .filter(|&n| n >= 1)
}

/// The milliseconds of `line` if it is the timing `name`.
pub fn timing_of(line: &str, name: &str) -> Option<u64> {
    line.strip_prefix(name)?
        .strip_prefix(':')?
        .strip_suffix("|ms")?
        .parse()
        .ok()
}
