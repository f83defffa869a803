//! Bulk transfers: a file fetched through the pipe (`GET /client/dev-client/file//<name>` on
//! the server node, served by the client node's `files` handlers) against the same number of
//! bytes copied over a plain rustls connection on loopback with the same certificates.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use hyper::StatusCode;
use restpipe::tls::{TlsFiles, TlsMaterial};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::load;
use restpipe_testkit::certs::Certs as Workdir;

/// The name of the bulk file of `size` bytes.
pub fn file_name(size: usize) -> String {
    format!("bulk-{}k.bin", size / 1024)
}

/// Write the bulk files into `<dir>/files`, and return that directory.
pub fn write_files(work: &Workdir, sizes: &[usize]) -> anyhow::Result<std::path::PathBuf> {
    let dir = work.dir().join("files");
    std::fs::create_dir_all(&dir)?;
    for &size in sizes {
        let data: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
        std::fs::write(dir.join(file_name(size)), data)?;
    }
    Ok(dir)
}

/// MB/s (10^6 bytes per second) of fetching `size` bytes through the pipe repeatedly for
/// about `window` (at least `min_reps` times), on one keep-alive HTTP connection.
pub async fn pipe(
    server_http: SocketAddr,
    size: usize,
    window: Duration,
    min_reps: usize,
) -> anyhow::Result<f64> {
    let path = format!("/client/dev-client/file//{}", file_name(size));
    let mut sender = load::connect(server_http).await?;
    let mut total = Duration::ZERO;
    let mut reps = 0usize;
    // The first transfer is not measured: it warms the page cache and the allocators.
    for measured in std::iter::once(false).chain(std::iter::repeat(true)) {
        if measured && reps >= min_reps && total >= window {
            break;
        }
        let started = Instant::now();
        let (status, read) = load::get(&mut sender, &path, false).await?;
        if status != StatusCode::OK || read != size {
            bail!("GET {path}: {status}, {read} of {size} bytes");
        }
        if measured {
            total += started.elapsed();
            reps += 1;
        }
    }
    Ok(mb_per_s(size * reps, total))
}

/// MB/s of asking the copy server for `size` bytes repeatedly, on one TLS connection.
pub async fn rustls(
    work: &Workdir,
    addr: SocketAddr,
    size: usize,
    window: Duration,
    min_reps: usize,
) -> anyhow::Result<f64> {
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
    let mut stream = tls.connector()?.connect(name, tcp).await?;
    let mut buf = vec![0u8; 256 * 1024];
    let mut total = Duration::ZERO;
    let mut reps = 0usize;
    for measured in std::iter::once(false).chain(std::iter::repeat(true)) {
        if measured && reps >= min_reps && total >= window {
            break;
        }
        let started = Instant::now();
        copy_once(&mut stream, size, &mut buf).await?;
        if measured {
            total += started.elapsed();
            reps += 1;
        }
    }
    Ok(mb_per_s(size * reps, total))
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
