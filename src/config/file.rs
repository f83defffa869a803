//! The settings of a node as one struct, [`NodeArgs`]: what the flags of either side give, and
//! the shape of the TOML file, which is read here.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use clap::{ArgMatches, Args, FromArgMatches};
use restpipe_handler::{SettingSpec, SettingValue};
use serde::Deserialize;

use crate::http::HttpListen;
use crate::plugins::REGISTERED;

use super::*;

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
    /// `--cluster` (server), repeatable.
    pub cluster: Option<Vec<String>>,
    /// `--cluster-name` (server).
    pub cluster_name: Option<String>,
    /// `--replica-name` (server).
    pub replica_name: Option<String>,
    /// `--cluster-creds` (server).
    pub cluster_creds: Option<PathBuf>,
    /// `--cluster-tls-ca` (server).
    pub cluster_tls_ca: Option<PathBuf>,
    /// `--queue-shared-dir` (server, with `--cluster`).
    pub queue_shared_dir: Option<PathBuf>,
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
    /// `--max-body`.
    pub max_body: Option<u64>,
    /// `--stream-idle-timeout`.
    pub stream_idle_timeout: Option<f64>,
    /// `--max-in-flight`.
    pub max_in_flight: Option<usize>,
    /// `--max-in-flight-bytes`.
    pub max_in_flight_bytes: Option<usize>,
    /// `--grace`.
    pub grace: Option<f64>,
    /// `--data-dir`.
    pub data_dir: Option<PathBuf>,
    /// `--queue-max-body`.
    pub queue_max_body: Option<u64>,
    /// `--queue-max-events`.
    pub queue_max_events: Option<u64>,
    /// `--queue-max-bytes`.
    pub queue_max_bytes: Option<u64>,
    /// `--queue-ttl`.
    pub queue_ttl: Option<f64>,
    /// `--queue-max-attempts`.
    pub queue_max_attempts: Option<u32>,
    /// `--subscribe`, repeatable.
    pub subscribe: Option<Vec<String>>,
    /// `--max-publish-bytes`.
    pub max_publish_bytes: Option<usize>,
    /// `--pubsub-retain-count`.
    pub pubsub_retain_count: Option<usize>,
    /// `--pubsub-retain-age`.
    pub pubsub_retain_age: Option<f64>,
    /// `--pubsub-retain-bytes`.
    pub pubsub_retain_bytes: Option<u64>,
    /// `--pubsub-stall`.
    pub pubsub_stall: Option<f64>,
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
    pub(super) fn other_sides_key(&self, side: restpipe_handler::Side) -> Option<&'static str> {
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
                ("cluster", self.cluster.is_some()),
                ("cluster_name", self.cluster_name.is_some()),
                ("replica_name", self.replica_name.is_some()),
                ("cluster_creds", self.cluster_creds.is_some()),
                ("cluster_tls_ca", self.cluster_tls_ca.is_some()),
                ("queue_shared_dir", self.queue_shared_dir.is_some()),
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

/// The node's settings and the plug-ins' settings in the TOML file at `path`.
pub(super) fn read_file(path: &Path) -> Result<(NodeArgs, PluginValues), String> {
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
pub(super) fn take_plugin_values(table: &mut toml::Table) -> Result<PluginValues, String> {
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
pub(super) fn file_value(
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
