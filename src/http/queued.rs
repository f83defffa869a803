//! Queued delivery at the front door (docs/QUEUE.md): a call with `X-Event-Delivery: queued`
//! is read whole (within `--queue-max-body`), checked as the pipe would check it, and handed
//! to the node's [`Queue`](crate::queue::Queue), which answers once the event is on disk:
//! `202 Accepted`, `{"id": ...}` and `Location: /queued/{id}`. `GET /queued/{id}` tells where
//! the event is, with the stored reply once delivered.

use std::time::Duration;

use axum::extract::{Path, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

use super::call::{allowed_headers, read_whole, Target};
use super::{error_response, Shared};
use crate::queue::{self, NewEvent, QueueError, DELIVERY_HEADER, MAX_TTL, TTL_HEADER};
use crate::wire;

/// Whether the request asks for queued delivery: `X-Event-Delivery: queued` (any case) yes,
/// `direct` or no header no, anything else is refused.
pub(super) fn wants_queue(headers: &HeaderMap) -> Result<bool, String> {
    let (count, value) = super::names::find(headers, &super::names::DELIVERY);
    let Some(value) = value else {
        return Ok(false);
    };
    if count > 1 {
        return Err(format!("{DELIVERY_HEADER} is given more than once"));
    }
    match value.to_str().map(str::trim) {
        Ok(v) if v.eq_ignore_ascii_case("queued") => Ok(true),
        Ok(v) if v.eq_ignore_ascii_case("direct") => Ok(false),
        _ => Err(format!("{DELIVERY_HEADER} takes `queued` or `direct`")),
    }
}

/// The TTL a request asks for with `X-Event-TTL-S`, if it does.
fn requested_ttl(headers: &HeaderMap) -> Result<Option<Duration>, String> {
    let Some(value) = headers.get(&super::names::TTL) else {
        return Ok(None);
    };
    let max = MAX_TTL.as_secs();
    value
        .to_str()
        .ok()
        .and_then(|v| v.trim().parse::<u64>().ok())
        .filter(|&s| (1..=max).contains(&s))
        .map(|s| Some(Duration::from_secs(s)))
        .ok_or_else(|| format!("{TTL_HEADER} must be a whole number of seconds from 1 to {max}"))
}

fn no_queue() -> Response {
    error_response(
        StatusCode::NOT_IMPLEMENTED,
        "this node's front door has no queue (docs/QUEUE.md)",
    )
}

/// Queue a call: 202 with its id once it is stored, or the reason it is not.
pub(super) async fn enqueue(
    state: &Shared,
    method: Method,
    target: Target,
    query: String,
    timeout: Duration,
    request: Request,
) -> Response {
    let Some(queue) = state.options.queue.clone() else {
        return no_queue();
    };
    let headers = request.headers();
    let ttl = match requested_ttl(headers) {
        Ok(ttl) => ttl,
        Err(message) => return error_response(StatusCode::BAD_REQUEST, message),
    };
    let content_type = super::call::content_type(headers);
    let request_headers = allowed_headers(headers);
    let limit = queue.settings().max_body.min(state.options.max_body);
    let too_large = |size: &str| {
        error_response(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("a queued event's body is at most {limit} bytes (--queue-max-body), this one has {size}; nothing was queued"),
        )
    };
    let declared = super::call::declared_length(headers);
    if let Some(declared) = declared.filter(|&n| n > limit) {
        return too_large(&declared.to_string());
    }
    let inline = usize::try_from(limit).unwrap_or(usize::MAX);
    let body = match read_whole(request.into_body(), inline, "queued", &too_large).await {
        Ok(body) => body,
        Err(response) => return response,
    };
    let event = restpipe_handler::Request {
        verb: method.as_str().to_string(),
        noun: target.noun,
        parameters: target.parameters,
        query,
        content_type,
        body,
        headers: request_headers,
        trace: None,
        delivery_id: None,
    };
    // Refused now rather than stored and failed later: no peer would take it.
    if let Err(e) = wire::check_request(&event) {
        let status = match e {
            wire::RequestError::Grammar(_) => StatusCode::BAD_REQUEST,
            wire::RequestError::UriTooLong(_) => StatusCode::URI_TOO_LONG,
            wire::RequestError::HeaderTooLarge(_) => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
        };
        return error_response(
            status,
            format!("the event cannot cross the pipe: {e}; nothing was queued"),
        );
    }
    let queued = queue
        .enqueue(NewEvent {
            peer: target.client,
            request: event,
            timeout,
            ttl,
        })
        .await;
    match queued {
        Ok(id) => {
            let location = format!("/queued/{id}");
            let mut response = (StatusCode::ACCEPTED, Json(json!({ "id": id }))).into_response();
            if let Ok(value) = HeaderValue::from_str(&location) {
                response.headers_mut().insert(header::LOCATION, value);
            }
            response
        }
        Err(e) => queue_error_response(&e),
    }
}

fn queue_error_response(err: &QueueError) -> Response {
    let status = match err {
        QueueError::Full(_) => StatusCode::TOO_MANY_REQUESTS,
        QueueError::NoSpace(_) => StatusCode::INSUFFICIENT_STORAGE,
        QueueError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
        QueueError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
    };
    let mut response = error_response(status, err.to_string());
    if status == StatusCode::TOO_MANY_REQUESTS || status == StatusCode::SERVICE_UNAVAILABLE {
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    response
}

/// `GET /queued/{id}`: 400 for what is not an id, 404 for an id this node does not hold.
pub(super) async fn status(State(state): State<Shared>, Path(id): Path<String>) -> Response {
    let Some((seq, token)) = queue::parse_id(&id) else {
        return error_response(
            StatusCode::BAD_REQUEST,
            "a queued event's id is 32 lower-case hex digits, as the 202 gave it",
        );
    };
    let Some(queue) = state.options.queue.clone() else {
        return no_queue();
    };
    match queue.get(seq, token).await {
        Ok(Some(view)) => Json(view).into_response(),
        Ok(None) => error_response(
            StatusCode::NOT_FOUND,
            format!("no queued event {id} on this node (finished events are kept for a while, then forgotten)"),
        ),
        Err(e) => queue_error_response(&e),
    }
}
