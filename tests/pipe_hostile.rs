//! Peers that misbehave: refused handshakes, frames over the limit, malformed frames, unknown
//! message types and a foreign protocol version. Each costs only its own connection: after
//! each, a request over an existing good connection still succeeds on that same connection.

// The counting allocator below needs `unsafe impl GlobalAlloc`; it only delegates to the
// system allocator.
#![allow(unsafe_code)]
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use restpipe::{CallError, ClientNode, ServerNode};
use restpipe_testkit::certs::*;
use restpipe_testkit::logs::*;
use restpipe_testkit::nodes::*;
use restpipe_testkit::raw::proto::{self, frame::Kind, Frame};
use restpipe_testkit::raw::*;
use restpipe_testkit::wait::*;

/// The system allocator, remembering the largest single allocation asked of it, so that a test
/// can show that a frame announcing 2 GiB was refused without reserving its size.
struct Counting;

static LARGEST_ALLOCATION: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LARGEST_ALLOCATION.fetch_max(layout.size(), Ordering::Relaxed);
        // SAFETY: same contract as the caller's.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as the caller's.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        LARGEST_ALLOCATION.fetch_max(layout.size(), Ordering::Relaxed);
        // SAFETY: same contract as the caller's.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LARGEST_ALLOCATION.fetch_max(new_size, Ordering::Relaxed);
        // SAFETY: same contract as the caller's.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// A server with one good client connected.
struct Setup {
    pki: Pki,
    server: ServerNode,
    good: ClientNode,
    /// The good connection's id on the client side.
    good_conn: u64,
    /// The good connection's id on the server side.
    good_on_server: u64,
}

impl Setup {
    async fn new() -> Setup {
        Setup::with_pipe(test_pipe()).await
    }

    async fn with_pipe(pipe: restpipe::PipeConfig) -> Setup {
        let pki = Pki::new();
        let server = start_server(&pki, pipe).await;
        let good = start_client(&pki, "good", &server, test_pipe()).await;
        let good_conn = good.connection().unwrap().id();
        let good_on_server = server.registry().find("good").unwrap().id();
        Setup {
            pki,
            server,
            good,
            good_conn,
            good_on_server,
        }
    }

    /// The good connection is the same one as at the start, and serves both ways.
    async fn assert_good_untouched(&self) {
        let conn = self
            .good
            .connection()
            .expect("the good client is connected");
        assert_eq!(
            conn.id(),
            self.good_conn,
            "the good connection was replaced"
        );
        let reply = self.good.call(echo("still here"), None).await.unwrap();
        assert_eq!(&reply.body[..], b"still here");
        let reply = self.server.call("good", whoami(), None).await.unwrap();
        assert_eq!(node_of(&reply), "good");
        assert_eq!(self.good.connection().unwrap().id(), self.good_conn);
        let on_server = self.server.registry().find("good").unwrap();
        assert_eq!(
            on_server.id(),
            self.good_on_server,
            "the server replaced it"
        );
    }
}

/// A TLS peer that the server refused: its first read fails or ends without a single frame.
async fn assert_refused(peer: std::io::Result<TlsPeer>) {
    let Ok(mut peer) = peer else {
        return; // refused during the handshake itself
    };
    let frames = peer.expect_end().await;
    assert!(frames.is_empty(), "a refused peer got frames: {frames:?}");
}

/// Handshakes the server refuses: no client certificate, a client certificate from another
/// CA, plain bytes that are not TLS. And one the client refuses: a server whose certificate
/// does not carry the name the client expects. Each leaves the good connection untouched, and
/// each refusal is logged with its reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_handshakes_leave_the_good_connection_untouched() {
    let logs = logs();
    let setup = Setup::new().await;
    let addr = setup.server.local_addr();

    // No client certificate at all.
    let connector = setup.pki.connector_without_client_cert();
    let peer = TlsPeer::connect_tls(addr, &connector).await;
    let port = peer.as_ref().map(|p| p.local_addr().to_string()).ok();
    assert_refused(peer).await;
    if let Some(port) = port {
        assert!(
            logs.wait_for_line(&["handshake refused", &port, "reason=no_client_cert"])
                .await,
            "refusal not logged"
        );
    }
    setup.assert_good_untouched().await;

    // A client certificate from another CA, and one from a forged CA that copies our CA's
    // name but not its key. The peer trusts the right CA, so only the server can refuse. Its
    // identity is "good", the one already connected, which must not be replaced.
    for (ca_name, reason) in [
        ("some other CA", "reason=unknown_issuer"),
        ("restpipe test CA", "reason=bad_certificate"),
    ] {
        let foreign = Pki::with_ca_name(ca_name).client_cert("good");
        let material = restpipe::TlsMaterial::from_pem(
            setup.pki.ca_pem(),
            &foreign.cert_pem,
            &foreign.key_pem,
        )
        .unwrap();
        let peer = TlsPeer::connect_tls(addr, &material.connector().unwrap()).await;
        let port = peer.as_ref().map(|p| p.local_addr().to_string()).ok();
        assert_refused(peer).await;
        if let Some(port) = port {
            assert!(
                logs.wait_for_line(&["handshake refused", &port, reason])
                    .await,
                "refusal by {ca_name} not logged with {reason}"
            );
        }
        setup.assert_good_untouched().await;
        // A whole client node with that certificate never connects either.
        let mut options = client_options(&setup.pki, "good", addr, test_pipe());
        options.node.tls = material;
        options.node.pipe.connect_wait = Duration::from_millis(500);
        let intruder = ClientNode::start(options).unwrap();
        match intruder.call(whoami(), None).await {
            Err(CallError::NotConnected(_)) => {}
            other => panic!("expected NotConnected, got {other:?}"),
        }
        intruder.shutdown(Duration::from_millis(10)).await;
        setup.assert_good_untouched().await;
    }

    // The client refuses a server whose name does not match.
    let mut options = client_options(&setup.pki, "misdirected", addr, test_pipe());
    options.server_name = Some("wrong.example".into());
    options.node.pipe.connect_wait = Duration::from_millis(500);
    let misdirected = ClientNode::start(options).unwrap();
    match misdirected.call(whoami(), None).await {
        Err(CallError::NotConnected(_)) => {}
        other => panic!("expected NotConnected, got {other:?}"),
    }
    assert!(!misdirected.is_connected());
    misdirected.shutdown(Duration::from_millis(10)).await;
    setup.assert_good_untouched().await;

    // Plain bytes that are not TLS.
    let mut raw = RawPeer::connect_tcp(addr).await.unwrap();
    let port = raw.local_addr().to_string();
    raw.send_raw(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await
        .unwrap();
    raw.send_raw(&random_bytes(4096)).await.unwrap();
    raw.expect_end().await;
    assert!(
        logs.wait_for_line(&["handshake refused", &port]).await,
        "refusal not logged"
    );
    setup.assert_good_untouched().await;
}

/// A frame that announces 2 GiB, after a correct hello over an authenticated connection,
/// closes that connection with a logged reason, without the server reserving its size.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frame_over_the_limit_closes_only_its_connection() {
    let logs = logs();
    let setup = Setup::new().await;
    let mut peer = TlsPeer::connect_tls(setup.server.local_addr(), &setup.pki.connector("huge"))
        .await
        .unwrap();
    let hello = peer.hello("huge", restpipe::wire::PROTOCOL_VERSION).await;
    assert_eq!(hello.protocol_version, restpipe::wire::PROTOCOL_VERSION);
    assert_eq!(hello.role, proto::Role::Server as i32);
    wait_for_client(&setup.server, "huge").await;

    let before = LARGEST_ALLOCATION.load(Ordering::Relaxed);
    assert!(before < 1 << 30);
    let mut bytes = 0x7fff_ffffu32.to_be_bytes().to_vec();
    bytes.extend_from_slice(&[0u8; 1024]);
    peer.send_raw(&bytes).await.unwrap();
    peer.expect_end().await;

    assert!(
        logs.wait_for_line(&["frame over the size limit", "huge"])
            .await,
        "the reason was not logged"
    );
    let largest = LARGEST_ALLOCATION.load(Ordering::Relaxed);
    assert!(
        largest < 1 << 30,
        "an allocation of {largest} bytes was made"
    );
    assert!(
        wait_until(Duration::from_secs(3), || setup
            .server
            .registry()
            .find("huge")
            .is_err())
        .await
    );
    setup.assert_good_untouched().await;
}

/// A frame whose body is not protobuf gets an error frame back and crashes nothing; the
/// connection that sent it even stays usable. An unknown message type (a frame field this
/// version does not know) is answered with an UNKNOWN_MESSAGE error, and the connection stays
/// up and serves the next event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_frames_and_unknown_message_types_get_errors() {
    let setup = Setup::new().await;
    let mut peer = TlsPeer::connect_tls(setup.server.local_addr(), &setup.pki.connector("odd"))
        .await
        .unwrap();
    peer.hello("odd", restpipe::wire::PROTOCOL_VERSION).await;
    wait_for_client(&setup.server, "odd").await;

    // Not protobuf: a field number 0 and truncated varints.
    peer.send_payload(&[0x00, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff])
        .await
        .unwrap();
    match peer.recv().await.unwrap() {
        Some(Frame {
            kind: Some(Kind::Error(err)),
            ..
        }) => {
            assert_eq!(err.kind, proto::error::Kind::BadRequest as i32);
            assert!(err.message.contains("malformed"), "{}", err.message);
        }
        other => panic!("expected an error frame, got {other:?}"),
    }
    setup.assert_good_untouched().await;

    // Field 15, which no version of Frame has so far: id 9, then tag (15 << 3 | 2) with an
    // empty length-delimited value.
    let mut payload = prost::Message::encode_to_vec(&Frame { id: 9, kind: None });
    payload.extend_from_slice(&[0x7a, 0x00]);
    peer.send_payload(&payload).await.unwrap();
    match peer.recv().await.unwrap() {
        Some(Frame {
            id: 9,
            kind: Some(Kind::Error(err)),
        }) => assert_eq!(err.kind, proto::error::Kind::UnknownMessage as i32),
        other => panic!("expected an UNKNOWN_MESSAGE error for id 9, got {other:?}"),
    }

    // The connection is still up: an event on it is answered.
    peer.send(&event_frame(10, echo("after the odd frames")))
        .await
        .unwrap();
    match peer.recv().await.unwrap() {
        Some(Frame {
            id: 10,
            kind: Some(Kind::Reply(reply)),
        }) => {
            assert_eq!(reply.code, 0);
            assert_eq!(&reply.body[..], b"after the odd frames");
        }
        other => panic!("expected the reply to id 10, got {other:?}"),
    }
    assert!(setup.server.registry().find("odd").is_ok());
    setup.assert_good_untouched().await;
}

/// A peer speaking protocol version 99 gets a Close frame that says why, the server logs the
/// refusal, and the good connection is untouched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_foreign_protocol_version_is_refused_with_a_clear_reason() {
    let logs = logs();
    let setup = Setup::new().await;
    let mut peer = TlsPeer::connect_tls(setup.server.local_addr(), &setup.pki.connector("future"))
        .await
        .unwrap();
    let port = peer.local_addr().to_string();
    peer.send(&client_hello("future", 99)).await.unwrap();
    let frames = peer.expect_end().await;
    let close = frames
        .iter()
        .find_map(|f| match &f.kind {
            Some(Kind::Close(close)) => Some(close.reason.clone()),
            _ => None,
        })
        .unwrap_or_else(|| panic!("no Close frame among {frames:?}"));
    assert!(
        close.contains("protocol version mismatch") && close.contains("99"),
        "{close}"
    );
    assert!(
        logs.wait_for_line(&["hello refused", &port, "protocol version mismatch"])
            .await,
        "the refusal was not logged"
    );
    assert!(setup.server.registry().find("future").is_err());
    setup.assert_good_untouched().await;
}

/// A client that completes TLS and then says nothing is dropped after the handshake timeout,
/// and holds up nobody meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_says_hello_is_dropped() {
    let setup = Setup::with_pipe(restpipe::PipeConfig {
        handshake_timeout: Duration::from_secs(1),
        ..test_pipe()
    })
    .await;
    let mut peer = TlsPeer::connect_tls(setup.server.local_addr(), &setup.pki.connector("mute"))
        .await
        .unwrap();
    // Nothing is sent. Meanwhile the good client is served.
    setup.assert_good_untouched().await;
    let started = std::time::Instant::now();
    let frames = peer.expect_end().await;
    // The server's own hello may arrive before it gives up.
    assert!(frames
        .iter()
        .all(|f| matches!(f.kind, Some(Kind::Hello(_)))));
    assert!(started.elapsed() <= setup.server.pipe().handshake_timeout + Duration::from_secs(1));
    assert!(setup.server.registry().find("mute").is_err());
    setup.assert_good_untouched().await;
}

/// A client whose handshake is still under way when the server starts shutting down is not
/// left connected to a server that has closed: it is told the server is shutting down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handshake_that_ends_during_shutdown_leaves_no_connection_behind() {
    let setup = Setup::new().await;
    let mut peer = TlsPeer::connect_tls(setup.server.local_addr(), &setup.pki.connector("late"))
        .await
        .unwrap();
    // The server has sent its hello and waits for ours.
    match peer.recv().await.unwrap() {
        Some(Frame {
            kind: Some(Kind::Hello(_)),
            ..
        }) => {}
        other => panic!("expected the server's hello, got {other:?}"),
    }
    let good_conn = setup.good.connection().unwrap();
    let shutdown = tokio::spawn({
        let server = setup.server.clone();
        async move { server.shutdown(Duration::from_millis(200)).await }
    });
    assert!(wait_until(Duration::from_secs(3), || !setup.server.is_listening()).await);
    within(
        Duration::from_secs(3),
        "the good client is let go",
        good_conn.closed(),
    )
    .await;

    peer.send(&client_hello("late", restpipe::wire::PROTOCOL_VERSION))
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let frames = peer.expect_end().await;
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(2),
        "the late client was kept for {took:?}"
    );
    assert!(
        frames.iter().any(|f| matches!(&f.kind,
            Some(Kind::Close(c)) if c.reason.contains("shutting down"))),
        "no Close frame among {frames:?}"
    );
    within(Duration::from_secs(5), "the shutdown", shutdown)
        .await
        .unwrap();
    assert!(setup.server.registry().is_empty());
}

/// A server that speaks another protocol version is refused by the client, which tells it why
/// in a Close frame and logs the same reason, and never reports itself connected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_refuses_a_server_with_another_protocol_version() {
    let logs = logs();
    let pki = Pki::new();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = pki.server_tls().acceptor().unwrap();
    let client = ClientNode::start(client_options(&pki, "modern", addr, test_pipe())).unwrap();

    let (tcp, _) = within(
        Duration::from_secs(5),
        "the client dials",
        listener.accept(),
    )
    .await
    .unwrap();
    let mut peer = RawPeer::new(acceptor.accept(tcp).await.unwrap());
    peer.send(&hello_frame(proto::Role::Server, SERVER_NAME, 99))
        .await
        .unwrap();
    let frames = peer.expect_end().await;
    assert!(matches!(
        frames.first().and_then(|f| f.kind.as_ref()),
        Some(Kind::Hello(h)) if h.protocol_version == restpipe::wire::PROTOCOL_VERSION
    ));
    let close = frames
        .iter()
        .find_map(|f| match &f.kind {
            Some(Kind::Close(close)) => Some(close.reason.clone()),
            _ => None,
        })
        .unwrap_or_else(|| panic!("no Close frame among {frames:?}"));
    assert!(
        close.contains("protocol version mismatch") && close.contains("99"),
        "{close}"
    );
    assert!(
        logs.wait_for_line(&[
            "cannot connect",
            &format!("server={addr}"),
            "protocol version mismatch"
        ])
        .await,
        "the client did not log the refusal"
    );
    assert!(!client.is_connected());
    client.shutdown(Duration::from_millis(10)).await;
}

/// A client that holds its reply past the caller's deadline: the caller gets Timeout, the
/// event told the client that deadline, the client is told the caller gave up (a cancel, on
/// protocol version 2), the late reply is ignored, and the next request on the same
/// connection is answered by the reply that carries its id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_after_the_deadline_is_a_timeout_and_harms_nothing() {
    let setup = Setup::new().await;
    let mut peer = TlsPeer::connect_tls(setup.server.local_addr(), &setup.pki.connector("late"))
        .await
        .unwrap();
    peer.hello("late", restpipe::wire::PROTOCOL_VERSION).await;
    wait_for_client(&setup.server, "late").await;

    let deadline = Duration::from_millis(200);
    let call = tokio::spawn({
        let server = setup.server.clone();
        async move { server.call("late", whoami(), Some(deadline)).await }
    });
    let (late_id, event) = match peer.recv().await.unwrap() {
        Some(Frame {
            id,
            kind: Some(Kind::Event(event)),
        }) => (id, event),
        other => panic!("expected an event, got {other:?}"),
    };
    assert_eq!(
        (event.verb.as_str(), event.noun.as_str()),
        ("GET", "whoami")
    );
    assert_eq!(event.timeout_ms, 200);
    assert_eq!(
        within(Duration::from_secs(3), "the timeout", call)
            .await
            .unwrap(),
        Err(CallError::Timeout(deadline))
    );
    match peer.recv().await.unwrap() {
        Some(Frame {
            id,
            kind: Some(Kind::Cancel(proto::Cancel { from_caller: true })),
        }) => assert_eq!(id, late_id),
        other => panic!("expected the cancel of {late_id}, got {other:?}"),
    }

    let reply = |id: u64, text: &str| Frame {
        id,
        kind: Some(Kind::Reply(proto::Reply {
            content_type: "text/plain".into(),
            code: 0,
            body: text.as_bytes().to_vec().into(),
            http_status: 0,
            ..Default::default()
        })),
    };
    peer.send(&reply(late_id, "too late")).await.unwrap();
    let call = tokio::spawn({
        let server = setup.server.clone();
        async move { server.call("late", whoami(), None).await }
    });
    let id = match peer.recv().await.unwrap() {
        Some(Frame {
            id,
            kind: Some(Kind::Event(_)),
        }) => id,
        other => panic!("expected an event, got {other:?}"),
    };
    assert_ne!(id, late_id);
    peer.send(&reply(id, "on time")).await.unwrap();
    let answer = within(Duration::from_secs(3), "the answer", call)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&answer.body[..], b"on time");
    setup.assert_good_untouched().await;
}
