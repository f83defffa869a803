//! Settings of the `restpipe` command: flags, environment variables, an optional TOML file.
//!
//! Every setting is a flag, most have an environment variable (RestPipe's `RP_*` names where
//! they apply), and every one is a key of the TOML file given with `--config`. A flag beats
//! its environment variable (clap does that), which beats the file, which beats the default.
//! Unknown keys in the file are refused; every setting is checked at start-up and a problem
//! is one clear line.
//!
//! Each subcommand takes only its own flags: [`ServerArgs`] and [`ClientArgs`] are the flags
//! both sides take ([`CommonArgs`]) plus the side's own ([`ServerOnlyArgs`],
//! [`ClientOnlyArgs`]); both become one [`NodeArgs`], which is also the shape of the file. The
//! file knows every key of both sides, but a key of the other side's own (`bind_port` in a
//! client's file) is refused with a line that names it, never silently ignored.
//!
//! The settings of the handler plug-ins are declared by the plug-ins themselves
//! ([`restpipe_handler::SettingSpec`]); [`PluginValues`] turns those of the plug-ins this build
//! registers ([`crate::plugins::REGISTERED`]) into flags and environment variables, and reads
//! them from the file, where each plug-in has a table named after it (`[files] root = "..."`)
//! and each setting may also be a top-level key named as its flag, `_` for `-`
//! (`files_root = "..."`), like the node's own settings.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Arg, ArgAction, ArgMatches, Args, FromArgMatches, Parser, Subcommand};
use restpipe_handler::{PluginSpec, SettingSpec, SettingValue};
use serde::Deserialize;

use crate::http::{AllowedHosts, HttpLimits, HttpListen, ServeOptions};
use crate::node::PipeConfig;
use crate::plugins::{self, REGISTERED};
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
}

/// The flags only a client takes.
#[derive(Debug, Default, Args)]
pub struct ClientOnlyArgs {
    /// The server's host name or address [default: localhost].
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
    /// Largest event or reply body, bytes [default: 16777216].
    #[arg(long, env = "RP_MAX_FRAME")]
    pub max_frame: Option<usize>,
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
            max_in_flight: self.max_in_flight,
            max_in_flight_bytes: self.max_in_flight_bytes,
            grace: self.grace,
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
        } = args.server;
        NodeArgs {
            client_ca,
            bind_interface,
            bind_port,
            max_connections,
            max_handshakes,
            max_handshakes_per_source,
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

/// The settings of a server or a client node, as the flags ([`ServerArgs`], [`ClientArgs`])
/// give them and as the TOML file holds them: every key optional (the flag's name with `_`
/// for `-`), unknown keys refused. A file may hold the settings of both sides only in the
/// sense that each key is known; a key of the other side's own is refused
/// ([`Settings::resolve`]), so that a setting is never silently ignored.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NodeArgs {
    /// `--config`: the TOML file (not a key of the file).
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// `--ca`.
    pub ca: Option<PathBuf>,
    /// `--cert`.
    pub cert: Option<PathBuf>,
    /// `--key`.
    pub key: Option<PathBuf>,
    /// `--client-ca` (server).
    pub client_ca: Option<PathBuf>,
    /// `--crl`, repeatable.
    #[serde(alias = "crl")]
    pub crls: Option<Vec<PathBuf>>,
    /// `--bind-interface` (server).
    pub bind_interface: Option<IpAddr>,
    /// `--bind-port` (server).
    pub bind_port: Option<u16>,
    /// `--max-connections` (server).
    pub max_connections: Option<usize>,
    /// `--max-handshakes` (server).
    pub max_handshakes: Option<usize>,
    /// `--max-handshakes-per-source` (server).
    pub max_handshakes_per_source: Option<usize>,
    /// `--server-host` (client).
    pub server_host: Option<String>,
    /// `--server-port` (client).
    pub server_port: Option<u16>,
    /// `--server-name` (client).
    pub server_name: Option<String>,
    /// `--reconnect-max` (client).
    pub reconnect_max: Option<f64>,
    /// `--http`.
    pub http: Option<HttpListen>,
    /// `--http-allowed-hosts`.
    pub http_allowed_hosts: Option<Vec<String>>,
    /// `--http-socket-mode`.
    pub http_socket_mode: Option<String>,
    /// `--http-header-timeout`.
    pub http_header_timeout: Option<f64>,
    /// `--http-body-timeout`.
    pub http_body_timeout: Option<f64>,
    /// `--http-idle-timeout`.
    pub http_idle_timeout: Option<f64>,
    /// `--http-max-connections`.
    pub http_max_connections: Option<usize>,
    /// `--http-token`.
    pub http_token: Option<String>,
    /// `--http-insecure`.
    pub http_insecure: bool,
    /// `--policy`.
    pub policy: Option<PathBuf>,
    /// `--handlers`.
    pub handlers: Option<Vec<String>>,
    /// The settings of the registered plug-ins. In the file, the tables and keys of
    /// [`PluginValues`].
    #[serde(skip)]
    pub plugins: PluginValues,
    /// `--heartbeat-interval`.
    pub heartbeat_interval: Option<f64>,
    /// `--heartbeat-timeout`.
    pub heartbeat_timeout: Option<f64>,
    /// `--handshake-timeout`.
    pub handshake_timeout: Option<f64>,
    /// `--connect-wait`.
    pub connect_wait: Option<f64>,
    /// `--request-timeout`.
    pub request_timeout: Option<f64>,
    /// `--max-frame`.
    pub max_frame: Option<usize>,
    /// `--max-in-flight`.
    pub max_in_flight: Option<usize>,
    /// `--max-in-flight-bytes`.
    pub max_in_flight_bytes: Option<usize>,
    /// `--grace`.
    pub grace: Option<f64>,
    /// `--statsd-host`.
    pub statsd_host: Option<String>,
    /// `--statsd-port`.
    pub statsd_port: Option<u16>,
    /// `--statsd-prefix`.
    pub statsd_prefix: Option<String>,
    /// `--debug`.
    pub debug: Option<bool>,
    /// `--log-format`.
    pub log_format: Option<LogFormat>,
}

/// Every flag of both sides at once: the keys the file knows, as flags (what a check that
/// plug-in names stay apart from the node's settings looks at).
impl Args for NodeArgs {
    fn augment_args(cmd: clap::Command) -> clap::Command {
        let cmd = ServerOnlyArgs::augment_args(cmd);
        let cmd = ClientOnlyArgs::augment_args(cmd);
        CommonArgs::augment_args(cmd)
    }

    fn augment_args_for_update(cmd: clap::Command) -> clap::Command {
        Self::augment_args(cmd)
    }
}

impl FromArgMatches for NodeArgs {
    fn from_arg_matches(matches: &ArgMatches) -> Result<Self, clap::Error> {
        let server = NodeArgs::from(ServerArgs {
            server: ServerOnlyArgs::from_arg_matches(matches)?,
            common: CommonArgs::from_arg_matches(matches)?,
        });
        let client = NodeArgs::from(ClientArgs {
            client: ClientOnlyArgs::from_arg_matches(matches)?,
            common: CommonArgs::default(),
        });
        Ok(NodeArgs {
            server_host: client.server_host,
            server_port: client.server_port,
            server_name: client.server_name,
            reconnect_max: client.reconnect_max,
            ..server
        })
    }

    fn update_from_arg_matches(&mut self, matches: &ArgMatches) -> Result<(), clap::Error> {
        *self = NodeArgs::from_arg_matches(matches)?;
        Ok(())
    }
}

impl NodeArgs {
    /// The first key given here that belongs to the other side than `side`, by its name in
    /// the file.
    fn other_sides_key(&self, side: restpipe_handler::Side) -> Option<&'static str> {
        let given = match side {
            restpipe_handler::Side::Client => [
                ("client_ca", self.client_ca.is_some()),
                ("bind_interface", self.bind_interface.is_some()),
                ("bind_port", self.bind_port.is_some()),
                ("max_connections", self.max_connections.is_some()),
                ("max_handshakes", self.max_handshakes.is_some()),
                (
                    "max_handshakes_per_source",
                    self.max_handshakes_per_source.is_some(),
                ),
            ]
            .to_vec(),
            restpipe_handler::Side::Server => [
                ("server_host", self.server_host.is_some()),
                ("server_port", self.server_port.is_some()),
                ("server_name", self.server_name.is_some()),
                ("reconnect_max", self.reconnect_max.is_some()),
            ]
            .to_vec(),
        };
        given.into_iter().find(|(_, set)| *set).map(|(key, _)| key)
    }
}

/// The help of `--handlers`: the plug-ins of this build and the default.
fn handlers_help() -> String {
    format!(
        "Handler sets to run, comma separated: {} [default: {}]",
        plugins::names(),
        plugins::DEFAULT_HANDLERS.join(",")
    )
}

/// The values given to the settings of the registered plug-ins, by plug-in name then key.
///
/// As a part of [`CommonArgs`] it adds each declared setting as a flag (with its environment
/// variable) and reads it back; repeatable settings take many flags and commas. The file's
/// tables and keys are in the module documentation.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PluginValues(BTreeMap<String, BTreeMap<String, SettingValue>>);

impl PluginValues {
    /// Give `value` to the setting `key` of the plug-in `plugin`, replacing any earlier one.
    pub fn set(&mut self, plugin: &str, key: &str, value: impl Into<SettingValue>) {
        self.0
            .entry(plugin.to_string())
            .or_default()
            .insert(key.to_string(), value.into());
    }

    /// The value given to the setting `key` of `plugin`.
    pub fn get(&self, plugin: &str, key: &str) -> Option<&SettingValue> {
        self.0.get(plugin)?.get(key)
    }

    /// The values given to the settings of `plugin`, by key.
    pub fn of(&self, plugin: &str) -> BTreeMap<String, SettingValue> {
        self.0.get(plugin).cloned().unwrap_or_default()
    }

    /// These values, and those of `lower` for the settings these do not give.
    fn or(mut self, lower: PluginValues) -> PluginValues {
        for (plugin, values) in lower.0 {
            let mine = self.0.entry(plugin).or_default();
            for (key, value) in values {
                mine.entry(key).or_insert(value);
            }
        }
        self
    }
}

/// The flag of one declared setting, with its environment variable.
fn plugin_arg(setting: &SettingSpec) -> Arg {
    let mut arg = Arg::new(setting.flag())
        .long(setting.flag())
        .help(setting.help())
        .value_name(setting.value_placeholder());
    if let Some(env) = setting.env_var() {
        arg = arg.env(env);
    }
    if setting.is_repeatable() {
        arg.action(ArgAction::Append).value_delimiter(',')
    } else {
        arg.action(ArgAction::Set)
    }
}

impl Args for PluginValues {
    fn augment_args(cmd: clap::Command) -> clap::Command {
        REGISTERED
            .iter()
            .flat_map(PluginSpec::setting_specs)
            .fold(cmd, |cmd, setting| cmd.arg(plugin_arg(setting)))
    }

    fn augment_args_for_update(cmd: clap::Command) -> clap::Command {
        Self::augment_args(cmd)
    }
}

impl FromArgMatches for PluginValues {
    fn from_arg_matches(matches: &ArgMatches) -> Result<Self, clap::Error> {
        let mut values = PluginValues::default();
        values.update_from_arg_matches(matches)?;
        Ok(values)
    }

    fn update_from_arg_matches(&mut self, matches: &ArgMatches) -> Result<(), clap::Error> {
        for spec in REGISTERED {
            for setting in spec.setting_specs() {
                let given = matches
                    .try_get_many::<String>(setting.flag())
                    .ok()
                    .flatten()
                    .map(|values| values.cloned().collect::<Vec<_>>());
                let Some(mut given) = given else { continue };
                let value = if setting.is_repeatable() {
                    SettingValue::List(given)
                } else {
                    match given.pop() {
                        Some(one) => SettingValue::Text(one),
                        None => continue,
                    }
                };
                self.set(spec.name(), setting.key(), value);
            }
        }
        Ok(())
    }
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
    /// Server: handshakes pending at once, in total.
    pub max_handshakes: usize,
    /// Server: handshakes pending at once from one source address.
    pub max_handshakes_per_source: usize,
    /// Client: `host:port` of the server.
    pub server: String,
    /// Client: the name the server's certificate must carry.
    pub server_name: Option<String>,
    /// Client: longest reconnect delay.
    pub reconnect_max: Duration,
    /// The local HTTP endpoint on TCP (not used when `http_socket` is set).
    pub http: SocketAddr,
    /// The Unix socket of the HTTP endpoint, when it listens on one instead of TCP.
    pub http_socket: Option<PathBuf>,
    /// The guard, timeouts and connection cap of the HTTP endpoint, and its socket's mode.
    pub http_serve: ServeOptions,
    /// The bearer token of the HTTP endpoint.
    pub http_token: Option<String>,
    /// The policy file (docs/POLICY.md), read at start.
    pub policy: Option<PathBuf>,
    /// Whether a non-loopback HTTP endpoint may go without a token.
    pub http_insecure: bool,
    /// Handler sets to run.
    pub handlers: Vec<String>,
    /// The values given to the plug-ins' settings (flag, then environment, then file).
    pub plugins: PluginValues,
    /// Pipe settings.
    pub pipe: PipeConfig,
    /// Shutdown grace period.
    pub grace: Duration,
    /// Metrics.
    pub statsd: StatsdSettings,
    /// Debug logs.
    pub debug: bool,
    /// The format of the logs.
    pub log_format: LogFormat,
}

impl std::fmt::Debug for Settings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Settings")
            .field("tls", &self.tls)
            .field("bind", &self.bind)
            .field("server", &self.server)
            .field("http", &self.http_listen())
            .field("http_token", &self.http_token.as_ref().map(|_| "<set>"))
            .field("policy", &self.policy)
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

/// A positive number of seconds, at most a day.
fn positive_seconds(name: &str, value: Option<f64>, default: Duration) -> Result<Duration, String> {
    match value {
        Some(s) if s <= 0.0 => Err(format!("--{name} must be more than 0 seconds, not {s}")),
        value => seconds(name, value, default),
    }
}

/// An octal file mode such as `0660`, `660` or `0o660`.
fn parse_mode(text: &str) -> Result<u32, String> {
    let digits = text.trim();
    let digits = digits.strip_prefix("0o").unwrap_or(digits);
    u32::from_str_radix(digits, 8)
        .ok()
        .filter(|&mode| mode <= 0o777)
        .ok_or_else(|| format!("--http-socket-mode takes an octal mode such as 0660, not {text:?}"))
}

impl Settings {
    /// Where the HTTP endpoint listens: the Unix socket if one is set, else `http`.
    pub fn http_listen(&self) -> HttpListen {
        match &self.http_socket {
            Some(path) => HttpListen::Unix(path.clone()),
            None => HttpListen::Tcp(self.http),
        }
    }

    /// Merge flags (with their env vars), the config file and the defaults for `side`, and
    /// check the result.
    pub fn resolve(
        args: impl Into<NodeArgs>,
        side: restpipe_handler::Side,
    ) -> Result<Settings, String> {
        let args: NodeArgs = args.into();
        let (file, file_plugins) = match &args.config {
            Some(path) => {
                let (file, plugins) = read_file(path)?;
                if let Some(key) = file.other_sides_key(side) {
                    let (theirs, mine) = match side {
                        restpipe_handler::Side::Client => ("server", "client"),
                        restpipe_handler::Side::Server => ("client", "server"),
                    };
                    return Err(format!(
                        "config file {}: `{key}` is a {theirs} setting, which a {mine} node does not take; remove it, or give each side its own file",
                        path.display()
                    ));
                }
                (file, plugins)
            }
            None => (NodeArgs::default(), PluginValues::default()),
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
            client_ca: pick!(client_ca),
            crls: pick!(crls).unwrap_or_default(),
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
            max_in_flight_bytes: pick!(max_in_flight_bytes).unwrap_or(defaults.max_in_flight_bytes),
            ..defaults
        };
        pipe.validate().map_err(|e| e.to_string())?;

        let default_http = {
            let port = if server_side { 8081 } else { 8080 };
            SocketAddr::from(([127, 0, 0, 1], port))
        };
        let (http, http_socket) = match pick!(http) {
            None => (default_http, None),
            Some(HttpListen::Tcp(addr)) => (addr, None),
            Some(HttpListen::Unix(path)) => (default_http, Some(path)),
        };
        let http_token = pick!(http_token).filter(|t| !t.is_empty());
        let http_insecure = args.http_insecure || file.http_insecure;
        let defaults = HttpLimits::default();
        let http_serve = ServeOptions {
            allowed_hosts: AllowedHosts::parse(&pick!(http_allowed_hosts).unwrap_or_default())?,
            limits: HttpLimits {
                header_timeout: positive_seconds(
                    "http-header-timeout",
                    pick!(http_header_timeout),
                    defaults.header_timeout,
                )?,
                body_timeout: positive_seconds(
                    "http-body-timeout",
                    pick!(http_body_timeout),
                    defaults.body_timeout,
                )?,
                idle_timeout: positive_seconds(
                    "http-idle-timeout",
                    pick!(http_idle_timeout),
                    defaults.idle_timeout,
                )?,
                max_connections: match pick!(http_max_connections) {
                    Some(0) => return Err("--http-max-connections must be at least 1".into()),
                    Some(n) => n,
                    None => defaults.max_connections,
                },
            },
            socket_mode: match pick!(http_socket_mode) {
                Some(mode) => parse_mode(&mode)?,
                None => ServeOptions::default().socket_mode,
            },
        };
        let policy = pick!(policy);
        // With a policy, its tokens may guard the endpoint: checked once it is read
        // (`app::start_with_tls`).
        if http_socket.is_none()
            && !http.ip().is_loopback()
            && http_token.is_none()
            && policy.is_none()
            && !http_insecure
        {
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
            .unwrap_or_else(|| {
                plugins::DEFAULT_HANDLERS
                    .iter()
                    .map(|h| h.to_string())
                    .collect()
            })
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
            max_handshakes: pick!(max_handshakes)
                .unwrap_or(crate::server::DEFAULT_MAX_HANDSHAKES)
                .max(1),
            max_handshakes_per_source: pick!(max_handshakes_per_source)
                .unwrap_or(crate::server::DEFAULT_MAX_HANDSHAKES_PER_SOURCE)
                .max(1),
            server,
            server_name: pick!(server_name),
            reconnect_max: seconds(
                "reconnect-max",
                pick!(reconnect_max),
                Duration::from_secs(10),
            )?,
            http,
            http_socket,
            http_serve,
            http_token,
            policy,
            http_insecure,
            handlers,
            plugins: args.plugins.or(file_plugins),
            pipe,
            grace: seconds("grace", pick!(grace), Duration::from_secs(10))?,
            statsd: StatsdSettings {
                host: Some(statsd_host).filter(|h| !h.is_empty()),
                port: pick!(statsd_port).unwrap_or(8125),
                prefix: pick!(statsd_prefix).unwrap_or_else(|| "restpipe".into()),
            },
            debug: pick!(debug).unwrap_or(false),
            log_format: pick!(log_format).unwrap_or_default(),
        })
    }
}

/// The node's settings and the plug-ins' settings in the TOML file at `path`.
fn read_file(path: &Path) -> Result<(NodeArgs, PluginValues), String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read the config file {}: {e}", path.display()))?;
    let in_file = |e: &dyn std::fmt::Display| format!("config file {}: {e}", path.display());
    let mut table: toml::Table =
        toml::from_str(&text).map_err(|e| in_file(&e.message().trim_end()))?;
    let plugins = take_plugin_values(&mut table).map_err(|e| in_file(&e))?;
    let args = table
        .try_into()
        .map_err(|e: toml::de::Error| in_file(&e.message().trim_end()))?;
    Ok((args, plugins))
}

/// Take the registered plug-ins' settings out of the file's top-level table: the table
/// `[name]` of each plug-in, and the top-level keys named as the flags (`files_root`).
fn take_plugin_values(table: &mut toml::Table) -> Result<PluginValues, String> {
    let mut values = PluginValues::default();
    for spec in REGISTERED {
        let name = spec.name();
        // `[forward]` is the plug-in's table; `forward = [...]`, not a table, is the setting
        // of the flag `--forward`.
        let section = match table.remove(name) {
            Some(toml::Value::Table(section)) => Some(section),
            Some(other) => {
                table.insert(name.to_string(), other);
                None
            }
            None => None,
        };
        if let Some(section) = section {
            for (key, value) in section {
                let Some(setting) = spec.setting(&key) else {
                    let keys: Vec<&str> = spec.setting_specs().iter().map(|s| s.key()).collect();
                    return Err(format!(
                        "unknown key `{key}` in [{name}]; the {name} handlers take: {}",
                        if keys.is_empty() {
                            "nothing".to_string()
                        } else {
                            keys.join(", ")
                        }
                    ));
                };
                let value = file_value(setting, &format!("{name}.{key}"), value)?;
                values.set(name, &key, value);
            }
        }
        for setting in spec.setting_specs() {
            let alias = setting.flag().replace('-', "_");
            let Some(value) = table.remove(&alias) else {
                continue;
            };
            if values.get(name, setting.key()).is_some() {
                return Err(format!(
                    "`{alias}` and `{name}.{key}` are the same setting; give one of them",
                    key = setting.key()
                ));
            }
            values.set(name, setting.key(), file_value(setting, &alias, value)?);
        }
        if table.contains_key(name) {
            return Err(format!(
                "`{name}` is the table of the {name} handlers' settings, [{name}]"
            ));
        }
    }
    Ok(values)
}

/// A value of the file as a plug-in setting takes it: text (numbers and booleans written as
/// they read), or for a repeatable setting an array, or a string of comma-separated values.
fn file_value(
    setting: &SettingSpec,
    shown: &str,
    value: toml::Value,
) -> Result<SettingValue, String> {
    let text = |value: toml::Value| match value {
        toml::Value::String(s) => Ok(s),
        toml::Value::Integer(i) => Ok(i.to_string()),
        toml::Value::Float(f) => Ok(f.to_string()),
        toml::Value::Boolean(b) => Ok(b.to_string()),
        toml::Value::Datetime(d) => Ok(d.to_string()),
        toml::Value::Array(_) | toml::Value::Table(_) => {
            Err(format!("`{shown}` takes a string, a number or a boolean"))
        }
    };
    match value {
        toml::Value::Array(items) if setting.is_repeatable() => items
            .into_iter()
            .map(text)
            .collect::<Result<_, _>>()
            .map(SettingValue::List),
        toml::Value::Array(_) => Err(format!("`{shown}` takes one value, not an array")),
        value if setting.is_repeatable() => Ok(SettingValue::List(
            text(value)?.split(',').map(str::to_string).collect(),
        )),
        value => text(value).map(SettingValue::Text),
    }
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

    fn parse(args: &[&str]) -> NodeArgs {
        let cli = Cli::try_parse_from(["restpipe", "server"].iter().chain(args)).unwrap();
        let Command::Server(args) = cli.command else {
            panic!("not the server command");
        };
        args.into()
    }

    fn list(values: &[&str]) -> SettingValue {
        SettingValue::List(values.iter().map(|v| v.to_string()).collect())
    }

    #[test]
    fn plugin_settings_are_flags_and_file_keys() {
        let s = Settings::resolve(
            parse(&[
                "--files-root",
                "/srv",
                "--forward",
                "a=http://h/1,b=http://h/2",
            ]),
            Side::Server,
        )
        .unwrap();
        assert_eq!(s.plugins.get("files", "root"), Some(&"/srv".into()));
        assert_eq!(
            s.plugins.get("forward", "routes"),
            Some(&list(&["a=http://h/1", "b=http://h/2"]))
        );
        let s = Settings::resolve(
            parse(&["--forward", "a=http://h/1", "--forward", "b=http://h/2"]),
            Side::Server,
        )
        .unwrap();
        assert_eq!(
            s.plugins.get("forward", "routes"),
            Some(&list(&["a=http://h/1", "b=http://h/2"]))
        );
        assert_eq!(s.plugins.get("files", "root"), None);

        // The plug-in's table, or the flag's name at the top level; a flag beats the file.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("rp.toml");
        let config = path.to_str().unwrap();
        let resolve = |toml: &str, flags: &[&str]| {
            std::fs::write(&path, toml).unwrap();
            let mut args = vec!["--config", config];
            args.extend_from_slice(flags);
            Settings::resolve(parse(&args), Side::Client)
        };
        let s = resolve(
            "[files]\nroot = \"/a\"\n[forward]\nroutes = [\"x=http://h\"]\n",
            &[],
        )
        .unwrap();
        assert_eq!(s.plugins.get("files", "root"), Some(&"/a".into()));
        assert_eq!(
            s.plugins.get("forward", "routes"),
            Some(&list(&["x=http://h"]))
        );
        let s = resolve("files_root = \"/b\"\nforward = [\"y=http://h\"]\n", &[]).unwrap();
        assert_eq!(s.plugins.get("files", "root"), Some(&"/b".into()));
        assert_eq!(
            s.plugins.get("forward", "routes"),
            Some(&list(&["y=http://h"]))
        );
        let s = resolve("files_root = \"/b\"\n", &["--files-root", "/c"]).unwrap();
        assert_eq!(s.plugins.get("files", "root"), Some(&"/c".into()));

        for (toml, says) in [
            ("[files]\nrot = \"/a\"\n", "rot"),
            ("[time]\nx = 1\n", "take: nothing"),
            ("files = 3\n", "[files]"),
            ("[files]\nroot = [\"/a\"]\n", "files.root"),
            ("files_root = \"/a\"\n[files]\nroot = \"/b\"\n", "give one"),
        ] {
            let err = resolve(toml, &[]).unwrap_err();
            assert!(err.contains(says) && !err.contains('\n'), "{toml}: {err}");
        }
    }

    #[test]
    fn http_listen_guard_and_limits() {
        let s = Settings::resolve(
            parse(&[
                "--http",
                "unix:/run/rp/node.sock",
                "--http-socket-mode",
                "0600",
                "--http-allowed-hosts",
                "rp.example.com,10.0.0.5",
                "--http-header-timeout",
                "2.5",
                "--http-max-connections",
                "20",
            ]),
            Side::Client,
        )
        .unwrap();
        assert_eq!(
            s.http_listen(),
            HttpListen::Unix(PathBuf::from("/run/rp/node.sock"))
        );
        assert_eq!(s.http_serve.socket_mode, 0o600);
        assert!(s.http_serve.allowed_hosts.contains("RP.example.com"));
        assert!(s.http_serve.allowed_hosts.contains("10.0.0.5"));
        assert_eq!(
            s.http_serve.limits.header_timeout,
            Duration::from_millis(2500)
        );
        assert_eq!(s.http_serve.limits.max_connections, 20);
        assert_eq!(s.http_serve.limits.idle_timeout, Duration::from_secs(60));
        let s = Settings::resolve(NodeArgs::default(), Side::Client).unwrap();
        assert_eq!(s.http_serve, ServeOptions::default());
        for (flags, says) in [
            (&["--http-socket-mode", "999"][..], "--http-socket-mode"),
            (&["--http-max-connections", "0"], "--http-max-connections"),
            (&["--http-body-timeout", "0"], "--http-body-timeout"),
            (&["--http-allowed-hosts", "a.example:80"], "without a port"),
        ] {
            let err = Settings::resolve(parse(flags), Side::Client).unwrap_err();
            assert!(err.contains(says), "{flags:?}: {err}");
        }
        assert!(Cli::try_parse_from(["restpipe", "client", "--http", "unix:"]).is_err());
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
