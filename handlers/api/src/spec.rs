//! How a plug-in crate declares itself to a node: its name, its settings and its constructor.
//!
//! A plug-in crate exports one [`PluginSpec`], usually as a `const`. The node lists the specs
//! it registers, turns every declared [`SettingSpec`] into a command-line flag, an optional
//! environment variable and a key of the plug-in's table in the TOML file, resolves each value
//! (flag, then environment variable, then file; absent when none is given) and, for each
//! plug-in named by `--handlers`, calls the constructor with a [`PluginSetup`]. The
//! constructor reads the values into its own `#[derive(Deserialize)]` struct with
//! [`PluginSetup::settings`], where defaults are the struct's own (`#[serde(default)]`).
//!
//! Every value arrives as text (or a list of texts for a repeatable setting), whether it came
//! from a flag, the environment or the file; the struct's field types say how it is read:
//! numbers and `true`/`false` (also `1`/`0`, `yes`/`no`, `on`/`off`) are parsed from the text,
//! and a lone value is a list of one.
//!
//! ```
//! use std::collections::BTreeMap;
//! use std::sync::Arc;
//! use restpipe_handler::{
//!     Handlers, NodeFacts, Plugin, PluginSetup, PluginSpec, SettingSpec, SettingValue, Side,
//! };
//! use serde::Deserialize;
//!
//! struct Greeter { greeting: String }
//!
//! impl Plugin for Greeter {
//!     fn name(&self) -> &str { "greet" }
//!     fn handlers(&self, _side: Side) -> Handlers { Handlers::new() }
//! }
//!
//! #[derive(Deserialize)]
//! #[serde(deny_unknown_fields)]
//! struct GreetSettings {
//!     #[serde(default = "hello")]
//!     greeting: String,
//!     #[serde(default)]
//!     times: u32,
//! }
//! fn hello() -> String { "hello".into() }
//!
//! /// What the node registers: `--greeting`, `RP_GREETING`, `[greet] greeting = "..."`.
//! pub const SPEC: PluginSpec = PluginSpec::new("greet", "Answers a greeting.", build).settings(&[
//!     SettingSpec::new("greeting", "greeting", "The greeting [default: hello].")
//!         .env("RP_GREETING")
//!         .value_name("TEXT"),
//!     SettingSpec::new("times", "greet-times", "How many times [default: 0]."),
//! ]);
//!
//! fn build(setup: &PluginSetup) -> Result<Arc<dyn Plugin>, String> {
//!     let settings: GreetSettings = setup.settings()?;
//!     Ok(Arc::new(Greeter { greeting: settings.greeting.repeat(settings.times as usize) }))
//! }
//!
//! let mut values = BTreeMap::new();
//! values.insert("times".to_string(), SettingValue::from("2"));
//! let setup = PluginSetup::new(&SPEC, values, NodeFacts::new(Side::Server, 1 << 24));
//! let plugin = SPEC.build(&setup).unwrap();
//! assert_eq!(plugin.name(), "greet");
//!
//! let mut values = BTreeMap::new();
//! values.insert("times".to_string(), SettingValue::from("many"));
//! let setup = PluginSetup::new(&SPEC, values, NodeFacts::new(Side::Server, 1 << 24));
//! let err = SPEC.build(&setup).err().unwrap();
//! assert!(err.contains("--greet-times"), "{err}");
//! ```

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use serde::de::value::{Error as DeError, MapDeserializer, SeqDeserializer};
use serde::de::{DeserializeOwned, Error as _, IntoDeserializer, Visitor};
use serde::Deserializer;

use crate::{Plugin, Side};

/// One setting of a plug-in: a key of its TOML table, a flag, maybe an environment variable.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SettingSpec {
    key: &'static str,
    flag: &'static str,
    env: Option<&'static str>,
    help: &'static str,
    value_name: &'static str,
    repeatable: bool,
}

impl SettingSpec {
    /// A setting read under `key` (the key of the plug-in's TOML table and the field of its
    /// settings struct), given on the command line as `--{flag}`, described by `help`.
    pub const fn new(key: &'static str, flag: &'static str, help: &'static str) -> Self {
        SettingSpec {
            key,
            flag,
            env: None,
            help,
            value_name: "VALUE",
            repeatable: false,
        }
    }

    /// The same setting, also read from the environment variable `env`.
    pub const fn env(mut self, env: &'static str) -> Self {
        self.env = Some(env);
        self
    }

    /// The same setting, shown in `--help` as `--flag <NAME>`.
    pub const fn value_name(mut self, name: &'static str) -> Self {
        self.value_name = name;
        self
    }

    /// The same setting, repeatable: the flag may be given many times, and the flag, the
    /// environment variable and the file may each give several values separated by commas
    /// (the file also takes an array). The value is a list.
    pub const fn repeatable(mut self) -> Self {
        self.repeatable = true;
        self
    }

    /// The key in the plug-in's TOML table and in its settings struct.
    pub fn key(&self) -> &'static str {
        self.key
    }

    /// The long flag, without `--`.
    pub fn flag(&self) -> &'static str {
        self.flag
    }

    /// The environment variable, if there is one.
    pub fn env_var(&self) -> Option<&'static str> {
        self.env
    }

    /// The help text of the flag.
    pub fn help(&self) -> &'static str {
        self.help
    }

    /// The placeholder of the value in `--help`.
    pub fn value_placeholder(&self) -> &'static str {
        self.value_name
    }

    /// Whether the setting takes many values.
    pub fn is_repeatable(&self) -> bool {
        self.repeatable
    }
}

/// What a plug-in's constructor gets: the values of its settings and the node's facts. It
/// answers the plug-in, or one line that says what is wrong.
pub type BuildPlugin = fn(&PluginSetup) -> Result<Arc<dyn Plugin>, String>;

/// What a plug-in crate declares: its name (as `--handlers` takes it), its settings and its
/// constructor.
#[derive(Clone, Copy)]
pub struct PluginSpec {
    name: &'static str,
    about: &'static str,
    settings: &'static [SettingSpec],
    build: BuildPlugin,
}

impl fmt::Debug for PluginSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PluginSpec")
            .field("name", &self.name)
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

impl PluginSpec {
    /// A plug-in called `name`, described in one line by `about`, built by `build`, with no
    /// settings.
    pub const fn new(name: &'static str, about: &'static str, build: BuildPlugin) -> Self {
        PluginSpec {
            name,
            about,
            settings: &[],
            build,
        }
    }

    /// The same plug-in with these settings.
    pub const fn settings(mut self, settings: &'static [SettingSpec]) -> Self {
        self.settings = settings;
        self
    }

    /// The name `--handlers` takes, which is also the name of its TOML table.
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// One line about the plug-in.
    pub fn about(&self) -> &'static str {
        self.about
    }

    /// The declared settings.
    pub fn setting_specs(&self) -> &'static [SettingSpec] {
        self.settings
    }

    /// The declared setting read under `key`.
    pub fn setting(&self, key: &str) -> Option<&'static SettingSpec> {
        self.settings.iter().find(|s| s.key == key)
    }

    /// Build the plug-in.
    pub fn build(&self, setup: &PluginSetup) -> Result<Arc<dyn Plugin>, String> {
        (self.build)(setup)
    }
}

/// What a plug-in may need to know about the node that runs it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct NodeFacts {
    /// The side of the node.
    pub side: Side,
    /// The largest event or reply body, bytes (`--max-frame`): a reply crosses the pipe in one
    /// frame, so nothing a handler answers can be larger.
    pub max_frame: usize,
}

impl NodeFacts {
    /// The facts of a node of `side` whose frames carry at most `max_frame` bytes of body.
    pub fn new(side: Side, max_frame: usize) -> Self {
        NodeFacts { side, max_frame }
    }
}

/// The value given to a setting: text, or a list of texts for a repeatable setting.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SettingValue {
    /// One value.
    Text(String),
    /// The values of a repeatable setting, in order.
    List(Vec<String>),
}

impl From<String> for SettingValue {
    fn from(text: String) -> Self {
        SettingValue::Text(text)
    }
}

impl From<&str> for SettingValue {
    fn from(text: &str) -> Self {
        SettingValue::Text(text.to_string())
    }
}

impl From<Vec<String>> for SettingValue {
    fn from(list: Vec<String>) -> Self {
        SettingValue::List(list)
    }
}

/// The values of one plug-in's settings, resolved by the node, and the node's facts.
#[derive(Clone, Debug)]
pub struct PluginSetup {
    name: &'static str,
    specs: &'static [SettingSpec],
    values: BTreeMap<String, SettingValue>,
    node: NodeFacts,
}

impl PluginSetup {
    /// The setup of `spec`'s plug-in with these values by key (only the settings that were
    /// given) on a node with these facts.
    pub fn new(spec: &PluginSpec, values: BTreeMap<String, SettingValue>, node: NodeFacts) -> Self {
        PluginSetup {
            name: spec.name,
            specs: spec.settings,
            values,
            node,
        }
    }

    /// The facts of the node.
    pub fn node(&self) -> &NodeFacts {
        &self.node
    }

    /// The values given, by key.
    pub fn values(&self) -> &BTreeMap<String, SettingValue> {
        &self.values
    }

    /// The values read into the plug-in's settings struct, whose fields are the keys. A value
    /// that does not read is an error naming its flag.
    pub fn settings<T: DeserializeOwned>(&self) -> Result<T, String> {
        let entries = self.values.iter().map(|(key, value)| {
            let flag = self
                .specs
                .iter()
                .find(|s| s.key == key.as_str())
                .map_or(key.as_str(), |s| s.flag);
            (
                key.as_str(),
                ValueDeserializer {
                    flag,
                    value: value.clone(),
                },
            )
        });
        T::deserialize(MapDeserializer::new(entries))
            .map_err(|e| format!("the {} handlers: {e}", self.name))
    }
}

/// An error about the value of `--{flag}`, naming the flag once.
fn tag(flag: &str, e: impl fmt::Display) -> DeError {
    let message = e.to_string();
    if message.starts_with(&format!("--{flag}: ")) {
        DeError::custom(message)
    } else {
        DeError::custom(format_args!("--{flag}: {message}"))
    }
}

/// Reads one value, parsing text as the field's type asks.
struct ValueDeserializer<'a> {
    flag: &'a str,
    value: SettingValue,
}

impl<'de> IntoDeserializer<'de, DeError> for ValueDeserializer<'_> {
    type Deserializer = Self;

    fn into_deserializer(self) -> Self {
        self
    }
}

impl ValueDeserializer<'_> {
    fn fail(&self, e: impl fmt::Display) -> DeError {
        tag(self.flag, e)
    }

    fn text(&self) -> Result<&str, DeError> {
        match &self.value {
            SettingValue::Text(t) => Ok(t),
            SettingValue::List(_) => Err(self.fail("takes one value, not a list")),
        }
    }

    fn parse<T: std::str::FromStr>(&self, what: &str) -> Result<T, DeError> {
        let text = self.text()?;
        text.trim()
            .parse()
            .map_err(|_| self.fail(format_args!("{text:?} is not {what}")))
    }
}

macro_rules! parsed {
    ($($method:ident => $visit:ident, $ty:ty, $what:literal;)*) => {$(
        fn $method<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
            let value: $ty = self.parse($what)?;
            visitor.$visit(value).map_err(|e: DeError| self.fail(e))
        }
    )*};
}

impl<'de> Deserializer<'de> for ValueDeserializer<'_> {
    type Error = DeError;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        if let SettingValue::List(_) = self.value {
            return self.deserialize_seq(visitor);
        }
        let text = self.text()?.to_string();
        visitor
            .visit_string(text)
            .map_err(|e: DeError| self.fail(e))
    }

    parsed! {
        deserialize_i8 => visit_i8, i8, "a number";
        deserialize_i16 => visit_i16, i16, "a number";
        deserialize_i32 => visit_i32, i32, "a number";
        deserialize_i64 => visit_i64, i64, "a number";
        deserialize_u8 => visit_u8, u8, "a number";
        deserialize_u16 => visit_u16, u16, "a number";
        deserialize_u32 => visit_u32, u32, "a number";
        deserialize_u64 => visit_u64, u64, "a number";
        deserialize_f32 => visit_f32, f32, "a number";
        deserialize_f64 => visit_f64, f64, "a number";
    }

    fn deserialize_bool<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        let text = self.text()?;
        let yes = match text.trim().to_ascii_lowercase().as_str() {
            "1" | "true" | "yes" | "on" => true,
            "0" | "false" | "no" | "off" => false,
            _ => return Err(self.fail(format_args!("{text:?} is not a yes/no value"))),
        };
        visitor.visit_bool(yes).map_err(|e: DeError| self.fail(e))
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        visitor.visit_some(self)
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> Result<V::Value, DeError> {
        visitor.visit_newtype_struct(self)
    }

    fn deserialize_seq<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        let flag = self.flag;
        let list = match self.value {
            SettingValue::Text(text) => vec![text],
            SettingValue::List(list) => list,
        };
        // Each item reads as a value of its own, and names the flag when it fails.
        let items = list.into_iter().map(|text| ValueDeserializer {
            flag,
            value: SettingValue::Text(text),
        });
        visitor
            .visit_seq(SeqDeserializer::new(items))
            .map_err(|e: DeError| tag(flag, e))
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, DeError> {
        let text = self.text()?.to_string();
        visitor
            .visit_enum(text.into_deserializer())
            .map_err(|e: DeError| self.fail(e))
    }

    serde::forward_to_deserialize_any! {
        i128 u128 char str string bytes byte_buf unit unit_struct tuple tuple_struct map struct
        identifier ignored_any
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::Handlers;
    use serde::Deserialize;
    use std::path::PathBuf;

    struct Nothing;

    impl Plugin for Nothing {
        fn name(&self) -> &str {
            "nothing"
        }

        fn handlers(&self, _side: Side) -> Handlers {
            Handlers::new()
        }
    }

    fn build(_setup: &PluginSetup) -> Result<Arc<dyn Plugin>, String> {
        Ok(Arc::new(Nothing))
    }

    const SPEC: PluginSpec = PluginSpec::new("nothing", "Nothing at all.", build).settings(&[
        SettingSpec::new("root", "nothing-root", "A directory.").env("RP_NOTHING_ROOT"),
        SettingSpec::new("routes", "route", "Routes.").repeatable(),
        SettingSpec::new("limit", "nothing-limit", "A number."),
        SettingSpec::new("loud", "nothing-loud", "A switch."),
    ]);

    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct Settings {
        root: Option<PathBuf>,
        #[serde(default)]
        routes: Vec<String>,
        #[serde(default)]
        limit: u64,
        #[serde(default)]
        loud: bool,
    }

    fn setup(values: &[(&str, SettingValue)]) -> PluginSetup {
        let values = values
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect();
        PluginSetup::new(&SPEC, values, NodeFacts::new(Side::Client, 1000))
    }

    #[test]
    fn values_read_into_the_plugins_struct() {
        let s: Settings = setup(&[]).settings().unwrap();
        assert_eq!(
            s,
            Settings {
                root: None,
                routes: vec![],
                limit: 0,
                loud: false
            }
        );
        let s: Settings = setup(&[
            ("root", "/srv".into()),
            ("routes", vec!["a".to_string(), "b".to_string()].into()),
            ("limit", " 42".into()),
            ("loud", "yes".into()),
        ])
        .settings()
        .unwrap();
        assert_eq!(s.root, Some(PathBuf::from("/srv")));
        assert_eq!(s.routes, ["a", "b"]);
        assert_eq!((s.limit, s.loud), (42, true));
        // A lone value is a list of one.
        let s: Settings = setup(&[("routes", "a".into())]).settings().unwrap();
        assert_eq!(s.routes, ["a"]);
    }

    #[test]
    fn errors_name_the_flag() {
        let err = setup(&[("limit", "lots".into())])
            .settings::<Settings>()
            .unwrap_err();
        assert!(
            err.contains("--nothing-limit") && err.contains("lots"),
            "{err}"
        );
        let err = setup(&[("root", vec!["a".to_string()].into())])
            .settings::<Settings>()
            .unwrap_err();
        assert!(err.contains("--nothing-root"), "{err}");
        let err = setup(&[("other", "x".into())])
            .settings::<Settings>()
            .unwrap_err();
        assert!(err.contains("other"), "{err}");
    }

    #[test]
    fn specs_describe_themselves() {
        assert_eq!(SPEC.name(), "nothing");
        assert_eq!(
            SPEC.setting("root").unwrap().env_var(),
            Some("RP_NOTHING_ROOT")
        );
        assert!(SPEC.setting("routes").unwrap().is_repeatable());
        assert!(SPEC.setting("nope").is_none());
        let setup = setup(&[]);
        assert_eq!(setup.node().max_frame, 1000);
        assert_eq!(SPEC.build(&setup).unwrap().name(), "nothing");
    }
}
