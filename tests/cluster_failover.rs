//! Failures of a cluster with real processes: three `restpipe server --cluster` replicas and
//! a real nats-server ([`restpipe_testkit::nats`]), client processes that know every replica
//! (`--server-host a,b,c`), HTTP load through the replicas counted request by request as the
//! reliability suite does ([`restpipe_testkit::http::Load`]).
//!
//! - A replica killed with SIGKILL: its clients come back on the others within the reconnect
//!   backoff, every request during the failover ends in 200, 502, 503 or 504 (none hangs, none
//!   is lost), and afterwards every request through the survivors succeeds.
//!
//! Without a nats-server binary this skips locally (saying so) and fails with CI=true.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use restpipe_testkit::certs::*;
use restpipe_testkit::http::*;
use restpipe_testkit::nats::NatsServer;
use restpipe_testkit::procs::*;

/// Every client identity `replica` lists at `/clients`, with the replica it names.
async fn listing(http: &reqwest::Client, replica: &Node) -> Vec<(String, String)> {
    let list = get_json(http, &replica.url("/clients")).await;
    let mut out: Vec<(String, String)> = list
        .as_array()
        .map(|a| {
            a.iter()
                .map(|c| {
                    (
                        c["identity"].as_str().unwrap_or("").to_string(),
                        c["replica"].as_str().unwrap_or("").to_string(),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_killed_loses_no_request_and_its_clients_come_back_on_the_others() {
    let certs = Certs::new();
    let Some(nats) = NatsServer::start(certs.dir()).await else {
        return;
    };
    let http = http_client();
    let url = nats.url();
    let mut replicas = Vec::new();
    for i in 1..=3 {
        let name = format!("r{i}");
        let mut extra: Vec<&str> = quick_timings("2");
        extra.extend(["--cluster", &url, "--cluster-name", "failover"]);
        extra.extend(["--replica-name", &name]);
        let args = server_args(&certs, &extra);
        replicas.push(Node::start(certs.dir(), &name, args).await);
    }
    let list = replicas
        .iter()
        .map(|r| r.pipe_addr().to_string())
        .collect::<Vec<_>>()
        .join(",");
    let mut clients = Vec::new();
    for i in 1..=6 {
        let identity = format!("edge-{i}");
        let cert = certs.client(&identity);
        let mut extra: Vec<&str> = quick_timings("2");
        extra.extend(["--reconnect-max", "1"]);
        let mut args = client_args(&certs, &cert, replicas[0].pipe_addr(), &extra);
        let at = args.iter().position(|a| a == "--server-host").unwrap();
        args[at + 1] = list.clone();
        clients.push(Node::start(certs.dir(), &identity, args).await);
    }
    let everyone: Vec<String> = (1..=6).map(|i| format!("edge-{i}")).collect();

    // Every replica lists every client, each on one replica.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let mut all_see = true;
        for r in &replicas {
            let names: Vec<String> = listing(&http, r).await.into_iter().map(|x| x.0).collect();
            all_see &= names == everyone;
        }
        if all_see {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the replicas never listed every client"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let before = listing(&http, &replicas[1]).await;
    let on_r1: Vec<String> = before
        .iter()
        .filter(|(_, r)| r == "r1")
        .map(|(i, _)| i.clone())
        .collect();
    println!("before: {before:?}");

    // Load through the survivors to every client.
    let urls: Vec<String> = everyone
        .iter()
        .flat_map(|id| {
            [
                replicas[1].url(&format!("/client/{id}/time")),
                replicas[2].url(&format!("/client/{id}/time")),
            ]
        })
        .collect();
    let load = Load::start(LoadSpec {
        urls: urls.clone(),
        workers: 6,
        timeout_ms: 3000,
        outer: Duration::from_secs(30),
        pause: Duration::from_millis(20),
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let killed_at = Instant::now();
    replicas[0].kill();

    // Its clients come back on r2 or r3, within the backoff (15 s).
    let deadline = Instant::now() + Duration::from_secs(15);
    let back = loop {
        let now = listing(&http, &replicas[1]).await;
        let names: Vec<String> = now.iter().map(|x| x.0.clone()).collect();
        if names == everyone && now.iter().all(|(_, r)| r == "r2" || r == "r3") {
            break killed_at.elapsed();
        }
        assert!(
            Instant::now() < deadline,
            "the clients of r1 ({on_r1:?}) did not come back on r2 or r3 within 15 s: {now:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (tally, _records) = load.finish().await;
    println!("clients of r1 back after {back:?}; during the failover: {tally}");
    assert_eq!(tally.lost(), 0, "{tally}");
    assert_eq!(tally.unexpected(), 0, "{tally}");
    assert!(tally.status(200) > 0, "{tally}");

    // Afterwards, every request through the survivors succeeds.
    for url in urls.iter().cycle().take(60) {
        let (status, body) = get(&http, url).await;
        assert_eq!(status, 200, "{url}: {body}");
    }
    drop(clients);
}

/// Three replicas on `nats_urls[i]` (replica `i`), and one client on each, that knows only
/// its own replica: `c1` on r1, `c2` on r2, `c3` on r3. Returns once every replica lists all
/// three.
async fn one_client_each(certs: &Certs, nats_urls: [&str; 3]) -> (Vec<Node>, Vec<Node>) {
    let http = http_client();
    let mut replicas = Vec::new();
    for (i, url) in nats_urls.iter().enumerate() {
        let name = format!("r{}", i + 1);
        let mut extra: Vec<&str> = quick_timings("2");
        extra.extend(["--cluster", url, "--replica-name", &name]);
        replicas.push(Node::start(certs.dir(), &name, server_args(certs, &extra)).await);
    }
    let mut clients = Vec::new();
    for (i, r) in replicas.iter().enumerate() {
        let identity = format!("c{}", i + 1);
        let cert = certs.client(&identity);
        let args = client_args(certs, &cert, r.pipe_addr(), &quick_timings("2"));
        clients.push(Node::start(certs.dir(), &identity, args).await);
    }
    let want: Vec<(String, String)> = (1..=3)
        .map(|i| (format!("c{i}"), format!("r{i}")))
        .collect();
    let deadline = Instant::now() + Duration::from_secs(20);
    for r in &replicas {
        while listing(&http, r).await != want {
            assert!(
                Instant::now() < deadline,
                "{} never listed {want:?}",
                r.name
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    (replicas, clients)
}

/// `GET url` within `limit`: status and body. Fails the test if it hangs.
async fn bounded_get(http: &reqwest::Client, url: &str, limit: Duration) -> (u16, String) {
    tokio::time::timeout(limit, get(http, url))
        .await
        .unwrap_or_else(|_| panic!("GET {url} hung past {limit:?}"))
}

/// Wait (at most `limit`) until `/status` of `replica` says NATS is `state`.
async fn wait_nats(http: &reqwest::Client, replica: &Node, state: &str, limit: Duration) {
    let deadline = Instant::now() + limit;
    loop {
        let status = get_json(http, &replica.url("/status")).await;
        if status["cluster"]["nats"] == state {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{} never said NATS is {state}: {}",
            replica.name,
            status["cluster"]
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_nats_stopped_each_replica_serves_its_own_and_routing_resumes_without_restart() {
    let certs = Certs::new();
    let Some(mut nats) = NatsServer::start(certs.dir()).await else {
        return;
    };
    let http = http_client();
    let url = nats.url();
    let (replicas, _clients) = one_client_each(&certs, [&url, &url, &url]).await;
    let cross = replicas[0].url("/client/c2/time");
    assert_eq!(
        bounded_get(&http, &cross, Duration::from_secs(10)).await.0,
        200
    );

    nats.stop();
    wait_nats(&http, &replicas[0], "unreachable", Duration::from_secs(15)).await;
    for (i, r) in replicas.iter().enumerate() {
        let own = r.url(&format!("/client/c{}/time", i + 1));
        let (status, body) = bounded_get(&http, &own, Duration::from_secs(10)).await;
        assert_eq!(status, 200, "{own}: {body}");
    }
    let started = Instant::now();
    let (status, body) = bounded_get(&http, &cross, Duration::from_secs(10)).await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("cluster is unreachable"), "{body}");
    assert!(started.elapsed() < Duration::from_secs(6));

    nats.restart().await;
    for r in &replicas {
        wait_nats(&http, r, "connected", Duration::from_secs(20)).await;
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (status, body) = bounded_get(&http, &cross, Duration::from_secs(10)).await;
        if status == 200 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "routing did not resume: {status} {body}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_cut_off_from_nats_but_not_from_its_clients_never_hangs_nor_misroutes() {
    let certs = Certs::new();
    let Some(nats) = NatsServer::start(certs.dir()).await else {
        return;
    };
    let http = http_client();
    let url = nats.url();
    // r1 reaches NATS through a relay that can be cut.
    let relay = restpipe_testkit::relay::Relay::start(loopback(nats.port)).await;
    let relayed = format!("nats://{}", relay.addr());
    let (replicas, _clients) = one_client_each(&certs, [&relayed, &url, &url]).await;

    relay.pause();
    relay.cut();
    wait_nats(&http, &replicas[0], "unreachable", Duration::from_secs(15)).await;
    // r1 serves its own client; it cannot reach the others' and says why.
    let (status, body) = bounded_get(
        &http,
        &replicas[0].url("/client/c1/time"),
        Duration::from_secs(10),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = bounded_get(
        &http,
        &replicas[0].url("/client/c2/time"),
        Duration::from_secs(10),
    )
    .await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("cluster is unreachable"), "{body}");
    // The others cannot reach r1's client: 503 after the connect wait, never a wrong
    // answer; and they still reach each other's.
    let (status, body) = bounded_get(
        &http,
        &replicas[1].url("/client/c1/time"),
        Duration::from_secs(15),
    )
    .await;
    assert_eq!(status, 503, "{body}");
    let (status, body) = bounded_get(
        &http,
        &replicas[1].url("/client/c3/time"),
        Duration::from_secs(10),
    )
    .await;
    assert_eq!(status, 200, "{body}");

    relay.resume();
    wait_nats(&http, &replicas[0], "connected", Duration::from_secs(20)).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (a, _) = bounded_get(
            &http,
            &replicas[0].url("/client/c2/time"),
            Duration::from_secs(10),
        )
        .await;
        let (b, _) = bounded_get(
            &http,
            &replicas[1].url("/client/c1/time"),
            Duration::from_secs(10),
        )
        .await;
        if (a, b) == (200, 200) {
            break;
        }
        assert!(Instant::now() < deadline, "routing did not resume: {a} {b}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
