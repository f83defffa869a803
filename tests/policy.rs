//! Who may call what (docs/POLICY.md), on real nodes: the `--policy` file's `[[allow]]` rules
//! judged by the node that would run the handler, both ways across the pipe; refused calls
//! (403, code 253, a message naming the identity and the handler, the handler not run, the
//! metric counted); policies refused at start by the real binary; and the front door's
//! scoped tokens, attacked with prefixes, path tricks and encodings.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use restpipe::app::{self, RunningNode};
use restpipe::config::{NodeArgs, Settings};
use restpipe::handler::{codes, Context, HandlerError, Handlers, Reply, Request, Side};
use restpipe::http::{HttpOptions, Pipe};
use restpipe::{ClientNode, Metrics, Policy, ServerNode};
use restpipe_testkit::certs::{Certs, Pki, SERVER_NAME};
use restpipe_testkit::nodes::*;
use restpipe_testkit::procs::{self, restpipe_bin, Process};
use restpipe_testkit::statsd::{Statsd, ARRIVAL};
use restpipe_testkit::wait::*;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

// ----------------------------------------------------------------------------------------
// Helpers

/// A policy file in `dir` with `text`.
fn write_policy(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

/// The test handlers of `node`, plus `get_count`, which counts its calls in `calls`.
fn counting_handlers(node: &str, calls: &Arc<AtomicUsize>) -> Handlers {
    let mut handlers = test_handlers(node);
    let calls = calls.clone();
    handlers.add("get_count", move |_ctx: Context, _req: Request| {
        let calls = calls.clone();
        async move {
            let n = calls.fetch_add(1, Ordering::SeqCst) + 1;
            Ok::<_, HandlerError>(Reply::text(n.to_string()))
        }
    });
    handlers
}

/// The `error` of a JSON reply body.
fn error_of(body: &[u8]) -> String {
    let v: Value = serde_json::from_slice(body).expect("a JSON body");
    v["error"].as_str().expect("an error string").to_string()
}

/// Assert a reply refused by the policy: 403, code 253, a message naming `peer` and
/// `handler`.
fn assert_forbidden(reply: &Reply, peer: &str, handler: &str) {
    assert_eq!(reply.code, codes::FORBIDDEN, "{reply:?}");
    assert_eq!(reply.code, 253);
    assert_eq!(reply.status, Some(403), "{reply:?}");
    let message = error_of(&reply.body);
    assert!(
        message.contains(peer) && message.contains(handler),
        "{message}"
    );
}

/// An HTTP request written by hand, so that no URL parser rewrites the path: its status,
/// headers (lower case) and body.
async fn raw(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
) -> (u16, String, String) {
    let mut stream = within(Duration::from_secs(10), "connect", TcpStream::connect(addr))
        .await
        .unwrap();
    let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\n{auth}Content-Length: 0\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    within(
        Duration::from_secs(20),
        "an HTTP answer",
        stream.read_to_end(&mut answer),
    )
    .await
    .unwrap();
    let answer = String::from_utf8_lossy(&answer).into_owned();
    let (head, body) = answer.split_once("\r\n\r\n").unwrap_or((&answer, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status in {head:?}"));
    (status, head.to_ascii_lowercase(), body.to_string())
}

/// The `error` of a JSON body written by [`raw`] (chunked or not: the JSON object is found
/// in it).
fn raw_error(body: &str) -> String {
    let start = body
        .find('{')
        .unwrap_or_else(|| panic!("no JSON in {body:?}"));
    let end = body.rfind('}').unwrap();
    error_of(&body.as_bytes()[start..=end])
}

fn settings(side: Side) -> Settings {
    let mut s = Settings::resolve(NodeArgs::default(), side).unwrap();
    restpipe_testkit::nodes::own_data_dir(&mut s);
    s.http = "127.0.0.1:0".parse().unwrap();
    s.bind = "127.0.0.1:0".parse().unwrap();
    s.statsd.host = None;
    s.pipe = test_pipe();
    s.server_name = Some(SERVER_NAME.into());
    s.grace = Duration::from_secs(1);
    s
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

/// The front door of `pipe` on `127.0.0.1:0`, no token.
async fn door(pipe: Pipe) -> RunningNode {
    let options = HttpOptions {
        max_body: 1 << 20,
        token: None,
        metrics: Metrics::disabled(),
        queue: None,
    };
    app::start_http(pipe, options, "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap()
}

// ----------------------------------------------------------------------------------------
// Rules on the pipe

/// A policy on the server: `web-?` may call `get_whoami` and `get_count`, `fileserver-*`
/// only `get_whoami`. Allowed calls run; refused ones are 403 with code 253 and a message
/// naming the identity and the handler, and the handler does not run. A handler that does
/// not exist is refused the same way (the policy is asked before the lookup). Through the
/// front door the same answer carries `X-Event-Return-Code: 253`.
#[tokio::test]
async fn a_server_policy_refuses_clients_what_no_rule_allows() {
    let pki = Pki::new();
    let calls = Arc::new(AtomicUsize::new(0));
    let dir = tempfile::tempdir().unwrap();
    let handlers = counting_handlers("server", &calls);
    let mut options = server_options(&pki, "127.0.0.1:0".parse().unwrap(), test_pipe());
    options.node.handlers = handlers;
    let names = options.node.handler_names(Side::Server).unwrap();
    let path = write_policy(
        dir.path(),
        "policy.toml",
        r#"
[[allow]]
peers = ["fileserver-*"]
handlers = ["get_whoami"]
[[allow]]
peers = ["web-?"]
handlers = ["get_whoami", "get_c*"]
"#,
    );
    options.node.policy = Policy::load(&path, &names).unwrap();
    let server = ServerNode::start(options).await.unwrap();
    let web = start_client(&pki, "web-1", &server, test_pipe()).await;
    let files = start_client(&pki, "fileserver-1", &server, test_pipe()).await;
    let other = start_client(&pki, "web-10", &server, test_pipe()).await;

    let count = || Request::new("GET", "count");
    let reply = web.call(count(), None).await.unwrap();
    assert_eq!((reply.code, &reply.body[..]), (0, &b"1"[..]));
    assert_eq!(
        node_of(&files.call(whoami(), None).await.unwrap()),
        "server"
    );

    for (client, identity) in [(&files, "fileserver-1"), (&other, "web-10")] {
        let reply = client.call(count(), None).await.unwrap();
        assert_forbidden(&reply, identity, "get_count");
    }
    // No such handler: refused before the lookup, so the caller learns nothing.
    let reply = files
        .call(Request::new("GET", "no/such/thing"), None)
        .await
        .unwrap();
    assert_forbidden(&reply, "fileserver-1", "get_no_such_thing");
    // web-10 matches no rule at all.
    assert_forbidden(
        &other.call(whoami(), None).await.unwrap(),
        "web-10",
        "get_whoami",
    );
    assert_eq!(calls.load(Ordering::SeqCst), 1, "a refused handler ran");

    // The front door answers 403 with the return code.
    let front = door(Pipe::Client(files.clone())).await;
    let (status, head, body) = raw(front.http_addr, "GET", "/server/count", None).await;
    assert_eq!(status, 403, "{head}");
    assert!(head.contains("x-event-return-code: 253"), "{head}");
    let message = raw_error(&body);
    assert!(
        message.contains("fileserver-1") && message.contains("get_count"),
        "{message}"
    );
    assert_eq!(calls.load(Ordering::SeqCst), 1, "a refused handler ran");
    front.shutdown(Duration::from_secs(1)).await;
}

/// A policy on a client node judges the server's calls: the server may call `get_whoami` on
/// it and nothing else. The server's own (open) policy is not asked.
#[tokio::test]
async fn a_client_policy_refuses_the_server() {
    let pki = Pki::new();
    let server = start_server(&pki, test_pipe()).await;
    let calls = Arc::new(AtomicUsize::new(0));
    let dir = tempfile::tempdir().unwrap();
    let mut options = client_options(&pki, "web-1", server.local_addr(), test_pipe());
    options.node.handlers = counting_handlers("web-1", &calls);
    let names = options.node.handler_names(Side::Client).unwrap();
    let path = write_policy(
        dir.path(),
        "client-policy.toml",
        &format!(
            "[[allow]]\npeers = [{:?}]\nhandlers = [\"get_whoami\"]\n",
            server.identity()
        ),
    );
    options.node.policy = Policy::load(&path, &names).unwrap();
    let client = ClientNode::start(options).unwrap();
    client.wait_connected(Duration::from_secs(5)).await.unwrap();
    wait_for_client(&server, "web-1").await;

    let reply = server.call("web-1", whoami(), None).await.unwrap();
    assert_eq!(node_of(&reply), "web-1");
    let reply = server
        .call("web-1", Request::new("GET", "count"), None)
        .await
        .unwrap();
    assert_forbidden(&reply, server.identity(), "get_count");
    assert_eq!(calls.load(Ordering::SeqCst), 0, "a refused handler ran");
    // The other way the server's policy is open: the client may call anything there.
    assert_eq!(
        node_of(&client.call(whoami(), None).await.unwrap()),
        "server"
    );
}

/// `set_policy` swaps the policy of a running node; calls from then on are judged by it.
/// Each refusal is counted as `message.receive.forbidden.tick`.
#[tokio::test]
async fn set_policy_swaps_it_and_refusals_are_counted() {
    let pki = Pki::new();
    let statsd = Statsd::start().await;
    let calls = Arc::new(AtomicUsize::new(0));
    let mut options = server_options(&pki, "127.0.0.1:0".parse().unwrap(), test_pipe());
    options.node.handlers = counting_handlers("server", &calls);
    options.node.metrics = Metrics::statsd("127.0.0.1", statsd.port(), "restpipe").unwrap();
    let server = ServerNode::start(options).await.unwrap();
    assert!(server.policy().is_open());
    let client = start_client(&pki, "web-1", &server, test_pipe()).await;
    let count = || Request::new("GET", "count");
    assert_eq!(client.call(count(), None).await.unwrap().code, 0);

    let dir = tempfile::tempdir().unwrap();
    let path = write_policy(
        dir.path(),
        "p.toml",
        "[[allow]]\npeers = [\"nobody\"]\nhandlers = [\"get_count\"]\n",
    );
    server.set_policy(Policy::load(&path, &server.handler_names()).unwrap());
    assert_eq!(server.policy().path(), Some(path.as_path()));
    for _ in 0..3 {
        assert_forbidden(
            &client.call(count(), None).await.unwrap(),
            "web-1",
            "get_count",
        );
    }
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    let counted = wait_until(ARRIVAL, || {
        statsd.counter("message.receive.forbidden.tick") >= 3
    })
    .await;
    assert!(counted, "{:?}", statsd.lines());
    assert_eq!(statsd.counter("message.receive.forbidden.tick"), 3);

    server.set_policy(Policy::open());
    assert_eq!(client.call(count(), None).await.unwrap().code, 0);
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

// ----------------------------------------------------------------------------------------
// The real binary: start-up lines, refusals at start

/// Wait for `process` to exit, and return its exit code.
async fn exit_code(process: &mut Process) -> i32 {
    let exited = wait_until(Duration::from_secs(30), || process.exit_status().is_some()).await;
    assert!(
        exited,
        "{} did not exit; its log:\n{}",
        process.name,
        process.log_text()
    );
    process.exit_status().unwrap().code().unwrap()
}

/// A policy that does not parse, and one whose handler pattern matches nothing, are each
/// refused at start: exit code 1 and one line naming the file, the line and the reason.
#[tokio::test]
async fn a_bad_policy_is_refused_at_start_with_its_line() {
    let certs = Certs::new();
    let cases = [
        (
            "unparsable.toml",
            "[[allow]]\npeers = [web-*]\nhandlers = [\"get_time\"]\n",
            "line 2",
            "invalid",
        ),
        (
            "nomatch.toml",
            "# handlers of the time plug-in\n[[allow]]\npeers = [\"web-*\"]\nhandlers = [\"get_time\", \"get_tmie\"]\n",
            "line 4",
            "handler pattern \"get_tmie\" matches no handler of this node (it has: get_cat, get_time)",
        ),
        (
            "unknown-key.toml",
            "[[allow]]\npeers = [\"web-*\"]\nhandlers = [\"get_time\"]\nverbs = [\"GET\"]\n",
            "line ",
            "verbs",
        ),
        (
            "secret-in-file.toml",
            "[[allow]]\npeers = [\"*\"]\nhandlers = [\"*\"]\n[[token]]\nname = \"ops\"\nsecret = \"0123456789abcdef0123\"\nverbs = [\"GET\"]\npaths = [\"/status\"]\n",
            "line 6",
            "a secret is never written in the policy file",
        ),
        (
            "short-secret.toml",
            "[[token]]\nname = \"ops\"\nsecret_file = \"short.token\"\nverbs = [\"GET\"]\npaths = [\"/status\"]\n",
            "line 3",
            "is 5 bytes; it must be at least 16",
        ),
    ];
    std::fs::write(certs.dir().join("short.token"), "short\n").unwrap();
    for (name, text, line, reason) in cases {
        let path = write_policy(certs.dir(), name, text);
        let args = procs::server_args(&certs, &["--policy", path.to_str().unwrap()]);
        let mut process = Process::spawn(certs.dir(), name, &restpipe_bin(), args);
        assert_eq!(exit_code(&mut process).await, 1, "{}", process.log_text());
        let log = process.log_text();
        let error = log
            .lines()
            .find(|l| l.starts_with("error: "))
            .unwrap_or_else(|| panic!("no error line in {log}"));
        assert!(
            error.contains(&format!("policy {}: {line}", path.display())),
            "{name}: {error}"
        );
        assert!(error.contains(reason), "{name}: {error}");
        assert!(!log.contains(procs::READY_LINE), "{log}");
    }
}

/// The real binary logs one line for the policy in force: none, or the file's rules and
/// tokens; and with one, it refuses a client's call that no rule allows.
#[tokio::test]
async fn the_binary_says_which_policy_is_in_force_and_applies_it() {
    let certs = Certs::new();
    let (open, _) = procs::start_server(&certs, &[]).await;
    assert_eq!(
        open.log_count(&["no --policy: every authenticated peer may call every handler"]),
        1,
        "{}",
        open.log_text()
    );
    drop(open);

    std::fs::write(certs.dir().join("ops.token"), "ops-0123456789abcdef\n").unwrap();
    let path = write_policy(
        certs.dir(),
        "policy.toml",
        "[[allow]]\npeers = [\"web-*\"]\nhandlers = [\"get_time\"]\n\n[[token]]\nname = \"ops\"\nsecret_file = \"ops.token\"\nverbs = [\"GET\"]\npaths = [\"/status\"]\n",
    );
    let (server, port) = procs::start_server(&certs, &["--policy", path.to_str().unwrap()]).await;
    let line = format!("policy {}: 1 rules, 1 tokens", path.display());
    assert_eq!(server.log_count(&[&line]), 1, "{}", server.log_text());

    let server_addr = procs::loopback(port);
    let mut clients = Vec::new();
    for identity in ["web-1", "db-1"] {
        let cert = certs.client(identity);
        let args = procs::client_args(&certs, &cert, server_addr, &[]);
        clients.push(procs::Node::start(certs.dir(), identity, args).await);
    }
    let http = restpipe_testkit::http::http_client();
    for client in &clients {
        let up = wait_until_async(Duration::from_secs(10), || async {
            restpipe_testkit::http::get(&http, &client.url("/health"))
                .await
                .0
                == 200
        })
        .await;
        assert!(up, "{}", client.log_text());
    }
    let (status, _) = restpipe_testkit::http::get(&http, &clients[0].url("/server/time")).await;
    assert_eq!(status, 200);
    let answer = http
        .get(clients[1].url("/server/time"))
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status().as_u16(), 403);
    assert_eq!(answer.headers()["x-event-return-code"], "253");
    let message = error_of(&answer.bytes().await.unwrap());
    assert!(
        message.contains("db-1") && message.contains("get_time"),
        "{message}"
    );

    // The server's front door now wants the token.
    let (status, _) = restpipe_testkit::http::get(&http, &server.url("/status")).await;
    assert_eq!(status, 401);
    let answer = http
        .get(server.url("/status"))
        .bearer_auth("ops-0123456789abcdef")
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status().as_u16(), 200);
}

// ----------------------------------------------------------------------------------------
// Scoped tokens at the front door

const OPS: &str = "ops-secret-0123456789";
const WEB: &str = "web1-secret-abcdefghij";
/// A token whose secret is [`WEB`] with more after it.
const WEB_LONGER: &str = "web1-secret-abcdefghij-longer";
const ALL: &str = "all-scopes-secret-0123456789";

/// A server node whose policy allows everything on the pipe and names three tokens: `ops`
/// (GET on `/status` and `/clients`, secret from a file), `web1` (GET and POST under
/// `/client/web-1/`, secret from an environment variable), and `web1-longer` (GET under
/// `/client/web-2`, its secret `web1`'s with more after it); with `--http-token` set to
/// `http_token`. A client `web-1` is connected.
async fn token_nodes(
    dir: &Path,
    env_var: &str,
    http_token: Option<&str>,
) -> (RunningNode, RunningNode) {
    std::fs::write(dir.join("ops.token"), format!("{OPS}\n")).unwrap();
    std::env::set_var(env_var, WEB);
    std::env::set_var(format!("{env_var}_LONGER"), WEB_LONGER);
    let path = write_policy(
        dir,
        "policy.toml",
        &format!(
            r#"
[[allow]]
peers = ["*"]
handlers = ["*"]

[[token]]
name = "ops"
secret_file = "ops.token"
verbs = ["GET"]
paths = ["/status", "/clients"]

[[token]]
name = "web1"
secret_env = "{env_var}"
verbs = ["GET", "post"]
paths = ["/client/web-1/"]

[[token]]
name = "web1-longer"
secret_env = "{env_var}_LONGER"
verbs = ["*"]
paths = ["/client/web-2"]
"#
        ),
    );
    let pki = Pki::new();
    let mut s = settings(Side::Server);
    s.policy = Some(path);
    s.http_token = http_token.map(str::to_string);
    let server = app::start_with_tls(Side::Server, &s, pki.server_tls())
        .await
        .unwrap();
    let mut c = settings(Side::Client);
    c.server = server_of(&server).local_addr().to_string();
    let client = app::start_with_tls(Side::Client, &c, pki.client_tls("web-1"))
        .await
        .unwrap();
    client_of(&client)
        .wait_connected(Duration::from_secs(5))
        .await
        .unwrap();
    wait_for_client(server_of(&server), "web-1").await;
    let tokens = server_of(&server).policy();
    assert_eq!(tokens.tokens().len(), 3);
    let shown = format!("{tokens:?}");
    assert!(!shown.contains(OPS) && !shown.contains(WEB), "{shown}");
    (server, client)
}

/// In scope 200, out of scope 403 naming the token and what it lacks, missing or wrong 401
/// with `WWW-Authenticate: Bearer`; a token that is a prefix of another is its own token;
/// prefixes match on segment boundaries; `..`, encoded dots and slashes, and encoded
/// spellings are out of scope; tokens apply to `/health` too.
#[tokio::test]
async fn scoped_tokens_in_scope_out_of_scope_missing_and_wrong() {
    let dir = tempfile::tempdir().unwrap();
    let (server, _client) = token_nodes(dir.path(), "RP_TEST_POLICY_WEB_A", None).await;
    let at = server.http_addr;

    // In scope.
    for (token, method, path) in [
        (OPS, "GET", "/status"),
        (OPS, "GET", "/clients"),
        (WEB, "GET", "/client/web-1/time"),
        (WEB, "GET", "/client/web-1/cat//a%20b"),
    ] {
        let (status, head, body) = raw(at, method, path, Some(token)).await;
        assert_eq!(status, 200, "{method} {path}: {head}{body}");
    }
    // HEAD goes with GET: the router answers it, the guard lets it by.
    let (status, head, _) = raw(at, "HEAD", "/status", Some(OPS)).await;
    assert_ne!(status, 403, "{head}");
    assert_ne!(status, 401, "{head}");

    // Out of scope: 403, naming the token and the scope.
    for (token, name, method, path, lacks) in [
        (
            OPS,
            "ops",
            "GET",
            "/client/web-1/time",
            "its paths: /status, /clients",
        ),
        (OPS, "ops", "POST", "/status", "may not use POST"),
        (OPS, "ops", "GET", "/health", "its paths"),
        (OPS, "ops", "GET", "/statusx", "its paths"),
        (
            WEB,
            "web1",
            "DELETE",
            "/client/web-1/time",
            "may not use DELETE",
        ),
        (
            WEB,
            "web1",
            "GET",
            "/client/web-10/time",
            "its paths: /client/web-1",
        ),
        (WEB, "web1", "GET", "/client/web-1x", "its paths"),
        (WEB, "web1", "GET", "/clients", "its paths"),
        (WEB, "web1", "GET", "/client/web-1/../web-2/time", "`..`"),
        (
            WEB,
            "web1",
            "GET",
            "/client/web-1/%2e%2e/web-2/time",
            "`..`",
        ),
        (WEB, "web1", "GET", "/client/web-1/.%2E/web-2/time", "`..`"),
        (
            WEB,
            "web1",
            "GET",
            "/client/web-1%2f..%2fweb-2/time",
            "encoded",
        ),
        (
            WEB,
            "web1",
            "GET",
            "/client/web-1/cat//x%2F..%2F..",
            "encoded",
        ),
        (WEB, "web1", "GET", "/client/web%2D1/time", "its paths"),
        (WEB, "web1", "GET", "//client/web-1/time", "its paths"),
        (
            WEB_LONGER,
            "web1-longer",
            "GET",
            "/client/web-1/time",
            "its paths: /client/web-2",
        ),
    ] {
        let (status, head, body) = raw(at, method, path, Some(token)).await;
        assert_eq!(status, 403, "{method} {path}: {head}{body}");
        let message = raw_error(&body);
        assert!(
            message.contains(&format!("token {name} ")) && message.contains(lacks),
            "{method} {path}: {message}"
        );
    }
    // The longer token reaches its own scope (the client is not connected: the guard let it
    // by, and the pipe answers).
    let (status, head, _) = raw(at, "GET", "/client/web-2/time", Some(WEB_LONGER)).await;
    assert!(status != 401 && status != 403, "{head}");

    // Missing or wrong: 401 with WWW-Authenticate, on every route.
    for (path, token) in [
        ("/status", None),
        ("/health", None),
        ("/client/web-1/time", Some("nope")),
        ("/client/web-1/time", Some("")),
        ("/client/web-1/time", Some(&WEB[..WEB.len() - 1])),
        (
            "/client/web-1/time",
            Some(&WEB_LONGER[..WEB_LONGER.len() - 1]),
        ),
        ("/status", Some(&format!("{OPS}x")[..])),
        ("/status", Some(ALL)),
    ] {
        let (status, head, body) = raw(at, "GET", path, token).await;
        assert_eq!(status, 401, "{path} {token:?}: {head}{body}");
        assert!(head.contains("www-authenticate: bearer"), "{head}");
        assert!(raw_error(&body).contains("--policy"), "{body}");
    }
}

/// `--http-token` keeps working beside the policy's tokens, with every scope.
#[tokio::test]
async fn the_http_token_has_every_scope() {
    let dir = tempfile::tempdir().unwrap();
    let (server, _client) = token_nodes(dir.path(), "RP_TEST_POLICY_WEB_B", Some(ALL)).await;
    let at = server.http_addr;
    for (method, path) in [
        ("GET", "/status"),
        ("GET", "/clients"),
        ("GET", "/health"),
        ("GET", "/client/web-1/time"),
    ] {
        let (status, head, body) = raw(at, method, path, Some(ALL)).await;
        assert_eq!(status, 200, "{method} {path}: {head}{body}");
    }
    // Past the guard: the router's and the pipe's answers, never 401 or 403.
    for (method, path, expected) in [
        ("POST", "/client/web-1/time", 404),
        ("GET", "/client/web-1/../web-2/time", 400),
    ] {
        let (status, head, _) = raw(at, method, path, Some(ALL)).await;
        assert_eq!(status, expected, "{method} {path}: {head}");
    }
    // The scoped tokens are still scoped.
    let (status, _, _) = raw(at, "GET", "/clients", Some(WEB)).await;
    assert_eq!(status, 403);
    let (status, head, body) = raw(at, "GET", "/status", Some("wrong")).await;
    assert_eq!(status, 401, "{head}");
    let message = raw_error(&body);
    assert!(
        message.contains("--http-token") && message.contains("--policy"),
        "{message}"
    );
}

/// A policy token with the secret of `--http-token` is refused at start: it would have every
/// scope.
#[tokio::test]
async fn a_policy_token_cannot_share_the_http_token() {
    let dir = tempfile::tempdir().unwrap();
    std::env::set_var("RP_TEST_POLICY_WEB_C", WEB);
    let path = write_policy(
        dir.path(),
        "policy.toml",
        "[[token]]\nname = \"web1\"\nsecret_env = \"RP_TEST_POLICY_WEB_C\"\nverbs = [\"GET\"]\npaths = [\"/status\"]\n",
    );
    let mut s = settings(Side::Server);
    s.policy = Some(path);
    s.http_token = Some(WEB.into());
    let error = app::start_with_tls(Side::Server, &s, Pki::new().server_tls())
        .await
        .err()
        .expect("refused");
    assert!(error.to_string().contains("--http-token"), "{error}");
}
