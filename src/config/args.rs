//! The command line: the subcommands and the flags each one takes.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use serde::Deserialize;

use crate::http::HttpListen;
use crate::plugins;

use super::*;

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
    Server(ServerArgs),
    /// Run a client node: dial the server, serve /server/... on loopback.
    Client(ClientArgs),
    /// Run a server and a client on this machine with throwaway certificates, and print
    /// curl lines to try.
    Demo(DemoArgs),
    /// Print a running node's /status as a table.
    Status(StatusArgs),
    /// Print the completions of this command for a shell (bash, zsh, fish, elvish,
    /// powershell).
    Completions(CompletionsArgs),
}

/// Flags of `restpipe status`.
#[derive(Debug, Args)]
pub struct StatusArgs {
    /// The node's HTTP endpoint: an address, or unix:<path> for a Unix socket.
    #[arg(long, env = "RP_HTTP_BIND", default_value = "127.0.0.1:8080")]
    pub http: HttpListen,
    /// The node's HTTP endpoint as a Unix socket (the same as --http unix:<path>).
    #[arg(long, value_name = "PATH", conflicts_with = "http")]
    pub unix: Option<PathBuf>,
    /// The bearer token the endpoint requires, if any.
    #[arg(long, env = "RP_HTTP_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Print the JSON of /status as the node sends it, not a table.
    #[arg(long)]
    pub json: bool,
}

impl StatusArgs {
    /// Where to ask: `--unix` if given, else `--http`.
    pub fn endpoint(&self) -> HttpListen {
        match &self.unix {
            Some(path) => HttpListen::Unix(path.clone()),
            None => self.http.clone(),
        }
    }
}

/// Flags of `restpipe completions`.
#[derive(Debug, Args)]
pub struct CompletionsArgs {
    /// The shell to print completions for.
    pub shell: clap_complete::Shell,
}

/// The format of the logs on stderr.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object a line, for log shippers.
    Json,
}

/// The logging flags, shared by the nodes and the demo.
#[derive(Debug, Default, Args)]
pub struct LogArgs {
    /// Debug logs (also DEBUG=1).
    #[arg(long, env = "DEBUG", num_args = 0, default_missing_value = "true", value_parser = parse_flag)]
    pub debug: Option<bool>,
    /// The format of the logs on stderr [default: text].
    #[arg(long, env = "RP_LOG_FORMAT", value_enum)]
    pub log_format: Option<LogFormat>,
}

/// Where metrics go: shared by the nodes and the demo.
#[derive(Debug, Default, Args)]
pub struct StatsdArgs {
    /// The statsd host; empty disables metrics [default: localhost].
    #[arg(long, env = "RP_STATSD_HOST")]
    pub statsd_host: Option<String>,
    /// The statsd port [default: 8125].
    #[arg(long, env = "RP_STATSD_PORT")]
    pub statsd_port: Option<u16>,
    /// The prefix of every metric name [default: restpipe].
    #[arg(long, env = "RP_STATSD_PREFIX")]
    pub statsd_prefix: Option<String>,
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
    #[arg(long, value_delimiter = ',', default_value = plugins::DEMO_HANDLERS)]
    pub handlers: Vec<String>,
    /// Where both nodes send their metrics.
    #[command(flatten)]
    pub statsd: StatsdArgs,
    /// Logging.
    #[command(flatten)]
    pub log: LogArgs,
}

impl DemoArgs {
    /// The node settings the demo's flags give (metrics and logs); the rest are defaults.
    pub fn node_args(&self) -> NodeArgs {
        NodeArgs {
            statsd_host: self.statsd.statsd_host.clone(),
            statsd_port: self.statsd.statsd_port,
            statsd_prefix: self.statsd.statsd_prefix.clone(),
            debug: self.log.debug,
            log_format: self.log.log_format,
            ..NodeArgs::default()
        }
    }
}

/// Flags of `restpipe server`: the common ones and the server's own.
#[derive(Debug, Args)]
pub struct ServerArgs {
    /// The server's own settings.
    #[command(flatten, next_help_heading = "Server")]
    pub server: ServerOnlyArgs,
    /// The settings both sides take.
    #[command(flatten, next_help_heading = "Both sides")]
    pub common: CommonArgs,
}

/// Flags of `restpipe client`: the common ones and the client's own.
#[derive(Debug, Args)]
pub struct ClientArgs {
    /// The client's own settings.
    #[command(flatten, next_help_heading = "Client")]
    pub client: ClientOnlyArgs,
    /// The settings both sides take.
    #[command(flatten, next_help_heading = "Both sides")]
    pub common: CommonArgs,
}

/// The flags only a server takes.
#[derive(Debug, Default, Args)]
pub struct ServerOnlyArgs {
    /// The CA that client certificates must chain to, when not --ca.
    #[arg(long, env = "RP_CLIENT_CA")]
    pub client_ca: Option<PathBuf>,
    /// The interface the pipe listens on [default: 0.0.0.0].
    #[arg(long, env = "RP_SERVER_BIND_INTERFACE")]
    pub bind_interface: Option<IpAddr>,
    /// The port the pipe listens on [default: 1234].
    #[arg(long, env = "RP_SERVER_BIND_PORT")]
    pub bind_port: Option<u16>,
    /// Connections held at once [default: 16384].
    #[arg(long, env = "RP_MAX_CONNECTIONS")]
    pub max_connections: Option<usize>,
    /// TLS handshakes pending at once, in total [default: 1024].
    #[arg(long, env = "RP_MAX_HANDSHAKES")]
    pub max_handshakes: Option<usize>,
    /// TLS handshakes pending at once from one source address [default: 64].
    #[arg(long, env = "RP_MAX_HANDSHAKES_PER_SOURCE")]
    pub max_handshakes_per_source: Option<usize>,
    /// Run as a replica of a cluster: a NATS server URL, `nats://[user:pass@]host:4222`
    /// (repeatable; comma separated in the environment) [default: none, a single server].
    #[arg(
        long = "cluster",
        env = "RP_CLUSTER",
        value_delimiter = ',',
        value_name = "URL"
    )]
    pub cluster: Option<Vec<String>>,
    /// The cluster's name, shared by its replicas: part of every NATS subject [default:
    /// default].
    #[arg(long, env = "RP_CLUSTER_NAME")]
    pub cluster_name: Option<String>,
    /// This replica's name, unique in the cluster [default: host name:pipe port].
    #[arg(long, env = "RP_REPLICA_NAME")]
    pub replica_name: Option<String>,
    /// A NATS credentials file (JWT and NKey seed) for the cluster connection.
    #[arg(long, env = "RP_CLUSTER_CREDS", value_name = "FILE")]
    pub cluster_creds: Option<PathBuf>,
    /// A CA certificate (PEM) to verify the NATS server with; TLS is then required.
    #[arg(long, env = "RP_CLUSTER_TLS_CA", value_name = "FILE")]
    pub cluster_tls_ca: Option<PathBuf>,
    /// With --cluster: a directory every replica can reach, with real exclusive file locks,
    /// where each keeps its queue's store (DIR/<replica name>/) and adopts the stores of dead
    /// replicas (docs/CLUSTER.md) [default: none, each store under its --data-dir].
    #[arg(long, env = "RP_QUEUE_SHARED_DIR", value_name = "DIR")]
    pub queue_shared_dir: Option<PathBuf>,
}

/// The flags only a client takes.
#[derive(Debug, Default, Args)]
pub struct ClientOnlyArgs {
    /// The server's host name or address, or several `host[:port]`, comma separated (the
    /// replicas of a cluster: a random one first, then the next) [default: localhost].
    #[arg(long, env = "RP_CLIENT_TARGET_HOSTNAME")]
    pub server_host: Option<String>,
    /// The server's pipe port [default: 1234].
    #[arg(long, env = "RP_CLIENT_TARGET_PORT")]
    pub server_port: Option<u16>,
    /// The name the server's certificate must carry [default: the server host].
    #[arg(long, env = "RP_CLIENT_SERVER_NAME")]
    pub server_name: Option<String>,
    /// The longest reconnect delay, seconds [default: 10].
    #[arg(long, env = "RP_CLIENT_RECONNECT_MAX_S")]
    pub reconnect_max: Option<f64>,
}

/// The flags both a server and a client take. Defaults depend on the side.
#[derive(Debug, Default, Args)]
pub struct CommonArgs {
    /// A TOML file with any of these settings (keys as the flags, with `_` for `-`).
    #[arg(long, env = "RP_CONFIG")]
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
    /// A certificate revocation list (PEM) whose certificates are refused (repeatable; re-read
    /// on SIGHUP).
    #[arg(long = "crl", env = "RP_CRL", value_delimiter = ',')]
    pub crls: Option<Vec<PathBuf>>,
    /// The local HTTP endpoint: an address, or unix:<path> for a Unix socket [default:
    /// 127.0.0.1:8081 server, 127.0.0.1:8080 client].
    #[arg(long, env = "RP_HTTP_BIND")]
    pub http: Option<HttpListen>,
    /// Host names and addresses that Host and Origin may name besides loopback, comma
    /// separated (a node behind a proxy, or on a non-loopback address) [default: none].
    #[arg(long, env = "RP_HTTP_ALLOWED_HOSTS", value_delimiter = ',')]
    pub http_allowed_hosts: Option<Vec<String>>,
    /// The permissions of the Unix socket of `--http unix:<path>`, octal [default: 0660].
    #[arg(long, env = "RP_HTTP_SOCKET_MODE")]
    pub http_socket_mode: Option<String>,
    /// Seconds to receive a request's headers [default: 10].
    #[arg(long, env = "RP_HTTP_HEADER_TIMEOUT_S")]
    pub http_header_timeout: Option<f64>,
    /// Seconds a request body may bring no byte before the answer is 408 [default: 10].
    #[arg(long, env = "RP_HTTP_BODY_TIMEOUT_S")]
    pub http_body_timeout: Option<f64>,
    /// Seconds a kept-alive HTTP connection may wait for its next request [default: 60].
    #[arg(long, env = "RP_HTTP_IDLE_TIMEOUT_S")]
    pub http_idle_timeout: Option<f64>,
    /// HTTP connections served at once; more are answered 503 [default: 4096].
    #[arg(long, env = "RP_HTTP_MAX_CONNECTIONS")]
    pub http_max_connections: Option<usize>,
    /// A bearer token that every HTTP request must carry (needed to bind a non-loopback
    /// address).
    #[arg(long, env = "RP_HTTP_TOKEN", hide_env_values = true)]
    pub http_token: Option<String>,
    /// Allow a non-loopback HTTP address without a token.
    #[arg(long)]
    pub http_insecure: bool,
    /// A TOML file of who may call what: `[[allow]]` rules on peers and handlers, and the
    /// front door's scoped tokens (docs/POLICY.md) [default: none, every peer may call every
    /// handler].
    #[arg(long, env = "RP_POLICY")]
    pub policy: Option<PathBuf>,
    /// Handler sets to run, comma separated, among the plug-ins of this build (the help
    /// lists them).
    #[arg(long, env = "RP_HANDLERS", value_delimiter = ',', help = handlers_help())]
    pub handlers: Option<Vec<String>>,
    /// The settings of the registered plug-ins: flags and environment variables they
    /// declare.
    #[command(flatten)]
    pub plugins: PluginValues,
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
    /// Largest body sent whole in one frame, bytes; larger bodies are streamed to peers of
    /// this release [default: 16777216].
    #[arg(long, env = "RP_MAX_FRAME")]
    pub max_frame: Option<usize>,
    /// Largest request body this node takes, from HTTP callers and from its peer, bytes;
    /// larger is 413 [default: 4294967296].
    #[arg(long, env = "RP_MAX_BODY")]
    pub max_body: Option<u64>,
    /// Seconds a streamed body may bring no byte before it is cut off [default: 30].
    #[arg(long, env = "RP_STREAM_IDLE_TIMEOUT_S")]
    pub stream_idle_timeout: Option<f64>,
    /// Requests in flight per connection and direction [default: 1024].
    #[arg(long, env = "RP_MAX_IN_FLIGHT")]
    pub max_in_flight: Option<usize>,
    /// Bytes of requests and replies held per connection and direction, at least one frame
    /// [default: 67108864].
    #[arg(long, env = "RP_MAX_IN_FLIGHT_BYTES")]
    pub max_in_flight_bytes: Option<usize>,
    /// Seconds given to in-flight requests at shutdown [default: 10].
    #[arg(long, env = "RP_SHUTDOWN_GRACE_S")]
    pub grace: Option<f64>,
    /// The directory of the queue's store (docs/QUEUE.md) [default:
    /// $XDG_STATE_HOME/restpipe/<side>, else ~/.local/state/restpipe/<side>, else
    /// ./restpipe-data/<side>].
    #[arg(long, env = "RP_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Largest body of a queued event, and of its stored reply, bytes; larger is 413
    /// [default: 1048576].
    #[arg(long, env = "RP_QUEUE_MAX_BODY")]
    pub queue_max_body: Option<u64>,
    /// Events pending per peer; more is 429 [default: 10000].
    #[arg(long, env = "RP_QUEUE_MAX_EVENTS")]
    pub queue_max_events: Option<u64>,
    /// Bytes pending per peer; more is 507 [default: 268435456].
    #[arg(long, env = "RP_QUEUE_MAX_BYTES")]
    pub queue_max_bytes: Option<u64>,
    /// Seconds a queued event may wait to be delivered, unless it sends X-Event-TTL-S
    /// [default: 86400].
    #[arg(long, env = "RP_QUEUE_TTL_S")]
    pub queue_ttl: Option<f64>,
    /// Sends of a queued event that may fail in transport before it is failed [default: 20].
    #[arg(long, env = "RP_QUEUE_MAX_ATTEMPTS")]
    pub queue_max_attempts: Option<u32>,
    /// Subscribe to the topics matching this glob (docs/PUBSUB.md): `*` within a segment,
    /// `**` across segments (repeatable; comma separated in the environment; at most 64).
    #[arg(
        long = "subscribe",
        env = "RP_SUBSCRIBE",
        value_delimiter = ',',
        value_name = "GLOB"
    )]
    pub subscribe: Option<Vec<String>>,
    /// Largest body of a published event, bytes; larger is 413 [default: 1048576].
    #[arg(long, env = "RP_MAX_PUBLISH_BYTES")]
    pub max_publish_bytes: Option<usize>,
    /// Published events the topic log keeps [default: 10000].
    #[arg(long, env = "RP_PUBSUB_RETAIN_COUNT")]
    pub pubsub_retain_count: Option<usize>,
    /// Seconds the topic log keeps a published event [default: 3600].
    #[arg(long, env = "RP_PUBSUB_RETAIN_AGE_S")]
    pub pubsub_retain_age: Option<f64>,
    /// Bytes the topic log keeps [default: 67108864].
    #[arg(long, env = "RP_PUBSUB_RETAIN_BYTES")]
    pub pubsub_retain_bytes: Option<u64>,
    /// Seconds a GET /events listener may take no byte while events wait before it is cut
    /// [default: 10].
    #[arg(long, env = "RP_PUBSUB_STALL_S")]
    pub pubsub_stall: Option<f64>,
    /// Where metrics go.
    #[command(flatten)]
    pub statsd: StatsdArgs,
    /// Logging.
    #[command(flatten)]
    pub log: LogArgs,
}

impl CommonArgs {
    /// The settings these flags give, none of a side's own.
    fn into_node_args(self) -> NodeArgs {
        NodeArgs {
            config: self.config,
            ca: self.ca,
            cert: self.cert,
            key: self.key,
            crls: self.crls,
            http: self.http,
            http_allowed_hosts: self.http_allowed_hosts,
            http_socket_mode: self.http_socket_mode,
            http_header_timeout: self.http_header_timeout,
            http_body_timeout: self.http_body_timeout,
            http_idle_timeout: self.http_idle_timeout,
            http_max_connections: self.http_max_connections,
            http_token: self.http_token,
            http_insecure: self.http_insecure,
            policy: self.policy,
            handlers: self.handlers,
            plugins: self.plugins,
            heartbeat_interval: self.heartbeat_interval,
            heartbeat_timeout: self.heartbeat_timeout,
            handshake_timeout: self.handshake_timeout,
            connect_wait: self.connect_wait,
            request_timeout: self.request_timeout,
            max_frame: self.max_frame,
            max_body: self.max_body,
            stream_idle_timeout: self.stream_idle_timeout,
            max_in_flight: self.max_in_flight,
            max_in_flight_bytes: self.max_in_flight_bytes,
            grace: self.grace,
            data_dir: self.data_dir,
            queue_max_body: self.queue_max_body,
            queue_max_events: self.queue_max_events,
            queue_max_bytes: self.queue_max_bytes,
            queue_ttl: self.queue_ttl,
            queue_max_attempts: self.queue_max_attempts,
            subscribe: self.subscribe,
            max_publish_bytes: self.max_publish_bytes,
            pubsub_retain_count: self.pubsub_retain_count,
            pubsub_retain_age: self.pubsub_retain_age,
            pubsub_retain_bytes: self.pubsub_retain_bytes,
            pubsub_stall: self.pubsub_stall,
            statsd_host: self.statsd.statsd_host,
            statsd_port: self.statsd.statsd_port,
            statsd_prefix: self.statsd.statsd_prefix,
            debug: self.log.debug,
            log_format: self.log.log_format,
            ..NodeArgs::default()
        }
    }
}

impl From<ServerArgs> for NodeArgs {
    fn from(args: ServerArgs) -> NodeArgs {
        let ServerOnlyArgs {
            client_ca,
            bind_interface,
            bind_port,
            max_connections,
            max_handshakes,
            max_handshakes_per_source,
            cluster,
            cluster_name,
            replica_name,
            cluster_creds,
            cluster_tls_ca,
            queue_shared_dir,
        } = args.server;
        NodeArgs {
            client_ca,
            bind_interface,
            bind_port,
            max_connections,
            max_handshakes,
            max_handshakes_per_source,
            cluster,
            cluster_name,
            replica_name,
            cluster_creds,
            cluster_tls_ca,
            queue_shared_dir,
            ..args.common.into_node_args()
        }
    }
}

impl From<ClientArgs> for NodeArgs {
    fn from(args: ClientArgs) -> NodeArgs {
        let ClientOnlyArgs {
            server_host,
            server_port,
            server_name,
            reconnect_max,
        } = args.client;
        NodeArgs {
            server_host,
            server_port,
            server_name,
            reconnect_max,
            ..args.common.into_node_args()
        }
    }
}

/// The help of `--handlers`: the plug-ins of this build and the default.
pub(super) fn handlers_help() -> String {
    format!(
        "Handler sets to run, comma separated: {} [default: {}]",
        plugins::names(),
        plugins::DEFAULT_HANDLERS.join(",")
    )
}

/// `DEBUG=1`, `true`, `yes`, `on` mean yes; `0`, `false`, `no`, `off`, empty mean no.
pub(super) fn parse_flag(s: &str) -> Result<bool, String> {
    match s.trim().to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "on" => Ok(true),
        "" | "0" | "false" | "no" | "off" => Ok(false),
        other => Err(format!("{other:?} is not a yes/no value (use 1 or 0)")),
    }
}
