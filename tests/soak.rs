//! The long reliability run: real `restpipe` processes on loopback under moderate load for
//! minutes, with the server killed (SIGKILL) and restarted on the same port midway, a client
//! that flaps all along, and a few hostile connections now and then. It counts every request
//! and reports requests served, errors by kind, latencies, and the memory and file descriptors
//! of every process at the start and the end. Nothing may be lost.
//!
//! It is ignored by `cargo test`; run it on purpose (docs/RELIABILITY.md records its figures):
//!
//! ```sh
//! cargo test --release --test soak -- --ignored --nocapture
//! ```
//!
//! Knobs (environment variables), with their defaults:
//!
//! | variable | default | what |
//! |---|---|---|
//! | `RESTPIPE_SOAK_SECS` | 600 | how long the load runs (at most 86400) |
//! | `RESTPIPE_SOAK_CLIENTS` | 4 | client processes (at most 64) |
//! | `RESTPIPE_SOAK_WORKERS` | 8 | HTTP workers through the clients to the server (at most 256) |
//! | `RESTPIPE_SOAK_PAUSE_MS` | 10 | pause of each worker between two requests |
//! | `RESTPIPE_SOAK_RESTARTS` | 1 | server kills (SIGKILL) and restarts, evenly spaced (at most 100) |
//! | `RESTPIPE_SOAK_FLAP` | 1 | 0 turns off the flapping client |
//! | `RESTPIPE_SOAK_REPORT` | none | a file to write the Markdown summary to, as well as stdout |
//!
//! Everything listens on 127.0.0.1 and every process is stopped at the end, whatever happens.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use restpipe::handler::Request;
use restpipe_testkit::certs::*;
use restpipe_testkit::http::*;
use restpipe_testkit::procs::*;
use restpipe_testkit::raw::{client_hello, event_frame, TlsPeer};
use restpipe_testkit::statsd::Statsd;

fn knob(name: &str, default: u64, max: u64) -> u64 {
    match std::env::var(name) {
        Ok(v) => {
            let n: u64 = v
                .trim()
                .parse()
                .unwrap_or_else(|_| panic!("{name}={v:?} is not a whole number"));
            assert!(n <= max, "{name}={n} is over its maximum of {max}");
            n
        }
        Err(_) => default,
    }
}

/// Figures of one process at one moment.
#[derive(Clone, Copy, Debug)]
struct Sample {
    rss_kib: u64,
    fds: usize,
}

fn sample(node: &Node) -> Sample {
    Sample {
        rss_kib: node.rss_kib(),
        fds: node.fds(),
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i]
}

/// Wait (at most `limit`) until the server lists exactly `names` and every client answers
/// `/health` with 200.
async fn all_connected(
    http: &reqwest::Client,
    server: &Node,
    clients: &[Node],
    names: &[String],
    limit: Duration,
) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        let mut healthy = true;
        for c in clients {
            healthy &= get(http, &c.url("/health")).await.0 == 200;
        }
        if healthy && listed_clients(http, server).await.as_slice() == names {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "the long soak: cargo test --release --test soak -- --ignored --nocapture"]
async fn soak() {
    let secs = knob("RESTPIPE_SOAK_SECS", 600, 86_400);
    let n_clients = knob("RESTPIPE_SOAK_CLIENTS", 4, 64) as usize;
    let workers = knob("RESTPIPE_SOAK_WORKERS", 8, 256) as usize;
    let pause_ms = knob("RESTPIPE_SOAK_PAUSE_MS", 10, 60_000);
    let restarts = knob("RESTPIPE_SOAK_RESTARTS", 1, 100);
    let flap = knob("RESTPIPE_SOAK_FLAP", 1, 1) == 1;
    let duration = Duration::from_secs(secs);
    assert!(n_clients >= 1 && workers >= 1);

    let certs = Certs::new();
    let http = http_client();
    let statsd = Statsd::start().await;
    let timings = [
        "--connect-wait",
        "2",
        "--handshake-timeout",
        "5",
        "--grace",
        "2",
    ];
    let mut server_flags: Vec<String> = timings.iter().map(|s| s.to_string()).collect();
    server_flags.extend(statsd.flags());
    let server_flags: Vec<&str> = server_flags.iter().map(String::as_str).collect();
    let (mut server, pipe_port) = start_server(&certs, &server_flags).await;
    let mut client_flags: Vec<&str> = timings.to_vec();
    client_flags.extend(["--reconnect-max", "2"]);
    let mut clients = Vec::new();
    let mut names = Vec::new();
    for i in 1..=n_clients {
        let name = format!("soak-{i}");
        let cert = certs.client(&name);
        let args = client_args(&certs, &cert, loopback(pipe_port), &client_flags);
        clients.push(Node::start(certs.dir(), &name, args).await);
        names.push(name);
    }
    names.sort();
    assert!(
        all_connected(&http, &server, &clients, &names, Duration::from_secs(30)).await,
        "the clients never all connected"
    );

    // Warm up, then take the starting figures.
    let warm = Load::start(LoadSpec {
        urls: clients.iter().map(|c| c.url("/server/time")).collect(),
        workers,
        timeout_ms: 5000,
        outer: Duration::from_secs(30),
        pause: Duration::from_millis(pause_ms),
    });
    tokio::time::sleep(Duration::from_secs(5)).await;
    warm.finish().await;
    let mut server_samples: Vec<(u32, Sample, Sample)> = Vec::new();
    let mut server_start = sample(&server);
    let clients_start: Vec<Sample> = clients.iter().map(sample).collect();

    // The load: client nodes to the server (time and cat), and the server to each client.
    let mut up_urls = Vec::new();
    for c in &clients {
        up_urls.push(c.url("/server/time"));
        up_urls.push(c.url("/server/cat//soak/%20test"));
    }
    let up = Load::start(LoadSpec {
        urls: up_urls,
        workers,
        timeout_ms: 5000,
        outer: Duration::from_secs(30),
        pause: Duration::from_millis(pause_ms),
    });
    let down = Load::start(LoadSpec {
        urls: names
            .iter()
            .map(|n| server.url(&format!("/client/{n}/time")))
            .collect(),
        workers: 2,
        timeout_ms: 5000,
        outer: Duration::from_secs(30),
        pause: Duration::from_millis(pause_ms * 2),
    });

    // A client that flaps all along, and a few hostile connections every 30 s.
    let stop = Arc::new(AtomicBool::new(false));
    let flaps = Arc::new(AtomicU64::new(0));
    let hostile = Arc::new(AtomicU64::new(0));
    let pipe = loopback(pipe_port);
    let flapper = tokio::spawn({
        let (stop, flaps, hostile) = (stop.clone(), flaps.clone(), hostile.clone());
        let connector = certs.connector("soak-flapper");
        async move {
            let mut i = 0u64;
            let mut last_hostile = Instant::now();
            while !stop.load(Ordering::Relaxed) {
                if flap {
                    // Over TLS: hello, a request, gone (sometimes before its reply). A
                    // refused or cut connection (the server may be restarting) is fine.
                    if let Ok(Ok(mut peer)) = tokio::time::timeout(
                        Duration::from_secs(5),
                        TlsPeer::connect_tls(pipe, &connector),
                    )
                    .await
                    {
                        let _ = tokio::time::timeout(Duration::from_secs(5), async {
                            peer.send(&client_hello(
                                "soak-flapper",
                                restpipe::wire::PROTOCOL_VERSION,
                            ))
                            .await?;
                            peer.send(&event_frame(1, Request::new("GET", "time")))
                                .await?;
                            if i % 2 == 0 {
                                let _ = peer.recv_any().await;
                            }
                            Ok::<_, std::io::Error>(())
                        })
                        .await;
                    }
                    flaps.fetch_add(1, Ordering::Relaxed);
                    i += 1;
                }
                if last_hostile.elapsed() >= Duration::from_secs(30) {
                    last_hostile = Instant::now();
                    let mut held = Vec::new();
                    for _ in 0..20 {
                        if let Ok(tcp) = tokio::net::TcpStream::connect(pipe).await {
                            held.push(tcp);
                        }
                    }
                    for _ in 0..5 {
                        if let Ok(mut tcp) = tokio::net::TcpStream::connect(pipe).await {
                            use tokio::io::AsyncWriteExt;
                            let _ = tcp.write_all(&[0u8; 512]).await;
                        }
                    }
                    hostile.fetch_add(25, Ordering::Relaxed);
                    // Held until the server's handshake timeout lets them go.
                    tokio::spawn(async move {
                        tokio::time::sleep(Duration::from_secs(8)).await;
                        drop(held);
                    });
                }
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        }
    });

    let started = Instant::now();
    let date = SystemTime::now();
    let restart_every = duration / (restarts as u32 + 1);
    let mut next_restart = restart_every;
    let mut outages = Vec::new();
    let mut all_back_at = Duration::ZERO;
    let mut progress = Instant::now();
    while started.elapsed() < duration {
        if restarts > 0 && started.elapsed() >= next_restart && outages.len() < restarts as usize {
            server_samples.push((server.pid(), server_start, sample(&server)));
            let killed = Instant::now();
            server.kill();
            tokio::time::sleep(Duration::from_millis(1000)).await;
            server.restart().await;
            assert!(
                all_connected(&http, &server, &clients, &names, Duration::from_secs(60)).await,
                "not every client came back after restart {}",
                outages.len() + 1
            );
            outages.push(killed.elapsed());
            all_back_at = started.elapsed();
            next_restart += restart_every;
            // The new server's starting figures, once it has warmed up.
            tokio::time::sleep(Duration::from_secs(5)).await;
            server_start = sample(&server);
        }
        if progress.elapsed() >= Duration::from_secs(30) {
            progress = Instant::now();
            let s = sample(&server);
            println!(
                "[{:>4.0} s] requests {} up, {} down; server RSS {} KiB, fds {}; flaps {}",
                started.elapsed().as_secs_f64(),
                up.len(),
                down.len(),
                s.rss_kib,
                s.fds,
                flaps.load(Ordering::Relaxed)
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let ran = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    flapper.await.unwrap();
    let (up_tally, up_records) = up.finish().await;
    let (down_tally, down_records) = down.finish().await;
    // Let the last flap and hostile connections go before the final figures.
    tokio::time::sleep(Duration::from_secs(10)).await;
    server_samples.push((server.pid(), server_start, sample(&server)));
    let clients_end: Vec<Sample> = clients.iter().map(sample).collect();

    // Figures.
    let mut latencies: Vec<Duration> = up_records
        .iter()
        .filter(|r| r.outcome == Outcome::Status(200))
        .map(|r| r.latency)
        .collect();
    latencies.sort();
    let settled = all_back_at + Duration::from_secs(5);
    let after_restart: Vec<&Record> = up_records
        .iter()
        .filter(|r| restarts > 0 && r.sent_at >= settled)
        .collect();
    let after_restart_ok = after_restart
        .iter()
        .filter(|r| r.outcome == Outcome::Status(200))
        .count();
    let down_outside_outages: Vec<&Record> = down_records
        .iter()
        .filter(|r| r.outcome != Outcome::Status(200) && (restarts == 0 || r.sent_at >= settled))
        .collect();
    let machine = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, m)| m.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let unix = date
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs();

    let mut report = String::new();
    let w = &mut report;
    writeln!(w, "### Soak run").unwrap();
    writeln!(w).unwrap();
    writeln!(
        w,
        "- started at unix time {unix}; ran {:.0} s on {cpus} CPUs ({machine})",
        ran.as_secs_f64()
    )
    .unwrap();
    writeln!(
        w,
        "- load: {n_clients} client processes, {workers} workers through them to the server \
         (`/server/time`, `/server/cat//...`), 2 workers from the server to the clients, \
         {pause_ms} ms pause per worker; {:.0} requests/s served on average",
        (up_tally.status(200) + down_tally.status(200)) as f64 / ran.as_secs_f64()
    )
    .unwrap();
    writeln!(
        w,
        "- faults: {restarts} server SIGKILL and restart on the same port (every client back \
         after {outages:?}); a flapping client, {} connections; {} hostile connections (silent \
         or garbage)",
        flaps.load(Ordering::Relaxed),
        hostile.load(Ordering::Relaxed)
    )
    .unwrap();
    writeln!(w, "- client nodes to the server: {up_tally}").unwrap();
    writeln!(
        w,
        "  - latency of the 200s: p50 {:?}, p99 {:?}, p99.9 {:?}, max {:?}",
        percentile(&latencies, 0.5),
        percentile(&latencies, 0.99),
        percentile(&latencies, 0.999),
        latencies.last().copied().unwrap_or_default()
    )
    .unwrap();
    if restarts > 0 {
        writeln!(
            w,
            "  - sent from 5 s after the last restart on: {} of {} answered 200",
            after_restart_ok,
            after_restart.len()
        )
        .unwrap();
    }
    writeln!(
        w,
        "- the server node to the clients: {down_tally} (transport errors: the server's HTTP \
         endpoint was down while it restarted)"
    )
    .unwrap();
    writeln!(
        w,
        "- refused handshakes counted by the server: {:?}",
        statsd.counters("tls.handshake.rejected.")
    )
    .unwrap();
    for (i, (pid, start, end)) in server_samples.iter().enumerate() {
        writeln!(
            w,
            "- server process {} (pid {pid}): RSS {} KiB -> {} KiB, fds {} -> {}",
            i + 1,
            start.rss_kib,
            end.rss_kib,
            start.fds,
            end.fds
        )
        .unwrap();
    }
    for (c, (start, end)) in clients.iter().zip(clients_start.iter().zip(&clients_end)) {
        writeln!(
            w,
            "- client {}: RSS {} KiB -> {} KiB, fds {} -> {}",
            c.name, start.rss_kib, end.rss_kib, start.fds, end.fds
        )
        .unwrap();
    }
    writeln!(
        w,
        "- lost (sent, never answered): {} + {}; hung: {}",
        up_tally.lost(),
        down_tally.lost(),
        up_tally.by_outcome.get(&Outcome::Hung).unwrap_or(&0)
            + down_tally.by_outcome.get(&Outcome::Hung).unwrap_or(&0)
    )
    .unwrap();
    println!("{report}");
    if let Ok(path) = std::env::var("RESTPIPE_SOAK_REPORT") {
        std::fs::write(&path, &report).unwrap_or_else(|e| panic!("write {path}: {e}"));
    }

    // Nothing lost, nothing hung, only the answers the contract allows.
    assert_eq!(up_tally.lost() + down_tally.lost(), 0);
    assert_eq!(up_tally.unexpected(), 0, "{up_tally}");
    assert!(
        !down_tally.by_outcome.contains_key(&Outcome::Hung),
        "{down_tally}"
    );
    assert!(up_tally.status(200) > 0);
    if restarts > 0 {
        assert_eq!(
            after_restart_ok,
            after_restart.len(),
            "after the last restart"
        );
    }
    assert!(
        down_outside_outages.is_empty(),
        "the server's requests failed away from the restarts: {:?}",
        &down_outside_outages[..down_outside_outages.len().min(10)]
    );
    // Flat memory and descriptors, with generous bounds.
    for (pid, start, end) in &server_samples {
        assert!(
            end.fds <= start.fds + 5,
            "server {pid}: fds {} -> {}",
            start.fds,
            end.fds
        );
        assert!(
            end.rss_kib < start.rss_kib + 32 * 1024,
            "server {pid}: RSS {} -> {} KiB",
            start.rss_kib,
            end.rss_kib
        );
    }
    for (c, (start, end)) in clients.iter().zip(clients_start.iter().zip(&clients_end)) {
        assert!(end.fds <= start.fds + 5, "{}: fds", c.name);
        assert!(
            end.rss_kib < start.rss_kib + 32 * 1024,
            "{}: RSS {} -> {} KiB",
            c.name,
            start.rss_kib,
            end.rss_kib
        );
    }
    for c in &mut clients {
        assert!(c.terminate().await, "{} did not stop cleanly", c.name);
    }
    assert!(server.terminate().await, "the server did not stop cleanly");
}
