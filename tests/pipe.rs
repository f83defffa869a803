//! The pipe between a server node and client nodes, over real TLS sockets on 127.0.0.1 with
//! certificates made at test time: concurrency both ways, large binary bodies, routing by
//! identity and address, losing and regaining the server, dead peers, graceful shutdown.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use bytes::Bytes;
use restpipe::{CallError, ClientNode, ServerNode};
use restpipe_testkit::certs::*;
use restpipe_testkit::nodes::*;
use restpipe_testkit::relay::*;
use restpipe_testkit::wait::*;

/// 200 requests at once in each direction over one connection all get their own answer, and
/// a slow handler (2 s) on each side holds none of them up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_requests_both_ways_and_a_slow_handler_delays_nobody() {
    const N: usize = 200;
    let pki = Pki::new();
    let server = start_server(&pki, test_pipe()).await;
    let client = start_client(&pki, "worker-1", &server, test_pipe()).await;
    let conn_id = client.connection().unwrap().id();

    let started = Instant::now();
    let slow_up = tokio::spawn({
        let client = client.clone();
        async move { client.call(slow(2000), None).await }
    });
    let slow_down = tokio::spawn({
        let server = server.clone();
        async move { server.call("worker-1", slow(2000), None).await }
    });

    let mut fast = Vec::with_capacity(2 * N);
    for i in 0..N {
        let client = client.clone();
        fast.push(tokio::spawn(async move {
            let body = format!("client request {i}: {}", "x".repeat(i));
            let reply = client.call(echo(body.clone()), None).await.unwrap();
            assert_eq!(reply.code, 0);
            assert_eq!(
                reply.body,
                Bytes::from(body),
                "reply {i} (client to server)"
            );
        }));
        let server = server.clone();
        fast.push(tokio::spawn(async move {
            let body = format!("server request {i}: {}", "y".repeat(i));
            let reply = server
                .call("worker-1", echo(body.clone()), None)
                .await
                .unwrap();
            assert_eq!(reply.code, 0);
            assert_eq!(
                reply.body,
                Bytes::from(body),
                "reply {i} (server to client)"
            );
        }));
    }
    for task in fast {
        task.await.unwrap();
    }
    let fast_done = started.elapsed();
    // The slow handlers are still running when every fast request has its answer.
    assert!(
        !slow_up.is_finished() && !slow_down.is_finished(),
        "the fast requests waited for the slow ones ({fast_done:?})"
    );
    assert!(fast_done < Duration::from_millis(1500), "{fast_done:?}");

    let up = slow_up.await.unwrap().unwrap();
    let down = slow_down.await.unwrap().unwrap();
    assert_eq!(&up.body[..], b"server slept 2000 ms");
    assert_eq!(&down.body[..], b"worker-1 slept 2000 ms");
    assert!(started.elapsed() >= Duration::from_secs(2));

    // All of it went over the one connection.
    let conn = client.connection().unwrap();
    assert_eq!(conn.id(), conn_id);
    let status = conn.status();
    assert_eq!(status.requests_sent, N as u64 + 1);
    assert_eq!(status.requests_received, N as u64 + 1);
    assert_eq!(server.registry().len(), 1);
}

/// A 10 MiB body of random bytes (every byte value present) crosses the pipe and comes back
/// byte for byte, in both directions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_mib_binary_body_round_trips_byte_for_byte() {
    let pki = Pki::new();
    let server = start_server(&pki, test_pipe()).await;
    let client = start_client(&pki, "bulk", &server, test_pipe()).await;
    let body = Bytes::from(random_bytes(10 * 1024 * 1024));

    let reply = client.call(echo(body.clone()), None).await.unwrap();
    assert_eq!(reply.content_type, "application/octet-stream");
    assert_eq!(reply.body.len(), body.len());
    assert!(reply.body == body, "client to server: the body changed");

    let reply = server.call("bulk", echo(body.clone()), None).await.unwrap();
    assert_eq!(reply.body.len(), body.len());
    assert!(reply.body == body, "server to client: the body changed");
}

/// Two clients with different identities share 127.0.0.1: each is reachable by identity; by
/// IP address the server finds the one while it is alone, and refuses to guess once there are
/// two.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_behind_one_address_are_reached_by_identity_and_the_address_is_ambiguous() {
    let pki = Pki::new();
    let server = start_server(&pki, test_pipe()).await;
    let alpha = start_client(&pki, "alpha", &server, test_pipe()).await;

    let reply = server.call("127.0.0.1", whoami(), None).await.unwrap();
    assert_eq!(node_of(&reply), "alpha", "alone, the address names alpha");

    let beta = start_client(&pki, "beta", &server, test_pipe()).await;
    assert_eq!(server.registry().len(), 2);
    for name in ["alpha", "beta"] {
        let reply = server.call(name, whoami(), None).await.unwrap();
        assert_eq!(node_of(&reply), name);
        let v: serde_json::Value = serde_json::from_slice(&reply.body).unwrap();
        assert_eq!(
            v["peer"], "localhost",
            "the client sees the server's identity"
        );
    }
    match server.call("127.0.0.1", whoami(), None).await {
        Err(CallError::Ambiguous(message)) => {
            assert!(
                message.contains("alpha") && message.contains("beta"),
                "{message}"
            );
        }
        other => panic!("expected Ambiguous, got {other:?}"),
    }
    // Each client's calls arrive at the server under its own identity.
    for (client, name) in [(&alpha, "alpha"), (&beta, "beta")] {
        let reply = client.call(whoami(), None).await.unwrap();
        let v: serde_json::Value = serde_json::from_slice(&reply.body).unwrap();
        assert_eq!(v["node"], "server");
        assert_eq!(v["peer"], name);
    }
    // An identity nobody has is not connected (after the connect wait).
    match server
        .call("gamma", whoami(), Some(Duration::from_secs(1)))
        .await
    {
        Err(CallError::NotConnected(_)) => {}
        other => panic!("expected NotConnected, got {other:?}"),
    }
}

/// A second connection with an identity already connected replaces the first: the first's
/// in-flight requests (both ways) fail with PipeClosed, and calls to the identity reach the
/// newcomer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_connection_with_the_same_identity_replaces_the_old_one() {
    let pki = Pki::new();
    let server = start_server(&pki, test_pipe()).await;
    // The first client waits 5-10 s before reconnecting, so it does not take the identity
    // back during the test.
    let mut first_options = client_options(&pki, "dup", server.local_addr(), test_pipe());
    first_options.reconnect_initial = Duration::from_secs(10);
    first_options.reconnect_max = Duration::from_secs(10);
    first_options.node.handlers = test_handlers("first");
    let first = ClientNode::start(first_options).unwrap();
    let first_conn = first.wait_connected(Duration::from_secs(5)).await.unwrap();
    wait_for_client(&server, "dup").await;
    assert_eq!(
        node_of(&server.call("dup", whoami(), None).await.unwrap()),
        "first"
    );

    let up = tokio::spawn({
        let first = first.clone();
        async move { first.call(slow(10_000), None).await }
    });
    let down = tokio::spawn({
        let server = server.clone();
        async move { server.call("dup", slow(10_000), None).await }
    });
    let old = server.registry().find("dup").unwrap();
    assert!(
        wait_until(Duration::from_secs(5), || {
            let s = old.status();
            s.requests_in_flight_in == 1 && s.requests_in_flight_out == 1
        })
        .await,
        "both slow requests in flight"
    );

    // A second node with a certificate of its own for the same identity.
    let mut second_options = client_options(&pki, "dup", server.local_addr(), test_pipe());
    second_options.node.handlers = test_handlers("second");
    let second = ClientNode::start(second_options).unwrap();
    second.wait_connected(Duration::from_secs(5)).await.unwrap();

    for (what, result) in [("first to server", up), ("server to first", down)] {
        match within(Duration::from_secs(3), what, result).await.unwrap() {
            Err(CallError::PipeClosed(reason)) => {
                eprintln!("{what}: {reason}");
            }
            other => panic!("{what}: expected PipeClosed, got {other:?}"),
        }
    }
    within(
        Duration::from_secs(3),
        "the old connection ends",
        first_conn.closed(),
    )
    .await;
    assert_eq!(server.registry().len(), 1);
    let reply = server.call("dup", whoami(), None).await.unwrap();
    assert_eq!(node_of(&reply), "second");
    first.shutdown(Duration::from_millis(100)).await;
    second.shutdown(Duration::from_millis(100)).await;
}

/// The server goes away with requests in flight both ways: every one of them fails at once
/// with PipeClosed; the server comes back on the same port, and the same client reconnects by
/// itself and is served again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_restart_fails_in_flight_requests_and_the_client_reconnects() {
    let pki = Pki::new();
    let server = start_server(&pki, test_pipe()).await;
    let addr = server.local_addr();
    let client = start_client(&pki, "survivor", &server, test_pipe()).await;
    let first_conn = client.connection().unwrap();

    let mut in_flight = Vec::new();
    for _ in 0..3 {
        let client = client.clone();
        in_flight.push(tokio::spawn(async move {
            client.call(slow(10_000), None).await
        }));
        let server = server.clone();
        in_flight.push(tokio::spawn(async move {
            server.call("survivor", slow(10_000), None).await
        }));
    }
    let status = || first_conn.status();
    assert!(
        wait_until(Duration::from_secs(5), || {
            let s = status();
            s.requests_in_flight_out == 3 && s.requests_in_flight_in == 3
        })
        .await,
        "six slow requests in flight"
    );

    let stopped = Instant::now();
    within(
        Duration::from_secs(3),
        "server shutdown",
        server.shutdown(Duration::from_millis(20)),
    )
    .await;
    for task in in_flight {
        match within(Duration::from_secs(3), "an in-flight request", task)
            .await
            .unwrap()
        {
            Err(CallError::PipeClosed(_)) => {}
            other => panic!("expected PipeClosed, got {other:?}"),
        }
    }
    let failed_after = stopped.elapsed();
    assert!(failed_after < Duration::from_secs(3), "{failed_after:?}");
    within(
        Duration::from_secs(3),
        "client sees the end",
        first_conn.closed(),
    )
    .await;

    // While the server is away, a call waits for the connect wait, then says not connected.
    let mut quick = client_options(&pki, "impatient", addr, test_pipe());
    quick.node.pipe.connect_wait = Duration::from_millis(200);
    let impatient = ClientNode::start(quick).unwrap();
    match impatient.call(whoami(), None).await {
        Err(CallError::NotConnected(_)) => {}
        other => panic!("expected NotConnected, got {other:?}"),
    }
    impatient.shutdown(Duration::from_millis(10)).await;

    // The server comes back on the very same address.
    let again = ServerNode::start(server_options(&pki, addr, test_pipe()))
        .await
        .expect("rebind the same port");
    assert_eq!(again.local_addr(), addr);
    let conn = within(
        Duration::from_secs(5),
        "the client reconnects",
        client.wait_connected(Duration::from_secs(5)),
    )
    .await
    .unwrap();
    assert_ne!(conn.id(), first_conn.id());
    let reply = client.call(whoami(), None).await.unwrap();
    assert_eq!(node_of(&reply), "server");
    wait_for_client(&again, "survivor").await;
    let reply = again.call("survivor", whoami(), None).await.unwrap();
    assert_eq!(node_of(&reply), "survivor");
}

/// Once `shutdown` returns, the pipe's port is free: a new server binds the very same address
/// at once, even on a single-threaded runtime where nothing else ran in between.
#[tokio::test]
async fn the_port_is_free_as_soon_as_shutdown_returns() {
    let pki = Pki::new();
    let server = start_server(&pki, test_pipe()).await;
    let addr = server.local_addr();
    server.shutdown(Duration::from_millis(10)).await;
    assert!(!server.is_listening());
    let again = ServerNode::start(server_options(&pki, addr, test_pipe()))
        .await
        .expect("rebind the same port");
    assert_eq!(again.local_addr(), addr);
    again.shutdown(Duration::from_millis(10)).await;
}

/// The network breaks under the connection (every socket closed, no TLS goodbye): in-flight
/// requests fail with PipeClosed, and the client reconnects by itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_network_fails_in_flight_requests_and_the_client_reconnects() {
    let pki = Pki::new();
    let server = start_server(&pki, test_pipe()).await;
    let relay = Relay::start(server.local_addr()).await;
    let mut options = client_options(&pki, "cut-off", relay.addr(), test_pipe());
    options.server_name = Some(SERVER_NAME.into());
    let client = ClientNode::start(options).unwrap();
    let first_conn = client.wait_connected(Duration::from_secs(5)).await.unwrap();
    wait_for_client(&server, "cut-off").await;

    let up = tokio::spawn({
        let client = client.clone();
        async move { client.call(slow(10_000), None).await }
    });
    let down = tokio::spawn({
        let server = server.clone();
        async move { server.call("cut-off", slow(10_000), None).await }
    });
    assert!(
        wait_until(Duration::from_secs(5), || {
            let s = first_conn.status();
            s.requests_in_flight_out == 1 && s.requests_in_flight_in == 1
        })
        .await
    );

    relay.cut();
    for (what, task) in [("client to server", up), ("server to client", down)] {
        match within(Duration::from_secs(3), what, task).await.unwrap() {
            Err(CallError::PipeClosed(_)) => {}
            other => panic!("{what}: expected PipeClosed, got {other:?}"),
        }
    }
    let conn = within(
        Duration::from_secs(5),
        "the client reconnects",
        wait_for_new_connection(&client, first_conn.id()),
    )
    .await;
    assert!(first_conn.is_closed());
    assert_ne!(conn.id(), first_conn.id());
    assert_eq!(
        node_of(&client.call(whoami(), None).await.unwrap()),
        "server"
    );
}

/// A server that stops answering (the relay stops forwarding but keeps the sockets open) is
/// declared dead within the heartbeat timeout: the in-flight request fails with PipeClosed and
/// the connection ends. Once the network is back, the client reconnects.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_peer_is_declared_dead_within_the_heartbeat_timeout() {
    let pki = Pki::new();
    let pipe = heartbeat_pipe();
    let timeout = pipe.heartbeat_timeout;
    let server = start_server(&pki, pipe.clone()).await;
    let relay = Relay::start(server.local_addr()).await;
    let mut options = client_options(&pki, "quiet", relay.addr(), pipe);
    options.server_name = Some(SERVER_NAME.into());
    let client = ClientNode::start(options).unwrap();
    let conn = client.wait_connected(Duration::from_secs(5)).await.unwrap();
    wait_for_client(&server, "quiet").await;
    // Heartbeats flow while the network is fine: the round trip gets measured.
    assert!(
        wait_until(Duration::from_secs(3), || conn
            .status()
            .last_heartbeat_rtt_ms
            .is_some())
        .await,
        "no heartbeat round trip measured"
    );

    let call = tokio::spawn({
        let client = client.clone();
        async move { client.call(slow(10_000), None).await }
    });
    assert!(
        wait_until(Duration::from_secs(3), || conn
            .status()
            .requests_in_flight_out
            == 1)
        .await
    );

    relay.pause();
    let paused = Instant::now();
    match within(3 * timeout, "the in-flight request fails", call)
        .await
        .unwrap()
    {
        Err(CallError::PipeClosed(reason)) => {
            assert!(reason.contains("heartbeat"), "{reason}")
        }
        other => panic!("expected PipeClosed, got {other:?}"),
    }
    within(3 * timeout, "the connection ends", conn.closed()).await;
    let dead_after = paused.elapsed();
    assert!(
        dead_after < 3 * timeout,
        "declared dead after {dead_after:?}"
    );
    assert!(conn.close_reason().unwrap().contains("heartbeat timeout"));
    // The server, hearing nothing either, drops the client too.
    assert!(
        wait_until(3 * timeout, || server.registry().is_empty()).await,
        "the server still lists the silent client"
    );

    relay.resume();
    let again = within(
        Duration::from_secs(5),
        "the client reconnects",
        wait_for_new_connection(&client, conn.id()),
    )
    .await;
    assert_ne!(again.id(), conn.id());
    assert_eq!(
        node_of(&client.call(whoami(), None).await.unwrap()),
        "server"
    );
}

/// A body that takes longer than the heartbeat timeout to cross a slow link is not mistaken
/// for a silent peer: bytes keep arriving, so the connection lives and the body round-trips.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_body_over_a_slow_link_is_not_mistaken_for_a_dead_peer() {
    let pki = Pki::new();
    let pipe = heartbeat_pipe();
    let server = start_server(&pki, pipe.clone()).await;
    let relay = Relay::start(server.local_addr()).await;
    let mut options = client_options(&pki, "slow-link", relay.addr(), pipe.clone());
    options.server_name = Some(SERVER_NAME.into());
    let client = ClientNode::start(options).unwrap();
    let conn = client.wait_connected(Duration::from_secs(5)).await.unwrap();
    wait_for_client(&server, "slow-link").await;

    // 1 MiB at 1 MiB/s takes about a second each way: well past the 600 ms timeout.
    relay.throttle(Some(1024 * 1024));
    let body = Bytes::from(random_bytes(1024 * 1024));
    let started = Instant::now();
    let reply = client.call(echo(body.clone()), None).await.unwrap();
    let took = started.elapsed();
    assert!(reply.body == body, "the body changed");
    assert!(
        took > 2 * pipe.heartbeat_timeout,
        "the link was not slow enough to show anything ({took:?})"
    );
    assert!(!conn.is_closed(), "closed: {:?}", conn.close_reason());
    assert_eq!(client.connection().unwrap().id(), conn.id());
}

/// Graceful shutdown: a request being handled when the shutdown starts still gets its reply,
/// and then the client learns that the server is shutting down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_lets_the_request_in_hand_finish() {
    let pki = Pki::new();
    let server = start_server(&pki, test_pipe()).await;
    let client = start_client(&pki, "patient", &server, test_pipe()).await;
    let conn = client.connection().unwrap();

    let call = tokio::spawn({
        let client = client.clone();
        async move { client.call(slow(700), None).await }
    });
    let on_server = server.registry().find("patient").unwrap();
    assert!(
        wait_until(Duration::from_secs(3), || on_server
            .status()
            .requests_in_flight_in
            == 1)
        .await
    );

    let started = Instant::now();
    within(
        Duration::from_secs(5),
        "the shutdown",
        server.shutdown(Duration::from_secs(3)),
    )
    .await;
    let took = started.elapsed();
    assert!(!server.is_listening());
    // It waited for the handler, not for the whole grace period.
    assert!(took < Duration::from_millis(2500), "shutdown took {took:?}");

    let reply = call.await.unwrap().expect("the request in hand completes");
    assert_eq!(&reply.body[..], b"server slept 700 ms");
    within(
        Duration::from_secs(3),
        "the client sees the end",
        conn.closed(),
    )
    .await;
    let reason = conn.close_reason().unwrap();
    assert!(reason.contains("shutting down"), "{reason}");
}

/// Bodies up to the frame limit (16 MiB by default) cross the pipe byte for byte; a body one
/// byte over it is refused before it is sent, and a handler reply over it becomes a handler
/// failure. The connection survives all of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_up_to_the_frame_limit_cross_and_larger_ones_are_refused() {
    let limit = restpipe::wire::DEFAULT_MAX_FRAME;
    let pki = Pki::new();
    let server = start_server(&pki, test_pipe()).await;
    let client = start_client(&pki, "edge", &server, test_pipe()).await;
    let conn_id = client.connection().unwrap().id();

    let body = Bytes::from(random_bytes(limit));
    let reply = client.call(echo(body.clone()), None).await.unwrap();
    assert!(reply.body == body, "client to server: the body changed");
    let reply = server.call("edge", echo(body.clone()), None).await.unwrap();
    assert!(reply.body == body, "server to client: the body changed");

    let over = Bytes::from(vec![1u8; limit + 1]);
    assert_eq!(
        client.call(echo(over.clone()), None).await,
        Err(CallError::TooLarge {
            size: limit + 1,
            limit
        })
    );
    assert!(matches!(
        server.call("edge", echo(over), None).await,
        Err(CallError::TooLarge { .. })
    ));

    let reply = client.call(bytes_of(limit), None).await.unwrap();
    assert_eq!((reply.code, reply.body.len()), (0, limit));
    let reply = client.call(bytes_of(limit + 1), None).await.unwrap();
    assert_eq!(reply.code, restpipe::handler::codes::HANDLER_FAILED);
    assert_eq!(reply.status, Some(500));
    let v: serde_json::Value = serde_json::from_slice(&reply.body).unwrap();
    assert_eq!(v["exception"]["class"], "ReplyTooLarge");

    assert_eq!(client.connection().unwrap().id(), conn_id);
    assert_eq!(
        node_of(&client.call(whoami(), None).await.unwrap()),
        "server"
    );
}

/// Each side announces its frame limit in its hello; the smaller one applies to both
/// directions, so a body the far side would refuse is refused here, before it is sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_smaller_frame_limit_of_the_two_sides_applies() {
    let small = 64 * 1024;
    let pki = Pki::new();
    let server = start_server(
        &pki,
        restpipe::PipeConfig {
            max_frame: small,
            ..test_pipe()
        },
    )
    .await;
    let client = start_client(&pki, "big-limit", &server, test_pipe()).await;
    let conn_id = client.connection().unwrap().id();

    let reply = client.call(echo(vec![9u8; small]), None).await.unwrap();
    assert_eq!(reply.body.len(), small);
    assert_eq!(
        client.call(echo(vec![9u8; small + 1]), None).await,
        Err(CallError::TooLarge {
            size: small + 1,
            limit: small
        })
    );
    // The client's reply to the server is held to the server's limit too.
    let reply = server
        .call("big-limit", bytes_of(small + 1), None)
        .await
        .unwrap();
    assert_eq!(reply.code, restpipe::handler::codes::HANDLER_FAILED);
    assert_eq!(client.connection().unwrap().id(), conn_id);
}

/// A request whose reply does not come within its deadline fails with Timeout; the far
/// handler is given the same deadline (and stopped at it), and the connection stays up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_past_its_deadline_times_out_and_the_connection_stays_up() {
    let pki = Pki::new();
    let server = start_server(&pki, test_pipe()).await;
    let client = start_client(&pki, "hasty", &server, test_pipe()).await;
    let conn_id = client.connection().unwrap().id();
    let on_server = server.registry().find("hasty").unwrap();

    let started = Instant::now();
    let deadline = Duration::from_millis(200);
    match client.call(slow(5000), Some(deadline)).await {
        Err(CallError::Timeout(d)) => assert_eq!(d, deadline),
        // The far side stops the handler at the same deadline; when both timers fire in the
        // same tick, its 504 reply can win the race. Either way the caller answers 504.
        Ok(reply) => {
            assert_eq!(reply.status, Some(504), "{reply:?}");
            let v: serde_json::Value = serde_json::from_slice(&reply.body).unwrap();
            assert_eq!(v["exception"]["class"], "DeadlineExceeded");
        }
        Err(other) => panic!("expected Timeout, got {other:?}"),
    }
    assert!(started.elapsed() < Duration::from_secs(2));
    assert!(
        wait_until(Duration::from_secs(2), || on_server
            .status()
            .requests_in_flight_in
            == 0)
        .await,
        "the server kept running the handler past the deadline"
    );
    assert_eq!(client.connection().unwrap().id(), conn_id);
    let reply = client.call(slow(10), None).await.unwrap();
    assert_eq!(&reply.body[..], b"server slept 10 ms");
}

/// More requests than a side takes at once: the excess is answered Overloaded at once, the
/// others are served, and the connection stays up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_over_the_in_flight_limit_are_answered_overloaded() {
    let pki = Pki::new();
    let server = start_server(
        &pki,
        restpipe::PipeConfig {
            max_in_flight: 2,
            ..test_pipe()
        },
    )
    .await;
    let client = start_client(&pki, "eager", &server, test_pipe()).await;
    let conn = client.connection().unwrap();

    let mut calls = Vec::new();
    for _ in 0..2 {
        let client = client.clone();
        calls.push(tokio::spawn(
            async move { client.call(slow(1000), None).await },
        ));
    }
    assert!(
        wait_until(Duration::from_secs(3), || conn
            .status()
            .requests_in_flight_out
            == 2)
        .await
    );
    // The server takes two at once; the third is refused by the server, not queued.
    let started = Instant::now();
    match client.call(slow(1000), None).await {
        Err(CallError::Overloaded(message)) => assert!(message.contains('2'), "{message}"),
        other => panic!("expected Overloaded, got {other:?}"),
    }
    assert!(started.elapsed() < Duration::from_millis(900));
    for call in calls {
        call.await.unwrap().unwrap();
    }
    assert!(!conn.is_closed());
    client.call(whoami(), None).await.unwrap();
}

/// A handler that fails and a handler that does not exist are answered across the pipe
/// (code 251 with the exception, code 255), not as broken connections.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handler_failures_and_missing_handlers_come_back_as_replies() {
    use restpipe::handler::{codes, Request};
    let pki = Pki::new();
    let server = start_server(&pki, test_pipe()).await;
    let client = start_client(&pki, "asker", &server, test_pipe()).await;

    let reply = client
        .call(Request::new("GET", "fail"), None)
        .await
        .unwrap();
    assert_eq!(
        (reply.code, reply.status),
        (codes::HANDLER_FAILED, Some(500))
    );
    let v: serde_json::Value = serde_json::from_slice(&reply.body).unwrap();
    assert_eq!(v["exception"]["message"], "failed on purpose");

    let reply = server
        .call("asker", Request::new("DELETE", "nothing/here"), None)
        .await
        .unwrap();
    assert_eq!((reply.code, reply.status), (codes::NO_HANDLER, Some(404)));
    let v: serde_json::Value = serde_json::from_slice(&reply.body).unwrap();
    assert!(v["error"].as_str().unwrap().contains("delete_nothing_here"));
}

/// A client's graceful shutdown lets the server's request in hand finish, then leaves: the
/// server drops it from its registry, and it does not come back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_shutdown_lets_the_request_in_hand_finish() {
    let pki = Pki::new();
    let server = start_server(&pki, test_pipe()).await;
    let client = start_client(&pki, "leaving", &server, test_pipe()).await;
    let conn = client.connection().unwrap();

    let call = tokio::spawn({
        let server = server.clone();
        async move { server.call("leaving", slow(500), None).await }
    });
    assert!(
        wait_until(Duration::from_secs(3), || conn
            .status()
            .requests_in_flight_in
            == 1)
        .await
    );
    within(
        Duration::from_secs(5),
        "the client shutdown",
        client.shutdown(Duration::from_secs(3)),
    )
    .await;
    let reply = call.await.unwrap().unwrap();
    assert_eq!(&reply.body[..], b"leaving slept 500 ms");
    assert!(conn.is_closed());
    assert!(wait_until(Duration::from_secs(3), || server.registry().is_empty()).await);
    assert!(!client.is_connected());
}

/// Wait for a live connection other than the one with id `old`.
async fn wait_for_new_connection(
    client: &ClientNode,
    old: u64,
) -> restpipe::connection::Connection {
    loop {
        if let Ok(conn) = client.wait_connected(Duration::from_secs(5)).await {
            if conn.id() != old {
                return conn;
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
