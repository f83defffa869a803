//! The operator's view of a node: `GET /metrics` (the Prometheus text exposition format),
//! `GET /` (a status page) and `GET /status/history` (the page's recent round trips and
//! errors, as JSON).
//!
//! The page is one HTML file (`status.html`, compiled in) with no external asset. The server
//! fills in the node's role and identity, HTML-escaped, and a fresh nonce; an inline script
//! then fetches `/status` and `/status/history` every few seconds and builds the peers table,
//! the round-trip sparklines (inline SVG) and the error list with `textContent` and
//! `createElement` only, never `innerHTML`, so nothing a peer controls (identity, address,
//! error text) is ever parsed as markup. A strict Content-Security-Policy allows the page's
//! own nonce-bearing script and style and requests to the node itself, nothing else.

use std::fmt::Write as _;

use axum::extract::State;
use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::Json;
use rand::Rng;
use serde_json::json;

use super::{Pipe, Shared};
use crate::metrics::registry::ScrapeGauges;

/// The page, with `{{nonce}}`, `{{role}}` and `{{identity}}` to fill in.
const TEMPLATE: &str = include_str!("status.html");

/// The content type of the Prometheus text exposition format.
const EXPOSITION: &str = "text/plain; version=0.0.4; charset=utf-8";

/// `GET /metrics`: the registry with the gauges read from the node now.
pub(super) async fn metrics(State(state): State<Shared>) -> Response {
    let pipe = &state.pipe;
    let peers = match pipe {
        Pipe::Server(server) => server.clients(),
        Pipe::Client(client) => client.status().into_iter().collect(),
    };
    let gauges = ScrapeGauges {
        role: pipe.side().as_str(),
        identity: pipe.identity().to_string(),
        peers: peers.len() as u64,
        in_flight_out: peers.iter().map(|p| p.requests_in_flight_out).sum(),
        in_flight_in: peers.iter().map(|p| p.requests_in_flight_in).sum(),
        certificate_days_left: Some(pipe.core().own_cert.load().summary().days_left),
        peer_certificate_days_left_min: peers.iter().map(|p| p.certificate.days_left).min(),
        statsd_dropped: state.options.metrics.dropped(),
        uptime_s: state.started.elapsed().as_secs_f64(),
    };
    let body = state.options.metrics.registry().render(&gauges);
    ([(header::CONTENT_TYPE, EXPOSITION)], body).into_response()
}

/// `GET /status/history`: the heartbeat round trips of every live connection and the last
/// error events.
pub(super) async fn history(State(state): State<Shared>) -> Response {
    let registry = state.options.metrics.registry();
    Json(json!({
        "rtts": registry.rtts(),
        "errors": registry.recent_errors(),
    }))
    .into_response()
}

/// `GET /`: the status page.
pub(super) async fn page(State(state): State<Shared>) -> Response {
    let nonce: String = {
        let bytes: [u8; 16] = rand::rng().random();
        bytes.iter().fold(String::with_capacity(32), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
    };
    let body = TEMPLATE
        .replace("{{nonce}}", &nonce)
        .replace("{{role}}", state.pipe.side().as_str())
        .replace("{{identity}}", &escape_html(state.pipe.identity()));
    let csp = format!(
        "default-src 'none'; script-src 'nonce-{nonce}'; style-src 'nonce-{nonce}'; \
         connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; \
         frame-ancestors 'none'"
    );
    let mut response = (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-store"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::REFERRER_POLICY, "no-referrer"),
        ],
        body,
    )
        .into_response();
    if let Ok(value) = HeaderValue::from_str(&csp) {
        response
            .headers_mut()
            .insert(header::CONTENT_SECURITY_POLICY, value);
    }
    response
}

/// `text` with the characters that mean something in HTML replaced by their references.
fn escape_html(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn html_is_escaped() {
        assert_eq!(
            escape_html(r#"<img src=x onerror="a('b')">&"#),
            "&lt;img src=x onerror=&quot;a(&#39;b&#39;)&quot;&gt;&amp;"
        );
    }

    #[test]
    fn the_template_has_its_placeholders_and_no_external_source() {
        for placeholder in ["{{nonce}}", "{{role}}", "{{identity}}"] {
            assert!(TEMPLATE.contains(placeholder), "{placeholder}");
        }
        assert!(!TEMPLATE.contains("innerHTML"));
        // The SVG namespace is a name, not a fetch.
        let rest = TEMPLATE.replace("\"http://www.w3.org/2000/svg\"", "");
        assert!(!rest.contains("http://") && !rest.contains("https://"));
        assert!(!rest.contains(" src=") && !rest.contains(" href="));
    }
}
