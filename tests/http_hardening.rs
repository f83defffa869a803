//! The front door under local attack (issue 11): real nodes on `127.0.0.1:0` joined by a real
//! mutual-TLS pipe, attacked through real sockets while a good client keeps calling.
//!
//! Every test shows the attacker's clear error and, at the same time, a good client that sees
//! no failure; where a request could cross the pipe, a counting handler on the server shows
//! that nothing crossed. Slow sockets are paced one byte a second, bounded in count and time;
//! everything else waits on events (an answer, a close), not on sleeps.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use restpipe::app::{self, RunningNode};
use restpipe::handler::{Context, HandlerError, Handlers, Reply, Request};
use restpipe::http::{AllowedHosts, HttpLimits, HttpListen, HttpOptions, Pipe, ServeOptions};
use restpipe::{
    ClientNode, ClientOptions, Metrics, NodeOptions, PipeConfig, ServerNode, ServerOptions,
    TlsMaterial,
};
use restpipe_certs::{CertificateAuthority, IssueOptions};
use restpipe_testkit::nodes::wait_for_client;
use restpipe_testkit::wait::wait_until;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;

const CLIENT_ID: &str = "worker-1";

/// A server, a client `worker-1` joined to it, and the client's front door.
///
/// The server counts the calls of `count` (GET or POST) that crossed the pipe: the attacks'
/// target. The good client calls `good`, which is not counted.
struct Scene {
    _server: ServerNode,
    client: ClientNode,
    front: RunningNode,
    server_front: RunningNode,
    crossed: Arc<AtomicUsize>,
    /// Told when `hold` is called; `hold` answers once `release` is told.
    held: Hold,
    _dir: tempfile::TempDir,
}

/// The two events of the `hold` handler.
#[derive(Clone, Default)]
struct Hold {
    entered: Arc<tokio::sync::Notify>,
    release: Arc<tokio::sync::Notify>,
}

fn handlers(crossed: &Arc<AtomicUsize>, hold: &Hold) -> Handlers {
    let mut handlers = Handlers::new();
    let hold = hold.clone();
    handlers.add("get_hold", move |_ctx: Context, _req: Request| {
        let hold = hold.clone();
        async move {
            hold.entered.notify_one();
            hold.release.notified().await;
            Ok::<_, HandlerError>(Reply::text("held"))
        }
    });
    for name in ["get_count", "post_count"] {
        let crossed = crossed.clone();
        handlers.add(name, move |_ctx: Context, _req: Request| {
            let crossed = crossed.clone();
            async move {
                crossed.fetch_add(1, Ordering::SeqCst);
                Ok::<_, HandlerError>(Reply::text("counted"))
            }
        });
    }
    handlers.add("get_good", |_ctx: Context, _req: Request| async move {
        Ok::<_, HandlerError>(Reply::text("good"))
    });
    handlers
}

fn pipe() -> PipeConfig {
    PipeConfig {
        heartbeat_interval: Duration::from_secs(1),
        heartbeat_timeout: Duration::from_secs(5),
        handshake_timeout: Duration::from_secs(3),
        connect_wait: Duration::from_secs(3),
        request_timeout: Duration::from_secs(10),
        ..PipeConfig::default()
    }
}

impl Scene {
    /// The client's front door listens on `listen` (TCP `127.0.0.1:0` if `None`) and is
    /// guarded and limited by `serve`; the server's front door has the defaults.
    async fn start(serve: ServeOptions, listen: Option<&Path>) -> Scene {
        let dir = tempfile::tempdir().unwrap();
        let ca =
            CertificateAuthority::generate("hardening CA", &IssueOptions::ca_default()).unwrap();
        let leaf = IssueOptions::default();
        let server_cert = ca
            .issue_server("localhost", &["127.0.0.1".into()], &leaf)
            .unwrap();
        let client_cert = ca.issue_client(CLIENT_ID, &leaf).unwrap();
        let crossed = Arc::new(AtomicUsize::new(0));
        let held = Hold::default();

        let server_tls =
            TlsMaterial::from_pem(ca.cert_pem(), &server_cert.cert_pem, &server_cert.key_pem)
                .unwrap();
        let mut node = NodeOptions::new(server_tls);
        node.pipe = pipe();
        node.handlers = handlers(&crossed, &held);
        let server = ServerNode::start(ServerOptions::new(node, loopback0()))
            .await
            .unwrap();

        let client_tls =
            TlsMaterial::from_pem(ca.cert_pem(), &client_cert.cert_pem, &client_cert.key_pem)
                .unwrap();
        let mut node = NodeOptions::new(client_tls);
        node.pipe = pipe();
        let mut options = ClientOptions::new(node, server.local_addr().to_string());
        options.server_name = Some("localhost".into());
        let client = ClientNode::start(options).unwrap();
        client.wait_connected(Duration::from_secs(5)).await.unwrap();
        wait_for_client(&server, CLIENT_ID).await;

        let options = HttpOptions {
            max_body: pipe().max_body,
            token: None,
            metrics: Metrics::disabled(),
            queue: None,
        };
        let listen = match listen {
            Some(path) => HttpListen::Unix(path.to_path_buf()),
            None => HttpListen::Tcp(loopback0()),
        };
        let front = app::start_http_on(
            Pipe::Client(client.clone()),
            options.clone(),
            &serve,
            &listen,
        )
        .await
        .unwrap();
        let server_front = app::start_http(Pipe::Server(server.clone()), options, loopback0())
            .await
            .unwrap();
        Scene {
            _server: server,
            client,
            front,
            server_front,
            crossed,
            held,
            _dir: dir,
        }
    }

    fn addr(&self) -> SocketAddr {
        self.front.http_addr
    }

    fn crossed(&self) -> usize {
        self.crossed.load(Ordering::SeqCst)
    }
}

fn loopback0() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

/// An answer read off a raw socket.
#[derive(Debug)]
struct Answer {
    status: u16,
    head: String,
    body: Value,
}

fn parse_answer(bytes: &[u8]) -> Answer {
    let text = String::from_utf8_lossy(bytes);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {text:?}"));
    Answer {
        status,
        head: head.to_ascii_lowercase(),
        body: serde_json::from_str(body).unwrap_or(Value::String(body.to_string())),
    }
}

/// Send `request` as is on a new connection and read the answer until the node closes.
async fn raw(addr: SocketAddr, request: &str) -> Answer {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), stream.read_to_end(&mut answer))
        .await
        .expect("the node answered within 20 s")
        .unwrap();
    parse_answer(&answer)
}

/// `METHOD target` with the extra header lines given, on a new connection.
async fn call(addr: SocketAddr, method: &str, target: &str, headers: &[&str]) -> Answer {
    let mut request = format!("{method} {target} HTTP/1.1\r\nConnection: close\r\n");
    for line in headers {
        request.push_str(line);
        request.push_str("\r\n");
    }
    if method == "POST" {
        request.push_str("Content-Length: 2\r\n\r\nhi");
    } else {
        request.push_str("\r\n");
    }
    raw(addr, &request).await
}

fn error_of(answer: &Answer) -> &str {
    answer.body["error"]
        .as_str()
        .unwrap_or_else(|| panic!("no JSON error in {answer:?}"))
}

/// A good client calling `GET /server/good` again and again until stopped; with
/// `fresh_connections` each call on a new connection, else all on one kept-alive connection.
struct GoodClient {
    stop: Arc<AtomicBool>,
    task: JoinHandle<(usize, Vec<String>)>,
    ok: Arc<AtomicUsize>,
}

impl GoodClient {
    fn start(addr: SocketAddr, fresh_connections: bool) -> GoodClient {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicUsize::new(0));
        let (flag, count) = (stop.clone(), ok.clone());
        let task = tokio::spawn(async move {
            let http = reqwest::Client::builder()
                .no_proxy()
                .timeout(Duration::from_secs(10))
                .pool_max_idle_per_host(if fresh_connections { 0 } else { 1 })
                .build()
                .unwrap();
            let mut failures = Vec::new();
            while !flag.load(Ordering::SeqCst) {
                match http.get(format!("http://{addr}/server/good")).send().await {
                    Ok(r) if r.status() == 200 => {
                        count.fetch_add(1, Ordering::SeqCst);
                    }
                    Ok(r) => failures.push(format!("status {}", r.status())),
                    Err(e) => failures.push(e.to_string()),
                }
            }
            (count.load(Ordering::SeqCst), failures)
        });
        GoodClient { stop, task, ok }
    }

    /// Wait until the good client has `n` more successes than now (it is running).
    async fn wait_for_more(&self, n: usize) {
        let target = self.ok.load(Ordering::SeqCst) + n;
        let ok = self.ok.clone();
        assert!(
            wait_until(Duration::from_secs(20), || ok.load(Ordering::SeqCst)
                >= target)
            .await,
            "the good client stalled"
        );
    }

    /// Stop it; it must have seen no failure. Its count of successes.
    async fn finish(self) -> usize {
        self.stop.store(true, Ordering::SeqCst);
        let (ok, failures) = self.task.await.unwrap();
        assert!(failures.is_empty(), "the good client failed: {failures:?}");
        ok
    }
}

// ----------------------------------------------------------------------------------------
// The guard

#[tokio::test]
async fn dns_rebinding_host_is_refused_and_nothing_crosses() {
    let scene = Scene::start(ServeOptions::default(), None).await;
    let good = GoodClient::start(scene.addr(), false);
    good.wait_for_more(1).await;

    let server = scene.server_front.http_addr;
    for (addr, method, target) in [
        (scene.addr(), "GET", "/server/count"),
        (scene.addr(), "POST", "/server/count"),
        (scene.addr(), "GET", "/status"),
        (scene.addr(), "GET", "/health"),
        (server, "GET", "/clients"),
        (server, "GET", "/status"),
        (server, "POST", "/client/worker-1/count"),
    ] {
        for host in [
            "evil.example",
            "evil.example:8080",
            "localhost.evil.example",
            "10.1.2.3",
        ] {
            let answer = call(addr, method, target, &[&format!("Host: {host}")]).await;
            assert_eq!(
                answer.status, 403,
                "{method} {target} Host {host}: {answer:?}"
            );
            let error = error_of(&answer);
            assert!(
                error.contains("Host") && error.contains("--http-allowed-hosts"),
                "{error}"
            );
        }
    }
    // An absolute request target names its own host.
    let answer = call(
        scene.addr(),
        "GET",
        "http://evil.example/server/count",
        &["Host: localhost"],
    )
    .await;
    assert_eq!(answer.status, 403, "{answer:?}");
    // HTTP/1.1 without a Host is malformed.
    let answer = raw(
        scene.addr(),
        "GET /server/count HTTP/1.1\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(answer.status, 400, "{answer:?}");

    assert_eq!(scene.crossed(), 0, "a refused request crossed the pipe");

    // Loopback hosts, any case, trailing dot, any port: the call crosses.
    for host in ["localhost", "LocalHost.:1", "127.0.0.1:8080", "[::1]"] {
        let answer = call(
            scene.addr(),
            "GET",
            "/server/count",
            &[&format!("Host: {host}")],
        )
        .await;
        assert_eq!(answer.status, 200, "Host {host}: {answer:?}");
    }
    // HTTP/1.0 without a Host: no browser sends that; it is served.
    let answer = raw(scene.addr(), "GET /server/count HTTP/1.0\r\n\r\n").await;
    assert_eq!(answer.status, 200, "{answer:?}");
    assert_eq!(scene.crossed(), 5);
    let ok = good.finish().await;
    assert!(ok > 0);
}

#[tokio::test]
async fn cross_site_origin_and_fetch_site_are_refused() {
    let scene = Scene::start(ServeOptions::default(), None).await;
    let good = GoodClient::start(scene.addr(), false);
    good.wait_for_more(1).await;
    for (header, says) in [
        ("Origin: http://evil.example", "Origin"),
        ("Origin: https://evil.example:443", "Origin"),
        ("Origin: null", "Origin"),
        ("Sec-Fetch-Site: cross-site", "Sec-Fetch-Site"),
    ] {
        for method in ["GET", "POST"] {
            let answer = call(
                scene.addr(),
                method,
                "/server/count",
                &["Host: localhost:8080", header],
            )
            .await;
            assert_eq!(answer.status, 403, "{header}: {answer:?}");
            assert!(error_of(&answer).contains(says), "{answer:?}");
        }
    }
    assert_eq!(scene.crossed(), 0, "a cross-site request crossed the pipe");
    // A page served from loopback may call; so may a same-origin fetch.
    for header in [
        "Origin: http://localhost:3000",
        "Sec-Fetch-Site: same-origin",
    ] {
        let answer = call(
            scene.addr(),
            "POST",
            "/server/count",
            &["Host: localhost", header],
        )
        .await;
        assert_eq!(answer.status, 200, "{header}: {answer:?}");
    }
    assert_eq!(scene.crossed(), 2);
    good.finish().await;
}

#[tokio::test]
async fn hosts_given_to_the_setting_are_allowed() {
    let serve = ServeOptions {
        allowed_hosts: AllowedHosts::parse(&["RP.Example.com", "10.9.8.7"]).unwrap(),
        ..ServeOptions::default()
    };
    let scene = Scene::start(serve, None).await;
    let good = GoodClient::start(scene.addr(), false);
    good.wait_for_more(1).await;
    for headers in [
        &["Host: rp.example.com"][..],
        &[
            "Host: rp.example.com.:443",
            "Origin: https://rp.example.com",
        ],
        &["Host: 10.9.8.7:8080"],
        // nginx with `proxy_set_header Host $host;`.
        &["Host: RP.EXAMPLE.COM", "X-Forwarded-For: 203.0.113.9"],
    ] {
        let answer = call(scene.addr(), "GET", "/server/count", headers).await;
        assert_eq!(answer.status, 200, "{headers:?}: {answer:?}");
    }
    let answer = call(scene.addr(), "GET", "/server/count", &["Host: example.com"]).await;
    assert_eq!(answer.status, 403, "{answer:?}");
    assert_eq!(scene.crossed(), 4);
    good.finish().await;
}

// ----------------------------------------------------------------------------------------
// The Unix socket

/// `curl --unix-socket path` with `args`: the status and the body.
async fn curl(socket: &Path, args: &[&str]) -> (u16, String) {
    let output = tokio::process::Command::new("curl")
        .arg("--silent")
        .arg("--max-time")
        .arg("10")
        .arg("--unix-socket")
        .arg(socket)
        .args(["--write-out", "\n%{http_code}"])
        .args(args)
        .output()
        .await
        .expect("curl runs");
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    (code.trim().parse().unwrap_or(0), body.to_string())
}

#[tokio::test]
async fn unix_socket_serves_the_same_routes_behind_the_same_guard() {
    use std::os::unix::fs::{FileTypeExt as _, PermissionsExt as _};

    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("node.sock");
    let scene = Scene::start(ServeOptions::default(), Some(&socket)).await;
    assert_eq!(scene.front.http_listen, HttpListen::Unix(socket.clone()));
    let meta = std::fs::metadata(&socket).unwrap();
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o7777, 0o660);

    // curl sends `Host: localhost` over a Unix socket.
    let (status, body) = curl(&socket, &["http://localhost/server/count"]).await;
    assert_eq!((status, body.as_str()), (200, "counted"));
    let (status, body) = curl(&socket, &["http://localhost/status"]).await;
    assert_eq!(status, 200, "{body}");
    let status_json: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(status_json["role"], "client");
    // The guard applies: a rebinding Host, a cross-site Origin.
    let (status, body) = curl(
        &socket,
        &["-H", "Host: evil.example", "http://localhost/server/count"],
    )
    .await;
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("--http-allowed-hosts"), "{body}");
    let (status, _) = curl(
        &socket,
        &[
            "-H",
            "Origin: http://evil.example",
            "-X",
            "POST",
            "http://localhost/server/count",
        ],
    )
    .await;
    assert_eq!(status, 403);
    assert_eq!(scene.crossed(), 1);

    // Shutdown removes the socket.
    scene.front.shutdown(Duration::from_secs(2)).await;
    assert!(!socket.exists(), "the socket outlived its node");
}

#[tokio::test]
async fn unix_socket_mode_stale_sockets_and_foreign_files() {
    use std::os::unix::fs::PermissionsExt as _;

    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("node.sock");
    // A stale socket (its listener gone) is replaced; the mode is configurable.
    drop(std::os::unix::net::UnixListener::bind(&socket).unwrap());
    assert!(socket.exists());
    let serve = ServeOptions {
        socket_mode: 0o600,
        ..ServeOptions::default()
    };
    let scene = Scene::start(serve, Some(&socket)).await;
    let mode = std::fs::metadata(&socket).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode, 0o600);
    assert_eq!(
        curl(&socket, &["http://localhost/server/good"]).await.0,
        200
    );

    // A live socket is not taken over; a path that is not a socket is not removed.
    let options = HttpOptions {
        max_body: 1024,
        token: None,
        metrics: Metrics::disabled(),
        queue: None,
    };
    let pipe = Pipe::Client(scene.client.clone());
    let live = app::start_http_on(
        pipe.clone(),
        options.clone(),
        &ServeOptions::default(),
        &HttpListen::Unix(socket.clone()),
    )
    .await
    .err()
    .expect("a live socket was taken over");
    assert!(live.to_string().contains("another process"), "{live:#}");
    let file = dir.path().join("not-a-socket");
    std::fs::write(&file, "keep me").unwrap();
    let foreign = app::start_http_on(
        pipe,
        options,
        &ServeOptions::default(),
        &HttpListen::Unix(file.clone()),
    )
    .await
    .err()
    .expect("a regular file was taken over");
    assert!(foreign.to_string().contains("not a socket"), "{foreign:#}");
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "keep me");
    assert_eq!(
        curl(&socket, &["http://localhost/server/good"]).await.0,
        200
    );
    scene.front.shutdown(Duration::from_secs(2)).await;
    assert!(!socket.exists());
}

// ----------------------------------------------------------------------------------------
// Timeouts and the connection cap

/// A socket that sends a request's headers one byte a second (at most `max_bytes`), until the
/// node closes it. How long after its connect the node closed it, or `None`.
async fn slow_socket(addr: SocketAddr, max_bytes: usize) -> Option<Duration> {
    let mut stream = TcpStream::connect(addr).await.ok()?;
    let started = Instant::now();
    let headers = b"GET /server/good HTTP/1.1\r\nHost: localhost\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
    let mut sink = [0u8; 256];
    for byte in headers.iter().take(max_bytes) {
        if stream.write_all(&[*byte]).await.is_err() {
            return Some(started.elapsed());
        }
        tokio::select! {
            read = stream.read(&mut sink) => match read {
                Ok(0) | Err(_) => return Some(started.elapsed()),
                Ok(_) => {}
            },
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
    None
}

#[tokio::test]
async fn slowloris_is_cut_by_the_header_timeout_while_good_clients_are_served() {
    const SOCKETS: usize = 200;
    let serve = ServeOptions {
        limits: HttpLimits {
            header_timeout: Duration::from_secs(1),
            ..HttpLimits::default()
        },
        ..ServeOptions::default()
    };
    let scene = Scene::start(serve, None).await;
    let good = GoodClient::start(scene.addr(), true);
    good.wait_for_more(1).await;
    let started = Instant::now();
    let slow: Vec<_> = (0..SOCKETS)
        .map(|_| tokio::spawn(slow_socket(scene.addr(), 20)))
        .collect();
    let mut closed_after = Vec::new();
    for socket in slow {
        closed_after.push(
            socket
                .await
                .unwrap()
                .expect("a slow socket was never closed"),
        );
    }
    let all_closed = started.elapsed();
    let ok = good.finish().await;
    let longest = closed_after.iter().max().unwrap();
    eprintln!(
        "slowloris: {SOCKETS} sockets at 1 byte/s, header timeout 1 s: all closed within {:.2} s (the longest {:.2} s after its connect); the good client had {ok} successes and no failure",
        all_closed.as_secs_f64(),
        longest.as_secs_f64()
    );
    assert!(*longest < Duration::from_secs(4), "{longest:?}");
    assert!(ok >= 5, "the good client had only {ok} successes");
}

#[tokio::test]
async fn a_stalled_body_is_408_and_nothing_crosses() {
    let serve = ServeOptions {
        limits: HttpLimits {
            body_timeout: Duration::from_secs(1),
            ..HttpLimits::default()
        },
        ..ServeOptions::default()
    };
    let scene = Scene::start(serve, None).await;
    let good = GoodClient::start(scene.addr(), false);
    good.wait_for_more(1).await;
    for request in [
        "POST /server/count HTTP/1.1\r\nHost: localhost\r\nContent-Length: 100\r\n\r\n0123456789",
        "POST /server/count HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n",
    ] {
        let started = Instant::now();
        let answer = raw(scene.addr(), request).await;
        let took = started.elapsed();
        assert_eq!(answer.status, 408, "{answer:?}");
        assert!(error_of(&answer).contains("--http-body-timeout"), "{answer:?}");
        assert!(answer.head.contains("connection: close"), "{answer:?}");
        assert!(
            took >= Duration::from_millis(900) && took < Duration::from_secs(4),
            "{took:?}"
        );
        eprintln!("stalled body: 408 after {:.2} s", took.as_secs_f64());
    }
    assert_eq!(scene.crossed(), 0, "a stalled body crossed the pipe");
    good.finish().await;
}

#[tokio::test]
async fn idle_keep_alive_connections_are_closed_after_the_idle_timeout() {
    let serve = ServeOptions {
        limits: HttpLimits {
            idle_timeout: Duration::from_secs(1),
            header_timeout: Duration::from_secs(30),
            ..HttpLimits::default()
        },
        ..ServeOptions::default()
    };
    let scene = Scene::start(serve, None).await;
    let mut stream = TcpStream::connect(scene.addr()).await.unwrap();
    stream
        .write_all(b"GET /server/good HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await
        .unwrap();
    let mut buf = vec![0u8; 4096];
    let n = stream.read(&mut buf).await.unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    let idle_from = Instant::now();
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut rest))
        .await
        .expect("the idle connection was not closed")
        .unwrap();
    let idle = idle_from.elapsed();
    assert!(
        idle >= Duration::from_millis(900) && idle < Duration::from_secs(4),
        "{idle:?}"
    );
}

#[tokio::test]
async fn past_the_connection_cap_the_answer_is_503_and_good_clients_recover() {
    const CAP: usize = 20;
    let serve = ServeOptions {
        limits: HttpLimits {
            max_connections: CAP,
            header_timeout: Duration::from_secs(60),
            ..HttpLimits::default()
        },
        ..ServeOptions::default()
    };
    let scene = Scene::start(serve, None).await;
    // The good client holds one kept-alive connection from before the flood.
    let good = GoodClient::start(scene.addr(), false);
    good.wait_for_more(1).await;
    // Hogs take every other slot: connected, a request begun and never finished.
    let mut hogs = Vec::new();
    for _ in 0..CAP - 1 {
        let mut hog = TcpStream::connect(scene.addr()).await.unwrap();
        hog.write_all(b"GET /server/good HTTP/1.1\r\nHost: loc")
            .await
            .unwrap();
        hogs.push(hog);
    }
    // Connections are accepted in order: those past the cap are turned away.
    let mut busy = 0;
    for _ in 0..10 {
        let mut excess = TcpStream::connect(scene.addr()).await.unwrap();
        let _ = excess
            .write_all(b"GET /server/good HTTP/1.1\r\nHost: localhost\r\n\r\n")
            .await;
        let mut answer = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(10), excess.read_to_end(&mut answer))
            .await
            .expect("an excess connection was left hanging");
        if !answer.is_empty() {
            let answer = parse_answer(&answer);
            assert_eq!(answer.status, 503, "{answer:?}");
            assert!(error_of(&answer).contains("--http-max-connections"));
            assert!(answer.head.contains("retry-after"));
            busy += 1;
        }
    }
    eprintln!(
        "connection cap {CAP}: of 10 connections past it, {busy} answered 503, the others closed"
    );
    // The good client's connection kept working through it.
    good.wait_for_more(3).await;
    drop(hogs);
    // Once the hogs are gone, new connections are served again.
    let deadline = Instant::now() + Duration::from_secs(10);
    let answer = loop {
        let answer = call(scene.addr(), "GET", "/status", &["Host: localhost"]).await;
        if answer.status != 503 || Instant::now() > deadline {
            break answer;
        }
        tokio::task::yield_now().await;
    };
    assert_eq!(answer.status, 200, "{answer:?}");
    assert!(answer.body["http"]["refused_connections"].as_u64().unwrap() >= 10);
    assert_eq!(answer.body["http"]["max_connections"], CAP);
    good.finish().await;
}

#[tokio::test]
async fn shutdown_drains_requests_in_flight_and_stops_accepting() {
    let scene = Scene::start(ServeOptions::default(), None).await;
    let addr = scene.addr();
    let held = scene.held.clone();
    // A request in flight when the stop comes.
    let mut in_flight = TcpStream::connect(addr).await.unwrap();
    in_flight
        .write_all(b"GET /server/hold HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await
        .unwrap();
    held.entered.notified().await;
    let mut idle = TcpStream::connect(addr).await.unwrap();
    let shutdown = tokio::spawn(scene.front.shutdown(Duration::from_secs(5)));
    // The idle connection is closed at once, while the request in flight goes on.
    let mut sink = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), idle.read_to_end(&mut sink))
        .await
        .expect("an idle connection outlived the stop")
        .ok();
    assert!(sink.is_empty());
    held.release.notify_one();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), in_flight.read_to_end(&mut answer))
        .await
        .unwrap()
        .unwrap();
    let answer = parse_answer(&answer);
    assert_eq!(answer.status, 200, "{answer:?}");
    assert_eq!(answer.body, "held");
    shutdown.await.unwrap();
    assert!(
        TcpStream::connect(addr).await.is_err(),
        "still accepting after shutdown"
    );
}
