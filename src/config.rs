//! Settings of the `restpipe` command: flags, environment variables, an optional TOML file.
//!
//! Every setting is a flag, most have an environment variable (RestPipe's `RP_*` names where
//! they apply), and every one is a key of the TOML file given with `--config`. A flag beats
//! its environment variable (clap does that), which beats the file, which beats the default.
//! Unknown keys in the file are refused; every setting is checked at start-up and a problem
//! is one clear line.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use serde::Deserialize;

use crate::node::PipeConfig;
use crate::tls::TlsFiles;

/// restpipe: a durable mutual-TLS pipe that carries REST calls between client nodes and a
/// server node.
#[derive(Debug, Parser)]
#[command(name = "restpipe", version, about, long_about = None)]
pub struct Cli {
    /// What to run.
    #[command(subcommand)]
    pub command: Command,
}

/// The commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a server node: listen for clients, serve /client/{identity}/... on loopback.
    Server(NodeArgs),
    /// Run a client node: dial the server, serve /server/... on loopback.
    Client(NodeArgs),
    /// Run a server and a client on this machine with throwaway certificates, and print
    /// curl lines to try.
    Demo(DemoArgs),
}

/// Flags of `restpipe demo`.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// The client node's HTTP address.
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub client_http: SocketAddr,
    /// The server node's HTTP address.
    #[arg(long, default_value = "127.0.0.1:8081")]
    pub server_http: SocketAddr,
    /// Handler sets both nodes run.
    #[arg(long, value_delimiter = ',', default_value = "time,files")]
    pub handlers: Vec<String>,
    /// Debug logs.
    #[arg(long, env = "DEBUG", value_parser = parse_flag, default_value = "false")]
    pub debug: bool,
}

/// Flags of `restpipe server` and `restpipe client`. Defaults depend on the side.
///
/// The same struct reads the TOML file: every key optional (the flag's name with `_` for
/// `-`), unknown keys refused.
#[derive(Debug, Args, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NodeArgs {
    /// A TOML file with any of these settings (keys as the flags, with `_` for `-`).
    #[arg(long, env = "RP_CONFIG")]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// The CA certificate that peers must chain to [default: certs/ca.pem].
    #[arg(long, env = "RP_CA")]
    pub ca: Option<PathBuf>,
    /// This node's certificate [default: certs/server.pem or certs/client.pem].
    #[arg(long, env = "RP_CERT")]
    pub cert: Option<PathBuf>,
    /// This node's private key [default: certs/server.key or certs/client.key].
    #[arg(long, env = "RP_KEY")]
    pub key: Option<PathBuf>,
    /// Server: the interface the pipe listens on [default: 0.0.0.0].
    #[arg(long, env = "RP_SERVER_BIND_INTERFACE")]
    pub bind_interface: Option<IpAddr>,
    /// Server: the port the pipe listens on [default: 1234].
    #[arg(long, env = "RP_SERVER_BIND_PORT")]
    pub bind_port: Option<u16>,
    /// Server: connections held at once [default: 16384].
    #[arg(long, env = "RP_MAX_CONNECTIONS")]
    pub max_connections: Option<usize>,
    /// Client: the server's host name or address [default: localhost].
    #[arg(long, env = "RP_CLIENT_TARGET_HOSTNAME")]
    pub server_host: Option<String>,
    /// Client: the server's pipe port [default: 1234].
    #[arg(long, env = "RP_CLIENT_TARGET_PORT")]
    pub server_port: Option<u16>,
    /// Client: the name the server's certificate must carry [default: the server host].
    #[arg(long, env = "RP_CLIENT_SERVER_NAME")]
    pub server_name: Option<String>,
    /// Client: the longest reconnect delay, seconds [default: 10].
    #[arg(long, env = "RP_CLIENT_RECONNECT_MAX_S")]
    pub reconnect_max: Option<f64>,
    /// The local HTTP endpoint [default: 127.0.0.1:8081 server, 127.0.0.1:8080 client].
    #[arg(long, env = "RP_HTTP_BIND")]
    pub http: Option<SocketAddr>,
    /// A bearer token that every HTTP request must carry (needed to bind a non-loopback
    /// address).
    #[arg(long, env = "RP_HTTP_TOKEN", hide_env_values = true)]
    pub http_token: Option<String>,
    /// Allow a non-loopback HTTP address without a token.
    #[arg(long)]
    pub http_insecure: bool,
    /// Handler sets to run, comma separated: time, files, forward [default: time].
    #[arg(long, env = "RP_HANDLERS", value_delimiter = ',')]
    pub handlers: Option<Vec<String>>,
    /// The directory the `files` handlers serve.
    #[arg(long, env = "RP_FILES_ROOT")]
    pub files_root: Option<PathBuf>,
    /// A `forward` route, `noun=http://127.0.0.1:9000/base` (repeatable).
    #[arg(long = "forward", env = "RP_FORWARD", value_delimiter = ',')]
    pub forward: Option<Vec<String>>,
    /// Seconds between heartbeats [default: 5].
    #[arg(long, env = "RP_CLIENT_HEARTBEAT_INTERVAL_S")]
    pub heartbeat_interval: Option<f64>,
    /// Seconds of silence after which the peer is dead [default: 10].
    #[arg(long, env = "RP_CLIENT_HEARTBEAT_TIMEOUT_S")]
    pub heartbeat_timeout: Option<f64>,
    /// Seconds allowed for the TCP connect, the TLS handshake and the hello, each [default: 10].
    #[arg(long, env = "RP_HANDSHAKE_TIMEOUT_S")]
    pub handshake_timeout: Option<f64>,
    /// Seconds a request waits for the peer to be connected [default: 5].
    #[arg(long, env = "RP_CONNECT_WAIT_S")]
    pub connect_wait: Option<f64>,
    /// Seconds a request waits for its reply, unless it sends X-Event-Timeout-Ms [default: 30].
    #[arg(long, env = "RP_REQUEST_TIMEOUT_S")]
    pub request_timeout: Option<f64>,
    /// Largest event or reply body, bytes [default: 16777216].
    #[arg(long, env = "RP_MAX_FRAME")]
    pub max_frame: Option<usize>,
    /// Requests in flight per connection and direction [default: 1024].
    #[arg(long, env = "RP_MAX_IN_FLIGHT")]
    pub max_in_flight: Option<usize>,
    /// Seconds given to in-flight requests at shutdown [default: 10].
    #[arg(long, env = "RP_SHUTDOWN_GRACE_S")]
    pub grace: Option<f64>,
    /// The statsd host; empty disables metrics [default: localhost].
    #[arg(long, env = "RP_STATSD_HOST")]
    pub statsd_host: Option<String>,
    /// The statsd port [default: 8125].
    #[arg(long, env = "RP_STATSD_PORT")]
    pub statsd_port: Option<u16>,
    /// The prefix of every metric name [default: restpipe].
    #[arg(long, env = "RP_STATSD_PREFIX")]
    pub statsd_prefix: Option<String>,
    /// Debug logs.
    #[arg(long, env = "DEBUG", value_parser = parse_flag)]
    pub debug: Option<bool>,
}

/// `DEBUG=1`, `true`, `yes`, `on` mean yes; `0`, `false`, `no`, `off`, empty mean no.
fn parse_flag(s: &str) -> Result<bool, String> {
    match s.trim().to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "on" => Ok(true),
        "" | "0" | "false" | "no" | "off" => Ok(false),
        other => Err(format!("{other:?} is not a yes/no value (use 1 or 0)")),
    }
}

/// Where metrics go.
#[derive(Clone, Debug, PartialEq)]
pub struct StatsdSettings {
    /// Host; `None` disables metrics.
    pub host: Option<String>,
    /// Port.
    pub port: u16,
    /// Prefix of every name.
    pub prefix: String,
}

/// Everything a node needs, merged and checked.
#[derive(Clone)]
pub struct Settings {
    /// The PEM files.
    pub tls: TlsFiles,
    /// Server: where the pipe listens.
    pub bind: SocketAddr,
    /// Server: connections held at once.
    pub max_connections: usize,
    /// Client: `host:port` of the server.
    pub server: String,
    /// Client: the name the server's certificate must carry.
    pub server_name: Option<String>,
    /// Client: longest reconnect delay.
    pub reconnect_max: Duration,
    /// The local HTTP endpoint.
    pub http: SocketAddr,
    /// The bearer token of the HTTP endpoint.
    pub http_token: Option<String>,
    /// Handler sets to run.
    pub handlers: Vec<String>,
    /// Root of the `files` handlers.
    pub files_root: Option<PathBuf>,
    /// Routes of the `forward` handlers.
    pub forward: Vec<String>,
    /// Pipe settings.
    pub pipe: PipeConfig,
    /// Shutdown grace period.
    pub grace: Duration,
    /// Metrics.
    pub statsd: StatsdSettings,
    /// Debug logs.
    pub debug: bool,
}

impl std::fmt::Debug for Settings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Settings")
            .field("tls", &self.tls)
            .field("bind", &self.bind)
            .field("server", &self.server)
            .field("http", &self.http)
            .field("http_token", &self.http_token.as_ref().map(|_| "<set>"))
            .field("handlers", &self.handlers)
            .field("pipe", &self.pipe)
            .finish_non_exhaustive()
    }
}

fn seconds(name: &str, value: Option<f64>, default: Duration) -> Result<Duration, String> {
    match value {
        None => Ok(default),
        Some(s) if (0.0..=86_400.0).contains(&s) => Ok(Duration::from_secs_f64(s)),
        Some(s) => Err(format!(
            "--{name} must be between 0 and 86400 seconds, not {s}"
        )),
    }
}

impl Settings {
    /// Merge flags (with their env vars), the config file and the defaults for `side`, and
    /// check the result.
    pub fn resolve(args: NodeArgs, side: restpipe_handler::Side) -> Result<Settings, String> {
        let file = match &args.config {
            Some(path) => read_file(path)?,
            None => NodeArgs::default(),
        };
        let server_side = side == restpipe_handler::Side::Server;
        let certs = Path::new(restpipe_certs::DEFAULT_DIR);
        let own = if server_side { "server" } else { "client" };
        macro_rules! pick {
            ($field:ident) => {
                args.$field.or(file.$field)
            };
        }
        let tls = TlsFiles {
            ca: pick!(ca).unwrap_or_else(|| certs.join("ca.pem")),
            cert: pick!(cert).unwrap_or_else(|| certs.join(format!("{own}.pem"))),
            key: pick!(key).unwrap_or_else(|| certs.join(format!("{own}.key"))),
        };
        let defaults = PipeConfig::default();
        let pipe = PipeConfig {
            heartbeat_interval: seconds(
                "heartbeat-interval",
                pick!(heartbeat_interval),
                defaults.heartbeat_interval,
            )?,
            heartbeat_timeout: seconds(
                "heartbeat-timeout",
                pick!(heartbeat_timeout),
                defaults.heartbeat_timeout,
            )?,
            handshake_timeout: seconds(
                "handshake-timeout",
                pick!(handshake_timeout),
                defaults.handshake_timeout,
            )?,
            connect_wait: seconds("connect-wait", pick!(connect_wait), defaults.connect_wait)?,
            request_timeout: seconds(
                "request-timeout",
                pick!(request_timeout),
                defaults.request_timeout,
            )?,
            max_frame: pick!(max_frame).unwrap_or(defaults.max_frame),
            max_in_flight: pick!(max_in_flight).unwrap_or(defaults.max_in_flight),
            ..defaults
        };
        pipe.validate().map_err(|e| e.to_string())?;

        let http = pick!(http).unwrap_or_else(|| {
            let port = if server_side { 8081 } else { 8080 };
            SocketAddr::from(([127, 0, 0, 1], port))
        });
        let http_token = pick!(http_token).filter(|t| !t.is_empty());
        let http_insecure = args.http_insecure || file.http_insecure;
        if !http.ip().is_loopback() && http_token.is_none() && !http_insecure {
            return Err(format!(
                "the HTTP endpoint {http} is not on loopback: give --http-token (every request must then carry it) or --http-insecure"
            ));
        }
        let server_host = pick!(server_host).unwrap_or_else(|| "localhost".into());
        let server_port = pick!(server_port).unwrap_or(1234);
        let server = if server_host.contains(':') && !server_host.starts_with('[') {
            format!("[{server_host}]:{server_port}")
        } else {
            format!("{server_host}:{server_port}")
        };
        let statsd_host = pick!(statsd_host).unwrap_or_else(|| "localhost".into());
        let handlers: Vec<String> = pick!(handlers)
            .unwrap_or_else(|| vec!["time".into()])
            .into_iter()
            .map(|h| h.trim().to_string())
            .filter(|h| !h.is_empty())
            .collect();
        Ok(Settings {
            tls,
            bind: SocketAddr::new(
                pick!(bind_interface).unwrap_or(IpAddr::from([0, 0, 0, 0])),
                pick!(bind_port).unwrap_or(1234),
            ),
            max_connections: pick!(max_connections).unwrap_or(16384).max(1),
            server,
            server_name: pick!(server_name),
            reconnect_max: seconds(
                "reconnect-max",
                pick!(reconnect_max),
                Duration::from_secs(10),
            )?,
            http,
            http_token,
            handlers,
            files_root: pick!(files_root),
            forward: pick!(forward).unwrap_or_default(),
            pipe,
            grace: seconds("grace", pick!(grace), Duration::from_secs(10))?,
            statsd: StatsdSettings {
                host: Some(statsd_host).filter(|h| !h.is_empty()),
                port: pick!(statsd_port).unwrap_or(8125),
                prefix: pick!(statsd_prefix).unwrap_or_else(|| "restpipe".into()),
            },
            debug: pick!(debug).unwrap_or(false),
        })
    }
}

fn read_file(path: &Path) -> Result<NodeArgs, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read the config file {}: {e}", path.display()))?;
    toml::from_str(&text)
        .map_err(|e| format!("config file {}: {}", path.display(), e.message().trim_end()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use restpipe_handler::Side;

    #[test]
    fn defaults_follow_the_contract() {
        let s = Settings::resolve(NodeArgs::default(), Side::Server).unwrap();
        assert_eq!(s.bind, "0.0.0.0:1234".parse().unwrap());
        assert_eq!(s.http, "127.0.0.1:8081".parse().unwrap());
        assert_eq!(s.tls.cert, Path::new("certs/server.pem"));
        let c = Settings::resolve(NodeArgs::default(), Side::Client).unwrap();
        assert_eq!(c.server, "localhost:1234");
        assert_eq!(c.http, "127.0.0.1:8080".parse().unwrap());
        assert_eq!(c.statsd.host.as_deref(), Some("localhost"));
    }

    #[test]
    fn flag_beats_file_beats_default() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("rp.toml");
        std::fs::write(&path, "bind_port = 4000\nhttp = \"127.0.0.1:9000\"\n").unwrap();
        let args = NodeArgs {
            config: Some(path.clone()),
            bind_port: Some(5000),
            ..NodeArgs::default()
        };
        let s = Settings::resolve(args, Side::Server).unwrap();
        assert_eq!(s.bind.port(), 5000);
        assert_eq!(s.http.port(), 9000);
        std::fs::write(&path, "bind_prt = 4000\n").unwrap();
        let args = NodeArgs {
            config: Some(path),
            ..NodeArgs::default()
        };
        let err = Settings::resolve(args, Side::Server).unwrap_err();
        assert!(err.contains("bind_prt"), "{err}");
    }

    #[test]
    fn public_http_needs_a_token() {
        let args = NodeArgs {
            http: Some("0.0.0.0:8080".parse().unwrap()),
            ..NodeArgs::default()
        };
        assert!(Settings::resolve(args, Side::Client)
            .unwrap_err()
            .contains("--http-token"));
        let args = NodeArgs {
            http: Some("0.0.0.0:8080".parse().unwrap()),
            http_token: Some("s3cret".into()),
            ..NodeArgs::default()
        };
        assert!(Settings::resolve(args, Side::Client).is_ok());
    }

    #[test]
    fn bad_durations_are_refused() {
        let args = NodeArgs {
            heartbeat_interval: Some(-1.0),
            ..NodeArgs::default()
        };
        assert!(Settings::resolve(args, Side::Client).is_err());
    }
}
