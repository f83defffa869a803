//! The same shape as the pipe, built on HTTP/2 (hyper and the `h2` crate): the protocol
//! restpipe's own framing is measured against, side by side in the same run (`--only h2`).
//!
//! Two processes, as restpipe's pair of nodes, both this bench binary re-executed:
//!
//! - `--serve-h2 PORT CERT_DIR FILES_DIR`, the **h2 server** (restpipe's server node): hyper's
//!   HTTP/2 server over tokio-rustls with the nodes' TLS settings (TLS 1.3 only, ring, the
//!   server certificate of the dev set, client certificates required and checked against the
//!   dev CA; ALPN `h2`). It answers `GET /server/time` with `get_time`'s JSON, and
//!   `GET /file/NAME` with the file `FILES_DIR/NAME`, streamed in chunks as it is read;
//! - `--serve-h2-front PORT CERT_DIR H2_ADDR`, the **front door with its HTTP/2 client**
//!   (restpipe's client node): an axum HTTP/1 server on loopback, the same as the bare
//!   baseline, that forwards every request over ONE shared HTTP/2 connection (hyper's HTTP/2
//!   client over tokio-rustls with the dev client certificate) to the h2 server, and streams
//!   the answer back as it arrives.
//!
//! hyper's HTTP/2 settings are its defaults (client: 2 MiB stream and 5 MiB connection
//! windows; server: 1 MiB and 1 MiB; 16 KiB frames), except the server's limit of concurrent
//! streams, raised from 200 to [`MAX_STREAMS`] so that 256 keep-alive connections of the load
//! generator each have a stream at once, as they each have a call in flight on the pipe.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::io::Read as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::{IntoResponse as _, Response};
use axum::serve::ListenerExt as _;
use axum::Router;
use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt as _, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::client::conn::http2::SendRequest;
use hyper::header::{CONTENT_TYPE, HOST};
use hyper::StatusCode;
use hyper_util::rt::{TokioExecutor, TokioIo};
use restpipe::tls::{TlsFiles, TlsMaterial};
use restpipe_certs::DevPaths;
use restpipe_testkit::certs::Certs;
use restpipe_testkit::procs::Process;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::net::{TcpListener, TcpStream};

use crate::procs::{self, LISTENING};

/// The h2 server's limit of concurrent streams on a connection.
pub const MAX_STREAMS: u32 = 1024;

/// The size of the chunks a file is read and sent in.
const CHUNK: usize = 256 * 1024;

/// The ALPN protocol name of HTTP/2 over TLS.
const ALPN_H2: &[u8] = b"h2";

/// A reference pair: the same shape as the pipe on another multiplexer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Proto {
    /// HTTP/2 (hyper and the `h2` crate): this module.
    H2,
    /// yamux streams with HTTP/1.1 on each ([`crate::yamux_pair`]).
    Yamux,
}

impl Proto {
    /// The target's key in the report.
    pub fn key(self) -> &'static str {
        match self {
            Proto::H2 => "h2",
            Proto::Yamux => "yamux",
        }
    }

    /// Its name in the report.
    pub fn name(self) -> &'static str {
        match self {
            Proto::H2 => "HTTP/2",
            Proto::Yamux => "yamux",
        }
    }

    /// The label of its request target.
    pub fn label(self) -> &'static str {
        match self {
            Proto::H2 => "HTTP/2 front→server",
            Proto::Yamux => "yamux front→server",
        }
    }

    /// The hidden flags that start its server and its front door.
    fn flags(self) -> (&'static str, &'static str) {
        match self {
            Proto::H2 => ("--serve-h2", "--serve-h2-front"),
            Proto::Yamux => ("--serve-yamux", "--serve-yamux-front"),
        }
    }
}

/// The key, chain and verifiers of the dev set's `who` (`server` or `client`).
fn material(certs: &Path, who: &str) -> anyhow::Result<(TlsMaterial, DevPaths)> {
    let paths = DevPaths::in_dir(certs);
    let (cert, key) = match who {
        "server" => (paths.server_cert.clone(), paths.server_key.clone()),
        _ => (paths.client_cert.clone(), paths.client_key.clone()),
    };
    let tls = TlsMaterial::from_files(&TlsFiles {
        ca: paths.ca_cert.clone(),
        cert,
        key,
        ..TlsFiles::default()
    })?;
    Ok((tls, paths))
}

fn chain_and_key(
    cert: &Path,
    key: &Path,
) -> anyhow::Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)> {
    let chain = CertificateDer::pem_file_iter(cert)
        .with_context(|| format!("reading {}", cert.display()))?
        .collect::<Result<Vec<_>, _>>()?;
    let key = PrivateKeyDer::from_pem_file(key).with_context(|| format!("{}", key.display()))?;
    Ok((chain, key))
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The server's TLS: the nodes' acceptor settings (TLS 1.3, client certificates checked by
/// [`TlsMaterial::client_verifier`], no session resumption), with ALPN `alpn`.
pub fn acceptor(certs: &Path, alpn: &[u8]) -> anyhow::Result<tokio_rustls::TlsAcceptor> {
    let (tls, paths) = material(certs, "server")?;
    let (chain, key) = chain_and_key(&paths.server_cert, &paths.server_key)?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(tls.client_verifier()?)
        .with_single_cert(chain, key)?;
    config.alpn_protocols = vec![alpn.to_vec()];
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

/// The front's TLS: the nodes' connector settings (TLS 1.3, the server checked by
/// [`TlsMaterial::server_verifier`], the dev client certificate), with ALPN `alpn`.
pub fn connector(certs: &Path, alpn: &[u8]) -> anyhow::Result<tokio_rustls::TlsConnector> {
    let (tls, paths) = material(certs, "client")?;
    let (chain, key) = chain_and_key(&paths.client_cert, &paths.client_key)?;
    let mut config = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_webpki_verifier(tls.server_verifier()?)
        .with_client_auth_cert(chain, key)?;
    config.alpn_protocols = vec![alpn.to_vec()];
    config.resumption = rustls::client::Resumption::disabled();
    Ok(tokio_rustls::TlsConnector::from(Arc::new(config)))
}

/// The body of the reference servers' answers.
pub type H2Body = BoxBody<Bytes, std::io::Error>;

fn full(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> hyper::Response<H2Body> {
    let mut response = hyper::Response::new(
        Full::new(body.into())
            .map_err(|never: Infallible| match never {})
            .boxed(),
    );
    *response.status_mut() = status;
    if let Ok(value) = content_type.parse() {
        response.headers_mut().insert(CONTENT_TYPE, value);
    }
    response
}

/// The reference server's answer to one request: `get_time`'s JSON on `/server/time`, the
/// file `files/NAME` on `/file/NAME`.
pub async fn answer(
    files: Arc<PathBuf>,
    request: hyper::Request<Incoming>,
) -> hyper::Response<H2Body> {
    let path = request.uri().path();
    if path == "/server/time" {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs_f64();
        let json =
            serde_json::to_vec(&BTreeMap::from([("time_from_server", now)])).unwrap_or_default();
        return full(StatusCode::OK, "application/json", json);
    }
    let Some(name) = path
        .strip_prefix("/file/")
        .filter(|n| !n.is_empty() && !n.contains(['/', '\\']) && !n.starts_with('.'))
    else {
        return full(StatusCode::NOT_FOUND, "text/plain", "no such path\n");
    };
    let file = match std::fs::File::open(files.join(name)) {
        Ok(file) => file,
        Err(e) => {
            return full(
                StatusCode::NOT_FOUND,
                "text/plain",
                format!("{name}: {e}\n"),
            )
        }
    };
    let len = file.metadata().map(|m| m.len()).ok();
    // A blocking thread reads the file chunk by chunk into a small queue; the body takes the
    // chunks as the connection's flow control lets it send them.
    let (tx, mut rx) = tokio::sync::mpsc::channel::<std::io::Result<Bytes>>(4);
    tokio::task::spawn_blocking(move || {
        let mut file = file;
        loop {
            // Read into spare capacity: no zeroing of a fresh buffer per chunk.
            let mut buf = Vec::with_capacity(CHUNK);
            match (&mut file).take(CHUNK as u64).read_to_end(&mut buf) {
                Ok(0) => return,
                Ok(_) => {
                    if tx.blocking_send(Ok(Bytes::from(buf))).is_err() {
                        return;
                    }
                }
                Err(e) => {
                    let _ = tx.blocking_send(Err(e));
                    return;
                }
            }
        }
    });
    let chunks = futures_util::stream::poll_fn(move |cx| {
        rx.poll_recv(cx)
            .map(|chunk| chunk.map(|c| c.map(Frame::data)))
    });
    let mut response = hyper::Response::new(StreamBody::new(chunks).boxed());
    let headers = response.headers_mut();
    headers.insert(
        CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/octet-stream"),
    );
    if let Some(len) = len {
        headers.insert(hyper::header::CONTENT_LENGTH, len.into());
    }
    response
}

/// The runtime of a reference process.
pub fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Runtime::new()?)
}

/// `--serve-h2`: serve HTTP/2 over TLS on 127.0.0.1:`port` (0: any) until killed, printing
/// the address bound.
pub fn serve_server(port: u16, certs: &Path, files: &Path) -> anyhow::Result<()> {
    let acceptor = acceptor(certs, ALPN_H2)?;
    let files = Arc::new(files.to_path_buf());
    runtime()?.block_on(async move {
        let listener = TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], port))).await?;
        println!("{LISTENING} {}", listener.local_addr()?);
        let mut builder = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
        builder.max_concurrent_streams(MAX_STREAMS);
        let builder = Arc::new(builder);
        loop {
            let (tcp, _) = listener.accept().await?;
            tcp.set_nodelay(true)?;
            let (acceptor, builder, files) = (acceptor.clone(), builder.clone(), files.clone());
            tokio::spawn(async move {
                let tls = match acceptor.accept(tcp).await {
                    Ok(tls) => tls,
                    Err(e) => {
                        eprintln!("h2 server: handshake: {e}");
                        return;
                    }
                };
                let service = hyper::service::service_fn(move |request| {
                    let files = files.clone();
                    async move { Ok::<_, Infallible>(answer(files, request).await) }
                });
                if let Err(e) = builder.serve_connection(TokioIo::new(tls), service).await {
                    eprintln!("h2 server: connection: {e}");
                }
            });
        }
    })
}

/// Forward one front-door request over the shared HTTP/2 connection, and stream the answer
/// back.
async fn forward(State(sender): State<SendRequest<Body>>, request: Request) -> Response {
    let (mut parts, body) = request.into_parts();
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    // HTTP/2 carries the authority in `:authority`, from the absolute URI.
    let uri = match format!("https://localhost{path}").parse() {
        Ok(uri) => uri,
        Err(e) => return (StatusCode::BAD_REQUEST, format!("{e}\n")).into_response(),
    };
    parts.uri = uri;
    parts.version = hyper::Version::HTTP_2;
    parts.headers.remove(HOST);
    let mut sender = sender;
    match sender
        .send_request(hyper::Request::from_parts(parts, body))
        .await
    {
        Ok(response) => response.map(Body::new),
        Err(e) => (StatusCode::BAD_GATEWAY, format!("HTTP/2: {e}\n")).into_response(),
    }
}

/// `--serve-h2-front`: the HTTP/1 front door on 127.0.0.1:`port` (0: any), forwarding over
/// one HTTP/2 connection to `upstream`, until killed; prints the address bound. Exits if
/// that connection ends.
pub fn serve_front(port: u16, certs: &Path, upstream: SocketAddr) -> anyhow::Result<()> {
    let connector = connector(certs, ALPN_H2)?;
    runtime()?.block_on(async move {
        let tcp = TcpStream::connect(upstream)
            .await
            .with_context(|| format!("connect to the h2 server at {upstream}"))?;
        tcp.set_nodelay(true)?;
        let name = ServerName::try_from("localhost").context("server name")?;
        let tls = connector
            .connect(name, tcp)
            .await
            .context("TLS handshake")?;
        let (sender, connection) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .handshake::<_, Body>(TokioIo::new(tls))
            .await
            .context("HTTP/2 handshake")?;
        tokio::spawn(async move {
            match connection.await {
                Ok(()) => eprintln!("h2 front: the HTTP/2 connection closed"),
                Err(e) => eprintln!("h2 front: the HTTP/2 connection failed: {e}"),
            }
            std::process::exit(1);
        });
        serve_door(port, Router::new().fallback(forward).with_state(sender)).await
    })
}

/// Serve a reference pair's front door on `127.0.0.1:port` and say where on stdout: like the
/// baseline and the nodes' front door, with TCP_NODELAY on every connection.
pub async fn serve_door(port: u16, app: Router) -> anyhow::Result<()> {
    let listener = TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], port))).await?;
    println!("{LISTENING} {}", listener.local_addr()?);
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    axum::serve(listener, app).await?;
    Ok(())
}

/// A reference pair's server and front door, running.
pub struct RefPair {
    server: Process,
    front: Process,
    /// The front door's HTTP address.
    pub http: SocketAddr,
}

impl RefPair {
    /// Fails with a process's log if either has exited.
    pub fn check_alive(&mut self) -> anyhow::Result<()> {
        procs::check_alive(&mut self.server)?;
        procs::check_alive(&mut self.front)
    }

    /// The two processes' ids: the server and the front door.
    pub fn pids(&self) -> [u32; 2] {
        [self.server.pid(), self.front.pid()]
    }

    /// The path of the bulk file `name` on the front door.
    pub fn file_path(name: &str) -> String {
        format!("/file/{name}")
    }
}

/// Start the reference pair of `proto`: its server (serving `files`) and its front door, ready
/// once `GET /server/time` answers 200 through both.
pub async fn start(
    work: &Certs,
    proto: Proto,
    name: &str,
    files: &Path,
) -> anyhow::Result<RefPair> {
    let (server_flag, front_flag) = proto.flags();
    let certs = work.paths.dir.display().to_string();
    std::fs::create_dir_all(files)?;
    let (server, upstream) = procs::reference_server(
        work,
        &format!("{name}-server"),
        server_flag,
        &[certs.clone(), files.display().to_string()],
    )
    .await?;
    let (mut front, http) = procs::reference_server(
        work,
        &format!("{name}-front"),
        front_flag,
        &[certs, upstream.to_string()],
    )
    .await?;
    procs::wait_for(
        &mut front,
        http,
        "/server/time",
        Duration::from_secs(10),
        |s, _| s == StatusCode::OK,
    )
    .await?;
    Ok(RefPair {
        server,
        front,
        http,
    })
}
