//! restpipe's test kit: everything the integration tests (`tests/*.rs`) and the bench
//! (`benches/pipe`) need to stand up nodes and poke at them, in one dev-only place.
//!
//! - [`bulk`]: large bodies whose every chunk is distinct, their SHA-256, `curl` as a caller;
//! - [`certs`]: certificates, in memory ([`certs::Pki`]) or as files of a development set
//!   ([`certs::Certs`]);
//! - [`nodes`]: in-process server and client nodes on `127.0.0.1:0`, with test handlers;
//! - [`relay`]: a TCP relay that can pause, throttle or cut a link;
//! - [`raw`]: a hand-driven peer speaking the wire protocol frame by frame, against the kit's
//!   own compile of `proto/restpipe.proto`;
//! - [`procs`]: the process harness: real `restpipe` processes started on port 0, their
//!   bound addresses read from what they print, SIGKILL, SIGTERM, restart, `/proc` figures;
//! - [`http`]: an HTTP client and a load generator that tallies every answer;
//! - [`hook`]: an upstream that records what the `forward` plug-in delivers to it;
//! - [`statsd`]: a UDP listener standing in for statsd;
//! - [`nats`]: a real nats-server for the cluster tests, found and started on a port it picks;
//! - [`logs`]: captures the log lines of the test binary;
//! - [`wait`]: waiting on a condition within a bound instead of sleeping.
//!
//! No port is ever chosen by binding and releasing a socket: in-process nodes bind
//! `127.0.0.1:0` and report their address, processes are given port 0 and print theirs.

#![allow(clippy::unwrap_used, clippy::expect_used)]

pub mod bulk;
pub mod certs;
pub mod hook;
pub mod http;
pub mod logs;
pub mod nats;
pub mod nodes;
pub mod procs;
pub mod raw;
pub mod relay;
pub mod statsd;
pub mod wait;
