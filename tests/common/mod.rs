//! Shared helpers for restpipe's integration tests.
//!
//! Every test makes its own certificates in memory ([`Pki`]), starts its own server on
//! `127.0.0.1:0` ([`start_server`]) and its own clients ([`start_client`]), so tests are
//! independent and can run in parallel. Beyond that:
//!
//! - [`test_handlers`]: `post_echo`, `get_slow`, `get_whoami` and `get_fail`, on any node;
//! - [`test_pipe`] (relaxed timings for ordinary tests) and [`heartbeat_pipe`] (200 ms / 600 ms
//!   heartbeats, for liveness tests);
//! - [`Relay`]: a TCP relay between client and server that can stop forwarding without closing
//!   ([`Relay::pause`]) or cut every connection at once ([`Relay::cut`]);
//! - [`RawPeer`]: a hand-driven peer that speaks the wire protocol frame by frame, over TLS or
//!   plain TCP, to play a misbehaving client;
//! - [`logs`]: captures the library's log lines, so a test can check what was logged;
//! - [`wait_until`]: poll a condition within a bound, instead of sleeping a fixed time.
//!
//! Each test binary uses a part of this module, so unused items are allowed.

#![allow(dead_code)]

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use prost::Message;
use restpipe::handler::{Context, HandlerError, Handlers, Reply, Request};
use restpipe::proto::{self, frame::Kind, Frame};
use restpipe::{
    ClientNode, ClientOptions, NodeOptions, PipeConfig, ServerNode, ServerOptions, TlsMaterial,
};
use restpipe_certs::{CertificateAuthority, IssueOptions, IssuedCert};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::AbortHandle;
use tokio_rustls::TlsConnector;

/// The name on the test server's certificate (with the IP SAN `127.0.0.1`).
pub const SERVER_NAME: &str = "localhost";

/// A test CA with its server certificate; issues client certificates on demand.
pub struct Pki {
    ca: CertificateAuthority,
    server: IssuedCert,
}

impl Pki {
    /// A new CA, and a server certificate for `localhost` and `127.0.0.1`.
    pub fn new() -> Pki {
        Pki::with_ca_name("restpipe test CA")
    }

    /// Like [`Pki::new`], with a CA of this common name. Two CAs of the same name are told
    /// apart only by their keys.
    pub fn with_ca_name(name: &str) -> Pki {
        let ca = CertificateAuthority::generate(name, &IssueOptions::ca_default())
            .expect("generate the test CA");
        let server = ca
            .issue_server(SERVER_NAME, &["127.0.0.1".into()], &IssueOptions::default())
            .expect("issue the server certificate");
        Pki { ca, server }
    }

    /// The CA certificate, PEM.
    pub fn ca_pem(&self) -> &str {
        self.ca.cert_pem()
    }

    /// The server node's TLS material.
    pub fn server_tls(&self) -> TlsMaterial {
        TlsMaterial::from_pem(self.ca_pem(), &self.server.cert_pem, &self.server.key_pem)
            .expect("server TLS material")
    }

    /// A client certificate for `identity`, issued by this CA.
    pub fn client_cert(&self, identity: &str) -> IssuedCert {
        self.ca
            .issue_client(identity, &IssueOptions::default())
            .expect("issue a client certificate")
    }

    /// A client node's TLS material for `identity`.
    pub fn client_tls(&self, identity: &str) -> TlsMaterial {
        let cert = self.client_cert(identity);
        TlsMaterial::from_pem(self.ca_pem(), &cert.cert_pem, &cert.key_pem)
            .expect("client TLS material")
    }

    /// A connector that presents a client certificate for `identity` and trusts this CA.
    pub fn connector(&self, identity: &str) -> TlsConnector {
        self.client_tls(identity).connector().expect("connector")
    }

    /// A connector that trusts this CA but presents no client certificate at all.
    pub fn connector_without_client_cert(&self) -> TlsConnector {
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(self.ca_pem().as_bytes()) {
            roots.add(cert.expect("CA PEM")).expect("CA accepted");
        }
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
        TlsConnector::from(Arc::new(config))
    }
}

impl Default for Pki {
    fn default() -> Self {
        Pki::new()
    }
}

/// Pipe settings for ordinary tests: heartbeats every second with a 5 s timeout (so a loaded
/// CI machine never trips them by accident), short handshake and connect waits.
pub fn test_pipe() -> PipeConfig {
    PipeConfig {
        heartbeat_interval: Duration::from_secs(1),
        heartbeat_timeout: Duration::from_secs(5),
        handshake_timeout: Duration::from_secs(3),
        connect_wait: Duration::from_secs(3),
        request_timeout: Duration::from_secs(10),
        ..PipeConfig::default()
    }
}

/// Pipe settings for liveness tests: heartbeats every 200 ms, dead after 600 ms of silence.
pub fn heartbeat_pipe() -> PipeConfig {
    PipeConfig {
        heartbeat_interval: Duration::from_millis(200),
        heartbeat_timeout: Duration::from_millis(600),
        ..test_pipe()
    }
}

/// The handlers every test node serves, answering as node `node`:
///
/// - `post_echo`: the request's body and content type, unchanged;
/// - `get_slow`: sleeps the first parameter in milliseconds (default 2000), then answers
///   `"{node} slept {ms} ms"` as text;
/// - `get_whoami`: JSON `{"node": node, "peer": <caller's identity>, "side": <side>}`;
/// - `get_bytes`: as many bytes as the first parameter says;
/// - `get_fail`: a handler error.
pub fn test_handlers(node: &str) -> Handlers {
    let mut handlers = Handlers::new();
    handlers.add("post_echo", |_ctx: Context, req: Request| async move {
        Ok::<_, HandlerError>(Reply::bytes(req.content_type, req.body))
    });
    let name = node.to_string();
    handlers.add("get_slow", move |_ctx: Context, req: Request| {
        let name = name.clone();
        async move {
            let ms: u64 = match req.parameters.first() {
                Some(p) => p.parse()?,
                None => 2000,
            };
            tokio::time::sleep(Duration::from_millis(ms)).await;
            Ok::<_, HandlerError>(Reply::text(format!("{name} slept {ms} ms")))
        }
    });
    let name = node.to_string();
    handlers.add("get_whoami", move |ctx: Context, _req: Request| {
        let name = name.clone();
        async move {
            Ok::<_, HandlerError>(serde_json::json!({
                "node": name,
                "peer": ctx.peer_identity,
                "side": ctx.side.as_str(),
            }))
        }
    });
    handlers.add("get_bytes", |_ctx: Context, req: Request| async move {
        let n: usize = req.parameters.first().map_or(Ok(0), |p| p.parse())?;
        Ok::<_, HandlerError>(Reply::bytes("application/octet-stream", vec![0xab; n]))
    });
    handlers.add("get_fail", |_ctx: Context, _req: Request| async move {
        Err::<Reply, _>(HandlerError::new("failed on purpose"))
    });
    handlers
}

/// A `get_slow` request that sleeps `ms` milliseconds.
pub fn slow(ms: u64) -> Request {
    Request::new("GET", "slow").with_parameters(vec![ms.to_string()])
}

/// A `post_echo` request with `body`.
pub fn echo(body: impl Into<Bytes>) -> Request {
    Request::new("POST", "echo").with_body("application/octet-stream", body)
}

/// A `get_bytes` request for `n` bytes.
pub fn bytes_of(n: usize) -> Request {
    Request::new("GET", "bytes").with_parameters(vec![n.to_string()])
}

/// A `get_whoami` request.
pub fn whoami() -> Request {
    Request::new("GET", "whoami")
}

/// The `node` field of a `get_whoami` reply.
pub fn node_of(reply: &Reply) -> String {
    let v: serde_json::Value = serde_json::from_slice(&reply.body).expect("whoami JSON");
    v["node"].as_str().expect("node field").to_string()
}

/// Server options on `bind` with the test handlers (as node `"server"`) and `pipe`.
pub fn server_options(pki: &Pki, bind: SocketAddr, pipe: PipeConfig) -> ServerOptions {
    let mut node = NodeOptions::new(pki.server_tls());
    node.pipe = pipe;
    node.handlers = test_handlers("server");
    ServerOptions::new(node, bind)
}

/// A server on `127.0.0.1:0` with the test handlers (answering as node `"server"`).
pub async fn start_server(pki: &Pki, pipe: PipeConfig) -> ServerNode {
    let bind = "127.0.0.1:0".parse().expect("address");
    ServerNode::start(server_options(pki, bind, pipe))
        .await
        .expect("start the server")
}

/// Client options for `identity` dialling `server`, with the test handlers (answering as
/// node `identity`), `pipe`, and quick reconnects (50 ms up to 500 ms).
pub fn client_options(
    pki: &Pki,
    identity: &str,
    server: SocketAddr,
    pipe: PipeConfig,
) -> ClientOptions {
    let mut node = NodeOptions::new(pki.client_tls(identity));
    node.pipe = pipe;
    node.handlers = test_handlers(identity);
    let mut options = ClientOptions::new(node, server.to_string());
    options.reconnect_initial = Duration::from_millis(50);
    options.reconnect_max = Duration::from_millis(500);
    options.stable_after = Duration::from_secs(1);
    options
}

/// Start a client and wait until it is connected (and the server lists it).
pub async fn start_client(
    pki: &Pki,
    identity: &str,
    server: &ServerNode,
    pipe: PipeConfig,
) -> ClientNode {
    let client = ClientNode::start(client_options(pki, identity, server.local_addr(), pipe))
        .expect("start the client");
    client
        .wait_connected(Duration::from_secs(5))
        .await
        .expect("client connects");
    wait_for_client(server, identity).await;
    client
}

/// Wait (at most 5 s) until the server lists a live connection from `identity`.
pub async fn wait_for_client(server: &ServerNode, identity: &str) {
    let listed = wait_until(Duration::from_secs(5), || {
        server
            .registry()
            .find(identity)
            .is_ok_and(|c| !c.is_closed())
    })
    .await;
    assert!(listed, "the server never listed client {identity}");
}

/// Poll `condition` every 10 ms until it holds (true) or `limit` passes (false).
pub async fn wait_until(limit: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if condition() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Await `fut`, failing the test if it takes longer than `limit`.
pub async fn within<T>(limit: Duration, what: &str, fut: impl Future<Output = T>) -> T {
    match tokio::time::timeout(limit, fut).await {
        Ok(value) => value,
        Err(_) => panic!("{what} took longer than {limit:?}"),
    }
}

/// `len` random bytes that contain each of the 256 byte values at least once.
pub fn random_bytes(len: usize) -> Vec<u8> {
    use rand::Rng;
    assert!(len >= 256);
    let mut body = vec![0u8; len];
    rand::rng().fill(&mut body[..]);
    for (i, b) in body.iter_mut().take(256).enumerate() {
        *b = i as u8;
    }
    body
}

// ----------------------------------------------------------------------------------------
// Relay

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
struct RelayState {
    /// Whether bytes flow at all.
    forwarding: bool,
    /// Bytes per second in each direction of each connection; `None` for no limit.
    rate: Option<u64>,
}

/// A TCP relay on `127.0.0.1:0` in front of `target`. It forwards both ways until told to
/// pause (bytes stop flowing, sockets stay open: a peer that went silent), to slow down
/// ([`Relay::throttle`]: a slow link), or to cut (every relayed connection is closed at once:
/// the network broke). New connections keep being accepted whatever it was told.
pub struct Relay {
    addr: SocketAddr,
    state: watch::Sender<RelayState>,
    links: Arc<Mutex<Vec<AbortHandle>>>,
    accept: AbortHandle,
}

impl Relay {
    /// Start relaying to `target`.
    pub async fn start(target: SocketAddr) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind relay");
        let addr = listener.local_addr().expect("relay address");
        let state = watch::Sender::new(RelayState {
            forwarding: true,
            rate: None,
        });
        let links: Arc<Mutex<Vec<AbortHandle>>> = Arc::default();
        let accept = tokio::spawn({
            let state = state.clone();
            let links = links.clone();
            async move {
                loop {
                    let Ok((inbound, _)) = listener.accept().await else {
                        continue;
                    };
                    let Ok(outbound) = TcpStream::connect(target).await else {
                        continue;
                    };
                    let _ = inbound.set_nodelay(true);
                    let _ = outbound.set_nodelay(true);
                    let (in_read, in_write) = inbound.into_split();
                    let (out_read, out_write) = outbound.into_split();
                    let up = tokio::spawn(pump(in_read, out_write, state.subscribe()));
                    let down = tokio::spawn(pump(out_read, in_write, state.subscribe()));
                    let mut links = links.lock().unwrap_or_else(|p| p.into_inner());
                    links.push(up.abort_handle());
                    links.push(down.abort_handle());
                }
            }
        })
        .abort_handle();
        Relay {
            addr,
            state,
            links,
            accept,
        }
    }

    /// Where clients should dial.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stop forwarding in both directions, keeping every socket open.
    pub fn pause(&self) {
        self.state.send_modify(|s| s.forwarding = false);
    }

    /// Forward again.
    pub fn resume(&self) {
        self.state.send_modify(|s| s.forwarding = true);
    }

    /// Forward at most `bytes_per_second` in each direction of each connection (`None`: as
    /// fast as possible).
    pub fn throttle(&self, bytes_per_second: Option<u64>) {
        self.state.send_modify(|s| s.rate = bytes_per_second);
    }

    /// Close every relayed connection now (both ends see the socket close, without any TLS
    /// goodbye). The relay keeps accepting new connections.
    pub fn cut(&self) {
        let links = std::mem::take(&mut *self.links.lock().unwrap_or_else(|p| p.into_inner()));
        for link in links {
            link.abort();
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut();
    }
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut state: watch::Receiver<RelayState>,
) {
    // Chunks stay small so that a throttled link trickles rather than bursts.
    let mut buf = vec![0u8; 16 * 1024];
    let mut next_send = tokio::time::Instant::now();
    loop {
        if state.wait_for(|s| s.forwarding).await.is_err() {
            return;
        }
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        // Paused while the read was pending: hold the bytes until forwarding resumes.
        let Ok(now) = state.wait_for(|s| s.forwarding).await.map(|s| *s) else {
            return;
        };
        if let Some(rate) = now.rate {
            let start = next_send.max(tokio::time::Instant::now());
            next_send = start + Duration::from_secs_f64(n as f64 / rate.max(1) as f64);
            tokio::time::sleep_until(next_send).await;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    let _ = to.shutdown().await;
}

// ----------------------------------------------------------------------------------------
// A raw peer

/// A peer driven by hand, frame by frame, over any stream (TLS or plain TCP).
pub struct RawPeer<S> {
    stream: S,
}

/// A raw peer over a client-side TLS stream.
pub type TlsPeer = RawPeer<tokio_rustls::client::TlsStream<TcpStream>>;

impl TlsPeer {
    /// Open TCP and TLS to `addr` with `connector`, verifying the server as `localhost`. On
    /// TLS 1.3 a client whose certificate the server refuses can still finish its side of
    /// the handshake; the refusal then shows on the first read.
    pub async fn connect_tls(addr: SocketAddr, connector: &TlsConnector) -> io::Result<TlsPeer> {
        let tcp = TcpStream::connect(addr).await?;
        let name = ServerName::try_from(SERVER_NAME).expect("server name");
        let stream = connector.connect(name, tcp).await?;
        Ok(RawPeer { stream })
    }

    /// The local address of the TCP socket (what the server logs as `peer`).
    pub fn local_addr(&self) -> SocketAddr {
        self.stream.get_ref().0.local_addr().expect("local address")
    }
}

impl RawPeer<TcpStream> {
    /// Open a plain TCP connection to `addr`.
    pub async fn connect_tcp(addr: SocketAddr) -> io::Result<RawPeer<TcpStream>> {
        Ok(RawPeer {
            stream: TcpStream::connect(addr).await?,
        })
    }

    /// The local address of the socket (what the server logs as `peer`).
    pub fn local_addr(&self) -> SocketAddr {
        self.stream.local_addr().expect("local address")
    }
}

/// A client hello with `protocol_version`.
pub fn client_hello(identity: &str, protocol_version: u32) -> Frame {
    hello_frame(proto::Role::Client, identity, protocol_version)
}

/// A hello of `role` with `protocol_version`.
pub fn hello_frame(role: proto::Role, identity: &str, protocol_version: u32) -> Frame {
    Frame {
        id: 0,
        kind: Some(Kind::Hello(proto::Hello {
            protocol_version,
            role: role as i32,
            software_version: "raw-test-peer".into(),
            identity: identity.into(),
            max_frame_bytes: restpipe::wire::DEFAULT_MAX_FRAME as u64,
        })),
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> RawPeer<S> {
    /// A raw peer over `stream` (for example a server-side TLS stream, to play a server).
    pub fn new(stream: S) -> Self {
        RawPeer { stream }
    }

    /// Write raw bytes.
    pub async fn send_raw(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.stream.write_all(bytes).await?;
        self.stream.flush().await
    }

    /// Write one frame, length-prefixed.
    pub async fn send(&mut self, frame: &Frame) -> io::Result<()> {
        self.send_raw(&restpipe::wire::encode(frame)).await
    }

    /// Write one frame whose payload is `payload`, as is, with a correct length prefix.
    pub async fn send_payload(&mut self, payload: &[u8]) -> io::Result<()> {
        let mut bytes = (payload.len() as u32).to_be_bytes().to_vec();
        bytes.extend_from_slice(payload);
        self.send_raw(&bytes).await
    }

    /// Read the next frame, whatever it is; `None` on a clean end of stream.
    pub async fn recv_any(&mut self) -> io::Result<Option<Frame>> {
        let mut prefix = [0u8; 4];
        match self.stream.read_exact(&mut prefix).await {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
            Err(e) => return Err(e),
        }
        let len = u32::from_be_bytes(prefix) as usize;
        if len > 64 * 1024 * 1024 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "frame too large",
            ));
        }
        let mut payload = vec![0u8; len];
        self.stream.read_exact(&mut payload).await?;
        Frame::decode(&payload[..])
            .map(Some)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
    }

    /// Read the next frame that is not a heartbeat, answering pings on the way; `None` on a
    /// clean end of stream. Fails the test after 5 s.
    pub async fn recv(&mut self) -> io::Result<Option<Frame>> {
        within(Duration::from_secs(5), "waiting for a frame", async {
            loop {
                match self.recv_any().await? {
                    Some(Frame {
                        kind: Some(Kind::Ping(ping)),
                        ..
                    }) => {
                        let pong = Frame {
                            id: 0,
                            kind: Some(Kind::Pong(proto::Pong { nonce: ping.nonce })),
                        };
                        self.send(&pong).await?;
                    }
                    Some(Frame {
                        kind: Some(Kind::Pong(_)),
                        ..
                    }) => {}
                    other => return Ok(other),
                }
            }
        })
        .await
    }

    /// Send a client hello with `protocol_version` and return the server's hello.
    pub async fn hello(&mut self, identity: &str, protocol_version: u32) -> proto::Hello {
        self.send(&client_hello(identity, protocol_version))
            .await
            .expect("send hello");
        match self.recv().await.expect("read the server's hello") {
            Some(Frame {
                kind: Some(Kind::Hello(hello)),
                ..
            }) => hello,
            other => panic!("expected the server's hello, got {other:?}"),
        }
    }

    /// Read and discard until the server ends the stream (clean end or error). Returns the
    /// frames read on the way. Fails the test if the stream stays open for 5 s.
    pub async fn expect_end(&mut self) -> Vec<Frame> {
        within(
            Duration::from_secs(5),
            "waiting for the server to hang up",
            async {
                let mut frames = Vec::new();
                loop {
                    match self.recv_any().await {
                        Ok(Some(frame)) => frames.push(frame),
                        Ok(None) | Err(_) => return frames,
                    }
                }
            },
        )
        .await
    }
}

/// An event frame with request id `id`.
pub fn event_frame(id: u64, request: Request) -> Frame {
    Frame {
        id,
        kind: Some(Kind::Event(restpipe::wire::event_from_request(
            request, 5000,
        ))),
    }
}

// ----------------------------------------------------------------------------------------
// Logs

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

// ----------------------------------------------------------------------------------------
// Async conditions (appended for tests/http.rs and tests/cli.rs)

/// Poll the async `condition` every 20 ms until it holds (true) or `limit` passes (false).
/// For conditions that need an await, such as an HTTP request to a node.
pub async fn wait_until_async<F, Fut>(limit: Duration, mut condition: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    loop {
        if condition().await {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
