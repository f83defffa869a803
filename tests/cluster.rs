//! Server replicas over a real nats-server (`--cluster`, src/cluster): in-process replicas
//! and clients ([`restpipe_testkit::nodes`]), one nats-server process
//! ([`restpipe_testkit::nats`]).
//!
//! A call made on a replica that does not hold the client reaches it through the one that
//! does, with the same answer as on a single node (status, return code, error body,
//! deadline), bodies far over NATS' 1 MiB message limit included, both ways; a client
//! connected nowhere is 503 after the connect wait; the newest connection of an identity
//! wins cluster-wide; with NATS down each replica serves its own clients and a cross-replica
//! call is 503 saying the cluster is unreachable, and routing resumes when NATS is back.
//!
//! Without a nats-server binary these tests skip locally (saying so) and fail with CI=true.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use bytes::Bytes;
use restpipe::cluster::ClusterOptions;
use restpipe::handler::{BodyStream, Request};
use restpipe::http::{call_error_response, reply_response};
use restpipe::{CallError, ServerNode};
use restpipe_testkit::certs::Pki;
use restpipe_testkit::nats::NatsServer;
use restpipe_testkit::nodes::*;
use restpipe_testkit::wait::wait_until;

/// Three replicas of one cluster on `nats`, named r1, r2, r3.
async fn replicas(pki: &Pki, nats: &NatsServer) -> Vec<ServerNode> {
    let mut out = Vec::new();
    for i in 1..=3 {
        let server = start_server(pki, test_pipe()).await;
        server
            .join_cluster(ClusterOptions {
                urls: vec![nats.url()],
                name: "test".into(),
                replica: format!("r{i}"),
                creds: None,
                tls_ca: None,
            })
            .await
            .expect("join the cluster");
        out.push(server);
    }
    let all_up = wait_until(Duration::from_secs(10), || {
        out.iter()
            .all(|s| s.cluster().is_some_and(|c| c.is_connected()))
    })
    .await;
    assert!(all_up, "the replicas did not connect to NATS");
    out
}

/// Wait (at most 10 s) until `server` knows `identity` is held by `replica`.
async fn wait_presence(server: &ServerNode, identity: &str, replica: &str) {
    let cluster = server.cluster().unwrap();
    let seen = wait_until(Duration::from_secs(10), || {
        cluster
            .remote_clients()
            .iter()
            .any(|r| r.identity == identity && r.replica == replica)
    })
    .await;
    assert!(
        seen,
        "{} never saw {identity} on {replica}",
        cluster.replica()
    );
}

async fn body_of(reply: restpipe::handler::Reply) -> Bytes {
    match reply.stream {
        Some(stream) => stream.collect(usize::MAX).await.expect("whole body"),
        None => reply.body,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_on_any_replica_reaches_the_client_with_the_single_node_answer() {
    let dir = tempfile::tempdir().unwrap();
    let Some(nats) = NatsServer::start(dir.path()).await else {
        return;
    };
    let pki = Pki::new();
    let r = replicas(&pki, &nats).await;
    let _client = start_client(&pki, "alpha", &r[0], test_pipe()).await;
    wait_presence(&r[1], "alpha", "r1").await;
    wait_presence(&r[2], "alpha", "r1").await;

    // The handler runs on the client, whichever replica is asked.
    for s in &r {
        let reply = s.call("alpha", whoami(), None).await.expect("whoami");
        assert_eq!(node_of(&reply), "alpha");
        assert_eq!(reply.code, 0);
    }

    // Errors: the same HTTP answer as from the replica that holds the client.
    let nope = Request::new("GET", "nope");
    let local = reply_response(r[0].call("alpha", nope.clone(), None).await.unwrap());
    let remote = reply_response(r[1].call("alpha", nope, None).await.unwrap());
    assert_eq!(local.status(), 404);
    assert_eq!(remote.status(), local.status());
    assert_eq!(
        remote.headers()["x-event-return-code"],
        local.headers()["x-event-return-code"]
    );
    let fail = Request::new("GET", "fail");
    let remote = r[2].call("alpha", fail, None).await.unwrap();
    assert_eq!((reply_response(remote).status().as_u16(), 500), (500, 500));

    // The deadline: a 504 with the single node's error.
    let started = Instant::now();
    let err = r[1]
        .call("alpha", slow(3000), Some(Duration::from_millis(300)))
        .await
        .unwrap_err();
    assert_eq!(err, CallError::Timeout(Duration::from_millis(300)));
    assert_eq!(call_error_response(&err).status(), 504);
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );

    // Not connected anywhere: 503 after the connect wait (3 s in the test pipe).
    let started = Instant::now();
    let err = r[1].call("nobody", whoami(), None).await.unwrap_err();
    assert!(matches!(err, CallError::NotConnected(_)), "{err:?}");
    assert_eq!(call_error_response(&err).status(), 503);
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(2900) && waited < Duration::from_secs(6),
        "{waited:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_far_over_the_nats_message_limit_cross_replicas_both_ways() {
    let dir = tempfile::tempdir().unwrap();
    let Some(nats) = NatsServer::start(dir.path()).await else {
        return;
    };
    let pki = Pki::new();
    let r = replicas(&pki, &nats).await;
    let _client = start_client(&pki, "bulk", &r[2], test_pipe()).await;
    wait_presence(&r[0], "bulk", "r3").await;

    // 15 MiB whole (a whole-body handler takes up to --max-frame, 16 MiB, as on a single
    // node), echoed: out as chunks, back as chunks, byte for byte.
    let body = random_bytes(15 * 1024 * 1024 + 3);
    let reply = r[0].call("bulk", echo(body.clone()), None).await.unwrap();
    assert_eq!(reply.code, 0);
    let back = body_of(reply).await;
    assert_eq!(back.len(), body.len());
    assert!(back == body, "the echoed body differs");

    // 64 MiB streamed in, checked byte by byte on the client.
    let n: u64 = 64 * 1024 * 1024;
    let stream = BodyStream::new(pattern_stream(n, None), Some(n));
    let request = Request::new("POST", "check");
    let reply = r[0]
        .call_with_body("bulk", request, Some(stream), None)
        .await
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&body_of(reply).await).unwrap();
    assert_eq!(v["bytes"], n);
    assert_eq!(v["mismatches"], 0);

    // 40 MiB streamed out of the client, through r1 to r2's caller.
    let n: u64 = 40 * 1024 * 1024;
    let request = Request::new("GET", "stream").with_parameters(vec![n.to_string()]);
    let reply = r[1].call("bulk", request, None).await.unwrap();
    assert_eq!(reply.stream.as_ref().and_then(BodyStream::length), Some(n));
    let back = body_of(reply).await;
    assert_eq!(back.len() as u64, n);
    assert!(back
        .iter()
        .enumerate()
        .all(|(i, b)| *b == pattern(i as u64)));

    // A reply body that breaks off mid-way is incomplete on the far replica too.
    let request = Request::new("GET", "stream")
        .with_parameters(vec![(4u64 << 20).to_string(), (1u64 << 20).to_string()]);
    let reply = r[1].call("bulk", request, None).await.unwrap();
    let err = reply.stream.unwrap().collect(usize::MAX).await.unwrap_err();
    assert!(err.to_string().contains("abort") || !err.to_string().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_newest_connection_wins_across_replicas_and_clients_are_listed_everywhere() {
    let dir = tempfile::tempdir().unwrap();
    let Some(nats) = NatsServer::start(dir.path()).await else {
        return;
    };
    let pki = Pki::new();
    let r = replicas(&pki, &nats).await;
    let first = start_client(&pki, "twin", &r[0], test_pipe()).await;
    let _other = start_client(&pki, "solo", &r[1], test_pipe()).await;
    wait_presence(&r[1], "twin", "r1").await;
    let old_epoch = r[0].cluster().unwrap().local_epoch("twin").unwrap();

    // The same identity on r2: r1 closes its own connection.
    let second = start_client(&pki, "twin", &r[1], test_pipe()).await;
    let closed = wait_until(Duration::from_secs(10), || {
        r[0].registry().find("twin").is_err()
    })
    .await;
    assert!(closed, "r1 kept the older connection");
    let new_epoch = r[1].cluster().unwrap().local_epoch("twin").unwrap();
    assert!(new_epoch > old_epoch);
    wait_presence(&r[0], "twin", "r2").await;
    wait_presence(&r[2], "twin", "r2").await;
    // The first client re-dials r1 (as its backoff says) and wins in turn: each replica
    // agrees on one holder, the one with the newest epoch.
    drop(first);
    assert!(second.is_connected());

    // Every replica lists every client once, with its replica.
    for s in &r {
        let c = s.cluster().unwrap();
        let mut names: Vec<(String, String)> = c
            .remote_clients()
            .into_iter()
            .map(|r| (r.identity, r.replica))
            .collect();
        names.extend(
            s.clients()
                .into_iter()
                .map(|l| (l.identity, c.replica().to_string())),
        );
        names.sort();
        names.dedup();
        assert_eq!(
            names,
            [("solo".into(), "r2".into()), ("twin".into(), "r2".into())],
            "as {} sees it",
            c.replica()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_nats_down_each_replica_serves_its_own_and_routing_resumes_after() {
    let dir = tempfile::tempdir().unwrap();
    let Some(mut nats) = NatsServer::start(dir.path()).await else {
        return;
    };
    let pki = Pki::new();
    let r = replicas(&pki, &nats).await;
    let _a = start_client(&pki, "here", &r[0], test_pipe()).await;
    let _b = start_client(&pki, "there", &r[1], test_pipe()).await;
    wait_presence(&r[0], "there", "r2").await;
    r[0].call("there", whoami(), None).await.unwrap();

    nats.stop();
    let down = wait_until(Duration::from_secs(15), || {
        !r[0].cluster().unwrap().is_connected()
    })
    .await;
    assert!(down, "r1 did not notice NATS went away");
    // Its own client: served as ever.
    let reply = r[0].call("here", whoami(), None).await.unwrap();
    assert_eq!(node_of(&reply), "here");
    // Across: 503, saying why, within the connect wait; never a hang.
    let started = Instant::now();
    let err = tokio::time::timeout(Duration::from_secs(10), r[0].call("there", whoami(), None))
        .await
        .expect("no hang")
        .unwrap_err();
    assert_eq!(call_error_response(&err).status(), 503);
    assert!(err.to_string().contains("cluster is unreachable"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(6));

    // NATS back on its port: the replicas reconnect by themselves, and routing resumes.
    nats.restart().await;
    let back = wait_until(Duration::from_secs(20), || {
        r.iter().all(|s| s.cluster().unwrap().is_connected())
    })
    .await;
    assert!(back, "the replicas did not reconnect to NATS");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match r[0].call("there", whoami(), None).await {
            Ok(reply) => {
                assert_eq!(node_of(&reply), "there");
                break;
            }
            Err(e) => assert!(Instant::now() < deadline, "routing did not resume: {e}"),
        }
    }
}

/// A call queued (`X-Event-Delivery: queued`) on a replica for a client connected to another
/// is delivered through the cluster, and its reply stored where it was queued.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queued_event_reaches_a_client_on_another_replica() {
    use restpipe::http::{HttpOptions, Pipe};
    use restpipe::queue::{Queue, QueueSettings};
    let dir = tempfile::tempdir().unwrap();
    let Some(nats) = NatsServer::start(dir.path()).await else {
        return;
    };
    let pki = Pki::new();
    let servers = replicas(&pki, &nats).await;
    let _client = start_client(&pki, "q-far", &servers[1], test_pipe()).await;
    wait_presence(&servers[0], "q-far", "r2").await;
    let pipe = Pipe::Server(servers[0].clone());
    let queue = Queue::start(pipe.clone(), QueueSettings::new(dir.path().join("r1")))
        .await
        .unwrap();
    let options = HttpOptions {
        max_body: 1 << 20,
        token: None,
        metrics: restpipe::Metrics::disabled(),
        queue: Some(queue),
    };
    let door = restpipe::app::start_http(pipe, options, "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let http = reqwest::Client::new();
    let base = format!("http://{}", door.http_addr);
    let response = http
        .post(format!("{base}/client/q-far/echo"))
        .header("X-Event-Delivery", "queued")
        .header("Content-Type", "text/plain")
        .body("queued across")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
    let id = response.json::<serde_json::Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let view: serde_json::Value =
            restpipe_testkit::http::get_json(&http, &format!("{base}/queued/{id}")).await;
        if view["state"] == "delivered" {
            assert_eq!(view["reply"]["status"], 200, "{view}");
            assert_eq!(view["reply"]["body"], "queued across", "{view}");
            break;
        }
        assert!(Instant::now() < deadline, "not delivered: {view}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
