//! Metrics end to end: a real server node and a real client node, started from settings as
//! the `restpipe` command starts them, each sending to its own UDP socket on 127.0.0.1 that
//! stands in for statsd. Real HTTP calls in both directions, a heartbeat every 200 ms, a
//! refused handshake, a connection lost and regained; every line must arrive in statsd's wire
//! format under RestPipe's names (SPEC section 8).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser;
use restpipe::app::{self, RunningNode};
use restpipe::config::{Cli, Command, NodeArgs, Settings, StatsdSettings};
use restpipe::handler::Side;
use restpipe::http::Pipe;
use restpipe::{PipeConfig, TlsMaterial};
use restpipe_testkit::certs::*;
use restpipe_testkit::logs::*;
use restpipe_testkit::nodes::*;
use restpipe_testkit::raw::*;
use restpipe_testkit::relay::*;
use restpipe_testkit::statsd::Statsd;
use restpipe_testkit::wait::*;

/// Statsd settings that send a node's metrics to `statsd`.
fn statsd_settings(statsd: &Statsd) -> StatsdSettings {
    StatsdSettings {
        host: Some("127.0.0.1".into()),
        port: statsd.port(),
        prefix: "restpipe".into(),
    }
}

/// A heartbeat every 200 ms, a peer dead after 1 s of silence.
fn fast_heartbeats() -> PipeConfig {
    PipeConfig {
        heartbeat_interval: Duration::from_millis(200),
        heartbeat_timeout: Duration::from_secs(1),
        ..test_pipe()
    }
}

/// Settings of a node of `side`, everything on 127.0.0.1 with ports chosen by the system.
fn settings(side: Side, statsd: StatsdSettings) -> Settings {
    let mut s = Settings::resolve(NodeArgs::default(), side).expect("default settings");
    restpipe_testkit::nodes::own_data_dir(&mut s);
    s.bind = "127.0.0.1:0".parse().unwrap();
    s.http = "127.0.0.1:0".parse().unwrap();
    s.pipe = fast_heartbeats();
    s.reconnect_max = Duration::from_millis(500);
    s.grace = Duration::from_secs(2);
    s.statsd = statsd;
    s
}

async fn start(side: Side, settings: &Settings, tls: TlsMaterial) -> RunningNode {
    app::start_with_tls(side, settings, tls)
        .await
        .expect("start the node")
}

fn pipe_addr(node: &RunningNode) -> SocketAddr {
    match &node.pipe {
        Pipe::Server(server) => server.local_addr(),
        Pipe::Client(_) => panic!("not a server"),
    }
}

async fn get(url: String) -> reqwest::StatusCode {
    reqwest::get(&url).await.expect("HTTP request").status()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_arrives_in_statsd_format_from_real_nodes() {
    const CLIENT: &str = "metrics-client";
    let pki = Pki::new();
    let server_statsd = Statsd::start().await;
    let client_statsd = Statsd::start().await;

    let server = start(
        Side::Server,
        &settings(Side::Server, statsd_settings(&server_statsd)),
        pki.server_tls(),
    )
    .await;
    // The client dials through a relay, so that the test can silence the link later.
    let relay = Relay::start(pipe_addr(&server)).await;
    let mut client_settings = settings(Side::Client, statsd_settings(&client_statsd));
    client_settings.server = relay.addr().to_string();
    client_settings.server_name = Some(SERVER_NAME.into());
    let client = start(Side::Client, &client_settings, pki.client_tls(CLIENT)).await;
    let Pipe::Client(client_pipe) = &client.pipe else {
        panic!("not a client");
    };
    within(
        Duration::from_secs(10),
        "the client connecting",
        client_pipe.wait_connected(Duration::from_secs(10)),
    )
    .await
    .expect("the client connects");

    // Connecting.
    client_statsd
        .expect_count("restpipe.client.connect.new.tick")
        .await;
    client_statsd
        .expect_count("restpipe.client.connect.connected.tick")
        .await;
    server_statsd
        .expect_line("restpipe.server.clients.connected:1|g")
        .await;

    // Client to server, over HTTP: the client sends, the server receives and handles.
    let c = client.http_addr;
    assert_eq!(get(format!("http://{c}/server/time")).await, 200);
    assert_eq!(get(format!("http://{c}/server/nope")).await, 404);
    client_statsd
        .expect_count("restpipe.message.send.tick")
        .await;
    client_statsd
        .expect_timing("restpipe.message.send.timing")
        .await;
    client_statsd
        .expect_count("restpipe.http.status.2xx.tick")
        .await;
    client_statsd
        .expect_count("restpipe.http.status.4xx.tick")
        .await;
    server_statsd
        .expect_count("restpipe.message.receive.tick")
        .await;
    server_statsd
        .expect_timing("restpipe.message.receive.handle.timing")
        .await;
    server_statsd
        .expect_count("restpipe.message.received.handle.get_time.tick")
        .await;
    server_statsd
        .expect_timing("restpipe.message.received.handle.get_time.timing")
        .await;

    // Server to client, over HTTP: the other way round.
    let s = server.http_addr;
    assert_eq!(get(format!("http://{s}/client/{CLIENT}/time")).await, 200);
    server_statsd
        .expect_count("restpipe.message.send.tick")
        .await;
    server_statsd
        .expect_timing("restpipe.message.send.timing")
        .await;
    server_statsd
        .expect_count("restpipe.http.status.2xx.tick")
        .await;
    client_statsd
        .expect_count("restpipe.message.receive.tick")
        .await;
    client_statsd
        .expect_count("restpipe.message.received.handle.get_time.tick")
        .await;
    client_statsd
        .expect_timing("restpipe.message.received.handle.get_time.timing")
        .await;

    // Heartbeats, measured on both sides.
    for statsd in [&client_statsd, &server_statsd] {
        statsd
            .expect_timing("restpipe.client.connect.heartbeat.timing")
            .await;
        statsd
            .expect_count("restpipe.client.connect.heartbeat.success.tick")
            .await;
    }

    // A handshake refused: plain bytes, not TLS, to the pipe's port.
    let mut garbage = RawPeer::connect_tcp(pipe_addr(&server)).await.unwrap();
    garbage
        .send_raw(b"GET / HTTP/1.1\r\nHost: not-tls\r\n\r\n")
        .await
        .unwrap();
    server_statsd
        .expect_count("restpipe.tls.handshake.rejected.not_tls.tick")
        .await;
    drop(garbage);

    // The link goes silent: heartbeats fail, the client loses the connection and the
    // server's gauge drops; once the link is back the client reconnects.
    client_statsd.forget();
    server_statsd.forget();
    relay.pause();
    client_statsd
        .expect_count("restpipe.client.connect.heartbeat.fail.tick")
        .await;
    client_statsd
        .expect_count("restpipe.client.connect.broken.tick")
        .await;
    server_statsd
        .expect_count("restpipe.client.connect.heartbeat.fail.tick")
        .await;
    server_statsd
        .expect_line("restpipe.server.clients.connected:0|g")
        .await;
    client_statsd
        .expect_count("restpipe.client.connect.new.tick")
        .await;
    client_statsd.forget();
    server_statsd.forget();
    relay.resume();
    client_statsd
        .expect_count("restpipe.client.connect.connected.tick")
        .await;
    server_statsd
        .expect_line("restpipe.server.clients.connected:1|g")
        .await;

    // Shutting the client down takes it off the server's gauge.
    server_statsd.forget();
    client.shutdown(Duration::from_secs(2)).await;
    server_statsd
        .expect_line("restpipe.server.clients.connected:0|g")
        .await;
    server.shutdown(Duration::from_secs(2)).await;

    client_statsd.assert_all_well_formed();
    server_statsd.assert_all_well_formed();
}

/// A statsd host name that does not resolve is logged once, and the node runs without
/// metrics.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_statsd_host_that_does_not_resolve_is_reported_once_and_the_node_runs() {
    const HOST: &str = "statsd.does-not-exist.invalid";
    let logs = logs();
    let pki = Pki::new();
    let statsd = StatsdSettings {
        host: Some(HOST.into()),
        port: 8125,
        prefix: "restpipe".into(),
    };
    let server = start(
        Side::Server,
        &settings(Side::Server, statsd),
        pki.server_tls(),
    )
    .await;
    let s = server.http_addr;
    assert_eq!(get(format!("http://{s}/health")).await, 200);
    assert_eq!(get(format!("http://{s}/health")).await, 200);
    let reports: Vec<String> = logs
        .lines()
        .into_iter()
        .filter(|l| l.contains(HOST))
        .collect();
    assert_eq!(reports.len(), 1, "{reports:#?}");
    assert!(reports[0].contains("WARN"), "{}", reports[0]);
    assert!(reports[0].contains("metrics are off"), "{}", reports[0]);
    server.shutdown(Duration::from_secs(2)).await;
}

/// Defaults are localhost:8125 with the prefix `restpipe`; an empty host turns metrics off.
#[test]
fn statsd_defaults_and_an_empty_host_disables() {
    let s = Settings::resolve(NodeArgs::default(), Side::Client).unwrap();
    assert_eq!(
        s.statsd,
        StatsdSettings {
            host: Some("localhost".into()),
            port: 8125,
            prefix: "restpipe".into(),
        }
    );
    let cli = Cli::try_parse_from([
        "restpipe",
        "server",
        "--statsd-host",
        "",
        "--statsd-port",
        "9125",
    ])
    .unwrap();
    let Command::Server(args) = cli.command else {
        panic!("not the server command");
    };
    let s = Settings::resolve(args, Side::Server).unwrap();
    assert_eq!(s.statsd.host, None);
    assert_eq!(s.statsd.port, 9125);
    assert!(!app::metrics(&s).is_enabled());
}
