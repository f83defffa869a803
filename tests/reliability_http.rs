//! Hostile input on the local HTTP front door, written to the socket byte for byte where an
//! HTTP client library would normalise it: path traversal in nouns and in the `files`
//! handler's parameters, bad percent-encoding and invalid UTF-8, huge headers, bodies over the
//! limit (declared, chunked, lying), methods outside the list, and wrong or missing bearer
//! tokens. (tests/http.rs covers the ordinary 4xx cases; these are the ones an attacker adds.)
//!
//! Each input gets a clear 4xx, or for a head too large to parse, a 431 or a closed
//! connection. Nothing that must be refused at the front door crosses the pipe (the far side's
//! count of events received does not move), the handlers that must not run are never called,
//! nothing from outside the files root ever comes back, and both nodes serve normally
//! afterwards on the same connection. Each test prints a table of what was sent and answered
//! (`--nocapture`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use restpipe::app::{self, RunningNode};
use restpipe::handler::{Context, HandlerError, Reply, Request};
use restpipe::http::{HttpOptions, Pipe};
use restpipe::{ClientNode, Metrics, PipeConfig, ServerNode};
use restpipe_handler_files::FilesPlugin;
use restpipe_testkit::certs::*;
use restpipe_testkit::nodes::*;
use restpipe_testkit::wait::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const CLIENT_ID: &str = "worker-1";
const TOKEN: &str = "s3cret-token";
/// The body limit of these nodes (`--max-frame`).
const LIMIT: usize = 64 * 1024;
/// What the file outside the files root holds; it must never come back.
const SECRET: &str = "TOP-SECRET-OUTSIDE-THE-ROOT";

/// A server and a client (`worker-1`), each behind a front door, with a counting handler
/// (`post_count`, `get_count`) on both sides and the `files` plug-in on the client, whose root
/// has a sibling file holding [`SECRET`].
struct Pair {
    server: ServerNode,
    client: ClientNode,
    server_http: RunningNode,
    client_http: RunningNode,
    /// Calls of the counting handlers, either side.
    calls: Arc<AtomicUsize>,
    _files: tempfile::TempDir,
}

impl Pair {
    async fn start(token: Option<&str>) -> Pair {
        let files = tempfile::tempdir().unwrap();
        let root = files.path().join("root");
        std::fs::create_dir_all(root.join("reports")).unwrap();
        std::fs::write(root.join("reports/q3.csv"), "quarter,revenue\nq3,42\n").unwrap();
        std::fs::write(files.path().join("secret.txt"), SECRET).unwrap();

        let pki = Pki::new();
        let pipe = PipeConfig {
            max_frame: LIMIT,
            ..test_pipe()
        };
        let calls = Arc::new(AtomicUsize::new(0));
        let counting = |node: &str| {
            let mut handlers = test_handlers(node);
            for name in ["post_count", "get_count"] {
                let calls = calls.clone();
                handlers.add(name, move |_ctx: Context, _req: Request| {
                    let calls = calls.clone();
                    async move {
                        calls.fetch_add(1, Ordering::SeqCst);
                        Ok::<_, HandlerError>(Reply::text("counted"))
                    }
                });
            }
            handlers
        };
        let http_options = HttpOptions {
            max_body: LIMIT as u64,
            token: token.map(str::to_string),
            metrics: Metrics::disabled(),
            queue: None,
        };
        let loopback0: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let mut options = server_options(&pki, loopback0, pipe.clone());
        options.node.handlers = counting("server");
        let server = ServerNode::start(options).await.unwrap();
        let server_http = app::start_http(
            Pipe::Server(server.clone()),
            http_options.clone(),
            loopback0,
        )
        .await
        .unwrap();
        let mut options = client_options(&pki, CLIENT_ID, server.local_addr(), pipe);
        options.node.handlers = counting(CLIENT_ID);
        options.node.plugins = vec![Arc::new(FilesPlugin::new(&root).unwrap())];
        let client = ClientNode::start(options).unwrap();
        client.wait_connected(Duration::from_secs(5)).await.unwrap();
        wait_for_client(&server, CLIENT_ID).await;
        let client_http = app::start_http(Pipe::Client(client.clone()), http_options, loopback0)
            .await
            .unwrap();
        Pair {
            server,
            client,
            server_http,
            client_http,
            calls,
            _files: files,
        }
    }

    /// Events received so far: by the server (from the client) and by the client (from the
    /// server).
    fn received(&self) -> (u64, u64) {
        let by_server = self
            .server
            .registry()
            .find(CLIENT_ID)
            .unwrap()
            .status()
            .requests_received;
        let by_client = self.client.status().unwrap().requests_received;
        (by_server, by_client)
    }

    /// The connection ids on both sides.
    fn connections(&self) -> (u64, u64) {
        (
            self.server.registry().find(CLIENT_ID).unwrap().id(),
            self.client.connection().unwrap().id(),
        )
    }

    /// Good requests both ways are served (with the token when one is set).
    async fn assert_serves(&self, token: Option<&str>) {
        let auth = token
            .map(|t| format!("Authorization: Bearer {t}\r\n"))
            .unwrap_or_default();
        for (addr, path) in [
            (self.client_http.http_addr, "/server/whoami".to_string()),
            (
                self.server_http.http_addr,
                format!("/client/{CLIENT_ID}/whoami"),
            ),
        ] {
            let answer = raw(
                addr,
                format!(
                    "GET {path} HTTP/1.1\r\nHost: localhost\r\n{auth}Connection: close\r\n\r\n"
                )
                .as_bytes(),
            )
            .await;
            assert_eq!(answer.status, Some(200), "{path}: {answer:?}");
        }
    }
}

/// What a node answered to raw bytes: its status, if it answered at all, and the body.
#[derive(Debug)]
struct Answer {
    status: Option<u16>,
    head: String,
    body: Vec<u8>,
}

impl Answer {
    fn body_text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Write `request` to `addr` (ignoring a write the node cut short) and read until it closes,
/// within 10 s. No status when the node closed without an answer.
async fn raw(addr: SocketAddr, request: &[u8]) -> Answer {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let _ = stream.write_all(request).await;
    let mut bytes = Vec::new();
    let read = within(
        Duration::from_secs(10),
        "the node's answer to raw bytes",
        async {
            let mut chunk = vec![0u8; 64 * 1024];
            loop {
                match stream.read(&mut chunk).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => bytes.extend_from_slice(&chunk[..n]),
                }
            }
        },
    );
    read.await;
    let split = bytes.windows(4).position(|w| w == b"\r\n\r\n");
    let Some(split) = split else {
        return Answer {
            status: None,
            head: String::from_utf8_lossy(&bytes).into_owned(),
            body: Vec::new(),
        };
    };
    let head = String::from_utf8_lossy(&bytes[..split]).into_owned();
    let status = head.split(' ').nth(1).and_then(|s| s.parse::<u16>().ok());
    Answer {
        status,
        head,
        body: bytes[split + 4..].to_vec(),
    }
}

/// `METHOD target` with `headers` (each ending in `\r\n`) and `body`, `Connection: close`.
fn request(method: &str, target: &[u8], headers: &str, body: &[u8]) -> Vec<u8> {
    let mut bytes = format!("{method} ").into_bytes();
    bytes.extend_from_slice(target);
    bytes.extend_from_slice(
        format!(" HTTP/1.1\r\nHost: 127.0.0.1\r\n{headers}Connection: close\r\n\r\n").as_bytes(),
    );
    bytes.extend_from_slice(body);
    bytes
}

fn get(target: &str) -> Vec<u8> {
    request("GET", target.as_bytes(), "", b"")
}

/// What a case must get.
#[derive(Clone, Copy, Debug)]
enum Expect {
    /// Exactly this status.
    Status(u16),
    /// One of these statuses.
    OneOf(&'static [u16]),
    /// One of these statuses, or the connection closed without an answer.
    OneOfOrClosed(&'static [u16]),
}

impl Expect {
    fn accepts(self, status: Option<u16>) -> bool {
        match (self, status) {
            (Expect::Status(want), Some(got)) => want == got,
            (Expect::OneOf(want), Some(got)) => want.contains(&got),
            (Expect::OneOfOrClosed(want), Some(got)) => want.contains(&got),
            (Expect::OneOfOrClosed(_), None) => true,
            _ => false,
        }
    }
}

/// One hostile input.
struct Case {
    what: String,
    to_server: bool,
    bytes: Vec<u8>,
    expect: Expect,
    /// Whether the event may cross the pipe (a handler is the one that refuses it).
    crosses: bool,
}

fn case(what: impl Into<String>, bytes: Vec<u8>, expect: Expect) -> Case {
    Case {
        what: what.into(),
        to_server: false,
        bytes,
        expect,
        crosses: false,
    }
}

impl Case {
    /// Sent to the server node's front door instead of the client node's.
    fn on_server(mut self) -> Case {
        self.to_server = true;
        self
    }

    /// Refused by the far side's handler, so it crosses the pipe.
    fn crossing(mut self) -> Case {
        self.crosses = true;
        self
    }
}

/// Send every case, check each answer and that nothing crossed that must not, print the table,
/// and return the answers.
async fn run_cases(pair: &Pair, cases: &[Case]) -> Vec<Answer> {
    let mut answers = Vec::new();
    let mut table = Vec::new();
    for c in cases {
        let before = pair.received();
        let calls = pair.calls.load(Ordering::SeqCst);
        let addr = if c.to_server {
            pair.server_http.http_addr
        } else {
            pair.client_http.http_addr
        };
        let answer = raw(addr, &c.bytes).await;
        assert!(
            c.expect.accepts(answer.status),
            "{}: expected {:?}, got {:?}\n{}\n{}",
            c.what,
            c.expect,
            answer.status,
            answer.head,
            answer.body_text()
        );
        if let Some(status) = answer.status {
            assert!((400..500).contains(&status), "{}: {status}", c.what);
        }
        let text = answer.body_text();
        assert!(
            !text.contains(SECRET) && !text.contains("root:"),
            "{}: leaked {text}",
            c.what
        );
        // A JSON error of ours says what is wrong; hyper's own refusals (before the router)
        // have an empty body.
        if answer.head.contains("application/json") && !c.bytes.starts_with(b"HEAD ") {
            let json: serde_json::Value = serde_json::from_str(&text).unwrap();
            assert!(
                json["error"].is_string() || json["exception"]["message"].is_string(),
                "{}: {text}",
                c.what
            );
        }
        let after = pair.received();
        if !c.crosses {
            assert_eq!(after, before, "{}: an event crossed the pipe", c.what);
        }
        assert_eq!(
            pair.calls.load(Ordering::SeqCst),
            calls,
            "{}: a counting handler ran",
            c.what
        );
        let status = answer
            .status
            .map_or("closed, no answer".to_string(), |s| s.to_string());
        let message = serde_json::from_str::<serde_json::Value>(&text)
            .ok()
            .and_then(|j| {
                j["error"]
                    .as_str()
                    .or(j["exception"]["message"].as_str())
                    .map(str::to_string)
            })
            .unwrap_or_default();
        let message: String = message.chars().take(100).collect();
        table.push(format!(
            "| {} | {} | {} | {message} |",
            c.what,
            status,
            if c.crosses && after != before {
                "yes (refused by the handler)"
            } else {
                "no"
            }
        ));
        answers.push(answer);
    }
    println!("| input | answer | crossed the pipe | error |\n|---|---|---|---|");
    for line in table {
        println!("{line}");
    }
    answers
}

// ----------------------------------------------------------------------------------------
// Paths

/// Traversal in nouns (encoded once and twice, backslashes, NUL, overlong UTF-8, dot
/// segments) is a 400 before the pipe; in the `files` handler's parameters it is refused by
/// the handler (400 PathRefused) or names a file that does not exist (404), and nothing from
/// outside the root comes back. Bad percent-encoding and invalid UTF-8 in parameters, raw
/// bytes a URL parser would reject, and a bad `X-Event-Timeout-Ms` are 400 before the pipe.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traversal_bad_escapes_and_invalid_utf8_are_refused_and_leak_nothing() {
    let pair = Pair::start(None).await;
    let ids = pair.connections();
    let files = |p: &str| format!("/client/{CLIENT_ID}/file//{p}");
    let mut cases = vec![
        // Nouns on the client node.
        case(
            "noun `%2e%2e`",
            get("/server/%2e%2e/time"),
            Expect::Status(400),
        ),
        case(
            "noun `%252e%252e` (encoded twice)",
            get("/server/%252e%252e/time"),
            Expect::Status(400),
        ),
        case(
            "noun `..%2f`",
            get("/server/..%2ftime"),
            Expect::Status(400),
        ),
        case(
            "noun `..%5c` (backslash)",
            get("/server/..%5ctime"),
            Expect::Status(400),
        ),
        case(
            "noun with a raw backslash",
            get("/server/..\\time"),
            Expect::Status(400),
        ),
        case("noun `.%2e`", get("/server/.%2e/time"), Expect::Status(400)),
        case(
            "noun `%c0%ae%c0%ae` (overlong UTF-8 dots)",
            get("/server/%c0%ae%c0%ae/time"),
            Expect::Status(400),
        ),
        case(
            "noun with `%00`",
            get("/server/time%00"),
            Expect::Status(400),
        ),
        case(
            "noun with a raw NUL",
            request("GET", b"/server/time\0", "", b""),
            Expect::Status(400),
        ),
        case(
            "noun with raw UTF-8 bytes",
            request("GET", "/server/tíme".as_bytes(), "", b""),
            Expect::Status(400),
        ),
        case(
            "noun with a raw 0xff byte",
            request("GET", b"/server/t\xffme", "", b""),
            Expect::Status(400),
        ),
        case(
            "noun `;` path parameter",
            get("/server/..;/time"),
            Expect::Status(400),
        ),
        case(
            "noun of 2000 bytes",
            get(&format!("/server/{}", "a".repeat(2000))),
            Expect::Status(400),
        ),
        case("asterisk-form target", get("*"), Expect::OneOf(&[400, 404])),
        case(
            "absolute-form target with `..`",
            get("http://127.0.0.1/server/../time"),
            Expect::Status(400),
        ),
        // Identities and nouns on the server node.
        case(
            "identity `..%2f`",
            get("/client/..%2fworker-1/time"),
            Expect::Status(400),
        )
        .on_server(),
        case(
            "identity with `%00`",
            get("/client/worker-1%00/time"),
            Expect::Status(400),
        )
        .on_server(),
        case(
            "identity `%2e%2e`",
            get("/client/%2e%2e/time"),
            Expect::Status(400),
        )
        .on_server(),
        case(
            "noun `%252e%252e` on the server",
            get(&format!("/client/{CLIENT_ID}/%252e%252e/time")),
            Expect::Status(400),
        )
        .on_server(),
        // The files handler's parameters: it refuses them itself.
        case(
            "file `%2e%2e/secret.txt`",
            get(&files("%2e%2e/secret.txt")),
            Expect::Status(400),
        )
        .on_server()
        .crossing(),
        case(
            "file `%252e%252e/secret.txt` (a name, not a step up)",
            get(&files("%252e%252e/secret.txt")),
            Expect::Status(404),
        )
        .on_server()
        .crossing(),
        case(
            "file `..%5csecret.txt` (backslash)",
            get(&files("..%5csecret.txt")),
            Expect::Status(400),
        )
        .on_server()
        .crossing(),
        case(
            "file `reports%5c..%5c..%5csecret.txt`",
            get(&files("reports%5c..%5c..%5csecret.txt")),
            Expect::Status(400),
        )
        .on_server()
        .crossing(),
        case(
            "file `secret.txt%00.csv` (NUL)",
            get(&files("secret.txt%00.csv")),
            Expect::Status(400),
        )
        .on_server()
        .crossing(),
        case("file `%00`", get(&files("%00")), Expect::Status(400))
            .on_server()
            .crossing(),
        case(
            "file `reports/%2e%2e/%2e%2e/secret.txt`",
            get(&files("reports/%2e%2e/%2e%2e/secret.txt")),
            Expect::Status(400),
        )
        .on_server()
        .crossing(),
        case(
            "file `....//secret.txt`",
            get(&files("....//secret.txt")),
            Expect::Status(400),
        )
        .on_server()
        .crossing(),
        case(
            "file `%ef%bc%8e%ef%bc%8e/secret.txt` (fullwidth dots)",
            get(&files("%ef%bc%8e%ef%bc%8e/secret.txt")),
            Expect::Status(404),
        )
        .on_server()
        .crossing(),
        case(
            "file `C:%5cWindows`",
            get(&files("C:%5cWindows")),
            Expect::Status(400),
        )
        .on_server()
        .crossing(),
        case(
            "files `%2e%2e`",
            get(&format!("/client/{CLIENT_ID}/files//%2e%2e")),
            Expect::Status(400),
        )
        .on_server()
        .crossing(),
        case(
            "file `%c0%ae%c0%ae/secret.txt` (overlong UTF-8)",
            get(&files("%c0%ae%c0%ae/secret.txt")),
            Expect::Status(400),
        )
        .on_server(),
    ];
    // Bad percent-encoding and invalid UTF-8 in parameters.
    for p in [
        "%",
        "%%",
        "%2",
        "%g0",
        "abc%",
        "%%41",
        "%c0%af",
        "%ed%a0%80",
        "%f8%88%80%80%80",
        "%ff%fe",
        "%e2%82",
        "ok/%e2%82",
    ] {
        cases.push(case(
            format!("parameter `{p}`"),
            get(&format!("/server/cat//{p}")),
            Expect::Status(400),
        ));
    }
    cases.push(case(
        "parameter with a raw 0xff byte",
        request("GET", b"/server/cat//\xff", "", b""),
        Expect::Status(400),
    ));
    cases.push(case(
        "query with a raw 0xff byte",
        request("GET", b"/server/count?q=\xff", "", b""),
        Expect::Status(400),
    ));
    for value in ["\u{ff}", "1e3", "0x10", "99999999999999999999999"] {
        cases.push(case(
            format!("X-Event-Timeout-Ms `{}`", value.escape_default()),
            request(
                "GET",
                b"/server/count",
                &format!("X-Event-Timeout-Ms: {value}\r\n"),
                b"",
            ),
            Expect::Status(400),
        ));
    }
    cases.push(case(
        "X-Event-Timeout-Ms with a raw 0xff byte",
        b"GET /server/count HTTP/1.1\r\nHost: localhost\r\nX-Event-Timeout-Ms: 1\xff\r\nConnection: close\r\n\r\n".to_vec(),
        Expect::Status(400),
    ));

    run_cases(&pair, &cases).await;
    // The real file is still served, and both nodes serve on the same connections.
    let answer = raw(pair.server_http.http_addr, &get(&files("reports/q3.csv"))).await;
    assert_eq!(answer.status, Some(200));
    assert_eq!(answer.body, b"quarter,revenue\nq3,42\n");
    pair.assert_serves(None).await;
    assert_eq!(pair.connections(), ids);
}

// ----------------------------------------------------------------------------------------
// Heads and bodies

/// A 1 MiB header, 200 headers and a 1 MiB request line are refused (431 or 414, or the
/// connection closed) without harm; a declared body over the limit is 413 at once, before a
/// byte of it is sent; contradictory or malformed lengths are 400; a chunked body over the
/// limit, even inside one chunk that announces 4 GiB, is 413; none of them reaches a handler.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn huge_heads_and_bodies_over_the_limit_are_refused_without_harm() {
    let pair = Pair::start(None).await;
    let ids = pair.connections();
    let big_header = format!("X-Big: {}\r\n", "a".repeat(1024 * 1024));
    let many_headers: String = (0..200).map(|i| format!("X-H{i}: {i}\r\n")).collect();
    let over = vec![b'x'; LIMIT + 1];
    let chunked = |chunks: &[&[u8]]| {
        let mut body = Vec::new();
        for chunk in chunks {
            body.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
            body.extend_from_slice(chunk);
            body.extend_from_slice(b"\r\n");
        }
        body.extend_from_slice(b"0\r\n\r\n");
        body
    };
    let mut one_huge_chunk = b"ffffffff\r\n".to_vec();
    one_huge_chunk.extend_from_slice(&over);
    let cases = vec![
        case(
            "a 1 MiB header",
            request("GET", b"/server/count", &big_header, b""),
            Expect::OneOfOrClosed(&[431]),
        ),
        case(
            "200 headers",
            request("GET", b"/server/count", &many_headers, b""),
            Expect::OneOfOrClosed(&[431]),
        ),
        case(
            "a 1 MiB request line",
            get(&format!("/server/cat//{}", "a".repeat(1024 * 1024))),
            Expect::OneOfOrClosed(&[414, 431]),
        ),
        case(
            "Content-Length: 10^12, no body sent",
            request(
                "POST",
                b"/server/count",
                "Content-Length: 1000000000000\r\n",
                b"",
            ),
            Expect::Status(413),
        ),
        case(
            "Content-Length over the limit, body sent",
            request(
                "POST",
                b"/server/count",
                &format!("Content-Length: {}\r\n", over.len()),
                &over,
            ),
            Expect::Status(413),
        ),
        case(
            "Content-Length: 2^64",
            request(
                "POST",
                b"/server/count",
                "Content-Length: 18446744073709551616\r\n",
                b"",
            ),
            Expect::Status(400),
        ),
        case(
            "Content-Length: -1",
            request("POST", b"/server/count", "Content-Length: -1\r\n", b""),
            Expect::Status(400),
        ),
        case(
            "two different Content-Lengths",
            request(
                "POST",
                b"/server/count",
                "Content-Length: 3\r\nContent-Length: 5\r\n",
                b"abcde",
            ),
            Expect::Status(400),
        ),
        case(
            "chunked over the limit",
            request(
                "POST",
                b"/server/count",
                "Transfer-Encoding: chunked\r\n",
                &chunked(&[&over[..LIMIT / 2], &over[LIMIT / 2..]]),
            ),
            Expect::Status(413),
        )
        // Streamed, so the event crosses; cut off at the limit, it reaches no handler.
        .crossing(),
        case(
            "one chunk announcing 4 GiB, limit+1 bytes sent",
            request(
                "POST",
                b"/server/count",
                "Transfer-Encoding: chunked\r\n",
                &one_huge_chunk,
            ),
            Expect::Status(413),
        )
        .crossing(),
        case(
            "a chunk size that overflows",
            request(
                "POST",
                b"/server/count",
                "Transfer-Encoding: chunked\r\n",
                b"fffffffffffffffffff\r\nabc\r\n0\r\n\r\n",
            ),
            Expect::OneOfOrClosed(&[400]),
        )
        // Streamed, so the event crosses before the chunk size is read; the far side sees an
        // incomplete body, and no handler runs.
        .crossing(),
        case(
            "chunked over the limit with a small Content-Length too",
            request(
                "POST",
                b"/server/count",
                "Content-Length: 3\r\nTransfer-Encoding: chunked\r\n",
                &chunked(&[&over]),
            ),
            Expect::OneOf(&[400, 413]),
        )
        .crossing(),
        case(
            "Transfer-Encoding other than chunked",
            request(
                "POST",
                b"/server/count",
                "Transfer-Encoding: gzip\r\n",
                b"abc",
            ),
            Expect::OneOfOrClosed(&[400]),
        ),
        case(
            "a 1 MiB header to the server node",
            request(
                "GET",
                format!("/client/{CLIENT_ID}/count").as_bytes(),
                &big_header,
                b"",
            ),
            Expect::OneOfOrClosed(&[431]),
        )
        .on_server(),
        case(
            "Content-Length: 10^12 to the server node",
            request(
                "POST",
                format!("/client/{CLIENT_ID}/count").as_bytes(),
                "Content-Length: 1000000000000\r\n",
                b"",
            ),
            Expect::Status(413),
        )
        .on_server(),
    ];
    run_cases(&pair, &cases).await;
    assert_eq!(pair.calls.load(Ordering::SeqCst), 0);
    // A body at the limit still goes through.
    let answer = raw(
        pair.client_http.http_addr,
        &request(
            "POST",
            b"/server/count",
            &format!("Content-Length: {LIMIT}\r\n"),
            &vec![b'x'; LIMIT],
        ),
    )
    .await;
    assert_eq!(answer.status, Some(200), "{answer:?}");
    assert_eq!(pair.calls.load(Ordering::SeqCst), 1);
    pair.assert_serves(None).await;
    assert_eq!(pair.connections(), ids);
}

// ----------------------------------------------------------------------------------------
// Methods and tokens

/// Methods outside GET, HEAD, POST, PUT, PATCH and DELETE, sent raw (OPTIONS, CONNECT, lowercase, made
/// up, malformed, overlong), are 405 or 400 and never cross; then, with a bearer token set,
/// every way of not giving it (missing, in the query, in another header, a prefix, another
/// scheme, a tab, not UTF-8, 64 KiB, a second header) is 401, before the path, the method or
/// the body is even looked at, and nothing reaches a handler.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn methods_outside_the_list_and_wrong_tokens_never_reach_a_handler() {
    let pair = Pair::start(None).await;
    let ids = pair.connections();
    let mut cases = Vec::new();
    for (method, expect) in [
        ("OPTIONS", Expect::Status(405)),
        ("get", Expect::Status(405)),
        ("FOO", Expect::Status(405)),
        ("M-SEARCH", Expect::Status(405)),
        ("PROPFIND", Expect::Status(405)),
        ("G\x01T", Expect::Status(400)),
        ("GET\x7f", Expect::Status(400)),
    ] {
        cases.push(case(
            format!("method `{}`", method.escape_default()),
            request(method, b"/server/count", "", b""),
            expect,
        ));
    }
    cases.push(case(
        "a method of 10 000 letters",
        request(&"A".repeat(10_000), b"/server/count", "", b""),
        Expect::OneOfOrClosed(&[400, 405, 414, 431]),
    ));
    cases.push(case(
        "CONNECT",
        request("CONNECT", b"127.0.0.1:443", "", b""),
        Expect::OneOf(&[400, 404, 405]),
    ));
    cases.push(
        case(
            "method `FOO` to the server node",
            request(
                "FOO",
                format!("/client/{CLIENT_ID}/count").as_bytes(),
                "",
                b"",
            ),
            Expect::Status(405),
        )
        .on_server(),
    );
    run_cases(&pair, &cases).await;
    pair.assert_serves(None).await;
    assert_eq!(pair.connections(), ids);

    let pair = Pair::start(Some(TOKEN)).await;
    let ids = pair.connections();
    let post = |headers: &str| request("POST", b"/server/count", headers, b"x");
    let mut cases = vec![
        case("no Authorization", post(""), Expect::Status(401)),
        case(
            "the token in the query string",
            request("POST", format!("/server/count?access_token={TOKEN}").as_bytes(), "", b"x"),
            Expect::Status(401),
        ),
        case(
            "the token in another header",
            post(&format!("X-Api-Key: {TOKEN}\r\nCookie: token={TOKEN}\r\n")),
            Expect::Status(401),
        ),
        case(
            "a prefix of the token",
            post(&format!("Authorization: Bearer {}\r\n", &TOKEN[..TOKEN.len() - 1])),
            Expect::Status(401),
        ),
        case(
            "the token and more",
            post(&format!("Authorization: Bearer {TOKEN}, Bearer x\r\n")),
            Expect::Status(401),
        ),
        case(
            "Basic with the token",
            post(&format!("Authorization: Basic {TOKEN}\r\n")),
            Expect::Status(401),
        ),
        case(
            "a tab after Bearer",
            post(&format!("Authorization: Bearer\t{TOKEN}\r\n")),
            Expect::Status(401),
        ),
        case(
            "the token alone, without a scheme",
            post(&format!("Authorization: {TOKEN}\r\n")),
            Expect::Status(401),
        ),
        case(
            "a token that is not UTF-8",
            b"POST /server/count HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer \xff\xfe\r\nContent-Length: 1\r\nConnection: close\r\n\r\nx".to_vec(),
            Expect::Status(401),
        ),
        case(
            "a token of 64 KiB",
            post(&format!("Authorization: Bearer {}\r\n", "t".repeat(64 * 1024))),
            Expect::Status(401),
        ),
        case(
            "a wrong token, then the right one in a second header",
            post(&format!(
                "Authorization: Bearer wrong\r\nAuthorization: Bearer {TOKEN}\r\n"
            )),
            Expect::Status(401),
        ),
        case(
            "no token, a bad noun",
            get("/server/%2e%2e/time"),
            Expect::Status(401),
        ),
        case(
            "no token, a method outside the list",
            request("FOO", b"/server/count", "", b""),
            Expect::Status(401),
        ),
        case(
            "no token, Content-Length: 10^12",
            request("POST", b"/server/count", "Content-Length: 1000000000000\r\n", b""),
            Expect::Status(401),
        ),
        case("no token, /status", get("/status"), Expect::Status(401)),
        case("no token, /clients", get("/clients"), Expect::Status(401)).on_server(),
        case(
            "no token, to the server node",
            request("POST", format!("/client/{CLIENT_ID}/count").as_bytes(), "", b"x"),
            Expect::Status(401),
        )
        .on_server(),
    ];
    // With the token, the same method and body limits hold.
    let auth = format!("Authorization: Bearer {TOKEN}\r\n");
    cases.push(case(
        "the token, a method outside the list",
        request("FOO", b"/server/count", &auth, b""),
        Expect::Status(405),
    ));
    cases.push(case(
        "the token, Content-Length: 10^12",
        request(
            "POST",
            b"/server/count",
            &format!("{auth}Content-Length: 1000000000000\r\n"),
            b"",
        ),
        Expect::Status(413),
    ));
    let answers = run_cases(&pair, &cases).await;
    for (c, answer) in cases.iter().zip(&answers) {
        if answer.status == Some(401) {
            assert!(
                answer
                    .head
                    .to_ascii_lowercase()
                    .contains("www-authenticate: bearer"),
                "{}: {}",
                c.what,
                answer.head
            );
        }
    }
    assert_eq!(pair.calls.load(Ordering::SeqCst), 0);
    pair.assert_serves(Some(TOKEN)).await;
    let answer = raw(
        pair.client_http.http_addr,
        &request("POST", b"/server/count", &auth, b"x"),
    )
    .await;
    assert_eq!(answer.status, Some(200));
    assert_eq!(pair.calls.load(Ordering::SeqCst), 1);
    assert_eq!(pair.connections(), ids);
}
