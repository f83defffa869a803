//! The handler plug-ins this build registers, one line each.
//!
//! A plug-in crate declares itself with a [`PluginSpec`] (its name, its settings, its
//! constructor; see `docs/PLUGINS.md`). Registering it takes the crate as a dependency in
//! `Cargo.toml` and one line in [`REGISTERED`]: its name is then accepted by `--handlers`, and
//! its settings become flags, environment variables and a table of the TOML file.

use std::path::Path;

use restpipe_handler::PluginSpec;

use crate::config::PluginValues;

/// The plug-ins this build has, in the order `--help` and error messages list them.
pub const REGISTERED: &[PluginSpec] = &[
    restpipe_handler_time::SPEC,
    restpipe_handler_files::SPEC,
    restpipe_handler_forward::SPEC,
];

/// The registered plug-in called `name`.
pub fn find(name: &str) -> Option<&'static PluginSpec> {
    REGISTERED.iter().find(|spec| spec.name() == name)
}

/// The names of the registered plug-ins, comma separated.
pub fn names() -> String {
    REGISTERED
        .iter()
        .map(|spec| spec.name())
        .collect::<Vec<_>>()
        .join(", ")
}

/// What a node runs when `--handlers` is not given.
pub const DEFAULT_HANDLERS: &[&str] = &["time"];

/// What `restpipe demo` runs when its `--handlers` is not given.
pub const DEMO_HANDLERS: &str = "time,files";

/// The plug-in settings of the demo's nodes: the `files` handlers serve `files`, the
/// directory made for the demo.
pub fn demo_values(files: &Path) -> Result<PluginValues, String> {
    let root = files
        .to_str()
        .ok_or_else(|| format!("the demo directory {} is not UTF-8", files.display()))?;
    let mut values = PluginValues::default();
    values.set("files", "root", root);
    Ok(values)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use clap::{Args, Command};

    #[test]
    fn names_are_unique_and_apart_from_the_node_settings() {
        let node = crate::config::NodeArgs::augment_args(Command::new("node"));
        let plugin_flags: Vec<&str> = REGISTERED
            .iter()
            .flat_map(|spec| spec.setting_specs().iter().map(|s| s.flag()))
            .collect();
        let node_keys: Vec<&str> = node
            .get_arguments()
            .map(|arg| arg.get_id().as_str())
            .filter(|id| !plugin_flags.contains(id))
            .collect();
        for (i, spec) in REGISTERED.iter().enumerate() {
            assert!(find(spec.name()).is_some());
            assert!(
                REGISTERED[..i].iter().all(|s| s.name() != spec.name()),
                "{} is registered twice",
                spec.name()
            );
            // The plug-in's table and the top-level keys of its settings in the TOML file.
            assert!(!node_keys.contains(&spec.name()), "{}", spec.name());
            for setting in spec.setting_specs() {
                let alias = setting.flag().replace('-', "_");
                assert!(!node_keys.contains(&alias.as_str()), "{alias}");
            }
        }
        // Every flag is distinct (clap checks the whole command).
        node.debug_assert();
        for name in DEFAULT_HANDLERS
            .iter()
            .copied()
            .chain(DEMO_HANDLERS.split(','))
        {
            assert!(find(name).is_some(), "{name}");
        }
        assert_eq!(names(), "time, files, forward");
    }
}
