//! Queued events across a replica's death (docs/CLUSTER.md, "Published and queued events"),
//! with real processes: two `restpipe server --cluster` replicas sharing one
//! `--queue-shared-dir`, and a real nats-server ([`restpipe_testkit::nats`]).
//!
//! - Events queued on replica `ra` for a client that is away, `ra` killed with SIGKILL, the
//!   client started on `rb` only: `rb` adopts `ra`'s store and delivers every event, in order,
//!   and an upstream that deduplicates by `X-Restpipe-Delivery-Id` sees each exactly once;
//!   `rb` answers `GET /queued/{id}` for them while it holds the store.
//! - `ra` started again with the same settings: it comes up at once (its queued calls 503,
//!   never a hang or a 500, while `rb` holds its store), `rb` hands the store back once it
//!   hears `ra`, and `ra` then answers `delivered` for the events `rb` delivered, with the
//!   events still pending for a client that never came back in its own queue.
//!
//! The lock fence itself (a live owner's store is never adopted) is a unit test of
//! `src/queue/handover.rs`. Without a nats-server binary this skips locally (saying so) and
//! fails with CI=true.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use restpipe_testkit::certs::*;
use restpipe_testkit::hook::Hook;
use restpipe_testkit::http::*;
use restpipe_testkit::nats::NatsServer;
use restpipe_testkit::procs::*;
use restpipe_testkit::wait::wait_until;
use serde_json::Value;

/// Events queued for the client that comes back on the other replica.
const EVENTS: usize = 200;
/// Events queued for a client that never comes.
const STRANDED: usize = 3;

/// Queue one event with body `body` for `client` on `replica`: its id.
async fn queue_one(http: &reqwest::Client, replica: &Node, client: &str, body: String) -> String {
    let response = http
        .post(replica.url(&format!("/client/{client}/hook")))
        .header("X-Event-Delivery", "queued")
        .header("Content-Type", "text/plain")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
    let value: Value = response.json().await.unwrap();
    value["id"].as_str().unwrap().to_string()
}

/// `GET /queued/{id}` on `replica`, bounded: status and JSON (null when not JSON).
async fn queued(http: &reqwest::Client, replica: &Node, id: &str) -> (u16, Value) {
    let response = tokio::time::timeout(
        Duration::from_secs(5),
        http.get(replica.url(&format!("/queued/{id}"))).send(),
    )
    .await
    .unwrap_or_else(|_| panic!("GET /queued/{id} on {} hung", replica.name))
    .unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

/// The stores `replica` holds for others, as its `/status` lists them: (replica, pending).
async fn adopted(http: &reqwest::Client, replica: &Node) -> Vec<(String, u64)> {
    let status = get_json(http, &replica.url("/status")).await;
    status["cluster"]["queue_handover"]["adopted"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|s| {
                    (
                        s["replica"].as_str().unwrap_or("").to_string(),
                        s["pending"].as_u64().unwrap_or(0),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Replicas `ra` and `rb` on the nats-server at `url`, sharing one queue directory.
async fn two_replicas(certs: &Certs, url: &str) -> (Node, Node) {
    let shared = certs.dir().join("shared-queue");
    let shared = shared.to_str().unwrap().to_string();
    let mut replicas = Vec::new();
    for name in ["ra", "rb"] {
        let data = certs.dir().join(format!("{name}-data"));
        let data = data.to_str().unwrap().to_string();
        let mut extra: Vec<&str> = quick_timings("1");
        extra.extend(["--cluster", url, "--cluster-name", "handover"]);
        extra.extend(["--replica-name", name, "--data-dir", &data]);
        extra.extend(["--queue-shared-dir", &shared]);
        replicas.push(Node::start(certs.dir(), name, server_args(certs, &extra)).await);
    }
    let mut it = replicas.into_iter();
    (it.next().unwrap(), it.next().unwrap())
}

/// The client `identity` on `replica` only, its `forward` plug-in sending `hook` to `upstream`.
async fn forwarding_client(
    certs: &Certs,
    identity: &str,
    replica: &Node,
    upstream: std::net::SocketAddr,
) -> Node {
    let route = format!("hook=http://{upstream}/hook");
    let mut flags: Vec<&str> = quick_timings("1");
    flags.extend(["--handlers", "forward", "--forward", &route]);
    let cert = certs.client(identity);
    let args = client_args(certs, &cert, replica.pipe_addr(), &flags);
    Node::start(certs.dir(), identity, args).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_replicas_queued_events_are_delivered_by_a_survivor_and_handed_back() {
    let certs = Certs::new();
    let Some(nats) = NatsServer::start(certs.dir()).await else {
        return;
    };
    let http = http_client();
    let (mut ra, mut rb) = two_replicas(&certs, &nats.url()).await;

    // Events for a client that is away, and a few for one that never comes.
    let started = Instant::now();
    let mut ids = Vec::with_capacity(EVENTS);
    for i in 0..EVENTS {
        ids.push(queue_one(&http, &ra, "qc-1", i.to_string()).await);
    }
    let mut stranded = Vec::new();
    for i in 0..STRANDED {
        stranded.push(queue_one(&http, &ra, "qc-2", format!("s{i}")).await);
    }
    println!(
        "queued {} events on ra in {:?}",
        EVENTS + STRANDED,
        started.elapsed()
    );
    let (status, view) = queued(&http, &ra, &ids[0]).await;
    assert_eq!((status, view["state"].as_str()), (200, Some("pending")));
    assert!(
        adopted(&http, &rb).await.is_empty(),
        "rb adopted a live store"
    );

    // ra dies; the client comes, on rb only.
    ra.kill();
    let killed = Instant::now();
    let hook = Hook::start(Duration::ZERO).await;
    let _client = forwarding_client(&certs, "qc-1", &rb, hook.addr()).await;

    let line = rb
        .wait_line(
            &["adopted the queue", "replica=ra"],
            Duration::from_secs(60),
        )
        .await;
    println!(
        "rb adopted ra's store {:?} after the kill: {line}",
        killed.elapsed()
    );

    assert!(
        hook.wait_once_each(EVENTS, Duration::from_secs(90)).await,
        "{} of {EVENTS} delivered; rb's log:\n{}",
        hook.once_each().len(),
        rb.log_tail(30)
    );
    println!(
        "all {EVENTS} delivered {:?} after the kill",
        killed.elapsed()
    );

    // Deduplicated by id: each event once, in the order it was queued, with its own body.
    let got = hook.seen();
    let handled = hook.once_each();
    assert_eq!(handled.len(), EVENTS, "{handled:?}");
    for (i, (id, body)) in handled.iter().enumerate() {
        assert_eq!((id, body), (&ids[i], &i.to_string()), "event {i}");
    }
    println!(
        "{} deliveries, {} of them again (at least once)",
        got.len(),
        got.len() - EVENTS
    );

    // rb answers for the store it holds, and still holds it for the stranded events.
    let last = &ids[EVENTS - 1];
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (status, view) = queued(&http, &rb, last).await;
        if status == 200 && view["state"] == "delivered" {
            assert_eq!(view["reply"]["body"], "ok", "{view}");
            break;
        }
        assert!(Instant::now() < deadline, "rb: {status} {view}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        adopted(&http, &rb).await,
        [("ra".to_string(), STRANDED as u64)]
    );

    // ra comes back: it starts while rb holds its store, which rb then hands back.
    let back = Instant::now();
    ra.restart().await;
    // A call queued on ra now: 503 with the reason while rb holds the store (202 if rb was
    // already done), never a hang nor a 500.
    let response = tokio::time::timeout(
        Duration::from_secs(5),
        http.post(ra.url("/client/qc-3/hook"))
            .header("X-Event-Delivery", "queued")
            .body("early")
            .send(),
    )
    .await
    .expect("a queued call on ra hung while its store was held")
    .unwrap();
    let early = response.status().as_u16();
    let retry_after = response.headers().get("retry-after").cloned();
    let reason = response.text().await.unwrap();
    println!("a queued call on ra right after its restart: {early} {reason}");
    match early {
        503 => {
            assert!(reason.contains("held by another process"), "{reason}");
            assert!(retry_after.is_some());
        }
        202 => {}
        other => panic!("a queued call on ra while its store was held: {other} {reason}"),
    }
    let mut statuses = std::collections::BTreeMap::<u16, usize>::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (status, view) = queued(&http, &ra, last).await;
        *statuses.entry(status).or_default() += 1;
        if status == 200 {
            assert_eq!(view["state"], "delivered", "{view}");
            assert_eq!(view["reply"]["body"], "ok", "{view}");
            break;
        }
        assert_eq!(status, 503, "ra while its store is held: {view}");
        assert!(
            Instant::now() < deadline,
            "ra never got its store back; ra's log:\n{}\nrb's log:\n{}",
            ra.log_tail(20),
            rb.log_tail(20)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!(
        "ra answered from its own store {:?} after its restart; GET statuses meanwhile: {statuses:?}",
        back.elapsed()
    );
    for (i, id) in ids.iter().enumerate() {
        let (status, view) = queued(&http, &ra, id).await;
        assert_eq!(
            (status, view["state"].as_str()),
            (200, Some("delivered")),
            "event {i}: {view}"
        );
    }
    assert!(
        ra.log_count(&["held by another replica"]) >= 1,
        "ra did not say its store was held:\n{}",
        ra.log_tail(20)
    );
    rb.wait_line(
        &["handed an adopted queue back", "replica=ra"],
        Duration::from_secs(10),
    )
    .await;
    assert!(adopted(&http, &rb).await.is_empty());
    let status = get_json(&http, &ra.url("/status")).await;
    let early_queued = u64::from(early == 202);
    assert_eq!(
        status["queue"]["pending"],
        STRANDED as u64 + early_queued,
        "{status}"
    );
    let (code, view) = queued(&http, &ra, &stranded[0]).await;
    assert_eq!(
        (code, view["state"].as_str()),
        (200, Some("pending")),
        "{view}"
    );
    // ra takes events again.
    queue_one(&http, &ra, "qc-2", "after".into()).await;
}

/// Events queued on `ra` for a client on `rb`, delivered slowly by `rb` after `ra` dies; `ra`
/// returns mid-way. `rb` hands the store back only once the delivery it has in flight is
/// recorded, so `ra` goes on from the next event: every event once, in order, none twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_handed_back_mid_delivery_sends_no_event_twice() {
    const SLOW: usize = 30;
    let certs = Certs::new();
    let Some(nats) = NatsServer::start(certs.dir()).await else {
        return;
    };
    let http = http_client();
    let (mut ra, mut rb) = two_replicas(&certs, &nats.url()).await;
    let mut ids = Vec::with_capacity(SLOW);
    for i in 0..SLOW {
        ids.push(queue_one(&http, &ra, "qc-slow", i.to_string()).await);
    }
    ra.kill();
    let hook = Hook::start(Duration::from_millis(300)).await;
    let _client = forwarding_client(&certs, "qc-slow", &rb, hook.addr()).await;
    rb.wait_line(
        &["adopted the queue", "replica=ra"],
        Duration::from_secs(60),
    )
    .await;
    // A few delivered by rb, then ra comes back.
    assert!(
        wait_until(Duration::from_secs(30), || hook.count() >= 5).await,
        "rb delivered nothing"
    );
    ra.restart().await;
    let line = rb
        .wait_line(
            &["handed an adopted queue back", "replica=ra"],
            Duration::from_secs(30),
        )
        .await;
    let by_rb = hook.count();
    println!("rb delivered {by_rb} of {SLOW} before handing back: {line}");
    assert!(line.contains("its replica is back"), "{line}");
    assert!(by_rb < SLOW, "rb delivered everything before ra was back");

    // ra delivers the rest, through rb (which holds the client), from where rb stopped.
    assert!(
        hook.wait_once_each(SLOW, Duration::from_secs(60)).await,
        "{} of {SLOW} delivered; ra's log:\n{}",
        hook.once_each().len(),
        ra.log_tail(20)
    );
    let got = hook.seen();
    for (i, (id, body)) in got.iter().enumerate() {
        assert_eq!(
            (id, body),
            (&ids[i], &i.to_string()),
            "delivery {i}: {got:?}"
        );
    }
    assert_eq!(got.len(), SLOW, "an event went twice: {got:?}");
    let (status, view) = queued(&http, &ra, &ids[SLOW - 1]).await;
    assert_eq!(status, 200, "{view}");
}
