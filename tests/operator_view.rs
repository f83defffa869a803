//! The operator's view (issue 16): `GET /metrics` in the Prometheus text format and the status
//! page at `GET /`, on real `restpipe` processes after real traffic.
//!
//! `/metrics` is read by a real parser, Python's `prometheus_client` (and `promtool check
//! metrics` as well when the `prometheus` package is there); the page is loaded in headless
//! Chromium, and the DOM it dumps after its script ran must name the connected client. Outside
//! CI a missing tool skips its test with a message; with `CI=true` it fails it (`.ci/run`
//! installs them).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use restpipe_testkit::certs::*;
use restpipe_testkit::http::*;
use restpipe_testkit::procs::*;
use restpipe_testkit::wait::*;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const CLIENT: &str = "operator-view-c1";
/// Calls made each way.
const CALLS: u64 = 7;

/// One sample: its name, labels and value.
type Sample = (String, BTreeMap<String, String>, f64);
/// Parsed families: name -> (type, samples).
type Families = BTreeMap<String, (String, Vec<Sample>)>;

/// Whether `check` says the tool is there; if not, skip (print why) outside CI, fail in CI.
fn tool(name: &str, check: &mut Command) -> bool {
    let there = check.output().map(|o| o.status.success()).unwrap_or(false);
    if !there {
        let ci = std::env::var("CI").is_ok_and(|v| v == "true");
        assert!(!ci, "{name} is missing, and CI=true: .ci/run installs it");
        eprintln!(
            "SKIPPED: {name} is not installed (.ci/run installs it; CI=true makes this a failure)"
        );
    }
    there
}

/// A server and a connected client, heartbeats every 200 ms, with traffic both ways.
async fn pair(certs: &Certs) -> (Node, Node) {
    let beats = ["--heartbeat-interval", "0.2", "--heartbeat-timeout", "2"];
    let (server, _) = start_server(certs, &beats).await;
    let client = Node::start(
        certs.dir(),
        "client",
        client_args(certs, &certs.client(CLIENT), server.pipe_addr(), &beats),
    )
    .await;
    let http = http_client();
    assert!(
        wait_until_async(Duration::from_secs(10), || async {
            listed_clients(&http, &server).await == [CLIENT]
        })
        .await,
        "the client never joined"
    );
    for _ in 0..CALLS {
        let (status, body) = get(&http, &client.url("/server/time")).await;
        assert_eq!(status, 200, "{body}");
        let (status, body) = get(&http, &server.url(&format!("/client/{CLIENT}/time"))).await;
        assert_eq!(status, 200, "{body}");
    }
    (server, client)
}

/// `/metrics` parsed by `prometheus_client`: family name -> (type, samples as
/// `[name, labels, value]`).
fn parse(text: &str, dir: &Path) -> Families {
    let file = dir.join("metrics.txt");
    std::fs::write(&file, text).unwrap();
    let script = r#"
import json, sys
from prometheus_client.parser import text_string_to_metric_families
out = {}
for f in text_string_to_metric_families(open(sys.argv[1]).read()):
    out[f.name] = [f.type, [[s.name, s.labels, s.value] for s in f.samples]]
print(json.dumps(out))
"#;
    let output = Command::new("python3")
        .args(["-c", script])
        .arg(&file)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "prometheus_client refused /metrics: {}\n{text}",
        String::from_utf8_lossy(&output.stderr)
    );
    let parsed: BTreeMap<String, Value> = serde_json::from_slice(&output.stdout).unwrap();
    parsed
        .into_iter()
        .map(|(name, v)| {
            let kind = v[0].as_str().unwrap().to_string();
            let samples = v[1]
                .as_array()
                .unwrap()
                .iter()
                .map(|s| {
                    let labels = serde_json::from_value(s[1].clone()).unwrap();
                    (
                        s[0].as_str().unwrap().to_string(),
                        labels,
                        s[2].as_f64().unwrap(),
                    )
                })
                .collect();
            (name, (kind, samples))
        })
        .collect()
}

/// The value of `sample` in `family` whose labels include `labels`.
fn value(families: &Families, family: &str, sample: &str, labels: &[(&str, &str)]) -> f64 {
    let (_, samples) = families
        .get(family)
        .unwrap_or_else(|| panic!("no family {family} in {:?}", families.keys()));
    samples
        .iter()
        .find(|(name, l, _)| {
            name == sample
                && labels
                    .iter()
                    .all(|(k, v)| l.get(*k).map(String::as_str) == Some(v))
        })
        .map(|(_, _, v)| *v)
        .unwrap_or_else(|| panic!("no {sample}{labels:?} in {family}: {samples:?}"))
}

async fn scrape(node: &Node) -> String {
    let response = http_client()
        .get(node.url("/metrics"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let kind = response.headers()["content-type"]
        .to_str()
        .unwrap()
        .to_string();
    assert!(kind.starts_with("text/plain; version=0.0.4"), "{kind}");
    response.text().await.unwrap()
}

/// A request with a foreign `Host`, written by hand: its status.
async fn foreign_host(node: &Node, path: &str) -> u16 {
    let mut tcp = TcpStream::connect(node.http).await.unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: evil.example\r\nConnection: close\r\n\r\n");
    tcp.write_all(request.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    tcp.read_to_end(&mut answer).await.unwrap();
    let answer = String::from_utf8_lossy(&answer);
    answer
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status in {answer:?}"))
}

#[tokio::test]
async fn metrics_after_real_traffic_parse_with_the_expected_families() {
    if !tool(
        "python3 with prometheus_client",
        Command::new("python3").args(["-c", "import prometheus_client"]),
    ) {
        return;
    }
    let certs = Certs::new();
    let (server, client) = pair(&certs).await;

    // A refused handshake: bytes that are not TLS on the pipe port.
    let mut raw = TcpStream::connect(server.pipe_addr()).await.unwrap();
    raw.write_all(b"GET / HTTP/1.0\r\n\r\n").await.unwrap();
    let mut sink = Vec::new();
    let _ = raw.read_to_end(&mut sink).await;
    // A 404 of the front door.
    let (status, _) = get(&http_client(), &server.url("/no/such/thing")).await;
    assert_eq!(status, 404);
    // Wait (on the metric itself) for the refusal and for heartbeats on both sides.
    let dir = tempfile::tempdir().unwrap();
    let last = std::cell::RefCell::new(Families::new());
    let counted = wait_until_async(Duration::from_secs(10), || async {
        let families = parse(&scrape(&server).await, dir.path());
        let seen = value(
            &families,
            "restpipe_tls_handshake_rejected",
            "restpipe_tls_handshake_rejected_total",
            &[("reason", "not_tls")],
        ) >= 1.0
            && value(
                &families,
                "restpipe_heartbeat_rtt_seconds",
                "restpipe_heartbeat_rtt_seconds_count",
                &[],
            ) >= 2.0;
        *last.borrow_mut() = families;
        seen
    })
    .await;
    let families = last.into_inner();
    assert!(
        counted,
        "the refusal and the heartbeats never showed: {families:?}"
    );

    for (node, families) in [
        ("server", families),
        ("client", parse(&scrape(&client).await, dir.path())),
    ] {
        let kind = |f: &str| {
            families
                .get(f)
                .map(|(k, _)| k.as_str())
                .unwrap_or("missing")
        };
        for (family, expected) in [
            ("restpipe_message_send", "counter"),
            ("restpipe_message_receive", "counter"),
            ("restpipe_http_responses", "counter"),
            ("restpipe_heartbeat_success", "counter"),
            ("restpipe_message_send_duration_seconds", "histogram"),
            ("restpipe_handler_duration_seconds", "histogram"),
            ("restpipe_heartbeat_rtt_seconds", "histogram"),
            ("restpipe_peers_connected", "gauge"),
            ("restpipe_requests_in_flight", "gauge"),
            ("restpipe_certificate_days_left", "gauge"),
            ("restpipe_peer_certificate_days_left_min", "gauge"),
            ("restpipe_node_info", "gauge"),
        ] {
            assert_eq!(kind(family), expected, "{node}: {family}");
        }
        // Each side sent CALLS requests and handled CALLS with the time handler.
        let sent = value(
            &families,
            "restpipe_message_send",
            "restpipe_message_send_total",
            &[],
        );
        assert_eq!(sent, CALLS as f64, "{node}");
        let round_trips = value(
            &families,
            "restpipe_message_send_duration_seconds",
            "restpipe_message_send_duration_seconds_count",
            &[],
        );
        assert_eq!(round_trips, CALLS as f64, "{node}");
        let (_, samples) = &families["restpipe_message_send_duration_seconds"];
        let buckets: Vec<_> = samples
            .iter()
            .filter(|(n, _, _)| n.ends_with("_bucket"))
            .collect();
        assert_eq!(buckets.len(), 18, "{node}: 17 bounds and +Inf");
        assert_eq!(buckets.last().unwrap().1["le"], "+Inf");
        assert_eq!(buckets.last().unwrap().2, CALLS as f64);
        assert!(
            buckets.windows(2).all(|w| w[0].2 <= w[1].2),
            "{node}: buckets are cumulative"
        );
        let handled = value(
            &families,
            "restpipe_handler_duration_seconds",
            "restpipe_handler_duration_seconds_count",
            &[("handler", "get_time")],
        );
        assert_eq!(handled, CALLS as f64, "{node}");
        assert!(
            value(
                &families,
                "restpipe_http_responses",
                "restpipe_http_responses_total",
                &[("class", "2xx")]
            ) >= CALLS as f64
        );
        assert_eq!(
            value(
                &families,
                "restpipe_peers_connected",
                "restpipe_peers_connected",
                &[]
            ),
            1.0
        );
        assert!(
            value(
                &families,
                "restpipe_certificate_days_left",
                "restpipe_certificate_days_left",
                &[]
            ) > 0.0
        );
        // Bounded labels: no series names a path or a peer.
        for (_, (_, samples)) in families.iter() {
            for (name, labels, _) in samples {
                for key in labels.keys() {
                    assert!(
                        [
                            "handler",
                            "class",
                            "reason",
                            "le",
                            "direction",
                            "role",
                            "identity",
                            "version"
                        ]
                        .contains(&key.as_str()),
                        "{node}: {name} has the label {key}"
                    );
                }
            }
        }
    }

    // promtool, when the prometheus package is there, lints the same text.
    if Command::new("promtool").arg("--version").output().is_ok() {
        let text = scrape(&server).await;
        let mut child = Command::new("promtool")
            .args(["check", "metrics"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write as _;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "promtool check metrics: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[tokio::test]
async fn the_guard_covers_metrics_and_the_page() {
    let certs = Certs::new();
    let (server, client) = pair(&certs).await;
    for node in [&server, &client] {
        for path in ["/metrics", "/", "/status/history"] {
            assert_eq!(foreign_host(node, path).await, 403, "{path}");
        }
    }
    // The page's headers: a strict CSP with the nonce of its inline script and style.
    let response = http_client().get(server.url("/")).send().await.unwrap();
    assert_eq!(response.status(), 200);
    let csp = response.headers()["content-security-policy"]
        .to_str()
        .unwrap()
        .to_string();
    let body = response.text().await.unwrap();
    assert!(
        csp.starts_with("default-src 'none'; script-src 'nonce-"),
        "{csp}"
    );
    let nonce = csp
        .split("'nonce-")
        .nth(1)
        .unwrap()
        .split('\'')
        .next()
        .unwrap();
    assert!(
        body.contains(&format!("<script nonce=\"{nonce}\">")),
        "{body}"
    );
    assert!(!body.contains("https://") && !body.contains(" src="));
}

#[tokio::test]
async fn the_page_in_headless_chromium_names_the_connected_client() {
    if !tool("chromium", Command::new("chromium").arg("--version")) {
        return;
    }
    let certs = Certs::new();
    let (server, _client) = pair(&certs).await;
    let http = http_client();
    // Round trips for the sparkline and an error for the list: wait until the page's JSON has them.
    let (status, _) = get(&http, &server.url("/client/nobody-here/time")).await;
    assert!(status >= 500, "{status}");
    assert!(
        wait_until_async(Duration::from_secs(10), || async {
            let h = get_json(&http, &server.url("/status/history")).await;
            h["rtts"][0]["samples"]
                .as_array()
                .is_some_and(|s| s.len() >= 5)
                && h["errors"].as_array().is_some_and(|e| !e.is_empty())
        })
        .await,
        "no round trips or errors in /status/history"
    );

    let profile = tempfile::tempdir().unwrap();
    let chromium = |extra: &[String]| {
        let mut cmd = Command::new("chromium");
        cmd.args([
            "--headless",
            "--disable-gpu",
            "--no-sandbox",
            "--hide-scrollbars",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        // Lets the page's timers and fetches run before the DOM is dumped.
        .arg("--virtual-time-budget=5000")
        .args(extra)
        .arg(server.url("/"));
        cmd.output().unwrap()
    };
    let dom = chromium(&["--dump-dom".into()]);
    let dom = String::from_utf8_lossy(&dom.stdout).into_owned();
    assert!(
        dom.contains("data-loaded=\"1\""),
        "the script did not run: {dom}"
    );
    let peers = dom.split("<table id=\"peers\">").nth(1).unwrap();
    assert!(
        peers.contains(&format!("<td>{CLIENT}</td>")),
        "no {CLIENT} among the peers: {dom}"
    );
    assert!(dom.contains("<polyline"), "no sparkline: {dom}");
    assert!(
        dom.contains("/client/nobody-here/time"),
        "the 5xx is not among the last errors: {dom}"
    );

    let shot_dir = tempfile::tempdir().unwrap();
    let shot = shot_dir.path().join("status-page.png");
    let out = chromium(&[
        format!("--screenshot={}", shot.display()),
        "--window-size=1200,800".into(),
    ]);
    let png = std::fs::read(&shot).unwrap_or_else(|e| {
        panic!(
            "no screenshot ({e}): {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    assert!(
        png.starts_with(b"\x89PNG\r\n\x1a\n") && png.len() > 10_000,
        "{} bytes",
        png.len()
    );
    // `RESTPIPE_UPDATE_SCREENSHOT=1` refreshes the picture in docs/.
    if std::env::var("RESTPIPE_UPDATE_SCREENSHOT").is_ok_and(|v| v == "1") {
        let docs = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/status-page.png");
        std::fs::write(docs, png).unwrap();
    }
}
