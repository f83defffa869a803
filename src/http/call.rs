//! A call through the front door: the path mapped to an event (noun, parameters), the body
//! read within its limits and deadline, the event sent across the pipe, and the reply or the
//! failure turned into the HTTP response of docs/HTTP.md.
//!
//! A small body with a `Content-Length` is read whole and crosses in the event's frame. Any
//! other body is streamed: read from the HTTP caller as it arrives and sent on in chunks
//! within the pipe's flow control. A streamed reply goes out as its chunks arrive, with
//! `Content-Length` when the handler knew it; a reply cut short (the pipe dropped, the source
//! failed) ends the HTTP response as incomplete, never as a whole one.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::{to_bytes, Body};
use axum::extract::Request;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::Response;
use bytes::Bytes;
use futures_util::StreamExt;
use restpipe_handler::grammar::{self, GrammarError};
use restpipe_handler::{headers, BodyError, BodyStream, Headers, Reply, Side, TraceContext};
use tracing::debug;

use super::{error_response, BodyStalled, Pipe, Shared, TIMEOUT_HEADER};
use crate::error::CallError;

/// Bodies up to this size, with a `Content-Length`, are read whole and cross in the event's
/// own frame; larger ones, and those of unknown length, are streamed.
pub const INLINE_BODY: u64 = 64 * 1024;

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

/// The path prefix of a call through the pipe on a node of `side`: `/server/` on a client node,
/// `/client/` on a server node.
pub(super) fn call_prefix(side: Side) -> &'static str {
    match side {
        Side::Client => "/server/",
        Side::Server => "/client/",
    }
}

/// Map a raw request path to the client it names (server side), the noun and the parameters.
///
/// `side` is the side of the node that received the request. Errors are messages for a 400.
pub fn parse_path(side: Side, path: &str) -> Result<Target, String> {
    let (client, rest) = match side {
        Side::Client => {
            let rest = path
                .strip_prefix(call_prefix(side))
                .ok_or("client nodes take /server/<noun>")?;
            (None, rest)
        }
        Side::Server => {
            let rest = path
                .strip_prefix(call_prefix(side))
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

/// A call through the pipe: the request as an event to the peer, and its reply (or why there
/// is none) as the response. `trace` is the request's trace context, from the front door.
pub(super) async fn call_peer(state: Shared, request: Request, trace: TraceContext) -> Response {
    let method = request.method().clone();
    let trace = Some(trace);
    if !grammar::is_verb(method.as_str()) {
        let mut response = error_response(
            StatusCode::METHOD_NOT_ALLOWED,
            format!("{method} does not cross the pipe; use {}", grammar::ALLOW),
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
    match super::queued::wants_queue(headers) {
        Ok(false) => {}
        Ok(true) => {
            // Boxed, in a statement of its own (a temporary would take room in this future
            // until the end of its statement): its state stays out of every call's future.
            let queued = Box::pin(super::queued::enqueue(
                &state, method, target, query, timeout, request,
            ));
            return queued.await;
        }
        Err(message) => return error_response(StatusCode::BAD_REQUEST, message),
    }
    let content_type = content_type(headers);
    let limit = state.options.max_body;
    let too_large = |size: &str| {
        error_response(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "request body of {size} bytes is over the limit of {limit} bytes; nothing was sent"
            ),
        )
    };
    let declared = declared_length(headers);
    if let Some(declared) = declared.filter(|&n| n > limit) {
        return too_large(&declared.to_string());
    }
    let request_headers = allowed_headers(headers);
    // A body of known size (`Content-Length`, or none at all) up to the inline limit
    // crosses whole; any other is streamed. One `send` for both: each await of it would
    // hold a future of its own in this one, which is moved whole as it starts.
    let known = axum::body::HttpBody::size_hint(request.body()).exact();
    let (body, stream, failure) = if known.is_none_or(|n| n > INLINE_BODY) {
        let failure = Arc::new(AtomicU8::new(BODY_OK));
        let stream = request_body_stream(request.into_body(), limit, declared, failure.clone());
        (Bytes::new(), Some(stream), Some(failure))
    } else if known == Some(0) {
        (Bytes::new(), None, None)
    } else {
        let inline_limit = usize::try_from(limit.min(INLINE_BODY)).unwrap_or(usize::MAX);
        match read_whole(request.into_body(), inline_limit, "sent", &too_large).await {
            Ok(body) => (body, None, None),
            Err(response) => return response,
        }
    };
    let event = restpipe_handler::Request {
        trace,
        verb: method.as_str().to_string(),
        noun: target.noun,
        parameters: target.parameters,
        query,
        content_type,
        body,
        headers: request_headers,
        delivery_id: None,
    };
    let result = send(&state, target.client, event, stream, timeout).await;
    // A streamed body's failure, found while it was being sent, says more than the reply to
    // an incomplete body.
    let response = match failure.map_or(BODY_OK, |f| f.load(Ordering::Acquire)) {
        BODY_TOO_LARGE => too_large(&format!("more than {limit}")),
        BODY_STALLED => {
            let mut response = error_response(
                StatusCode::REQUEST_TIMEOUT,
                "the request body stalled (--http-body-timeout); the far side saw it incomplete",
            );
            response
                .headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
            response
        }
        BODY_MALFORMED => error_response(
            StatusCode::BAD_REQUEST,
            "the request body could not be read; the far side saw it incomplete",
        ),
        _ => result_response(result),
    };
    debug!(%method, status = response.status().as_u16(), "answered");
    response
}

/// The request's `Content-Type`, or empty when it has none (or one that is not text).
pub(super) fn content_type(headers: &HeaderMap) -> String {
    super::names::get(headers, &header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string()
}

/// The body length the request declares in `Content-Length`, when it declares a valid one.
pub(super) fn declared_length(headers: &HeaderMap) -> Option<u64> {
    super::names::get(headers, &header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
}

/// Send an event to the peer this node's pipe reaches (`client` names it on the server).
async fn send(
    state: &Shared,
    client: Option<String>,
    event: restpipe_handler::Request,
    body: Option<BodyStream>,
    timeout: Duration,
) -> Result<Reply, CallError> {
    match &state.pipe {
        Pipe::Client(node) => node.call_with_body(event, body, Some(timeout)).await,
        Pipe::Server(node) => {
            let name = client.unwrap_or_default();
            node.call_with_body(&name, event, body, Some(timeout)).await
        }
    }
}

/// Read a whole request body of at most `limit` bytes, or the error response that says why it
/// could not be read: over the limit (`too_large`, given what was read), stalled (408, the
/// connection closed after it), malformed (400). Nothing was `done` (sent, queued) then.
pub(super) async fn read_whole(
    body: Body,
    limit: usize,
    done: &str,
    too_large: &(dyn Fn(&str) -> Response + Sync),
) -> Result<Bytes, Response> {
    match to_bytes(body, limit).await {
        Ok(body) => Ok(body),
        Err(e) if over_limit(&e) => Err(too_large(&format!("more than {limit}"))),
        Err(e) if stalled(&e) => {
            let mut response = error_response(
                StatusCode::REQUEST_TIMEOUT,
                format!("{}; nothing was {done}", causes(&e)),
            );
            response
                .headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
            Err(response)
        }
        // A malformed chunked encoding, say: the client's fault, but not a body too large.
        Err(e) => Err(error_response(
            StatusCode::BAD_REQUEST,
            format!(
                "the request body could not be read ({}); nothing was {done}",
                causes(&e)
            ),
        )),
    }
}

fn result_response(result: Result<Reply, CallError>) -> Response {
    match result {
        Ok(reply) => reply_response(reply),
        Err(err) => call_error_response(&err),
    }
}

/// How reading a streamed request body from the HTTP caller went.
const BODY_OK: u8 = 0;
const BODY_TOO_LARGE: u8 = 1;
const BODY_STALLED: u8 = 2;
const BODY_MALFORMED: u8 = 3;

/// The HTTP request body as a stream of chunks, cut off with an error past `limit` bytes, a
/// stall, or a malformed encoding; `failure` records which, for the response.
fn request_body_stream(
    body: Body,
    limit: u64,
    declared: Option<u64>,
    failure: Arc<AtomicU8>,
) -> BodyStream {
    // (bytes read, failed): after a failure the stream ends.
    let chunks = body
        .into_data_stream()
        .scan((0u64, false), move |(read, failed), chunk| {
            let item = if *failed {
                None
            } else {
                let outcome = match chunk {
                    Ok(chunk) if *read + chunk.len() as u64 <= limit => {
                        *read += chunk.len() as u64;
                        return futures_util::future::ready(Some(Ok(chunk)));
                    }
                    Ok(_) => (BODY_TOO_LARGE, BodyError::TooLarge { limit }),
                    Err(e) if stalled(&e) => (BODY_STALLED, BodyError::Io(causes(&e))),
                    Err(e) => (BODY_MALFORMED, BodyError::Aborted(causes(&e))),
                };
                *failed = true;
                failure.store(outcome.0, Ordering::Release);
                Some(Err(outcome.1))
            };
            futures_util::future::ready(item)
        });
    BodyStream::new(chunks, declared)
}

/// The allow-listed headers of an HTTP request or response (docs/HTTP.md); the others stay
/// behind. A value that is not visible ASCII, or too long, stays behind too.
pub fn allowed_headers(map: &HeaderMap) -> Headers {
    let mut out = Headers::new();
    // The request's few headers against the list, rather than a lookup per listed name: this
    // runs for every request.
    for (name, value) in map {
        let name = name.as_str();
        if headers::is_allowed(name) {
            if let Ok(value) = value.to_str() {
                let _ = out.insert(name, value);
            }
        }
    }
    out
}

/// Whether reading a body failed because it went over the limit, rather than because it was
/// malformed or cut short.
pub(super) fn over_limit(err: &axum::Error) -> bool {
    caused_by::<http_body_util::LengthLimitError>(err)
}

/// Whether reading a body failed because it brought no byte for the body timeout.
pub(super) fn stalled(err: &axum::Error) -> bool {
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
pub(super) fn causes(err: &dyn std::error::Error) -> String {
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

pub(super) fn requested_timeout(
    headers: &HeaderMap,
    pipe: &crate::node::PipeConfig,
) -> Result<Duration, String> {
    let Some(value) = super::names::get(headers, &super::names::TIMEOUT) else {
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
    let length = reply.stream.as_ref().and_then(BodyStream::length);
    let body = match reply.stream {
        Some(stream) => Body::from_stream(stream),
        None => Body::from(reply.body),
    };
    let mut response = Response::new(body);
    *response.status_mut() = status;
    let headers = response.headers_mut();
    if let Some(length) = length {
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(length));
    }
    for (name, value) in reply.headers.iter() {
        if let (Ok(name), Ok(value)) = (
            header::HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_str(value),
        ) {
            headers.insert(name, value);
        }
    }
    // The usual types need no copy of their own.
    let content_type = if reply.content_type.is_empty() {
        HeaderValue::from_static("application/octet-stream")
    } else if reply.content_type == "application/json" {
        HeaderValue::from_static("application/json")
    } else {
        HeaderValue::from_str(&reply.content_type)
            .unwrap_or_else(|_| HeaderValue::from_static("application/octet-stream"))
    };
    headers.insert(header::CONTENT_TYPE, content_type);
    let code = match reply.code {
        restpipe_handler::codes::OK => HeaderValue::from_static("0"),
        code => HeaderValue::from(code),
    };
    headers.insert(&super::names::RETURN_CODE, code);
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
        CallError::TooLarge { .. }
        | CallError::FrameTooLarge { .. }
        | CallError::BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
        CallError::BodyFailed(_) => StatusCode::BAD_REQUEST,
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
