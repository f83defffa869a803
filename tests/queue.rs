//! Queued delivery (docs/QUEUE.md) through the front doors of in-process nodes: `202` and an
//! id while the peer is away, `GET /queued/{id}` through each state (pending, delivered with
//! the stored reply, expired, failed), the delivery id in the handler's context, the caps
//! (429, 507, 413) and bad input (400, 404). The survival of a SIGKILL, with real processes,
//! is `reliability_queue.rs`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use restpipe::app::{self, RunningNode};
use restpipe::handler::{Context, HandlerError, Request};
use restpipe::http::{HttpOptions, Pipe};
use restpipe::queue::{Queue, QueueSettings};
use restpipe::{ClientNode, Metrics, PipeConfig, ServerNode};
use restpipe_testkit::certs::*;
use restpipe_testkit::nodes::*;
use serde_json::Value;

fn loopback0() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

/// A front door for `pipe` with a queue in `dir`.
async fn door(pipe: Pipe, settings: QueueSettings) -> RunningNode {
    let queue = Queue::start(pipe.clone(), settings).await.unwrap();
    let options = HttpOptions {
        max_body: 1 << 30,
        token: None,
        metrics: Metrics::disabled(),
        queue: Some(queue),
    };
    app::start_http(pipe, options, loopback0()).await.unwrap()
}

fn queue_in(dir: &Path) -> QueueSettings {
    QueueSettings::new(dir)
}

/// A client `identity` with the test handlers and `get_delivery`, which answers the delivery
/// id its context holds.
async fn client(pki: &Pki, identity: &str, server: &ServerNode, pipe: PipeConfig) -> ClientNode {
    let mut options = client_options(pki, identity, server.local_addr(), pipe);
    options
        .node
        .handlers
        .add("get_delivery", |ctx: Context, _req: Request| async move {
            Ok::<_, HandlerError>(serde_json::json!({ "delivery_id": ctx.delivery_id }))
        });
    let client = ClientNode::start(options).unwrap();
    client.wait_connected(Duration::from_secs(5)).await.unwrap();
    wait_for_client(server, identity).await;
    client
}

/// `POST url` (`GET` when `url` ends in `#get`) with `X-Event-Delivery: queued`, `extra`
/// headers and `body`: status and JSON.
async fn queue(
    http: &reqwest::Client,
    url: &str,
    extra: &[(&str, &str)],
    body: &'static [u8],
) -> (u16, Value) {
    let request = match url.strip_suffix("#get") {
        Some(url) => http.get(url),
        None => http.post(url),
    };
    let mut request = request
        .header("X-Event-Delivery", "queued")
        .header("Content-Type", "text/plain")
        .body(body);
    for (name, value) in extra {
        request = request.header(*name, *value);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    let location = response
        .headers()
        .get("location")
        .map(|v| v.to_str().unwrap().to_string());
    let value: Value = response.json().await.unwrap_or(Value::Null);
    if status == 202 {
        let id = value["id"].as_str().unwrap();
        assert_eq!(location.as_deref(), Some(format!("/queued/{id}").as_str()));
    }
    (status, value)
}

async fn state_of(http: &reqwest::Client, node: &RunningNode, id: &str) -> Value {
    let url = format!("http://{}/queued/{id}", node.http_addr);
    let response = http.get(url).send().await.unwrap();
    assert_eq!(response.status(), 200);
    response.json().await.unwrap()
}

/// Wait (at most `limit`) until the event `id` is in `state`, and return its view.
async fn wait_state(
    http: &reqwest::Client,
    node: &RunningNode,
    id: &str,
    state: &str,
    limit: Duration,
) -> Value {
    let deadline = std::time::Instant::now() + limit;
    loop {
        let view = state_of(http, node, id).await;
        if view["state"] == state {
            return view;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{id} did not become {state} within {limit:?}: {view}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn queued_events_wait_for_their_peer_and_are_delivered_both_ways() {
    let pki = Pki::new();
    let dir = tempfile::tempdir().unwrap();
    let server = start_server(&pki, test_pipe()).await;
    let server_door = door(
        Pipe::Server(server.clone()),
        queue_in(&dir.path().join("server")),
    )
    .await;
    let http = reqwest::Client::new();
    let base = format!("http://{}", server_door.http_addr);

    // The client is away: queued all the same, in order.
    let (status, first) = queue(&http, &format!("{base}/client/q-1/echo"), &[], b"one").await;
    assert_eq!(status, 202, "{first}");
    let first = first["id"].as_str().unwrap().to_string();
    let (_, second) = queue(&http, &format!("{base}/client/q-1/delivery#get"), &[], b"").await;
    let second = second["id"].as_str().unwrap().to_string();
    let (_, third) = queue(&http, &format!("{base}/client/q-1/nope"), &[], b"").await;
    let third = third["id"].as_str().unwrap().to_string();
    let view = state_of(&http, &server_door, &first).await;
    assert_eq!(view["state"], "pending", "{view}");
    assert_eq!(
        (view["peer"].as_str(), view["attempts"].as_u64()),
        (Some("q-1"), Some(0))
    );
    let status: Value = http
        .get(format!("{base}/status"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(status["queue"]["pending"], 3, "{status}");

    // The client comes: each is delivered, with its reply stored.
    let c = client(&pki, "q-1", &server, test_pipe()).await;
    let view = wait_state(
        &http,
        &server_door,
        &first,
        "delivered",
        Duration::from_secs(10),
    )
    .await;
    assert_eq!(view["reply"]["status"], 200, "{view}");
    assert_eq!(view["reply"]["body"], "one");
    assert_eq!(view["reply"]["content_type"], "text/plain");
    assert_eq!(view["attempts"], 1);
    let view = wait_state(
        &http,
        &server_door,
        &second,
        "delivered",
        Duration::from_secs(10),
    )
    .await;
    let reply: Value = serde_json::from_str(view["reply"]["body"].as_str().unwrap()).unwrap();
    assert_eq!(
        reply["delivery_id"],
        second.as_str(),
        "the handler sees the id"
    );
    // A reply from the far side is final, whatever its status.
    let view = wait_state(
        &http,
        &server_door,
        &third,
        "delivered",
        Duration::from_secs(10),
    )
    .await;
    assert_eq!(view["reply"]["status"], 404, "{view}");
    assert_eq!(view["reply"]["code"], 255);

    // The other way: the client node queues to the server.
    let client_door = door(
        Pipe::Client(c.clone()),
        queue_in(&dir.path().join("client")),
    )
    .await;
    let url = format!("http://{}/server/echo", client_door.http_addr);
    let (status, up) = queue(&http, &url, &[], b"\xff\x00binary").await;
    assert_eq!(status, 202, "{up}");
    let up = up["id"].as_str().unwrap().to_string();
    let view = wait_state(
        &http,
        &client_door,
        &up,
        "delivered",
        Duration::from_secs(10),
    )
    .await;
    assert_eq!(view["peer"], "server");
    assert_eq!(view["reply"]["body_encoding"], "base64", "{view}");
    assert_eq!(view["reply"]["body"], "/wBiaW5hcnk=");

    client_door.shutdown(Duration::from_secs(1)).await;
    server_door.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn ttl_expires_and_transport_failures_end_as_failed() {
    let pki = Pki::new();
    let dir = tempfile::tempdir().unwrap();
    let server = start_server(&pki, test_pipe()).await;
    let settings = QueueSettings {
        max_attempts: 2,
        ..queue_in(dir.path())
    };
    let server_door = door(Pipe::Server(server.clone()), settings).await;
    let http = reqwest::Client::new();
    let base = format!("http://{}", server_door.http_addr);

    // Nobody comes within its TTL of 1 s.
    let (status, gone) = queue(
        &http,
        &format!("{base}/client/q-away/echo"),
        &[("X-Event-TTL-S", "1")],
        b"late",
    )
    .await;
    assert_eq!(status, 202, "{gone}");
    let gone = gone["id"].as_str().unwrap();
    assert_eq!(
        state_of(&http, &server_door, gone).await["state"],
        "pending"
    );
    wait_state(
        &http,
        &server_door,
        gone,
        "expired",
        Duration::from_secs(10),
    )
    .await;
    // The delivery task records it too (the view shows it expired from its TTL on): it is
    // then finished, and no longer counts as pending.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while state_of(&http, &server_door, gone)
        .await
        .get("finished")
        .is_none()
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the expiry was not recorded"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let status: Value = http
        .get(format!("{base}/status"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(status["queue"]["pending"], 0, "{status}");

    // A handler slower than the event's deadline: each send times out (504), and after
    // --queue-max-attempts (2) it is failed; the next event behind it is then delivered.
    let _c = client(&pki, "q-slow", &server, test_pipe()).await;
    let (_, slow) = queue(
        &http,
        &format!("{base}/client/q-slow/slow//3000#get"),
        &[("X-Event-Timeout-Ms", "100")],
        b"",
    )
    .await;
    let slow = slow["id"].as_str().unwrap().to_string();
    let (_, next) = queue(&http, &format!("{base}/client/q-slow/echo"), &[], b"next").await;
    let next = next["id"].as_str().unwrap().to_string();
    let view = wait_state(
        &http,
        &server_door,
        &slow,
        "failed",
        Duration::from_secs(15),
    )
    .await;
    assert_eq!(view["attempts"], 2, "{view}");
    assert!(
        view["error"].as_str().unwrap().contains("no reply"),
        "{view}"
    );
    let view = wait_state(
        &http,
        &server_door,
        &next,
        "delivered",
        Duration::from_secs(10),
    )
    .await;
    assert_eq!(view["reply"]["body"], "next");
    server_door.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn caps_and_bad_input_are_refused_clearly() {
    let pki = Pki::new();
    let dir = tempfile::tempdir().unwrap();
    let server = start_server(&pki, test_pipe()).await;
    let settings = QueueSettings {
        max_events: 2,
        max_bytes: 60,
        max_body: 16,
        ..queue_in(dir.path())
    };
    let server_door = door(Pipe::Server(server.clone()), settings).await;
    let http = reqwest::Client::new();
    let base = format!("http://{}", server_door.http_addr);
    let url = format!("{base}/client/q-cap/echo");

    // Count: the third event for the peer is 429; another peer still has room.
    assert_eq!(queue(&http, &url, &[], b"a").await.0, 202);
    assert_eq!(queue(&http, &url, &[], b"b").await.0, 202);
    let (status, body) = queue(&http, &url, &[], b"c").await;
    assert_eq!(status, 429, "{body}");
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("--queue-max-events"),
        "{body}"
    );
    // Bytes: 60 per peer; each event counts its noun, content type and headers too (39 here).
    let other = format!("{base}/client/q-bytes/echo");
    let (status, body) = queue(&http, &other, &[], b"0123456789abcdef").await;
    assert_eq!(status, 202, "{body}");
    let (status, body) = queue(&http, &other, &[], b"0123456789abcdef").await;
    assert_eq!(status, 507, "{body}");
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("--queue-max-bytes"),
        "{body}"
    );
    // A body over --queue-max-body.
    let (status, body) = queue(&http, &other, &[], b"0123456789abcdefX").await;
    assert_eq!(status, 413, "{body}");

    // Bad headers, ids.
    for (header, value) in [
        ("X-Event-Delivery", "later"),
        ("X-Event-TTL-S", "0"),
        ("X-Event-TTL-S", "soon"),
    ] {
        let response = http
            .post(&url)
            .header(
                "X-Event-Delivery",
                if header == "X-Event-Delivery" {
                    value
                } else {
                    "queued"
                },
            )
            .header(header, value)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 400, "{header}: {value}");
    }
    for (id, status) in [
        ("nope", 400),
        ("0000000000000001FFFFFFFFFFFFFFFF", 400),
        ("00000000000000010000000000000000", 404),
        ("00000000000099990000000000000000", 404),
    ] {
        let response = http
            .get(format!("{base}/queued/{id}"))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), status, "{id}");
    }
    server_door.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn policy_tokens_scope_queuing_and_reading_as_direct_calls() {
    let pki = Pki::new();
    let dir = tempfile::tempdir().unwrap();
    let server = start_server(&pki, test_pipe()).await;
    std::fs::write(dir.path().join("writer.token"), "writer-secret-0123456789").unwrap();
    std::fs::write(dir.path().join("reader.token"), "reader-secret-0123456789").unwrap();
    let policy = dir.path().join("policy.toml");
    std::fs::write(
        &policy,
        r#"
[[token]]
name = "writer"
secret_file = "writer.token"
verbs = ["POST"]
paths = ["/client/q-tok/"]

[[token]]
name = "reader"
secret_file = "reader.token"
verbs = ["GET"]
paths = ["/queued/"]
"#,
    )
    .unwrap();
    let loaded = restpipe::Policy::load(&policy, &server.handler_names()).unwrap();
    server.set_policy(loaded);
    let server_door = door(
        Pipe::Server(server.clone()),
        queue_in(&dir.path().join("data")),
    )
    .await;
    let http = reqwest::Client::new();
    let base = format!("http://{}", server_door.http_addr);
    let post = |url: String, token: Option<&'static str>| {
        let mut request = http
            .post(url)
            .header("X-Event-Delivery", "queued")
            .body("x");
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        request.send()
    };

    let url = format!("{base}/client/q-tok/echo");
    assert_eq!(post(url.clone(), None).await.unwrap().status(), 401);
    assert_eq!(
        post(url.clone(), Some("reader-secret-0123456789"))
            .await
            .unwrap()
            .status(),
        403
    );
    // The writer's scope covers q-tok only, queued or not.
    let other = format!("{base}/client/q-other/echo");
    assert_eq!(
        post(other, Some("writer-secret-0123456789"))
            .await
            .unwrap()
            .status(),
        403
    );
    let response = post(url, Some("writer-secret-0123456789")).await.unwrap();
    assert_eq!(response.status(), 202);
    let id = response.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let read = |token: Option<&'static str>| {
        let mut request = http.get(format!("{base}/queued/{id}"));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        request.send()
    };
    assert_eq!(read(None).await.unwrap().status(), 401);
    assert_eq!(
        read(Some("writer-secret-0123456789"))
            .await
            .unwrap()
            .status(),
        403
    );
    let response = read(Some("reader-secret-0123456789")).await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.json::<Value>().await.unwrap()["state"], "pending");
    // A foreign Host is refused before anything else, as on every route.
    let response = http
        .get(format!("{base}/queued/{id}"))
        .header("Host", "evil.example")
        .bearer_auth("reader-secret-0123456789")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 403);
    server_door.shutdown(Duration::from_secs(1)).await;
}
