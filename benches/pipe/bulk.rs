//! Bulk transfers: a file fetched through the pipe (`GET /client/dev-client/file//<name>` on
//! the server node, served by the client node's `files` handlers) or through the HTTP/2 pair
//! (`GET /file/<name>` on its front door), against the same number of bytes copied over a
//! plain rustls connection on loopback with the same certificates.

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use hyper::StatusCode;
use restpipe::tls::{TlsFiles, TlsMaterial};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::load;
use restpipe_testkit::certs::Certs as Workdir;

/// From this size up a transfer is "large": it takes long enough to be measured alone, so
/// it has no warm-up transfer and one transfer may fill the window.
pub const LARGE: usize = 256 * 1024 * 1024;

/// Whether a transfer of `size` bytes gets an unmeasured warm-up transfer first, and the
/// fewest measured transfers.
fn reps(size: usize, min_reps: usize) -> (bool, usize) {
    if size >= LARGE {
        (false, 1)
    } else {
        (true, min_reps)
    }
}

/// `1 MiB`, `1 GiB`, `512 KiB`.
pub fn size_label(size: usize) -> String {
    const KIB: usize = 1024;
    const MIB: usize = KIB * KIB;
    const GIB: usize = MIB * KIB;
    if size >= GIB && size % GIB == 0 {
        format!("{} GiB", size / GIB)
    } else if size >= MIB && size % MIB == 0 {
        format!("{} MiB", size / MIB)
    } else {
        format!("{} KiB", size / KIB)
    }
}

/// The name of the bulk file of `size` bytes.
pub fn file_name(size: usize) -> String {
    format!("bulk-{}k.bin", size / 1024)
}

/// The bulk files in the scratch directory, deleted when dropped (a large one is 1 GiB).
pub struct Files {
    /// `<scratch>/files`.
    pub dir: PathBuf,
    written: Vec<PathBuf>,
}

impl Drop for Files {
    fn drop(&mut self) {
        for path in &self.written {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Write the bulk files into `<dir>/files`: bytes `i % 251`, written from one buffer of
/// about 1 MiB (a whole number of periods) as many times as needed.
pub fn write_files(work: &Workdir, sizes: &[usize]) -> anyhow::Result<Files> {
    const PERIOD: usize = 251;
    let dir = work.dir().join("files");
    std::fs::create_dir_all(&dir)?;
    let mut files = Files {
        dir: dir.clone(),
        written: Vec::new(),
    };
    let chunk: Vec<u8> = (0..PERIOD * 4096).map(|i| (i % PERIOD) as u8).collect();
    for &size in sizes {
        let path = dir.join(file_name(size));
        let mut file =
            std::fs::File::create(&path).with_context(|| format!("creating {}", path.display()))?;
        files.written.push(path.clone());
        let mut left = size;
        while left > 0 {
            let n = left.min(chunk.len());
            file.write_all(&chunk[..n])
                .with_context(|| format!("writing {}", path.display()))?;
            left -= n;
        }
    }
    Ok(files)
}

/// The path of the bulk file of `size` bytes on the server node (served by the client
/// node's `files` handlers).
pub fn pipe_path(size: usize) -> String {
    format!("/client/dev-client/file//{}", file_name(size))
}

/// How many calls [`calls_beside`] makes on the idle pipe (as many as the fairness test).
pub const BESIDE_CALLS: usize = 200;

/// The client node's `get_time`, through the server node: the small call of [`calls_beside`].
pub const TIME_PATH: &str = "/client/dev-client/time";

/// Small calls beside one large transfer on the same pipe, one run (see [`calls_beside`]).
#[derive(Clone, Copy, Debug)]
pub struct Beside {
    /// Bytes of the transfer.
    pub size: usize,
    /// p99 of the calls on the idle pipe, in µs.
    pub idle_p99_us: f64,
    /// p99 of the calls made while the transfer ran, in µs (NaN when none was).
    pub busy_p99_us: f64,
    /// How many calls were made while the transfer ran.
    pub busy_calls: usize,
    /// MB/s of the transfer, calls and all.
    pub mb_per_s: f64,
}

/// `calls` sequential `GET` [`TIME_PATH`] through the pipe at `http` on an idle pipe; then,
/// on the same keep-alive connection, as many as fit while the bulk file of `size` bytes
/// crosses the same pipe, fetched on a second connection, from its request to its last byte.
/// Their replies travel the way the file's bytes do, so they wait behind what of it is in
/// flight.
pub async fn calls_beside(http: SocketAddr, size: usize, calls: usize) -> anyhow::Result<Beside> {
    let mut conn = load::connect(http).await?;
    let mut idle = Vec::with_capacity(calls);
    for _ in 0..calls {
        idle.push(timed_call(&mut conn).await?);
    }
    let mut fetcher = load::connect(http).await?;
    let path = pipe_path(size);
    let started = Instant::now();
    let transfer = tokio::spawn(async move {
        let got = load::get(&mut fetcher, &path, false).await;
        got.map(|got| (got, started.elapsed()))
    });
    let mut busy = Vec::new();
    while !transfer.is_finished() {
        busy.push(timed_call(&mut conn).await?);
    }
    let ((status, read), took) = transfer.await.context("the transfer's task")??;
    if status != StatusCode::OK || read != size {
        bail!("GET {}: {status}, {read} of {size} bytes", pipe_path(size));
    }
    let p99 = |values: &mut Vec<f64>| {
        values.sort_by(f64::total_cmp);
        crate::scale::quantile(values, 0.99)
    };
    Ok(Beside {
        size,
        idle_p99_us: p99(&mut idle),
        busy_p99_us: p99(&mut busy),
        busy_calls: busy.len(),
        mb_per_s: mb_per_s(size, took),
    })
}

/// One `GET` [`TIME_PATH`] on `conn`: its latency in µs.
async fn timed_call(conn: &mut load::Conn) -> anyhow::Result<f64> {
    let at = Instant::now();
    let (status, _) = load::get(conn, TIME_PATH, false).await?;
    if status != StatusCode::OK {
        bail!("GET {TIME_PATH}: {status}");
    }
    Ok(at.elapsed().as_secs_f64() * 1e6)
}

/// What [`fetch`] and [`rustls`] measured.
#[derive(Clone, Copy, Debug)]
pub struct Fetched {
    /// MB/s (10^6 bytes per second) of the measured transfers.
    pub mb_per_s: f64,
    /// CPU seconds per GB (10^9 bytes) of the serving processes, over every transfer
    /// (the warm-up one too).
    pub cpu_s_per_gb: f64,
    /// CPU seconds per GB of this process, the receiving end (the load generator's HTTP
    /// client, or the plain copy's TLS client), over the same transfers.
    pub receiver_cpu_s_per_gb: f64,
}

/// CPU seconds of the processes `pids` together, and of this process.
struct CpuClock {
    pids: Vec<u32>,
    ticks: f64,
    start: (f64, f64),
}

impl CpuClock {
    fn start(pids: &[u32]) -> anyhow::Result<CpuClock> {
        let mut clock = CpuClock {
            pids: pids.to_vec(),
            ticks: restpipe_testkit::procs::clock_ticks(),
            start: (0.0, 0.0),
        };
        clock.start = clock.now()?;
        Ok(clock)
    }

    fn now(&self) -> anyhow::Result<(f64, f64)> {
        let mut serving = 0.0;
        for &pid in &self.pids {
            serving += crate::procs::cpu_time(pid, self.ticks)?.as_secs_f64();
        }
        let me = crate::procs::cpu_time(std::process::id(), self.ticks)?.as_secs_f64();
        Ok((serving, me))
    }

    /// What was measured, `moved` bytes in all, `measured` of them in `took`.
    fn finish(&self, moved: usize, measured: usize, took: Duration) -> anyhow::Result<Fetched> {
        let (serving, me) = self.now()?;
        let gb = moved as f64 / 1e9;
        Ok(Fetched {
            mb_per_s: mb_per_s(measured, took),
            cpu_s_per_gb: (serving - self.start.0) / gb,
            receiver_cpu_s_per_gb: (me - self.start.1) / gb,
        })
    }
}

/// Fetch `path` (`size` bytes) from `http` repeatedly for about `window` (at least
/// `min_reps` times; once for a large size), on one keep-alive HTTP/1.1 connection of the
/// load generator, and say how fast and at what CPU cost to the processes `pids` (the two
/// serving processes) and to this one. `None` if the first answer is 413 (the file is over
/// what the server serves: 15/16 of the pipe's frame limit, before streamed bodies).
pub async fn fetch(
    http: SocketAddr,
    path: &str,
    size: usize,
    (window, min_reps): (Duration, usize),
    pids: &[u32],
) -> anyhow::Result<Option<Fetched>> {
    let clock = CpuClock::start(pids)?;
    let mut moved = 0usize;
    let (warm, min_reps) = reps(size, min_reps);
    let mut sender = load::connect(http).await?;
    let mut total = Duration::ZERO;
    let mut reps = 0usize;
    // The warm-up transfer is not measured: it warms the page cache and the allocators.
    for measured in std::iter::once(!warm).chain(std::iter::repeat(true)) {
        if measured && reps >= min_reps && total >= window {
            break;
        }
        let started = Instant::now();
        let (status, read) = load::get(&mut sender, path, false).await?;
        if status == StatusCode::PAYLOAD_TOO_LARGE && reps == 0 {
            return Ok(None);
        }
        if status != StatusCode::OK || read != size {
            bail!("GET {path}: {status}, {read} of {size} bytes");
        }
        moved += read;
        if measured {
            total += started.elapsed();
            reps += 1;
        }
    }
    clock.finish(moved, size * reps, total).map(Some)
}

/// Ask the copy server (process `pid`) for `size` bytes repeatedly, on one TLS connection
/// (as often as [`fetch`]): how fast, and at what CPU cost to each end.
pub async fn rustls(
    work: &Workdir,
    (addr, pid): (SocketAddr, u32),
    size: usize,
    window: Duration,
    min_reps: usize,
) -> anyhow::Result<Fetched> {
    let mut stream = connect(work, addr).await?;
    let clock = CpuClock::start(&[pid])?;
    let (warm, min_reps) = reps(size, min_reps);
    let mut buf = vec![0u8; 256 * 1024];
    let mut total = Duration::ZERO;
    let mut reps = 0usize;
    let mut moved = 0usize;
    for measured in std::iter::once(!warm).chain(std::iter::repeat(true)) {
        if measured && reps >= min_reps && total >= window {
            break;
        }
        let started = Instant::now();
        copy_once(&mut stream, size, &mut buf).await?;
        moved += size;
        if measured {
            total += started.elapsed();
            reps += 1;
        }
    }
    clock.finish(moved, size * reps, total)
}

/// A TLS connection to the copy server, with the client certificate of the pipe's nodes.
async fn connect(
    work: &Workdir,
    addr: SocketAddr,
) -> anyhow::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let certs = &work.paths;
    let tls = TlsMaterial::from_files(&TlsFiles {
        ca: certs.ca_cert.clone(),
        cert: certs.client_cert.clone(),
        key: certs.client_key.clone(),
        ..TlsFiles::default()
    })?;
    let tcp = TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    let name = ServerName::try_from("localhost").context("server name")?;
    Ok(tls.connector()?.connect(name, tcp).await?)
}

/// The floor of what the pipe adds to one request: the p50 round trip, in µs, of one small
/// TLS record each way (an 8-byte ask, a 64-byte answer) between this process and the copy
/// server, one exchange at a time for `window` after as long a warm-up as `warmup`.
pub async fn round_trip_p50(
    work: &Workdir,
    addr: SocketAddr,
    (warmup, window): (Duration, Duration),
) -> anyhow::Result<f64> {
    let mut stream = connect(work, addr).await?;
    let mut buf = vec![0u8; 1024];
    let started = Instant::now();
    while started.elapsed() < warmup {
        copy_once(&mut stream, 64, &mut buf).await?;
    }
    let mut micros = Vec::new();
    let started = Instant::now();
    while started.elapsed() < window {
        let one = Instant::now();
        copy_once(&mut stream, 64, &mut buf).await?;
        micros.push(one.elapsed().as_secs_f64() * 1e6);
    }
    micros.sort_by(f64::total_cmp);
    micros
        .get(micros.len() / 2)
        .copied()
        .context("no round trip in the window")
}

async fn copy_once(
    stream: &mut tokio_rustls::client::TlsStream<TcpStream>,
    size: usize,
    buf: &mut [u8],
) -> anyhow::Result<()> {
    stream.write_u64(size as u64).await?;
    stream.flush().await?;
    let mut left = size;
    while left > 0 {
        let want = left.min(buf.len());
        let n = stream.read(&mut buf[..want]).await?;
        if n == 0 {
            bail!("the copy server hung up");
        }
        left -= n;
    }
    Ok(())
}

fn mb_per_s(bytes: usize, took: Duration) -> f64 {
    bytes as f64 / took.as_secs_f64() / 1e6
}
