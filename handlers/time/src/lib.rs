//! The `time` handler plug-in: RestPipe's two example handlers, served on both sides.
//!
//! restpipe ships them so that a new installation can be checked end to end with nothing
//! but curl:
//!
//! - `get_time` (`GET /server/time`) answers the clock of the node that runs it, in seconds
//!   since the Unix epoch as a float: `{"time_from_server": 1402897823.88}`;
//! - `get_cat` (`GET /server/cat//hello%20/world`) answers its parameters concatenated:
//!   `{"result_from_server": "hello world"}`.
//!
//! The key names the side that *runs* the handler: the same calls made from the server node
//! to a client (`GET /client/{identity}/time`) answer `time_from_client` and
//! `result_from_client`. The side is the one the plug-in's handlers were made for
//! ([`Plugin::handlers`]).
//!
//! ```
//! use restpipe_handler::{Context, Plugin, Request, Side};
//! use restpipe_handler_time::TimePlugin;
//!
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! let handlers = TimePlugin.handlers(Side::Server);
//! assert_eq!(handlers.names(), ["get_cat", "get_time"]);
//!
//! // What `GET /server/cat//hello%20/world` reaches on the server node.
//! let request = Request::new("GET", "cat").with_parameters(vec!["hello ".into(), "world".into()]);
//! let reply = handlers.call(Context::for_test(Side::Server), request).await.unwrap();
//! assert_eq!(reply.content_type, "application/json");
//! assert_eq!(&reply.body[..], br#"{"result_from_server":"hello world"}"#);
//! # });
//! ```

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use restpipe_handler::{
    Context, HandlerError, Handlers, Plugin, PluginSetup, PluginSpec, Request, Side,
};

/// How a node registers this plug-in: the name `time`, no settings.
pub const SPEC: PluginSpec = PluginSpec::new(
    "time",
    "get_time and get_cat, RestPipe's example handlers",
    build,
);

fn build(_setup: &PluginSetup) -> Result<Arc<dyn Plugin>, String> {
    Ok(Arc::new(TimePlugin))
}

/// RestPipe's example handlers, `get_time` and `get_cat`, for either side.
///
/// Register it with a node under the name `time`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TimePlugin;

impl Plugin for TimePlugin {
    fn name(&self) -> &str {
        "time"
    }

    fn handlers(&self, side: Side) -> Handlers {
        let time_key = time_key(side);
        let cat_key = cat_key(side);
        let mut handlers = Handlers::new();
        handlers.add("get_time", move |_ctx: Context, _req: Request| async move {
            let now = SystemTime::now().duration_since(UNIX_EPOCH).map_err(|e| {
                HandlerError::new(format!("the clock of this node is before 1970: {e}"))
                    .with_class("ClockError")
            })?;
            Ok::<_, HandlerError>(BTreeMap::from([(time_key, now.as_secs_f64())]))
        });
        handlers.add("get_cat", move |_ctx: Context, req: Request| async move {
            Ok::<_, HandlerError>(BTreeMap::from([(cat_key, req.parameters.concat())]))
        });
        handlers
    }
}

/// `time_from_server` or `time_from_client`: the side that runs the handler.
fn time_key(side: Side) -> &'static str {
    match side {
        Side::Server => "time_from_server",
        Side::Client => "time_from_client",
    }
}

/// `result_from_server` or `result_from_client`: the side that runs the handler.
fn cat_key(side: Side) -> &'static str {
    match side {
        Side::Server => "result_from_server",
        Side::Client => "result_from_client",
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests may unwrap: a panic is a failed test
mod tests {
    use super::*;
    use restpipe_handler::codes;
    use serde_json::Value;

    async fn call(side: Side, request: Request) -> (restpipe_handler::Reply, Value) {
        let reply = TimePlugin
            .handlers(side)
            .call(Context::for_test(side), request)
            .await
            .unwrap();
        let value: Value = serde_json::from_slice(&reply.body).unwrap();
        (reply, value)
    }

    fn epoch_now() -> f64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs_f64()
    }

    #[test]
    fn the_spec_builds_the_plugin() {
        use restpipe_handler::NodeFacts;
        assert_eq!(SPEC.name(), "time");
        assert!(SPEC.setting_specs().is_empty());
        let setup = PluginSetup::new(&SPEC, Default::default(), NodeFacts::new(Side::Server, 1));
        let plugin = SPEC.build(&setup).unwrap();
        assert_eq!(plugin.name(), "time");
    }

    #[test]
    fn name_and_handlers() {
        assert_eq!(TimePlugin.name(), "time");
        for side in [Side::Server, Side::Client] {
            assert_eq!(TimePlugin.handlers(side).names(), ["get_cat", "get_time"]);
        }
    }

    #[tokio::test]
    async fn get_time_on_the_server_names_the_server() {
        let before = epoch_now();
        let (reply, value) = call(Side::Server, Request::new("GET", "time")).await;
        let after = epoch_now();
        assert_eq!(reply.code, codes::OK);
        assert_eq!(reply.status, None);
        assert_eq!(reply.content_type, "application/json");
        let object = value.as_object().unwrap();
        assert_eq!(object.len(), 1);
        let t = object["time_from_server"].as_f64().unwrap();
        assert!(before <= t && t <= after, "{before} <= {t} <= {after}");
    }

    #[tokio::test]
    async fn get_time_on_the_client_names_the_client() {
        let (reply, value) = call(Side::Client, Request::new("GET", "time")).await;
        assert_eq!(reply.code, codes::OK);
        let object = value.as_object().unwrap();
        assert_eq!(object.len(), 1);
        let t = object["time_from_client"].as_f64().unwrap();
        // Seconds, not milliseconds: some time after 2020 and before 2100.
        assert!(t > 1_577_836_800.0 && t < 4_102_444_800.0, "{t}");
        // A float with the fraction of the second, as RestPipe's time.time().
        assert!(value["time_from_client"].is_f64());
    }

    #[tokio::test]
    async fn get_cat_concatenates_on_the_server() {
        // `GET /server/cat//hello%20/world`, as RestPipe's README shows it.
        let request =
            Request::new("GET", "cat").with_parameters(vec!["hello ".into(), "world".into()]);
        let (reply, value) = call(Side::Server, request).await;
        assert_eq!(reply.code, codes::OK);
        assert_eq!(
            value,
            serde_json::json!({"result_from_server": "hello world"})
        );
        assert_eq!(&reply.body[..], br#"{"result_from_server":"hello world"}"#);
    }

    #[tokio::test]
    async fn get_cat_concatenates_on_the_client() {
        let request = Request::new("GET", "cat").with_parameters(vec![
            "a".into(),
            "".into(),
            "é/ü".into(),
            "\"q\"".into(),
        ]);
        let (_, value) = call(Side::Client, request).await;
        assert_eq!(
            value,
            serde_json::json!({"result_from_client": "aé/ü\"q\""})
        );
    }

    #[tokio::test]
    async fn get_cat_without_parameters_is_empty() {
        let (_, value) = call(Side::Server, Request::new("GET", "cat")).await;
        assert_eq!(value, serde_json::json!({"result_from_server": ""}));
    }

    #[tokio::test]
    async fn other_verbs_have_no_handler() {
        let reply = TimePlugin
            .handlers(Side::Server)
            .call(
                Context::for_test(Side::Server),
                Request::new("POST", "time"),
            )
            .await
            .unwrap();
        assert_eq!(reply.code, codes::NO_HANDLER);
        assert_eq!(reply.status, Some(404));
    }
}
