//! The `forward` handler plug-in: hand events to a local HTTP server, so that a handler can
//! be written in any language.
//!
//! Each route maps a noun to an upstream base URL. With the route
//! `jobs=http://127.0.0.1:9000/api` (on the command line `--forward jobs=http://127.0.0.1:9000/api`,
//! repeatable), the node serves `GET`, `HEAD`, `POST`, `PUT`, `PATCH` and `DELETE` on the noun
//! `jobs` and every noun below it (`jobs/42/log`), and an event becomes an HTTP request to the
//! upstream:
//!
//! | event | upstream request |
//! |---|---|
//! | verb | the same method (`HEAD` too: it reaches the `GET` handler, which sends `HEAD`) |
//! | noun below the route's (`jobs/42/log`) | its segments appended to the base path (`/api/42/log`) |
//! | parameters (after `//`) | appended to the base path, each one percent-encoded as one segment (`/` inside a parameter becomes `%2F`); no parameter: the base URL itself |
//! | query string | the same query string |
//! | body, content type | the same, byte for byte, streamed as it arrives: with `Content-Length` when the event's body says its length, else chunked |
//! | allow-listed headers ([`headers::ALLOWED`]: `Range`, `If-None-Match`, ...) | the same headers |
//! | context | headers `X-Restpipe-Peer-Identity`, `X-Restpipe-Peer-Addr` (when known), `X-Restpipe-Request-Id` (the id on the pipe connection), `X-Restpipe-Delivery-Id` (for a queued event: its id, the same on every attempt, for the upstream to deduplicate by) |
//! | trace context (when it crossed the pipe) | headers `traceparent` (W3C) and `X-Request-Id`, as the caller's front door answered it |
//!
//! So `POST /server/jobs/42//run?dry=1` calls `POST http://127.0.0.1:9000/api/42/run?dry=1`.
//! The upstream's status, content type and allow-listed headers (`ETag`, `Content-Range`,
//! `Cache-Control`, ...) come back as the reply, with return code 0 whatever the status (a 404
//! from the upstream is a 404 of the pipe); other response headers (`Set-Cookie`, ...) are
//! not carried, and redirects are answered as they are, not followed. The upstream's body
//! streams back as it arrives ([`Reply::stream`]), with its length when the upstream sent
//! `Content-Length`; nothing holds the whole body, whatever its size. The reply to a `HEAD`
//! has no body and the length the upstream announced.
//!
//! Streams are cancelled both ways. A request body that ends in an error (the caller went
//! away mid-upload) aborts the upstream request: the upstream sees its connection close
//! before the body's end, never a shorter body that looks whole, and the event fails with
//! 400 (class `BodyIncomplete`; 413 `BodyTooLarge` for a body over a limit), or, if the
//! upstream had already answered, its reply stream ends with an error. A reply stream
//! dropped before its end (the caller went away mid-download) closes the upstream connection
//! instead of reading the rest.
//!
//! The upstream has the time the caller has left ([`Context::remaining`]), at most
//! [`ForwardPlugin::timeout`], to answer with its response headers; sending the request body
//! counts in that time. Then its body may take as long as it needs, as long as no more than
//! [`ForwardPlugin::timeout`] passes between two chunks. An upstream that cannot be reached,
//! fails before its headers or does not send them in time is a [`HandlerError`] with HTTP
//! status 502 and class `UpstreamError`, whose message names the URL (without its query
//! string). One that fails or stalls mid-body ends the reply stream with an error
//! ([`BodyError::Io`]): the caller's response is cut short, not completed. There is no limit
//! on the size of a reply by default; [`ForwardPlugin::with_max_reply_bytes`] sets one (502
//! up front when the upstream announces a larger `Content-Length`, else the stream ends with
//! [`BodyError::TooLarge`] before the byte over it). A parameter `.` or `..` is refused with
//! 400 (class `BadParameter`): URL rules would turn it into a step up the upstream's path.
//!
//! Only plain `http://` upstreams are supported: the plug-in is meant for a server on the same
//! machine or network, and restpipe's HTTP client is built without TLS.
//!
//! The routes are registered as noun prefixes ([`Handlers::add_prefix_streaming`]), matched by
//! whole segments: `jobs` serves `jobs/42` but not `jobsx`, and an exact handler of another
//! plug-in (say `get_jobs_special`) wins over the prefix. No `head_*` prefix is registered: a
//! `HEAD` is served by the `GET` prefix.
//!
//! ```
//! use restpipe_handler::{Plugin, Side};
//! use restpipe_handler_forward::ForwardPlugin;
//!
//! let route = ForwardPlugin::parse_route("jobs=http://127.0.0.1:9000/api").unwrap();
//! assert_eq!(route.0, "jobs");
//! assert_eq!(route.1.as_str(), "http://127.0.0.1:9000/api");
//!
//! let plugin = ForwardPlugin::new([route]).unwrap();
//! assert_eq!(plugin.name(), "forward");
//! assert_eq!(
//!     plugin.handlers(Side::Server).names(),
//!     ["delete_jobs*", "get_jobs*", "patch_jobs*", "post_jobs*", "put_jobs*"]
//! );
//!
//! // Bad routes say what is wrong.
//! assert!(ForwardPlugin::parse_route("jobs").unwrap_err().contains("NOUN=URL"));
//! assert!(ForwardPlugin::parse_route("jobs=https://example.com").unwrap_err().contains("http://"));
//! ```

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::stream::{self, Stream, StreamExt};
use reqwest::header::{HeaderMap, HeaderValue, CONTENT_LENGTH, CONTENT_TYPE};
use reqwest::redirect::Policy;
use reqwest::{Client, Method, RequestBuilder, Response, Url};
use restpipe_handler::{
    grammar, handler_name, headers, BodyError, BodyStream, Context, HandlerError, Handlers,
    Headers, Plugin, PluginSetup, PluginSpec, Reply, Request, SettingSpec, Side,
};
use serde::Deserialize;

/// How a node registers this plug-in: the name `forward` and one repeatable setting, `routes`
/// (`--forward`, `RP_FORWARD`, `[forward] routes`).
pub const SPEC: PluginSpec = PluginSpec::new(
    "forward",
    "hands events to local HTTP upstreams, one route per noun",
    build,
)
.settings(&[SettingSpec::new(
    "routes",
    "forward",
    "A `forward` route, `noun=http://127.0.0.1:9000/base` (repeatable)",
)
.env("RP_FORWARD")
.value_name("NOUN=URL")
.repeatable()]);

/// The settings of the plug-in, as [`SPEC`] declares them.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ForwardSettings {
    #[serde(default)]
    routes: Vec<String>,
}

fn build(setup: &PluginSetup) -> Result<Arc<dyn Plugin>, String> {
    let settings: ForwardSettings = setup.settings()?;
    if settings.routes.is_empty() {
        return Err(
            "the forward handlers need at least one --forward noun=http://host:port/base".into(),
        );
    }
    let routes = settings
        .routes
        .iter()
        .map(|r| ForwardPlugin::parse_route(r))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("--forward: {e}"))?;
    let plugin = ForwardPlugin::new(routes).map_err(|e| format!("--forward: {e}"))?;
    Ok(Arc::new(plugin))
}

/// Forwards events to local HTTP upstreams, one route per noun.
///
/// Register it with a node under the name `forward`.
#[derive(Clone, Debug)]
pub struct ForwardPlugin {
    routes: Vec<(String, Url)>,
    client: Client,
    timeout: Duration,
    max_reply_bytes: Option<u64>,
}

impl ForwardPlugin {
    /// The verbs every route serves: all that cross the pipe ([`grammar::VERBS`]). `HEAD` is
    /// served by the `GET` prefix handler (the node hands it a `HEAD` that no handler takes),
    /// so the handlers registered are those of the other verbs.
    pub const VERBS: [&'static str; 6] = grammar::VERBS;

    /// The default of [`ForwardPlugin::timeout`]: 60 s. The caller's deadline, usually
    /// shorter, applies first to the wait for the upstream's response headers.
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);

    /// A plug-in for these routes of `(noun, upstream base URL)`.
    ///
    /// A noun is one or more segments of `A-Z a-z 0-9 _ - .` joined by `/` (slashes at its
    /// ends are dropped); the URL is `http://` with a host and no query string or fragment.
    /// At least one route is needed, and two routes may not give the same handler name
    /// (`a/b` and `a_b` both give `get_a_b`). Every error names the route at fault.
    pub fn new(routes: impl IntoIterator<Item = (String, Url)>) -> Result<Self, String> {
        let mut checked = Vec::new();
        let mut seen: HashMap<String, String> = HashMap::new();
        for (noun, base) in routes {
            let noun = check_noun(&noun)?;
            check_base(&noun, &base)?;
            let name = handler_name("GET", &noun);
            if let Some(other) = seen.insert(name.clone(), noun.clone()) {
                return Err(format!(
                    "forward routes {other:?} and {noun:?} both give the handler {name}"
                ));
            }
            checked.push((noun, base));
        }
        if checked.is_empty() {
            return Err("forward needs at least one route, NOUN=URL".into());
        }
        let client = Client::builder()
            .no_proxy()
            .redirect(Policy::none())
            .connect_timeout(Duration::from_secs(10))
            .build()
            .map_err(|e| format!("the HTTP client for forwarding could not be built: {e}"))?;
        Ok(ForwardPlugin {
            routes: checked,
            client,
            timeout: Self::DEFAULT_TIMEOUT,
            max_reply_bytes: None,
        })
    }

    /// Parse a route as the command line gives it: `NOUN=URL`, for example
    /// `jobs=http://127.0.0.1:9000/api`. The noun and the URL are checked as
    /// [`ForwardPlugin::new`] checks them.
    pub fn parse_route(spec: &str) -> Result<(String, Url), String> {
        let Some((noun, url)) = spec.split_once('=') else {
            return Err(format!(
                "forward route {spec:?} is not NOUN=URL (for example jobs=http://127.0.0.1:9000/api)"
            ));
        };
        let noun = check_noun(noun.trim())?;
        let url = url.trim();
        let base = Url::parse(url)
            .map_err(|e| format!("forward route {noun:?}: {url:?} is not a URL: {e}"))?;
        check_base(&noun, &base)?;
        Ok((noun, base))
    }

    /// The same plug-in with another timeout: the longest wait for an upstream's response
    /// headers (the caller's deadline may cut it shorter), and the longest pause between two
    /// chunks of its body.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The same plug-in with a limit on the size of an upstream's reply body (there is none
    /// by default). A reply whose `Content-Length` is over it is refused with 502; one without
    /// a length streams until it goes over, and then ends with [`BodyError::TooLarge`].
    pub fn with_max_reply_bytes(mut self, max_reply_bytes: u64) -> Self {
        self.max_reply_bytes = Some(max_reply_bytes);
        self
    }

    /// The routes, nouns normalized.
    pub fn routes(&self) -> &[(String, Url)] {
        &self.routes
    }

    /// The longest wait for an upstream's response headers (the caller's deadline may cut it
    /// shorter), and the longest pause between two chunks of its body.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// The largest reply body taken from an upstream, in bytes; `None` (the default) for no
    /// limit.
    pub fn max_reply_bytes(&self) -> Option<u64> {
        self.max_reply_bytes
    }
}

impl Plugin for ForwardPlugin {
    fn name(&self) -> &str {
        "forward"
    }

    fn handlers(&self, _side: Side) -> Handlers {
        let mut handlers = Handlers::new();
        for (noun, base) in &self.routes {
            let route = Arc::new(Route {
                noun: noun.clone(),
                base: base.clone(),
                client: self.client.clone(),
                timeout: self.timeout,
                max_reply_bytes: self.max_reply_bytes,
            });
            // `HEAD` reaches the `GET` handler, which forwards it as `HEAD`.
            for verb in Self::VERBS.into_iter().filter(|v| *v != "HEAD") {
                let route = Arc::clone(&route);
                handlers.add_prefix_streaming(
                    verb,
                    noun,
                    move |ctx: Context, req: Request, body: BodyStream| {
                        let route = Arc::clone(&route);
                        async move { route.forward(ctx, req, body).await }
                    },
                );
            }
        }
        handlers
    }
}

/// One route, as its handlers share it.
struct Route {
    /// The noun prefix this route serves.
    noun: String,
    base: Url,
    client: Client,
    timeout: Duration,
    max_reply_bytes: Option<u64>,
}

/// Where the error that cut a request body short is kept, to tell it from an upstream's
/// failure.
type BodyFailure = Arc<Mutex<Option<BodyError>>>;

impl Route {
    async fn forward(
        &self,
        ctx: Context,
        req: Request,
        body: BodyStream,
    ) -> Result<Reply, HandlerError> {
        let url = self.url_for(&req)?;
        let mut shown = url.clone();
        shown.set_query(None);

        let method = Method::from_bytes(req.verb.as_bytes()).map_err(|_| {
            HandlerError::new(format!("{:?} is not an HTTP method", req.verb))
                .with_class("BadRequest")
                .with_status(400)
        })?;
        let head = method == Method::HEAD;
        let timeout = self.timeout.min(ctx.remaining());
        let mut request = self
            .client
            .request(method, url)
            .header("X-Restpipe-Request-Id", ctx.request_id);
        if let Ok(value) = HeaderValue::from_str(&ctx.peer_identity) {
            request = request.header("X-Restpipe-Peer-Identity", value);
        }
        if let Some(addr) = ctx.peer_addr {
            request = request.header("X-Restpipe-Peer-Addr", addr.to_string());
        }
        // Visible ASCII, checked by the node when the event arrived.
        if let Some(id) = ctx.delivery_id.as_deref() {
            if let Ok(value) = HeaderValue::from_str(id) {
                request = request.header("X-Restpipe-Delivery-Id", value);
            }
        }
        if let Some(trace) = &req.trace {
            request = request.header("traceparent", trace.traceparent());
            // Visible ASCII by construction, so always a valid header value.
            if let Ok(value) = HeaderValue::from_str(trace.request_id()) {
                request = request.header("X-Request-Id", value);
            }
        }
        // Allow-listed by construction: names are lower-case tokens, values printable ASCII.
        for (name, value) in req.headers.iter() {
            if let Ok(value) = HeaderValue::from_str(value) {
                request = request.header(name, value);
            }
        }
        if !req.content_type.is_empty() {
            if let Ok(value) = HeaderValue::from_str(&req.content_type) {
                request = request.header(CONTENT_TYPE, value);
            }
        }
        let failure = BodyFailure::default();
        // A `HEAD` has no body (the node sends none): the stream is dropped unread.
        if !head {
            request = with_body(request, body, &failure);
        }

        let response = match tokio::time::timeout(timeout, request.send()).await {
            Err(_) => return Err(no_answer(&shown, timeout)),
            Ok(Err(err)) => {
                let cut_short = failure.lock().ok().and_then(|mut f| f.take());
                return Err(match cut_short {
                    Some(cause) => body_cut_short(&shown, cause),
                    None => upstream_error(&shown, err),
                });
            }
            Ok(Ok(response)) => response,
        };

        let status = response.status().as_u16();
        let content_type = response
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("application/octet-stream")
            .to_string();
        let headers = allowed_headers(response.headers());
        let body = if head {
            // The length a `GET` would have had; the connection goes back to the pool.
            let length = announced_length(response.headers());
            drop(response);
            BodyStream::new(stream::empty(), length)
        } else {
            let length = response.content_length();
            if let (Some(len), Some(max)) = (length, self.max_reply_bytes) {
                if len > max {
                    return Err(too_large(&shown, len, max));
                }
            }
            let upstream = Upstream {
                response,
                url: shown,
                idle: self.timeout,
                max: self.max_reply_bytes,
                received: 0,
            };
            BodyStream::new(upstream.into_stream(), length)
        };
        let mut reply = Reply::stream(content_type, body).with_status(status);
        reply.headers = headers;
        Ok(reply)
    }

    /// The upstream URL: the base, the noun's segments below the route's prefix, each
    /// parameter appended as one path segment, and the query string.
    fn url_for(&self, req: &Request) -> Result<Url, HandlerError> {
        let mut url = self.base.clone();
        let rest: Vec<&str> = req
            .noun_rest(&self.noun)
            .unwrap_or("")
            .split('/')
            .filter(|s| !s.is_empty())
            .collect();
        if let Some(bad) = req.parameters.iter().find(|p| *p == "." || *p == "..") {
            return Err(HandlerError::new(format!(
                "parameter {bad:?} cannot be forwarded: it would name another upstream path"
            ))
            .with_class("BadParameter")
            .with_status(400));
        }
        if !rest.is_empty() || !req.parameters.is_empty() {
            // `check_base` made sure the base has a path that segments can be added to.
            // Noun segments were checked by the node (`grammar::check_noun`: never . or ..).
            if let Ok(mut segments) = url.path_segments_mut() {
                segments
                    .pop_if_empty()
                    .extend(rest.iter().filter(|s| **s != "." && **s != ".."))
                    .extend(&req.parameters);
            }
        }
        if !req.query.is_empty() {
            url.set_query(Some(&req.query));
        }
        Ok(url)
    }
}

/// The request with `body` to send: nothing more for an empty body, else the stream as it
/// comes, with `Content-Length` when its length is known (hyper then sends exactly that many
/// bytes) and chunked when not. An error item of the stream is kept in `failure` and aborts
/// the request: hyper closes the connection before the body's end (no last chunk, or fewer
/// bytes than announced), so the upstream never takes it for the whole body.
fn with_body(request: RequestBuilder, body: BodyStream, failure: &BodyFailure) -> RequestBuilder {
    let length = body.length();
    if length == Some(0) {
        return request.body(Bytes::new());
    }
    let failure = Arc::clone(failure);
    let stream = body.inspect(move |item| {
        if let (Err(err), Ok(mut slot)) = (item, failure.lock()) {
            *slot = Some(err.clone());
        }
    });
    let request = match length {
        Some(len) => request.header(CONTENT_LENGTH, len),
        None => request,
    };
    request.body(reqwest::Body::wrap_stream(stream))
}

/// The allow-listed headers of an upstream's response ([`headers::ALLOWED`]); a header given
/// more than once is joined with `, `. One that is not visible ASCII or too long is left out.
fn allowed_headers(upstream: &HeaderMap) -> Headers {
    let mut out = Headers::new();
    for name in headers::ALLOWED {
        let values: Vec<&str> = upstream
            .get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .collect();
        if !values.is_empty() {
            // Refused (too long, not printable): left out, as the node would.
            let _ = out.insert(name, values.join(", "));
        }
    }
    out
}

/// The `Content-Length` an upstream announced (for a `HEAD`, whose body is empty whatever it
/// says).
fn announced_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse().ok())
}

/// An upstream's response body being read, chunk by chunk, as the reply stream is.
struct Upstream {
    response: Response,
    /// The URL without its query string, for messages.
    url: Url,
    /// The longest pause between two chunks.
    idle: Duration,
    max: Option<u64>,
    received: u64,
}

impl Upstream {
    /// The body as a stream. It ends after its first error; dropping it drops the response,
    /// which closes the upstream connection when the body was not read to its end.
    fn into_stream(self) -> impl Stream<Item = Result<Bytes, BodyError>> + Send {
        stream::unfold(Some(self), |state| async move {
            let mut up = state?;
            let chunk = match tokio::time::timeout(up.idle, up.response.chunk()).await {
                Err(_) => Err(BodyError::Io(format!(
                    "upstream {} sent nothing for {:.1} s mid-body",
                    up.url,
                    up.idle.as_secs_f64()
                ))),
                Ok(Err(err)) => Err(BodyError::Io(format!(
                    "upstream {} failed mid-body: {}",
                    up.url,
                    causes(&err.without_url()).last().map_or("", String::as_str)
                ))),
                Ok(Ok(None)) => return None,
                Ok(Ok(Some(chunk))) => Ok(chunk),
            };
            match chunk {
                Ok(chunk) => {
                    up.received += chunk.len() as u64;
                    match up.max {
                        Some(limit) if up.received > limit => {
                            Some((Err(BodyError::TooLarge { limit }), None))
                        }
                        _ => Some((Ok(chunk), Some(up))),
                    }
                }
                Err(err) => Some((Err(err), None)),
            }
        })
    }
}

/// An error's message and those of its causes, outermost first.
fn causes(err: &dyn std::error::Error) -> Vec<String> {
    let mut all = vec![err.to_string()];
    let mut source = err.source();
    while let Some(cause) = source {
        all.push(cause.to_string());
        source = cause.source();
    }
    all
}

/// The failure for an upstream that could not be reached or failed before its response
/// headers: 502. The message names the URL and the innermost cause (`Connection refused`);
/// the traceback has them all.
fn upstream_error(url: &Url, err: reqwest::Error) -> HandlerError {
    let connect = err.is_connect();
    let traceback = causes(&err.without_url());
    let root = traceback.last().cloned().unwrap_or_default();
    let message = if connect {
        format!("upstream {url} could not be reached: {root}")
    } else {
        format!("upstream {url} failed: {root}")
    };
    let mut failure = HandlerError::new(message)
        .with_class("UpstreamError")
        .with_status(502);
    failure.traceback = traceback;
    failure
}

/// The failure for an upstream whose response headers did not come in time: 502.
fn no_answer(url: &Url, timeout: Duration) -> HandlerError {
    HandlerError::new(format!(
        "upstream {url} did not answer within {:.1} s",
        timeout.as_secs_f64()
    ))
    .with_class("UpstreamError")
    .with_status(502)
}

/// The failure for a request body that ended in an error, so that the upstream request was
/// aborted: 413 when the body was too large, else 400, as the node answers a body it could
/// not read whole.
fn body_cut_short(url: &Url, cause: BodyError) -> HandlerError {
    let (class, status) = match cause {
        BodyError::TooLarge { .. } => ("BodyTooLarge", 413),
        _ => ("BodyIncomplete", 400),
    };
    HandlerError::new(format!(
        "the request to upstream {url} was aborted: {cause}"
    ))
    .with_class(class)
    .with_status(status)
}

/// The failure for an upstream reply over the limit: 502 (the upstream misbehaved).
fn too_large(url: &Url, size: u64, max: u64) -> HandlerError {
    HandlerError::new(format!(
        "upstream {url} replied {size} bytes or more, over the limit of {max} bytes"
    ))
    .with_class("UpstreamError")
    .with_status(502)
}

/// The noun with slashes at its ends dropped, if it is a noun by the pipe's rule
/// ([`grammar::check_noun`]).
fn check_noun(noun: &str) -> Result<String, String> {
    let trimmed = noun.trim_matches('/');
    grammar::check_noun(trimmed)
        .map(|()| trimmed.to_string())
        .map_err(|e| format!("forward route noun {noun:?} is not a noun: {e}"))
}

/// A base URL the plug-in can forward to.
fn check_base(noun: &str, base: &Url) -> Result<(), String> {
    let fail = |why: &str| Err(format!("forward route {noun:?}: upstream {base}: {why}"));
    if base.scheme() != "http" {
        return fail("only http:// upstreams are supported");
    }
    if base.host().is_none() || base.cannot_be_a_base() {
        return fail("the URL needs a host");
    }
    if base.query().is_some() || base.fragment().is_some() {
        return fail("the URL may not have a query string or a fragment");
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests may unwrap: a panic is a failed test
mod tests {
    use super::*;
    use axum::body::{Body, Bytes};
    use axum::extract::{Query, State};
    use axum::http::{HeaderMap, Method as AxumMethod, StatusCode, Uri};
    use axum::response::{IntoResponse, Response};
    use axum::routing::{get, post};
    use axum::Router;
    use restpipe_handler::codes;
    use serde_json::{json, Value};
    use std::net::SocketAddr;
    use std::time::Instant;
    use tokio::sync::mpsc;

    /// The upstream of the tests. Every path answers:
    /// - `.../teapot`: 418, `text/plain`, `short and stout`;
    /// - `.../slow`: after 5 s;
    /// - `.../big`: 2000 bytes;
    /// - a query with `raw=1`: the request body and content type, status 202;
    /// - anything else: 200, `application/vnd.echo+json`, what the request was.
    async fn echo(method: AxumMethod, uri: Uri, headers: HeaderMap, body: Bytes) -> Response {
        let path = uri.path().to_string();
        let query = uri.query().unwrap_or("").to_string();
        let header = |name: &str| {
            headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        if path.ends_with("/teapot") {
            return (
                StatusCode::IM_A_TEAPOT,
                [("content-type", "text/plain")],
                "short and stout",
            )
                .into_response();
        }
        if path.ends_with("/slow") {
            tokio::time::sleep(Duration::from_secs(5)).await;
        }
        if path.ends_with("/big") {
            return vec![b'x'; 2000].into_response();
        }
        if query.split('&').any(|p| p == "raw=1") {
            let ct = header("content-type").unwrap_or_default();
            return (StatusCode::ACCEPTED, [("content-type", ct)], body).into_response();
        }
        let mut value = json!({
            "method": method.as_str(),
            "path": path,
            "query": query,
            "content_type": header("content-type"),
            "body": String::from_utf8_lossy(&body),
            "peer_identity": header("x-restpipe-peer-identity"),
            "peer_addr": header("x-restpipe-peer-addr"),
            "request_id": header("x-restpipe-request-id"),
        });
        // Only a queued event's delivery carries it.
        if let Some(id) = header("x-restpipe-delivery-id") {
            value["delivery_id"] = json!(id);
        }
        (
            [("content-type", "application/vnd.echo+json")],
            value.to_string(),
        )
            .into_response()
    }

    /// Start the upstream on `127.0.0.1:0` and return its address.
    async fn start_upstream() -> SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = Router::new().fallback(echo);
        tokio::spawn(async move { axum::serve(listener, app).await });
        addr
    }

    fn handlers_for(base: &str) -> Handlers {
        let route = ForwardPlugin::parse_route(&format!("jobs={base}")).unwrap();
        ForwardPlugin::new([route]).unwrap().handlers(Side::Server)
    }

    async fn call(handlers: &Handlers, req: Request) -> Result<Reply, HandlerError> {
        handlers.call(Context::for_test(Side::Server), req).await
    }

    /// The whole body of a reply, which `forward` always streams.
    async fn body_of(reply: &mut Reply) -> Bytes {
        assert!(reply.body.is_empty() && reply.stream.is_some());
        reply.collect_body(usize::MAX).await.unwrap()
    }

    async fn echoed(mut reply: Reply) -> Value {
        assert_eq!(reply.content_type, "application/vnd.echo+json");
        serde_json::from_slice(&body_of(&mut reply).await).unwrap()
    }

    #[test]
    fn registers_every_verb_for_every_route() {
        let plugin = ForwardPlugin::new([
            ForwardPlugin::parse_route("jobs=http://127.0.0.1:9000/api").unwrap(),
            ForwardPlugin::parse_route("/reports/v2/=http://localhost:9001").unwrap(),
        ])
        .unwrap();
        assert_eq!(plugin.name(), "forward");
        assert_eq!(plugin.routes()[1].0, "reports/v2");
        assert_eq!(plugin.timeout(), ForwardPlugin::DEFAULT_TIMEOUT);
        assert_eq!(plugin.max_reply_bytes(), None);
        for side in [Side::Server, Side::Client] {
            assert_eq!(
                plugin.handlers(side).names(),
                [
                    "delete_jobs*",
                    "delete_reports_v2*",
                    "get_jobs*",
                    "get_reports_v2*",
                    "patch_jobs*",
                    "patch_reports_v2*",
                    "post_jobs*",
                    "post_reports_v2*",
                    "put_jobs*",
                    "put_reports_v2*",
                ]
            );
        }
    }

    #[test]
    fn parse_route_accepts_and_refuses() {
        let (noun, url) = ForwardPlugin::parse_route(" jobs = http://127.0.0.1:9000/api ").unwrap();
        assert_eq!(noun, "jobs");
        assert_eq!(url.as_str(), "http://127.0.0.1:9000/api");
        // The URL may itself hold `=`: the first one splits.
        let (_, url) = ForwardPlugin::parse_route("a=http://h/x=y").unwrap();
        assert_eq!(url.path(), "/x=y");

        for (spec, says) in [
            ("jobs", "NOUN=URL"),
            ("=http://h", "not a noun"),
            ("/=http://h", "not a noun"),
            ("jo bs=http://h", "not a noun"),
            ("jobs/../x=http://h", "not a noun"),
            ("jobs//x=http://h", "not a noun"),
            ("jobs/..=http://h", "not a noun"),
            ("jobs?=http://h", "not a noun"),
            ("jobs=", "not a URL"),
            ("jobs=127.0.0.1:9000", "not a URL"),
            ("jobs=https://h/api", "only http://"),
            ("jobs=file:///tmp", "only http://"),
            ("jobs=http://h/api?x=1", "query string"),
            ("jobs=http://h/api#top", "fragment"),
        ] {
            let err = ForwardPlugin::parse_route(spec).unwrap_err();
            assert!(err.contains(says), "{spec:?}: {err}");
        }
    }

    #[test]
    fn the_spec_builds_from_routes() {
        use restpipe_handler::{NodeFacts, SettingValue};
        let setup = |routes: &[&str]| {
            let mut values = std::collections::BTreeMap::new();
            if !routes.is_empty() {
                let list = routes.iter().map(|r| r.to_string()).collect::<Vec<_>>();
                values.insert("routes".to_string(), SettingValue::List(list));
            }
            PluginSetup::new(&SPEC, values, NodeFacts::new(Side::Server, 1 << 24))
        };
        let err = SPEC.build(&setup(&[])).err().unwrap();
        assert_eq!(
            err,
            "the forward handlers need at least one --forward noun=http://host:port/base"
        );
        let err = SPEC.build(&setup(&["jobs"])).err().unwrap();
        assert!(
            err.starts_with("--forward: ") && err.contains("NOUN=URL"),
            "{err}"
        );
        let err = SPEC
            .build(&setup(&["a/b=http://h/1", "a_b=http://h/2"]))
            .err()
            .unwrap();
        assert!(
            err.starts_with("--forward: ") && err.contains("get_a_b"),
            "{err}"
        );
        let plugin = SPEC
            .build(&setup(&["jobs=http://127.0.0.1:9000/api", "x=http://h/"]))
            .unwrap();
        assert_eq!(plugin.name(), "forward");
        assert_eq!(plugin.handlers(Side::Client).len(), 10);
        let spec = SPEC.setting("routes").unwrap();
        assert!(spec.is_repeatable());
        assert_eq!(
            (spec.flag(), spec.env_var()),
            ("forward", Some("RP_FORWARD"))
        );
    }

    #[test]
    fn new_refuses_clashing_or_no_routes() {
        let url = Url::parse("http://127.0.0.1:9000").unwrap();
        let err = ForwardPlugin::new([
            ("a/b".to_string(), url.clone()),
            ("a_b".into(), url.clone()),
        ])
        .unwrap_err();
        assert!(err.contains("get_a_b"), "{err}");
        let err = ForwardPlugin::new([("x".to_string(), url.clone()), ("/x".into(), url.clone())])
            .unwrap_err();
        assert!(err.contains("get_x"), "{err}");
        let err = ForwardPlugin::new(Vec::new()).unwrap_err();
        assert!(err.contains("at least one route"), "{err}");
        let err = ForwardPlugin::new([("bad noun".to_string(), url)]).unwrap_err();
        assert!(err.contains("not a noun"), "{err}");
        let err = ForwardPlugin::new([("x".to_string(), Url::parse("https://127.0.0.1").unwrap())])
            .unwrap_err();
        assert!(err.contains("only http://"), "{err}");
    }

    #[tokio::test]
    async fn nouns_below_the_prefix_become_path_segments() {
        let addr = start_upstream().await;
        let handlers = handlers_for(&format!("http://{addr}/api"));
        let req = Request::new("GET", "jobs/42/log").with_parameters(vec!["tail".into()]);
        let reply = call(&handlers, req).await.unwrap();
        assert_eq!(reply.status, Some(200));
        assert_eq!(echoed(reply).await["path"], "/api/42/log/tail");
        let other = call(&handlers, Request::new("GET", "jobsx")).await.unwrap();
        assert_eq!(other.code, codes::NO_HANDLER);
    }

    #[tokio::test]
    async fn passes_method_path_query_body_and_content_type() {
        let addr = start_upstream().await;
        let handlers = handlers_for(&format!("http://{addr}/api"));
        // HEAD has no body to echo: `head_reaches_the_upstream_as_head`.
        for verb in ForwardPlugin::VERBS.into_iter().filter(|v| *v != "HEAD") {
            let mut req = Request::new(verb, "jobs")
                .with_parameters(vec!["42".into(), "run".into()])
                .with_body("application/json", r#"{"dry":true}"#);
            req.query = "dry=1&who=a%20b&x=y+z".into();
            let reply = call(&handlers, req).await.unwrap();
            assert_eq!(reply.code, codes::OK);
            assert_eq!(reply.status, Some(200));
            assert_eq!(
                echoed(reply).await,
                json!({
                    "method": verb,
                    "path": "/api/42/run",
                    "query": "dry=1&who=a%20b&x=y+z",
                    "content_type": "application/json",
                    "body": r#"{"dry":true}"#,
                    "peer_identity": "test-peer",
                    "peer_addr": null,
                    "request_id": "1",
                }),
                "{verb}"
            );
        }
    }

    #[tokio::test]
    async fn no_parameters_call_the_base_itself() {
        let addr = start_upstream().await;
        for (base, path) in [
            (format!("http://{addr}/api"), "/api"),
            (format!("http://{addr}/api/"), "/api/"),
            (format!("http://{addr}"), "/"),
        ] {
            let reply = call(&handlers_for(&base), Request::new("POST", "jobs"))
                .await
                .unwrap();
            let value = echoed(reply).await;
            assert_eq!(value["path"], path, "{base}");
            assert_eq!(value["query"], "");
            assert_eq!(value["content_type"], Value::Null);
            assert_eq!(value["body"], "");
        }
        // A base ending in `/` takes its parameters as the same base without it does.
        for base in [format!("http://{addr}/api/"), format!("http://{addr}/")] {
            let req = Request::new("GET", "jobs").with_parameters(vec!["7".into()]);
            let reply = call(&handlers_for(&base), req).await.unwrap();
            let want = if base.ends_with("/api/") {
                "/api/7"
            } else {
                "/7"
            };
            assert_eq!(echoed(reply).await["path"], want, "{base}");
        }
    }

    #[tokio::test]
    async fn parameters_are_encoded_one_segment_each() {
        let addr = start_upstream().await;
        let handlers = handlers_for(&format!("http://{addr}/api"));
        let req = Request::new("GET", "jobs").with_parameters(vec![
            "a b".into(),
            "c/d".into(),
            "ü".into(),
            "%41".into(),
            "?#".into(),
            "e\\f".into(),
            "".into(),
            "..x".into(),
        ]);
        let reply = call(&handlers, req).await.unwrap();
        assert_eq!(
            echoed(reply).await["path"],
            "/api/a%20b/c%2Fd/%C3%BC/%2541/%3F%23/e%5Cf//..x"
        );
    }

    #[tokio::test]
    async fn dot_parameters_are_refused() {
        let handlers = handlers_for("http://127.0.0.1:1/api");
        for p in [".", ".."] {
            let req = Request::new("GET", "jobs").with_parameters(vec!["a".into(), p.into()]);
            let err = call(&handlers, req).await.unwrap_err();
            assert_eq!(
                (err.class.as_str(), err.status),
                ("BadParameter", Some(400))
            );
        }
    }

    #[tokio::test]
    async fn binary_body_round_trips_with_status_and_content_type() {
        let addr = start_upstream().await;
        let handlers = handlers_for(&format!("http://{addr}/api"));
        let body: Vec<u8> = (0..=255u8).cycle().take(70_000).collect();
        let mut req = Request::new("PUT", "jobs")
            .with_parameters(vec!["blob".into()])
            .with_body("application/x-thing; v=2", body.clone());
        req.query = "raw=1".into();
        let mut reply = call(&handlers, req).await.unwrap();
        assert_eq!(reply.code, codes::OK);
        assert_eq!(reply.status, Some(202));
        assert_eq!(reply.content_type, "application/x-thing; v=2");
        assert_eq!(reply.stream.as_ref().unwrap().length(), Some(70_000));
        assert_eq!(&body_of(&mut reply).await[..], &body[..]);
    }

    #[tokio::test]
    async fn upstream_error_statuses_pass_through_with_code_0() {
        let addr = start_upstream().await;
        let handlers = handlers_for(&format!("http://{addr}/api"));
        let req = Request::new("DELETE", "jobs").with_parameters(vec!["teapot".into()]);
        let mut reply = call(&handlers, req).await.unwrap();
        assert_eq!(reply.code, codes::OK);
        assert_eq!(reply.status, Some(418));
        assert_eq!(reply.content_type, "text/plain");
        assert_eq!(&body_of(&mut reply).await[..], b"short and stout");
    }

    #[tokio::test]
    async fn context_reaches_the_upstream() {
        let addr = start_upstream().await;
        let handlers = handlers_for(&format!("http://{addr}/api"));
        let mut ctx = Context::for_test(Side::Client);
        ctx.peer_identity = "fileserver-1".into();
        ctx.peer_addr = Some("10.1.2.3:5555".parse().unwrap());
        ctx.request_id = 77;
        ctx.delivery_id = Some("00000000000000010123456789abcdef".into());
        let reply = handlers
            .call(ctx, Request::new("GET", "jobs"))
            .await
            .unwrap();
        let value = echoed(reply).await;
        assert_eq!(value["peer_identity"], "fileserver-1");
        assert_eq!(value["peer_addr"], "10.1.2.3:5555");
        assert_eq!(value["request_id"], "77");
        assert_eq!(value["delivery_id"], "00000000000000010123456789abcdef");
    }

    #[tokio::test]
    async fn unreachable_upstream_is_502() {
        // A port that was free a moment ago: nothing listens there.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let handlers = handlers_for(&format!("http://127.0.0.1:{port}/api"));
        let mut req = Request::new("GET", "jobs").with_parameters(vec!["42".into()]);
        req.query = "token=secret".into();
        let err = call(&handlers, req).await.unwrap_err();
        assert_eq!(err.class, "UpstreamError");
        assert_eq!(err.status, Some(502));
        assert!(
            err.message
                .contains(&format!("http://127.0.0.1:{port}/api/42")),
            "{err}"
        );
        assert!(err.message.contains("could not be reached"), "{err}");
        // The cause a person can act on, not only reqwest's outer words.
        assert!(err.message.contains("refused"), "{err}");
        assert!(!err.message.contains("secret"), "{err}");
        assert!(!err.traceback.is_empty());
        let reply = err.into_reply();
        assert_eq!(reply.code, codes::HANDLER_FAILED);
        assert_eq!(reply.status, Some(502));
    }

    #[tokio::test]
    async fn the_callers_deadline_bounds_the_upstream() {
        let addr = start_upstream().await;
        let handlers = handlers_for(&format!("http://{addr}/api"));
        let mut ctx = Context::for_test(Side::Server);
        ctx.deadline = Instant::now() + Duration::from_millis(300);
        let started = Instant::now();
        let req = Request::new("GET", "jobs").with_parameters(vec!["slow".into()]);
        let err = handlers.call(ctx, req).await.unwrap_err();
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "{:?}",
            started.elapsed()
        );
        assert_eq!(
            (err.class.as_str(), err.status),
            ("UpstreamError", Some(502))
        );
        assert!(err.message.contains("did not answer within"), "{err}");
        assert!(
            err.message.contains(&format!("http://{addr}/api/slow")),
            "{err}"
        );
    }

    #[tokio::test]
    async fn the_plugin_timeout_bounds_the_upstream() {
        let addr = start_upstream().await;
        let route = ForwardPlugin::parse_route(&format!("jobs=http://{addr}/api")).unwrap();
        let handlers = ForwardPlugin::new([route])
            .unwrap()
            .with_timeout(Duration::from_millis(200))
            .handlers(Side::Server);
        let started = Instant::now();
        let req = Request::new("GET", "jobs").with_parameters(vec!["slow".into()]);
        let err = call(&handlers, req).await.unwrap_err();
        assert!(started.elapsed() < Duration::from_secs(3));
        assert_eq!(err.status, Some(502));
    }

    #[tokio::test]
    async fn a_reply_over_the_limit_is_502() {
        let addr = start_upstream().await;
        let route = ForwardPlugin::parse_route(&format!("jobs=http://{addr}/api")).unwrap();
        let handlers = ForwardPlugin::new([route])
            .unwrap()
            .with_max_reply_bytes(1000)
            .handlers(Side::Server);
        let req = Request::new("GET", "jobs").with_parameters(vec!["big".into()]);
        let err = call(&handlers, req).await.unwrap_err();
        assert_eq!(
            (err.class.as_str(), err.status),
            ("UpstreamError", Some(502))
        );
        assert!(err.message.contains("over the limit"), "{err}");
    }

    // The streaming upstream: it tells the test what it sees, as it sees it.

    /// A chunk the test feeds to `/feed`, or the error that makes the upstream fail there.
    type Feed = mpsc::Sender<Result<Bytes, std::io::Error>>;

    /// What the streaming upstream saw, sent to the test as it happens.
    #[derive(Debug)]
    enum Seen {
        /// `/sink` got the first bytes of its request body.
        Started,
        /// `/sink` read its request body to the end (`Ok`, the bytes) or to an error (`Err`,
        /// how many bytes came before it).
        Sink {
            content_length: Option<String>,
            transfer_encoding: Option<String>,
            body: Result<Vec<u8>, usize>,
        },
        /// `/feed` answered its headers: the test sends the chunks of its body (dropping
        /// every sender ends the body).
        Feed(Feed),
        /// The method of a request to `/sized`.
        Method(String),
    }

    type Events = mpsc::UnboundedSender<Seen>;

    fn header_of(headers: &HeaderMap, name: &str) -> Option<String> {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    }

    /// `/sink`: reads the request body chunk by chunk, says when the first one came and how
    /// the body ended, and answers `ok`.
    async fn sink(State(seen): State<Events>, headers: HeaderMap, body: Body) -> &'static str {
        let mut chunks = body.into_data_stream();
        let mut got = Vec::new();
        let outcome = loop {
            match chunks.next().await {
                None => break Ok(got),
                Some(Ok(chunk)) => {
                    if got.is_empty() {
                        let _ = seen.send(Seen::Started);
                    }
                    got.extend_from_slice(&chunk);
                }
                Some(Err(_)) => break Err(got.len()),
            }
        };
        let _ = seen.send(Seen::Sink {
            content_length: header_of(&headers, "content-length"),
            transfer_encoding: header_of(&headers, "transfer-encoding"),
            body: outcome,
        });
        "ok"
    }

    /// `/source?n=N`: `pattern(N)` with its length; with `&chunked=1`, in 64 KiB chunks and
    /// without a length.
    async fn source(Query(q): Query<HashMap<String, String>>) -> Response {
        let n: usize = q["n"].parse().unwrap();
        let data = Bytes::from(pattern(n));
        let ct = [("content-type", "application/octet-stream")];
        if q.get("chunked").is_some_and(|c| c == "1") {
            let chunks: Vec<Result<Bytes, std::io::Error>> = (0..n)
                .step_by(64 * 1024)
                .map(|i| Ok(data.slice(i..(i + 64 * 1024).min(n))))
                .collect();
            (ct, Body::from_stream(stream::iter(chunks))).into_response()
        } else {
            (ct, data).into_response()
        }
    }

    /// `/feed`: a body of no known length whose chunks the test sends through [`Seen::Feed`].
    async fn feed(State(seen): State<Events>) -> Body {
        let (tx, rx) = mpsc::channel(2);
        seen.send(Seen::Feed(tx)).unwrap();
        Body::from_stream(stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|item| (item, rx))
        }))
    }

    /// `/headers`: 206 with headers both allowed and not, and the request's headers as JSON.
    async fn headers_echo(headers: HeaderMap) -> Response {
        let got: serde_json::Map<String, Value> = [
            "range",
            "if-none-match",
            "cookie",
            "authorization",
            "x-restpipe-request-id",
        ]
        .into_iter()
        .map(|name| (name.to_string(), json!(header_of(&headers, name))))
        .collect();
        let mut out = HeaderMap::new();
        for (name, value) in [
            ("etag", "\"v1\""),
            ("content-range", "bytes 0-9/100"),
            ("cache-control", "no-cache"),
            ("cache-control", "private"),
            ("set-cookie", "session=1"),
            ("authorization", "Bearer leaked"),
            ("www-authenticate", "Basic"),
            ("x-secret", "42"),
        ] {
            out.append(name, value.parse().unwrap());
        }
        (
            StatusCode::PARTIAL_CONTENT,
            out,
            Value::Object(got).to_string(),
        )
            .into_response()
    }

    /// `/sized`: 12345 bytes of text (none for `HEAD`, with the same length); says the method.
    async fn sized(State(seen): State<Events>, method: AxumMethod) -> Response {
        seen.send(Seen::Method(method.to_string())).unwrap();
        ([("content-type", "text/plain")], "x".repeat(12345)).into_response()
    }

    /// Start the streaming upstream on `127.0.0.1:0`: its address, and what it sees.
    async fn start_streaming_upstream() -> (SocketAddr, mpsc::UnboundedReceiver<Seen>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let app = Router::new()
            .route("/api/sink", post(sink).put(sink))
            .route("/api/source", get(source))
            .route("/api/feed", get(feed))
            .route("/api/headers", get(headers_echo))
            .route("/api/sized", get(sized))
            .with_state(tx);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        (addr, rx)
    }

    /// `n` bytes in a pattern of period 251, so that a chunk lost, doubled or moved shows.
    fn pattern(n: usize) -> Vec<u8> {
        let period: Vec<u8> = (0..=250u8).collect();
        let mut data = period.repeat(n / 251 + 1);
        data.truncate(n);
        data
    }

    /// `data` as a stream of `chunk`-byte chunks, saying `length`.
    fn chunks_of(data: &Bytes, chunk: usize, length: Option<u64>) -> BodyStream {
        let chunks: Vec<Result<Bytes, BodyError>> = (0..data.len())
            .step_by(chunk)
            .map(|i| Ok(data.slice(i..(i + chunk).min(data.len()))))
            .collect();
        BodyStream::new(stream::iter(chunks), length)
    }

    /// A request body the test sends chunk by chunk, or cuts short with an error.
    fn body_fed(length: Option<u64>) -> (mpsc::Sender<Result<Bytes, BodyError>>, BodyStream) {
        let (tx, rx) = mpsc::channel(4);
        let body = stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|item| (item, rx))
        });
        (tx, BodyStream::new(body, length))
    }

    /// `fut`, which must be done within 10 s: a bound for a failing test, not a wait.
    async fn within<F: std::future::Future>(what: &str, fut: F) -> F::Output {
        tokio::time::timeout(Duration::from_secs(10), fut)
            .await
            .unwrap_or_else(|_| panic!("{what} did not happen within 10 s"))
    }

    async fn next_seen(seen: &mut mpsc::UnboundedReceiver<Seen>) -> Seen {
        within("an event of the upstream", seen.recv())
            .await
            .unwrap()
    }

    fn post_to(what: &str) -> Request {
        let mut req = Request::new("POST", "jobs").with_parameters(vec![what.into()]);
        req.content_type = "application/octet-stream".into();
        req
    }

    #[tokio::test]
    async fn a_large_request_body_streams_upstream_with_its_length_or_chunked() {
        let (addr, mut seen) = start_streaming_upstream().await;
        let handlers = handlers_for(&format!("http://{addr}/api"));
        let data = Bytes::from(pattern(20 << 20));
        for length in [Some(data.len() as u64), None] {
            let body = chunks_of(&data, 100_000, length);
            let ctx = Context::for_test(Side::Server);
            let mut reply = handlers
                .call_with_body(ctx, post_to("sink"), Some(body))
                .await
                .unwrap();
            assert_eq!(reply.status, Some(200));
            assert_eq!(&body_of(&mut reply).await[..], b"ok");
            assert!(matches!(next_seen(&mut seen).await, Seen::Started));
            let Seen::Sink {
                content_length,
                transfer_encoding,
                body,
            } = next_seen(&mut seen).await
            else {
                panic!("no sink event");
            };
            match length {
                Some(n) => {
                    assert_eq!(content_length, Some(n.to_string()));
                    assert_eq!(transfer_encoding, None);
                }
                None => {
                    assert_eq!(content_length, None);
                    assert_eq!(transfer_encoding.as_deref(), Some("chunked"));
                }
            }
            let body = body.unwrap();
            assert!(
                body[..] == data[..],
                "{length:?}: {} bytes arrived, not the {} sent",
                body.len(),
                data.len()
            );
        }
    }

    #[tokio::test]
    async fn a_large_reply_streams_back_with_its_length() {
        let (addr, _seen) = start_streaming_upstream().await;
        let handlers = handlers_for(&format!("http://{addr}/api"));
        let n = 20 << 20;
        let data = pattern(n);
        for (chunked, length) in [("0", Some(n as u64)), ("1", None)] {
            let mut req = Request::new("GET", "jobs").with_parameters(vec!["source".into()]);
            req.query = format!("n={n}&chunked={chunked}");
            let mut reply = call(&handlers, req).await.unwrap();
            assert_eq!(
                (reply.status, reply.content_type.as_str()),
                (Some(200), "application/octet-stream")
            );
            let mut stream = reply.stream.take().unwrap();
            assert_eq!(stream.length(), length);
            let mut got = Vec::with_capacity(n);
            let mut chunks = 0;
            while let Some(chunk) = stream.chunk().await {
                got.extend_from_slice(&chunk.unwrap());
                chunks += 1;
            }
            // Streamed, not collected first.
            assert!(chunks > 1, "{chunks} chunk");
            assert!(got == data, "{} bytes came back, not {n}", got.len());
        }
    }

    #[tokio::test]
    async fn an_aborted_request_body_never_reaches_the_upstream_whole() {
        let (addr, mut seen) = start_streaming_upstream().await;
        let handlers = handlers_for(&format!("http://{addr}/api"));
        let chunk = Bytes::from(pattern(64 * 1024));
        for length in [None, Some(4 * chunk.len() as u64)] {
            let (tx, body) = body_fed(length);
            let call = tokio::spawn({
                let handlers = handlers.clone();
                let ctx = Context::for_test(Side::Server);
                async move {
                    handlers
                        .call_with_body(ctx, post_to("sink"), Some(body))
                        .await
                }
            });
            tx.send(Ok(chunk.clone())).await.unwrap();
            tx.send(Ok(chunk.clone())).await.unwrap();
            // The upstream is reading the body when the caller goes away.
            assert!(matches!(next_seen(&mut seen).await, Seen::Started));
            let cut = BodyError::Aborted("the caller went away".into());
            tx.send(Err(cut)).await.unwrap();

            let err = within("the call's end", call).await.unwrap().unwrap_err();
            assert_eq!(
                (err.class.as_str(), err.status),
                ("BodyIncomplete", Some(400)),
                "{length:?}: {err}"
            );
            assert!(err.message.contains("the caller went away"), "{err}");
            assert!(
                err.message.contains(&format!("http://{addr}/api/sink")),
                "{err}"
            );
            match next_seen(&mut seen).await {
                Seen::Sink {
                    body: Err(read), ..
                } => {
                    assert!(read <= 2 * chunk.len(), "{length:?}: {read}")
                }
                other => panic!("{length:?}: the upstream saw {other:?}, not a cut body"),
            }
        }
    }

    #[tokio::test]
    async fn dropping_the_reply_closes_the_upstream_connection() {
        let (addr, mut seen) = start_streaming_upstream().await;
        let handlers = handlers_for(&format!("http://{addr}/api"));
        let req = Request::new("GET", "jobs").with_parameters(vec!["feed".into()]);
        let mut reply = call(&handlers, req).await.unwrap();
        let Seen::Feed(tx) = next_seen(&mut seen).await else {
            panic!("no feed");
        };
        // An endless body: chunks for as long as the upstream takes them.
        let feeder = tokio::spawn({
            let tx = tx.clone();
            let chunk = Bytes::from(pattern(64 * 1024));
            async move { while tx.send(Ok(chunk.clone())).await.is_ok() {} }
        });
        let mut stream = reply.stream.take().unwrap();
        assert_eq!(stream.length(), None);
        let mut got = 0;
        while got < 1 << 20 {
            got += stream.chunk().await.unwrap().unwrap().len();
        }
        drop(stream);
        drop(reply);
        // The upstream's body is dropped: its connection closed, not read to the end.
        within("the upstream's body being dropped", tx.closed()).await;
        within("the feeder's end", feeder).await.unwrap();
    }

    #[tokio::test]
    async fn an_upstream_failing_mid_body_cuts_the_reply_short() {
        let (addr, mut seen) = start_streaming_upstream().await;
        let handlers = handlers_for(&format!("http://{addr}/api"));
        let req = Request::new("GET", "jobs").with_parameters(vec!["feed".into()]);
        let mut reply = call(&handlers, req).await.unwrap();
        let Seen::Feed(tx) = next_seen(&mut seen).await else {
            panic!("no feed");
        };
        let mut stream = reply.stream.take().unwrap();
        tx.send(Ok(Bytes::from_static(b"first"))).await.unwrap();
        assert_eq!(stream.chunk().await.unwrap().unwrap(), "first");
        tx.send(Err(std::io::Error::other("disk gone")))
            .await
            .unwrap();
        match stream.chunk().await {
            Some(Err(BodyError::Io(why))) => {
                assert!(why.contains(&format!("http://{addr}/api/feed")), "{why}")
            }
            other => panic!("{other:?}"),
        }
        assert!(stream.chunk().await.is_none());
    }

    #[tokio::test]
    async fn the_timeout_bounds_the_headers_then_each_pause_not_the_whole_body() {
        let (addr, mut seen) = start_streaming_upstream().await;
        let route = ForwardPlugin::parse_route(&format!("jobs=http://{addr}/api")).unwrap();
        let timeout = Duration::from_millis(1000);
        let handlers = ForwardPlugin::new([route])
            .unwrap()
            .with_timeout(timeout)
            .handlers(Side::Server);
        let req = Request::new("GET", "jobs").with_parameters(vec!["feed".into()]);
        let started = Instant::now();
        let mut reply = call(&handlers, req).await.unwrap();
        let Seen::Feed(tx) = next_seen(&mut seen).await else {
            panic!("no feed");
        };
        let mut stream = reply.stream.take().unwrap();
        // Pauses shorter than the timeout, for longer than it in all: the body goes on.
        // (The sleeps are the upstream's pace here, not a wait for an event.)
        for i in 0..4u8 {
            tokio::time::sleep(Duration::from_millis(400)).await;
            tx.send(Ok(Bytes::from(vec![i; 10]))).await.unwrap();
            assert_eq!(stream.chunk().await.unwrap().unwrap(), vec![i; 10]);
        }
        assert!(started.elapsed() > timeout);
        // A pause longer than the timeout ends the body with an error.
        let paused = Instant::now();
        match stream.chunk().await {
            Some(Err(BodyError::Io(why))) => {
                assert!(why.contains("sent nothing for 1.0 s"), "{why}")
            }
            other => panic!("{other:?}"),
        }
        assert!(paused.elapsed() >= timeout);
        assert!(stream.chunk().await.is_none());
        drop(stream);
        within("the upstream's body being dropped", tx.closed()).await;
    }

    #[tokio::test]
    async fn allowed_headers_cross_both_ways_and_no_others() {
        let (addr, _seen) = start_streaming_upstream().await;
        let handlers = handlers_for(&format!("http://{addr}/api"));
        let mut req = Request::new("GET", "jobs").with_parameters(vec!["headers".into()]);
        req.headers.insert("Range", "bytes=0-9").unwrap();
        req.headers.insert("If-None-Match", "\"v0\"").unwrap();
        // The others cannot even be put on a request.
        assert!(req.headers.insert("Cookie", "session=1").is_err());
        assert!(req.headers.insert("Authorization", "Bearer x").is_err());
        let mut reply = call(&handlers, req).await.unwrap();
        assert_eq!(reply.status, Some(206));
        assert_eq!(reply.headers.get("etag"), Some("\"v1\""));
        assert_eq!(reply.headers.get("content-range"), Some("bytes 0-9/100"));
        assert_eq!(
            reply.headers.get("cache-control"),
            Some("no-cache, private")
        );
        for name in [
            "set-cookie",
            "authorization",
            "www-authenticate",
            "x-secret",
        ] {
            assert_eq!(reply.headers.get(name), None, "{name}");
        }
        assert_eq!(reply.headers.len(), 3, "{:?}", reply.headers);
        let got: Value = serde_json::from_slice(&body_of(&mut reply).await).unwrap();
        assert_eq!(
            got,
            json!({
                "range": "bytes=0-9",
                "if-none-match": "\"v0\"",
                "cookie": null,
                "authorization": null,
                "x-restpipe-request-id": "1",
            })
        );
    }

    #[tokio::test]
    async fn head_reaches_the_upstream_as_head() {
        let (addr, mut seen) = start_streaming_upstream().await;
        let handlers = handlers_for(&format!("http://{addr}/api"));
        // The GET prefix serves HEAD: no handler of its own.
        assert!(!handlers.names().iter().any(|n| n.starts_with("head_")));
        for verb in ["HEAD", "GET"] {
            let req = Request::new(verb, "jobs").with_parameters(vec!["sized".into()]);
            let mut reply = call(&handlers, req).await.unwrap();
            assert!(matches!(next_seen(&mut seen).await, Seen::Method(m) if m == verb));
            assert_eq!(
                (reply.status, reply.content_type.as_str()),
                (Some(200), "text/plain"),
                "{verb}"
            );
            assert_eq!(reply.stream.as_ref().unwrap().length(), Some(12345));
            let body = body_of(&mut reply).await;
            assert_eq!(body.len(), if verb == "HEAD" { 0 } else { 12345 });
        }
    }

    #[tokio::test]
    async fn a_reply_without_a_length_stops_at_the_limit() {
        let (addr, _seen) = start_streaming_upstream().await;
        let route = ForwardPlugin::parse_route(&format!("jobs=http://{addr}/api")).unwrap();
        let handlers = ForwardPlugin::new([route])
            .unwrap()
            .with_max_reply_bytes(100_000)
            .handlers(Side::Server);
        let mut req = Request::new("GET", "jobs").with_parameters(vec!["source".into()]);
        req.query = "n=200000&chunked=1".into();
        let mut reply = call(&handlers, req).await.unwrap();
        let mut stream = reply.stream.take().unwrap();
        assert_eq!(stream.length(), None);
        // Chunks up to the limit, then the error, never a byte over it.
        let mut got = 0;
        let err = loop {
            match stream.chunk().await.unwrap() {
                Ok(chunk) => got += chunk.len(),
                Err(err) => break err,
            }
        };
        assert_eq!(err, BodyError::TooLarge { limit: 100_000 });
        assert!(got <= 100_000, "{got}");
        assert!(stream.chunk().await.is_none());
    }
}
