//! Streamed bodies through the pipe, in process, over real TLS on 127.0.0.1: bodies far over
//! the frame limit both ways, byte for byte; a caller that gives up stops the far handler's
//! stream; a source that fails mid-way reaches the caller as an incomplete body; the windows
//! bound what a node holds; a release-1 peer still gets whole bodies.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::atomic::Ordering;
use std::time::Duration;

use restpipe::handler::{BodyError, BodyStream, Request};
use restpipe::{PipeConfig, ServerNode};
use restpipe_testkit::certs::*;
use restpipe_testkit::nodes::*;
use restpipe_testkit::wait::*;

/// A pipe whose frame limit is small (1 MiB), so that the bodies below are many times over it.
fn small_frames() -> PipeConfig {
    PipeConfig {
        max_frame: 1024 * 1024,
        ..test_pipe()
    }
}

fn check(n: u64) -> (Request, BodyStream) {
    let request = Request::new("POST", "check");
    (request, BodyStream::new(pattern_stream(n, None), Some(n)))
}

fn checked(reply: &restpipe::handler::Reply) -> (u64, u64) {
    let v: serde_json::Value = serde_json::from_slice(&reply.body).unwrap();
    (
        v["bytes"].as_u64().unwrap(),
        v["mismatches"].as_u64().unwrap(),
    )
}

async fn read_all(mut body: BodyStream) -> Result<(u64, u64), BodyError> {
    let (mut bytes, mut mismatches) = (0u64, 0u64);
    while let Some(chunk) = body.chunk().await {
        let chunk = chunk?;
        for (i, b) in chunk.iter().enumerate() {
            if *b != pattern(bytes + i as u64) {
                mismatches += 1;
            }
        }
        bytes += chunk.len() as u64;
    }
    Ok((bytes, mismatches))
}

/// 64 MiB up and 64 MiB down, both ways at once and in both directions, over a pipe whose
/// frame limit is 1 MiB: every byte arrives, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_far_over_the_frame_limit_cross_both_ways() {
    const N: u64 = 64 * 1024 * 1024;
    let pki = Pki::new();
    let server = start_server(&pki, small_frames()).await;
    let client = start_client(&pki, "worker-1", &server, small_frames()).await;

    let up = {
        let client = client.clone();
        tokio::spawn(async move {
            let (request, body) = check(N);
            client.call_with_body(request, Some(body), None).await
        })
    };
    let down_to_client = {
        let server = server.clone();
        tokio::spawn(async move {
            let (request, body) = check(N);
            server
                .call_with_body("worker-1", request, Some(body), None)
                .await
        })
    };
    let mut reply = client
        .call(
            Request::new("GET", "stream").with_parameters(vec![N.to_string()]),
            None,
        )
        .await
        .unwrap();
    let stream = reply.stream.take().expect("a streamed reply");
    assert_eq!(stream.length(), Some(N));
    assert_eq!(read_all(stream).await.unwrap(), (N, 0));

    // A HEAD runs the GET handler: its reply says the length and carries no byte.
    let mut head = client
        .call(
            Request::new("HEAD", "stream").with_parameters(vec![N.to_string()]),
            None,
        )
        .await
        .unwrap();
    let stream = head.stream.take().expect("a stream with the length");
    assert_eq!(stream.length(), Some(N));
    assert_eq!(read_all(stream).await.unwrap(), (0, 0));

    assert_eq!(checked(&up.await.unwrap().unwrap()), (N, 0));
    assert_eq!(checked(&down_to_client.await.unwrap().unwrap()), (N, 0));
}

/// A caller that drops a streamed reply mid-way cancels it: the far handler's stream is
/// dropped, and the connection carries on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_that_gives_up_stops_the_far_stream() {
    let pki = Pki::new();
    let server = start_server(&pki, test_pipe()).await;
    let client = start_client(&pki, "worker-1", &server, test_pipe()).await;

    let mut reply = client
        .call(Request::new("GET", "endless"), None)
        .await
        .unwrap();
    let mut stream = reply.stream.take().expect("a streamed reply");
    for _ in 0..20 {
        stream.chunk().await.unwrap().unwrap();
    }
    assert_eq!(ENDLESS_ALIVE.load(Ordering::SeqCst), 1);
    drop(stream);
    let stopped = wait_until(Duration::from_secs(5), || {
        ENDLESS_ALIVE.load(Ordering::SeqCst) == 0
    })
    .await;
    assert!(stopped, "the far handler's stream still runs");
    // The connection is unharmed.
    let reply = client.call(whoami(), None).await.unwrap();
    assert_eq!(node_of(&reply), "server");
}

/// A reply whose source fails mid-way reaches the caller as an error, after the bytes that
/// were sent, never as a normal end; the same for a request body, which the handler sees
/// incomplete.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_that_fails_midway_is_an_incomplete_body() {
    let pki = Pki::new();
    let server = start_server(&pki, test_pipe()).await;
    let client = start_client(&pki, "worker-1", &server, test_pipe()).await;

    let request =
        Request::new("GET", "stream").with_parameters(vec!["1000000".into(), "300000".into()]);
    let mut reply = client.call(request, None).await.unwrap();
    let mut stream = reply.stream.take().unwrap();
    let mut got = 0u64;
    let err = loop {
        match stream.chunk().await {
            Some(Ok(chunk)) => got += chunk.len() as u64,
            Some(Err(e)) => break e,
            None => panic!("a failed body ended normally after {got} bytes"),
        }
    };
    assert_eq!(got, 300_000);
    assert!(matches!(err, BodyError::Aborted(_)), "{err:?}");

    let body = BodyStream::new(pattern_stream(1_000_000, Some(200_000)), None);
    let reply = client
        .call_with_body(Request::new("POST", "check"), Some(body), None)
        .await
        .unwrap();
    assert_eq!(
        reply.code,
        251,
        "{:?}",
        String::from_utf8_lossy(&reply.body)
    );
    assert!(String::from_utf8_lossy(&reply.body).contains("cut short"));
}

/// A body over the far node's `--max-body` is refused with 413 before its handler runs when
/// its length is announced, and cut off where it goes over when it is not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_far_node_bounds_request_bodies() {
    let pki = Pki::new();
    let limited = PipeConfig {
        max_body: 1_000_000,
        ..test_pipe()
    };
    let server = start_server(&pki, limited).await;
    let client = start_client(&pki, "worker-1", &server, test_pipe()).await;

    let (request, body) = check(2_000_000);
    let reply = client
        .call_with_body(request, Some(body), None)
        .await
        .unwrap();
    assert_eq!(reply.status, Some(413));

    let body = BodyStream::new(pattern_stream(2_000_000, None), None);
    let reply = client
        .call_with_body(Request::new("POST", "check"), Some(body), None)
        .await
        .unwrap();
    assert_eq!(
        reply.status,
        Some(413),
        "{}",
        String::from_utf8_lossy(&reply.body)
    );

    let (request, body) = check(1_000_000);
    let reply = client
        .call_with_body(request, Some(body), None)
        .await
        .unwrap();
    assert_eq!(checked(&reply), (1_000_000, 0));
}

/// The connection that dies mid-reply ends the body with an error that names the cause.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_lost_midway_is_an_incomplete_body() {
    let pki = Pki::new();
    let server = start_server(&pki, test_pipe()).await;
    let client = start_client(&pki, "worker-1", &server, test_pipe()).await;

    let mut reply = client
        .call(Request::new("GET", "endless"), None)
        .await
        .unwrap();
    let mut stream = reply.stream.take().unwrap();
    stream.chunk().await.unwrap().unwrap();
    client.connection().unwrap().close("closed on purpose");
    let err = loop {
        match stream.chunk().await {
            Some(Ok(_)) => continue,
            Some(Err(e)) => break e,
            None => panic!("a cut body ended normally"),
        }
    };
    assert!(err.to_string().contains("closed on purpose"), "{err}");
}

/// A peer of release 1 (hello version 1, no streams) still gets what it understands: bodies
/// whole in their frames, `HEAD` as `GET`, no headers and no version-2 frame, both when this
/// node calls it with a streamed body and when it calls a handler that replies with a stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_1_peer_gets_whole_bodies_and_no_version_2_frame() {
    use restpipe::handler::Headers;
    use restpipe_testkit::raw::proto::{self, frame::Kind, Frame};
    use restpipe_testkit::raw::TlsPeer;

    let pki = Pki::new();
    let server = start_server(&pki, test_pipe()).await;
    let mut peer = TlsPeer::connect_tls(server.local_addr(), &pki.connector("old"))
        .await
        .unwrap();
    let hello = peer.hello("old", 1).await;
    assert!(hello.min_protocol_version <= 1);
    wait_for_client(&server, "old").await;
    let status = server
        .clients()
        .into_iter()
        .find(|c| c.identity == "old")
        .unwrap();
    assert_eq!(status.protocol_version, 1);

    // The server calls the old peer with a streamed 300 KB body, a HEAD and a header.
    let call = tokio::spawn({
        let server = server.clone();
        async move {
            let request = Request {
                headers: Headers::new().with("range", "bytes=0-1"),
                ..Request::new("HEAD", "check")
            };
            let body = BodyStream::new(pattern_stream(300_000, None), None);
            server
                .call_with_body("old", request, Some(body), None)
                .await
        }
    });
    let (id, event) = match peer.recv().await.unwrap() {
        Some(Frame {
            id,
            kind: Some(Kind::Event(event)),
        }) => (id, event),
        other => panic!("expected an event, got {other:?}"),
    };
    assert_eq!(event.verb, "GET", "HEAD goes as GET to a release-1 peer");
    assert!(!event.streamed && event.headers.is_empty());
    assert_eq!(event.body.len(), 300_000);
    assert!(event
        .body
        .iter()
        .enumerate()
        .all(|(i, b)| *b == pattern(i as u64)));
    let reply = Frame {
        id,
        kind: Some(Kind::Reply(proto::Reply {
            content_type: "text/plain".into(),
            body: b"old and fine".to_vec().into(),
            ..Default::default()
        })),
    };
    peer.send(&reply).await.unwrap();
    let answer = call.await.unwrap().unwrap();
    assert_eq!(&answer.body[..], b"old and fine");

    // The old peer calls a handler that replies with a stream: it gets the body whole.
    let reply = ask_stream(&mut peer, 1, 200_000).await;
    assert!(!reply.streamed && reply.content_length.is_none());
    assert_eq!(reply.body.len(), 200_000);
    assert!(reply
        .body
        .iter()
        .enumerate()
        .all(|(i, b)| *b == pattern(i as u64)));
}

/// Sends request `id` for a `get_stream` of `size` bytes, and returns its reply.
async fn ask_stream(
    peer: &mut restpipe_testkit::raw::TlsPeer,
    id: u64,
    size: u64,
) -> restpipe_testkit::raw::proto::Reply {
    use restpipe_testkit::raw::event_frame;
    use restpipe_testkit::raw::proto::{frame::Kind, Frame};
    peer.send(&event_frame(
        id,
        Request::new("GET", "stream").with_parameters(vec![size.to_string()]),
    ))
    .await
    .unwrap();
    match peer.recv().await.unwrap() {
        Some(Frame {
            id: i,
            kind: Some(Kind::Reply(reply)),
        }) if i == id => reply,
        other => panic!("expected the reply to {id}, got {other:?}"),
    }
}

/// A hostile version-2 peer: credit far past any window (cut to the window, no overflow),
/// data, credit and cancel for requests that do not exist (ignored), and the connection goes
/// on; then one data frame past a body's window, which ends the connection, and the server
/// serves the next one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_breaks_flow_control_is_cut_off_and_harms_nothing_else() {
    use restpipe_testkit::raw::proto::{self, frame::Kind, Frame};
    use restpipe_testkit::raw::{event_frame, TlsPeer};

    let pki = Pki::new();
    let server = start_server(&pki, test_pipe()).await;
    let mut peer = TlsPeer::connect_tls(server.local_addr(), &pki.connector("rogue"))
        .await
        .unwrap();
    peer.hello("rogue", restpipe::wire::PROTOCOL_VERSION).await;
    wait_for_client(&server, "rogue").await;

    let frame = |id, kind| Frame {
        id,
        kind: Some(kind),
    };
    for f in [
        frame(
            0,
            Kind::Credit(proto::Credit {
                bytes: u64::MAX,
                from_caller: false,
            }),
        ),
        frame(
            99,
            Kind::Credit(proto::Credit {
                bytes: u64::MAX,
                from_caller: true,
            }),
        ),
        frame(77, Kind::Cancel(proto::Cancel { from_caller: true })),
        frame(
            55,
            Kind::Data(proto::Data {
                chunk: vec![1u8; 1000].into(),
                from_caller: true,
                end: true,
                abort: String::new(),
            }),
        ),
    ] {
        peer.send(&f).await.unwrap();
    }
    peer.send(&event_frame(1, whoami())).await.unwrap();
    match peer.recv().await.unwrap() {
        Some(Frame {
            id: 1,
            kind: Some(Kind::Reply(reply)),
        }) => assert!(String::from_utf8_lossy(&reply.body).contains("server")),
        other => panic!("expected the reply, got {other:?}"),
    }

    // A streamed request body whose first data frame is past the body's window.
    let mut event = event_frame(2, Request::new("POST", "check"));
    if let Some(Kind::Event(e)) = event.kind.as_mut() {
        e.streamed = true;
    }
    peer.send(&event).await.unwrap();
    let over = restpipe::wire::STREAM_WINDOW as usize + 1;
    peer.send(&frame(
        2,
        Kind::Data(proto::Data {
            chunk: vec![7u8; over].into(),
            from_caller: true,
            end: false,
            abort: String::new(),
        }),
    ))
    .await
    .unwrap();
    peer.expect_end().await;

    // The server is unharmed.
    let client = start_client(&pki, "worker-1", &server, test_pipe()).await;
    assert_eq!(
        node_of(&client.call(whoami(), None).await.unwrap()),
        "server"
    );
}

/// Reads the frames of `peer` until `bytes` more of reply body `id` have come, and returns
/// the largest chunk seen. Fails on anything else but a reply to a `whoami` on the way.
async fn read_body_bytes(peer: &mut restpipe_testkit::raw::TlsPeer, id: u64, bytes: u64) -> usize {
    use restpipe_testkit::raw::proto::{frame::Kind, Frame};
    let (mut got, mut largest) = (0u64, 0usize);
    while got < bytes {
        match peer.recv().await.unwrap() {
            Some(Frame {
                id: i,
                kind: Some(Kind::Data(data)),
            }) if i == id && !data.end => {
                got += data.chunk.len() as u64;
                largest = largest.max(data.chunk.len());
            }
            other => panic!("expected data of body {id}, got {other:?}"),
        }
    }
    assert_eq!(got, bytes, "more than the room given was sent");
    largest
}

/// Sends a `whoami` as request `id` and reads up to its reply: the body data that comes
/// first (none, when the sender keeps to its window).
async fn whoami_between(peer: &mut restpipe_testkit::raw::TlsPeer, id: u64) -> u64 {
    use restpipe_testkit::raw::event_frame;
    use restpipe_testkit::raw::proto::{frame::Kind, Frame};
    peer.send(&event_frame(id, whoami())).await.unwrap();
    let mut data = 0u64;
    loop {
        match peer.recv().await.unwrap() {
            Some(Frame {
                id: i,
                kind: Some(Kind::Reply(_)),
            }) if i == id => return data,
            Some(Frame {
                kind: Some(Kind::Data(d)),
                ..
            }) => data += d.chunk.len() as u64,
            other => panic!("expected the reply to {id}, got {other:?}"),
        }
    }
}

/// A peer of version 2 that offers `features` asks the server for a streamed 16 MiB body
/// (request 1), reads the whole window of it without crediting any, and then calls
/// `whoami` (request 2) on the same connection.
async fn window_read_then_a_call(
    pki: &Pki,
    server: &ServerNode,
    features: &[&str],
) -> restpipe_testkit::raw::TlsPeer {
    use restpipe_testkit::raw::TlsPeer;
    let window = restpipe::wire::STREAM_WINDOW;
    let mut peer = TlsPeer::connect_tls(server.local_addr(), &pki.connector("edge"))
        .await
        .unwrap();
    peer.hello_offering("edge", 2, features).await;
    wait_for_client(server, "edge").await;
    let size = 16 * 1024 * 1024u64;
    let reply = ask_stream(&mut peer, 1, size).await;
    assert!(reply.streamed && reply.content_length == Some(size));
    // Alone on its connection, the body uses its whole window, in chunks of up to 256 KiB.
    let largest = read_body_bytes(&mut peer, 1, window).await;
    assert_eq!(largest, restpipe::wire::DATA_CHUNK);
    assert_eq!(whoami_between(&mut peer, 2).await, 0);
    peer
}

fn credit(id: u64, bytes: u64) -> restpipe_testkit::raw::proto::Frame {
    use restpipe_testkit::raw::proto::{self, frame::Kind, Frame};
    Frame {
        id,
        kind: Some(Kind::Credit(proto::Credit {
            bytes,
            from_caller: true,
        })),
    }
}

/// While other requests share its connection, a body keeps at most the shared window in
/// flight, in smaller chunks, to a peer that offers `fine-credit`: the window's worth read
/// and credited back brings 256 KiB, not 2 MiB, and a call made then finds nothing more of
/// the body ahead of its reply.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_keeps_to_the_shared_window_while_calls_share_its_connection() {
    use restpipe::wire;
    let pki = Pki::new();
    let server = start_server(&pki, test_pipe()).await;
    let mut peer = window_read_then_a_call(&pki, &server, &[wire::FINE_CREDIT]).await;

    peer.send(&credit(1, wire::STREAM_WINDOW)).await.unwrap();
    let largest = read_body_bytes(&mut peer, 1, wire::SHARED_WINDOW).await;
    assert_eq!(largest, wire::SHARED_CHUNK);
    assert_eq!(whoami_between(&mut peer, 3).await, 0);

    // Credited step by step as it is read, the body goes on within the shared window.
    let mut moved = 0u64;
    while moved < 4 * wire::STREAM_WINDOW {
        peer.send(&credit(1, wire::CREDIT_STEP)).await.unwrap();
        read_body_bytes(&mut peer, 1, wire::CREDIT_STEP).await;
        moved += wire::CREDIT_STEP;
    }
    assert_eq!(whoami_between(&mut peer, 4).await, 0);
}

/// A release-2 peer that does not offer `fine-credit` credits a quarter of the window at a
/// time: the body keeps the whole window for it, calls or not, so that credit never falls
/// short of what the body waits for.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_without_fine_credit_keeps_the_whole_window() {
    use restpipe::wire;
    let pki = Pki::new();
    let server = start_server(&pki, test_pipe()).await;
    let mut peer = window_read_then_a_call(&pki, &server, &[]).await;
    let quarter = wire::STREAM_WINDOW / 4;
    for _ in 0..8 {
        peer.send(&credit(1, quarter)).await.unwrap();
        let largest = read_body_bytes(&mut peer, 1, quarter).await;
        assert_eq!(largest, wire::DATA_CHUNK);
    }
}
