//! Publish/subscribe at the front door (docs/PUBSUB.md): `POST /publish/{topic}` (202 and the
//! event's id) and `GET /events/{topic-glob}`, the events of the node's topic log as
//! Server-Sent Events, resumable with `Last-Event-ID`.
//!
//! A listener reads the log through a cursor, on a task of its own that hands the response
//! body one chunk at a time: it never holds more than one event. A listener that takes no byte
//! for `--pubsub-stall` while an event waits for it, or whose cursor fell out of the log's
//! retention, is cut (counted in `restpipe_pubsub_listener_cut_total`); it can come back with
//! `Last-Event-ID`.

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use base64::Engine as _;
use bytes::Bytes;
use serde_json::json;
use tokio::sync::mpsc;

use super::call::read_whole;
use super::{error_response, Shared};
use crate::pubsub::{self, Entry, PublishError, Pubsub, KEEP_ALIVE};
use crate::wire;

/// The header with which a listener resumes after the last event it got.
pub const LAST_EVENT_ID: &str = "last-event-id";

/// The node's hub, and the path after `prefix` percent-decoded; or the response that says
/// why there is none (no hub: 501; a path that is not UTF-8: 400).
fn hub_and_tail(
    state: &Shared,
    path: &str,
    prefix: &str,
) -> Result<(Pubsub, String), Box<Response>> {
    let hub = state.pipe.core().pubsub.get().cloned().ok_or_else(|| {
        Box::new(error_response(
            StatusCode::NOT_IMPLEMENTED,
            "this node's front door has no publish/subscribe (docs/PUBSUB.md)",
        ))
    })?;
    let raw = path.strip_prefix(prefix).unwrap_or("");
    let tail = percent_encoding::percent_decode_str(raw)
        .decode_utf8()
        .map(|s| s.into_owned())
        .map_err(|_| {
            Box::new(error_response(
                StatusCode::BAD_REQUEST,
                "the path is not UTF-8",
            ))
        })?;
    Ok((hub, tail))
}

/// `POST /publish/{topic}`: 202 `{"id": ...}` once the event is in the server's log.
pub(super) async fn publish(State(state): State<Shared>, request: Request) -> Response {
    let (hub, topic) = match hub_and_tail(&state, request.uri().path(), "/publish/") {
        Ok(found) => found,
        Err(response) => return *response,
    };
    if let Err(e) = wire::check_topic(&topic) {
        return error_response(
            StatusCode::BAD_REQUEST,
            format!("{e}; nothing was published"),
        );
    }
    let limit = hub.settings().max_publish_bytes;
    let too_large = |size: &str| {
        error_response(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("a published event's body is at most {limit} bytes (--max-publish-bytes), this one has {size}; nothing was published"),
        )
    };
    let headers = request.headers();
    let declared = super::call::declared_length(headers);
    if let Some(declared) = declared.filter(|&n| n > limit as u64) {
        return too_large(&declared.to_string());
    }
    let content_type = super::call::content_type(headers);
    let body = match read_whole(request.into_body(), limit, "published", &too_large).await {
        Ok(body) => body,
        Err(response) => return response,
    };
    match hub.publish(topic, content_type, body).await {
        Ok(id) => (StatusCode::ACCEPTED, Json(json!({ "id": id }))).into_response(),
        Err(e) => publish_error_response(e),
    }
}

fn publish_error_response(err: PublishError) -> Response {
    let status = match &err {
        PublishError::BadTopic(_) => StatusCode::BAD_REQUEST,
        PublishError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
        PublishError::Forbidden(_) => StatusCode::FORBIDDEN,
        PublishError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
        PublishError::NoSpace(_) => StatusCode::INSUFFICIENT_STORAGE,
        PublishError::Server(status, body) => {
            // The server's refusal, as it gave it.
            let status = StatusCode::from_u16(*status).unwrap_or(StatusCode::BAD_GATEWAY);
            let mut response = Response::new(Body::from(body.clone()));
            *response.status_mut() = status;
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            return response;
        }
    };
    error_response(status, err.to_string())
}

/// `GET /events/{topic-glob}`: the events of the node's log whose topic matches, as
/// Server-Sent Events, from now on or after `Last-Event-ID`.
pub(super) async fn events(State(state): State<Shared>, request: Request) -> Response {
    let (hub, glob) = match hub_and_tail(&state, request.uri().path(), "/events/") {
        Ok(found) => found,
        Err(response) => return *response,
    };
    let globs = match pubsub::glob_set(std::slice::from_ref(&glob)) {
        Ok(set) => set,
        Err(e) => return error_response(StatusCode::BAD_REQUEST, e),
    };
    let last = request
        .headers()
        .get(LAST_EVENT_ID)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|v| !v.is_empty());
    if let Some(Err(e)) = last.map(wire::check_event_id) {
        return error_response(StatusCode::BAD_REQUEST, format!("Last-Event-ID: {e}"));
    }
    let Some(slot) = hub.listener_slot() else {
        return error_response(
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "this node serves {} event listeners already, its most",
                pubsub::MAX_LISTENERS
            ),
        );
    };
    let from = match last {
        Some(id) => hub.log().resume_after(id),
        None => hub.log().next_seq(),
    };
    let (tx, rx) = mpsc::channel::<Bytes>(1);
    tokio::spawn(async move {
        feed(hub, globs, from, tx).await;
        drop(slot);
    });
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|chunk| (Ok::<_, std::convert::Infallible>(chunk), rx))
    });
    let mut response = Response::new(Body::from_stream(stream));
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}

/// Hand the listener the events after its cursor, one chunk at a time, until it goes away or
/// is cut.
async fn feed(hub: Pubsub, globs: globset::GlobSet, mut from: u64, tx: mpsc::Sender<Bytes>) {
    let stall = hub.settings().stall;
    let mut appended = hub.log().watch();
    // The first bytes at once: the listener knows it is connected.
    if tx
        .send(Bytes::from_static(b": connected\n\n"))
        .await
        .is_err()
    {
        return;
    }
    loop {
        appended.borrow_and_update();
        let batch = hub.log().read(from, 64);
        if batch.lagged {
            hub.listener_cut("its cursor fell out of the retention");
            return;
        }
        for entry in &batch.entries {
            if !globs.is_match(&entry.event.topic) {
                continue;
            }
            match tx.send_timeout(frame(entry), stall).await {
                Ok(()) => {}
                Err(mpsc::error::SendTimeoutError::Timeout(_)) => {
                    hub.listener_cut(&format!("it took no byte for {stall:?}"));
                    return;
                }
                Err(mpsc::error::SendTimeoutError::Closed(_)) => return,
            }
        }
        from = batch.next;
        if batch.entries.is_empty() {
            tokio::select! {
                changed = appended.changed() => if changed.is_err() { return },
                _ = tokio::time::sleep(KEEP_ALIVE) => {
                    if tx.send_timeout(Bytes::from_static(b": keep-alive\n\n"), stall).await.is_err() {
                        return;
                    }
                }
                _ = tx.closed() => return,
                _ = hub.stopped() => return,
            }
        }
    }
}

/// One event as Server-Sent Events: `id`, `event` (the topic), then the body as `data:`
/// lines when it is UTF-8, else as base64 after an `encoding: base64` field.
fn frame(entry: &Entry) -> Bytes {
    let event = &entry.event;
    let mut out = format!("id: {}\nevent: {}\n", event.id, event.topic);
    match std::str::from_utf8(&event.body) {
        Ok(text) => {
            let text = text.replace("\r\n", "\n").replace('\r', "\n");
            for line in text.split('\n') {
                out.push_str("data: ");
                out.push_str(line);
                out.push('\n');
            }
        }
        Err(_) => {
            out.push_str("encoding: base64\ndata: ");
            out.push_str(&base64::engine::general_purpose::STANDARD.encode(&event.body));
            out.push('\n');
        }
    }
    out.push('\n');
    Bytes::from(out)
}
