//! `restpipe status`: ask a running node for `GET /status` (over TCP or its Unix socket) and
//! print it as a table an operator reads at a glance: the node, then one row per peer.

use std::time::Duration;

use anyhow::{bail, Context as _};
use http_body_util::{BodyExt as _, Empty};
use hyper::body::Bytes;
use hyper::header::{AUTHORIZATION, HOST};
use hyper::{Request, StatusCode};
use hyper_util::rt::TokioIo;
use restpipe::config::StatusArgs;
use restpipe::http::HttpListen;
use serde_json::Value;
use tokio::io::{AsyncRead, AsyncWrite};

/// How long the whole exchange may take.
const TIMEOUT: Duration = Duration::from_secs(10);

/// Ask the node and print its status; an error when no node answers or it refuses.
pub async fn run(args: &StatusArgs) -> anyhow::Result<()> {
    let endpoint = args.endpoint();
    let (code, body) = tokio::time::timeout(TIMEOUT, fetch(&endpoint, args.token.as_deref()))
        .await
        .map_err(|_| {
            anyhow::anyhow!("the node at {endpoint} did not answer within {TIMEOUT:?}")
        })??;
    if code != StatusCode::OK {
        let said = serde_json::from_slice::<Value>(&body)
            .ok()
            .and_then(|v| v["error"].as_str().map(str::to_string))
            .unwrap_or_else(|| String::from_utf8_lossy(&body).trim().to_string());
        let hint = if code == StatusCode::UNAUTHORIZED {
            " (give --token or RP_HTTP_TOKEN)"
        } else {
            ""
        };
        bail!("the node at {endpoint} answered {code}: {said}{hint}");
    }
    let status: Value = serde_json::from_slice(&body)
        .with_context(|| format!("the node at {endpoint} sent a /status that is not JSON"))?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&status)?);
    } else {
        print!("{}", render(&endpoint, &status));
    }
    Ok(())
}

/// `GET /status` on `endpoint`: the status code and the body.
async fn fetch(endpoint: &HttpListen, token: Option<&str>) -> anyhow::Result<(StatusCode, Bytes)> {
    match endpoint {
        HttpListen::Tcp(addr) => {
            let stream = tokio::net::TcpStream::connect(addr)
                .await
                .with_context(|| format!("no node answers on {addr}"))?;
            get_status(stream, token).await
        }
        HttpListen::Unix(path) => {
            #[cfg(unix)]
            {
                let stream = tokio::net::UnixStream::connect(path)
                    .await
                    .with_context(|| format!("no node answers on {}", path.display()))?;
                get_status(stream, token).await
            }
            #[cfg(not(unix))]
            bail!("Unix sockets ({}) need a Unix system", path.display())
        }
    }
}

/// One HTTP/1.1 `GET /status` with `Host: localhost` on `stream`.
async fn get_status<S>(stream: S, token: Option<&str>) -> anyhow::Result<(StatusCode, Bytes)>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .context("the HTTP handshake failed")?;
    let connection = tokio::spawn(connection);
    let mut request = Request::get("/status").header(HOST, "localhost");
    if let Some(token) = token.filter(|t| !t.is_empty()) {
        request = request.header(AUTHORIZATION, format!("Bearer {token}"));
    }
    let response = sender
        .send_request(request.body(Empty::<Bytes>::new())?)
        .await
        .context("the node closed the connection before it answered")?;
    let code = response.status();
    let body = response
        .into_body()
        .collect()
        .await
        .context("the node's answer was cut short")?
        .to_bytes();
    connection.abort();
    Ok((code, body))
}

/// A duration in seconds as `3d 4h`, `2h 05m`, `4m 09s` or `7s`.
fn span(seconds: f64) -> String {
    let s = seconds.max(0.0) as u64;
    let (d, h, m, s) = (s / 86_400, s / 3600 % 24, s / 60 % 60, s % 60);
    match (d, h, m) {
        (0, 0, 0) => format!("{s}s"),
        (0, 0, _) => format!("{m}m {s:02}s"),
        (0, _, _) => format!("{h}h {m:02}m"),
        _ => format!("{d}d {h}h"),
    }
}

/// A JSON value as a cell: strings bare, null as `-`.
fn cell(value: &Value) -> String {
    match value {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// Rows of cells aligned in columns, two spaces apart, each line indented by `indent`.
fn table(rows: &[Vec<String>], indent: &str) -> String {
    let columns = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..columns)
        .map(|c| {
            rows.iter()
                .filter_map(|r| r.get(c))
                .map(|s| s.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for row in rows {
        let mut line = String::from(indent);
        for (c, text) in row.iter().enumerate() {
            if c + 1 == row.len() {
                line.push_str(text);
            } else {
                line.push_str(&format!("{text:<w$}  ", w = widths[c]));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// The status of the node at `endpoint` as the table `restpipe status` prints.
fn render(endpoint: &HttpListen, status: &Value) -> String {
    let now = status["now"].as_f64().unwrap_or(0.0);
    let role = cell(&status["role"]);
    let mut node = vec![
        vec!["node".into(), endpoint.to_string()],
        vec!["role".into(), role.clone()],
        vec!["identity".into(), cell(&status["identity"])],
        vec!["version".into(), cell(&status["version"])],
        vec![
            "uptime".into(),
            span(status["uptime_s"].as_f64().unwrap_or(0.0)),
        ],
    ];
    match role.as_str() {
        "server" => node.push(vec!["listening".into(), cell(&status["listening"])]),
        _ => node.push(vec![
            "server".into(),
            format!(
                "{} ({})",
                cell(&status["server"]),
                if status["connected"] == Value::Bool(true) {
                    "connected"
                } else {
                    "not connected"
                }
            ),
        ]),
    }
    let certificate = &status["certificate"];
    node.push(vec![
        "certificate".into(),
        match certificate["days_left"].as_i64() {
            Some(days) => format!("{days} days left ({})", cell(&certificate["fingerprint"])),
            None => "-".into(),
        },
    ]);
    let reload = &status["reload"];
    node.push(vec![
        "last reload".into(),
        if reload.is_null() {
            "none since start".into()
        } else {
            let ago = span(now - reload["at"].as_f64().unwrap_or(now));
            if reload["ok"] == Value::Bool(true) {
                let closed = reload["closed"].as_array().map_or(0, Vec::len);
                format!("ok, {ago} ago ({closed} peers closed)")
            } else {
                format!("FAILED, {ago} ago: {}", cell(&reload["error"]))
            }
        },
    ]);
    let mut out = table(&node, "");
    let peers = status["peers"].as_array().cloned().unwrap_or_default();
    out.push('\n');
    if peers.is_empty() {
        out.push_str("no peer connected\n");
        return out;
    }
    let mut rows = vec![vec![
        "PEER".to_string(),
        "ADDRESS".into(),
        "CONNECTED FOR".into(),
        "RTT".into(),
        "IN FLIGHT OUT/IN".into(),
        "SENT".into(),
        "RECEIVED".into(),
    ]];
    for peer in &peers {
        rows.push(vec![
            cell(&peer["identity"]),
            cell(&peer["address"]),
            peer["connected_since"]
                .as_f64()
                .map_or_else(|| "-".into(), |since| span(now - since)),
            peer["last_heartbeat_rtt_ms"]
                .as_f64()
                .map_or_else(|| "-".into(), |ms| format!("{ms:.1} ms")),
            format!(
                "{}/{}",
                cell(&peer["requests_in_flight_out"]),
                cell(&peer["requests_in_flight_in"])
            ),
            cell(&peer["requests_sent"]),
            cell(&peer["requests_received"]),
        ]);
    }
    out.push_str(&table(&rows, ""));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn spans_read_at_a_glance() {
        assert_eq!(span(7.9), "7s");
        assert_eq!(span(249.0), "4m 09s");
        assert_eq!(span(7500.0), "2h 05m");
        assert_eq!(span(3.0 * 86_400.0 + 4.0 * 3600.0), "3d 4h");
        assert_eq!(span(-5.0), "0s");
    }

    #[test]
    fn the_table_shows_the_node_and_a_row_per_peer() {
        let status = json!({
            "role": "server", "identity": "rp.example.com", "version": "1.2.3",
            "uptime_s": 3725.0, "now": 1000.0, "listening": "0.0.0.0:1234",
            "certificate": {"fingerprint": "ab:cd", "not_after": 0.0, "days_left": 88},
            "reload": {"at": 940.0, "ok": false, "error": "cannot read ca.pem", "closed": []},
            "peers": [{
                "identity": "dev-client", "address": "10.0.0.7:5555", "connected_since": 700.0,
                "last_heartbeat_rtt_ms": 0.42, "requests_in_flight_out": 1,
                "requests_in_flight_in": 0, "requests_sent": 12, "requests_received": 3
            }]
        });
        let text = render(&HttpListen::Tcp("127.0.0.1:8081".parse().unwrap()), &status);
        for needle in [
            "node         127.0.0.1:8081",
            "rp.example.com",
            "1h 02m",
            "88 days left",
            "FAILED, 1m 00s ago: cannot read ca.pem",
            "dev-client",
            "10.0.0.7:5555",
            "5m 00s",
            "0.4 ms",
            "1/0",
        ] {
            assert!(text.contains(needle), "{needle:?} not in:\n{text}");
        }
        let header = text.lines().find(|l| l.starts_with("PEER")).unwrap();
        let row = text.lines().find(|l| l.starts_with("dev-client")).unwrap();
        assert_eq!(
            header.find("ADDRESS"),
            row.find("10.0.0.7"),
            "aligned:\n{text}"
        );
    }
}
