//! The settings the registered plug-ins declare, as flags, environment variables and values
//! of the file ([`PluginValues`]).

use std::collections::BTreeMap;

use clap::{Arg, ArgAction, ArgMatches, Args, FromArgMatches};
use restpipe_handler::{PluginSpec, SettingSpec, SettingValue};

use crate::plugins::REGISTERED;

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
    pub(super) fn or(mut self, lower: PluginValues) -> PluginValues {
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
pub(super) fn plugin_arg(setting: &SettingSpec) -> Arg {
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
