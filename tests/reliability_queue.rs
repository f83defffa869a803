//! Queued delivery survives a SIGKILL (docs/QUEUE.md), with real processes: 1,000 events
//! queued on a `restpipe server` for a client that is not there, the server killed with
//! SIGKILL and started again on the same data directory, then the client started: every
//! event acknowledged with 202 reaches the client's handler (the `forward` plug-in, to an
//! upstream in this test that records what it gets), in order, and an upstream that
//! deduplicates by `X-Restpipe-Delivery-Id` sees each exactly once.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use restpipe_testkit::certs::*;
use restpipe_testkit::hook::Hook;
use restpipe_testkit::http::*;
use restpipe_testkit::procs::*;

const EVENTS: usize = 1000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_queued_events_survive_sigkill_in_order_and_exactly_once_by_id() {
    let certs = Certs::new();
    let http = http_client();
    let data = certs.dir().join("server-data");
    let data = data.to_str().unwrap();
    let timings = [
        "--heartbeat-interval",
        "0.5",
        "--heartbeat-timeout",
        "3",
        "--connect-wait",
        "1",
    ];
    let mut flags: Vec<&str> = timings.to_vec();
    flags.extend(["--data-dir", data]);
    let (mut server, _) = start_server(&certs, &flags).await;

    // 1,000 events for a client that has never connected.
    let started = Instant::now();
    let mut ids = Vec::with_capacity(EVENTS);
    for i in 0..EVENTS {
        let response = http
            .post(server.url("/client/rq-1/hook"))
            .header("X-Event-Delivery", "queued")
            .header("Content-Type", "text/plain")
            .body(i.to_string())
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 202, "event {i}");
        let value: serde_json::Value = response.json().await.unwrap();
        ids.push(value["id"].as_str().unwrap().to_string());
    }
    println!(
        "queued {EVENTS} events (each fsync'd before its 202) in {:?}",
        started.elapsed()
    );
    let view = get_json(&http, &server.url(&format!("/queued/{}", ids[0]))).await;
    assert_eq!(view["state"], "pending", "{view}");

    // SIGKILL, then the same node on the same data directory.
    server.kill();
    server.restart().await;
    let status = get_json(&http, &server.url("/status")).await;
    assert_eq!(status["queue"]["pending"], EVENTS as u64, "{status}");

    // The client comes, with `forward` to the recording upstream.
    let hook = Hook::start(Duration::ZERO).await;
    let route = format!("hook=http://{}/hook", hook.addr());
    let mut flags: Vec<&str> = timings.to_vec();
    flags.extend(["--handlers", "forward", "--forward", &route]);
    let cert = certs.client("rq-1");
    let args = client_args(&certs, &cert, server.pipe_addr(), &flags);
    let _client = Node::start(certs.dir(), "rq-1", args).await;

    let started = Instant::now();
    assert!(
        hook.wait_once_each(EVENTS, Duration::from_secs(120)).await,
        "{} of {EVENTS} delivered; the server's log:\n{}",
        hook.once_each().len(),
        server.log_tail(30)
    );
    println!("delivered {EVENTS} events in {:?}", started.elapsed());

    // Deduplicated by id: each event once, in the order it was queued, with its own body.
    let seen = hook.seen();
    let handled = hook.once_each();
    assert_eq!(handled.len(), EVENTS);
    for (i, (id, body)) in handled.iter().enumerate() {
        assert_eq!((id, body), (&ids[i], &i.to_string()), "event {i}");
    }
    println!(
        "{} deliveries, {} of them again (at least once)",
        seen.len(),
        seen.len() - EVENTS
    );

    // The last one is recorded as delivered, with the upstream's reply.
    let last = &ids[EVENTS - 1];
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let view = get_json(&http, &server.url(&format!("/queued/{last}"))).await;
        if view["state"] == "delivered" {
            assert_eq!(view["reply"]["body"], "ok", "{view}");
            assert_eq!(view["reply"]["status"], 200, "{view}");
            break;
        }
        assert!(Instant::now() < deadline, "{view}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
