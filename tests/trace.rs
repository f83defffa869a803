//! Trace context across the pipe: a W3C `traceparent` that arrives at a front door (or one
//! made there) crosses with the event; the far node's log lines for the request carry it, and
//! `forward` passes it upstream; every response carries `X-Request-Id`, the same id both
//! nodes log for that request. A peer of the previous release, which does not list the
//! `trace-context` feature, gets events without it.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use restpipe_testkit::certs::*;
use restpipe_testkit::http::*;
use restpipe_testkit::procs::*;
use restpipe_testkit::raw::proto::frame::Kind;
use restpipe_testkit::raw::TlsPeer;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

/// An upstream that answers `ok` to every request and hands over each request's head.
async fn recording_upstream() -> (String, mpsc::UnboundedReceiver<String>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}/", listener.local_addr().unwrap());
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") && head.len() < 64 * 1024 {
                    if socket.read(&mut byte).await.unwrap_or(0) == 0 {
                        return;
                    }
                    head.push(byte[0]);
                }
                let _ = tx.send(String::from_utf8_lossy(&head).into_owned());
                let _ = socket
                    .write_all(
                        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok",
                    )
                    .await;
            });
        }
    });
    (base, rx)
}

/// The value of `name` in a raw request head, case-insensitively.
fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().find_map(|line| {
        let (key, value) = line.split_once(':')?;
        key.eq_ignore_ascii_case(name).then(|| value.trim())
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trace_context_crosses_the_pipe_and_names_the_request_on_both_nodes() {
    let certs = Certs::new();
    let (upstream, mut heads) = recording_upstream().await;
    let route = format!("hop={upstream}");
    // Debug logs, through the file: the per-request lines are debug lines.
    let config = certs.dir().join("debug.toml");
    std::fs::write(&config, "debug = true\n").unwrap();
    let config = config.to_string_lossy().into_owned();
    let (mut server, pipe) = start_server(
        &certs,
        &[
            "--config",
            &config,
            "--handlers",
            "time,forward",
            "--forward",
            &route,
        ],
    )
    .await;
    let cert = certs.client("traced");
    let mut client = Node::start(
        certs.dir(),
        "traced",
        client_args(&certs, &cert, loopback(pipe), &["--config", &config]),
    )
    .await;
    client
        .wait_line(&["connected"], Duration::from_secs(20))
        .await;
    let http = http_client();

    // The caller's traceparent crosses, reaches the upstream, and names the request.
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let traceparent = format!("00-{trace_id}-00f067aa0ba902b7-01");
    let response = http
        .get(client.url("/server/hop"))
        .header("traceparent", &traceparent)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let request_id = response.headers()["x-request-id"]
        .to_str()
        .unwrap()
        .to_string();
    assert_eq!(request_id, trace_id);
    let head = tokio::time::timeout(Duration::from_secs(5), heads.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        header(&head, "traceparent"),
        Some(traceparent.as_str()),
        "{head}"
    );
    assert_eq!(header(&head, "x-request-id"), Some(trace_id), "{head}");
    let needle = format!("request_id={request_id}");
    client
        .wait_line(&[&needle, "answered", "status=200"], Duration::from_secs(5))
        .await;
    server
        .wait_line(
            &[&needle, &format!("trace_id={trace_id}"), "handled"],
            Duration::from_secs(5),
        )
        .await;

    // No traceparent, an X-Request-Id of the caller's: a new trace, the caller's id, on both
    // nodes, in the other direction too.
    let response = http
        .get(server.url("/client/traced/time"))
        .header("x-request-id", "order-17")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-request-id"], "order-17");
    server
        .wait_line(&["request_id=order-17", "answered"], Duration::from_secs(5))
        .await;
    client
        .wait_line(&["request_id=order-17", "handled"], Duration::from_secs(5))
        .await;

    // A refusal that never crosses carries an id too.
    let response = http.get(client.url("/nope")).send().await.unwrap();
    assert_eq!(response.status(), 404);
    let id = response.headers()["x-request-id"].to_str().unwrap();
    assert_eq!(id.len(), 32, "{id}");
}

/// A peer of the previous release lists no `trace-context` feature: the events it gets carry
/// no trace fields, and it is served as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_without_the_feature_gets_events_without_trace_context() {
    let certs = Certs::new();
    let (server, _) = start_server(&certs, &[]).await;
    let mut peer = TlsPeer::connect_tls(server.pipe_addr(), &certs.connector("old"))
        .await
        .unwrap();
    let hello = peer.hello("old", 1).await;
    assert!(
        hello.features.iter().any(|f| f == "trace-context"),
        "{hello:?}"
    );
    let http = http_client();
    let call = {
        let (http, url) = (http.clone(), server.url("/client/old/time"));
        tokio::spawn(async move {
            http.get(url)
                .header(
                    "traceparent",
                    "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                )
                .send()
                .await
                .unwrap()
                .status()
        })
    };
    let frame = peer.recv().await.unwrap().expect("an event");
    let Some(Kind::Event(event)) = frame.kind else {
        panic!("{frame:?}")
    };
    assert_eq!(event.traceparent, "");
    assert_eq!(event.request_id, "");
    peer.send(&restpipe_testkit::raw::proto::Frame {
        id: frame.id,
        kind: Some(Kind::Reply(restpipe_testkit::raw::proto::Reply {
            content_type: "text/plain".into(),
            body: "old time".into(),
            ..Default::default()
        })),
    })
    .await
    .unwrap();
    assert_eq!(call.await.unwrap(), 200);
}
