//! The local HTTP front door of a node: REST requests in, events across the pipe, replies out.
//!
//! On a client node `ANY /server/{noun...}` calls the server; on a server node
//! `ANY /client/{identity}/{noun...}` calls that client. Both serve `GET /health`,
//! `GET /status`, `GET /metrics`, `GET /queued/{id}` and a status page at `GET /`; the server also serves
//! `GET /clients`. The path maps to an event as docs/HTTP.md
//! says: the noun's segments are checked, the parameters after `//` are
//! percent-decoded, and the query string travels with the event. Every failure is a JSON
//! `{"error": ...}` with the status docs/HTTP.md gives; no request waits past its deadline.
//!
//! The parts, one file each:
//!
//! - this file: the router, the endpoints of the node itself (`/health`, `/status`,
//!   `/clients`), the token check (`--http-token` and the policy's scoped tokens) and the
//!   status-class metrics;
//! - `call`: a call through the door, from the path to the event and from the reply (or the
//!   failure) to the response;
//! - `guard`: the Host and Origin guard every request passes first;
//! - `events`: publish/subscribe at the door: `POST /publish/{topic}` and `GET /events/{glob}`
//!   as Server-Sent Events (docs/PUBSUB.md);
//! - `queued`: queued delivery at the door: `X-Event-Delivery: queued` (202 and an id) and
//!   `GET /queued/{id}` (docs/QUEUE.md);
//! - `page`: the operator's view, `GET /metrics` (Prometheus) and the status page at `GET /`;
//! - `listen`: where the door listens ([`HttpListen`], TCP or a Unix socket) and how
//!   ([`ServeOptions`]);
//! - `serve`: the accept loop, with header, body and idle timeouts and a cap on connections
//!   ([`HttpLimits`]).

mod call;
mod events;
mod guard;
mod listen;
mod page;
mod queued;
mod serve;
mod trace;

use call::call_peer;
pub use call::{call_error_response, parse_path, reply_response, Target};
pub use guard::AllowedHosts;
pub use listen::{HttpListen, ServeOptions};
pub(crate) use serve::{bind_unix, serve, Listener};
pub use serve::{BodyStalled, HttpGauge, HttpLimits, WRITE_STALL};
pub use trace::{REQUEST_ID_HEADER, TRACEPARENT_HEADER};

use std::sync::Arc;
use std::time::Instant;

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get};
use axum::{Json, Router};
use restpipe_handler::Side;
use serde_json::json;
use subtle::ConstantTimeEq;
use tower_service::Service as _;
use tracing::Instrument;

use crate::client::ClientNode;
use crate::metrics::Metrics;
use crate::policy::Policy;
use crate::server::ServerNode;
use crate::util::epoch_secs;

/// The header that carries a reply's return code.
pub const RETURN_CODE_HEADER: &str = "x-event-return-code";
/// The header with which a request sets its own deadline, in milliseconds.
pub const TIMEOUT_HEADER: &str = "x-event-timeout-ms";

/// The header names the front door reads or writes on every request, made once: a lookup by
/// a `&str` parses and hashes the name again each time (measured with callgrind).
pub(crate) mod names {
    use axum::http::{HeaderMap, HeaderName, HeaderValue};

    /// `X-Event-Return-Code`.
    pub static RETURN_CODE: HeaderName = HeaderName::from_static(super::RETURN_CODE_HEADER);
    /// `X-Event-Timeout-Ms`.
    pub static TIMEOUT: HeaderName = HeaderName::from_static(super::TIMEOUT_HEADER);
    /// `X-Request-Id`.
    pub static REQUEST_ID: HeaderName = HeaderName::from_static(super::REQUEST_ID_HEADER);
    /// `traceparent`.
    pub static TRACEPARENT: HeaderName = HeaderName::from_static(super::TRACEPARENT_HEADER);
    /// `X-Event-Delivery`.
    pub static DELIVERY: HeaderName = HeaderName::from_static(crate::queue::DELIVERY_HEADER);
    /// `X-Event-TTL-S`.
    pub static TTL: HeaderName = HeaderName::from_static(crate::queue::TTL_HEADER);
    /// `Sec-Fetch-Site`.
    pub static SEC_FETCH_SITE: HeaderName = HeaderName::from_static("sec-fetch-site");

    /// Up to this many headers, a lookup walks them instead of hashing the name.
    const WALK: usize = 12;

    /// The values of `name` in `headers`: how many there are, and the first. A request
    /// carries a handful of headers, and walking them costs less than hashing the name (this
    /// runs several times for every request; measured with callgrind).
    pub fn find<'a>(headers: &'a HeaderMap, name: &HeaderName) -> (usize, Option<&'a HeaderValue>) {
        if headers.keys_len() > WALK {
            let mut values = headers.get_all(name).iter();
            let first = values.next();
            return (first.map_or(0, |_| 1 + values.count()), first);
        }
        let mut matching = headers.iter().filter(|(n, _)| *n == name).map(|(_, v)| v);
        let first = matching.next();
        (first.map_or(0, |_| 1 + matching.count()), first)
    }

    /// The first value of `name` in `headers` (see [`find`]).
    pub fn get<'a>(headers: &'a HeaderMap, name: &HeaderName) -> Option<&'a HeaderValue> {
        find(headers, name).1
    }
}

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

    /// The policy in force on the node, with the tokens of its front door: a cheap guard,
    /// taken on every request (no reference count touched).
    fn policy(&self) -> arc_swap::Guard<Arc<Policy>> {
        self.core().policy.load()
    }

    fn pipe_config(&self) -> &crate::node::PipeConfig {
        &self.core().pipe
    }

    /// The parts of the node its connections use.
    pub(crate) fn core(&self) -> &Arc<crate::node::NodeCore> {
        match self {
            Pipe::Server(s) => s.core(),
            Pipe::Client(c) => c.core(),
        }
    }

    /// Use new TLS material: see [`ServerNode::reload_tls`] and [`ClientNode::reload_tls`].
    pub fn reload_tls(
        &self,
        material: &crate::tls::TlsMaterial,
    ) -> Result<Vec<String>, crate::NodeError> {
        match self {
            Pipe::Server(s) => s.reload_tls(material),
            Pipe::Client(c) => c.reload_tls(material),
        }
    }
}

/// Settings of the front door.
#[derive(Clone, Debug)]
pub struct HttpOptions {
    /// Largest request body accepted, in bytes (`--max-body`); a larger one is 413, refused
    /// before anything is sent when its `Content-Length` says so, else cut off where it goes
    /// over, the far side seeing an incomplete body.
    pub max_body: u64,
    /// When set, every request must carry `Authorization: Bearer <token>` with this token or
    /// one of the policy's (see [`crate::policy`]); this one has every scope.
    pub token: Option<String>,
    /// Where metrics go (a tick per status class).
    pub metrics: Metrics,
    /// The node's queue, for `X-Event-Delivery: queued` and `GET /queued/{id}`
    /// (docs/QUEUE.md); without one, those are answered 501.
    pub queue: Option<crate::queue::Queue>,
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

/// A node's front door: its routes behind the guard, which every request passes first (the
/// Host and Origin check, the token, the trace context, the status-class metrics).
///
/// The guard runs once per request in front of the router, rather than as an axum layer on
/// each route, which boxed and cloned services around every request (measured with
/// callgrind).
#[derive(Clone)]
pub struct FrontDoor {
    state: Shared,
    router: Router,
}

impl FrontDoor {
    /// Answer one request.
    pub async fn handle(self, request: Request) -> Response {
        guard(self.state, request, self.router).await
    }
}

/// The front door of a node. `gauge` counts the connections the accept loop serves, for
/// `/status`.
pub fn front_door(
    pipe: Pipe,
    options: HttpOptions,
    serve: &ServeOptions,
    gauge: Arc<HttpGauge>,
) -> FrontDoor {
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
        .route("/status", get(status))
        .route("/status/history", get(page::history))
        .route("/metrics", get(page::metrics))
        .route("/queued/{id}", get(queued::status))
        .route("/publish/{*topic}", axum::routing::post(events::publish))
        .route("/events/{*glob}", get(events::events))
        .route("/", get(page::page));
    app = match side {
        Side::Client => app
            .route("/server", any(missing_noun))
            .route("/server/", any(missing_noun)),
        Side::Server => app.route("/clients", get(clients)),
    };
    let router = app.fallback(not_found).with_state(state.clone());
    FrontDoor { state, router }
}

/// An error response: `{"error": message}` with `status`.
pub fn error_response(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(json!({ "error": message.into() }))).into_response()
}

/// The Host and Origin guard, authentication and status-class metrics around every request.
async fn guard(state: Shared, request: Request, router: Router) -> Response {
    // Every request gets a trace context first: its id names it in the logs of both nodes
    // and comes back in `X-Request-Id`, refusals included.
    let trace = trace::of_request(request.headers());
    let request_id = HeaderValue::from_str(trace.request_id()).ok();
    // Debug level: a span per request is not free (the benchmark showed it), so request ids
    // name log lines when the node runs with --debug, where the per-request lines are.
    let span = tracing::debug_span!("http", request_id = %trace.request_id());
    let mut response = checked(&state, request, router, trace)
        .instrument(span)
        .await;
    if let Some(id) = request_id {
        response.headers_mut().insert(&names::REQUEST_ID, id);
    }
    response
}

/// The guard, the token check and the status-class metrics around the routes. A call through
/// the pipe goes straight to [`call_peer`]; the router serves the node's own endpoints.
async fn checked(
    state: &Shared,
    request: Request,
    mut router: Router,
    trace: restpipe_handler::TraceContext,
) -> Response {
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
    if let Some(response) = refusal(state, &request) {
        count_status(&state.options.metrics, response.status());
        return response;
    }
    // Clones that share the request's buffers: nothing is allocated per request.
    let (method, uri) = (request.method().clone(), request.uri().clone());
    let response = if is_call(state.pipe.side(), uri.path()) {
        // Not through the router: its fallback would box a copy of the call's future, clone a
        // boxed handler and carry the trace in the request's extensions, for every call
        // (measured with callgrind: docs/PERFORMANCE.md).
        let mut response = call_peer(state.clone(), request, trace).await;
        as_routed(&mut response, &method);
        response
    } else {
        // A router is always ready: it needs no `poll_ready` first.
        match router.call(request).await {
            Ok(response) => response,
            Err(never) => match never {},
        }
    };
    count_status(&state.options.metrics, response.status());
    if response.status().is_server_error() {
        state.options.metrics.error_event(
            "http 5xx",
            &format!("{} {method} {}", response.status().as_u16(), uri.path()),
        );
    }
    response
}

/// Whether `path` is a call through the pipe: under the side's prefix (`/server/` on a client
/// node, `/client/` on a server node). `/server/` alone is the router's (it names no noun); the
/// call refuses a `/client/` that names no client itself.
fn is_call(side: Side, path: &str) -> bool {
    let prefix = call::call_prefix(side);
    path.starts_with(prefix) && (side == Side::Server || path.len() > prefix.len())
}

/// What the router does to every response it gives: a `Content-Length` when the body's size
/// is known and none is set, and no body at all for a `HEAD`.
fn as_routed(response: &mut Response, method: &axum::http::Method) {
    use axum::body::HttpBody as _;
    if !response.headers().contains_key(header::CONTENT_LENGTH) {
        if let Some(size) = response.body().size_hint().exact() {
            response
                .headers_mut()
                .insert(header::CONTENT_LENGTH, HeaderValue::from(size));
        }
    }
    if method == axum::http::Method::HEAD {
        *response.body_mut() = axum::body::Body::empty();
    }
}

/// The token check, on every route; the answer that refuses the request, if any: with no `--http-token` and no token in the policy, every
/// request passes. Otherwise the bearer token is compared with each of them, every one in
/// constant time: none matching is 401 (with `WWW-Authenticate: Bearer`); `--http-token` has
/// every scope; a policy token outside its scopes (verb, path) is 403, naming the token and
/// the scope it lacks.
fn refusal(state: &AppState, request: &Request) -> Option<Response> {
    let policy = state.pipe.policy();
    let every_scope = state.options.token.as_deref();
    if every_scope.is_none() && policy.tokens().is_empty() {
        return None;
    }
    let given = bearer(request.headers());
    let presented = given.unwrap_or("").as_bytes();
    let full = every_scope.is_some_and(|token| bool::from(presented.ct_eq(token.as_bytes())));
    let scoped = policy.token_for(presented);
    if given.is_none() || (!full && scoped.is_none()) {
        let accepted = match (every_scope.is_some(), policy.tokens().is_empty()) {
            (true, true) => "the token given to --http-token",
            (true, false) => "the token given to --http-token or a token of the --policy file",
            _ => "a token of the --policy file",
        };
        let mut response = error_response(
            StatusCode::UNAUTHORIZED,
            format!("missing or wrong bearer token: send `Authorization: Bearer <token>` with {accepted}"),
        );
        response
            .headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        return Some(response);
    }
    match scoped {
        Some(token) if !full => token
            .permits(request.method().as_str(), request.uri().path())
            .err()
            .map(|lacks| error_response(StatusCode::FORBIDDEN, lacks)),
        _ => None,
    }
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

/// The token of an `Authorization: Bearer <token>` header, if the request has one.
fn bearer(headers: &HeaderMap) -> Option<&str> {
    // The scheme is case-insensitive and may be followed by more than one space (RFC 9110,
    // section 11.1; RFC 6750, section 2.1).
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, token)| token.trim_start_matches(' '))
}

/// Every path no route names; calls through the pipe never reach the router (see
/// [`checked`]).
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
        "certificate": pipe.core().own_cert.load().summary(),
        "reload": pipe.core().last_reload.load_full().as_deref(),
        "metrics": state.options.metrics.stats(),
        "queue": state.options.queue.as_ref().map(|q| {
            let pending = q.pending();
            json!({ "pending": pending.count, "pending_bytes": pending.bytes })
        }),
        "pubsub": pipe.core().pubsub.get().map(crate::pubsub::Pubsub::status),
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
            if let Some(cluster) = server.cluster() {
                body["cluster"] = cluster.status();
                // The stores of dead replicas this one delivers (docs/CLUSTER.md).
                if let Some(handover) = state
                    .options
                    .queue
                    .as_ref()
                    .and_then(|q| q.handover_status())
                {
                    body["cluster"]["queue_handover"] = handover;
                }
            }
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
        Pipe::Server(server) => match server.cluster() {
            None => Json(server.clients()).into_response(),
            // In a cluster: every client of every replica, each with its replica.
            Some(cluster) => {
                let mut all: Vec<serde_json::Value> = server
                    .clients()
                    .into_iter()
                    .map(|status| {
                        let epoch = cluster.local_epoch(&status.identity);
                        let mut value = json!(status);
                        value["replica"] = json!(cluster.replica());
                        value["epoch"] = json!(epoch);
                        value
                    })
                    .collect();
                all.extend(cluster.remote_clients().into_iter().map(|r| json!(r)));
                all.sort_by(|a, b| {
                    a["identity"]
                        .as_str()
                        .unwrap_or("")
                        .cmp(b["identity"].as_str().unwrap_or(""))
                });
                Json(all).into_response()
            }
        },
        Pipe::Client(_) => not_found(State(state.clone())).await,
    }
}
