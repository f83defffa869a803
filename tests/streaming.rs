//! Bodies of any size through the pipe, with credit-based flow control, as a caller of the
//! front door sees them: real `restpipe` processes ([`restpipe_testkit::procs`]) on port 0,
//! one server node and one client node (`edge-1`), both with the `time` and `files` plug-ins
//! (and `forward` to an upstream of the test where a test needs it).
//!
//! - a 1 GiB file downloads byte for byte (SHA-256), with `Content-Length`, and neither node
//!   grows by more than 64 MiB; a file of the server node downloads through a client node;
//! - a 1 GiB upload streams through `forward` to an upstream that hashes it as it comes;
//! - `--max-body`: over it by `Content-Length` is 413 before the far handler is called; over
//!   it mid-way through a chunked body is 413 and the far side sees the body cut short;
//! - files: `Range`, `If-None-Match`, `HEAD`, and `ETag`/`Last-Modified` across the pipe; only
//!   allow-listed headers cross (checked with a handler of the test's own, in process);
//! - a caller that goes away mid-download cancels the read on the far node (the file is
//!   closed there); a far node killed mid-download leaves the caller an incomplete response
//!   (`curl` fails), never a complete-looking one;
//! - `X-Event-Timeout-Ms` bounds the time to the reply's start, not a long body's transfer;
//! - (ignored, timing) small calls keep their latency during a 1 GiB transfer.
//!
//! Memory is read from `/proc/<pid>/status` of each node: the peak resident memory during the
//! transfer (`VmHWM`, reset at the start) less the resident memory before it
//! ([`MemoryMark`]). Every figure is printed (`--nocapture`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use hyper_util::rt::TokioIo;
use restpipe::app::{self, RunningNode};
use restpipe::handler::{Context, HandlerError, Reply, Request};
use restpipe::http::{HttpOptions, Pipe};
use restpipe::{ClientNode, Metrics, ServerNode};
use restpipe_testkit::bulk::*;
use restpipe_testkit::certs::*;
use restpipe_testkit::http::{http_client, listed_clients};
use restpipe_testkit::nodes::{client_options, server_options, test_handlers, test_pipe};
use restpipe_testkit::procs::*;
use restpipe_testkit::wait::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The client node's identity.
const ID: &str = "edge-1";

/// The most a node may grow while a body of any size crosses it.
const MEMORY_BOUND_KIB: u64 = 64 * 1024;

/// The bound on one whole transfer of the test (a 1 GiB one included).
const TRANSFER_WITHIN: Duration = Duration::from_secs(50);

// ----------------------------------------------------------------------------------------
// Two nodes

/// A server node and a client node `edge-1` connected to it, as processes.
struct Pair {
    server: Node,
    client: Node,
    http: reqwest::Client,
    /// Holds the certificates and the nodes' logs; dropped after the nodes.
    _certs: Certs,
}

impl Pair {
    /// Start the server with `server_flags`, then the client with `client_flags`, and wait
    /// until the server lists the client.
    async fn start(server_flags: &[String], client_flags: &[String]) -> Pair {
        let certs = Certs::new();
        let (server, pipe) = start_server(&certs, &refs(server_flags)).await;
        let cert = certs.client(ID);
        let args = client_args(&certs, &cert, loopback(pipe), &refs(client_flags));
        let mut client = Node::start(certs.dir(), ID, args).await;
        client
            .wait_line(&["connected"], Duration::from_secs(20))
            .await;
        let http = http_client();
        let (h, s) = (&http, &server);
        let listed = wait_until_async(Duration::from_secs(20), || async move {
            listed_clients(h, s).await == [ID]
        })
        .await;
        assert!(
            listed,
            "the server never listed {ID}:\n{}",
            server.log_tail(30)
        );
        Pair {
            server,
            client,
            http,
            _certs: certs,
        }
    }

    /// The URL on the server node of the client's file `name`.
    fn client_file(&self, name: &str) -> String {
        self.server.url(&format!("/client/{ID}/file//{name}"))
    }

    /// The URL on the client node of the server's file `name`.
    fn server_file(&self, name: &str) -> String {
        self.client.url(&format!("/server/file//{name}"))
    }

    /// The logs of both nodes' last lines, for a failure message.
    fn logs(&self) -> String {
        format!(
            "--- server ---\n{}\n--- client ---\n{}",
            self.server.log_tail(20),
            self.client.log_tail(20)
        )
    }
}

/// The flags of a node: `time` and `files` (root `root`), `forward` with the route
/// `up=http://<upstream>/hash` when there is an upstream, then `more`.
fn node_flags(root: &Path, upstream: Option<SocketAddr>, more: &[&str]) -> Vec<String> {
    let handlers = if upstream.is_some() {
        "time,files,forward"
    } else {
        "time,files"
    };
    let mut flags: Vec<String> = vec![
        "--handlers".into(),
        handlers.into(),
        "--files-root".into(),
        root.display().to_string(),
    ];
    if let Some(addr) = upstream {
        flags.extend(["--forward".into(), format!("up=http://{addr}/hash")]);
    }
    flags.extend(more.iter().map(|s| s.to_string()));
    flags
}

fn refs(args: &[String]) -> Vec<&str> {
    args.iter().map(String::as_str).collect()
}

// ----------------------------------------------------------------------------------------
// Downloads

/// A response read to its end.
struct Fetched {
    status: u16,
    headers: reqwest::header::HeaderMap,
    len: u64,
    sha256: String,
    took: Duration,
}

impl Fetched {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(|v| v.to_str().unwrap())
    }
}

/// `GET url` with `headers`, the body read to its end and hashed as it comes, never held;
/// with `pace`, a pause of that long after each MiB read (a slow reader). Fails the test on a
/// transport error or after [`TRANSFER_WITHIN`].
async fn fetch(
    http: &reqwest::Client,
    url: &str,
    headers: &[(&str, &str)],
    pace: Option<Duration>,
) -> Fetched {
    let started = Instant::now();
    let fut = async {
        let mut request = http.get(url);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let mut response = request.send().await.map_err(|e| format!("send: {e}"))?;
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let mut sha = Sha256::new();
        let (mut len, mut next_pause) = (0u64, MIB);
        loop {
            match response.chunk().await {
                Ok(Some(chunk)) => {
                    sha.update(&chunk);
                    len += chunk.len() as u64;
                }
                Ok(None) => break,
                Err(e) => return Err(format!("the body failed after {len} bytes: {e}")),
            }
            if let Some(pause) = pace {
                while len >= next_pause {
                    next_pause += MIB;
                    tokio::time::sleep(pause).await;
                }
            }
        }
        Ok::<_, String>(Fetched {
            status,
            headers,
            len,
            sha256: sha.hex(),
            took: started.elapsed(),
        })
    };
    within(TRANSFER_WITHIN, &format!("GET {url}"), fut)
        .await
        .unwrap_or_else(|e| panic!("GET {url}: {e}"))
}

/// Assert that `got` is the whole of `file`: status 200, `Content-Length`, length, SHA-256.
fn assert_whole(got: &Fetched, file: &PatternFile, pair: &Pair) {
    assert_eq!(got.status, 200, "{}", pair.logs());
    assert_eq!(
        got.header("content-length"),
        Some(file.len.to_string().as_str()),
        "Content-Length"
    );
    assert_eq!(got.len, file.len, "bytes received");
    assert_eq!(got.sha256, file.sha256, "the body is not the file");
}

/// The marks of both nodes' memory.
fn marks(pair: &Pair) -> [MemoryMark; 2] {
    [pair.server.memory_mark(), pair.client.memory_mark()]
}

/// Assert that neither node grew by more than [`MEMORY_BOUND_KIB`] since `marks`, printing
/// the growth of each.
fn assert_memory_bounded(what: &str, marks: &[MemoryMark; 2]) {
    let [server, client] = [marks[0].growth_kib(), marks[1].growth_kib()];
    println!(
        "{what}: peak RSS growth server {} KiB, client {} KiB (bound {} KiB; peak reset: {})",
        server,
        client,
        MEMORY_BOUND_KIB,
        marks[0].peak_reset && marks[1].peak_reset
    );
    assert!(
        server <= MEMORY_BOUND_KIB,
        "{what}: the server node grew by {server} KiB"
    );
    assert!(
        client <= MEMORY_BOUND_KIB,
        "{what}: the client node grew by {client} KiB"
    );
}

/// A 1 GiB file served by the client node's `files` plug-in downloads through the server
/// node byte for byte: status 200, `Content-Length` of 1 GiB, the same SHA-256 (the content
/// would show a chunk out of order, repeated or lost), and neither node grows by more than
/// 64 MiB while it crosses. Then the other way round, with a 256 MiB file of the server node
/// asked through the client node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_1_gib_file_downloads_byte_for_byte_in_bounded_memory() {
    let root = tempfile::tempdir().unwrap();
    let big = write_pattern_file(&root.path().join("big.bin"), 1024, 1);
    let back = write_pattern_file(&root.path().join("back.bin"), 256, 2);
    let flags = node_flags(root.path(), None, &[]);
    let pair = Pair::start(&flags, &flags).await;

    let before = marks(&pair);
    let got = fetch(&pair.http, &pair.client_file("big.bin"), &[], None).await;
    println!(
        "1 GiB from the client node: {:?} ({:.0} MiB/s)",
        got.took,
        got.len as f64 / MIB as f64 / got.took.as_secs_f64()
    );
    assert_whole(&got, &big, &pair);
    assert_memory_bounded("1 GiB download", &before);

    let before = marks(&pair);
    let got = fetch(&pair.http, &pair.server_file("back.bin"), &[], None).await;
    println!("256 MiB from the server node: {:?}", got.took);
    assert_whole(&got, &back, &pair);
    assert_memory_bounded("256 MiB download the other way", &before);
}

// ----------------------------------------------------------------------------------------
// Uploads, through `forward` to an upstream of the test

/// What the upstream saw of one request, by its `tag` query parameter.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Seen {
    /// Its body is being read.
    Reading,
    /// Its body ended normally.
    Completed { len: u64, sha256: String },
    /// Its body broke off after `len` bytes.
    Aborted { len: u64 },
}

type SeenMap = Arc<Mutex<HashMap<String, Seen>>>;

/// An HTTP server on `127.0.0.1:0` for the `forward` plug-in: `POST /hash?tag=<tag>` reads
/// the body as it streams, hashing it and never holding it, and answers
/// `{"sha256": ..., "length": ...}`; what it saw of each tag is kept ([`Seen`]), with the
/// names of the request's headers.
struct Upstream {
    addr: SocketAddr,
    seen: SeenMap,
    headers: Arc<Mutex<HashMap<String, Vec<String>>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Upstream {
    async fn start() -> Upstream {
        let seen: SeenMap = Arc::default();
        let headers: Arc<Mutex<HashMap<String, Vec<String>>>> = Arc::default();
        let app = axum::Router::new()
            .route("/hash", axum::routing::post(hash_body))
            .with_state((seen.clone(), headers.clone()));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Upstream {
            addr,
            seen,
            headers,
            task,
        }
    }

    /// What it saw of `tag`, if anything.
    fn seen(&self, tag: &str) -> Option<Seen> {
        self.seen.lock().unwrap().get(tag).cloned()
    }

    /// The names of the headers of the request `tag`, lower case.
    fn header_names(&self, tag: &str) -> Vec<String> {
        self.headers
            .lock()
            .unwrap()
            .get(tag)
            .cloned()
            .unwrap_or_default()
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

type UpstreamState = (SeenMap, Arc<Mutex<HashMap<String, Vec<String>>>>);

async fn hash_body(
    State((seen, names)): State<UpstreamState>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    body: Body,
) -> (StatusCode, String) {
    let tag = query
        .unwrap_or_default()
        .split('&')
        .find_map(|kv| kv.strip_prefix("tag=").map(str::to_string))
        .unwrap_or_default();
    names.lock().unwrap().insert(
        tag.clone(),
        headers.keys().map(|k| k.as_str().to_string()).collect(),
    );
    seen.lock().unwrap().insert(tag.clone(), Seen::Reading);
    let mut stream = body.into_data_stream();
    let mut sha = Sha256::new();
    let mut len = 0u64;
    while let Some(chunk) = stream.next().await {
        match chunk {
            Ok(chunk) => {
                sha.update(&chunk);
                len += chunk.len() as u64;
            }
            Err(e) => {
                seen.lock().unwrap().insert(tag, Seen::Aborted { len });
                return (StatusCode::BAD_REQUEST, format!("aborted: {e}"));
            }
        }
    }
    let sha256 = sha.hex();
    let answer = serde_json::json!({ "sha256": sha256, "length": len }).to_string();
    seen.lock()
        .unwrap()
        .insert(tag, Seen::Completed { len, sha256 });
    (StatusCode::OK, answer)
}

/// A body of `mib` MiB of [`Pattern`] content from `seed`, as a stream made as it is sent;
/// the receiver gets its SHA-256 once the last block has been handed out (not at the end of
/// the stream: a client that sends `Content-Length` stops polling once it has that many
/// bytes).
fn pattern_stream(
    seed: u64,
    mib: u64,
) -> (
    impl Stream<Item = Bytes> + Send + 'static,
    tokio::sync::oneshot::Receiver<String>,
) {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let state = (Pattern::new(seed, mib), Some(Sha256::new()), Some(tx));
    let stream = futures_util::stream::unfold(state, |(mut pattern, mut sha, mut tx)| async move {
        let block = pattern.next()?;
        if let Some(digest) = sha.as_mut() {
            digest.update(&block);
        }
        if pattern.remaining() == 0 {
            if let (Some(digest), Some(tx)) = (sha.take(), tx.take()) {
                let _ = tx.send(digest.hex());
            }
        }
        Some((block, (pattern, sha, tx)))
    });
    (stream, rx)
}

/// `POST path` to `addr` with a body streamed from `body` (with `Content-Length:
/// content_length` when given, else chunked), over hyper's HTTP/1.1 client: status and body
/// of the answer.
async fn post_stream(
    addr: SocketAddr,
    path: &str,
    content_length: Option<u64>,
    body: impl Stream<Item = Bytes> + Send + 'static,
) -> Result<(u16, Bytes), String> {
    let tcp = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    let conn = tokio::spawn(async move {
        let _ = conn.await;
    });
    let body = StreamBody::new(body.map(|b| Ok::<_, Infallible>(Frame::data(b))));
    let mut request = hyper::Request::post(path)
        .header(hyper::header::HOST, addr.to_string())
        .header(hyper::header::CONTENT_TYPE, "application/octet-stream");
    if let Some(n) = content_length {
        request = request.header(hyper::header::CONTENT_LENGTH, n);
    }
    let request = request.body(body).map_err(|e| e.to_string())?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| format!("send: {e}"))?;
    let status = response.status().as_u16();
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(|e| format!("answer body: {e}"))?
        .to_bytes();
    conn.abort();
    Ok((status, body))
}

/// A 1 GiB upload, its body made as it is sent, `POST`ed on the client node to the server's
/// `forward` route: the upstream reads it as a stream and gets every byte in order (its
/// SHA-256 and length, which it also answers back through the pipe), the default
/// `--max-body` (4 GiB) lets it through, and neither node grows by more than 64 MiB.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_1_gib_upload_streams_through_forward_in_bounded_memory() {
    let root = tempfile::tempdir().unwrap();
    let upstream = Upstream::start().await;
    let pair = Pair::start(
        &node_flags(root.path(), Some(upstream.addr), &[]),
        &node_flags(root.path(), None, &[]),
    )
    .await;

    let before = marks(&pair);
    let (body, sent_sha) = pattern_stream(3, 1024);
    let started = Instant::now();
    let (status, answer) = within(
        TRANSFER_WITHIN,
        "the 1 GiB upload",
        post_stream(pair.client.http, "/server/up?tag=big", Some(GIB), body),
    )
    .await
    .unwrap_or_else(|e| panic!("the upload failed: {e}\n{}", pair.logs()));
    let took = started.elapsed();
    let sent_sha = sent_sha.await.expect("the whole body was sent");
    println!(
        "1 GiB upload: {took:?} ({:.0} MiB/s)",
        1024.0 / took.as_secs_f64()
    );
    let answer_text = String::from_utf8_lossy(&answer);
    assert_eq!(status, 200, "{answer_text}\n{}", pair.logs());
    let answer: serde_json::Value = serde_json::from_slice(&answer).unwrap();
    assert_eq!(answer["length"], GIB, "{answer}");
    assert_eq!(answer["sha256"], sent_sha, "{answer}");
    assert_eq!(
        upstream.seen("big"),
        Some(Seen::Completed {
            len: GIB,
            sha256: sent_sha
        })
    );
    assert_memory_bounded("1 GiB upload", &before);
}

// ----------------------------------------------------------------------------------------
// --max-body

/// The `--max-body` of the nodes in the limit tests: 1 MiB.
const MAX_BODY: u64 = MIB;

/// Write `head` (a request head ending in an empty line) to `addr`, then, when `chunked` is
/// `Some(total)`, a chunked body of `total` bytes in 64 KiB chunks, as fast as the socket
/// takes it (write errors are ignored: the node may close early). The status of the answer,
/// read while the body is still being written.
async fn status_of_raw_post(addr: SocketAddr, head: String, chunked: Option<u64>) -> u16 {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (mut reader, mut writer) = stream.into_split();
    writer.write_all(head.as_bytes()).await.unwrap();
    let writing = tokio::spawn(async move {
        let Some(total) = chunked else {
            return writer;
        };
        let chunk = vec![0x5au8; 64 * 1024];
        let mut sent = 0u64;
        while sent < total {
            let frame = [
                format!("{:x}\r\n", chunk.len()).into_bytes(),
                chunk.clone(),
                b"\r\n".to_vec(),
            ]
            .concat();
            if writer.write_all(&frame).await.is_err() {
                return writer;
            }
            sent += chunk.len() as u64;
        }
        let _ = writer.write_all(b"0\r\n\r\n").await;
        writer
    });
    let read_head = async {
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        while !got.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = reader
                .read(&mut buf)
                .await
                .unwrap_or_else(|e| panic!("reading the answer after {got:?}: {e}"));
            assert!(n > 0, "the node closed without an answer: {got:?}");
            got.extend_from_slice(&buf[..n]);
        }
        got
    };
    let got = within(Duration::from_secs(20), "the answer's head", read_head).await;
    let _writer = writing.await.unwrap();
    let head = String::from_utf8_lossy(&got);
    head.split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status in {head:?}"))
}

/// The request head of `POST target` to `addr` with `framing` (`Content-Length: n` or
/// `Transfer-Encoding: chunked`).
fn post_head(addr: SocketAddr, target: &str, framing: &str) -> String {
    format!(
        "POST {target} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/octet-stream\r\n\
         {framing}\r\nConnection: close\r\n\r\n"
    )
}

/// Both nodes with `--max-body 1048576`, each with `forward` to the test's upstream. On each
/// node, a `POST` whose `Content-Length` is one byte over the limit is answered 413 from its
/// head alone (no byte of body is sent), and the upstream never sees it; a body of exactly
/// the limit goes through whole, on the same route, right after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_declared_body_over_max_body_is_413_and_the_far_handler_is_never_called() {
    let root = tempfile::tempdir().unwrap();
    let upstream = Upstream::start().await;
    let limit = MAX_BODY.to_string();
    let flags = node_flags(root.path(), Some(upstream.addr), &["--max-body", &limit]);
    let pair = Pair::start(&flags, &flags).await;

    for (node, path) in [
        (&pair.client, "/server/up".to_string()),
        (&pair.server, format!("/client/{ID}/up")),
    ] {
        let over = format!("over-{}", node.name);
        let head = post_head(
            node.http,
            &format!("{path}?tag={over}"),
            &format!("Content-Length: {}", MAX_BODY + 1),
        );
        let status = status_of_raw_post(node.http, head, None).await;
        assert_eq!(
            status,
            413,
            "{} answered {status}\n{}",
            node.name,
            pair.logs()
        );

        // The same route right after, with a body of exactly the limit: it goes through, so
        // the refused one would have been seen by now had it been sent.
        let at = format!("at-{}", node.name);
        let (body, sent_sha) = pattern_stream(4, 1);
        let (status, answer) =
            post_stream(node.http, &format!("{path}?tag={at}"), Some(MAX_BODY), body)
                .await
                .unwrap();
        assert_eq!(
            status,
            200,
            "{}: {}\n{}",
            node.name,
            String::from_utf8_lossy(&answer),
            pair.logs()
        );
        let sent_sha = sent_sha.await.unwrap();
        assert_eq!(
            upstream.seen(&at),
            Some(Seen::Completed {
                len: MAX_BODY,
                sha256: sent_sha
            })
        );
        assert_eq!(
            upstream.seen(&over),
            None,
            "the upstream was called for a body refused by its length ({})",
            node.name
        );
    }
}

/// Both nodes with `--max-body 1048576`, each with `forward` to the test's upstream. On each
/// node, a chunked `POST` of 4 MiB (no length known in advance) is answered 413 once it goes
/// over the limit, and the far side never completes it: the upstream either never sees the
/// request or sees its body break off, with no more than the limit read, within 5 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunked_body_over_max_body_is_413_and_the_far_side_sees_it_aborted() {
    let root = tempfile::tempdir().unwrap();
    let upstream = Upstream::start().await;
    let limit = MAX_BODY.to_string();
    let flags = node_flags(root.path(), Some(upstream.addr), &["--max-body", &limit]);
    let pair = Pair::start(&flags, &flags).await;

    for (node, path) in [
        (&pair.client, "/server/up".to_string()),
        (&pair.server, format!("/client/{ID}/up")),
    ] {
        let tag = format!("chunked-{}", node.name);
        let head = post_head(
            node.http,
            &format!("{path}?tag={tag}"),
            "Transfer-Encoding: chunked",
        );
        let status = status_of_raw_post(node.http, head, Some(4 * MAX_BODY)).await;
        assert_eq!(
            status,
            413,
            "{} answered {status}\n{}",
            node.name,
            pair.logs()
        );

        // The far side ends its side of it: the upstream's read breaks off (or it was never
        // called at all).
        let ended = wait_until(Duration::from_secs(5), || {
            matches!(
                upstream.seen(&tag),
                Some(Seen::Aborted { .. } | Seen::Completed { .. })
            )
        })
        .await;
        let seen = upstream.seen(&tag);
        println!(
            "chunked over the limit on the {} node: the upstream saw {seen:?}",
            node.name
        );
        match seen {
            None => assert!(!ended),
            Some(Seen::Aborted { len }) => assert!(
                len <= MAX_BODY,
                "the upstream read {len} bytes of a body over the limit of {MAX_BODY}"
            ),
            Some(Seen::Reading) => panic!(
                "5 s after the 413, the upstream still waits for the rest of the body \
                 ({}):\n{}",
                node.name,
                pair.logs()
            ),
            Some(Seen::Completed { len, .. }) => panic!(
                "the upstream got a complete body of {len} bytes for a request answered 413 ({})",
                node.name
            ),
        }
    }
}

// ----------------------------------------------------------------------------------------
// Files: ranges, conditions, HEAD

/// An answer read off the socket as the node wrote it (`Connection: close`, read to EOF).
#[derive(Debug)]
struct RawAnswer {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl RawAnswer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// `method target` to `addr` with `extra` header lines, `Connection: close`, and everything
/// the node writes back until it closes.
async fn raw_request(addr: SocketAddr, method: &str, target: &str, extra: &[&str]) -> RawAnswer {
    let mut request = format!("{method} {target} HTTP/1.1\r\nHost: {addr}\r\n");
    for line in extra {
        request.push_str(line);
        request.push_str("\r\n");
    }
    request.push_str("Connection: close\r\n\r\n");
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut bytes = Vec::new();
    within(
        Duration::from_secs(20),
        &format!("{method} {target}"),
        stream.read_to_end(&mut bytes),
    )
    .await
    .unwrap();
    let split = bytes
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no end of head in {:?}", String::from_utf8_lossy(&bytes)));
    let head = String::from_utf8_lossy(&bytes[..split]).into_owned();
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status in {head:?}"));
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    RawAnswer {
        status,
        headers,
        body: bytes[split + 4..].to_vec(),
    }
}

/// A file of the client node, asked through the server node: a plain `GET` carries `ETag`
/// and `Last-Modified` across the pipe; `Range: bytes=10-19` is 206 with
/// `Content-Range: bytes 10-19/<size>` and exactly those ten bytes; a range from the size on
/// is 416; `If-None-Match` with the `ETag` is 304 with no body; `HEAD` is 200 with
/// `Content-Length` of the file's size and no body (the last two read off the socket, so that
/// a body sent anyway would show).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ranges_conditions_and_head_of_a_file_cross_the_pipe() {
    let root = tempfile::tempdir().unwrap();
    let file = write_pattern_file(&root.path().join("small.bin"), 1, 5);
    let content = std::fs::read(&file.path).unwrap();
    let size = file.len;
    let flags = node_flags(root.path(), None, &[]);
    let pair = Pair::start(&flags, &flags).await;
    let url = pair.client_file("small.bin");
    let target = format!("/client/{ID}/file//small.bin");

    let whole = fetch(&pair.http, &url, &[], None).await;
    assert_whole(&whole, &file, &pair);
    let etag = whole
        .header("etag")
        .unwrap_or_else(|| panic!("no ETag crossed: {:?}", whole.headers))
        .to_string();
    let modified = whole
        .header("last-modified")
        .unwrap_or_else(|| panic!("no Last-Modified crossed: {:?}", whole.headers))
        .to_string();
    assert!(!etag.is_empty() && !modified.is_empty());

    let response = pair
        .http
        .get(&url)
        .header("Range", "bytes=10-19")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 206, "{response:?}");
    assert_eq!(
        response.headers()["content-range"],
        format!("bytes 10-19/{size}").as_str()
    );
    assert_eq!(&response.bytes().await.unwrap()[..], &content[10..20]);

    let response = pair
        .http
        .get(&url)
        .header("Range", format!("bytes={size}-"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 416, "{response:?}");

    let if_none_match = format!("If-None-Match: {etag}");
    let answer = raw_request(pair.server.http, "GET", &target, &[&if_none_match]).await;
    assert_eq!(answer.status, 304, "{answer:?}");
    assert!(
        answer.body.is_empty(),
        "a 304 with {} bytes of body",
        answer.body.len()
    );
    assert_eq!(answer.header("etag"), Some(etag.as_str()), "{answer:?}");

    let answer = raw_request(pair.server.http, "HEAD", &target, &[]).await;
    assert_eq!(answer.status, 200, "{answer:?}");
    assert_eq!(
        answer.header("content-length"),
        Some(size.to_string().as_str()),
        "{answer:?}"
    );
    assert!(
        answer.body.is_empty(),
        "a HEAD answered with {} bytes of body",
        answer.body.len()
    );
    assert_eq!(answer.header("etag"), Some(etag.as_str()), "{answer:?}");
    assert_eq!(
        answer.header("last-modified"),
        Some(modified.as_str()),
        "{answer:?}"
    );
}

/// Only the allow-listed headers cross: in process, a handler of the test's own on the client
/// node reports the headers of its request and answers with `ETag`, `Last-Modified` and
/// `Cache-Control`, and tries `X-Custom` and `Set-Cookie`. Asked through the server node's
/// front door with `Cookie`, `X-Custom`, `If-None-Match`, `Range` and `Accept`: the handler
/// sees the last three only, with their values, and the caller gets the reply's allowed
/// headers and none of the others.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_allow_listed_headers_cross_the_pipe() {
    let loopback0: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let pki = Pki::new();
    let pipe = test_pipe();
    let http_options = HttpOptions {
        max_body: pipe.max_body,
        token: None,
        metrics: Metrics::disabled(),
        queue: None,
    };
    let server = ServerNode::start(server_options(&pki, loopback0, pipe.clone()))
        .await
        .unwrap();
    let server_http: RunningNode =
        app::start_http(Pipe::Server(server.clone()), http_options, loopback0)
            .await
            .unwrap();
    let mut options = client_options(&pki, ID, server.local_addr(), pipe);
    let mut handlers = test_handlers(ID);
    handlers.add("get_headers", |_ctx: Context, req: Request| async move {
        let seen: serde_json::Map<String, serde_json::Value> = req
            .headers
            .iter()
            .map(|(n, v)| (n.to_string(), v.into()))
            .collect();
        let body = serde_json::to_vec(&seen)?;
        Ok::<_, HandlerError>(
            Reply::bytes("application/json", body)
                .with_header("etag", "\"v1\"")
                .with_header("last-modified", "Wed, 21 Oct 2015 07:28:00 GMT")
                .with_header("cache-control", "no-store")
                .with_header("x-custom", "from-the-handler")
                .with_header("set-cookie", "a=b"),
        )
    });
    options.node.handlers = handlers;
    let client = ClientNode::start(options).unwrap();
    client.wait_connected(Duration::from_secs(5)).await.unwrap();
    restpipe_testkit::nodes::wait_for_client(&server, ID).await;

    let response = http_client()
        .get(format!(
            "http://{}/client/{ID}/headers",
            server_http.http_addr
        ))
        .header("Cookie", "session=secret")
        .header("X-Custom", "from-the-caller")
        .header("If-None-Match", "\"abc\"")
        .header("Range", "bytes=0-0")
        .header("Accept", "application/json")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 200, "{response:?}");
    let headers = response.headers().clone();
    let seen: serde_json::Value = response.json().await.unwrap();
    println!("the handler saw {seen}");
    assert_eq!(seen["if-none-match"], "\"abc\"", "{seen}");
    assert_eq!(seen["range"], "bytes=0-0", "{seen}");
    assert_eq!(seen["accept"], "application/json", "{seen}");
    for name in ["cookie", "x-custom", "host", "user-agent", "connection"] {
        assert!(seen.get(name).is_none(), "{name} crossed: {seen}");
    }
    assert_eq!(headers["etag"], "\"v1\"");
    assert_eq!(headers["last-modified"], "Wed, 21 Oct 2015 07:28:00 GMT");
    assert_eq!(headers["cache-control"], "no-store");
    assert!(headers.get("x-custom").is_none(), "{headers:?}");
    assert!(headers.get("set-cookie").is_none(), "{headers:?}");
    drop(server_http);
    drop(client);
}

/// Through `forward`, the upstream sees none of the caller's headers that are not on the
/// allow-list: `Cookie`, `X-Custom` and `Authorization`-like secrets of the caller stay at
/// the front door.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_callers_other_headers_never_reach_a_forward_upstream() {
    let root = tempfile::tempdir().unwrap();
    let upstream = Upstream::start().await;
    let pair = Pair::start(
        &node_flags(root.path(), Some(upstream.addr), &[]),
        &node_flags(root.path(), None, &[]),
    )
    .await;
    let response = pair
        .http
        .post(pair.client.url("/server/up?tag=headers"))
        .header("Cookie", "session=secret")
        .header("X-Custom", "from-the-caller")
        .header("X-Api-Key", "secret")
        .body("hello")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 200, "{response:?}");
    assert_eq!(
        upstream.seen("headers"),
        Some(Seen::Completed {
            len: 5,
            sha256: sha256_hex(b"hello")
        })
    );
    let names = upstream.header_names("headers");
    println!("the upstream saw the headers {names:?}");
    for name in ["cookie", "x-custom", "x-api-key"] {
        assert!(
            !names.iter().any(|n| n == name),
            "{name} crossed: {names:?}"
        );
    }
}

// ----------------------------------------------------------------------------------------
// Cancellation and truncation

/// A caller that goes away after the first MiB of a 256 MiB file cancels the read on the
/// client node serving it: the node had the file open while the body streamed, and closes it
/// soon after the caller's connection closes (the time is printed; the aim is 100 ms, the
/// bound of the wait is 2 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_that_goes_away_cancels_the_read_on_the_far_node() {
    let root = tempfile::tempdir().unwrap();
    let file = write_pattern_file(&root.path().join("big.bin"), 256, 6);
    let flags = node_flags(root.path(), None, &[]);
    let pair = Pair::start(&flags, &flags).await;

    let mut response = pair
        .http
        .get(pair.client_file("big.bin"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 200, "{}", pair.logs());
    let mut got = 0u64;
    while got < MIB {
        let chunk = within(Duration::from_secs(20), "the first MiB", response.chunk())
            .await
            .unwrap()
            .expect("more body");
        got += chunk.len() as u64;
    }
    assert!(
        wait_until(Duration::from_secs(2), || pair.client.has_open(&file.path)).await,
        "the client node does not have {} open while it streams it",
        file.path.display()
    );

    drop(response);
    let dropped = Instant::now();
    let closed = wait_until(Duration::from_secs(2), || !pair.client.has_open(&file.path)).await;
    let took = dropped.elapsed();
    println!("the far node closed the file {took:?} after the caller went away (aim: 100 ms)");
    assert!(
        closed,
        "2 s after the caller went away, the client node still reads the file\n{}",
        pair.logs()
    );
}

/// The client node serving a 256 MiB file is killed (SIGKILL) mid-download: `curl`, asking
/// through the server node, must fail (exit 18, partial file, or 56, failure receiving),
/// never exit 0 with a response that looks whole; what it wrote is short of the file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_far_node_killed_mid_download_leaves_the_response_incomplete() {
    let root = tempfile::tempdir().unwrap();
    let file = write_pattern_file(&root.path().join("big.bin"), 256, 7);
    let flags = node_flags(root.path(), None, &[]);
    let mut pair = Pair::start(&flags, &flags).await;
    let scratch = tempfile::tempdir().unwrap();
    let out = scratch.path().join("out.bin");

    let mut curl = curl_download(&pair.client_file("big.bin"), &out, &[]);
    let size = || std::fs::metadata(&out).map(|m| m.len()).unwrap_or(0);
    let started = wait_until(Duration::from_secs(20), || size() >= MIB).await;
    assert!(
        started,
        "curl got {} bytes in 20 s (exit {:?})\n{}",
        size(),
        curl.try_wait(),
        pair.logs()
    );
    assert_eq!(
        curl.try_wait().unwrap(),
        None,
        "curl ended before the kill: the file went through too fast to test this"
    );

    pair.client.kill();
    let status = within(Duration::from_secs(20), "curl's end", curl.wait())
        .await
        .unwrap();
    let mut stderr = String::new();
    if let Some(mut err) = curl.stderr.take() {
        let _ = err.read_to_string(&mut stderr).await;
    }
    println!(
        "curl after the far node's SIGKILL: {status} ({}), {} of {} bytes",
        stderr.trim(),
        size(),
        file.len
    );
    assert_ne!(
        status.code(),
        Some(0),
        "curl saw a complete response from a node killed mid-body"
    );
    assert!(size() < file.len, "curl wrote the whole file");
}

// ----------------------------------------------------------------------------------------
// Deadlines

/// `X-Event-Timeout-Ms: 1000` bounds the time to the reply's start only: a 128 MiB file read
/// by a slow caller (a 20 ms pause after each MiB, so at least 2.5 s in all) comes whole,
/// though it takes longer than the timeout. That the body was still crossing after the
/// timeout, and not all held in buffers on the way by then, is checked: 1.5 s after the call
/// began, the far node still has the file open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_event_timeout_bounds_the_reply_start_not_a_long_body() {
    let root = tempfile::tempdir().unwrap();
    let file = write_pattern_file(&root.path().join("slow.bin"), 128, 8);
    let flags = node_flags(root.path(), None, &[]);
    let pair = Pair::start(&flags, &flags).await;

    let began = tokio::time::Instant::now();
    let past_the_timeout = async {
        // A sample at a point in time, not a wait for an event.
        tokio::time::sleep_until(began + Duration::from_millis(1500)).await;
        pair.client.has_open(&file.path)
    };
    let url = pair.client_file("slow.bin");
    let (got, still_reading) = tokio::join!(
        fetch(
            &pair.http,
            &url,
            &[("X-Event-Timeout-Ms", "1000")],
            Some(Duration::from_millis(20)),
        ),
        past_the_timeout
    );
    println!(
        "128 MiB with a 1000 ms event timeout, read slowly: {:?}; the far node still read \
         the file at 1.5 s: {still_reading}",
        got.took
    );
    assert_whole(&got, &file, &pair);
    assert!(
        got.took > Duration::from_secs(2),
        "the slow read took only {:?}: it does not test the timeout",
        got.took
    );
    assert!(
        still_reading,
        "the far node had sent the whole file within 1.5 s: the body did not outlast the \
         timeout, so this does not test it"
    );
}

// ----------------------------------------------------------------------------------------
// Fairness

/// The p99 of `latencies`.
fn p99(latencies: &mut [Duration]) -> Duration {
    latencies.sort();
    let at = (latencies.len() * 99).div_ceil(100) - 1;
    latencies[at]
}

/// 200 sequential `GET /client/edge-1/time` through the server node: their latencies.
async fn time_latencies(pair: &Pair, n: usize) -> Vec<Duration> {
    let url = pair.server.url(&format!("/client/{ID}/time"));
    let mut latencies = Vec::with_capacity(n);
    for _ in 0..n {
        let at = Instant::now();
        let status = within(Duration::from_secs(10), "a time call", async {
            let response = pair.http.get(&url).send().await.unwrap();
            let status = response.status().as_u16();
            response.bytes().await.unwrap();
            status
        })
        .await;
        latencies.push(at.elapsed());
        assert_eq!(status, 200);
    }
    latencies
}

/// During a 1 GiB download over the pipe, `GET /client/edge-1/time` over the same pipe keeps
/// its p99 within 5 times its idle p99 and under 20 ms (200 calls each). Timing on a shared
/// machine: run by hand; the benchmark carries the figure.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "timing: run by hand or in the bench"]
async fn small_calls_keep_their_latency_during_a_1_gib_transfer() {
    let root = tempfile::tempdir().unwrap();
    write_pattern_file(&root.path().join("big.bin"), 1024, 9);
    let flags = node_flags(root.path(), None, &[]);
    let pair = Pair::start(&flags, &flags).await;

    let idle = p99(&mut time_latencies(&pair, 200).await);

    let received = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let download = {
        let (http, url, received) = (
            pair.http.clone(),
            pair.client_file("big.bin"),
            received.clone(),
        );
        tokio::spawn(async move {
            let mut response = http.get(url).send().await.unwrap();
            while let Ok(Some(chunk)) = response.chunk().await {
                received.fetch_add(chunk.len() as u64, std::sync::atomic::Ordering::Relaxed);
            }
        })
    };
    let flowing = wait_until(Duration::from_secs(20), || {
        received.load(std::sync::atomic::Ordering::Relaxed) >= 16 * MIB
    })
    .await;
    assert!(flowing, "the transfer did not start\n{}", pair.logs());
    let busy = p99(&mut time_latencies(&pair, 200).await);
    let moved = received.load(std::sync::atomic::Ordering::Relaxed);
    let still_going = !download.is_finished();
    download.abort();
    println!(
        "time p99: idle {idle:?}, during the transfer {busy:?} ({} MiB moved meanwhile)",
        moved / MIB
    );
    assert!(
        still_going,
        "the transfer ended before the 200 calls did: the measurement is not during it"
    );
    assert!(
        busy <= idle * 5,
        "p99 {busy:?} is over 5 x the idle {idle:?}"
    );
    assert!(busy < Duration::from_millis(20), "p99 {busy:?}");
}
