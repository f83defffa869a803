//! Publish/subscribe (docs/PUBSUB.md) through the front doors of in-process nodes over real
//! TLS on 127.0.0.1: the server fans out to three clients (their `event_{topic}` handlers and
//! an SSE listener on a client), a client's publish reaches the others and not itself unless
//! it subscribed, SSE resumes with `Last-Event-ID`, a client that was away gets what it
//! missed, a listener that reads nothing is cut with memory flat, bad input, the policy, a
//! peer without the `pubsub` feature, and two replicas of a cluster over a real nats-server.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use restpipe::app::{self, RunningNode};
use restpipe::handler::{Context, HandlerError, Handlers, Request};
use restpipe::http::{HttpOptions, Pipe};
use restpipe::policy::Policy;
use restpipe::pubsub::{Pubsub, PubsubSettings};
use restpipe::{ClientNode, Metrics, ServerNode};
use restpipe_testkit::certs::*;
use restpipe_testkit::nodes::*;
use restpipe_testkit::procs::MemoryMark;
use restpipe_testkit::raw::{self, proto, TlsPeer};
use restpipe_testkit::wait::wait_until;
use tokio::io::AsyncWriteExt;

/// What an `event_*` handler saw: (event id, topic, body).
type Seen = Arc<Mutex<Vec<(String, String, String)>>>;

fn loopback0() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

/// The test handlers plus `event_news` and `event_sensors_t1`, which record what they get.
fn recording(node: &str) -> (Handlers, Seen) {
    let seen: Seen = Arc::default();
    let mut handlers = test_handlers(node);
    for name in ["event_news", "event_sensors_t1"] {
        let seen = seen.clone();
        handlers.add(name, move |ctx: Context, req: Request| {
            let seen = seen.clone();
            async move {
                let body = String::from_utf8_lossy(&req.body).into_owned();
                seen.lock()
                    .unwrap()
                    .push((ctx.event_id.unwrap_or_default(), req.noun, body));
                Ok::<_, HandlerError>("ok")
            }
        });
    }
    (handlers, seen)
}

fn subscribing(globs: &[&str]) -> PubsubSettings {
    PubsubSettings {
        subscribe: globs.iter().map(|g| g.to_string()).collect(),
        ..PubsubSettings::default()
    }
}

/// The front door of `pipe`, with a hub of `settings`, sharing the node's `metrics`.
async fn door(pipe: Pipe, settings: PubsubSettings, metrics: Metrics) -> RunningNode {
    Pubsub::start(&pipe, settings).unwrap();
    let options = HttpOptions {
        max_body: 1 << 30,
        token: None,
        metrics,
        queue: None,
    };
    app::start_http(pipe, options, loopback0()).await.unwrap()
}

struct Server {
    node: ServerNode,
    door: RunningNode,
    seen: Seen,
}

async fn server(pki: &Pki, settings: PubsubSettings, policy: Option<Policy>) -> Server {
    let mut options = server_options(pki, loopback0(), test_pipe());
    let (handlers, seen) = recording("server");
    options.node.handlers = handlers;
    if let Some(policy) = policy {
        options.node.policy = policy;
    }
    let metrics = Metrics::disabled();
    options.node.metrics = metrics.clone();
    let node = ServerNode::start(options).await.unwrap();
    let door = door(Pipe::Server(node.clone()), settings, metrics).await;
    Server { node, door, seen }
}

struct Client {
    node: ClientNode,
    door: RunningNode,
    seen: Seen,
}

async fn client(pki: &Pki, identity: &str, server: &ServerNode, globs: &[&str]) -> Client {
    client_with(pki, identity, server, globs, Duration::from_millis(50)).await
}

async fn client_with(
    pki: &Pki,
    identity: &str,
    server: &ServerNode,
    globs: &[&str],
    reconnect: Duration,
) -> Client {
    let mut options = client_options(pki, identity, server.local_addr(), test_pipe());
    let (handlers, seen) = recording(identity);
    options.node.handlers = handlers;
    options.reconnect_initial = reconnect;
    options.reconnect_max = reconnect;
    let metrics = Metrics::disabled();
    options.node.metrics = metrics.clone();
    let node = ClientNode::start(options).unwrap();
    let door = door(Pipe::Client(node.clone()), subscribing(globs), metrics).await;
    node.wait_connected(Duration::from_secs(5)).await.unwrap();
    wait_for_client(server, identity).await;
    Client { node, door, seen }
}

fn url(door: &RunningNode, path: &str) -> String {
    format!("http://{}{path}", door.http_addr)
}

/// `POST /publish/{topic}` with `body`: status and JSON.
async fn publish(door: &RunningNode, topic: &str, body: &str) -> (u16, serde_json::Value) {
    let response = reqwest::Client::new()
        .post(url(door, &format!("/publish/{topic}")))
        .header("content-type", "text/plain")
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    let json = response.json().await.unwrap_or(serde_json::Value::Null);
    (status, json)
}

async fn publish_ok(door: &RunningNode, topic: &str, body: &str) -> String {
    let (status, json) = publish(door, topic, body).await;
    assert_eq!(status, 202, "{json}");
    json["id"].as_str().unwrap().to_string()
}

/// Wait (at most 10 s) until `seen` holds `n` events.
async fn wait_seen(seen: &Seen, n: usize) -> Vec<(String, String, String)> {
    wait_until(Duration::from_secs(10), || seen.lock().unwrap().len() >= n).await;
    seen.lock().unwrap().clone()
}

/// One Server-Sent Event: (id, event, data).
type Sse = (String, String, String);

/// An open `GET /events/...` stream.
struct Listener {
    response: reqwest::Response,
    buf: String,
}

impl Listener {
    async fn open(door: &RunningNode, glob: &str, last: Option<&str>) -> Listener {
        let mut request = reqwest::Client::new().get(url(door, &format!("/events/{glob}")));
        if let Some(last) = last {
            request = request.header("Last-Event-ID", last);
        }
        let response = request.send().await.unwrap();
        assert_eq!(response.status(), 200);
        assert_eq!(
            response.headers()["content-type"].to_str().unwrap(),
            "text/event-stream"
        );
        let mut listener = Listener {
            response,
            buf: String::new(),
        };
        // The stream says it is connected first: what is published from now on reaches it.
        while !listener.buf.contains(": connected\n\n") {
            listener.more().await;
        }
        listener.buf.clear();
        listener
    }

    async fn more(&mut self) {
        let chunk = tokio::time::timeout(Duration::from_secs(10), self.response.chunk())
            .await
            .expect("an event within 10 s")
            .unwrap()
            .expect("the stream goes on");
        self.buf.push_str(&String::from_utf8_lossy(&chunk));
    }

    /// The next `n` events.
    async fn events(&mut self, n: usize) -> Vec<Sse> {
        let mut out = Vec::new();
        while out.len() < n {
            while let Some(end) = self.buf.find("\n\n") {
                let block: String = self.buf.drain(..end + 2).collect();
                let (mut id, mut event, mut data) = (String::new(), String::new(), Vec::new());
                for line in block.lines() {
                    if let Some(v) = line.strip_prefix("id: ") {
                        id = v.into();
                    } else if let Some(v) = line.strip_prefix("event: ") {
                        event = v.into();
                    } else if let Some(v) = line.strip_prefix("data: ") {
                        data.push(v.to_string());
                    }
                }
                if !id.is_empty() {
                    out.push((id, event, data.join("\n")));
                }
            }
            if out.len() < n {
                self.more().await;
            }
        }
        out
    }
}

/// The bodies of what a handler saw, for topic `topic`.
fn bodies(seen: &[(String, String, String)], topic: &str) -> Vec<String> {
    seen.iter()
        .filter(|(_, t, _)| t == topic)
        .map(|(_, _, b)| b.clone())
        .collect()
}

/// The server publishes 20 events: each of 3 subscribed clients gets every one once, in
/// order, in its `event_news` handler with the event's id in its context; an SSE listener on
/// a client gets them too; a topic nobody subscribed to reaches no one.
#[tokio::test]
async fn the_server_fans_out_to_three_clients() {
    let pki = Pki::new();
    let server = server(&pki, PubsubSettings::default(), None).await;
    let mut clients = Vec::new();
    for name in ["c1", "c2", "c3"] {
        clients.push(client(&pki, name, &server.node, &["news"]).await);
    }
    let mut sse = Listener::open(&clients[0].door, "news", None).await;
    // The subscriptions are in place once a first event reaches all three.
    let first = publish_ok(&server.door, "news", "warm-up").await;
    for c in &clients {
        assert_eq!(wait_seen(&c.seen, 1).await[0].0, first);
    }
    let mut ids = vec![first];
    let mut expected = vec!["warm-up".to_string()];
    for i in 0..20 {
        let body = format!("event {i}\nline two");
        ids.push(publish_ok(&server.door, "news", &body).await);
        expected.push(body);
    }
    publish_ok(&server.door, "elsewhere", "nobody").await;
    for c in &clients {
        let seen = wait_seen(&c.seen, 21).await;
        assert_eq!(bodies(&seen, "news"), expected, "{}", c.node.identity());
        let seen_ids: Vec<String> = seen.iter().map(|s| s.0.clone()).collect();
        assert_eq!(seen_ids, ids);
    }
    let events = sse.events(21).await;
    assert_eq!(
        events.iter().map(|e| e.2.clone()).collect::<Vec<_>>(),
        expected
    );
    assert!(events.iter().all(|e| e.1 == "news"));
    // Ids are ordered as published.
    let mut sorted = ids.clone();
    sorted.sort();
    assert_eq!(sorted, ids);
    tokio::time::sleep(Duration::from_millis(200)).await;
    for c in &clients {
        assert_eq!(c.seen.lock().unwrap().len(), 21, "no stray event");
    }
    let status: serde_json::Value = reqwest::get(url(&server.door, "/status"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(status["pubsub"]["subscribed_connections"], 3, "{status}");
    assert_eq!(status["pubsub"]["events"], 22, "{status}");
    let status: serde_json::Value = reqwest::get(url(&clients[0].door, "/status"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        status["pubsub"]["events"], 21,
        "only what it subscribed to: {status}"
    );
    assert_eq!(status["pubsub"]["listeners"], 1, "{status}");
}

/// A client's publish goes to the server and fans out from there: the other subscribed
/// clients get it, the publisher does not (it did not subscribe), the server's own
/// `--subscribe` handler does. A publisher that subscribed gets its own event back.
#[tokio::test]
async fn a_client_publishes_to_the_others() {
    let pki = Pki::new();
    let server = server(&pki, subscribing(&["sensors/*"]), None).await;
    let a = client(&pki, "a", &server.node, &["sensors/**"]).await;
    let b = client(&pki, "b", &server.node, &["sensors/t1"]).await;
    let publisher = client(&pki, "pub", &server.node, &[]).await;
    // Until the subscriptions are in place, a warm-up from the server.
    let warm = publish_ok(&server.door, "sensors/t1", "warm").await;
    wait_seen(&a.seen, 1).await;
    wait_seen(&b.seen, 1).await;
    let id = publish_ok(&publisher.door, "sensors/t1", "21.5").await;
    assert_ne!(id, warm);
    for c in [&a, &b] {
        let seen = wait_seen(&c.seen, 2).await;
        assert_eq!(seen[1], (id.clone(), "sensors/t1".into(), "21.5".into()));
    }
    let on_server = wait_seen(&server.seen, 2).await;
    assert_eq!(on_server[1].0, id);
    // The subscribed publisher gets its own event back.
    let own = publish_ok(&a.door, "sensors/t1", "from a").await;
    let seen = wait_seen(&a.seen, 3).await;
    assert_eq!(seen[2].0, own);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(publisher.seen.lock().unwrap().is_empty());
}

/// A listener that goes away and comes back with `Last-Event-ID` gets exactly what it
/// missed; an id the log does not hold resumes from its time.
#[tokio::test]
async fn sse_resumes_with_last_event_id() {
    let pki = Pki::new();
    let server = server(&pki, PubsubSettings::default(), None).await;
    let mut listener = Listener::open(&server.door, "jobs/**", None).await;
    for i in 0..3 {
        publish_ok(&server.door, &format!("jobs/{i}"), &format!("first {i}")).await;
    }
    let got = listener.events(3).await;
    let last = got[2].0.clone();
    drop(listener);
    let mut missed = Vec::new();
    for i in 0..4 {
        missed.push(publish_ok(&server.door, "jobs/x", &format!("missed {i}")).await);
    }
    let mut again = Listener::open(&server.door, "jobs/**", Some(&last)).await;
    let got = again.events(4).await;
    assert_eq!(got.iter().map(|e| e.0.clone()).collect::<Vec<_>>(), missed);
    let after = publish_ok(&server.door, "jobs/x", "live").await;
    assert_eq!(again.events(1).await[0].0, after);
    // An id that is not in the log: from the first event published after its time.
    let mut from_time = Listener::open(&server.door, "jobs/**", Some("0000000000001-0-0")).await;
    assert_eq!(from_time.events(8).await.len(), 8);
}

/// Events published while a subscribed client is away reach it when it is back: it sends
/// the id of the last event it saw with its subscription.
#[tokio::test]
async fn a_client_away_gets_what_it_missed() {
    let pki = Pki::new();
    let server = server(&pki, PubsubSettings::default(), None).await;
    let c = client_with(
        &pki,
        "away",
        &server.node,
        &["news"],
        Duration::from_secs(2),
    )
    .await;
    publish_ok(&server.door, "news", "before").await;
    wait_seen(&c.seen, 1).await;
    server
        .node
        .registry()
        .find("away")
        .unwrap()
        .close("test: away for a while");
    assert!(wait_until(Duration::from_secs(5), || !c.node.is_connected()).await);
    // Its own publish while the server is away: 503 at once, not after the connect wait.
    let asked = Instant::now();
    let (status, json) = publish(&c.door, "news", "from a client that is away").await;
    assert_eq!(status, 503, "{json}");
    assert!(
        asked.elapsed() < Duration::from_secs(1),
        "{:?}",
        asked.elapsed()
    );
    let mut expected = vec!["before".to_string()];
    for i in 0..5 {
        let body = format!("while away {i}");
        publish_ok(&server.door, "news", &body).await;
        expected.push(body);
    }
    assert!(
        !c.node.is_connected(),
        "it was away while they were published"
    );
    let seen = wait_seen(&c.seen, 6).await;
    assert_eq!(bodies(&seen, "news"), expected);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(c.seen.lock().unwrap().len(), 6, "each once");
}

/// A listener on a raw socket that never reads is cut once it takes no byte for the stall
/// time while events wait; the cut is counted in `/metrics`, and the node's memory stays
/// flat while far more than its retention is published.
#[tokio::test]
async fn a_slow_listener_is_cut_and_memory_stays_flat() {
    let pki = Pki::new();
    let settings = PubsubSettings {
        retain_count: 200,
        stall: Duration::from_secs(1),
        ..PubsubSettings::default()
    };
    let server = server(&pki, settings, None).await;
    let mut sock = tokio::net::TcpStream::connect(server.door.http_addr)
        .await
        .unwrap();
    // A small receive buffer, so that the stream backs up soon.
    sock.write_all(b"GET /events/** HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let body = "x".repeat(16 * 1024);
    // Warm up the allocator and the log before the mark.
    for _ in 0..300 {
        publish_ok(&server.door, "bulk", &body).await;
    }
    let mark = MemoryMark::of(std::process::id());
    let started = Instant::now();
    for _ in 0..3000 {
        publish_ok(&server.door, "bulk", &body).await;
    }
    let growth = mark.growth_kib();
    println!(
        "published 3000 x 16 KiB in {:?}; peak RSS growth {growth} KiB (mark {} KiB, peak reset {})",
        started.elapsed(),
        mark.rss_kib,
        mark.peak_reset
    );
    assert!(
        growth < 40 * 1024,
        "memory grew by {growth} KiB for 47 MiB published"
    );
    let metrics = || async {
        reqwest::get(url(&server.door, "/metrics"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    };
    let mut cut = false;
    for _ in 0..50 {
        if metrics()
            .await
            .contains("restpipe_pubsub_listener_cut_total 1")
        {
            cut = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        cut,
        "the listener was not counted as cut:\n{}",
        metrics().await
    );
    drop(sock);
}

/// Bad input: a malformed topic is 400, a body over `--max-publish-bytes` 413, a bad glob
/// 400, too many subscriptions refused at start, and routes that are not there 404/405.
#[tokio::test]
async fn bad_input_is_refused() {
    let pki = Pki::new();
    let settings = PubsubSettings {
        max_publish_bytes: 1024,
        ..PubsubSettings::default()
    };
    let server = server(&pki, settings, None).await;
    let c = client(&pki, "c", &server.node, &[]).await;
    for door in [&server.door, &c.door] {
        for topic in ["bad%20topic", "a//b", ""] {
            let (status, json) = publish(door, topic, "x").await;
            assert!(status == 400 || status == 404, "{topic}: {status} {json}");
        }
        let (status, json) = publish(door, "big", &"x".repeat(2048)).await;
        assert_eq!(status, 413, "{json}");
        assert!(json["error"]
            .as_str()
            .unwrap()
            .contains("--max-publish-bytes"));
        let response = reqwest::get(url(door, "/events/a%5B")).await.unwrap();
        assert_eq!(response.status(), 400);
        assert_eq!(
            reqwest::get(url(door, "/publish/news"))
                .await
                .unwrap()
                .status(),
            405
        );
        assert_eq!(
            reqwest::get(url(door, "/pubsub")).await.unwrap().status(),
            404
        );
    }
    // A client's publish refused by the server for its size keeps the server's answer.
    let too_many: Vec<String> = (0..65).map(|i| format!("t{i}")).collect();
    let settings = PubsubSettings {
        subscribe: too_many,
        ..PubsubSettings::default()
    };
    let error = settings.validate().unwrap_err();
    assert!(error.contains("more than the 64"), "{error}");
}

fn write_policy(dir: &Path, text: &str) -> std::path::PathBuf {
    let path = dir.join("policy.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// The policy says who may publish and subscribe to what: `good` may both on `news`; `bad`
/// may call handlers only. `bad`'s publish is 403 at its front door and reaches nobody; its
/// subscription is refused and it gets nothing; `good` works. Refusals are counted.
#[tokio::test]
async fn the_policy_says_who_may_publish_and_subscribe() {
    let pki = Pki::new();
    let dir = tempfile::tempdir().unwrap();
    let path = write_policy(
        dir.path(),
        "[[allow]]\npeers = [\"good\"]\nhandlers = [\"get_whoami\"]\npublish = [\"news\"]\nsubscribe = [\"news\"]\n\n[[allow]]\npeers = [\"bad\"]\nhandlers = [\"get_whoami\"]\n",
    );
    let (handlers, _) = recording("server");
    let policy = Policy::load(&path, &handlers.names()).unwrap();
    let server = server(&pki, PubsubSettings::default(), Some(policy)).await;
    let good = client(&pki, "good", &server.node, &["news"]).await;
    let bad = client(&pki, "bad", &server.node, &["news"]).await;
    let (status, json) = publish(&bad.door, "news", "forged").await;
    assert_eq!(status, 403, "{json}");
    assert!(json["error"].as_str().unwrap().contains("bad"), "{json}");
    // Not allowed to another topic either, even for good.
    let (status, _) = publish(&good.door, "other", "x").await;
    assert_eq!(status, 403);
    let id = publish_ok(&good.door, "news", "real").await;
    let seen = wait_seen(&good.seen, 1).await;
    assert_eq!(seen[0].0, id);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(bad.seen.lock().unwrap().is_empty(), "bad got an event");
    let metrics = reqwest::get(url(&server.door, "/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let refused: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("restpipe_pubsub_refused_total "))
        .unwrap()
        .parse()
        .unwrap();
    assert!(refused >= 3, "{refused}");
}

/// The front door's tokens cover `/publish` and `/events` by their paths and verbs: a token
/// for `POST /publish` may publish and may not listen.
#[tokio::test]
async fn tokens_cover_publish_and_events() {
    let pki = Pki::new();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("pub.token"), "0123456789abcdef-publisher").unwrap();
    let path = write_policy(
        dir.path(),
        "[[allow]]\npeers = [\"*\"]\nhandlers = [\"get_whoami\"]\n\n[[token]]\nname = \"publisher\"\nsecret_file = \"pub.token\"\nverbs = [\"POST\"]\npaths = [\"/publish\"]\n",
    );
    let (handlers, _) = recording("server");
    let policy = Policy::load(&path, &handlers.names()).unwrap();
    let server = server(&pki, PubsubSettings::default(), Some(policy)).await;
    let http = reqwest::Client::new();
    let bearer = "Bearer 0123456789abcdef-publisher";
    let ok = http
        .post(url(&server.door, "/publish/news"))
        .header("authorization", bearer)
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 202);
    let none = http
        .post(url(&server.door, "/publish/news"))
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(none.status(), 401);
    let listen = http
        .get(url(&server.door, "/events/news"))
        .header("authorization", bearer)
        .send()
        .await
        .unwrap();
    assert_eq!(listen.status(), 403);
}

/// A peer without the `pubsub` feature (an older release) gets no pub/sub frame and its
/// calls still work; a peer that lists it and subscribes gets the events.
#[tokio::test]
async fn a_peer_without_the_feature_gets_no_pubsub_frames() {
    let pki = Pki::new();
    let server = server(&pki, PubsubSettings::default(), None).await;
    let connector = pki.connector("old");
    let mut old = TlsPeer::connect_tls(server.node.local_addr(), &connector)
        .await
        .unwrap();
    let hello = old.hello("old", 2).await;
    assert!(hello.features.iter().any(|f| f == "pubsub"));
    wait_for_client(&server.node, "old").await;
    // A subscription from a peer that did not list the feature is a protocol violation; it
    // is not sent here. The server publishes; the old peer sees none of it.
    publish_ok(&server.door, "news", "not for old peers").await;
    let frames = tokio::time::timeout(Duration::from_millis(800), old.recv()).await;
    assert!(
        !matches!(
            frames,
            Ok(Ok(Some(proto::Frame {
                kind: Some(proto::frame::Kind::Publish(_)),
                ..
            })))
        ),
        "an old peer got a publish frame: {frames:?}"
    );
    // Its calls still work: the next frame it gets is the server's event, which it answers.
    let call = tokio::spawn({
        let node = server.node.clone();
        async move { node.call("old", Request::new("GET", "whoami"), None).await }
    });
    let event_id = match old.recv().await.unwrap() {
        Some(proto::Frame {
            id,
            kind: Some(proto::frame::Kind::Event(e)),
        }) => {
            assert_eq!(e.noun, "whoami");
            id
        }
        other => panic!("expected the server's event, got {other:?}"),
    };
    old.send(&proto::Frame {
        id: event_id,
        kind: Some(proto::frame::Kind::Reply(proto::Reply {
            content_type: "text/plain".into(),
            body: bytes::Bytes::from_static(b"old peer"),
            ..Default::default()
        })),
    })
    .await
    .unwrap();
    let reply = call.await.unwrap().unwrap();
    assert_eq!(&reply.body[..], b"old peer");

    // A new peer with the feature subscribes and gets the events.
    let connector = pki.connector("new");
    let mut new = TlsPeer::connect_tls(server.node.local_addr(), &connector)
        .await
        .unwrap();
    let mut hello = raw::client_hello("new", 2);
    if let Some(proto::frame::Kind::Hello(h)) = &mut hello.kind {
        h.features = vec!["pubsub".into()];
    }
    new.send(&hello).await.unwrap();
    let _server_hello = new.recv().await.unwrap();
    new.send(&proto::Frame {
        id: 0,
        kind: Some(proto::frame::Kind::Subscribe(proto::Subscribe {
            globs: vec!["news".into()],
            resume_after: String::new(),
        })),
    })
    .await
    .unwrap();
    wait_for_client(&server.node, "new").await;
    let mut got = None;
    for _ in 0..20 {
        let id = publish_ok(&server.door, "news", "for new peers").await;
        if let Ok(Ok(Some(proto::Frame {
            kind: Some(proto::frame::Kind::Publish(p)),
            ..
        }))) = tokio::time::timeout(Duration::from_millis(300), new.recv()).await
        {
            got = Some((id, p));
            break;
        }
    }
    let (_, event) = got.expect("the new peer got a publish frame");
    assert_eq!(event.topic, "news");
    assert_eq!(&event.body[..], b"for new peers");
    // Too many globs in a subscription: refused with an error frame.
    new.send(&proto::Frame {
        id: 0,
        kind: Some(proto::frame::Kind::Subscribe(proto::Subscribe {
            globs: (0..65).map(|i| format!("t{i}")).collect(),
            resume_after: String::new(),
        })),
    })
    .await
    .unwrap();
    let mut refused = false;
    for _ in 0..10 {
        match new.recv().await {
            Ok(Some(proto::Frame {
                kind: Some(proto::frame::Kind::Error(e)),
                ..
            })) => {
                assert!(e.message.contains("more than 64"), "{}", e.message);
                refused = true;
                break;
            }
            Ok(Some(_)) => continue,
            other => panic!("{other:?}"),
        }
    }
    assert!(refused);
}

/// Two replicas of a cluster over a real nats-server: an event published on replica A
/// reaches a client connected to replica B (and one on A), once each.
#[tokio::test]
async fn a_publish_on_one_replica_reaches_clients_of_another() {
    let dir = tempfile::tempdir().unwrap();
    let Some(nats) = restpipe_testkit::nats::NatsServer::start(dir.path()).await else {
        return;
    };
    let pki = Pki::new();
    let mut replicas = Vec::new();
    for name in ["ra", "rb"] {
        let s = server(&pki, PubsubSettings::default(), None).await;
        let cluster = s
            .node
            .join_cluster(restpipe::cluster::ClusterOptions {
                urls: vec![nats.url()],
                name: "pubsub".into(),
                replica: name.into(),
                creds: None,
                tls_ca: None,
            })
            .await
            .unwrap();
        cluster.carry_pubsub(&restpipe_pubsub_hub(&s));
        replicas.push(s);
    }
    assert!(
        wait_until(Duration::from_secs(10), || replicas
            .iter()
            .all(|r| r.node.cluster().is_some_and(|c| c.is_connected())))
        .await
    );
    let on_a = client(&pki, "on-a", &replicas[0].node, &["news"]).await;
    let on_b = client(&pki, "on-b", &replicas[1].node, &["news"]).await;
    // NATS subscriptions take a moment: publish until the first one crosses.
    let mut first = None;
    for i in 0..50 {
        let id = publish_ok(&replicas[0].door, "news", &format!("try {i}")).await;
        if wait_until(Duration::from_millis(200), || {
            !on_b.seen.lock().unwrap().is_empty()
        })
        .await
        {
            first = Some(id);
            break;
        }
    }
    assert!(first.is_some(), "no event crossed to replica B");
    let id = publish_ok(&replicas[0].door, "news", "across").await;
    let seen = wait_until(Duration::from_secs(10), || {
        on_b.seen.lock().unwrap().iter().any(|s| s.0 == id)
    })
    .await;
    assert!(seen);
    let once = on_b
        .seen
        .lock()
        .unwrap()
        .iter()
        .filter(|s| s.0 == id)
        .count();
    assert_eq!(once, 1);
    assert!(
        wait_until(Duration::from_secs(5), || on_a
            .seen
            .lock()
            .unwrap()
            .iter()
            .any(|s| s.0 == id))
        .await
    );
    // And the other way: published on B (by its client), it reaches A's client.
    let back = publish_ok(&on_b.door, "news", "from b").await;
    assert!(
        wait_until(Duration::from_secs(10), || on_a
            .seen
            .lock()
            .unwrap()
            .iter()
            .any(|s| s.0 == back))
        .await
    );
}

fn restpipe_pubsub_hub(s: &Server) -> Pubsub {
    s.node.pubsub().expect("the replica has a hub")
}

/// A real server process keeps its topic log in `--data-dir`: after a restart, a listener
/// that resumes with `Last-Event-ID` gets the events published before it. `--subscribe`
/// globs past 64 stop the node at start with the reason.
#[tokio::test]
async fn the_server_log_survives_a_restart() {
    use restpipe_testkit::procs;
    let certs = Certs::new();
    let data = certs.dir().join("data");
    let data_arg = data.to_string_lossy().into_owned();
    let (mut node, _) = procs::start_server(&certs, &["--data-dir", &data_arg]).await;
    let http = reqwest::Client::new();
    let mut ids = Vec::new();
    for i in 0..3 {
        let response = http
            .post(node.url("/publish/jobs/done"))
            .body(format!("job {i}"))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 202);
        let json: serde_json::Value = response.json().await.unwrap();
        ids.push(json["id"].as_str().unwrap().to_string());
    }
    assert!(data.join("pubsub.redb").exists());
    assert!(node.terminate().await, "the server stopped on SIGTERM");
    node.restart().await;
    let mut response = http
        .get(node.url("/events/jobs/**"))
        .header("Last-Event-ID", &ids[0])
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let mut text = String::new();
    while text.matches("\n\n").count() < 3 {
        let chunk = tokio::time::timeout(Duration::from_secs(10), response.chunk())
            .await
            .expect("events within 10 s")
            .unwrap()
            .unwrap();
        text.push_str(&String::from_utf8_lossy(&chunk));
    }
    assert!(text.contains(&format!("id: {}\n", ids[1])), "{text}");
    assert!(text.contains(&format!("id: {}\n", ids[2])), "{text}");
    assert!(!text.contains(&format!("id: {}\n", ids[0])), "{text}");
    assert!(text.contains("data: job 2\n"), "{text}");
    drop(response);
    node.terminate().await;

    // Too many --subscribe globs: the node refuses to start, saying why.
    let globs: Vec<String> = (0..65).map(|i| format!("t{i}")).collect();
    let joined = globs.join(",");
    let args = procs::server_args(&certs, &["--subscribe", &joined, "--data-dir", &data_arg]);
    let out = std::process::Command::new(procs::restpipe_bin())
        .args(&args)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("more than the 64"), "{stderr}");
}

/// A live event stream outlasts the front door's idle and header timeouts (1 s here): it is
/// a response being written, not an idle connection.
#[tokio::test]
async fn a_live_stream_outlasts_the_idle_timeout() {
    use restpipe::http::{HttpLimits, HttpListen, ServeOptions};
    let pki = Pki::new();
    let node = start_server(&pki, test_pipe()).await;
    let pipe = Pipe::Server(node.clone());
    Pubsub::start(&pipe, PubsubSettings::default()).unwrap();
    let serve = ServeOptions {
        limits: HttpLimits {
            header_timeout: Duration::from_secs(1),
            idle_timeout: Duration::from_secs(1),
            ..HttpLimits::default()
        },
        ..ServeOptions::default()
    };
    let options = HttpOptions {
        max_body: 1 << 20,
        token: None,
        metrics: Metrics::disabled(),
        queue: None,
    };
    let door = app::start_http_on(pipe, options, &serve, &HttpListen::Tcp(loopback0()))
        .await
        .unwrap();
    let mut listener = Listener::open(&door, "news", None).await;
    // Three times the timeouts with nothing to send.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let id = publish_ok(&door, "news", "still here").await;
    assert_eq!(listener.events(1).await[0].0, id);
}

/// A measurement, not a check (`cargo test --release --test pubsub fan_out -- --ignored
/// --nocapture`; `RP_FANOUT_CLIENTS`, default 1000, `RP_FANOUT_EVENTS`, default 200): the
/// server publishes events of 256 bytes to that many subscribed in-process clients, each
/// delivering to its `event_bench` handler; `RP_FANOUT_RATE` paces the publisher (events/s),
/// else it publishes them all at once. Prints deliveries per second and the delivery latency
/// (publication to handler, ms) at p50 and p99.
#[tokio::test(flavor = "multi_thread")]
#[ignore]
async fn fan_out_to_many_clients() {
    use std::sync::atomic::{AtomicU64, Ordering};
    let n: usize = std::env::var("RP_FANOUT_CLIENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    let events: usize = std::env::var("RP_FANOUT_EVENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    let pki = Pki::new();
    let server = start_server(&pki, test_pipe()).await;
    let hub = Pubsub::start(&Pipe::Server(server.clone()), PubsubSettings::default()).unwrap();
    let latencies: Arc<Mutex<Vec<u64>>> = Arc::default();
    let delivered = Arc::new(AtomicU64::new(0));
    let mut clients = Vec::new();
    let started = Instant::now();
    for i in 0..n {
        let identity = format!("fan-{i}");
        let mut options = client_options(&pki, &identity, server.local_addr(), test_pipe());
        let (latencies, delivered) = (latencies.clone(), delivered.clone());
        options
            .node
            .handlers
            .add("event_bench", move |ctx: Context, _req: Request| {
                let (latencies, delivered) = (latencies.clone(), delivered.clone());
                async move {
                    let id = ctx.event_id.unwrap_or_default();
                    let sent: u64 = id.split('-').next().unwrap_or("0").parse().unwrap_or(0);
                    let now = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .unwrap()
                        .as_millis() as u64;
                    latencies.lock().unwrap().push(now.saturating_sub(sent));
                    delivered.fetch_add(1, Ordering::Relaxed);
                    Ok::<_, HandlerError>("ok")
                }
            });
        let node = ClientNode::start(options).unwrap();
        Pubsub::start(&Pipe::Client(node.clone()), subscribing(&["bench"])).unwrap();
        clients.push(node);
    }
    for c in &clients {
        c.wait_connected(Duration::from_secs(60)).await.unwrap();
    }
    println!("{n} clients connected in {:?}", started.elapsed());
    // Warm-up: until every client has its subscription in place.
    let warm = Instant::now();
    loop {
        hub.publish("bench".into(), String::new(), "warm".into())
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        let subscribed = hub.status()["subscribed_connections"].as_u64().unwrap_or(0);
        if subscribed as usize == n {
            break;
        }
        assert!(
            warm.elapsed() < Duration::from_secs(60),
            "only {subscribed} subscribed"
        );
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    latencies.lock().unwrap().clear();
    let before = delivered.load(Ordering::Relaxed);
    let body = bytes::Bytes::from(vec![b'e'; 256]);
    // RP_FANOUT_RATE (events/s) paces the publisher; without it, all at once (a burst, whose
    // latency is mostly the time to drain it).
    let rate: Option<f64> = std::env::var("RP_FANOUT_RATE")
        .ok()
        .and_then(|v| v.parse().ok());
    let mut pace = rate.map(|r| tokio::time::interval(Duration::from_secs_f64(1.0 / r)));
    let t0 = Instant::now();
    for _ in 0..events {
        if let Some(pace) = pace.as_mut() {
            pace.tick().await;
        }
        hub.publish("bench".into(), String::new(), body.clone())
            .await
            .unwrap();
    }
    let publish_time = t0.elapsed();
    let want = before + (n * events) as u64;
    let done = wait_until(Duration::from_secs(300), || {
        delivered.load(Ordering::Relaxed) >= want
    })
    .await;
    let elapsed = t0.elapsed();
    let got = delivered.load(Ordering::Relaxed) - before;
    let mut l = latencies.lock().unwrap().clone();
    l.sort_unstable();
    let pct = |p: f64| {
        l.get(((l.len() as f64 * p) as usize).min(l.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0)
    };
    println!(
        "fan-out: {n} clients x {events} events of 256 B (rate {rate:?}/s): {got} deliveries in {:.2} s ({:.0} deliveries/s, {:.1} events/s published and delivered to all; publishing took {:.2} s); latency p50 {} ms, p99 {} ms, max {} ms; complete: {done}",
        elapsed.as_secs_f64(),
        got as f64 / elapsed.as_secs_f64(),
        events as f64 / elapsed.as_secs_f64(),
        publish_time.as_secs_f64(),
        pct(0.50),
        pct(0.99),
        l.last().copied().unwrap_or(0),
    );
    assert!(done, "only {got} of {} delivered", n * events);
}

/// A server of an earlier release (its hello lists no `pubsub`): a subscribed client sends it
/// no subscription, and its own publishes are 503 saying why; its calls are unaffected.
#[tokio::test]
async fn a_server_without_the_feature_gets_no_subscription() {
    use restpipe_testkit::raw::RawPeer;
    let pki = Pki::new();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = pki.server_tls().acceptor().unwrap();
    let mut options = client_options(&pki, "modern", addr, test_pipe());
    options.reconnect_initial = Duration::from_secs(5);
    let node = ClientNode::start(options).unwrap();
    let door = door(
        Pipe::Client(node.clone()),
        subscribing(&["news"]),
        Metrics::disabled(),
    )
    .await;
    let (tcp, _) = listener.accept().await.unwrap();
    let mut old = RawPeer::new(acceptor.accept(tcp).await.unwrap());
    old.send(&raw::hello_frame(proto::Role::Server, SERVER_NAME, 2))
        .await
        .unwrap();
    match old.recv().await.unwrap() {
        Some(proto::Frame {
            kind: Some(proto::frame::Kind::Hello(h)),
            ..
        }) => assert!(h.features.iter().any(|f| f == "pubsub"), "{h:?}"),
        other => panic!("expected the client's hello, got {other:?}"),
    }
    node.wait_connected(Duration::from_secs(5)).await.unwrap();
    let (status, json) = publish(&door, "news", "x").await;
    assert_eq!(status, 503, "{json}");
    assert!(json["error"].as_str().unwrap().contains("pubsub"), "{json}");
    // Nothing but heartbeats comes from the client for a while: no subscribe, no publish.
    let next = tokio::time::timeout(Duration::from_millis(1500), old.recv()).await;
    assert!(next.is_err(), "the client sent {next:?}");
    assert!(node.is_connected());
}
