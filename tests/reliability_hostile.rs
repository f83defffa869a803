//! Hostile peers on the pipe's TLS port of a real server process, while a good client process
//! is under load through both directions: handshakes that never finish, garbage, frames over
//! the limit, malformed protobuf, a client that never reads its replies; and TLS refusals
//! checked with a real foreign peer, `openssl s_client`.
//!
//! Each attack costs only its own connection: every request of the good client is answered
//! 200 throughout, the server's file descriptors come back to where they were, and each refusal
//! is logged and counted under its reason (`tls.handshake.rejected.<reason>.tick`, read from a
//! UDP socket standing in for statsd). Each test prints its figures (`--nocapture`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use restpipe::handler::Request;
use restpipe_testkit::certs::*;
use restpipe_testkit::http::*;
use restpipe_testkit::nodes::random_bytes;
use restpipe_testkit::procs::*;
use restpipe_testkit::raw::proto::frame::Kind;
use restpipe_testkit::raw::proto::{self, Frame};
use restpipe_testkit::raw::{event_frame, RawPeer, TlsPeer};
use restpipe_testkit::statsd::Statsd;
use restpipe_testkit::wait::{wait_until, wait_until_async};
use tokio::io::AsyncWriteExt;

/// A server process (statsd to the test), a good client process `good`, and HTTP load through
/// both directions.
struct Scene {
    certs: Certs,
    http: reqwest::Client,
    statsd: Statsd,
    server: Node,
    good: Node,
}

impl Scene {
    /// Heartbeats every 0.5 s, dead after 3 s; handshakes within 2 s; plus `extra` on the
    /// server.
    async fn start(extra: &[&str]) -> Scene {
        let certs = Certs::new();
        let statsd = Statsd::start().await;
        let mut flags: Vec<String> = QUICK_TIMINGS.iter().map(|s| s.to_string()).collect();
        flags.extend(statsd.flags());
        flags.extend(extra.iter().map(|s| s.to_string()));
        let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
        let (server, pipe) = start_server(&certs, &flags).await;
        let cert = certs.client("good");
        let good = Node::start(
            certs.dir(),
            "good",
            client_args(&certs, &cert, loopback(pipe), &QUICK_TIMINGS),
        )
        .await;
        let http = http_client();
        let up = wait_until_async(Duration::from_secs(20), || {
            let (http, url) = (http.clone(), server.url("/clients"));
            async move { get(&http, &url).await.1.contains("\"good\"") }
        })
        .await;
        assert!(up, "the good client never connected");
        Scene {
            certs,
            http,
            statsd,
            server,
            good,
        }
    }

    fn pipe(&self) -> SocketAddr {
        self.server.pipe_addr()
    }

    /// Load through both directions: the good client calls the server and the server calls it.
    fn load(&self) -> Load {
        Load::start(LoadSpec::both_ways(
            &self.good,
            &self.server,
            "good",
            Duration::from_secs(20),
            Duration::from_millis(10),
        ))
    }

    /// `tls.handshake.rejected.<reason>.tick` as counted so far.
    fn rejected(&self, reason: &str) -> u64 {
        self.statsd
            .counter(&format!("tls.handshake.rejected.{reason}.tick"))
    }

    /// Wait (at most 10 s; metrics are sent at least every second) until the refusals counted
    /// for `reason` reach `n`.
    async fn wait_rejected(&self, reason: &str, n: u64) -> u64 {
        wait_until(Duration::from_secs(10), || self.rejected(reason) >= n).await;
        self.rejected(reason)
    }

    /// Lines of the server's log with "handshake refused" and `reason=<reason>`.
    fn refused_logged(&self, reason: &str) -> usize {
        self.server
            .log_count(&["handshake refused", &format!("reason={reason} ")])
    }

    /// Wait (at most 10 s) until the refusals of `reason` are accounted for by the log: lines
    /// logged, plus lines held back by the log's rate limit (`tls.handshake.log_held_back`,
    /// for every reason: only valid while `reason` is the only one refused). Returns
    /// (logged, held back).
    async fn refusals_accounted(&self, reason: &str, n: usize) -> (usize, u64) {
        let held_back = || self.statsd.counter("tls.handshake.log_held_back.tick");
        wait_until(Duration::from_secs(10), || {
            self.refused_logged(reason) as u64 + held_back() >= n as u64
        })
        .await;
        (self.refused_logged(reason), held_back())
    }

    /// The good client's load ended with every request answered 200.
    fn assert_all_served(tally: &Tally) {
        assert_eq!(tally.lost(), 0, "{tally}");
        assert!(tally.sent > 0);
        assert_eq!(
            tally.status(200),
            tally.sent,
            "the good client was not always served: {tally}"
        );
    }
}

/// Wait (at most 15 s) until the server holds no more file descriptors than `baseline + 2`.
async fn fds_settle(server: &Node, baseline: usize) -> (bool, usize) {
    let back = wait_until(Duration::from_secs(15), || server.fds() <= baseline + 2).await;
    (back, server.fds())
}

// ----------------------------------------------------------------------------------------
// Handshakes that never finish

/// 200 TCP connections that send nothing, 50 that send the first bytes of a ClientHello and
/// stop, and 50 that finish TLS but never say hello: the server holds them all at once, frees
/// each after the handshake timeout (2 s) whether or not the peer goes away, logs and counts
/// every one (`timeout` for the first 250, `hello` for the last 50), and its file descriptors
/// come back to where they were. The good client is served throughout. (All come from one
/// address: the per-source cap on pending handshakes is raised above their number, since the
/// subject here is the timeout; `pipe_hardening` covers the cap.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshakes_that_never_finish_are_freed_by_the_handshake_timeout() {
    const SILENT: usize = 200;
    const PARTIAL: usize = 50;
    const MUTE: usize = 50;
    let scene = Scene::start(&["--max-handshakes-per-source", "1000"]).await;
    let addr = scene.pipe();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let baseline = scene.server.fds();
    let load = scene.load();

    let started = Instant::now();
    let mut held = Vec::new();
    for _ in 0..SILENT {
        held.push(tokio::net::TcpStream::connect(addr).await.unwrap());
    }
    // All accepted and held: the server takes each in turn (a busy machine may lag a little).
    let holding = wait_until(Duration::from_secs(2), || {
        scene.server.fds() >= baseline + SILENT * 9 / 10
    })
    .await;
    let peak = scene.server.fds();
    // A TLS record header announcing a 200-byte ClientHello, and only its first bytes.
    let partial_hello = [
        0x16, 0x03, 0x01, 0x00, 0xc8, 0x01, 0x00, 0x00, 0xc4, 0x03, 0x03,
    ];
    for _ in 0..PARTIAL {
        let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        tcp.write_all(&partial_hello).await.unwrap();
        held.push(tcp);
    }
    let connector = scene.certs.connector("mute");
    let mut mute = Vec::new();
    for _ in 0..MUTE {
        mute.push(TlsPeer::connect_tls(addr, &connector).await.unwrap());
    }
    let opened = started.elapsed();

    // The sockets stay open on this side: the server must let go by itself.
    let (back, after) = fds_settle(&scene.server, baseline).await;
    let freed = started.elapsed();
    let timeouts = scene
        .wait_rejected("timeout", (SILENT + PARTIAL) as u64)
        .await;
    let hellos = scene.wait_rejected("hello", MUTE as u64).await;
    let (tally, _) = load.finish().await;
    println!(
        "half-open handshakes: {SILENT} silent + {PARTIAL} partial ClientHello + {MUTE} \
         without hello opened in {opened:?}; server fds {baseline} before, {peak} with the silent ones \
         open, {after} after {freed:?}; counted timeout={timeouts}, hello={hellos}; good \
         client: {tally}"
    );
    assert!(
        holding,
        "the server did not hold the connections ({peak} fds)"
    );
    assert!(back, "server fds: {baseline} before, {after} after");
    assert_eq!(timeouts, (SILENT + PARTIAL) as u64);
    assert_eq!(hellos, MUTE as u64);
    // Every refusal is logged, or held back by the log's rate limit and counted.
    let (logged, held_back) = scene.refusals_accounted("timeout", SILENT + PARTIAL).await;
    assert!(logged <= SILENT + PARTIAL);
    assert_eq!(logged as u64 + held_back, (SILENT + PARTIAL) as u64);
    assert_eq!(
        scene
            .server
            .log_count(&["hello refused", "no hello from the peer within"]),
        MUTE
    );
    Scene::assert_all_served(&tally);
    drop(held);
    drop(mute);
}

// ----------------------------------------------------------------------------------------
// Garbage, frames over the limit, malformed protobuf

/// What one hostile peer did and what it got.
#[derive(Debug)]
enum Attack {
    /// Random bytes instead of a TLS ClientHello.
    Garbage,
    /// An HTTP request on the TLS port.
    Http,
    /// After TLS, a first frame that is not a hello.
    NotHello,
    /// After the hello, a frame announcing 2 GiB.
    Oversized,
    /// After the hello, a frame that is not protobuf, then one of an unknown message type;
    /// both answered with an error frame, and the connection still serves an event.
    Malformed,
}

/// Carry out one attack; `connector` holds a certificate of the attack's own identity (the
/// server knows a peer by its certificate, so attacks at once must not share one).
async fn attack(kind: &Attack, addr: SocketAddr, connector: &tokio_rustls::TlsConnector) {
    match kind {
        Attack::Garbage => {
            let mut peer = RawPeer::connect_tcp(addr).await.unwrap();
            let mut bytes = random_bytes(16 * 1024);
            bytes[0] = 0x00; // never a TLS content type, whatever the random bytes
            let _ = peer.send_raw(&bytes).await;
            peer.expect_end().await;
        }
        Attack::Http => {
            let mut peer = RawPeer::connect_tcp(addr).await.unwrap();
            let _ = peer
                .send_raw(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
                .await;
            peer.expect_end().await;
        }
        Attack::NotHello => {
            let mut peer = TlsPeer::connect_tls(addr, connector).await.unwrap();
            peer.send(&event_frame(1, Request::new("GET", "time")))
                .await
                .unwrap();
            peer.expect_end().await;
        }
        Attack::Oversized => {
            let mut peer = TlsPeer::connect_tls(addr, connector).await.unwrap();
            peer.hello("oversized", restpipe::wire::PROTOCOL_VERSION)
                .await;
            let mut bytes = 0x7fff_ffffu32.to_be_bytes().to_vec();
            bytes.extend_from_slice(&[0u8; 4096]);
            let _ = peer.send_raw(&bytes).await;
            peer.expect_end().await;
        }
        Attack::Malformed => {
            let mut peer = TlsPeer::connect_tls(addr, connector).await.unwrap();
            peer.hello("malformed", restpipe::wire::PROTOCOL_VERSION)
                .await;
            peer.send_payload(&[0x00, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff])
                .await
                .unwrap();
            let error = peer.recv().await.unwrap();
            assert!(
                matches!(&error, Some(Frame { kind: Some(Kind::Error(e)), .. })
                    if e.kind == proto::error::Kind::BadRequest as i32),
                "{error:?}"
            );
            let mut unknown = prost::Message::encode_to_vec(&Frame { id: 9, kind: None });
            unknown.extend_from_slice(&[0x7a, 0x00]);
            peer.send_payload(&unknown).await.unwrap();
            let error = peer.recv().await.unwrap();
            assert!(
                matches!(&error, Some(Frame { id: 9, kind: Some(Kind::Error(e)) })
                    if e.kind == proto::error::Kind::UnknownMessage as i32),
                "{error:?}"
            );
            peer.send(&event_frame(10, Request::new("GET", "time")))
                .await
                .unwrap();
            let reply = peer.recv().await.unwrap();
            assert!(
                matches!(&reply, Some(Frame { id: 10, kind: Some(Kind::Reply(r)) }) if r.code == 0),
                "{reply:?}"
            );
        }
    }
}

/// Waves of five hostile peers at once, for 3 s (garbage bytes, an HTTP request, a first frame that
/// is not a hello, a frame announcing 2 GiB, malformed protobuf and an unknown message type),
/// while the good client is under load in both directions. Each attack ends only its own
/// connection, or none; every refusal is logged and counted under its reason; the good
/// client's requests are all answered 200; the server's file descriptors come back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_oversized_and_malformed_frames_cost_only_their_own_connection() {
    const ATTACK: Duration = Duration::from_secs(3);
    let scene = Scene::start(&[]).await;
    let addr = scene.pipe();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let baseline = scene.server.fds();
    let kinds = [
        (Attack::Garbage, scene.certs.connector("garbage")),
        (Attack::Http, scene.certs.connector("http")),
        (Attack::NotHello, scene.certs.connector("not-hello")),
        (Attack::Oversized, scene.certs.connector("oversized")),
        (Attack::Malformed, scene.certs.connector("malformed")),
    ];
    let load = scene.load();
    let started = Instant::now();
    let mut waves = 0;
    while started.elapsed() < ATTACK {
        let attacks = kinds
            .iter()
            .map(|(kind, connector)| attack(kind, addr, connector));
        futures_util::future::join_all(attacks).await;
        waves += 1;
    }
    let attacked = started.elapsed();
    let not_tls = scene.wait_rejected("not_tls", 2 * waves as u64).await;
    let hello = scene.wait_rejected("hello", waves as u64).await;
    let (back, after) = fds_settle(&scene.server, baseline).await;
    let (tally, _) = load.finish().await;
    let oversized = scene
        .server
        .log_count(&["frame over the size limit", "peer=oversized"]);
    let malformed = scene
        .server
        .log_count(&["malformed frame ignored", "peer=malformed"]);
    println!(
        "hostile frames: {waves} waves of {} attacks in {attacked:?}; counted not_tls={not_tls}, \
         hello={hello}; logged {oversized} frames over the limit, {malformed} malformed frames; \
         server fds {baseline} before, {after} after; good client: {tally}",
        kinds.len()
    );
    assert_eq!(not_tls, 2 * waves as u64);
    // Refusal log lines are rate-limited: each refusal is either logged or counted as held
    // back (and reported by the next line logged).
    let (logged, held_back) = scene.refusals_accounted("not_tls", 2 * waves).await;
    assert!(
        logged <= 2 * waves,
        "{logged} lines for {} refusals",
        2 * waves
    );
    assert_eq!(logged as u64 + held_back, 2 * waves as u64);
    assert_eq!(hello, waves as u64);
    assert_eq!(
        scene
            .server
            .log_count(&["hello refused", "the peer's first frame is not a hello"]),
        waves
    );
    assert_eq!(oversized, waves);
    assert_eq!(malformed, waves);
    assert!(back, "server fds: {baseline} before, {after} after");
    Scene::assert_all_served(&tally);
    // The malformed peers' connections stayed up until they left, the good one throughout.
    assert_eq!(listed_clients(&scene.http, &scene.server).await, ["good"]);
}

// ----------------------------------------------------------------------------------------
// A client that never reads

/// An authenticated client asks for a 1 MiB file over and over (an event every 2 ms) and never
/// reads a byte of the replies, nor answers a heartbeat. The server (`--max-in-flight 16`)
/// buffers a bounded amount for it: its peak memory grows by the replies in flight and its
/// write budget, far less than the replies asked for. It drops the client once its writes
/// have stalled for the heartbeat timeout (3 s), logging why, and the good client is served
/// throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_reads_is_dropped_and_costs_bounded_memory() {
    const FILE: usize = 1024 * 1024;
    let files = tempfile::tempdir().unwrap();
    std::fs::write(files.path().join("big.bin"), vec![0x5a; FILE]).unwrap();
    let root = files.path().to_string_lossy().into_owned();
    let scene = Scene::start(&[
        "--handlers",
        "time,files",
        "--files-root",
        &root,
        "--max-in-flight",
        "16",
    ])
    .await;
    let addr = scene.pipe();
    let connector = scene.certs.connector("hog");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let baseline_fds = scene.server.fds();
    let rss_before = scene.server.rss_kib();
    let peak_before = scene.server.peak_rss_kib();
    let load = scene.load();

    let mut hog = TlsPeer::connect_tls(addr, &connector).await.unwrap();
    hog.hello("hog", restpipe::wire::PROTOCOL_VERSION).await;
    let started = Instant::now();
    let mut asked = 0u64;
    let request = Request::new("GET", "file").with_parameters(vec!["big.bin".into()]);
    // Until the server hangs up (a write fails) or 30 s pass.
    while started.elapsed() < Duration::from_secs(30) {
        asked += 1;
        if hog
            .send(&event_frame(asked, request.clone()))
            .await
            .is_err()
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let dropped_after = started.elapsed();
    let gone = wait_until_async(Duration::from_secs(10), || {
        let (http, server) = (scene.http.clone(), &scene.server);
        async move {
            !listed_clients(&http, server)
                .await
                .contains(&"hog".to_string())
        }
    })
    .await;
    let peak_after = scene.server.peak_rss_kib();
    let rss_after = scene.server.rss_kib();
    let (back, fds_after) = fds_settle(&scene.server, baseline_fds).await;
    let (tally, _) = load.finish().await;
    let asked_mib = asked * FILE as u64 / (1024 * 1024);
    println!(
        "never-reading client: asked for {asked} replies of 1 MiB ({asked_mib} MiB) in \
         {dropped_after:?} before the server hung up; server RSS {rss_before} KiB before, peak \
         {peak_after} KiB (peak before {peak_before} KiB), {rss_after} KiB after; server fds \
         {baseline_fds} before, {fds_after} after; good client: {tally}"
    );
    assert!(gone, "the server still lists the hog");
    assert!(
        dropped_after < Duration::from_secs(20),
        "the hog was kept {dropped_after:?}"
    );
    assert!(
        scene
            .server
            .log_count(&["peer is not reading; closing", "peer=hog"])
            == 1,
        "the server did not log the stalled writes"
    );
    // What the server may hold for the hog: the replies of 16 requests in flight, and its
    // write budget (8 MiB) plus one frame; the rest is slack for TLS buffers and the
    // allocator. Without the write budget, the write queue alone held up to 1024 replies.
    let grown_mib = peak_after.saturating_sub(rss_before) / 1024;
    assert!(
        grown_mib < 16 + 8 + 1 + 40,
        "the server's memory peaked {grown_mib} MiB above where it was"
    );
    assert!(back, "server fds: {baseline_fds} before, {fds_after} after");
    Scene::assert_all_served(&tally);
}

// ----------------------------------------------------------------------------------------
// TLS with a real foreign peer

const OPENSSL: &str = "/usr/bin/openssl";

/// Run `openssl s_client` against `addr` with `args` and nothing on its stdin; returns what it
/// printed. It ends by itself once the server has answered (refused or not).
async fn s_client(addr: SocketAddr, args: &[String]) -> String {
    let output = tokio::process::Command::new(OPENSSL)
        .arg("s_client")
        .arg("-connect")
        .arg(addr.to_string())
        .arg("-servername")
        .arg("localhost")
        .args(args)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(Duration::from_secs(20), output)
        .await
        .expect("openssl s_client ended")
        .expect("run openssl s_client");
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// `openssl s_client` without a client certificate, with one from another CA, with an expired
/// one, and offering only TLS 1.1 or only TLS 1.0: each is refused, logged and counted under
/// the right reason (`no_client_cert`, `unknown_issuer`, `expired`, `incompatible`), and never
/// joins. The same s_client with a good certificate gets through TLS (and is then dropped for
/// saying no hello), so the refusals are the server's doing. Skipped, with a message, where
/// `/usr/bin/openssl` is absent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openssl_s_client_is_refused_for_each_bad_certificate_and_old_tls() {
    if !std::path::Path::new(OPENSSL).exists() {
        println!("skipped: {OPENSSL} is absent");
        return;
    }
    let scene = Scene::start(&[]).await;
    let addr = scene.pipe();
    let certs = &scene.certs;
    let ca = certs.paths.ca_cert.to_string_lossy().into_owned();
    let with_cert = |files: &CertFiles| -> Vec<String> {
        vec![
            "-cert".into(),
            files.cert.to_string_lossy().into_owned(),
            "-key".into(),
            files.key.to_string_lossy().into_owned(),
        ]
    };
    let good = certs.client("s-client-good");
    let expired = certs.client_with("s-client-expired", &expired_options());
    let foreign_ca = restpipe_certs::CertificateAuthority::generate(
        "some other CA",
        &restpipe_certs::IssueOptions::ca_default(),
    )
    .unwrap();
    let foreign = write_pair(
        &certs.dir().join("certs"),
        "s-client-foreign",
        &foreign_ca
            .issue_client("s-client-foreign", &restpipe_certs::IssueOptions::default())
            .unwrap(),
    );
    // Old protocol versions need the lowest security level for OpenSSL 3 to offer them at all.
    let old = |flag: &str| -> Vec<String> {
        let mut args = with_cert(&good);
        args.extend([flag.into(), "-cipher".into(), "DEFAULT:@SECLEVEL=0".into()]);
        args
    };
    let cases: Vec<(&str, Vec<String>, &str)> = vec![
        ("no client certificate", vec![], "no_client_cert"),
        (
            "a certificate from another CA",
            with_cert(&foreign),
            "unknown_issuer",
        ),
        ("an expired certificate", with_cert(&expired), "expired"),
        // TLS 1.2 with a valid client certificate: under 1.2 the certificate, and so the
        // identity, would cross the network in clear text.
        (
            "TLS 1.2 only, valid certificate",
            old("-tls1_2"),
            "incompatible",
        ),
        ("TLS 1.1 only", old("-tls1_1"), "incompatible"),
        ("TLS 1.0 only", old("-tls1"), "incompatible"),
    ];
    let load = scene.load();
    let mut figures = Vec::new();
    for (what, extra, reason) in &cases {
        let logged = scene.refused_logged(reason);
        let counted = scene.rejected(reason);
        let mut args = vec!["-CAfile".to_string(), ca.clone()];
        args.extend(extra.iter().cloned());
        let said = s_client(addr, &args).await;
        if said.contains("no protocols available") {
            println!("skipped {what}: this OpenSSL cannot offer it ({OPENSSL})");
            continue;
        }
        let seen = wait_until(Duration::from_secs(10), || {
            scene.refused_logged(reason) > logged
        })
        .await;
        assert!(
            seen,
            "{what}: no \"handshake refused ... reason={reason}\" in the server's log:\n{}\n\
             s_client said:\n{said}",
            scene.server.log_text()
        );
        let now = scene.wait_rejected(reason, counted + 1).await;
        assert_eq!(
            now,
            counted + 1,
            "{what}: tls.handshake.rejected.{reason}.tick"
        );
        let alert = said
            .lines()
            .find(|l| l.contains("alert") || l.contains("no protocols"))
            .unwrap_or("no alert printed")
            .to_string();
        figures.push(format!(
            "{what}: reason={reason} (s_client: {})",
            alert.trim()
        ));
    }
    // The control: a good certificate passes TLS; s_client then says nothing, so the hello
    // exchange fails and that is all.
    let hello_failures = scene.rejected("hello");
    let mut args = vec!["-CAfile".to_string(), ca.clone()];
    args.extend(with_cert(&good));
    s_client(addr, &args).await;
    assert_eq!(
        scene.wait_rejected("hello", hello_failures + 1).await,
        hello_failures + 1
    );
    let (tally, _) = load.finish().await;
    for line in &figures {
        println!("openssl s_client refused: {line}");
    }
    println!("openssl s_client with a good certificate: through TLS, dropped for no hello; good client: {tally}");
    assert_eq!(listed_clients(&scene.http, &scene.server).await, ["good"]);
    assert_eq!(scene.server.log_count(&["client connected", "s-client"]), 0);
    Scene::assert_all_served(&tally);
}
