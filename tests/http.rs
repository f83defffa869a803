//! The local HTTP front door, spoken to with real HTTP: whole nodes on `127.0.0.1:0` joined by
//! a real mutual-TLS pipe, and every answer of SPEC section 6 reached and checked (status,
//! headers, JSON body, `X-Event-Return-Code` where the reply crossed the pipe).
//!
//! Nodes are started two ways: from [`Settings`] with `app::start_with_tls`, as the `restpipe`
//! command does (plug-ins `time` and `files`), or with the library API and `app::start_http`
//! when a test needs handlers of its own (slow, failing, panicking, counting, echoing).
//!
//! Requests whose bytes an URL parser would rewrite (`..`, a malformed escape) are written to
//! the socket by hand ([`raw`]), so the node sees exactly what a careless client could send.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use reqwest::header::{HeaderMap, HeaderName, HeaderValue};
use reqwest::{Method, StatusCode};
use restpipe::app::{self, RunningNode};
use restpipe::config::{NodeArgs, Settings};
use restpipe::handler::{Context, HandlerError, Handlers, Reply, Request, Side};
use restpipe::http::{HttpOptions, Pipe};
use restpipe::{ClientNode, Metrics, PipeConfig, ServerNode};
use restpipe_testkit::certs::*;
use restpipe_testkit::nodes::*;
use restpipe_testkit::wait::*;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

// ----------------------------------------------------------------------------------------
// Helpers

fn loopback0() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

fn now_secs() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// An HTTP client that ignores any proxy of the environment.
fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap()
}

/// What a node answered.
#[derive(Debug)]
struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "body is not JSON ({e}): {:?}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(|v| v.to_str().unwrap())
    }

    /// `X-Event-Return-Code`, if present.
    fn code(&self) -> Option<u32> {
        self.header("x-event-return-code")
            .map(|v| v.parse().unwrap())
    }

    fn content_type(&self) -> &str {
        self.header("content-type").unwrap_or("")
    }

    /// Assert a JSON error of `status` that did not cross the pipe; returns its message.
    fn error(&self, status: StatusCode) -> String {
        assert_eq!(self.status, status, "{self:?}");
        assert!(
            self.content_type().starts_with("application/json"),
            "{self:?}"
        );
        assert_eq!(self.code(), None, "a local error carries no return code");
        let message = self.json()["error"]
            .as_str()
            .unwrap_or_else(|| panic!("no \"error\" string in {self:?}"))
            .to_string();
        assert!(!message.is_empty());
        message
    }

    /// Assert a reply that crossed the pipe with `status` and return code `code`.
    fn crossed(&self, status: StatusCode, code: u32) -> &Self {
        assert_eq!(self.status, status, "{self:?}");
        assert_eq!(self.code(), Some(code), "{self:?}");
        self
    }

    /// Assert a handler failure (code 251) with `status` and `class`; returns the message.
    fn exception(&self, status: StatusCode, class: &str) -> String {
        self.crossed(status, 251);
        assert!(self.content_type().starts_with("application/json"));
        let body = self.json();
        let exception = &body["exception"];
        assert_eq!(exception["class"], class, "{body}");
        assert!(exception["traceback"].is_array(), "{body}");
        exception["message"].as_str().unwrap().to_string()
    }
}

async fn send(request: reqwest::RequestBuilder) -> Answer {
    let response = within(Duration::from_secs(30), "an HTTP request", request.send())
        .await
        .unwrap();
    let status = response.status();
    let headers = response.headers().clone();
    let body = response.bytes().await.unwrap();
    Answer {
        status,
        headers,
        body,
    }
}

async fn get(url: String) -> Answer {
    send(http().get(url)).await
}

/// Write `request` (a whole HTTP/1.1 request, `Connection: close`) to `addr` as is and read the
/// answer.
async fn raw(addr: SocketAddr, request: &[u8]) -> Answer {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(request).await.unwrap();
    let mut bytes = Vec::new();
    within(
        Duration::from_secs(30),
        "a raw HTTP answer",
        stream.read_to_end(&mut bytes),
    )
    .await
    .unwrap();
    let split = bytes
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("end of the response head");
    let head = std::str::from_utf8(&bytes[..split]).unwrap();
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap();
    let status: u16 = status_line.split(' ').nth(1).unwrap().parse().unwrap();
    let mut headers = HeaderMap::new();
    for line in lines {
        let (name, value) = line.split_once(':').unwrap();
        headers.append(
            HeaderName::from_bytes(name.trim().as_bytes()).unwrap(),
            HeaderValue::from_str(value.trim()).unwrap(),
        );
    }
    let mut body = bytes[split + 4..].to_vec();
    if let Some(len) = headers.get("content-length") {
        body.truncate(len.to_str().unwrap().parse().unwrap());
    }
    Answer {
        status: StatusCode::from_u16(status).unwrap(),
        headers,
        body: body.into(),
    }
}

/// `GET target` with the request target's bytes exactly as given.
async fn raw_get(addr: SocketAddr, target: &str) -> Answer {
    let request = format!("GET {target} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    raw(addr, request.as_bytes()).await
}

fn url(node: &RunningNode, path: &str) -> String {
    format!("http://{}{}", node.http_addr, path)
}

fn server_of(node: &RunningNode) -> &ServerNode {
    match &node.pipe {
        Pipe::Server(server) => server,
        Pipe::Client(_) => panic!("not a server node"),
    }
}

fn client_of(node: &RunningNode) -> &ClientNode {
    match &node.pipe {
        Pipe::Client(client) => client,
        Pipe::Server(_) => panic!("not a client node"),
    }
}

/// Settings as `restpipe` would resolve them with no flags, then: HTTP and pipe on
/// `127.0.0.1:0`, no metrics, the test pipe timings, the server verified as `localhost`.
fn settings(side: Side) -> Settings {
    let mut s = Settings::resolve(NodeArgs::default(), side).unwrap();
    restpipe_testkit::nodes::own_data_dir(&mut s);
    s.http = loopback0();
    s.bind = loopback0();
    s.statsd.host = None;
    s.pipe = test_pipe();
    s.server_name = Some(SERVER_NAME.into());
    s.grace = Duration::from_secs(1);
    s
}

/// A server node started from `settings`, as the command starts one.
async fn app_server(pki: &Pki, settings: Settings) -> RunningNode {
    app::start_with_tls(Side::Server, &settings, pki.server_tls())
        .await
        .unwrap()
}

/// A client node `identity` started from `settings` (dialling `server`), once connected and
/// listed by the server.
async fn app_client(
    pki: &Pki,
    identity: &str,
    server: &RunningNode,
    mut settings: Settings,
) -> RunningNode {
    settings.server = server_of(server).local_addr().to_string();
    let node = app::start_with_tls(Side::Client, &settings, pki.client_tls(identity))
        .await
        .unwrap();
    client_of(&node)
        .wait_connected(Duration::from_secs(5))
        .await
        .unwrap();
    wait_for_client(server_of(server), identity).await;
    node
}

/// The test handlers of `common`, plus:
///
/// - `get_panic`: panics;
/// - `post_count`: counts its calls in `calls`;
/// - `get_query`: `{"query": <query string>, "parameters": [...]}`;
/// - `post_created`: the body back with status 201 and its own content type.
fn handlers(node: &str, calls: Arc<AtomicUsize>) -> Handlers {
    fn boom() -> Result<Reply, HandlerError> {
        panic!("panicked on purpose")
    }
    let mut handlers = test_handlers(node);
    handlers.add(
        "get_panic",
        |_ctx: Context, _req: Request| async move { boom() },
    );
    handlers.add("post_count", move |_ctx: Context, _req: Request| {
        let calls = calls.clone();
        async move {
            calls.fetch_add(1, Ordering::SeqCst);
            Ok::<_, HandlerError>(Reply::text("counted"))
        }
    });
    handlers.add("get_query", |_ctx: Context, req: Request| async move {
        Ok::<_, HandlerError>(json!({ "query": req.query, "parameters": req.parameters }))
    });
    handlers.add("post_created", |_ctx: Context, req: Request| async move {
        Ok::<_, HandlerError>(
            Reply::bytes("application/vnd.restpipe-test+json", req.body).with_status(201),
        )
    });
    handlers
}

const CLIENT_ID: &str = "worker-1";

/// A server and a client (`worker-1`) built with the library API, with [`handlers`] on both,
/// each behind its own front door.
struct LibPair {
    server: ServerNode,
    client: ClientNode,
    server_http: RunningNode,
    client_http: RunningNode,
    /// Calls of `post_count`, on either node.
    calls: Arc<AtomicUsize>,
}

async fn lib_pair(pki: &Pki, pipe: PipeConfig) -> LibPair {
    let calls = Arc::new(AtomicUsize::new(0));
    let http_options = HttpOptions {
        max_body: pipe.max_body,
        token: None,
        metrics: Metrics::disabled(),
        queue: None,
    };
    let mut options = server_options(pki, loopback0(), pipe.clone());
    options.node.handlers = handlers("server", calls.clone());
    let server = ServerNode::start(options).await.unwrap();
    let server_http = app::start_http(
        Pipe::Server(server.clone()),
        http_options.clone(),
        loopback0(),
    )
    .await
    .unwrap();
    let mut options = client_options(pki, CLIENT_ID, server.local_addr(), pipe);
    options.node.handlers = handlers(CLIENT_ID, calls.clone());
    let client = ClientNode::start(options).unwrap();
    client.wait_connected(Duration::from_secs(5)).await.unwrap();
    wait_for_client(&server, CLIENT_ID).await;
    let client_http = app::start_http(Pipe::Client(client.clone()), http_options, loopback0())
        .await
        .unwrap();
    LibPair {
        server,
        client,
        server_http,
        client_http,
        calls,
    }
}

/// Requests the client node has sent over its current connection.
fn sent_by(client: &ClientNode) -> u64 {
    client.status().unwrap().requests_sent
}

/// Requests the server node has sent to `identity`.
fn sent_to(server: &ServerNode, identity: &str) -> u64 {
    server
        .registry()
        .find(identity)
        .unwrap()
        .status()
        .requests_sent
}

/// A free port on 127.0.0.1 with nothing listening (the listener is closed again).
fn dead_port() -> u16 {
    let listener = std::net::TcpListener::bind(loopback0()).unwrap();
    listener.local_addr().unwrap().port()
}

// ----------------------------------------------------------------------------------------
// RestPipe's README examples

/// `GET /server/time` and `GET /server/cat//hello%20/world` on a client node run the server's
/// `get_time` and `get_cat` and answer RestPipe's JSON.
#[tokio::test]
async fn readme_examples_from_the_client_node() {
    let pki = Pki::new();
    let server = app_server(&pki, settings(Side::Server)).await;
    let client = app_client(&pki, "fileserver-1", &server, settings(Side::Client)).await;

    let answer = get(url(&client, "/server/time")).await;
    answer.crossed(StatusCode::OK, 0);
    assert_eq!(answer.content_type(), "application/json");
    let body = answer.json();
    let time = body["time_from_server"].as_f64().expect("a float");
    assert!((time - now_secs()).abs() < 60.0, "{body}");
    assert_eq!(body.as_object().unwrap().len(), 1, "{body}");

    let answer = get(url(&client, "/server/cat//hello%20/world")).await;
    answer.crossed(StatusCode::OK, 0);
    assert_eq!(answer.content_type(), "application/json");
    assert_eq!(
        answer.json(),
        json!({ "result_from_server": "hello world" })
    );
}

/// The server node calls a client by identity, and by IP address while only one client has
/// it; with two clients on 127.0.0.1 the address is ambiguous: 409.
#[tokio::test]
async fn readme_examples_from_the_server_node_by_identity_and_by_address() {
    let pki = Pki::new();
    let server = app_server(&pki, settings(Side::Server)).await;
    let _one = app_client(&pki, "fileserver-1", &server, settings(Side::Client)).await;

    for target in ["fileserver-1", "127.0.0.1"] {
        let answer = get(url(&server, &format!("/client/{target}/time"))).await;
        answer.crossed(StatusCode::OK, 0);
        assert_eq!(answer.content_type(), "application/json");
        let body = answer.json();
        let time = body["time_from_client"].as_f64().expect("a float");
        assert!((time - now_secs()).abs() < 60.0, "{body}");
        let answer = get(url(
            &server,
            &format!("/client/{target}/cat//hello%20/world"),
        ))
        .await;
        answer.crossed(StatusCode::OK, 0);
        assert_eq!(
            answer.json(),
            json!({ "result_from_client": "hello world" })
        );
    }

    let _two = app_client(&pki, "fileserver-2", &server, settings(Side::Client)).await;
    let answer = get(url(&server, "/client/127.0.0.1/time")).await;
    let message = answer.error(StatusCode::CONFLICT);
    assert!(
        message.contains("fileserver-1") && message.contains("fileserver-2"),
        "{message}"
    );
    for identity in ["fileserver-1", "fileserver-2"] {
        get(url(&server, &format!("/client/{identity}/time")))
            .await
            .crossed(StatusCode::OK, 0);
    }
}

// ----------------------------------------------------------------------------------------
// Replies

/// A handler's own 2xx status and content type reach the HTTP caller, in both directions.
#[tokio::test]
async fn a_handlers_own_status_and_content_type_pass_through() {
    let pki = Pki::new();
    let pair = lib_pair(&pki, test_pipe()).await;
    for (node, path) in [
        (&pair.client_http, "/server/created".to_string()),
        (&pair.server_http, format!("/client/{CLIENT_ID}/created")),
    ] {
        let answer = send(
            http()
                .post(url(node, &path))
                .header("content-type", "application/json")
                .body(r#"{"job":1}"#),
        )
        .await;
        answer.crossed(StatusCode::CREATED, 0);
        assert_eq!(answer.content_type(), "application/vnd.restpipe-test+json");
        assert_eq!(&answer.body[..], br#"{"job":1}"#);
    }
}

/// A 1 MiB body holding every byte value goes through both ways byte for byte with its
/// content type, and the query string reaches the handler as sent.
#[tokio::test]
async fn binary_bodies_round_trip_and_the_query_string_travels() {
    let pki = Pki::new();
    let pair = lib_pair(&pki, test_pipe()).await;
    let body = random_bytes(1024 * 1024);
    for (node, path) in [
        (&pair.client_http, "/server/echo".to_string()),
        (&pair.server_http, format!("/client/{CLIENT_ID}/echo")),
    ] {
        let answer = send(
            http()
                .post(url(node, &path))
                .header("content-type", "application/x-restpipe-test")
                .body(body.clone()),
        )
        .await;
        answer.crossed(StatusCode::OK, 0);
        assert_eq!(answer.content_type(), "application/x-restpipe-test");
        assert_eq!(answer.body.len(), body.len());
        assert!(answer.body[..] == body[..], "the body changed on the way");

        let query_path = path.replace("echo", "query//a%20b?x=1&y=a%20b&flag");
        let answer = get(url(node, &query_path)).await;
        answer.crossed(StatusCode::OK, 0);
        assert_eq!(
            answer.json(),
            json!({ "query": "x=1&y=a%20b&flag", "parameters": ["a b"] })
        );
    }
}

// ----------------------------------------------------------------------------------------
// 4xx

/// Bad nouns, malformed escapes, invalid UTF-8 and a bad `X-Event-Timeout-Ms` are 400 with a
/// JSON error, and none of them is sent over the pipe.
#[tokio::test]
async fn bad_nouns_parameters_and_timeouts_are_400_before_the_pipe() {
    let pki = Pki::new();
    let pair = lib_pair(&pki, test_pipe()).await;
    let client_addr = pair.client_http.http_addr;
    let server_addr = pair.server_http.http_addr;
    let up = sent_by(&pair.client);
    let down = sent_to(&pair.server, CLIENT_ID);

    let client_paths = [
        ("/server/..", "\"..\""),
        ("/server/.", "\".\""),
        ("/server/a/../time", "\"..\""),
        ("/server/a%2Fb", "'%'"),
        ("/server/a%20b", "'%'"),
        ("/server/bad..noun%20", "'%'"),
        ("/server/a/", "empty"),
        ("/server//time", "noun"),
        ("/server/cat//%zz", "malformed percent escape"),
        ("/server/cat//ok/%f", "malformed percent escape"),
        ("/server/cat//%ff", "UTF-8"),
        ("/server/cat//%c3%28", "UTF-8"),
        ("/server/", "noun"),
        ("/server", "noun"),
    ];
    for (path, needle) in client_paths {
        let answer = raw_get(client_addr, path).await;
        let message = answer.error(StatusCode::BAD_REQUEST);
        assert!(message.contains(needle), "{path}: {message}");
    }
    let server_paths = [
        "/client/../time",
        "/client/worker-1/..",
        "/client/worker-1/a%2Fb",
        "/client/worker-1/a%20b",
        "/client/worker-1",
        "/client/worker-1/",
        "/client/worker-1/cat//%zz",
        "/client/worker-1/cat//%ff",
        "/client/a%20b/time",
        "/client/",
        "/client//time",
    ];
    for path in server_paths {
        raw_get(server_addr, path)
            .await
            .error(StatusCode::BAD_REQUEST);
    }
    for value in [
        "abc",
        "0",
        "-5",
        "1.5",
        "",
        "600001",
        "99999999999999999999",
    ] {
        let answer = send(
            http()
                .get(url(&pair.client_http, "/server/time"))
                .header("x-event-timeout-ms", value),
        )
        .await;
        let message = answer.error(StatusCode::BAD_REQUEST);
        assert!(
            message.contains("x-event-timeout-ms"),
            "{value:?}: {message}"
        );
    }
    assert_eq!(sent_by(&pair.client), up, "a bad request crossed the pipe");
    assert_eq!(sent_to(&pair.server, CLIENT_ID), down);

    // The node still serves good requests.
    send(
        http()
            .get(url(&pair.client_http, "/server/whoami"))
            .header("x-event-timeout-ms", "5000"),
    )
    .await
    .crossed(StatusCode::OK, 0);
}

/// With `--http-token`, a missing or wrong bearer token is 401 (every endpoint); the right
/// one passes.
#[tokio::test]
async fn a_bearer_token_when_set_is_required() {
    let pki = Pki::new();
    let server = app_server(&pki, settings(Side::Server)).await;
    let mut client_settings = settings(Side::Client);
    client_settings.http_token = Some("s3cret".into());
    let client = app_client(&pki, "fileserver-1", &server, client_settings).await;

    for (path, authorization) in [
        ("/server/time", None),
        ("/server/time", Some("Bearer nope")),
        ("/server/time", Some("Bearer s3cret2")),
        ("/server/time", Some("Bearer ")),
        ("/server/time", Some("Basic czNjcmV0")),
        ("/health", None),
        ("/status", Some("Bearer wrong")),
    ] {
        let mut request = http().get(url(&client, path));
        if let Some(value) = authorization {
            request = request.header("authorization", value);
        }
        let answer = send(request).await;
        let message = answer.error(StatusCode::UNAUTHORIZED);
        assert!(message.contains("--http-token"), "{message}");
        assert_eq!(answer.header("www-authenticate"), Some("Bearer"));
    }
    // The scheme is case-insensitive (RFC 9110, section 11.1).
    for value in ["Bearer s3cret", "bearer s3cret", "BEARER  s3cret"] {
        let answer = send(
            http()
                .get(url(&client, "/server/time"))
                .header("authorization", value),
        )
        .await;
        answer.crossed(StatusCode::OK, 0);
        assert!(answer.json()["time_from_server"].is_f64());
    }
    let answer = send(http().get(url(&client, "/health")).bearer_auth("s3cret")).await;
    assert_eq!(answer.status, StatusCode::OK);
}

/// A noun with no handler on the far side is 404 with code 255, both ways; an endpoint the
/// node does not have is a plain 404 with a hint.
#[tokio::test]
async fn no_handler_is_404_code_255_and_unknown_endpoints_are_404() {
    let pki = Pki::new();
    let pair = lib_pair(&pki, test_pipe()).await;
    for (node, path, expected) in [
        (
            &pair.client_http,
            "/server/nope".to_string(),
            "no handler get_nope on the server node",
        ),
        (
            &pair.server_http,
            format!("/client/{CLIENT_ID}/nope/deeper"),
            "no handler get_nope_deeper on the client node",
        ),
    ] {
        let answer = get(url(node, &path)).await;
        answer.crossed(StatusCode::NOT_FOUND, 255);
        assert_eq!(answer.content_type(), "application/json");
        assert_eq!(answer.json(), json!({ "error": expected }));
    }
    // The handler name carries the verb: POST /server/whoami has none.
    send(http().post(url(&pair.client_http, "/server/whoami")))
        .await
        .crossed(StatusCode::NOT_FOUND, 255);

    for (node, path) in [
        (&pair.client_http, "/nope"),
        (&pair.client_http, "/clients"),
        (&pair.client_http, "/client/worker-1/time"),
        (&pair.server_http, "/server/time"),
        // `/` is the status page now; an unknown path under it is still a 404.
        (&pair.server_http, "/nope/"),
    ] {
        let message = get(url(node, path)).await.error(StatusCode::NOT_FOUND);
        assert!(message.contains("no such endpoint"), "{path}: {message}");
    }
}

/// Verbs that do not cross the pipe are 405 with `Allow`.
#[tokio::test]
async fn verbs_outside_the_list_are_405_with_allow() {
    let pki = Pki::new();
    let pair = lib_pair(&pki, test_pipe()).await;
    let up = sent_by(&pair.client);
    for (node, path) in [
        (&pair.client_http, "/server/time".to_string()),
        (&pair.server_http, format!("/client/{CLIENT_ID}/time")),
    ] {
        for method in [
            Method::OPTIONS,
            Method::TRACE,
            Method::from_bytes(b"PROPFIND").unwrap(),
        ] {
            let answer = send(http().request(method.clone(), url(node, &path))).await;
            let message = answer.error(StatusCode::METHOD_NOT_ALLOWED);
            assert!(message.contains(method.as_str()), "{message}");
            assert_eq!(
                answer.header("allow"),
                Some("GET, HEAD, POST, PUT, PATCH, DELETE")
            );
        }
    }
    assert_eq!(sent_by(&pair.client), up);
    for method in [Method::PUT, Method::PATCH, Method::DELETE] {
        // Allowed verbs cross the pipe (and find no handler here).
        send(http().request(method, url(&pair.client_http, "/server/time")))
            .await
            .crossed(StatusCode::NOT_FOUND, 255);
    }
}

/// A body over `--max-frame` (64 KiB here) is 413, and nothing reaches the handler, whether
/// its length is declared or the body is chunked; a body at the limit goes through.
#[tokio::test]
async fn a_body_over_max_body_is_413_and_reaches_no_handler() {
    const LIMIT: usize = 64 * 1024;
    let pki = Pki::new();
    let pipe = PipeConfig {
        max_body: LIMIT as u64,
        ..test_pipe()
    };
    let pair = lib_pair(&pki, pipe).await;
    let over = vec![b'x'; LIMIT + 1];
    for (node, path) in [
        (&pair.client_http, "/server/count".to_string()),
        (&pair.server_http, format!("/client/{CLIENT_ID}/count")),
    ] {
        // A declared length over the limit: refused before anything is sent.
        let up = sent_by(&pair.client);
        let answer = send(http().post(url(node, &path)).body(over.clone())).await;
        let message = answer.error(StatusCode::PAYLOAD_TOO_LARGE);
        assert!(message.contains(&LIMIT.to_string()), "{message}");
        assert_eq!(sent_by(&pair.client), up, "an event crossed the pipe");

        // Chunked, so no length is declared: the body streams, and is cut off where it goes
        // over; the far side sees it incomplete.
        let mut request = format!(
            "POST {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        .into_bytes();
        for chunk in over.chunks(16 * 1024) {
            request.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
            request.extend_from_slice(chunk);
            request.extend_from_slice(b"\r\n");
        }
        request.extend_from_slice(b"0\r\n\r\n");
        raw(node.http_addr, &request)
            .await
            .error(StatusCode::PAYLOAD_TOO_LARGE);
    }
    assert_eq!(pair.calls.load(Ordering::SeqCst), 0, "a handler was called");

    let answer = send(
        http()
            .post(url(&pair.client_http, "/server/count"))
            .body(vec![b'x'; LIMIT]),
    )
    .await;
    answer.crossed(StatusCode::OK, 0);
    assert_eq!(pair.calls.load(Ordering::SeqCst), 1);
}

// ----------------------------------------------------------------------------------------
// 5xx

/// A handler that returns an error and one that panics are both 500 with code 251 and the
/// exception body, both ways; the connection survives the panic.
#[tokio::test]
async fn failing_and_panicking_handlers_are_500_code_251() {
    let pki = Pki::new();
    let pair = lib_pair(&pki, test_pipe()).await;
    let conn = pair.client.connection().unwrap().id();
    for (node, prefix) in [
        (&pair.client_http, "/server".to_string()),
        (&pair.server_http, format!("/client/{CLIENT_ID}")),
    ] {
        let message = get(url(node, &format!("{prefix}/fail")))
            .await
            .exception(StatusCode::INTERNAL_SERVER_ERROR, "HandlerError");
        assert_eq!(message, "failed on purpose");
        let message = get(url(node, &format!("{prefix}/panic")))
            .await
            .exception(StatusCode::INTERNAL_SERVER_ERROR, "Panic");
        assert!(message.contains("panicked on purpose"), "{message}");
        // A bad parameter of get_slow is an error converted with `?`: its class is the
        // error's type.
        let message = get(url(node, &format!("{prefix}/slow//abc")))
            .await
            .exception(StatusCode::INTERNAL_SERVER_ERROR, "ParseIntError");
        assert!(!message.is_empty());
        get(url(node, &format!("{prefix}/whoami")))
            .await
            .crossed(StatusCode::OK, 0);
    }
    assert_eq!(pair.client.connection().unwrap().id(), conn);
}

/// A connection that drops while a request is in flight answers that request 502 at once,
/// in both directions.
#[tokio::test]
async fn a_pipe_dropped_in_flight_is_502() {
    let pki = Pki::new();
    let pair = lib_pair(&pki, test_pipe()).await;

    // Server node calls the client's slow handler; the client's end of the pipe closes.
    let request = tokio::spawn(get(url(
        &pair.server_http,
        &format!("/client/{CLIENT_ID}/slow//20000"),
    )));
    let client = pair.client.clone();
    let in_flight = wait_until(Duration::from_secs(5), || {
        client
            .status()
            .is_some_and(|s| s.requests_in_flight_in == 1)
    })
    .await;
    assert!(in_flight, "the slow request never reached the client");
    let cut = Instant::now();
    pair.client.connection().unwrap().close("cut by the test");
    let answer = within(Duration::from_secs(5), "the 502", request)
        .await
        .unwrap();
    let message = answer.error(StatusCode::BAD_GATEWAY);
    assert!(message.contains("pipe closed"), "{message}");
    assert!(cut.elapsed() < Duration::from_secs(3));

    // The client reconnects; now the client node calls the server, whose end closes.
    pair.client
        .wait_connected(Duration::from_secs(5))
        .await
        .unwrap();
    wait_for_client(&pair.server, CLIENT_ID).await;
    let request = tokio::spawn(get(url(&pair.client_http, "/server/slow//20000")));
    let server = pair.server.clone();
    let in_flight = wait_until(Duration::from_secs(5), || {
        server
            .registry()
            .find(CLIENT_ID)
            .is_ok_and(|c| c.status().requests_in_flight_in == 1)
    })
    .await;
    assert!(in_flight, "the slow request never reached the server");
    pair.server
        .registry()
        .find(CLIENT_ID)
        .unwrap()
        .close("cut by the test");
    let answer = within(Duration::from_secs(5), "the 502", request)
        .await
        .unwrap();
    answer.error(StatusCode::BAD_GATEWAY);
}

/// A named client that does not connect within `--connect-wait` (300 ms) is 503 with
/// `Retry-After`, answered after the wait and not much later.
#[tokio::test]
async fn a_client_that_never_connects_is_503_after_connect_wait() {
    let pki = Pki::new();
    let mut s = settings(Side::Server);
    s.pipe.connect_wait = Duration::from_millis(300);
    let server = app_server(&pki, s).await;
    let started = Instant::now();
    let answer = get(url(&server, "/client/ghost/time")).await;
    let elapsed = started.elapsed();
    let message = answer.error(StatusCode::SERVICE_UNAVAILABLE);
    assert!(message.contains("ghost"), "{message}");
    assert_eq!(answer.header("retry-after"), Some("1"));
    assert!(
        elapsed >= Duration::from_millis(300) && elapsed < Duration::from_secs(3),
        "{elapsed:?}"
    );
    // An address that no client has waits the same way.
    get(url(&server, "/client/10.1.2.3/time"))
        .await
        .error(StatusCode::SERVICE_UNAVAILABLE);
}

/// A client node whose server is down: requests are 503 after `--connect-wait`, `/health` is
/// 503, `/status` says it is not connected.
#[tokio::test]
async fn a_client_node_whose_server_is_down_is_503() {
    let pki = Pki::new();
    let mut s = settings(Side::Client);
    s.pipe.connect_wait = Duration::from_millis(300);
    s.server = format!("127.0.0.1:{}", dead_port());
    let client = app::start_with_tls(Side::Client, &s, pki.client_tls("lonely"))
        .await
        .unwrap();
    let started = Instant::now();
    let answer = get(url(&client, "/server/time")).await;
    let elapsed = started.elapsed();
    let message = answer.error(StatusCode::SERVICE_UNAVAILABLE);
    assert!(message.contains(&s.server), "{message}");
    assert_eq!(answer.header("retry-after"), Some("1"));
    assert!(
        elapsed >= Duration::from_millis(300) && elapsed < Duration::from_secs(3),
        "{elapsed:?}"
    );

    let message = get(url(&client, "/health"))
        .await
        .error(StatusCode::SERVICE_UNAVAILABLE);
    assert!(message.contains("down"), "{message}");
    let answer = get(url(&client, "/status")).await;
    assert_eq!(answer.status, StatusCode::OK);
    let status = answer.json();
    assert_eq!(status["role"], "client");
    assert_eq!(status["identity"], "lonely");
    assert_eq!(status["connected"], false);
    assert_eq!(status["peers"], json!([]));
}

/// No reply within `X-Event-Timeout-Ms: 200` is 504 after about 200 ms, both ways.
#[tokio::test]
async fn no_reply_within_x_event_timeout_ms_is_504() {
    let pki = Pki::new();
    let pair = lib_pair(&pki, test_pipe()).await;
    for (node, path) in [
        (&pair.client_http, "/server/slow//5000".to_string()),
        (&pair.server_http, format!("/client/{CLIENT_ID}/slow//5000")),
    ] {
        let started = Instant::now();
        let answer = send(
            http()
                .get(url(node, &path))
                .header("X-Event-Timeout-Ms", "200"),
        )
        .await;
        let elapsed = started.elapsed();
        let message = answer.error(StatusCode::GATEWAY_TIMEOUT);
        assert!(message.contains("200ms"), "{message}");
        assert!(
            elapsed >= Duration::from_millis(200) && elapsed < Duration::from_secs(3),
            "{elapsed:?}"
        );
    }
    // The connection is still good.
    get(url(&pair.client_http, "/server/whoami"))
        .await
        .crossed(StatusCode::OK, 0);
}

// ----------------------------------------------------------------------------------------
// /health, /status, /clients

/// `/health` is 200 on both sides while the pipe is up; once the server's pipe stops
/// listening, it is 503 on the server at once and on the client when its pipe goes down.
#[tokio::test]
async fn health_follows_the_pipe_on_both_sides() {
    let pki = Pki::new();
    let pair = lib_pair(&pki, test_pipe()).await;
    let answer = get(url(&pair.server_http, "/health")).await;
    assert_eq!(answer.status, StatusCode::OK);
    let body = answer.json();
    assert_eq!(body["status"], "ok");
    assert_eq!(body["role"], "server");
    assert_eq!(body["clients"], 1);
    let answer = get(url(&pair.client_http, "/health")).await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(answer.json()["role"], "client");

    // Stop the server's pipe, keep both front doors.
    pair.server.shutdown(Duration::from_millis(100)).await;
    get(url(&pair.server_http, "/health"))
        .await
        .error(StatusCode::SERVICE_UNAVAILABLE);
    let client_http = pair.client_http.http_addr;
    let down = wait_until_async(Duration::from_secs(5), || async move {
        get(format!("http://{client_http}/health")).await.status == StatusCode::SERVICE_UNAVAILABLE
    })
    .await;
    assert!(down, "the client's /health never turned 503");
    get(url(&pair.client_http, "/health"))
        .await
        .error(StatusCode::SERVICE_UNAVAILABLE);
}

/// `/status` on both sides and `/clients` on the server describe the pipe: role, identity,
/// uptime, and each peer with its address, connected-since, heartbeat round trip and requests
/// in flight.
#[tokio::test]
async fn status_and_clients_describe_the_pipe() {
    let pki = Pki::new();
    let pair = lib_pair(&pki, heartbeat_pipe()).await;
    let server_http = pair.server_http.http_addr;
    let client_http = pair.client_http.http_addr;

    // Wait for a heartbeat round trip on both sides.
    for addr in [server_http, client_http] {
        let measured = wait_until_async(Duration::from_secs(5), || async move {
            let status = get(format!("http://{addr}/status")).await.json();
            status["peers"][0]["last_heartbeat_rtt_ms"].is_number()
        })
        .await;
        assert!(measured, "no heartbeat round trip on {addr}");
    }

    let status = get(url(&pair.server_http, "/status")).await.json();
    assert_eq!(status["role"], "server");
    assert_eq!(status["identity"], SERVER_NAME);
    assert!(status["uptime_s"].as_f64().unwrap() >= 0.0);
    assert_eq!(
        status["listening"],
        pair.server.local_addr().to_string(),
        "{status}"
    );
    let peers = status["peers"].as_array().unwrap();
    assert_eq!(peers.len(), 1, "{status}");
    let peer = &peers[0];
    assert_eq!(peer["identity"], CLIENT_ID);
    assert!(
        peer["address"].as_str().unwrap().starts_with("127.0.0.1:"),
        "{peer}"
    );
    assert!((peer["connected_since"].as_f64().unwrap() - now_secs()).abs() < 60.0);
    assert!(peer["last_heartbeat_rtt_ms"].as_f64().unwrap() >= 0.0);
    assert_eq!(peer["requests_in_flight_out"], 0);
    assert_eq!(peer["requests_in_flight_in"], 0);

    let status = get(url(&pair.client_http, "/status")).await.json();
    assert_eq!(status["role"], "client");
    assert_eq!(status["identity"], CLIENT_ID);
    assert_eq!(status["connected"], true);
    assert!(status["uptime_s"].as_f64().unwrap() >= 0.0);
    assert_eq!(status["peers"][0]["identity"], SERVER_NAME);
    assert_eq!(
        status["peers"][0]["address"],
        pair.server.local_addr().to_string()
    );

    // A request in flight from the server to the client shows on both.
    let request = tokio::spawn(get(url(
        &pair.server_http,
        &format!("/client/{CLIENT_ID}/slow//20000"),
    )));
    let seen = wait_until_async(Duration::from_secs(5), || async move {
        let server = get(format!("http://{server_http}/status")).await.json();
        let client = get(format!("http://{client_http}/status")).await.json();
        server["peers"][0]["requests_in_flight_out"] == 1
            && client["peers"][0]["requests_in_flight_in"] == 1
    })
    .await;
    assert!(seen, "the request in flight never showed in /status");
    request.abort();

    let clients = get(url(&pair.server_http, "/clients")).await;
    assert_eq!(clients.status, StatusCode::OK);
    let clients = clients.json();
    let list = clients.as_array().unwrap();
    assert_eq!(list.len(), 1, "{clients}");
    assert_eq!(list[0]["identity"], CLIENT_ID);
    assert!(list[0]["connected_since"].is_number());
}

// ----------------------------------------------------------------------------------------
// The files handlers through HTTP

/// The `files` plug-in on a client node, asked by the server over HTTP: a real file is
/// served; `..`, an absolute path, a path with separators and a symbolic link out of the root
/// are all refused, and nothing from outside the root comes back.
#[tokio::test]
async fn the_files_handler_refuses_every_escape() {
    let root = tempfile::tempdir().unwrap();
    std::fs::create_dir(root.path().join("reports")).unwrap();
    std::fs::write(
        root.path().join("reports/q3.csv"),
        "quarter,revenue\nq3,42\n",
    )
    .unwrap();
    std::os::unix::fs::symlink("/etc", root.path().join("etc")).unwrap();

    let pki = Pki::new();
    let server = app_server(&pki, settings(Side::Server)).await;
    let mut s = settings(Side::Client);
    s.handlers = vec!["time".into(), "files".into()];
    s.plugins
        .set("files", "root", root.path().to_str().unwrap());
    let _client = app_client(&pki, "fileserver-1", &server, s).await;

    let answer = get(url(&server, "/client/fileserver-1/file//reports/q3.csv")).await;
    answer.crossed(StatusCode::OK, 0);
    assert_eq!(answer.content_type(), "text/csv; charset=utf-8");
    assert_eq!(&answer.body[..], b"quarter,revenue\nq3,42\n");
    let listing = get(url(&server, "/client/fileserver-1/files//reports"))
        .await
        .crossed(StatusCode::OK, 0)
        .json();
    assert_eq!(listing["entries"][0]["name"], "q3.csv", "{listing}");

    for (target, status) in [
        ("/client/fileserver-1/file//..", StatusCode::BAD_REQUEST),
        (
            "/client/fileserver-1/file//../etc/passwd",
            StatusCode::BAD_REQUEST,
        ),
        (
            "/client/fileserver-1/file//%2Fetc%2Fpasswd",
            StatusCode::BAD_REQUEST,
        ),
        (
            "/client/fileserver-1/file//a%2F..%2F..%2Fetc",
            StatusCode::BAD_REQUEST,
        ),
        (
            "/client/fileserver-1/file//reports/..%2F..%2Fetc%2Fpasswd",
            StatusCode::BAD_REQUEST,
        ),
        (
            "/client/fileserver-1/file//etc/passwd",
            StatusCode::FORBIDDEN,
        ),
        ("/client/fileserver-1/files//etc", StatusCode::FORBIDDEN),
    ] {
        let answer = raw_get(server.http_addr, target).await;
        answer.exception(status, "PathRefused");
        let body = String::from_utf8_lossy(&answer.body);
        assert!(!body.contains("root:"), "{target}: {body}");
    }
}

/// A client that dials over IPv6 can be named by its IPv6 address too, as the contract says
/// for any client address.
#[tokio::test]
async fn a_client_can_be_named_by_its_ipv6_address() {
    let pki = Pki::new();
    let mut s = settings(Side::Server);
    s.bind = "[::1]:0".parse().unwrap();
    let server = app_server(&pki, s).await;
    let _client = app_client(&pki, "fileserver-6", &server, settings(Side::Client)).await;
    let answer = get(url(&server, "/client/::1/cat//v6")).await;
    answer.crossed(StatusCode::OK, 0);
    assert_eq!(answer.json(), json!({ "result_from_client": "v6" }));
}
