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

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::http::{AllowedHosts, HttpLimits, HttpListen, ServeOptions};
use crate::node::PipeConfig;
use crate::plugins;
use crate::queue::{QueueSettings, MAX_TTL};
use crate::tls::TlsFiles;

mod args;
mod file;
mod plugin_values;

pub use args::*;
pub use file::*;
pub use plugin_values::*;

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

/// Server: the cluster connection (`--cluster` and the settings that go with it).
#[derive(Clone, Debug, PartialEq)]
pub struct ClusterSettings {
    /// NATS URLs.
    pub urls: Vec<String>,
    /// The cluster's name.
    pub name: String,
    /// This replica's name; `None`: the host name and the pipe's port.
    pub replica: Option<String>,
    /// A NATS credentials file.
    pub creds: Option<PathBuf>,
    /// A CA for the NATS server's certificate.
    pub tls_ca: Option<PathBuf>,
    /// `--queue-shared-dir`: where every replica keeps its queue's store, and adopts those of
    /// dead replicas (docs/CLUSTER.md); `None`: each store in its own `--data-dir`.
    pub queue_shared_dir: Option<PathBuf>,
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
    /// Server: the cluster this server is a replica of; `None` for a single server.
    pub cluster: Option<ClusterSettings>,
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
    /// The queue: its store's directory and its bounds (docs/QUEUE.md).
    pub queue: QueueSettings,
    /// Publish/subscribe: the node's subscriptions and the bounds (docs/PUBSUB.md).
    pub pubsub: crate::pubsub::PubsubSettings,
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

/// `--server-host`: one or more `host[:port]`, comma separated (replicas of a cluster), each
/// without a port taking `port`; as `host:port,host:port`.
fn server_list(hosts: &str, port: u16) -> Result<String, String> {
    let mut out = Vec::new();
    for entry in hosts.split(',').map(str::trim).filter(|e| !e.is_empty()) {
        let with_port = |host: &str, p: &str| -> Result<String, String> {
            p.parse::<u16>()
                .map(|p| format!("{host}:{p}"))
                .map_err(|_| format!("--server-host {entry:?}: {p:?} is not a port"))
        };
        let dial = if let Some(rest) = entry.strip_prefix('[') {
            match rest.split_once(']') {
                Some((v6, "")) => format!("[{v6}]:{port}"),
                Some((v6, tail)) => match tail.strip_prefix(':') {
                    Some(p) => with_port(&format!("[{v6}]"), p)?,
                    None => return Err(format!("--server-host {entry:?} is malformed")),
                },
                None => return Err(format!("--server-host {entry:?} is malformed")),
            }
        } else {
            match entry.split_once(':') {
                // A bare IPv6 address: several colons.
                Some((_, rest)) if rest.contains(':') => format!("[{entry}]:{port}"),
                Some((host, p)) => with_port(host, p)?,
                None => format!("{entry}:{port}"),
            }
        };
        out.push(dial);
    }
    if out.is_empty() {
        return Err("--server-host names no server".into());
    }
    if out.len() > 64 {
        return Err("--server-host names more than 64 servers".into());
    }
    Ok(out.join(","))
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
            max_body: pick!(max_body).unwrap_or(defaults.max_body),
            stream_idle_timeout: seconds(
                "stream-idle-timeout",
                pick!(stream_idle_timeout),
                defaults.stream_idle_timeout,
            )?,
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
        let queue = {
            let data_dir = pick!(data_dir).unwrap_or_else(|| QueueSettings::default_data_dir(side));
            let defaults = QueueSettings::new(data_dir);
            let ttl = match pick!(queue_ttl) {
                None => defaults.ttl,
                Some(s) if s > 0.0 && s <= MAX_TTL.as_secs_f64() => Duration::from_secs_f64(s),
                Some(s) => {
                    return Err(format!(
                        "--queue-ttl must be more than 0 and at most {} seconds, not {s}",
                        MAX_TTL.as_secs()
                    ))
                }
            };
            let queue = QueueSettings {
                max_body: pick!(queue_max_body).unwrap_or(defaults.max_body),
                max_events: pick!(queue_max_events).unwrap_or(defaults.max_events),
                max_bytes: pick!(queue_max_bytes).unwrap_or(defaults.max_bytes),
                max_attempts: pick!(queue_max_attempts).unwrap_or(defaults.max_attempts),
                ttl,
                ..defaults
            };
            queue.validate()?;
            queue
        };
        let pubsub = {
            let defaults = crate::pubsub::PubsubSettings::default();
            let pubsub = crate::pubsub::PubsubSettings {
                subscribe: pick!(subscribe)
                    .unwrap_or_default()
                    .into_iter()
                    .map(|g| g.trim().to_string())
                    .filter(|g| !g.is_empty())
                    .collect(),
                max_publish_bytes: pick!(max_publish_bytes).unwrap_or(defaults.max_publish_bytes),
                retain_count: pick!(pubsub_retain_count).unwrap_or(defaults.retain_count),
                retain_age: positive_seconds(
                    "pubsub-retain-age",
                    pick!(pubsub_retain_age),
                    defaults.retain_age,
                )?,
                retain_bytes: pick!(pubsub_retain_bytes).unwrap_or(defaults.retain_bytes),
                stall: positive_seconds("pubsub-stall", pick!(pubsub_stall), defaults.stall)?,
                // The server keeps its topic log beside the queue's store.
                data_dir: server_side.then(|| queue.data_dir.clone()),
            };
            pubsub.validate()?;
            pubsub
        };
        let server_host = pick!(server_host).unwrap_or_else(|| "localhost".into());
        let server_port = pick!(server_port).unwrap_or(1234);
        let server = server_list(&server_host, server_port)?;
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
        let cluster_urls: Vec<String> = pick!(cluster)
            .unwrap_or_default()
            .into_iter()
            .map(|u| u.trim().to_string())
            .filter(|u| !u.is_empty())
            .collect();
        let queue_shared_dir = pick!(queue_shared_dir);
        if let Some(dir) = &queue_shared_dir {
            if cluster_urls.is_empty() {
                return Err(
                    "--queue-shared-dir is only for the replicas of a cluster: give --cluster too (a single server keeps its queue in --data-dir)"
                        .into(),
                );
            }
            if dir.as_os_str().is_empty() {
                return Err("--queue-shared-dir must name a directory".into());
            }
        }
        let cluster = if cluster_urls.is_empty() {
            None
        } else {
            let name = pick!(cluster_name).unwrap_or_else(|| "default".into());
            if !crate::cluster::valid_token(&name) {
                return Err(format!(
                    "--cluster-name {name:?} must be 1 to 64 of A-Z a-z 0-9 _ -"
                ));
            }
            let replica = pick!(replica_name);
            if replica
                .as_ref()
                .is_some_and(|r| r.is_empty() || r.len() > 128)
            {
                return Err("--replica-name must be 1 to 128 characters".into());
            }
            Some(ClusterSettings {
                urls: cluster_urls,
                name,
                replica,
                creds: pick!(cluster_creds),
                tls_ca: pick!(cluster_tls_ca),
                queue_shared_dir,
            })
        };
        Ok(Settings {
            cluster,
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
            queue,
            pubsub,
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

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;
    use restpipe_handler::SettingValue;
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
    fn server_host_takes_a_list() {
        assert_eq!(server_list("a", 1234).unwrap(), "a:1234");
        assert_eq!(
            server_list("a, b:99,[::1],::1,[::2]:7", 5).unwrap(),
            "a:5,b:99,[::1]:5,[::1]:5,[::2]:7"
        );
        for bad in ["", ",", "a:x", "[::1", "[::1]x"] {
            assert!(server_list(bad, 1).is_err(), "{bad}");
        }
        let s = Settings::resolve(
            NodeArgs {
                server_host: Some("r1,r2:1300".into()),
                ..NodeArgs::default()
            },
            Side::Client,
        )
        .unwrap();
        assert_eq!(s.server, "r1:1234,r2:1300");
        let s = Settings::resolve(
            parse(&["--cluster", "nats://a:4222", "--cluster", "nats://b:4222"]),
            Side::Server,
        )
        .unwrap();
        let cluster = s.cluster.unwrap();
        assert_eq!(cluster.urls, ["nats://a:4222", "nats://b:4222"]);
        assert_eq!(cluster.name, "default");
        assert!(Settings::resolve(NodeArgs::default(), Side::Server)
            .unwrap()
            .cluster
            .is_none());
        assert!(Settings::resolve(
            parse(&["--cluster", "nats://a", "--cluster-name", "a.b"]),
            Side::Server
        )
        .is_err());
        let s = Settings::resolve(
            parse(&["--cluster", "nats://a", "--queue-shared-dir", "/srv/q"]),
            Side::Server,
        )
        .unwrap();
        assert_eq!(
            s.cluster.unwrap().queue_shared_dir.as_deref(),
            Some(Path::new("/srv/q"))
        );
        let alone = Settings::resolve(parse(&["--queue-shared-dir", "/srv/q"]), Side::Server);
        assert!(alone.unwrap_err().contains("--cluster"));
    }

    #[test]
    fn pubsub_settings() {
        let s = Settings::resolve(
            parse(&[
                "--subscribe",
                "sensors/*",
                "--subscribe",
                "alerts, news/**",
                "--max-publish-bytes",
                "4096",
                "--pubsub-retain-count",
                "50",
                "--pubsub-retain-age",
                "90",
                "--pubsub-stall",
                "2.5",
            ]),
            Side::Server,
        )
        .unwrap();
        assert_eq!(s.pubsub.subscribe, ["sensors/*", "alerts", "news/**"]);
        assert_eq!(s.pubsub.max_publish_bytes, 4096);
        assert_eq!(s.pubsub.retain_count, 50);
        assert_eq!(s.pubsub.retain_age, Duration::from_secs(90));
        assert_eq!(s.pubsub.stall, Duration::from_millis(2500));
        // The server keeps its log beside the queue's store; a client only in memory.
        assert_eq!(
            s.pubsub.data_dir.as_deref(),
            Some(s.queue.data_dir.as_path())
        );
        let client = Settings::resolve(NodeArgs::default(), Side::Client).unwrap();
        assert_eq!(client.pubsub.data_dir, None);
        assert!(client.pubsub.subscribe.is_empty());
        let many: Vec<String> = (0..65).map(|i| format!("t{i}")).collect();
        let many = many.join(",");
        for (flags, says) in [
            (&["--subscribe", many.as_str()][..], "more than the 64"),
            (&["--subscribe", "a["], "--subscribe"),
            (&["--max-publish-bytes", "0"], "--max-publish-bytes"),
            (&["--pubsub-stall", "0"], "--pubsub-stall"),
        ] {
            let err = Settings::resolve(parse(flags), Side::Server).unwrap_err();
            assert!(err.contains(says), "{flags:?}: {err}");
        }
    }

    #[test]
    fn queue_settings() {
        let s = Settings::resolve(
            parse(&[
                "--data-dir",
                "/var/lib/rp",
                "--queue-max-events",
                "5",
                "--queue-ttl",
                "60",
            ]),
            Side::Server,
        )
        .unwrap();
        assert_eq!(s.queue.data_dir, Path::new("/var/lib/rp"));
        assert_eq!(s.queue.max_events, 5);
        assert_eq!(s.queue.ttl, Duration::from_secs(60));
        assert_eq!(s.queue.max_body, 1024 * 1024);
        let s = Settings::resolve(NodeArgs::default(), Side::Client).unwrap();
        assert!(
            s.queue.data_dir.ends_with("restpipe/client")
                || s.queue.data_dir.ends_with("restpipe-data/client")
        );
        for (flags, says) in [
            (&["--queue-ttl", "0"][..], "--queue-ttl"),
            (&["--queue-max-body", "0"], "--queue-max-body"),
            (&["--queue-max-attempts", "0"], "--queue-max-attempts"),
        ] {
            let err = Settings::resolve(parse(flags), Side::Client).unwrap_err();
            assert!(err.contains(says), "{flags:?}: {err}");
        }
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
