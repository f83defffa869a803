//! HTTP for tests: a client that ignores proxies, bounded `GET`s, and [`Load`]: workers that
//! send requests until stopped and tally every answer by kind, each request bounded by an
//! outer timeout that counts it as hung.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::task::JoinHandle;

use crate::procs::Node;

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

impl LoadSpec {
    /// Load through both directions of one client: `client` calls the server's `time`, and
    /// `server` calls the client `identity`'s; two workers, a 5 s deadline per request,
    /// `outer` before a request counts as hung, `pause` between a worker's requests.
    pub fn both_ways(
        client: &crate::procs::Node,
        server: &crate::procs::Node,
        identity: &str,
        outer: Duration,
        pause: Duration,
    ) -> LoadSpec {
        LoadSpec {
            urls: vec![
                client.url("/server/time"),
                server.url(&format!("/client/{identity}/time")),
            ],
            workers: 2,
            timeout_ms: 5000,
            outer,
            pause,
        }
    }
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

    /// Whether no request was recorded yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
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
