//! The local HTTP front door of a node: REST requests in, events across the pipe, replies out.
//!
//! On a client node `ANY /server/{noun...}` calls the server; on a server node
//! `ANY /client/{identity}/{noun...}` calls that client. Both serve `GET /health` and
//! `GET /status`; the server also serves `GET /clients`. The path maps to an event as docs/HTTP.md
//! says: the noun's segments are checked, the parameters after `//` are
//! percent-decoded, and the query string travels with the event. Every failure is a JSON
//! `{"error": ...}` with the status docs/HTTP.md gives; no request waits past its deadline.
//!
//! Every request first passes the Host and Origin guard ([`guard`]); connections are served by
//! our own accept loop ([`serve`]) on TCP or a Unix socket ([`HttpListen`]), with header, body
//! and idle timeouts and a cap on connections ([`HttpLimits`]).

mod guard;
mod serve;

pub use guard::AllowedHosts;
pub(crate) use serve::{bind_unix, serve, Listener};
pub use serve::{BodyStalled, HttpGauge, HttpLimits};

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::{to_bytes, Body};
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get};
use axum::{Json, Router};
use bytes::Bytes;
use restpipe_handler::grammar::{self, GrammarError};
use restpipe_handler::{Reply, Side};
use serde_json::json;

use crate::client::ClientNode;
use crate::error::CallError;
use crate::metrics::Metrics;
use crate::server::ServerNode;
use crate::util::epoch_secs;

/// The header that carries a reply's return code.
pub const RETURN_CODE_HEADER: &str = "x-event-return-code";
/// The header with which a request sets its own deadline, in milliseconds.
pub const TIMEOUT_HEADER: &str = "x-event-timeout-ms";

/// The pipe a front door talks to.
#[derive(Clone)]
pub enum Pipe {
    /// A server node: requests name a client.
    Server(ServerNode),
    /// A client node: requests go to the server.
    Client(ClientNode),
}

impl Pipe {
    fn side(&self) -> Side {
        match self {
            Pipe::Server(_) => Side::Server,
            Pipe::Client(_) => Side::Client,
        }
    }

    fn identity(&self) -> &str {
        match self {
            Pipe::Server(s) => s.identity(),
            Pipe::Client(c) => c.identity(),
        }
    }

    fn pipe_config(&self) -> &crate::node::PipeConfig {
        match self {
            Pipe::Server(s) => s.pipe(),
            Pipe::Client(c) => c.pipe(),
        }
    }
}

/// Settings of the front door.
#[derive(Clone, Debug)]
pub struct HttpOptions {
    /// Largest request body accepted, in bytes; larger is 413 and nothing is sent.
    pub max_body: usize,
    /// When set, every request must carry `Authorization: Bearer <token>`.
    pub token: Option<String>,
    /// Where metrics go (a tick per status class).
    pub metrics: Metrics,
}

/// Where the front door listens: a TCP address, or a Unix socket (`unix:/path/to/node.sock`).
#[derive(Clone, Debug, PartialEq, Eq, serde::Deserialize)]
#[serde(try_from = "String")]
pub enum HttpListen {
    /// A TCP address.
    Tcp(SocketAddr),
    /// The path of a Unix socket.
    Unix(PathBuf),
}

impl FromStr for HttpListen {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                return Err(
                    "unix: needs the path of the socket, as in unix:/run/restpipe/node.sock".into(),
                );
            }
            // sockaddr_un holds 108 bytes, the last a NUL.
            if path.len() > 107 {
                return Err(format!("the socket path {path:?} is over 107 bytes"));
            }
            return Ok(HttpListen::Unix(PathBuf::from(path)));
        }
        s.parse::<SocketAddr>().map(HttpListen::Tcp).map_err(|_| {
            format!("{s:?} is neither an address with a port (127.0.0.1:8080) nor unix:<path>")
        })
    }
}

impl TryFrom<String> for HttpListen {
    type Error = String;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl fmt::Display for HttpListen {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HttpListen::Tcp(addr) => write!(f, "{addr}"),
            HttpListen::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

impl From<SocketAddr> for HttpListen {
    fn from(addr: SocketAddr) -> Self {
        HttpListen::Tcp(addr)
    }
}

/// How the front door listens and whom it answers, besides [`HttpOptions`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServeOptions {
    /// Hosts that `Host` and `Origin` may name besides loopback.
    pub allowed_hosts: AllowedHosts,
    /// Timeouts and the connection cap.
    pub limits: HttpLimits,
    /// The permissions of a Unix socket (`0o660`: its owner and group may call).
    pub socket_mode: u32,
}

impl Default for ServeOptions {
    fn default() -> Self {
        ServeOptions {
            allowed_hosts: AllowedHosts::default(),
            limits: HttpLimits::default(),
            socket_mode: 0o660,
        }
    }
}

struct AppState {
    pipe: Pipe,
    options: HttpOptions,
    allowed_hosts: AllowedHosts,
    limits: HttpLimits,
    gauge: Arc<HttpGauge>,
    started: Instant,
}

type Shared = Arc<AppState>;

/// The router of a node's front door: its routes behind the guard. `gauge` counts the
/// connections the accept loop serves, for `/status`.
pub fn router(
    pipe: Pipe,
    options: HttpOptions,
    serve: &ServeOptions,
    gauge: Arc<HttpGauge>,
) -> Router {
    let side = pipe.side();
    let state = Arc::new(AppState {
        pipe,
        options,
        allowed_hosts: serve.allowed_hosts.clone(),
        limits: serve.limits,
        gauge,
        started: Instant::now(),
    });
    let mut app = Router::new()
        .route("/health", get(health))
        .route("/status", get(status));
    app = match side {
        Side::Client => app
            .route("/server", any(missing_noun))
            .route("/server/", any(missing_noun))
            .route("/server/{*rest}", any(call_peer)),
        Side::Server => app
            .route("/clients", get(clients))
            .route("/client/{*rest}", any(call_peer)),
    };
    app.fallback(not_found)
        .layer(middleware::from_fn_with_state(state.clone(), guard))
        .with_state(state)
}

/// An error response: `{"error": message}` with `status`.
pub fn error_response(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(json!({ "error": message.into() }))).into_response()
}

/// The Host and Origin guard, authentication and status-class metrics around every request.
async fn guard(State(state): State<Shared>, request: Request, next: Next) -> Response {
    if let Err(refusal) = guard::check(
        &state.allowed_hosts,
        request.version(),
        request.uri(),
        request.headers(),
    ) {
        let response = error_response(refusal.status, refusal.message);
        count_status(&state.options.metrics, response.status());
        return response;
    }
    if let Some(token) = &state.options.token {
        if !bearer_matches(request.headers(), token) {
            let mut response = error_response(
                StatusCode::UNAUTHORIZED,
                "missing or wrong bearer token: send `Authorization: Bearer <token>` with the token given to --http-token",
            );
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            count_status(&state.options.metrics, response.status());
            return response;
        }
    }
    let response = next.run(request).await;
    count_status(&state.options.metrics, response.status());
    response
}

fn count_status(metrics: &Metrics, status: StatusCode) {
    metrics.tick(match status.as_u16() {
        100..=199 => "http.status.1xx.tick",
        200..=299 => "http.status.2xx.tick",
        300..=399 => "http.status.3xx.tick",
        400..=499 => "http.status.4xx.tick",
        _ => "http.status.5xx.tick",
    });
}

fn bearer_matches(headers: &HeaderMap, token: &str) -> bool {
    use subtle::ConstantTimeEq;
    // The scheme is case-insensitive and may be followed by more than one space (RFC 9110,
    // section 11.1; RFC 6750, section 2.1).
    let Some(given) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, token)| token.trim_start_matches(' '))
    else {
        return false;
    };
    given.as_bytes().ct_eq(token.as_bytes()).into()
}

async fn not_found(State(state): State<Shared>) -> Response {
    let hint = match state.pipe.side() {
        Side::Client => "this is a client node: call the server with /server/<noun>[//<parameters>], or see /health and /status",
        Side::Server => "this is a server node: call a client with /client/<identity>/<noun>[//<parameters>], or see /health, /status and /clients",
    };
    error_response(StatusCode::NOT_FOUND, format!("no such endpoint; {hint}"))
}

async fn missing_noun() -> Response {
    error_response(
        StatusCode::BAD_REQUEST,
        "name a noun: /server/<noun>[//<parameters>], for example /server/time",
    )
}

async fn health(State(state): State<Shared>) -> Response {
    match &state.pipe {
        Pipe::Server(server) if server.is_listening() => Json(json!({
            "status": "ok",
            "role": "server",
            "listening": server.local_addr().to_string(),
            "clients": server.registry().len(),
        }))
        .into_response(),
        Pipe::Server(_) => {
            error_response(StatusCode::SERVICE_UNAVAILABLE, "the pipe is not listening")
        }
        Pipe::Client(client) => match client.status() {
            Some(conn) => Json(json!({
                "status": "ok",
                "role": "client",
                "server": conn.address,
            }))
            .into_response(),
            None => error_response(
                StatusCode::SERVICE_UNAVAILABLE,
                format!(
                    "the pipe to the server {} is down; it is being re-dialled",
                    client.server()
                ),
            ),
        },
    }
}

async fn status(State(state): State<Shared>) -> Response {
    let pipe = &state.pipe;
    let peers = match pipe {
        Pipe::Server(server) => server.clients(),
        Pipe::Client(client) => client.status().into_iter().collect(),
    };
    let mut body = json!({
        "role": pipe.side().as_str(),
        "identity": pipe.identity(),
        "version": env!("CARGO_PKG_VERSION"),
        "uptime_s": state.started.elapsed().as_secs_f64(),
        "now": epoch_secs(std::time::SystemTime::now()),
        "peers": peers,
        "metrics": state.options.metrics.stats(),
        "http": {
            "connections": state.gauge.open(),
            "max_connections": state.limits.max_connections,
            "refused_connections": state.gauge.refused(),
        },
    });
    match pipe {
        Pipe::Server(server) => {
            body["listening"] = json!(server.local_addr().to_string());
            body["pending_handshakes"] = json!(server.pending_handshakes());
        }
        Pipe::Client(client) => {
            body["server"] = json!(client.server());
            body["connected"] = json!(client.is_connected());
        }
    }
    Json(body).into_response()
}

async fn clients(State(state): State<Shared>) -> Response {
    match &state.pipe {
        Pipe::Server(server) => Json(server.clients()).into_response(),
        Pipe::Client(_) => not_found(State(state.clone())).await,
    }
}

/// A request turned into an event, or the error response that says why it cannot be one.
#[derive(Debug, PartialEq, Eq)]
pub struct Target {
    /// The client named (server side only).
    pub client: Option<String>,
    /// The noun, segments joined by `/`.
    pub noun: String,
    /// The decoded parameters.
    pub parameters: Vec<String>,
}

/// Map a raw request path to the client it names (server side), the noun and the parameters.
///
/// `side` is the side of the node that received the request. Errors are messages for a 400.
pub fn parse_path(side: Side, path: &str) -> Result<Target, String> {
    let (client, rest) = match side {
        Side::Client => {
            let rest = path
                .strip_prefix("/server/")
                .ok_or("client nodes take /server/<noun>")?;
            (None, rest)
        }
        Side::Server => {
            let rest = path
                .strip_prefix("/client/")
                .ok_or("server nodes take /client/<identity>/<noun>")?;
            let (identity, rest) = rest.split_once('/').unwrap_or((rest, ""));
            // A client may be named by its IP address, and an IPv6 address holds `:`.
            if identity.parse::<std::net::IpAddr>().is_err() {
                grammar::check_segment(identity)
                    .map_err(|e| format!("bad client identity: {e}"))?;
            }
            (Some(identity.to_string()), rest)
        }
    };
    let (noun, params) = match rest.split_once("//") {
        Some((noun, params)) => (noun, Some(params)),
        None => (rest, None),
    };
    if noun.is_empty() {
        return Err("name a noun after the prefix, for example .../time".into());
    }
    grammar::check_noun(noun).map_err(|e| match e {
        // Not the noun itself: it is long.
        GrammarError::TooLong(_) => e.to_string(),
        e => format!("bad noun {noun:?}: {e}"),
    })?;
    let parameters = match params {
        None | Some("") => Vec::new(),
        Some(params) => params
            .split('/')
            .enumerate()
            .map(|(i, p)| decode_parameter(p).map_err(|e| format!("parameter {}: {e}", i + 1)))
            .collect::<Result<_, _>>()?,
    };
    Ok(Target {
        client,
        noun: noun.to_string(),
        parameters,
    })
}

/// Percent-decode one parameter; malformed escapes and invalid UTF-8 are refused.
fn decode_parameter(raw: &str) -> Result<String, String> {
    let bytes = raw.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let ok = bytes.len() > i + 2
                && bytes[i + 1].is_ascii_hexdigit()
                && bytes[i + 2].is_ascii_hexdigit();
            if !ok {
                return Err(format!("{raw:?} has a malformed percent escape"));
            }
            i += 3;
        } else {
            i += 1;
        }
    }
    percent_encoding::percent_decode_str(raw)
        .decode_utf8()
        .map(|s| s.into_owned())
        .map_err(|_| format!("{raw:?} is not valid UTF-8 once decoded"))
}

async fn call_peer(State(state): State<Shared>, request: Request) -> Response {
    let method = request.method().clone();
    if !grammar::is_verb(method.as_str()) {
        let mut response = error_response(
            StatusCode::METHOD_NOT_ALLOWED,
            format!("{method} does not cross the pipe; use GET, POST, PUT, PATCH or DELETE"),
        );
        response
            .headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static(grammar::ALLOW));
        return response;
    }
    let side = state.pipe.side();
    let target = match parse_path(side, request.uri().path()) {
        Ok(target) => target,
        Err(message) => return error_response(StatusCode::BAD_REQUEST, message),
    };
    let query = request.uri().query().unwrap_or("").to_string();
    let headers = request.headers();
    let timeout = match requested_timeout(headers, state.pipe.pipe_config()) {
        Ok(timeout) => timeout,
        Err(message) => return error_response(StatusCode::BAD_REQUEST, message),
    };
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let limit = state.options.max_body;
    let too_large = |size: &str| {
        error_response(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "request body of {size} bytes is over the limit of {limit} bytes; nothing was sent"
            ),
        )
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if let Some(declared) = declared.filter(|&n| n > limit as u64) {
        return too_large(&declared.to_string());
    }
    let body: Bytes = match to_bytes(request.into_body(), limit).await {
        Ok(body) => body,
        Err(e) if over_limit(&e) => return too_large(&format!("more than {limit}")),
        Err(e) if stalled(&e) => {
            let mut response = error_response(
                StatusCode::REQUEST_TIMEOUT,
                format!("{}; nothing was sent", causes(&e)),
            );
            response
                .headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
            return response;
        }
        // A malformed chunked encoding, say: the client's fault, but not a body too large.
        Err(e) => {
            return error_response(
                StatusCode::BAD_REQUEST,
                format!(
                    "the request body could not be read ({}); nothing was sent",
                    causes(&e)
                ),
            )
        }
    };
    let event = restpipe_handler::Request {
        verb: method.as_str().to_string(),
        noun: target.noun,
        parameters: target.parameters,
        query,
        content_type,
        body,
    };
    let result = match &state.pipe {
        Pipe::Client(client) => client.call(event, Some(timeout)).await,
        Pipe::Server(server) => {
            let name = target.client.unwrap_or_default();
            server.call(&name, event, Some(timeout)).await
        }
    };
    match result {
        Ok(reply) => reply_response(reply),
        Err(err) => call_error_response(&err),
    }
}

/// Whether reading a body failed because it went over the limit, rather than because it was
/// malformed or cut short.
fn over_limit(err: &axum::Error) -> bool {
    caused_by::<http_body_util::LengthLimitError>(err)
}

/// Whether reading a body failed because it brought no byte for the body timeout.
fn stalled(err: &axum::Error) -> bool {
    caused_by::<BodyStalled>(err)
}

/// Whether `err` or one of its causes is a `T`.
fn caused_by<T: std::error::Error + 'static>(err: &axum::Error) -> bool {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = cause {
        if e.is::<T>() {
            return true;
        }
        cause = e.source();
    }
    false
}

/// An error and its causes, joined by `: `.
fn causes(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut cause = err.source();
    while let Some(e) = cause {
        let more = e.to_string();
        if !text.ends_with(&more) {
            text = format!("{text}: {more}");
        }
        cause = e.source();
    }
    text
}

fn requested_timeout(
    headers: &HeaderMap,
    pipe: &crate::node::PipeConfig,
) -> Result<Duration, String> {
    let Some(value) = headers.get(TIMEOUT_HEADER) else {
        return Ok(pipe.request_timeout);
    };
    let max = pipe.max_request_timeout.as_millis();
    let ms = value
        .to_str()
        .ok()
        .and_then(|v| v.trim().parse::<u64>().ok())
        .filter(|&ms| ms > 0 && u128::from(ms) <= max)
        .ok_or_else(|| {
            format!("{TIMEOUT_HEADER} must be a whole number of milliseconds from 1 to {max}")
        })?;
    Ok(Duration::from_millis(ms))
}

/// The HTTP response for a reply that crossed the pipe.
pub fn reply_response(reply: Reply) -> Response {
    let status = reply
        .status
        .and_then(|s| StatusCode::from_u16(s).ok())
        .unwrap_or(match reply.code {
            restpipe_handler::codes::OK => StatusCode::OK,
            restpipe_handler::codes::NO_HANDLER => StatusCode::NOT_FOUND,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        });
    let mut response = Response::new(Body::from(reply.body));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    let content_type = if reply.content_type.is_empty() {
        HeaderValue::from_static("application/octet-stream")
    } else {
        HeaderValue::from_str(&reply.content_type)
            .unwrap_or_else(|_| HeaderValue::from_static("application/octet-stream"))
    };
    headers.insert(header::CONTENT_TYPE, content_type);
    headers.insert(RETURN_CODE_HEADER, HeaderValue::from(reply.code));
    response
}

/// The HTTP response for a call that got no reply.
pub fn call_error_response(err: &CallError) -> Response {
    let status = match err {
        CallError::PipeClosed(_) | CallError::Refused(_) => StatusCode::BAD_GATEWAY,
        CallError::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
        CallError::NotConnected(_) | CallError::Overloaded(_) | CallError::ShuttingDown(_) => {
            StatusCode::SERVICE_UNAVAILABLE
        }
        CallError::TooLarge { .. } | CallError::FrameTooLarge { .. } => {
            StatusCode::PAYLOAD_TOO_LARGE
        }
        CallError::UriTooLong(_) => StatusCode::URI_TOO_LONG,
        CallError::HeaderTooLarge(_) => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
        CallError::Ambiguous(_) => StatusCode::CONFLICT,
        CallError::BadRequest(_) => StatusCode::BAD_REQUEST,
    };
    let mut response = error_response(status, err.to_string());
    if status == StatusCode::SERVICE_UNAVAILABLE {
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_map_to_events() {
        let t = parse_path(Side::Client, "/server/cat//hello%20/world").unwrap();
        assert_eq!(t.noun, "cat");
        assert_eq!(t.parameters, vec!["hello ", "world"]);
        let t = parse_path(Side::Client, "/server/time/utc").unwrap();
        assert_eq!((t.noun.as_str(), t.parameters.len()), ("time/utc", 0));
        let t = parse_path(Side::Server, "/client/fileserver-1/file//reports/q3.csv").unwrap();
        assert_eq!(t.client.as_deref(), Some("fileserver-1"));
        assert_eq!(t.parameters, vec!["reports", "q3.csv"]);
        let t = parse_path(Side::Server, "/client/::1/time").unwrap();
        assert_eq!(t.client.as_deref(), Some("::1"));
    }

    #[test]
    fn bad_paths_are_refused() {
        for path in [
            "/server/",
            "/server/a/../b",
            "/server/a//%zz",
            "/server/a//%ff",
            "/server/a b",
            "/server/a%2Fb",
            "/server/a/",
            "/server/.",
        ] {
            assert!(parse_path(Side::Client, path).is_err(), "{path}");
        }
        assert!(parse_path(Side::Server, "/client/../time").is_err());
        assert!(parse_path(Side::Server, "/client/x").is_err());
    }
}
