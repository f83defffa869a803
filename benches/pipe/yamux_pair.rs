//! The same shape as the pipe on yamux (the `yamux` crate, its default configuration but for
//! the number of streams, [`MAX_STREAMS`]: 256 KiB stream windows auto-tuned up to 1 GiB for
//! the connection, 16 KiB frames): one TLS connection multiplexed into a yamux stream per
//! request, with HTTP/1.1 on each stream (one request and its answer, then the stream is
//! closed). Two processes, as for HTTP/2 ([`crate::http2`]), both this bench binary
//! re-executed:
//!
//! - `--serve-yamux PORT CERT_DIR FILES_DIR`, the **yamux server**: accepts TLS with the
//!   nodes' settings (ALPN `yamux`), accepts the streams the front door opens and serves
//!   hyper's HTTP/1.1 on each, with the same answers as the HTTP/2 server
//!   ([`crate::http2::answer`]);
//! - `--serve-yamux-front PORT CERT_DIR ADDR`, the **front door**: the same axum HTTP/1 front
//!   door as HTTP/2's, which opens a yamux stream per request on its one TLS connection to
//!   the server, sends the request over it with hyper's HTTP/1.1 client, and streams the
//!   answer back.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::task::Poll;

use anyhow::Context as _;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::{IntoResponse as _, Response};
use axum::Router;
use hyper::header::HOST;
use hyper::StatusCode;
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};
use tokio_util::compat::{FuturesAsyncReadCompatExt as _, TokioAsyncReadCompatExt as _};

use crate::http2;
use crate::procs::LISTENING;

/// The ALPN protocol name the yamux pair offers.
const ALPN: &[u8] = b"yamux";

/// The streams a connection may hold at once: 4,096 rather than yamux's default 512. A stream
/// is held until both ends have closed it, a little after its answer was read, so at 256
/// connections in a closed loop more than 512 can be open for a moment; yamux answers a stream
/// over its limit by closing the whole connection (seen: the front door exited at 256
/// connections with the default). 4,096 streams of 256 KiB are the 1 GiB connection window.
pub const MAX_STREAMS: usize = 4096;

/// yamux's default configuration with [`MAX_STREAMS`].
fn config() -> yamux::Config {
    let mut config = yamux::Config::default();
    config.set_max_num_streams(MAX_STREAMS);
    config
}

/// An open request for a new outbound stream, answered by the connection's driver.
type Open = oneshot::Sender<yamux::Result<yamux::Stream>>;

/// `--serve-yamux`: serve HTTP/1.1 on yamux streams over TLS on 127.0.0.1:`port` (0: any)
/// until killed, printing the address bound.
pub fn serve_server(port: u16, certs: &Path, files: &Path) -> anyhow::Result<()> {
    let acceptor = http2::acceptor(certs, ALPN)?;
    let files = Arc::new(files.to_path_buf());
    http2::runtime()?.block_on(async move {
        let listener = TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], port))).await?;
        println!("{LISTENING} {}", listener.local_addr()?);
        loop {
            let (tcp, _) = listener.accept().await?;
            tcp.set_nodelay(true)?;
            let (acceptor, files) = (acceptor.clone(), files.clone());
            tokio::spawn(async move {
                let tls = match acceptor.accept(tcp).await {
                    Ok(tls) => tls,
                    Err(e) => {
                        eprintln!("yamux server: handshake: {e}");
                        return;
                    }
                };
                let mut connection =
                    yamux::Connection::new(tls.compat(), config(), yamux::Mode::Server);
                // Polling for the next inbound stream is what drives the connection's I/O.
                while let Some(stream) =
                    std::future::poll_fn(|cx| connection.poll_next_inbound(cx)).await
                {
                    let stream = match stream {
                        Ok(stream) => stream,
                        Err(e) => {
                            eprintln!("yamux server: connection: {e}");
                            return;
                        }
                    };
                    let files = files.clone();
                    tokio::spawn(async move {
                        let service = hyper::service::service_fn(move |request| {
                            let files = files.clone();
                            async move { Ok::<_, Infallible>(http2::answer(files, request).await) }
                        });
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(TokioIo::new(stream.compat()), service)
                            .await;
                    });
                }
            });
        }
    })
}

/// Drive the front door's connection: open the streams asked for on `opens`, and poll it
/// (the server opens no stream) so that its I/O moves. Ends when the connection does.
async fn drive(
    mut connection: yamux::Connection<
        tokio_util::compat::Compat<tokio_rustls::client::TlsStream<TcpStream>>,
    >,
    mut opens: mpsc::UnboundedReceiver<Open>,
) -> anyhow::Result<()> {
    let mut waiting: VecDeque<Open> = VecDeque::new();
    std::future::poll_fn(|cx| loop {
        while let Poll::Ready(Some(open)) = opens.poll_recv(cx) {
            waiting.push_back(open);
        }
        while !waiting.is_empty() {
            match connection.poll_new_outbound(cx) {
                Poll::Ready(stream) => {
                    if let Some(open) = waiting.pop_front() {
                        let _ = open.send(stream);
                    }
                }
                Poll::Pending => break,
            }
        }
        match connection.poll_next_inbound(cx) {
            Poll::Ready(Some(Ok(_unexpected))) => continue,
            Poll::Ready(Some(Err(e))) => return Poll::Ready(Err(anyhow::Error::new(e))),
            Poll::Ready(None) => return Poll::Ready(Ok(())),
            Poll::Pending => return Poll::Pending,
        }
    })
    .await
}

/// Forward one front-door request on a new yamux stream, and stream the answer back.
async fn forward(State(opens): State<mpsc::UnboundedSender<Open>>, request: Request) -> Response {
    let (tx, rx) = oneshot::channel();
    if opens.send(tx).is_err() {
        return (StatusCode::BAD_GATEWAY, "yamux: the connection is gone\n").into_response();
    }
    let stream = match rx.await {
        Ok(Ok(stream)) => stream,
        Ok(Err(e)) => return (StatusCode::BAD_GATEWAY, format!("yamux: {e}\n")).into_response(),
        Err(_) => return (StatusCode::BAD_GATEWAY, "yamux: no stream\n").into_response(),
    };
    let (mut sender, connection) =
        match hyper::client::conn::http1::handshake::<_, Body>(TokioIo::new(stream.compat())).await
        {
            Ok(pair) => pair,
            Err(e) => return (StatusCode::BAD_GATEWAY, format!("HTTP/1.1: {e}\n")).into_response(),
        };
    // Ends once the answer is read and the sender dropped: the stream is then closed.
    tokio::spawn(connection);
    let (mut parts, body) = request.into_parts();
    if let Ok(host) = "localhost".parse() {
        parts.headers.insert(HOST, host);
    }
    match sender
        .send_request(hyper::Request::from_parts(parts, body))
        .await
    {
        Ok(response) => response.map(Body::new),
        Err(e) => (StatusCode::BAD_GATEWAY, format!("HTTP/1.1: {e}\n")).into_response(),
    }
}

/// `--serve-yamux-front`: the HTTP/1 front door on 127.0.0.1:`port` (0: any), forwarding
/// over yamux streams of one TLS connection to `upstream`, until killed; prints the address
/// bound. Exits if that connection ends.
pub fn serve_front(port: u16, certs: &Path, upstream: SocketAddr) -> anyhow::Result<()> {
    let connector = http2::connector(certs, ALPN)?;
    http2::runtime()?.block_on(async move {
        let tcp = TcpStream::connect(upstream)
            .await
            .with_context(|| format!("connect to the yamux server at {upstream}"))?;
        tcp.set_nodelay(true)?;
        let name = ServerName::try_from("localhost").context("server name")?;
        let tls = connector
            .connect(name, tcp)
            .await
            .context("TLS handshake")?;
        let connection = yamux::Connection::new(tls.compat(), config(), yamux::Mode::Client);
        let (opens, asked) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            match drive(connection, asked).await {
                Ok(()) => eprintln!("yamux front: the connection closed"),
                Err(e) => eprintln!("yamux front: the connection failed: {e:#}"),
            }
            std::process::exit(1);
        });
        http2::serve_door(port, Router::new().fallback(forward).with_state(opens)).await
    })
}
