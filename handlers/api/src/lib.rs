//! The handler plug-in API of restpipe.
//!
//! A restpipe node turns every event that arrives over the pipe into a call of a *handler*,
//! found by name: the lower-case verb, `_`, then the noun with `/` turned into `_`
//! (`GET /server/time/utc` calls `get_time_utc`, see [`handler_name`]). This crate is all a
//! plug-in crate needs to write handlers; it does not pull in the node's runtime, so plug-ins
//! and the node depend on it without a cycle.
//!
//! - [`Request`] and [`Context`] are what a handler receives;
//! - [`Reply`] is what it answers, or any serializable value, which becomes JSON with code 0
//!   (see [`IntoReply`]);
//! - [`HandlerError`] is a failure, answered as HTTP 500 with return code 251;
//! - [`Handlers`] is the registry by name, and [`Plugin`] is what a plug-in crate exports:
//!   its handlers for one side, and the lifecycle hooks of [`Lifecycle`];
//! - [`PluginSpec`] is how a plug-in crate declares itself to a node: its name, its settings
//!   ([`SettingSpec`]: a flag, an environment variable, a key of the TOML file) and the
//!   constructor that builds its [`Plugin`] from them (see [`spec`]);
//! - [`grammar`] is the rule for verbs and nouns, shared by the node and the plug-ins.
//!
//! Writing a handler takes a few lines:
//!
//! ```
//! use restpipe_handler::{Context, HandlerError, Handlers, Request, Reply, Side};
//!
//! let mut handlers = Handlers::new();
//! // A serializable value replies `application/json` with return code 0.
//! handlers.add("get_hello", |_ctx: Context, req: Request| async move {
//!     let who = req.parameters.first().cloned().unwrap_or_else(|| "world".into());
//!     Ok::<_, HandlerError>(serde_json::json!({ "hello": who }))
//! });
//! // A handler can also choose the content type, the return code and the HTTP status.
//! handlers.add("post_echo", |_ctx: Context, req: Request| async move {
//!     Ok::<_, HandlerError>(Reply::bytes(req.content_type.clone(), req.body).with_status(201))
//! });
//!
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! let request = Request::new("GET", "hello").with_parameters(vec!["restpipe".into()]);
//! let reply = handlers.call(Context::for_test(Side::Server), request).await.unwrap();
//! assert_eq!(reply.code, 0);
//! assert_eq!(reply.content_type, "application/json");
//! assert_eq!(&reply.body[..], br#"{"hello":"restpipe"}"#);
//! # });
//! ```

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use serde::de::DeserializeOwned;
use serde::Serialize;

pub mod body;
pub mod grammar;
pub mod headers;
pub mod trace;

pub use body::{BodyError, BodyStream};
pub use headers::Headers;

pub use trace::TraceContext;
pub mod spec;

pub use spec::{BuildPlugin, NodeFacts, PluginSetup, PluginSpec, SettingSpec, SettingValue};

/// Return codes carried in the `X-Event-Return-Code` header, as RestPipe defined them.
pub mod codes {
    /// The handler replied normally.
    pub const OK: u32 = 0;
    /// The handler failed (returned an error or panicked).
    pub const HANDLER_FAILED: u32 = 251;
    /// The far node's policy does not let the caller run that handler (HTTP 403).
    pub const FORBIDDEN: u32 = 253;
    /// The far node has no handler of that name.
    pub const NO_HANDLER: u32 = 255;
}

/// Which side of the pipe a node is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Side {
    /// The node that listens and that many clients dial.
    Server,
    /// A node that dials the server.
    Client,
}

impl Side {
    /// `"server"` or `"client"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Side::Server => "server",
            Side::Client => "client",
        }
    }

    /// The other side.
    pub fn peer(self) -> Side {
        match self {
            Side::Server => Side::Client,
            Side::Client => Side::Server,
        }
    }
}

impl fmt::Display for Side {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The handler name for a verb and a noun: `("GET", "time/utc")` gives `get_time_utc`.
pub fn handler_name(verb: &str, noun: &str) -> String {
    let mut name = String::with_capacity(verb.len() + 1 + noun.len());
    name.push_str(verb);
    name.make_ascii_lowercase();
    // `_` after the verb, and in place of every `/` of the noun.
    for segment in noun.split('/') {
        name.push('_');
        name.push_str(segment);
    }
    name
}

/// Where a call comes from and how long it may take.
#[derive(Clone, Debug)]
pub struct Context {
    /// The side that runs the handler.
    pub side: Side,
    /// The identity of the node that sent the event (a client's certificate identity, or the
    /// server's).
    pub peer_identity: String,
    /// The network address of the node that sent the event.
    pub peer_addr: Option<SocketAddr>,
    /// The id of the request on its connection.
    pub request_id: u64,
    /// When the caller stops waiting; work after it is wasted.
    pub deadline: Instant,
    /// The id of the queued event this call delivers (`X-Event-Delivery: queued`,
    /// docs/QUEUE.md), the same on every attempt; `None` for a direct call. Delivery is at
    /// least once: a handler with effects remembers the ids it has handled and skips one it
    /// sees again.
    pub delivery_id: Option<String>,
    /// The id of the published event this call delivers to an `event_{topic}` handler
    /// (docs/PUBSUB.md); `None` for any other call. Ids are unique: a handler that must not
    /// act twice on one event remembers them.
    pub event_id: Option<String>,
}

impl Context {
    /// Time left before the deadline (zero once it has passed).
    pub fn remaining(&self) -> Duration {
        self.deadline.saturating_duration_since(Instant::now())
    }

    /// A context for tests and examples: peer `test-peer`, a deadline 30 s away.
    pub fn for_test(side: Side) -> Self {
        Context {
            side,
            peer_identity: "test-peer".into(),
            peer_addr: None,
            request_id: 1,
            deadline: Instant::now() + Duration::from_secs(30),
            delivery_id: None,
            event_id: None,
        }
    }
}

/// An event as a handler sees it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Request {
    /// The HTTP verb, upper case (`GET`).
    pub verb: String,
    /// The noun, segments joined by `/` (`time/utc`).
    pub noun: String,
    /// The percent-decoded parameters that followed `//` in the path.
    pub parameters: Vec<String>,
    /// The raw query string, without `?` (empty when there was none).
    pub query: String,
    /// The request's content type (empty when there was none).
    pub content_type: String,
    /// The request body, byte for byte. A handler registered with [`Handlers::add_streaming`]
    /// gets the body as a [`BodyStream`] instead, and this is empty.
    pub body: Bytes,
    /// The allow-listed headers of the request ([`headers::ALLOWED`]: `Range`,
    /// `If-None-Match`, ...).
    pub headers: Headers,
    /// The trace context that follows the request across the pipe, when the two nodes both
    /// speak it (the `trace-context` feature).
    pub trace: Option<TraceContext>,
    /// The id of the queued event this request delivers, set by the sending node's queue and
    /// carried across the pipe (protocol version 2); the receiving node gives it to the
    /// handler as [`Context::delivery_id`]. `None` for a direct call.
    pub delivery_id: Option<String>,
}

impl Request {
    /// A request with a verb and a noun, and nothing else.
    pub fn new(verb: impl Into<String>, noun: impl Into<String>) -> Self {
        Request {
            verb: verb.into(),
            noun: noun.into(),
            ..Request::default()
        }
    }

    /// The same request with these parameters.
    pub fn with_parameters(mut self, parameters: Vec<String>) -> Self {
        self.parameters = parameters;
        self
    }

    /// The same request with this body and content type.
    pub fn with_body(mut self, content_type: impl Into<String>, body: impl Into<Bytes>) -> Self {
        self.content_type = content_type.into();
        self.body = body.into();
        self
    }

    /// The name of the handler this request calls.
    pub fn handler_name(&self) -> String {
        handler_name(&self.verb, &self.noun)
    }

    /// The noun's segments after `prefix`: `Some("42/run")` for the noun `jobs/42/run` and the
    /// prefix `jobs`, `Some("")` for the noun `jobs`, `None` when the noun is not under it.
    pub fn noun_rest(&self, prefix: &str) -> Option<&str> {
        let prefix = prefix.trim_matches('/');
        match self.noun.strip_prefix(prefix)? {
            "" => Some(""),
            rest => rest.strip_prefix('/'),
        }
    }

    /// Whether the content type says JSON (`application/json`, `application/x+json`, ...).
    pub fn is_json(&self) -> bool {
        let essence = self
            .content_type
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase();
        essence == "application/json" || essence.ends_with("+json")
    }

    /// The body parsed as JSON. A body that does not parse is a [`HandlerError`] that says why.
    pub fn json<T: DeserializeOwned>(&self) -> Result<T, HandlerError> {
        serde_json::from_slice(&self.body).map_err(|e| {
            HandlerError::new(format!("request body is not the JSON expected: {e}"))
                .with_class("BadRequestBody")
                .with_status(400)
        })
    }

    /// The query string as decoded `(key, value)` pairs.
    pub fn query_pairs(&self) -> Vec<(String, String)> {
        self.query
            .split('&')
            .filter(|p| !p.is_empty())
            .map(|pair| {
                let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
                (decode_query_part(k), decode_query_part(v))
            })
            .collect()
    }
}

fn decode_query_part(s: &str) -> String {
    let plus_as_space = s.replace('+', " ");
    let bytes = plus_as_space.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            let hex = |b: u8| (b as char).to_digit(16);
            if let (Some(h), Some(l)) = (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// What a handler answers.
#[derive(Debug, Default)]
pub struct Reply {
    /// The content type of the body.
    pub content_type: String,
    /// The return code (`X-Event-Return-Code`); 0 is success.
    pub code: u32,
    /// The body, byte for byte (empty when the body is [`Reply::stream`]ed).
    pub body: Bytes,
    /// The HTTP status to answer with; `None` means 200 for code 0, else 500.
    pub status: Option<u16>,
    /// The allow-listed headers of the reply ([`headers::ALLOWED`]: `ETag`, `Content-Range`,
    /// ...).
    pub headers: Headers,
    /// The body as a stream, sent chunk by chunk with flow control, in place of `body`.
    pub stream: Option<BodyStream>,
}

/// Two replies are equal when everything but a stream is, and neither has a stream (a stream
/// cannot be compared without being read).
impl PartialEq for Reply {
    fn eq(&self, other: &Self) -> bool {
        self.stream.is_none()
            && other.stream.is_none()
            && self.content_type == other.content_type
            && self.code == other.code
            && self.body == other.body
            && self.status == other.status
            && self.headers == other.headers
    }
}

impl Reply {
    /// A reply of raw bytes with code 0.
    pub fn bytes(content_type: impl Into<String>, body: impl Into<Bytes>) -> Self {
        Reply {
            content_type: content_type.into(),
            code: codes::OK,
            body: body.into(),
            ..Reply::default()
        }
    }

    /// A reply whose body is a stream, with code 0. The caller's HTTP response carries
    /// `Content-Length` when the stream knows its length ([`BodyStream::length`]).
    pub fn stream(content_type: impl Into<String>, body: BodyStream) -> Self {
        Reply {
            content_type: content_type.into(),
            stream: Some(body),
            ..Reply::default()
        }
    }

    /// The same reply with this header added (one of [`headers::ALLOWED`]; another is left
    /// out).
    pub fn with_header(mut self, name: &str, value: impl Into<String>) -> Self {
        self.headers = self.headers.with(name, value);
        self
    }

    /// The body whole: `body`, or the stream collected up to `limit` bytes.
    pub async fn collect_body(&mut self, limit: usize) -> Result<Bytes, BodyError> {
        match self.stream.take() {
            Some(stream) => stream.collect(limit).await,
            None => Ok(std::mem::take(&mut self.body)),
        }
    }

    /// A `text/plain; charset=utf-8` reply with code 0.
    pub fn text(body: impl Into<String>) -> Self {
        Reply::bytes("text/plain; charset=utf-8", body.into())
    }

    /// A JSON reply with code 0.
    pub fn json<T: Serialize + ?Sized>(value: &T) -> Result<Self, HandlerError> {
        let body = serde_json::to_vec(value).map_err(|e| {
            HandlerError::new(format!("reply could not be serialized: {e}"))
                .with_class("SerializeError")
        })?;
        Ok(Reply::bytes("application/json", body))
    }

    /// The same reply with this HTTP status.
    pub fn with_status(mut self, status: u16) -> Self {
        self.status = Some(status);
        self
    }

    /// The same reply with this return code.
    pub fn with_code(mut self, code: u32) -> Self {
        self.code = code;
        self
    }
}

/// A handler's failure. It is answered as HTTP 500 (or [`HandlerError::status`]) with return
/// code 251 and the body `{"exception": {"message", "class", "traceback"}}`.
///
/// Any `std::error::Error` converts into it with `?`, keeping its type name as the class and
/// its chain of causes as the traceback.
#[derive(Clone, Debug, PartialEq)]
pub struct HandlerError {
    /// What went wrong, for a person.
    pub message: String,
    /// The kind of failure (a type name, or a word chosen by the handler).
    pub class: String,
    /// The chain of causes, outermost first.
    pub traceback: Vec<String>,
    /// The HTTP status to answer with, when not 500.
    pub status: Option<u16>,
}

impl HandlerError {
    /// A failure with this message and the class `HandlerError`.
    pub fn new(message: impl Into<String>) -> Self {
        HandlerError {
            message: message.into(),
            class: "HandlerError".into(),
            traceback: Vec::new(),
            status: None,
        }
    }

    /// The same failure with this class.
    pub fn with_class(mut self, class: impl Into<String>) -> Self {
        self.class = class.into();
        self
    }

    /// The same failure answered with this HTTP status instead of 500.
    pub fn with_status(mut self, status: u16) -> Self {
        self.status = Some(status);
        self
    }

    /// The reply that carries this failure across the pipe.
    pub fn into_reply(self) -> Reply {
        let body = serde_json::json!({
            "exception": {
                "message": self.message,
                "class": self.class,
                "traceback": self.traceback,
            }
        });
        Reply {
            content_type: "application/json".into(),
            code: codes::HANDLER_FAILED,
            body: Bytes::from(body.to_string()),
            status: Some(self.status.unwrap_or(500)),
            ..Reply::default()
        }
    }
}

impl fmt::Display for HandlerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.class, self.message)
    }
}

/// A [`BodyError`] keeps its meaning: a body over a limit is a 413, an incomplete one a 400.
impl<E: std::error::Error + 'static> From<E> for HandlerError {
    fn from(err: E) -> Self {
        if let Some(body) = (&err as &dyn std::any::Any).downcast_ref::<BodyError>() {
            return body_error(body.clone());
        }
        let mut traceback = Vec::new();
        let mut source = err.source();
        while let Some(cause) = source {
            traceback.push(cause.to_string());
            source = cause.source();
        }
        let class = std::any::type_name::<E>()
            .rsplit("::")
            .next()
            .unwrap_or("Error")
            .to_string();
        HandlerError {
            message: err.to_string(),
            class,
            traceback,
            status: None,
        }
    }
}

/// What a handler may return: a [`Reply`], or any serializable value (JSON, code 0).
pub trait IntoReply {
    /// The reply to send.
    fn into_reply(self) -> Result<Reply, HandlerError>;
}

impl IntoReply for Reply {
    fn into_reply(self) -> Result<Reply, HandlerError> {
        Ok(self)
    }
}

impl<T: Serialize> IntoReply for T {
    fn into_reply(self) -> Result<Reply, HandlerError> {
        Reply::json(&self)
    }
}

/// A boxed future, as handlers return it.
pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// A handler: one async function of a context, a request, and its body when the body is
/// streamed.
///
/// Closures `Fn(Context, Request) -> impl Future<Output = Result<impl IntoReply, HandlerError>>`
/// are handlers (see [`Handlers::add`]), and so are closures that also take the body as a
/// [`BodyStream`] (see [`Handlers::add_streaming`]).
pub trait Handler: Send + Sync + 'static {
    /// Handle one request. `body` is `Some` when the body is streamed; `request.body` then
    /// is empty.
    fn call(
        &self,
        ctx: Context,
        request: Request,
        body: Option<BodyStream>,
    ) -> BoxFuture<Result<Reply, HandlerError>>;
}

/// A handler that takes its body whole, collected up to [`body::COLLECT_LIMIT`].
struct FnHandler<F>(Arc<F>);

impl<F, Fut, T> Handler for FnHandler<F>
where
    F: Fn(Context, Request) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<T, HandlerError>> + Send + 'static,
    T: IntoReply,
{
    fn call(
        &self,
        ctx: Context,
        mut request: Request,
        body: Option<BodyStream>,
    ) -> BoxFuture<Result<Reply, HandlerError>> {
        let Some(body) = body else {
            let fut = (self.0)(ctx, request);
            return Box::pin(async move { fut.await?.into_reply() });
        };
        let handler = Arc::clone(&self.0);
        Box::pin(async move {
            request.body = body
                .collect(body::COLLECT_LIMIT)
                .await
                .map_err(body_error)?;
            handler(ctx, request).await?.into_reply()
        })
    }
}

/// A handler that reads its body as a stream.
struct StreamHandler<F>(F);

impl<F, Fut, T> Handler for StreamHandler<F>
where
    F: Fn(Context, Request, BodyStream) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<T, HandlerError>> + Send + 'static,
    T: IntoReply,
{
    fn call(
        &self,
        ctx: Context,
        mut request: Request,
        body: Option<BodyStream>,
    ) -> BoxFuture<Result<Reply, HandlerError>> {
        let body = body.unwrap_or_else(|| BodyStream::once(std::mem::take(&mut request.body)));
        let fut = (self.0)(ctx, request, body);
        Box::pin(async move { fut.await?.into_reply() })
    }
}

/// The failure of a body that could not be read whole: 413 when it is too large, else 400.
fn body_error(err: BodyError) -> HandlerError {
    let (class, status) = match err {
        BodyError::TooLarge { .. } => ("BodyTooLarge", 413),
        _ => ("BodyIncomplete", 400),
    };
    HandlerError::new(err.to_string())
        .with_class(class)
        .with_status(status)
}

/// A registry of handlers by name.
#[derive(Clone, Default)]
pub struct Handlers {
    /// foldhash: a lookup per request, with a short key (SipHash cost more than the lookup).
    map: HashMap<String, Arc<dyn Handler>, foldhash::fast::RandomState>,
    /// Prefix handlers by (upper-case verb, noun prefix), longest prefix first.
    prefixes: Vec<(PrefixKey, Arc<dyn Handler>)>,
}

impl fmt::Debug for Handlers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set().entries(self.names()).finish()
    }
}

impl Handlers {
    /// An empty registry.
    pub fn new() -> Self {
        Handlers::default()
    }

    /// Register a closure under `name` (for example `get_time`). A later registration of the
    /// same name replaces the earlier one.
    pub fn add<F, Fut, T>(&mut self, name: impl Into<String>, handler: F) -> &mut Self
    where
        F: Fn(Context, Request) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<T, HandlerError>> + Send + 'static,
        T: IntoReply,
    {
        self.add_handler(name, Arc::new(FnHandler(Arc::new(handler))))
    }

    /// Register a closure under `name` that reads the request body as a [`BodyStream`], at its
    /// own pace and of any size. [`Request::body`] is then empty.
    ///
    /// ```
    /// use restpipe_handler::{BodyStream, Context, HandlerError, Handlers, Reply, Request};
    ///
    /// let mut handlers = Handlers::new();
    /// // Count the bytes of an upload of any size, holding one chunk at a time.
    /// handlers.add_streaming("post_count", |_ctx: Context, _req: Request, mut body: BodyStream| async move {
    ///     let mut bytes = 0u64;
    ///     while let Some(chunk) = body.chunk().await {
    ///         bytes += chunk?.len() as u64;
    ///     }
    ///     Ok::<_, HandlerError>(serde_json::json!({ "bytes": bytes }))
    /// });
    /// // And reply with a stream whose length is known: the response has `Content-Length`.
    /// handlers.add("get_zeros", |_ctx: Context, _req: Request| async move {
    ///     let file = tokio::io::repeat(0);
    ///     use tokio::io::AsyncReadExt;
    ///     let body = BodyStream::from_reader(file.take(1 << 30), Some(1 << 30));
    ///     Ok::<_, HandlerError>(Reply::stream("application/octet-stream", body))
    /// });
    /// ```
    pub fn add_streaming<F, Fut, T>(&mut self, name: impl Into<String>, handler: F) -> &mut Self
    where
        F: Fn(Context, Request, BodyStream) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<T, HandlerError>> + Send + 'static,
        T: IntoReply,
    {
        self.add_handler(name, Arc::new(StreamHandler(handler)))
    }

    /// Register a [`Handler`] under `name`.
    pub fn add_handler(&mut self, name: impl Into<String>, handler: Arc<dyn Handler>) -> &mut Self {
        self.map.insert(name.into(), handler);
        self
    }

    /// Register a handler for `verb` and every noun that is `noun_prefix` or lies under it:
    /// with `("GET", "jobs")`, both `GET .../jobs` and `GET .../jobs/42` reach it, and it reads
    /// the rest of the noun with [`Request::noun_rest`]. Matching is by noun segments. An exact
    /// handler name wins over a prefix, and a longer prefix over a shorter one.
    pub fn add_prefix<F, Fut, T>(&mut self, verb: &str, noun_prefix: &str, handler: F) -> &mut Self
    where
        F: Fn(Context, Request) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<T, HandlerError>> + Send + 'static,
        T: IntoReply,
    {
        self.add_prefix_handler(verb, noun_prefix, Arc::new(FnHandler(Arc::new(handler))))
    }

    /// [`Handlers::add_prefix`] for a handler that reads the request body as a stream (see
    /// [`Handlers::add_streaming`]).
    pub fn add_prefix_streaming<F, Fut, T>(
        &mut self,
        verb: &str,
        noun_prefix: &str,
        handler: F,
    ) -> &mut Self
    where
        F: Fn(Context, Request, BodyStream) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<T, HandlerError>> + Send + 'static,
        T: IntoReply,
    {
        self.add_prefix_handler(verb, noun_prefix, Arc::new(StreamHandler(handler)))
    }

    fn add_prefix_handler(
        &mut self,
        verb: &str,
        noun_prefix: &str,
        handler: Arc<dyn Handler>,
    ) -> &mut Self {
        let key = (
            verb.to_ascii_uppercase(),
            noun_prefix.trim_matches('/').to_string(),
        );
        self.prefixes.retain(|(k, _)| *k != key);
        self.prefixes.push((key, handler));
        sort_prefixes(&mut self.prefixes);
        self
    }

    /// Move every handler of `other` into this registry. A name or prefix present in both is
    /// an error naming it, and nothing is moved.
    pub fn merge(&mut self, other: Handlers) -> Result<(), String> {
        if let Some(dup) = other.map.keys().find(|k| self.map.contains_key(*k)) {
            return Err(format!("handler {dup} is registered twice"));
        }
        if let Some(((verb, noun), _)) = other
            .prefixes
            .iter()
            .find(|(p, _)| self.prefixes.iter().any(|(q, _)| q == p))
        {
            return Err(format!(
                "handler prefix {verb} {noun}/... is registered twice"
            ));
        }
        self.map.extend(other.map);
        self.prefixes.extend(other.prefixes);
        sort_prefixes(&mut self.prefixes);
        Ok(())
    }

    /// The handler registered under exactly `name`.
    pub fn get(&self, name: &str) -> Option<&Arc<dyn Handler>> {
        self.map.get(name)
    }

    /// The handler that serves `request`: the one registered under its name, else the one
    /// with the longest noun prefix for its verb (see [`Handlers::add_prefix`]). A `HEAD`
    /// that no handler takes is served by the `GET` handler, which sees the verb `HEAD` (and
    /// may skip the body: the node sends none for a `HEAD`).
    pub fn resolve(&self, request: &Request) -> Option<&Arc<dyn Handler>> {
        self.resolve_named(&request.handler_name(), request)
    }

    /// [`Handlers::resolve`] for a caller that holds the request's handler name already.
    pub fn resolve_named(&self, name: &str, request: &Request) -> Option<&Arc<dyn Handler>> {
        self.map.get(name).or_else(|| {
            self.resolve_prefix(&request.verb, request).or_else(|| {
                (request.verb == "HEAD")
                    .then(|| self.resolve_verb("GET", request))
                    .flatten()
            })
        })
    }

    fn resolve_prefix(&self, verb: &str, request: &Request) -> Option<&Arc<dyn Handler>> {
        self.prefixes
            .iter()
            .find(|((v, prefix), _)| {
                v.eq_ignore_ascii_case(verb) && request.noun_rest(prefix).is_some()
            })
            .map(|(_, h)| h)
    }

    fn resolve_verb(&self, verb: &str, request: &Request) -> Option<&Arc<dyn Handler>> {
        self.map
            .get(&handler_name(verb, &request.noun))
            .or_else(|| self.resolve_prefix(verb, request))
    }

    /// The registered names and prefixes (shown as `prefix*`), sorted.
    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.map.keys().cloned().collect();
        names.extend(
            self.prefixes
                .iter()
                .map(|((verb, noun), _)| format!("{}*", handler_name(verb, noun))),
        );
        names.sort_unstable();
        names
    }

    /// How many handlers and prefixes are registered.
    pub fn len(&self) -> usize {
        self.map.len() + self.prefixes.len()
    }

    /// Whether nothing is registered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Call the handler that `request` names. No such handler is a reply with code 255 and
    /// status 404; a failure is the reply of [`HandlerError::into_reply`]. (The node also
    /// catches panics; this does not.)
    pub async fn call(&self, ctx: Context, request: Request) -> Result<Reply, HandlerError> {
        self.call_with_body(ctx, request, None).await
    }

    /// [`Handlers::call`] with the request body as a stream (`request.body` is then ignored).
    pub async fn call_with_body(
        &self,
        ctx: Context,
        request: Request,
        body: Option<BodyStream>,
    ) -> Result<Reply, HandlerError> {
        match self.resolve(&request) {
            Some(handler) => handler.call(ctx, request, body).await,
            None => Ok(no_handler_reply(&request.handler_name(), ctx.side)),
        }
    }
}

type PrefixKey = (String, String);

fn sort_prefixes(prefixes: &mut [(PrefixKey, Arc<dyn Handler>)]) {
    prefixes.sort_by(|a, b| b.0 .1.len().cmp(&a.0 .1.len()).then_with(|| a.0.cmp(&b.0)));
}

/// The reply for an event that names no registered handler: 404, code 255.
pub fn no_handler_reply(name: &str, side: Side) -> Reply {
    let body = serde_json::json!({ "error": format!("no handler {name} on the {side} node") });
    Reply {
        content_type: "application/json".into(),
        code: codes::NO_HANDLER,
        body: Bytes::from(body.to_string()),
        status: Some(404),
        ..Reply::default()
    }
}

/// A moment in the life of a node or a connection, given to every plug-in's
/// [`Plugin::on_lifecycle`].
#[derive(Clone, Debug)]
#[non_exhaustive]
pub enum Lifecycle {
    /// A connection to a peer is up (either side).
    ConnectionStarted {
        /// The peer's identity.
        peer_identity: String,
        /// The peer's address.
        peer_addr: Option<SocketAddr>,
    },
    /// A connection to a peer is gone (either side).
    ConnectionStopped {
        /// The peer's identity.
        peer_identity: String,
        /// The peer's address.
        peer_addr: Option<SocketAddr>,
        /// Why it ended.
        reason: String,
    },
    /// Client: connected to the server.
    ClientConnected {
        /// Failed attempts before this one.
        retries: u32,
        /// When the previous connection was lost, if there was one.
        disconnected_since: Option<SystemTime>,
    },
    /// Client: an attempt to connect failed.
    ClientConnectFailed {
        /// Failed attempts so far, this one included.
        retries: u32,
        /// Why it failed.
        error: String,
    },
    /// Server: a client connection was added.
    ServerConnectionAdded {
        /// The client's identity.
        identity: String,
        /// Connected clients now.
        count: usize,
    },
    /// Server: a client connection was removed.
    ServerConnectionRemoved {
        /// The client's identity.
        identity: String,
        /// Connected clients now.
        count: usize,
    },
    /// Server: no client is connected (sent every minute while that lasts).
    ServerIdle {
        /// Since when no client has been connected.
        idle_since: SystemTime,
    },
}

/// What a handler plug-in crate exports.
pub trait Plugin: Send + Sync + 'static {
    /// The name the node is configured with (`--handlers time,files`).
    fn name(&self) -> &str;

    /// The handlers this plug-in serves on `side`.
    fn handlers(&self, side: Side) -> Handlers;

    /// Called at each [`Lifecycle`] moment. It must return quickly; it runs on the node's
    /// tasks.
    fn on_lifecycle(&self, _event: &Lifecycle) {}
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_contract() {
        assert_eq!(handler_name("GET", "time"), "get_time");
        assert_eq!(handler_name("GET", "time/utc"), "get_time_utc");
        assert_eq!(handler_name("POST", "jobs"), "post_jobs");
    }

    #[tokio::test]
    async fn missing_handler_is_404_code_255() {
        let reply = Handlers::new()
            .call(Context::for_test(Side::Client), Request::new("GET", "nope"))
            .await
            .unwrap();
        assert_eq!(reply.code, codes::NO_HANDLER);
        assert_eq!(reply.status, Some(404));
    }

    #[tokio::test]
    async fn errors_keep_class_and_causes() {
        let mut h = Handlers::new();
        h.add("get_fail", |_c, _r| async {
            let n: i32 = "x".parse()?;
            Ok::<_, HandlerError>(n)
        });
        let err = h
            .call(Context::for_test(Side::Server), Request::new("GET", "fail"))
            .await
            .unwrap_err();
        assert_eq!(err.class, "ParseIntError");
        let reply = err.into_reply();
        assert_eq!(reply.code, codes::HANDLER_FAILED);
        assert_eq!(reply.status, Some(500));
        let v: serde_json::Value = serde_json::from_slice(&reply.body).unwrap();
        assert_eq!(v["exception"]["class"], "ParseIntError");
    }

    #[test]
    fn merge_refuses_duplicates() {
        let mut a = Handlers::new();
        a.add("get_x", |_c, _r| async { Ok::<_, HandlerError>(1) });
        let b = a.clone();
        assert!(a.merge(b).unwrap_err().contains("get_x"));
    }

    #[tokio::test]
    async fn prefixes_serve_deeper_nouns() {
        let mut h = Handlers::new();
        h.add_prefix("GET", "jobs", |_c, r: Request| async move {
            Ok::<_, HandlerError>(r.noun_rest("jobs").map(str::to_string))
        });
        h.add("get_jobs_special", |_c, _r| async {
            Ok::<_, HandlerError>("exact")
        });
        let call = |verb: &'static str, noun: &'static str| {
            let h = h.clone();
            async move {
                h.call(Context::for_test(Side::Server), Request::new(verb, noun))
                    .await
                    .unwrap()
            }
        };
        assert_eq!(&call("GET", "jobs").await.body[..], b"\"\"");
        assert_eq!(&call("GET", "jobs/42/run").await.body[..], b"\"42/run\"");
        assert_eq!(&call("GET", "jobs/special").await.body[..], b"\"exact\"");
        assert_eq!(call("GET", "jobsx").await.code, codes::NO_HANDLER);
        assert_eq!(call("GET", "jobs_42").await.code, codes::NO_HANDLER);
        assert_eq!(call("POST", "jobs").await.code, codes::NO_HANDLER);
    }

    #[test]
    fn query_pairs_decode() {
        let mut r = Request::new("GET", "x");
        r.query = "a=1&b=hello+world%21&c".into();
        assert_eq!(
            r.query_pairs(),
            vec![
                ("a".into(), "1".into()),
                ("b".into(), "hello world!".into()),
                ("c".into(), "".into())
            ]
        );
    }
}
