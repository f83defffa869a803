//! Certificates rotated, revoked and refused without a restart: real `restpipe` processes,
//! certificates made by `restpipe-certs`, reloads asked with SIGHUP.
//!
//! Each reload happens under load from a client that must not notice it: the tally of its
//! requests is printed (`--nocapture`) and every one must be a 200.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, SystemTime};

use restpipe_certs::{CertificateAuthority, IssueOptions, DEV_SERVER_NAME};
use restpipe_testkit::certs::*;
use restpipe_testkit::http::*;
use restpipe_testkit::procs::*;
use restpipe_testkit::wait::wait_until_async;
use serde_json::Value;

/// A server process, a client `steady` under load through both directions, and what it takes
/// to make more certificates.
struct Scene {
    certs: Certs,
    ca: CertificateAuthority,
    http: reqwest::Client,
    server: Node,
    steady: Node,
    load: Load,
}

impl Scene {
    async fn start(server_extra: &[&str]) -> Scene {
        Scene::start_with(Certs::new(), server_extra).await
    }

    async fn start_with(certs: Certs, server_extra: &[&str]) -> Scene {
        let ca = CertificateAuthority::load(&certs.paths.ca_cert, &certs.paths.ca_key).unwrap();
        let (server, pipe) = start_server(&certs, server_extra).await;
        let steady = start_client(&certs, "steady", pipe).await;
        let http = http_client();
        wait_listed(&http, &server, "steady").await;
        let load = Load::start(LoadSpec::both_ways(
            &steady,
            &server,
            "steady",
            Duration::from_secs(30),
            Duration::from_millis(5),
        ));
        Scene {
            certs,
            ca,
            http,
            server,
            steady,
            load,
        }
    }

    /// Send SIGHUP to the server and wait for the reload it causes to show in `/status`.
    async fn reload_server(&self) -> Value {
        let before = status(&self.http, &self.server).await["reload"]["at"].as_f64();
        hangup(&self.server);
        let seen = wait_until_async(Duration::from_secs(10), || async {
            let at = status(&self.http, &self.server).await["reload"]["at"].as_f64();
            at.is_some() && at != before
        })
        .await;
        assert!(seen, "no reload in /status:\n{}", self.server.log_tail(20));
        status(&self.http, &self.server).await["reload"].clone()
    }

    /// The steady client's load went on through everything: every request answered 200.
    async fn finish(self) -> Tally {
        let (tally, _) = self.load.finish().await;
        assert_eq!(tally.lost(), 0, "{tally}");
        assert_eq!(tally.unexpected(), 0, "{tally}");
        assert_eq!(tally.status(200), tally.sent, "{tally}");
        tally
    }
}

/// A client process for `identity` (a fresh certificate) dialling the server's pipe `port`.
async fn start_client(certs: &Certs, identity: &str, port: u16) -> Node {
    let cert = certs.client(identity);
    start_client_with(certs, &cert, port).await
}

/// A client process with the certificate `cert`.
async fn start_client_with(certs: &Certs, cert: &CertFiles, port: u16) -> Node {
    start_client_args(certs, cert, port, &[]).await
}

/// A client process with the certificate `cert` and `extra` flags.
async fn start_client_args(certs: &Certs, cert: &CertFiles, port: u16, extra: &[&str]) -> Node {
    Node::start(
        certs.dir(),
        &cert.identity,
        client_args(certs, cert, loopback(port), extra),
    )
    .await
}

/// An upstream that accepts connections and never answers: a `forward` route to it keeps a
/// request in flight for as long as the test needs.
async fn silent_upstream() -> (tokio::task::JoinHandle<()>, String) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let route = format!("hang=http://{}/", listener.local_addr().unwrap());
    let task = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            held.push(socket);
        }
    });
    (task, route)
}

/// A request from the server to `identity`'s `hang` route, in flight until the connection
/// ends; resolves to its HTTP status.
fn request_in_flight(
    http: &reqwest::Client,
    server: &Node,
    identity: &str,
) -> tokio::task::JoinHandle<u16> {
    let (http, url) = (
        http.clone(),
        server.url(&format!("/client/{identity}/hang")),
    );
    tokio::spawn(async move { http.get(url).send().await.unwrap().status().as_u16() })
}

/// `GET /status` of a node.
async fn status(http: &reqwest::Client, node: &Node) -> Value {
    get_json(http, &node.url("/status")).await
}

/// Wait (at most 20 s) until the server lists `identity`.
async fn wait_listed(http: &reqwest::Client, server: &Node, identity: &str) {
    let listed = wait_until_async(Duration::from_secs(20), || async {
        listed_clients(http, server)
            .await
            .iter()
            .any(|c| c == identity)
    })
    .await;
    assert!(
        listed,
        "{identity} never connected:\n{}",
        server.log_tail(20)
    );
}

/// The certificate fingerprint of the server as the client `node` sees it, once its own
/// status shows the connection (it may lag the server's listing by a moment).
async fn seen_fingerprint(http: &reqwest::Client, node: &Node) -> Value {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let seen = status(http, node).await["peers"][0]["certificate"]["fingerprint"].clone();
        if !seen.is_null() {
            return seen;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the client's status never showed its connection"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Wait (at most 10 s) until the server has a request in flight to `identity`.
async fn wait_in_flight(http: &reqwest::Client, server: &Node, identity: &str) {
    let seen = wait_until_async(Duration::from_secs(10), || async {
        status(http, server).await["peers"]
            .as_array()
            .and_then(|peers| peers.iter().find(|p| p["identity"] == identity))
            .and_then(|p| p["requests_in_flight_out"].as_u64())
            .is_some_and(|n| n > 0)
    })
    .await;
    assert!(seen, "no request in flight to {identity}");
}

/// Send SIGHUP to a node.
fn hangup(node: &Node) {
    let status = std::process::Command::new("kill")
        .args(["-HUP", &node.pid().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

/// Issue a new server certificate with the dev set's names and write it over the old files.
fn rotate_server_certificate(scene: &Scene) {
    let issued = scene
        .ca
        .issue_server(
            DEV_SERVER_NAME,
            &["127.0.0.1".to_owned(), "::1".to_owned()],
            &IssueOptions::default(),
        )
        .unwrap();
    let paths = &scene.certs.paths;
    restpipe_certs::write_private_key(&paths.server_key, &issued.key_pem, true).unwrap();
    restpipe_certs::write_certificate(&paths.server_cert, &issued.cert_pem, true).unwrap();
}

/// The server certificate is replaced on disk and the server sent SIGHUP while a client is
/// connected and busy: the connection stays up (the client never reconnects), every request
/// is answered, `/status` shows the new fingerprint, and a client that connects afterwards
/// sees the new certificate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_certificate_rotates_while_clients_are_connected() {
    let scene = Scene::start(&[]).await;
    let old = status(&scene.http, &scene.server).await["certificate"]["fingerprint"]
        .as_str()
        .unwrap()
        .to_string();
    let connects = scene.server.log_count(&["client connected"]);
    scene
        .load
        .next_records(0, 20, Duration::from_secs(10))
        .await;

    rotate_server_certificate(&scene);
    let record = scene.reload_server().await;
    assert_eq!(record["ok"], true, "{record}");
    let new = status(&scene.http, &scene.server).await["certificate"]["fingerprint"]
        .as_str()
        .unwrap()
        .to_string();
    assert_ne!(new, old, "the fingerprint did not change");

    let after = scene.load.len();
    scene
        .load
        .next_records(after, 20, Duration::from_secs(10))
        .await;
    assert_eq!(
        scene.server.log_count(&["client connected"]),
        connects,
        "the connected client was dropped by the rotation"
    );
    let fresh = start_client(&scene.certs, "fresh", scene.server.pipe_addr().port()).await;
    wait_listed(&scene.http, &scene.server, "fresh").await;
    let seen = seen_fingerprint(&scene.http, &fresh)
        .await
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(seen, new, "a new client saw the old certificate");
    let steady = status(&scene.http, &scene.steady).await["peers"][0]["certificate"]["fingerprint"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(
        steady, old,
        "the steady client's connection is the one from before"
    );
    let tally = scene.finish().await;
    println!("rotation under load: {tally}; fingerprint {old} -> {new}");
}

/// A reload that finds a broken file changes nothing: a key that is not PEM, then a new
/// certificate that does not fit the key. Each is refused with a log line naming the problem
/// and `/status` says so; connections stay up, a new client still connects with the old
/// material, and a later reload with good files succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_file_at_reload_changes_nothing() {
    let scene = Scene::start(&[]).await;
    let paths = scene.certs.paths.clone();
    let fingerprint =
        status(&scene.http, &scene.server).await["certificate"]["fingerprint"].clone();
    let key = std::fs::read(&paths.server_key).unwrap();
    let cert = std::fs::read(&paths.server_cert).unwrap();

    std::fs::write(&paths.server_key, b"this is not a key").unwrap();
    let record = scene.reload_server().await;
    assert_eq!(record["ok"], false, "{record}");
    let error = record["error"].as_str().unwrap();
    assert!(error.contains("server.key"), "{error}");
    assert!(scene
        .server
        .log_count(&["reload refused", "server.key"])
        .eq(&1));

    // A certificate that does not fit the key on disk.
    std::fs::write(&paths.server_key, &key).unwrap();
    let other = scene
        .ca
        .issue_server(
            DEV_SERVER_NAME,
            &["127.0.0.1".to_owned()],
            &IssueOptions::default(),
        )
        .unwrap();
    std::fs::write(&paths.server_cert, other.cert_pem).unwrap();
    let record = scene.reload_server().await;
    assert_eq!(record["ok"], false, "{record}");
    assert!(
        record["error"].as_str().unwrap().contains("do not fit"),
        "{record}"
    );

    let now = status(&scene.http, &scene.server).await["certificate"]["fingerprint"].clone();
    assert_eq!(now, fingerprint, "a refused reload changed the certificate");
    let fresh = start_client(&scene.certs, "fresh", scene.server.pipe_addr().port()).await;
    wait_listed(&scene.http, &scene.server, "fresh").await;
    assert_eq!(seen_fingerprint(&scene.http, &fresh).await, fingerprint);

    std::fs::write(&paths.server_cert, &cert).unwrap();
    let record = scene.reload_server().await;
    assert_eq!(record["ok"], true, "{record}");
    let tally = scene.finish().await;
    println!("broken files at reload: {tally}");
}

/// A client certificate whose identity is an IP address would shadow the lookup of clients
/// by address: it is refused at the handshake, logged and counted as `ip_identity`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_identity_that_is_an_ip_address_is_refused() {
    let scene = Scene::start(&[]).await;
    let cert = scene.certs.client("10.0.0.5");
    let mut client = start_client_with(&scene.certs, &cert, scene.server.pipe_addr().port()).await;
    let mut server = scene.server;
    server
        .wait_line(
            &["handshake refused", "reason=ip_identity", "10.0.0.5"],
            Duration::from_secs(10),
        )
        .await;
    assert!(!listed_clients(&scene.http, &server)
        .await
        .iter()
        .any(|c| c == "10.0.0.5"));
    client.kill();
    let (tally, _) = scene.load.finish().await;
    assert_eq!(tally.lost(), 0, "{tally}");
}

/// A client whose certificate expires while it is connected is closed when it does, and
/// cannot come back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_ends_when_the_peer_certificate_expires() {
    let scene = Scene::start(&[]).await;
    let soon = IssueOptions::valid_for_days(1);
    let short = IssueOptions {
        not_after: soon.not_before + Duration::from_secs(3600 + 4),
        ..soon
    };
    let expires = SystemTime::now() + Duration::from_secs(4);
    let cert = scene.certs.client_with("short-lived", &short);
    let _client = start_client_with(&scene.certs, &cert, scene.server.pipe_addr().port()).await;
    wait_listed(&scene.http, &scene.server, "short-lived").await;
    let mut server = scene.server;
    server
        .wait_line(
            &["the peer's certificate expired", "short-lived"],
            Duration::from_secs(15),
        )
        .await;
    assert!(SystemTime::now() >= expires - Duration::from_secs(1));
    server
        .wait_line(
            &["handshake refused", "reason=expired"],
            Duration::from_secs(15),
        )
        .await;
    assert!(!listed_clients(&scene.http, &server)
        .await
        .iter()
        .any(|c| c == "short-lived"));
    let (tally, _) = scene.load.finish().await;
    assert_eq!(tally.lost(), 0, "{tally}");
    assert_eq!(tally.status(200), tally.sent, "{tally}");
}

/// With `--client-ca`, client certificates chain to their own CA file. A client of a second CA
/// is trusted while the file lists that CA; once the file drops it and the server reloads,
/// that client is closed at once (its request in flight gets 502) and cannot come back, while
/// the steady client, of the CA still listed, is not touched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_the_new_ca_no_longer_trusts_is_closed_at_reload() {
    let certs = Certs::new();
    let dev_ca = std::fs::read_to_string(&certs.paths.ca_cert).unwrap();
    let second = CertificateAuthority::generate("second CA", &IssueOptions::ca_default()).unwrap();
    let clients_ca = certs.dir().join("clients-ca.pem");
    std::fs::write(&clients_ca, format!("{dev_ca}{}", second.cert_pem())).unwrap();
    let clients_ca_arg = clients_ca.to_string_lossy().into_owned();
    let scene = Scene::start_with(certs, &["--client-ca", &clients_ca_arg]).await;

    let issued = second
        .issue_client("victim", &IssueOptions::default())
        .unwrap();
    let victim_cert = write_pair(&scene.certs.dir().join("certs"), "victim", &issued);
    let (_upstream, route) = silent_upstream().await;
    let victim = start_client_args(
        &scene.certs,
        &victim_cert,
        scene.server.pipe_addr().port(),
        &["--handlers", "time,forward", "--forward", &route],
    )
    .await;
    wait_listed(&scene.http, &scene.server, "victim").await;
    // A request in flight on the victim's connection when it is cut.
    let in_flight = request_in_flight(&scene.http, &scene.server, "victim");
    wait_in_flight(&scene.http, &scene.server, "victim").await;

    std::fs::write(&clients_ca, &dev_ca).unwrap();
    let record = scene.reload_server().await;
    assert_eq!(record["ok"], true, "{record}");
    assert_eq!(record["closed"], serde_json::json!(["victim"]), "{record}");
    let gone = wait_until_async(Duration::from_secs(1), || async {
        !listed_clients(&scene.http, &scene.server)
            .await
            .iter()
            .any(|c| c == "victim")
    })
    .await;
    assert!(
        gone,
        "the victim was still listed a second after the reload"
    );
    assert_eq!(in_flight.await.unwrap(), 502, "the request in flight");
    let mut server = scene.server;
    server
        .wait_line(
            &["handshake refused", "reason=unknown_issuer"],
            Duration::from_secs(10),
        )
        .await;
    drop(victim);
    let (tally, _) = scene.load.finish().await;
    assert_eq!(tally.lost(), 0, "{tally}");
    assert_eq!(tally.status(200), tally.sent, "{tally}");
    println!("client CA narrowed under load: {tally}");
}

/// Revoke `cert` in the CRL at `crl_path` (made by `restpipe-certs`, signed by the dev CA).
fn revoke(ca: &CertificateAuthority, crl_path: &std::path::Path, cert: &CertFiles) {
    use restpipe_certs::{Crl, CrlOptions, RevocationReason, RevokeOutcome};
    let pem = std::fs::read_to_string(&cert.cert).unwrap();
    let der = restpipe_certs::first_certificate_der(&pem, &cert.identity).unwrap();
    let serial = ca.serial_of_issued(&der, &cert.identity).unwrap();
    let previous = Crl::load(crl_path).ok();
    let outcome = ca
        .revoke(
            previous.as_ref(),
            serial,
            Some(RevocationReason::KeyCompromise),
            &CrlOptions::valid_for_days(30),
        )
        .unwrap();
    let RevokeOutcome::Revoked { crl, .. } = outcome else {
        panic!("{} was revoked already", cert.identity)
    };
    restpipe_certs::write_crl(crl_path, &crl).unwrap();
}

/// A server started with `--crl` refuses a client the CRL lists (reason `revoked`). Then a
/// connected client's key leaks: it is revoked, the server reloads, and the client is closed
/// at once, its request in flight answered 502, and its reconnects refused as `revoked`. The
/// steady client is served throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_client_is_refused_and_a_connected_one_is_cut_by_a_reload() {
    let certs = Certs::new();
    let ca = CertificateAuthority::load(&certs.paths.ca_cert, &certs.paths.ca_key).unwrap();
    let crl_path = certs.paths.dir.join("ca.crl.pem");
    let refused = certs.client("refused");
    revoke(&ca, &crl_path, &refused);
    let crl_arg = crl_path.to_string_lossy().into_owned();
    let scene = Scene::start_with(certs, &["--crl", &crl_arg]).await;
    let port = scene.server.pipe_addr().port();

    let mut early = start_client_with(&scene.certs, &refused, port).await;
    let mut server = scene.server;
    server
        .wait_line(
            &["handshake refused", "reason=revoked"],
            Duration::from_secs(10),
        )
        .await;
    early.kill();

    let leaked = scene.certs.client("leaked");
    let (_upstream, route) = silent_upstream().await;
    let _leaked_node = start_client_args(
        &scene.certs,
        &leaked,
        port,
        &["--handlers", "time,forward", "--forward", &route],
    )
    .await;
    wait_listed(&scene.http, &server, "leaked").await;
    let in_flight = request_in_flight(&scene.http, &server, "leaked");
    wait_in_flight(&scene.http, &server, "leaked").await;
    let refusals = server.log_count(&["handshake refused", "reason=revoked"]);
    revoke(&scene.ca, &crl_path, &leaked);
    let scene = Scene { server, ..scene };
    let record = scene.reload_server().await;
    assert_eq!(record["ok"], true, "{record}");
    assert_eq!(record["closed"], serde_json::json!(["leaked"]), "{record}");
    let gone = wait_until_async(Duration::from_secs(1), || async {
        !listed_clients(&scene.http, &scene.server)
            .await
            .iter()
            .any(|c| c == "leaked")
    })
    .await;
    assert!(
        gone,
        "the revoked client was still listed a second after the reload"
    );
    assert_eq!(in_flight.await.unwrap(), 502, "the request in flight");
    // It dials again, and is refused every time.
    let mut server = scene.server;
    let refused_again = wait_until_async(Duration::from_secs(10), || async {
        server.log_count(&["handshake refused", "reason=revoked"]) > refusals
    })
    .await;
    assert!(refused_again, "{}", server.log_tail(20));
    server
        .wait_line(&["reload: new material in use"], Duration::from_secs(1))
        .await;
    let (tally, _) = scene.load.finish().await;
    assert_eq!(tally.lost(), 0, "{tally}");
    assert_eq!(tally.status(200), tally.sent, "{tally}");
    println!("revocation under load: {tally}");
}

/// A client that keeps TLS sessions to resume them gets a full handshake every time: the
/// server keeps no session and issues no ticket, so a certificate revoked since cannot come
/// back on a resumed session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_are_never_resumed() {
    use rustls::pki_types::pem::PemObject;
    use std::sync::Arc;
    let certs = Certs::new();
    let (server, _) = start_server(&certs, &[]).await;
    let material = certs.material("resumer");
    let resumer = certs.client("resumer");
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .unwrap()
    .with_webpki_verifier(material.server_verifier().unwrap())
    .with_client_auth_cert(
        rustls::pki_types::CertificateDer::pem_file_iter(&resumer.cert)
            .unwrap()
            .map(Result::unwrap)
            .collect(),
        rustls::pki_types::PrivateKeyDer::from_pem_file(&resumer.key).unwrap(),
    )
    .unwrap();
    config.resumption = rustls::client::Resumption::in_memory_sessions(16);
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    for attempt in 0..3 {
        let tcp = tokio::net::TcpStream::connect(server.pipe_addr())
            .await
            .unwrap();
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        let mut tls = connector.connect(name, tcp).await.unwrap();
        let kind = tls.get_ref().1.handshake_kind();
        assert_eq!(
            kind,
            Some(rustls::HandshakeKind::Full),
            "attempt {attempt}: {kind:?}"
        );
        // Read until the server's hello arrives, so any ticket it sent would be stored.
        let mut prefix = [0u8; 4];
        tokio::io::AsyncReadExt::read_exact(&mut tls, &mut prefix)
            .await
            .unwrap();
    }
}

/// The policy is re-read on SIGHUP too: a client the policy refuses (403, code 253) is allowed
/// once the file allows it and the server reloads; a policy that does not parse at reload is
/// refused and the one in force stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_policy_is_reloaded_and_a_broken_one_changes_nothing() {
    let certs = Certs::new();
    let policy = certs.dir().join("policy.toml");
    let only_steady = "[[allow]]\npeers = [\"steady\"]\nhandlers = [\"get_time\"]\n";
    std::fs::write(&policy, only_steady).unwrap();
    let policy_arg = policy.to_string_lossy().into_owned();
    let scene = Scene::start_with(certs, &["--policy", &policy_arg]).await;
    let other = start_client(&scene.certs, "other", scene.server.pipe_addr().port()).await;
    wait_listed(&scene.http, &scene.server, "other").await;
    let call = || async {
        let response = scene
            .http
            .get(other.url("/server/time"))
            .send()
            .await
            .unwrap();
        let code = response
            .headers()
            .get("x-event-return-code")
            .map(|v| v.to_str().unwrap().to_string());
        (response.status().as_u16(), code)
    };
    assert_eq!(call().await, (403, Some("253".into())));

    std::fs::write(
        &policy,
        format!("{only_steady}[[allow]]\npeers = [\"oth?r\"]\nhandlers = [\"get_*\"]\n"),
    )
    .unwrap();
    let record = scene.reload_server().await;
    assert_eq!(record["ok"], true, "{record}");
    assert_eq!(call().await, (200, Some("0".into())));

    std::fs::write(&policy, "[[allow]\npeers = [").unwrap();
    let record = scene.reload_server().await;
    assert_eq!(record["ok"], false, "{record}");
    assert!(
        record["error"].as_str().unwrap().contains("policy.toml"),
        "{record}"
    );
    assert_eq!(
        call().await,
        (200, Some("0".into())),
        "the policy in force changed"
    );
    let tally = scene.finish().await;
    println!("policy reloads under load: {tally}");
}
