//! The hello exchange that opens a connection, and the start of the connection's tasks.
//!
//! Each side sends a hello with the range of protocol versions it speaks, its role, its
//! software version, its identity, its frame limit and its optional features. The connection
//! uses the highest version both ranges hold and the features both sides list; a peer whose
//! range does not meet ours, or whose role is not the other side's, is sent a `Close` with the
//! reason and refused. A peer of the previous release, which sends no range, speaks exactly
//! its one version.

use std::future::Future;
use std::net::SocketAddr;
use std::ops::RangeInclusive;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use futures_util::StreamExt;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::{Notify, Semaphore};
use tokio_util::sync::CancellationToken;
use tracing::{info, info_span, warn};

use super::inbound::{read_loop, Progress};
use super::writer::{write_loop, WriteQueue};
use super::{Connection, PeerInfo, Shared, NEXT_CONNECTION_ID};
use crate::node::NodeCore;
use crate::tls::PeerCert;
use crate::wire::{self, Hello, Message};

/// Why the hello exchange failed.
#[derive(Debug, thiserror::Error)]
pub enum HelloError {
    /// The peer refused us, and said why.
    #[error("refused by the peer: {0}")]
    RefusedByPeer(String),
    /// We refused the peer.
    #[error("{0}")]
    Incompatible(String),
    /// No hello in time, or the stream broke.
    #[error("hello exchange failed: {0}")]
    Io(String),
}

/// The protocol version two ranges share, the highest one, if any.
pub(crate) fn negotiate(ours: &RangeInclusive<u32>, theirs: &RangeInclusive<u32>) -> Option<u32> {
    let low = *ours.start().max(theirs.start());
    let high = *ours.end().min(theirs.end());
    (low <= high).then_some(high)
}

/// The future that runs a connection until it ends. Boxed: held by value in the task that
/// also ran the handshake, it was laid out twice there (once as returned, once as awaited),
/// about 1.6 KiB more of every idle connection's memory (measured with heaptrack).
pub(crate) type Running = std::pin::Pin<Box<dyn Future<Output = ()> + Send + 'static>>;

/// Run the hello exchange on a fresh TLS stream and start the connection.
///
/// Returns the connection handle and the future that runs it; the future ends when the
/// connection does. Everything the connection logs carries a `conn` span with the peer's
/// identity and address.
pub(crate) async fn open<S>(
    core: Arc<NodeCore>,
    stream: S,
    peer_cert: PeerCert,
    peer_addr: SocketAddr,
) -> Result<(Connection, Running), HelloError>
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let timeout = core.pipe.handshake_timeout;
    let (read_half, mut write_half) = tokio::io::split(stream);
    let mut reader = wire::frame_reader(Progress::new(read_half), core.pipe.max_frame);

    let ours = wire::MIN_PROTOCOL_VERSION..=wire::PROTOCOL_VERSION;
    let hello = wire::encode(Message::Hello(Hello {
        versions: ours.clone(),
        role: core.side,
        software_version: env!("CARGO_PKG_VERSION").into(),
        identity: core.identity.clone(),
        max_frame_bytes: core.pipe.max_frame as u64,
        features: wire::FEATURES.iter().map(|f| f.to_string()).collect(),
    }));
    let exchange = async {
        for part in hello.parts() {
            write_half.write_all(&part).await?;
        }
        write_half.flush().await?;
        match reader.next().await {
            Some(Ok(payload)) => Ok(payload.freeze()),
            Some(Err(e)) => Err(e),
            None => Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "the peer hung up before its hello",
            )),
        }
    };
    let payload = tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| HelloError::Io(format!("no hello from the peer within {timeout:?}")))?
        .map_err(|e| HelloError::Io(e.to_string()))?;
    let (peer_hello, refusal) = match wire::decode(payload) {
        Ok(Message::Hello(h)) => {
            let refusal = refusal(&core, &ours, &h);
            (Some(h), refusal)
        }
        Ok(Message::Close(reason)) => return Err(HelloError::RefusedByPeer(reason)),
        Ok(_) => {
            return Err(HelloError::Io(
                "the peer's first frame is not a hello".into(),
            ))
        }
        Err(e @ wire::DecodeError::Malformed(_)) => {
            return Err(HelloError::Io(format!("malformed hello: {e}")))
        }
        Err(e) => (None, Some(e.to_string())),
    };
    let (Some(peer_hello), None) = (peer_hello, &refusal) else {
        let reason = refusal.unwrap_or_default();
        let close = wire::encode(Message::Close(reason.clone()));
        let _ = tokio::time::timeout(timeout, async {
            for part in close.parts() {
                write_half.write_all(&part).await?;
            }
            write_half.shutdown().await
        })
        .await;
        return Err(HelloError::Incompatible(reason));
    };

    let protocol_version = negotiate(&ours, &peer_hello.versions).unwrap_or(wire::PROTOCOL_VERSION);
    let features: Vec<String> = peer_hello
        .features
        .iter()
        .filter(|f| wire::FEATURES.contains(&f.as_str()))
        .cloned()
        .collect();
    let trace_context = features.iter().any(|f| f == wire::TRACE_CONTEXT);
    let pubsub = features.iter().any(|f| f == wire::PUBSUB);
    let fine_credit = features.iter().any(|f| f == wire::FINE_CREDIT);
    let peer_max_frame = usize::try_from(peer_hello.max_frame_bytes)
        .unwrap_or(usize::MAX)
        .min(core.pipe.max_frame)
        .max(1024);
    let out = WriteQueue::new(core.pipe.write_queue);
    let max_in_flight = core.pipe.max_in_flight;
    let budgets = core.pipe.byte_budget();
    let peer_identity = peer_cert.identity.clone();
    let expires = peer_cert.not_after;
    let span = info_span!("conn", peer = %peer_identity, addr = %peer_addr);
    let shared = Arc::new(Shared {
        id: NEXT_CONNECTION_ID.fetch_add(1, Ordering::Relaxed),
        info: PeerInfo {
            identity: peer_identity,
            addr: peer_addr,
            software_version: peer_hello.software_version,
            protocol_version,
            features,
            connected_at: SystemTime::now(),
            cert: Arc::new(peer_cert),
        },
        core,
        span,
        started: Instant::now(),
        out,
        pending: Mutex::new(Some(Default::default())),
        next_request: AtomicU64::new(1),
        closed: CancellationToken::new(),
        close_reason: OnceLock::new(),
        draining: AtomicBool::new(false),
        inbound: Arc::new(Semaphore::new(max_in_flight)),
        outbound: Arc::new(Semaphore::new(max_in_flight)),
        inbound_bytes: Arc::new(Semaphore::new(budgets)),
        outbound_bytes: Arc::new(Semaphore::new(budgets)),
        peer_max_frame,
        trace_context,
        pubsub,
        fine_credit,
        streaming: protocol_version >= wire::STREAMING_VERSION,
        streams: Default::default(),
        last_rtt_us: AtomicU64::new(0),
        requests_sent: AtomicU64::new(0),
        requests_received: AtomicU64::new(0),
        unwritten: AtomicUsize::new(0),
        written: Notify::new(),
    });
    let conn = Connection {
        shared: shared.clone(),
    };
    // The reader and the writer are not instrumented with the connection's span: entering it
    // at every poll cost about 1% of a request (measured with callgrind). Their log lines name
    // it as their parent instead, which gives them the same peer fields.
    let run = async move {
        let writer = tokio::spawn(write_loop(shared.clone(), write_half));
        // A connection does not outlive its peer's certificate.
        let until_expiry = expires
            .duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO);
        let reason = tokio::select! {
            reason = read_loop(&shared, reader) => reason,
            _ = tokio::time::sleep(until_expiry) => {
                warn!(parent: &shared.span, "the peer's certificate expired; closing");
                Some("the peer's certificate expired".to_string())
            }
        };
        if let Some(reason) = reason {
            shared.close(reason);
        }
        let _ = writer.await;
        let reason = shared.close_reason.get().cloned().unwrap_or_default();
        info!(parent: &shared.span, %reason, "connection ended");
    };
    Ok((conn, Box::pin(run)))
}

/// Why this node refuses a peer's hello, if it does.
fn refusal(core: &NodeCore, ours: &RangeInclusive<u32>, peer: &Hello) -> Option<String> {
    if negotiate(ours, &peer.versions).is_none() {
        return Some(format!(
            "protocol version mismatch: this node ({} {}) speaks versions {}..={}, the peer ({}) speaks versions {}..={}; run releases that share a version",
            core.side,
            env!("CARGO_PKG_VERSION"),
            ours.start(),
            ours.end(),
            peer.software_version,
            peer.versions.start(),
            peer.versions.end(),
        ));
    }
    if peer.role != core.side.peer() {
        return Some(format!(
            "role mismatch: this node is a {} and expects a {} peer",
            core.side,
            core.side.peer()
        ));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::negotiate;

    #[test]
    fn the_highest_shared_version_wins() {
        assert_eq!(negotiate(&(1..=1), &(1..=1)), Some(1));
        assert_eq!(negotiate(&(1..=3), &(2..=5)), Some(3));
        assert_eq!(negotiate(&(2..=5), &(1..=3)), Some(3));
        assert_eq!(negotiate(&(1..=1), &(2..=2)), None);
        assert_eq!(negotiate(&(3..=4), &(1..=2)), None);
    }
}
