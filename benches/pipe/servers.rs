//! The reference servers, run when this binary is re-executed with a hidden flag:
//!
//! - `--serve-baseline PORT`: a bare axum server (the same axum and tokio as the nodes) that
//!   answers `GET /server/time` with `get_time`'s JSON directly;
//! - `--serve-rustls PORT CERT_DIR`: a plain rustls copy server with the nodes' own TLS
//!   configuration and the dev certificates: for each 8-byte big-endian length it reads, it
//!   writes that many bytes back (from one buffer of [`COPY_BUF`] bytes, written as often as
//!   needed).
//!
//! Each prints `listening on <addr>` once bound, for the harness to read (it passes port 0).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use axum::routing::get;
use axum::serve::ListenerExt as _;
use axum::{Json, Router};
use restpipe::tls::{TlsFiles, TlsMaterial};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use crate::procs::LISTENING;

/// The buffer the copy server writes from, as many times as a transfer needs.
pub const COPY_BUF: usize = 16 * 1024 * 1024;

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Runtime::new()?)
}

/// Serve the baseline on 127.0.0.1:`port` (0: any) until killed, printing the address bound.
pub fn baseline(port: u16) -> anyhow::Result<()> {
    runtime()?.block_on(async move {
        let app = Router::new().route(
            "/server/time",
            get(|| async {
                let now = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .unwrap_or_default()
                    .as_secs_f64();
                Json(BTreeMap::from([("time_from_server", now)]))
            }),
        );
        // The nodes' front door sets TCP_NODELAY on every connection; so does the baseline.
        let listener = TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], port))).await?;
        println!("{LISTENING} {}", listener.local_addr()?);
        let listener = listener.tap_io(|tcp| {
            let _ = tcp.set_nodelay(true);
        });
        axum::serve(listener, app).await?;
        anyhow::Ok(())
    })
}

/// Serve plain TLS copies on 127.0.0.1:`port` (0: any) until killed, printing the address
/// bound.
pub fn rustls_copy(port: u16, certs: &Path) -> anyhow::Result<()> {
    let tls = TlsMaterial::from_files(&TlsFiles {
        ca: certs.join("ca.pem"),
        cert: certs.join("server.pem"),
        key: certs.join("server.key"),
        ..TlsFiles::default()
    })?;
    let acceptor = tls.acceptor()?;
    runtime()?.block_on(async move {
        let listener = TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], port))).await?;
        println!("{LISTENING} {}", listener.local_addr()?);
        let data: &'static [u8] = vec![0x5a; COPY_BUF].leak();
        loop {
            let (tcp, _) = listener.accept().await?;
            tcp.set_nodelay(true)?;
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let mut tls = acceptor.accept(tcp).await.context("handshake")?;
                loop {
                    let Ok(len) = tls.read_u64().await else {
                        return anyhow::Ok(());
                    };
                    let mut left = usize::try_from(len)?;
                    while left > 0 {
                        let n = left.min(COPY_BUF);
                        tls.write_all(&data[..n]).await?;
                        left -= n;
                    }
                    tls.flush().await?;
                }
            });
        }
    })
}
