//! The writer of a connection: one task owns the write half, takes already-encoded frames
//! from a bounded queue, and writes whatever is queued in one go (write coalescing).
//!
//! Events and replies also wait for room in a byte budget ([`WRITE_BUDGET`]) before they are
//! queued, so a peer that stops reading cannot make this node buffer without bound; control
//! frames never wait. A write that makes no progress for the heartbeat timeout means the peer
//! is not reading, and ends the connection.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncWrite, AsyncWriteExt, WriteHalf};
use tokio::sync::mpsc;
use tracing::{debug, warn};

use super::Shared;
use crate::error::CallError;
use crate::wire::{self, ErrorKind, Message};

/// Frame parts written in one go at most.
const MAX_BATCH_FRAMES: usize = 128;
/// Frames up to this size are copied into the coalescing buffer; larger ones are written
/// directly.
const COALESCE_LIMIT: usize = 16 * 1024;
/// How long the writer keeps trying to flush its last frames once the connection is closing.
const FINAL_FLUSH: Duration = Duration::from_secs(1);
/// Bytes of frames a connection holds for its writer (queued or being written) from which an
/// event or a reply waits for room before it is queued; control frames never wait. A peer that
/// stops reading thus makes this node hold at most this much plus one frame for it, besides
/// the replies of the requests in flight (`max_in_flight`), until the write stalls for the
/// heartbeat timeout and the connection ends.
const WRITE_BUDGET: usize = 8 * 1024 * 1024;

impl Shared {
    /// Queue an encoded frame, waiting for room in the write budget and the queue; fails once
    /// the connection is closed.
    pub(super) async fn send(&self, frame: wire::Encoded) -> Result<(), CallError> {
        let queue = async {
            self.reserve(frame.len()).await;
            self.out.send(frame).await
        };
        tokio::select! {
            r = queue => r.map_err(|_| self.closed_error()),
            _ = self.closed.cancelled() => Err(self.closed_error()),
        }
    }

    /// Wait until less than [`WRITE_BUDGET`] is held for the writer, and count `len` more
    /// bytes held.
    async fn reserve(&self, len: usize) {
        loop {
            let written = self.written.notified();
            tokio::pin!(written);
            // Registered before the check, so that a batch written in between wakes it.
            written.as_mut().enable();
            let room = |held: usize| (held < WRITE_BUDGET).then_some(held + len);
            if self
                .unwritten
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, room)
                .is_ok()
            {
                return;
            }
            written.await;
        }
    }

    /// The writer wrote `bytes`: room for the senders waiting.
    fn wrote(&self, bytes: usize) {
        let _ = self
            .unwritten
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |held| {
                Some(held.saturating_sub(bytes))
            });
        self.written.notify_waiters();
    }

    /// Queue a control message without waiting. A full queue drops it: the peer's own timeout
    /// covers what it would have answered.
    pub(super) fn send_now(&self, message: Message) {
        let frame = wire::encode(message);
        let len = frame.len();
        self.unwritten.fetch_add(len, Ordering::AcqRel);
        if self.out.try_send(frame).is_err() {
            self.wrote(len);
            debug!(parent: &self.span, "write queue full; control frame dropped");
        }
    }

    /// Answer request `id` with an error frame.
    pub(super) fn send_error(&self, id: u64, kind: ErrorKind, message: String) {
        self.send_now(Message::Error { id, kind, message });
    }
}

/// Write queued frames until the connection ends, then flush what is left and say goodbye.
pub(super) async fn write_loop<S: AsyncWrite>(
    shared: Arc<Shared>,
    mut rx: mpsc::Receiver<wire::Encoded>,
    mut io: WriteHalf<S>,
) {
    let stall = shared.core.pipe.heartbeat_timeout;
    let mut batch: Vec<Bytes> = Vec::new();
    let mut buf: Vec<u8> = Vec::new();
    loop {
        let first = tokio::select! {
            biased;
            frame = rx.recv() => match frame {
                Some(frame) => frame,
                None => break,
            },
            _ = shared.closed.cancelled() => break,
        };
        batch.extend(first.parts());
        take_queued(&mut rx, &mut batch);
        // While other requests are in flight, more frames are likely on their way from tasks
        // that are ready to run: yield once so that they join this write. One write (and one
        // wake-up of the peer) then carries many frames; a lone request does not wait.
        if batch.len() < MAX_BATCH_FRAMES && shared.in_flight() > 1 {
            tokio::task::yield_now().await;
            take_queued(&mut rx, &mut batch);
        }
        let bytes = batch.iter().map(Bytes::len).sum();
        match write_batch(&mut io, &mut batch, &mut buf, stall).await {
            Ok(()) => shared.wrote(bytes),
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {
                warn!("peer is not reading; closing");
                shared.close(format!(
                    "the peer read nothing for {stall:?} (write stalled)"
                ));
                return;
            }
            Err(e) => {
                shared.close(format!("write failed: {e}"));
                break;
            }
        }
        if buf.capacity() > 4 * COALESCE_LIMIT {
            buf = Vec::new();
        }
    }
    // Closing: flush what is queued (a Close frame among it), then end TLS cleanly.
    rx.close();
    while let Ok(frame) = rx.try_recv() {
        batch.extend(frame.parts());
    }
    let _ = tokio::time::timeout(FINAL_FLUSH, async {
        write_batch(&mut io, &mut batch, &mut buf, FINAL_FLUSH).await?;
        io.shutdown().await
    })
    .await;
}

/// Move the parts of the frames already queued into `batch`, up to [`MAX_BATCH_FRAMES`].
fn take_queued(rx: &mut mpsc::Receiver<wire::Encoded>, batch: &mut Vec<Bytes>) {
    while batch.len() < MAX_BATCH_FRAMES {
        match rx.try_recv() {
            Ok(frame) => batch.extend(frame.parts()),
            Err(_) => break,
        }
    }
}

/// Write a batch of frames, coalescing the small ones. Fails with `TimedOut` when the peer
/// takes nothing for `stall`: a single write or the flush makes no progress for that long. A
/// large frame that crosses a slow link slowly but steadily is not a stall.
pub(super) async fn write_batch<W: AsyncWrite + Unpin>(
    io: &mut W,
    batch: &mut Vec<Bytes>,
    buf: &mut Vec<u8>,
    stall: Duration,
) -> std::io::Result<()> {
    for frame in batch.drain(..) {
        if frame.len() > COALESCE_LIMIT {
            if !buf.is_empty() {
                write_all(io, buf, stall).await?;
                buf.clear();
            }
            write_all(io, &frame, stall).await?;
        } else {
            buf.extend_from_slice(&frame);
        }
    }
    if !buf.is_empty() {
        write_all(io, buf, stall).await?;
        buf.clear();
    }
    tokio::time::timeout(stall, io.flush())
        .await
        .map_err(|_| std::io::ErrorKind::TimedOut)?
}

/// `write_all`, failing with `TimedOut` when one write makes no progress for `stall`.
async fn write_all<W: AsyncWrite + Unpin>(
    io: &mut W,
    mut data: &[u8],
    stall: Duration,
) -> std::io::Result<()> {
    while !data.is_empty() {
        let n = tokio::time::timeout(stall, io.write(data))
            .await
            .map_err(|_| std::io::ErrorKind::TimedOut)??;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        data = &data[n..];
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    /// A peer that reads steadily but slowly: the whole batch takes several times the stall
    /// limit, and still goes through, because every write makes progress.
    #[tokio::test]
    async fn a_slow_but_steady_reader_is_not_a_stall() {
        let (mut ours, mut theirs) = tokio::io::duplex(1024);
        let total = 64 * 1024;
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            let mut chunk = [0u8; 1024];
            while got.len() < total {
                tokio::time::sleep(Duration::from_millis(5)).await;
                let n = theirs.read(&mut chunk).await.unwrap();
                got.extend_from_slice(&chunk[..n]);
            }
            got
        });
        let frame = Bytes::from((0..total).map(|i| i as u8).collect::<Vec<u8>>());
        let stall = Duration::from_millis(100);
        let started = tokio::time::Instant::now();
        let mut batch = vec![frame.clone()];
        write_batch(&mut ours, &mut batch, &mut Vec::new(), stall)
            .await
            .unwrap();
        assert!(started.elapsed() > stall);
        assert_eq!(reader.await.unwrap(), frame);
    }

    /// A peer that reads nothing is a stall.
    #[tokio::test]
    async fn a_peer_that_reads_nothing_is_a_stall() {
        let (mut ours, _theirs) = tokio::io::duplex(1024);
        let mut batch = vec![Bytes::from(vec![7u8; 64 * 1024])];
        let err = write_batch(
            &mut ours,
            &mut batch,
            &mut Vec::new(),
            Duration::from_millis(50),
        )
        .await
        .unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::TimedOut);
    }
}
