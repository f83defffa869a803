//! The load generator: closed-loop HTTP/1.1 clients on hyper's low-level connection API, one
//! task per connection, every latency recorded in an HDR histogram.
//!
//! The same code drives the bare baseline server and the nodes, so the two differ only in
//! what answers. Every request carries `Host: <the address dialled>` (`127.0.0.1:port`), as
//! a browser would: the nodes' front door refuses a request whose `Host` is not loopback. An
//! answer other than 200 (or the status a [`Call`] expects) is counted apart from I/O errors ([`Sample::refused`]), so that a
//! caller can refuse figures made of refusals.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use bytes::Bytes;
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Empty, Full};
use hyper::client::conn::http1::{self, SendRequest};
use hyper::header::{HeaderName, HeaderValue};
use hyper::header::{CONNECTION, HOST};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::sync::Barrier;

/// Latencies are recorded in nanoseconds, up to a minute.
const MAX_NS: u64 = 60_000_000_000;

/// How each connection is used.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConnMode {
    /// One TCP connection per worker, many requests on it.
    KeepAlive,
    /// A new TCP connection per request, `Connection: close`.
    Close,
}

/// What one measurement saw.
pub struct Sample {
    /// Requests completed inside the window.
    pub requests: u64,
    /// Requests that failed (I/O error or a status other than the one expected, 200 unless
    /// the [`Call`] says otherwise), inside or outside it.
    pub errors: u64,
    /// Of the `errors`, those answered with another status, and the last such status.
    pub refused: (u64, Option<StatusCode>),
    /// The window's length.
    pub window: Duration,
    /// Latencies of the requests inside the window, ns.
    pub hist: Histogram<u64>,
    /// CPU time (user + system) of the serving processes over the window, if asked for.
    pub cpu: Option<Duration>,
    /// CPU time of the load generator (this process) over the same window, if asked for.
    pub load_cpu: Option<Duration>,
}

impl Sample {
    /// Requests per second.
    pub fn rps(&self) -> f64 {
        self.requests as f64 / self.window.as_secs_f64()
    }

    /// The latency at quantile `q`, in microseconds.
    pub fn micros(&self, q: f64) -> f64 {
        self.hist.value_at_quantile(q) as f64 / 1000.0
    }

    /// CPU microseconds of the serving processes per request; NaN if not measured.
    pub fn cpu_micros_per_request(&self) -> f64 {
        self.per_request(self.cpu)
    }

    /// CPU microseconds of the load generator per request; NaN if not measured.
    pub fn load_cpu_micros_per_request(&self) -> f64 {
        self.per_request(self.load_cpu)
    }

    /// `cpu` in microseconds per request answered; NaN if not measured.
    fn per_request(&self, cpu: Option<Duration>) -> f64 {
        match cpu {
            Some(cpu) if self.requests > 0 => cpu.as_secs_f64() * 1e6 / self.requests as f64,
            _ => f64::NAN,
        }
    }
}

/// CPU time (user + system) of `pids` together so far; `None` if one cannot be read or
/// there is none.
fn cpu_of(pids: &[u32], ticks: f64) -> Option<Duration> {
    if pids.is_empty() {
        return None;
    }
    pids.iter()
        .map(|&pid| restpipe_testkit::procs::cpu_time(pid, ticks))
        .sum()
}

fn histogram() -> Histogram<u64> {
    // Bounds are constants that hdrhistogram accepts.
    Histogram::new_with_bounds(1, MAX_NS, 3).unwrap_or_else(|_| unreachable!())
}

/// What each request of a load is: its method, the headers it carries besides `Host`, and
/// the status that counts as answered (any other is an error, counted in
/// [`Sample::refused`]).
#[derive(Clone, Debug)]
pub struct Call {
    /// The method.
    pub method: Method,
    /// Headers besides `Host` (and `Connection: close` in [`ConnMode::Close`]).
    pub headers: Vec<(HeaderName, HeaderValue)>,
    /// The status of an answered request.
    pub expect: StatusCode,
}

impl Call {
    /// `GET`, no other header, 200.
    pub fn get() -> Call {
        Call {
            method: Method::GET,
            headers: Vec::new(),
            expect: StatusCode::OK,
        }
    }
}

/// An HTTP/1.1 connection whose requests have bodies of type `B`, and the `Host` they carry.
pub struct Conn<B = Empty<Bytes>> {
    sender: SendRequest<B>,
    host: String,
}

/// An HTTP/1.1 connection to `addr` (requests without a body).
pub async fn connect(addr: SocketAddr) -> anyhow::Result<Conn> {
    connect_with(addr).await
}

/// An HTTP/1.1 connection to `addr` whose requests carry bodies of type `B`.
pub async fn connect_with<B>(addr: SocketAddr) -> anyhow::Result<Conn<B>>
where
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let tcp = TcpStream::connect(addr)
        .await
        .with_context(|| format!("connect to {addr}"))?;
    tcp.set_nodelay(true)?;
    let (sender, conn) = http1::handshake(TokioIo::new(tcp)).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(Conn {
        sender,
        host: addr.to_string(),
    })
}

/// The request of `call` on `path`, with `Host: host`.
fn request(
    host: &str,
    path: &str,
    call: &Call,
    close: bool,
) -> anyhow::Result<Request<Empty<Bytes>>> {
    let mut request = Request::builder()
        .method(call.method.clone())
        .uri(path)
        .header(HOST, host);
    for (name, value) in &call.headers {
        request = request.header(name, value);
    }
    if close {
        request = request.header(CONNECTION, "close");
    }
    Ok(request.body(Empty::new())?)
}

/// `GET path` on `conn`; returns the status and the number of body bytes read.
pub async fn get(conn: &mut Conn, path: &str, close: bool) -> anyhow::Result<(StatusCode, usize)> {
    send(conn, path, &Call::get(), close).await
}

/// `call` on `path` on `conn`; returns the status and the number of body bytes read.
pub async fn send(
    conn: &mut Conn,
    path: &str,
    call: &Call,
    close: bool,
) -> anyhow::Result<(StatusCode, usize)> {
    let request = request(&conn.host, path, call, close)?;
    conn.sender.ready().await?;
    let response = conn.sender.send_request(request).await?;
    let status = response.status();
    let mut body = response.into_body();
    let mut read = 0;
    while let Some(frame) = body.frame().await {
        if let Some(data) = frame?.data_ref() {
            read += data.len();
        }
    }
    Ok((status, read))
}

/// `POST path` with `body` on `conn`; returns the status and the whole answer.
pub async fn post(
    conn: &mut Conn<Full<Bytes>>,
    path: &str,
    body: Bytes,
) -> anyhow::Result<(StatusCode, Bytes)> {
    let request = Request::builder()
        .method(Method::POST)
        .uri(path)
        .header(HOST, &conn.host)
        .body(Full::new(body))?;
    conn.sender.ready().await?;
    let response = conn.sender.send_request(request).await?;
    let status = response.status();
    let body = response.into_body().collect().await?.to_bytes();
    Ok((status, body))
}

/// `GET path` on a fresh connection, the whole body as bytes (for checks).
pub async fn fetch(addr: SocketAddr, path: &str) -> anyhow::Result<(StatusCode, Bytes)> {
    fetch_call(addr, path, &Call::get()).await
}

/// A node's `/status`, as JSON; an answer other than 200 is an error that quotes it.
pub async fn status_json(addr: SocketAddr) -> anyhow::Result<serde_json::Value> {
    let (status, body) = fetch(addr, "/status").await?;
    if status != StatusCode::OK {
        bail!(
            "/status answered {status}: {}",
            String::from_utf8_lossy(&body)
        );
    }
    serde_json::from_slice(&body).context("/status JSON")
}

/// `call` on `path` on a fresh connection, the whole body as bytes (for checks).
pub async fn fetch_call(
    addr: SocketAddr,
    path: &str,
    call: &Call,
) -> anyhow::Result<(StatusCode, Bytes)> {
    let mut conn = connect(addr).await?;
    let request = request(&conn.host, path, call, false)?;
    conn.sender.ready().await?;
    let response = conn.sender.send_request(request).await?;
    let status = response.status();
    let body = response.into_body().collect().await?.to_bytes();
    Ok((status, body))
}

/// Run `conns` closed-loop clients of `GET path` against `addr`: `warmup` unmeasured, then
/// `window` measured, with the CPU time the processes `pids` (those serving `addr`) spend
/// from the start of the window until the last request is answered.
pub async fn run(
    addr: SocketAddr,
    path: &str,
    conns: usize,
    mode: ConnMode,
    windows: (Duration, Duration),
    pids: &[u32],
) -> anyhow::Result<Sample> {
    run_call(addr, path, &Call::get(), conns, mode, windows, pids).await
}

/// [`run`] with requests of `call` rather than `GET`.
pub async fn run_call(
    addr: SocketAddr,
    path: &str,
    call: &Call,
    conns: usize,
    mode: ConnMode,
    (warmup, window): (Duration, Duration),
    pids: &[u32],
) -> anyhow::Result<Sample> {
    let barrier = Arc::new(Barrier::new(conns + 1));
    let path: Arc<str> = path.into();
    let call = Arc::new(call.clone());
    let mut workers = Vec::with_capacity(conns);
    for _ in 0..conns {
        let barrier = barrier.clone();
        let path = path.clone();
        let call = call.clone();
        workers.push(tokio::spawn(async move {
            worker(addr, &path, &call, mode, barrier, warmup, window).await
        }));
    }
    barrier.wait().await;
    let ticks = restpipe_testkit::procs::clock_ticks();
    tokio::time::sleep(warmup).await;
    let cpu_from = cpu_of(pids, ticks);
    // The load generator is this process: only its workers run during a window.
    let load = [std::process::id()];
    let load_from = cpu_of(if pids.is_empty() { &[] } else { &load }, ticks);
    let mut sample = Sample {
        requests: 0,
        errors: 0,
        refused: (0, None),
        window,
        hist: histogram(),
        cpu: None,
        load_cpu: None,
    };
    for worker in workers {
        let (requests, errors, refused, hist) = worker.await??;
        sample.requests += requests;
        sample.errors += errors;
        sample.refused.0 += refused.0;
        sample.refused.1 = refused.1.or(sample.refused.1);
        sample.hist.add(&hist)?;
    }
    sample.cpu = cpu_from
        .zip(cpu_of(pids, ticks))
        .map(|(from, to)| to.saturating_sub(from));
    sample.load_cpu = load_from
        .zip(cpu_of(&load, ticks))
        .map(|(from, to)| to.saturating_sub(from));
    if sample.requests == 0 {
        bail!(
            "no request to {addr}{path} completed ({} errors)",
            sample.errors
        );
    }
    Ok(sample)
}

async fn worker(
    addr: SocketAddr,
    path: &str,
    call: &Call,
    mode: ConnMode,
    barrier: Arc<Barrier>,
    warmup: Duration,
    window: Duration,
) -> anyhow::Result<(u64, u64, (u64, Option<StatusCode>), Histogram<u64>)> {
    let mut hist = histogram();
    let (mut requests, mut errors) = (0u64, 0u64);
    let mut refused: (u64, Option<StatusCode>) = (0, None);
    let connected = match mode {
        ConnMode::KeepAlive => Some(connect(addr).await),
        ConnMode::Close => None,
    };
    // Every worker reaches the barrier, connected or not: one that returned before it would
    // leave the others and the run waiting there for ever (a target that died between two
    // points refuses the connections). The failure is returned after it.
    barrier.wait().await;
    let mut sender = connected.transpose()?;
    let from = Instant::now() + warmup;
    let until = from + window;
    loop {
        let started = Instant::now();
        if started >= until {
            break;
        }
        let outcome = async {
            let mut conn = match sender.take() {
                Some(conn) => conn,
                None => connect(addr).await?,
            };
            let got = send(&mut conn, path, call, mode == ConnMode::Close).await?;
            if mode == ConnMode::KeepAlive {
                sender = Some(conn);
            }
            anyhow::Ok(got)
        }
        .await;
        let done = Instant::now();
        match outcome {
            Ok((status, _)) if status == call.expect && started >= from => {
                requests += 1;
                let ns = u64::try_from((done - started).as_nanos()).unwrap_or(MAX_NS);
                hist.saturating_record(ns.clamp(1, MAX_NS));
            }
            Ok((status, _)) if status == call.expect => {}
            _ => {
                errors += 1;
                if let Ok((status, _)) = &outcome {
                    refused = (refused.0 + 1, Some(*status));
                }
                if errors > 1000 && requests == 0 {
                    match outcome {
                        Ok((status, _)) => bail!("{addr}{path}: every request answered {status}"),
                        Err(e) => bail!("{addr}{path}: every request fails ({e:#})"),
                    }
                }
            }
        }
    }
    Ok((requests, errors, refused, hist))
}
