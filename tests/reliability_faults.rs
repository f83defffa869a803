//! Faults with real processes and real sockets: the `restpipe` binary started as a server and
//! as clients on free loopback ports ([`restpipe_testkit::procs`]), under HTTP load, while the test kills the
//! server with SIGKILL, silences the network, flaps a client, or floods a slow handler.
//!
//! Every request sent is counted and ends in exactly one answer (200, or 502, 503 or 504);
//! none hangs (each is bounded by an outer timeout that counts it as hung) and none is lost.
//! Memory and file descriptors are read from `/proc/<pid>` of the server process, with
//! generous bounds: the machine may be busy with other work. Each test prints its figures
//! (`--nocapture`); docs/RELIABILITY.md records them.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use restpipe::handler::Request;
use restpipe_testkit::certs::*;
use restpipe_testkit::http::*;
use restpipe_testkit::procs::*;
use restpipe_testkit::raw::proto::frame::Kind;
use restpipe_testkit::raw::{event_frame, TlsPeer};
use restpipe_testkit::relay::Relay;
use restpipe_testkit::statsd::Statsd;
use restpipe_testkit::wait::{wait_until, wait_until_async};

fn with(base: &[&str], more: &[&str]) -> Vec<String> {
    base.iter().chain(more).map(|s| s.to_string()).collect()
}

fn refs(args: &[String]) -> Vec<&str> {
    args.iter().map(String::as_str).collect()
}

/// A client process `identity` dialling `target`, with `extra` flags.
async fn client(
    certs: &Certs,
    identity: &str,
    target: std::net::SocketAddr,
    extra: &[&str],
) -> Node {
    let cert = certs.client(identity);
    let args = client_args(certs, &cert, target, extra);
    Node::start(certs.dir(), identity, args).await
}

/// Wait (at most `limit`) until the server lists exactly `identities` and each client node
/// answers `/health` with 200.
async fn wait_all_connected(
    http: &reqwest::Client,
    server: &Node,
    clients: &[Node],
    limit: Duration,
) -> bool {
    let mut want: Vec<String> = clients.iter().map(|c| c.name.clone()).collect();
    want.sort();
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        let mut healthy = true;
        for c in clients {
            healthy &= get(http, &c.url("/health")).await.0 == 200;
        }
        if healthy && listed_clients(http, server).await == want {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

/// A request through `url` with `X-Event-Timeout-Ms: timeout_ms`: status, body and how long it
/// took. Fails the test after 30 s.
async fn timed_get(http: &reqwest::Client, url: &str, timeout_ms: u64) -> (u16, String, Duration) {
    let started = Instant::now();
    let fut = async {
        let response = http
            .get(url)
            .header("X-Event-Timeout-Ms", timeout_ms.to_string())
            .send()
            .await?;
        let status = response.status().as_u16();
        Ok::<_, reqwest::Error>((status, response.text().await?))
    };
    let (status, body) = tokio::time::timeout(Duration::from_secs(30), fut)
        .await
        .unwrap_or_else(|_| panic!("GET {url} hung"))
        .unwrap_or_else(|e| panic!("GET {url}: {e}"));
    (status, body, started.elapsed())
}

// ----------------------------------------------------------------------------------------
// 1. SIGKILL under load

/// Three client processes under load (six HTTP workers through their `/server/time`), the
/// server process killed with SIGKILL and restarted on the same port. Every request sent is
/// answered: 200, or 502 (in flight when the server died), 503 (no pipe within the connect
/// wait) or 504; none hangs, none is lost. Every client comes back, and the next 300 requests
/// after that all succeed, in both directions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_killed_under_load_loses_no_request_and_every_client_returns() {
    let certs = Certs::new();
    let http = http_client();
    let (mut server, pipe_port) = start_server(&certs, &quick_timings("1")).await;
    let client_flags = with(&quick_timings("1"), &["--reconnect-max", "1"]);
    let mut clients = Vec::new();
    for i in 1..=3 {
        let name = format!("worker-{i}");
        clients.push(client(&certs, &name, loopback(pipe_port), &refs(&client_flags)).await);
    }
    assert!(
        wait_all_connected(&http, &server, &clients, Duration::from_secs(20)).await,
        "the clients never all connected"
    );

    let load = Load::start(LoadSpec {
        urls: clients.iter().map(|c| c.url("/server/time")).collect(),
        workers: 6,
        timeout_ms: 3000,
        outer: Duration::from_secs(20),
        pause: Duration::ZERO,
    });
    load.next_records(0, 150, Duration::from_secs(60)).await;

    let killed_pid = server.pid();
    server.kill();
    let killed = Instant::now();
    let at_kill = load.len();
    tokio::time::sleep(Duration::from_millis(500)).await;
    server.restart().await;
    assert_ne!(server.pid(), killed_pid);
    assert!(
        wait_all_connected(&http, &server, &clients, Duration::from_secs(20)).await,
        "not every client came back after the restart"
    );
    let outage = killed.elapsed();
    let back = load.len();
    let last = load.next_records(back, 300, Duration::from_secs(60)).await;
    let (tally, records) = load.finish().await;

    println!("SIGKILL under load: {tally}");
    println!(
        "  killed after {at_kill} requests; every client back after {outage:?}; \
         failures around the kill: {}",
        records
            .iter()
            .filter(|r| r.outcome != Outcome::Status(200))
            .count()
    );
    assert_eq!(tally.lost(), 0, "requests sent but never answered: {tally}");
    assert_eq!(tally.unexpected(), 0, "unexpected answers: {tally}");
    let bad_after: Vec<_> = last
        .iter()
        .filter(|r| r.outcome != Outcome::Status(200))
        .collect();
    assert!(
        bad_after.is_empty(),
        "after every client was back, {} of the next 300 failed: {bad_after:?}",
        bad_after.len()
    );
    // Both directions work again: the server calls each client.
    for c in &clients {
        let (status, body) = get(&http, &server.url(&format!("/client/{}/time", c.name))).await;
        assert_eq!(status, 200, "{}: {body}", c.name);
        assert!(body.contains("time_from_client"), "{body}");
    }
    for c in &clients {
        assert!(
            c.log_count(&["connection lost"]) >= 1,
            "{} never saw the server go",
            c.name
        );
    }
}

// ----------------------------------------------------------------------------------------
// 2. A network that goes silent

/// A relay between client and server stops forwarding without closing anything. Both sides
/// find the peer dead within the heartbeat timeout (plus slack for a busy machine); the
/// request in flight fails with 502 then, not at its own 10 s deadline; later requests fail
/// with 503 after the connect wait, in both directions; once the relay forwards again, the
/// client reconnects and is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_network_is_detected_and_requests_fail_fast_until_it_heals() {
    let certs = Certs::new();
    let http = http_client();
    let timings = [
        "--heartbeat-interval",
        "0.25",
        "--heartbeat-timeout",
        "1.5",
        "--handshake-timeout",
        "1",
        "--connect-wait",
        "1",
    ];
    let heartbeat_timeout = Duration::from_millis(1500);
    let connect_wait = Duration::from_secs(1);
    let (server, pipe_port) = start_server(&certs, &timings).await;
    let relay = Relay::start(loopback(pipe_port)).await;
    let client_flags = with(&timings, &["--reconnect-max", "0.5"]);
    let edge = client(&certs, "edge-1", relay.addr(), &refs(&client_flags)).await;
    let clients = [edge];
    assert!(wait_all_connected(&http, &server, &clients, Duration::from_secs(20)).await);
    let edge = &clients[0];
    assert_eq!(
        timed_get(&http, &edge.url("/server/time"), 5000).await.0,
        200
    );

    relay.pause();
    let paused = Instant::now();
    let in_flight = tokio::spawn({
        let (http, url) = (http.clone(), edge.url("/server/time"));
        async move { timed_get(&http, &url, 10_000).await }
    });

    // Both sides declare the peer dead.
    let client_down = {
        let mut down = None;
        while paused.elapsed() < Duration::from_secs(15) {
            if get(&http, &edge.url("/health")).await.0 == 503 {
                down = Some(paused.elapsed());
                break;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        down.expect("the client never found the server dead")
    };
    let server_down = {
        let mut down = None;
        while paused.elapsed() < Duration::from_secs(15) {
            if listed_clients(&http, &server).await.is_empty() {
                down = Some(paused.elapsed());
                break;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        down.expect("the server never found the client dead")
    };
    let slack = Duration::from_secs(3);
    assert!(
        client_down <= heartbeat_timeout + slack && server_down <= heartbeat_timeout + slack,
        "dead peer found after {client_down:?} (client) and {server_down:?} (server)"
    );
    let (status, body, took) = in_flight.await.unwrap();
    assert_eq!(status, 502, "{body}");
    assert!(took < Duration::from_secs(8), "the 502 took {took:?}");

    // While the network stays silent: 503 after the connect wait, both ways.
    let mut during = Vec::new();
    for _ in 0..3 {
        let (status, body, took) = timed_get(&http, &edge.url("/server/time"), 10_000).await;
        assert_eq!(status, 503, "{body}");
        during.push(took);
        let (status, body, took) =
            timed_get(&http, &server.url("/client/edge-1/time"), 10_000).await;
        assert_eq!(status, 503, "{body}");
        during.push(took);
    }
    for took in &during {
        assert!(
            *took >= connect_wait - Duration::from_millis(50) && *took < connect_wait + slack,
            "a 503 took {took:?}"
        );
    }

    relay.resume();
    let healed = Instant::now();
    assert!(
        wait_all_connected(&http, &server, &clients, Duration::from_secs(20)).await,
        "the client never came back after the network healed"
    );
    let back = healed.elapsed();
    assert_eq!(
        timed_get(&http, &edge.url("/server/time"), 5000).await.0,
        200
    );
    assert_eq!(
        timed_get(&http, &server.url("/client/edge-1/time"), 5000)
            .await
            .0,
        200
    );
    let silent_logged = edge.log_count(&["peer silent past the heartbeat timeout"])
        + server.log_count(&["peer silent past the heartbeat timeout"]);
    assert!(silent_logged >= 1, "no side logged the silent peer");
    println!(
        "silent network: dead peer found after {client_down:?} (client) and {server_down:?} \
         (server), heartbeat timeout {heartbeat_timeout:?}; in-flight request 502 after \
         {took:?}; 503s during the silence took {during:?}; back {back:?} after the network healed"
    );
}

// ----------------------------------------------------------------------------------------
// 3. A client that flaps

/// One way a flapping client leaves. The style that waits for its answer connects as an
/// identity of its own (`answered`): with the flapper's, a connection of the flapper that left
/// just before could still be registered after it and replace it (the newest wins), and its
/// request would then rightly get no answer.
async fn flap_once(
    certs_connector: &tokio_rustls::TlsConnector,
    answered: &tokio_rustls::TlsConnector,
    addr: std::net::SocketAddr,
    style: usize,
) {
    match style {
        // TCP only, gone before any TLS.
        0 => {
            let _ = tokio::net::TcpStream::connect(addr).await;
        }
        // TLS, then gone before the hello.
        1 => {
            let _ = TlsPeer::connect_tls(addr, certs_connector).await;
        }
        // Hello, then gone.
        2 => {
            if let Ok(mut peer) = TlsPeer::connect_tls(addr, certs_connector).await {
                peer.hello("flapper", restpipe::wire::PROTOCOL_VERSION)
                    .await;
            }
        }
        // Hello, a request answered, then gone.
        3 => {
            if let Ok(mut peer) = TlsPeer::connect_tls(addr, answered).await {
                peer.hello("flapper-answered", restpipe::wire::PROTOCOL_VERSION)
                    .await;
                peer.send(&event_frame(1, Request::new("GET", "time")))
                    .await
                    .unwrap();
                let reply = peer.recv().await.unwrap();
                assert!(
                    matches!(reply.and_then(|f| f.kind), Some(Kind::Reply(_))),
                    "the flapper's request was not answered"
                );
            }
        }
        // Hello, a request sent, gone before its reply.
        _ => {
            if let Ok(mut peer) = TlsPeer::connect_tls(addr, certs_connector).await {
                peer.hello("flapper", restpipe::wire::PROTOCOL_VERSION)
                    .await;
                let _ = peer
                    .send(&event_frame(1, Request::new("GET", "time")))
                    .await;
            }
        }
    }
}

/// A client connects and drops, over and over, every 100 to 300 ms for 10 s (each way of
/// leaving in turn: before TLS, before the hello, after it, after a request, in the middle of
/// one; and every tenth time a real client process stopped with SIGKILL or SIGTERM). The
/// server's file descriptors come back to where they were, its memory stays flat, and a
/// steady client is served throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flapping_client_leaks_no_descriptor_and_no_memory() {
    const FLAP: Duration = Duration::from_secs(10);
    let certs = Certs::new();
    let http = http_client();
    let (server, pipe_port) = start_server(&certs, &quick_timings("1")).await;
    let pipe = loopback(pipe_port);
    let steady = client(&certs, "steady", pipe, &quick_timings("1")).await;
    let connector = certs.connector("flapper");
    let answered = certs.connector("flapper-answered");
    let proc_cert = certs.client("flapper-proc");
    let proc_args = client_args(&certs, &proc_cert, pipe, &quick_timings("1"));

    let load = Load::start(LoadSpec::both_ways(
        &steady,
        &server,
        "steady",
        Duration::from_secs(20),
        Duration::from_millis(20),
    ));

    let mut cycles = 0usize;
    let flap = |cycles: &mut usize| {
        let style = *cycles % 5;
        *cycles += 1;
        flap_once(&connector, &answered, pipe, style)
    };
    // Warm-up: every way of leaving a few times, then let the server notice the last one.
    for _ in 0..20 {
        flap(&mut cycles).await;
    }
    let settled = |http: reqwest::Client, server_url: String| async move {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            let list = get_json(&http, &server_url).await;
            if list.as_array().is_some_and(|a| a.len() == 1) {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        false
    };
    assert!(settled(http.clone(), server.url("/clients")).await);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let fds_before = server.fds();
    let rss_before = server.rss_kib();

    let started = Instant::now();
    let mut fds_peak = fds_before;
    let mut processes = 0;
    while started.elapsed() < FLAP {
        if cycles % 10 == 0 {
            let mut node = Node::start(certs.dir(), "flapper-proc", proc_args.clone()).await;
            let up = wait_until_async(Duration::from_secs(10), || {
                let (http, url) = (http.clone(), node.url("/health"));
                async move { get(&http, &url).await.0 == 200 }
            })
            .await;
            assert!(up, "the flapping client process never connected");
            if processes % 2 == 0 {
                node.kill();
            } else {
                assert!(
                    node.terminate().await,
                    "the client process did not exit cleanly"
                );
            }
            processes += 1;
            cycles += 1;
        } else {
            flap(&mut cycles).await;
        }
        fds_peak = fds_peak.max(server.fds());
        let pause = 100 + (cycles as u64 * 37) % 200;
        tokio::time::sleep(Duration::from_millis(pause)).await;
    }
    let flapping = started.elapsed();

    assert!(
        settled(http.clone(), server.url("/clients")).await,
        "the server still lists a flapper"
    );
    let back = wait_until(Duration::from_secs(15), || server.fds() <= fds_before + 2).await;
    let fds_after = server.fds();
    let rss_after = server.rss_kib();
    let (tally, _) = load.finish().await;
    println!(
        "flapping client: {cycles} cycles in {flapping:?} ({processes} of them a client process); \
         server fds {fds_before} before, {fds_peak} at most, {fds_after} after; \
         server RSS {rss_before} KiB before, {rss_after} KiB after; steady client: {tally}"
    );
    assert!(back, "server fds: {fds_before} before, {fds_after} after");
    assert!(
        rss_after < rss_before + 24 * 1024,
        "server RSS grew from {rss_before} KiB to {rss_after} KiB"
    );
    assert_eq!(tally.lost(), 0);
    assert_eq!(
        tally.status(200),
        tally.sent,
        "the steady client was not always served: {tally}"
    );
}

// ----------------------------------------------------------------------------------------
// 4. A slow handler and a flood

/// An upstream HTTP server for the `forward` plug-in that takes `delay` to answer and counts
/// its calls and the most it had at once.
struct SlowUpstream {
    addr: std::net::SocketAddr,
    now: Arc<AtomicUsize>,
    most: Arc<AtomicUsize>,
    calls: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl SlowUpstream {
    async fn start(delay: Duration) -> SlowUpstream {
        let now = Arc::new(AtomicUsize::new(0));
        let most = Arc::new(AtomicUsize::new(0));
        let calls = Arc::new(AtomicUsize::new(0));
        let handler = {
            let (now, most, calls) = (now.clone(), most.clone(), calls.clone());
            move || {
                let (now, most, calls) = (now.clone(), most.clone(), calls.clone());
                async move {
                    calls.fetch_add(1, Ordering::SeqCst);
                    let n = now.fetch_add(1, Ordering::SeqCst) + 1;
                    most.fetch_max(n, Ordering::SeqCst);
                    tokio::time::sleep(delay).await;
                    now.fetch_sub(1, Ordering::SeqCst);
                    "slow answer"
                }
            }
        };
        let app = axum::Router::new().route("/slow", axum::routing::get(handler));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        SlowUpstream {
            addr,
            now,
            most,
            calls,
            task,
        }
    }
}

impl Drop for SlowUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The server runs a slow handler (`forward` to an upstream that takes 3 s) with
/// `--max-in-flight 4`. Forty HTTP workers flood it through a client node for 5 s. The
/// upstream never has more than 4 calls at once; every other request is a 503 with
/// `Retry-After` that comes back before any slow one could; heartbeats keep flowing (the
/// server's statsd shows heartbeat successes during the flood and no failure), and the
/// connection is the same one at the end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_beyond_the_in_flight_bound_is_refused_at_once_and_heartbeats_go_on() {
    const MAX_IN_FLIGHT: usize = 4;
    let delay = Duration::from_secs(3);
    let upstream = SlowUpstream::start(delay).await;
    let statsd = Statsd::start().await;
    let certs = Certs::new();
    let http = http_client();
    let timings = [
        "--heartbeat-interval",
        "0.25",
        "--heartbeat-timeout",
        "2",
        "--connect-wait",
        "1",
    ];
    let route = format!("slow=http://{}/slow", upstream.addr);
    let mut server_flags: Vec<String> = with(
        &timings,
        &[
            "--handlers",
            "time,forward",
            "--forward",
            &route,
            "--max-in-flight",
            "4",
        ],
    );
    server_flags.extend(statsd.flags());
    let (server, _) = start_server(&certs, &refs(&server_flags)).await;
    let pipe = server.pipe_addr();
    let edge = client(&certs, "edge-1", pipe, &timings).await;
    let clients = [edge];
    assert!(wait_all_connected(&http, &server, &clients, Duration::from_secs(20)).await);
    let edge = &clients[0];
    let since = |status: &serde_json::Value| status["peers"][0]["connected_since"].clone();
    let client_since = since(&get_json(&http, &edge.url("/status")).await);
    let server_since = get_json(&http, &server.url("/clients")).await[0]["connected_since"].clone();

    // One refused request, looked at closely.
    let hold: Vec<_> = (0..MAX_IN_FLIGHT)
        .map(|_| {
            let (http, url) = (http.clone(), edge.url("/server/slow"));
            tokio::spawn(async move { timed_get(&http, &url, 10_000).await })
        })
        .collect();
    assert!(
        wait_until(Duration::from_secs(10), || upstream
            .now
            .load(Ordering::SeqCst)
            == MAX_IN_FLIGHT)
        .await
    );
    let response = http
        .get(edge.url("/server/slow"))
        .header("X-Event-Timeout-Ms", "10000")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 503);
    assert_eq!(response.headers()["retry-after"], "1");
    let body: serde_json::Value = response.json().await.unwrap();
    let message = body["error"].as_str().unwrap();
    assert!(
        message.contains("overloaded") && message.contains("in flight"),
        "{message}"
    );
    for h in hold {
        assert_eq!(h.await.unwrap().0, 200);
    }

    // The flood.
    let heartbeats_before = statsd.counter("client.connect.heartbeat.success.tick");
    let calls_before = upstream.calls.load(Ordering::SeqCst);
    let load = Load::start(LoadSpec {
        urls: vec![edge.url("/server/slow")],
        workers: 40,
        timeout_ms: 10_000,
        outer: Duration::from_secs(30),
        pause: Duration::from_millis(10),
    });
    tokio::time::sleep(Duration::from_secs(5)).await;
    let (tally, records) = load.finish().await;
    // The server's metrics are sent at least every second.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let heartbeats = statsd.counter("client.connect.heartbeat.success.tick") - heartbeats_before;
    let calls = upstream.calls.load(Ordering::SeqCst) - calls_before;

    let slowest_503 = records
        .iter()
        .filter(|r| r.outcome == Outcome::Status(503))
        .map(|r| r.latency)
        .max()
        .unwrap_or_default();
    let fastest_200 = records
        .iter()
        .filter(|r| r.outcome == Outcome::Status(200))
        .map(|r| r.latency)
        .min()
        .unwrap_or_default();
    let status = get_json(&http, &edge.url("/status")).await;
    let server_clients = get_json(&http, &server.url("/clients")).await;
    println!(
        "flood: {tally}; upstream calls {calls}, at most {} at once (bound {MAX_IN_FLIGHT}); \
         slowest 503 {slowest_503:?}, fastest 200 {fastest_200:?}; {heartbeats} heartbeats \
         answered during the flood; heartbeat RTT now {} ms (client), {} ms (server)",
        upstream.most.load(Ordering::SeqCst),
        status["peers"][0]["last_heartbeat_rtt_ms"],
        server_clients[0]["last_heartbeat_rtt_ms"],
    );
    assert!(upstream.most.load(Ordering::SeqCst) <= MAX_IN_FLIGHT);
    assert_eq!(tally.lost(), 0);
    assert_eq!(tally.unexpected(), 0, "{tally}");
    assert_eq!(tally.status(502) + tally.status(504), 0, "{tally}");
    assert_eq!(
        tally.status(200),
        calls as u64,
        "every call that got in succeeded"
    );
    assert!(tally.status(503) > 10 * tally.status(200), "{tally}");
    assert!(slowest_503 < delay, "a refusal waited {slowest_503:?}");
    assert!(
        heartbeats >= 4,
        "only {heartbeats} heartbeats during the flood"
    );
    assert_eq!(statsd.counter("client.connect.heartbeat.fail.tick"), 0);
    assert!(status["peers"][0]["last_heartbeat_rtt_ms"].is_number());
    assert!(server_clients[0]["last_heartbeat_rtt_ms"].is_number());
    assert_eq!(
        since(&status),
        client_since,
        "the client's connection was replaced"
    );
    assert_eq!(
        server_clients[0]["connected_since"], server_since,
        "the server's connection was replaced"
    );
}
