//! The trace context of a request at the front door: the caller's W3C `traceparent` and
//! `X-Request-Id` when they are usable, else new ones. It follows the request across the pipe
//! (`restpipe_handler::TraceContext`), names the request in both nodes' logs, and comes back
//! in the response's `X-Request-Id`.

use axum::http::HeaderMap;
use restpipe_handler::TraceContext;

/// The header a response carries its request id in, and a caller may set it with.
pub const REQUEST_ID_HEADER: &str = "x-request-id";
/// The W3C trace context header.
pub const TRACEPARENT_HEADER: &str = "traceparent";

/// The trace context of a request with these headers. A malformed `traceparent` or request id
/// is not an error: the request starts a trace of its own, as W3C asks of a receiver.
pub fn of_request(headers: &HeaderMap) -> TraceContext {
    let header = |name| super::names::get(headers, name).and_then(|v| v.to_str().ok());
    let trace = header(&super::names::TRACEPARENT)
        .and_then(|value| TraceContext::parse(value).ok())
        .unwrap_or_else(new_trace);
    match header(&super::names::REQUEST_ID) {
        Some(id) => trace.clone().with_request_id(id).unwrap_or(trace),
        None => trace,
    }
}

/// A trace of its own: both ids from one draw of the thread's generator.
///
/// Trace ids name requests in logs; they are not secrets and grant nothing (queued events
/// carry ids of their own, from the operating system's generator). So they come from a small
/// fast generator per thread, seeded from the operating system's, not from the cryptographic
/// one, which cost a few hundred instructions per request.
fn new_trace() -> TraceContext {
    use rand::{rngs::SmallRng, Rng, SeedableRng};
    use std::cell::RefCell;
    thread_local! {
        static IDS: RefCell<SmallRng> = RefCell::new(SmallRng::from_os_rng());
    }
    let (trace_id, parent_id) = IDS.with(|rng| {
        let mut rng = rng.borrow_mut();
        (
            rng.random::<u128>().to_le_bytes(),
            rng.random::<u64>().to_le_bytes(),
        )
    });
    TraceContext::new(trace_id, parent_id)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn keeps_what_the_caller_sent_when_usable() {
        let mut headers = HeaderMap::new();
        let parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        headers.insert(TRACEPARENT_HEADER, parent.parse().unwrap());
        headers.insert(REQUEST_ID_HEADER, "order-17".parse().unwrap());
        let trace = of_request(&headers);
        assert_eq!(trace.traceparent(), parent);
        assert_eq!(trace.request_id(), "order-17");

        headers.insert(TRACEPARENT_HEADER, "garbage".parse().unwrap());
        headers.insert(REQUEST_ID_HEADER, "with space".parse().unwrap());
        let fresh = of_request(&headers);
        assert_ne!(fresh.traceparent(), parent);
        assert_eq!(fresh.request_id(), fresh.trace_id_hex());
        assert_ne!(of_request(&HeaderMap::new()), of_request(&HeaderMap::new()));
    }
}
