//! An upstream for the `forward` plug-in's queued-delivery tests: an HTTP server on loopback
//! that records every `POST /hook` with its `X-Restpipe-Delivery-Id` and body, in arrival
//! order, and answers after a delay when asked to.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::HeaderMap;
use axum::routing::post;
use axum::Router;

/// What the upstream got: (delivery id, body), in arrival order.
type Seen = Arc<Mutex<Vec<(String, String)>>>;

/// A running recording upstream; it stops with the test's runtime.
pub struct Hook {
    addr: SocketAddr,
    seen: Seen,
}

impl Hook {
    /// Start one that answers each `POST /hook` `delay` after it arrived.
    pub async fn start(delay: Duration) -> Hook {
        let seen: Seen = Arc::default();
        let app = Router::new()
            .route("/hook", post(record))
            .with_state((seen.clone(), delay));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the upstream");
        let addr = listener.local_addr().expect("the upstream's address");
        tokio::spawn(async move { axum::serve(listener, app).await });
        Hook { addr, seen }
    }

    /// Its address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Every delivery so far, repeats included.
    pub fn seen(&self) -> Vec<(String, String)> {
        self.lock().clone()
    }

    /// How many deliveries so far, repeats included.
    pub fn count(&self) -> usize {
        self.lock().len()
    }

    /// The first delivery of each id, in arrival order: what a handler that deduplicates by
    /// id would handle.
    pub fn once_each(&self) -> Vec<(String, String)> {
        let mut once = HashSet::new();
        self.lock()
            .iter()
            .filter(|(id, _)| once.insert(id.clone()))
            .cloned()
            .collect()
    }

    /// Wait (at most `limit`) until `n` distinct ids have arrived; whether they did.
    pub async fn wait_once_each(&self, n: usize, limit: Duration) -> bool {
        crate::wait::wait_until(limit, || self.once_each().len() >= n).await
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<(String, String)>> {
        self.seen.lock().unwrap_or_else(|p| p.into_inner())
    }
}

async fn record(
    State((seen, delay)): State<(Seen, Duration)>,
    headers: HeaderMap,
    body: String,
) -> &'static str {
    let id = headers
        .get("x-restpipe-delivery-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    seen.lock()
        .unwrap_or_else(|p| p.into_inner())
        .push((id, body));
    tokio::time::sleep(delay).await;
    "ok"
}
