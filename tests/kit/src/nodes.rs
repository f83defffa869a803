//! In-process nodes for tests: a server on `127.0.0.1:0` ([`start_server`]) and clients
//! ([`start_client`]), each with the test handlers ([`test_handlers`]) and the pipe timings of
//! ordinary tests ([`test_pipe`]) or of liveness tests ([`heartbeat_pipe`]); and the requests
//! that call those handlers.

use std::net::SocketAddr;
use std::time::Duration;

use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;
use restpipe::handler::{BodyError, BodyStream, Context, HandlerError, Handlers, Reply, Request};
use restpipe::{ClientNode, ClientOptions, NodeOptions, PipeConfig, ServerNode, ServerOptions};

use crate::certs::Pki;
use crate::wait::wait_until;

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
/// - `get_fail`: a handler error;
/// - `post_check` (streaming): reads the body as it comes and answers JSON `{"bytes": n,
///   "mismatches": m}`, where `m` counts the bytes that differ from [`pattern`] at their
///   offset (so a lost, doubled or reordered chunk shows);
/// - `get_stream`: a streamed reply of the first parameter's bytes of [`pattern`], its
///   length known; with a second parameter, the stream fails at that offset instead of
///   ending;
/// - `get_endless`: a streamed reply that never ends; [`ENDLESS_ALIVE`] counts those not yet
///   dropped.
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
    handlers.add_streaming(
        "post_check",
        |_ctx: Context, _req: Request, mut body: BodyStream| async move {
            let (mut bytes, mut mismatches) = (0u64, 0u64);
            while let Some(chunk) = body.chunk().await {
                let chunk = chunk?;
                for (i, b) in chunk.iter().enumerate() {
                    if *b != pattern(bytes + i as u64) {
                        mismatches += 1;
                    }
                }
                bytes += chunk.len() as u64;
            }
            Ok::<_, HandlerError>(serde_json::json!({ "bytes": bytes, "mismatches": mismatches }))
        },
    );
    handlers.add("get_stream", |_ctx: Context, req: Request| async move {
        let n: u64 = req.parameters.first().map_or(Ok(0), |p| p.parse())?;
        let fail_at: Option<u64> = req.parameters.get(1).map(|p| p.parse()).transpose()?;
        Ok::<_, HandlerError>(Reply::stream(
            "application/octet-stream",
            BodyStream::new(pattern_stream(n, fail_at), Some(n)),
        ))
    });
    handlers.add("get_endless", |_ctx: Context, _req: Request| async move {
        let alive = Alive::new();
        let chunks = futures_util::stream::unfold((0u64, alive), |(at, alive)| async move {
            let chunk = pattern_chunk(at, 64 * 1024);
            tokio::task::yield_now().await;
            Some((Ok(chunk), (at + 64 * 1024, alive)))
        });
        Ok::<_, HandlerError>(Reply::stream(
            "application/octet-stream",
            BodyStream::new(chunks, None),
        ))
    });
    handlers
}

/// The byte at `offset` of the test bodies: position-dependent, so that a chunk out of place
/// does not match.
pub fn pattern(offset: u64) -> u8 {
    (offset.wrapping_mul(31) ^ (offset >> 13)) as u8
}

/// `len` bytes of [`pattern`] from `offset`.
pub fn pattern_chunk(offset: u64, len: usize) -> Bytes {
    (0..len as u64).map(|i| pattern(offset + i)).collect()
}

/// `n` bytes of [`pattern`] as a stream of 64 KiB chunks; with `fail_at`, an error item
/// there instead of the rest.
pub fn pattern_stream(
    n: u64,
    fail_at: Option<u64>,
) -> impl futures_util::Stream<Item = Result<Bytes, BodyError>> + Send + 'static {
    const CHUNK: u64 = 1024 * 1024;
    futures_util::stream::unfold(0u64, move |at| async move {
        if fail_at.is_some_and(|f| at >= f) {
            return (at != u64::MAX)
                .then(|| (Err(BodyError::Io("failed on purpose".into())), u64::MAX));
        }
        if at >= n {
            return None;
        }
        let mut len = CHUNK.min(n - at);
        if let Some(f) = fail_at {
            len = len.min(f - at);
        }
        Some((Ok(pattern_chunk(at, len as usize)), at + len))
    })
}

/// Streams of `get_endless` not yet dropped, in this process.
pub static ENDLESS_ALIVE: AtomicUsize = AtomicUsize::new(0);

/// Counts itself in [`ENDLESS_ALIVE`] while it lives.
struct Alive;

impl Alive {
    fn new() -> Self {
        ENDLESS_ALIVE.fetch_add(1, Ordering::SeqCst);
        Alive
    }
}

impl Drop for Alive {
    fn drop(&mut self) {
        ENDLESS_ALIVE.fetch_sub(1, Ordering::SeqCst);
    }
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

/// Point the stores of `settings` (queued events, the topic log) at a directory of their own
/// that does not exist yet (made only if something is stored), never the user's default state
/// directory: nodes of tests running at the same time would otherwise open the same store.
pub fn own_data_dir(settings: &mut restpipe::config::Settings) {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("restpipe-test-{}-{n}", std::process::id()));
    settings.queue.data_dir = dir.clone();
    if settings.pubsub.data_dir.is_some() {
        settings.pubsub.data_dir = Some(dir);
    }
}
