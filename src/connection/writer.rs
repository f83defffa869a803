//! The writer of a connection: one task owns the write half, takes already-encoded frames
//! from a bounded queue, and writes whatever is queued in one go (write coalescing).
//!
//! Events and replies also wait for room in a byte budget ([`WRITE_BUDGET`]) before they are
//! queued, so a peer that stops reading cannot make this node buffer without bound; control
//! frames never wait. A write that makes no progress for the heartbeat timeout means the peer
//! is not reading, and ends the connection.

use std::collections::VecDeque;
use std::io::IoSlice;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncWrite, AsyncWriteExt, WriteHalf};
use tokio::sync::Notify;
use tracing::{debug, warn};

use super::Shared;
use crate::error::CallError;
use crate::util::lock;
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

/// Frames' room a write queue keeps once it empties; past it, its memory is given back.
const QUEUE_KEEP: usize = 16;

/// The queue of encoded frames between the tasks that send and the writer: bounded in frames,
/// first in first out, one reader. It allocates nothing until a frame is queued and keeps
/// little once it empties, so that an idle connection holds next to no queue (a tokio mpsc
/// channel allocates a block of 32 slots as it is made: 1.3 KiB of every idle connection,
/// measured with heaptrack).
pub(super) struct WriteQueue {
    frames: Mutex<Frames>,
    capacity: usize,
    /// Wakes the writer: a frame was queued, or the queue closed.
    queued: Notify,
    /// Wakes the senders waiting for room.
    room: Notify,
}

#[derive(Default)]
struct Frames {
    queue: VecDeque<wire::Encoded>,
    closed: bool,
}

impl WriteQueue {
    /// A queue of at most `capacity` frames.
    pub(super) fn new(capacity: usize) -> Self {
        WriteQueue {
            frames: Mutex::default(),
            capacity: capacity.max(1),
            queued: Notify::new(),
            room: Notify::new(),
        }
    }

    /// Queue `frame`, waiting for room; the frame comes back when the queue is closed.
    pub(super) async fn send(&self, frame: wire::Encoded) -> Result<(), wire::Encoded> {
        // The usual case first: room now, nothing to register.
        let mut frame = match self.push(frame) {
            Push::Queued => return Ok(()),
            Push::Closed(back) => return Err(back),
            Push::Full(back) => back,
        };
        loop {
            let room = self.room.notified();
            tokio::pin!(room);
            // Registered before the try, so that a frame taken in between wakes it.
            room.as_mut().enable();
            match self.push(frame) {
                Push::Queued => return Ok(()),
                Push::Closed(back) => return Err(back),
                Push::Full(back) => frame = back,
            }
            room.await;
        }
    }

    /// Queue `frame` if there is room now; the frame comes back otherwise.
    pub(super) fn try_send(&self, frame: wire::Encoded) -> Result<(), wire::Encoded> {
        match self.push(frame) {
            Push::Queued => Ok(()),
            Push::Closed(back) | Push::Full(back) => Err(back),
        }
    }

    fn push(&self, frame: wire::Encoded) -> Push {
        let mut frames = lock(&self.frames);
        if frames.closed {
            return Push::Closed(frame);
        }
        if frames.queue.len() >= self.capacity {
            return Push::Full(frame);
        }
        frames.queue.push_back(frame);
        drop(frames);
        // Stored when the writer is not waiting yet: its next wait ends at once.
        self.queued.notify_one();
        Push::Queued
    }

    /// The next frame, waiting for one; `None` once the queue is closed and empty.
    pub(super) async fn recv(&self) -> Option<wire::Encoded> {
        loop {
            if let Some(frame) = self.try_recv() {
                return Some(frame);
            }
            if lock(&self.frames).closed {
                return None;
            }
            self.queued.notified().await;
        }
    }

    /// The next frame, if one is queued.
    pub(super) fn try_recv(&self) -> Option<wire::Encoded> {
        let mut frames = lock(&self.frames);
        let was_full = frames.queue.len() >= self.capacity;
        let frame = frames.queue.pop_front()?;
        if frames.queue.is_empty() && frames.queue.capacity() > QUEUE_KEEP {
            frames.queue = VecDeque::new();
        }
        drop(frames);
        if was_full {
            self.room.notify_waiters();
        }
        Some(frame)
    }

    /// Close the queue: sending fails from now on; what is queued can still be taken.
    pub(super) fn close(&self) {
        lock(&self.frames).closed = true;
        self.queued.notify_one();
        self.room.notify_waiters();
    }
}

/// What became of a frame offered to the queue.
enum Push {
    Queued,
    Full(wire::Encoded),
    Closed(wire::Encoded),
}

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
pub(super) async fn write_loop<S: AsyncWrite>(shared: Arc<Shared>, mut io: WriteHalf<S>) {
    let rx = &shared.out;
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
        take_queued(rx, &mut batch);
        // While other requests are in flight, more frames are likely on their way from tasks
        // that are ready to run: yield once so that they join this write. One write (and one
        // wake-up of the peer) then carries many frames; a lone request does not wait.
        if batch.len() < MAX_BATCH_FRAMES && shared.in_flight() > 1 {
            tokio::task::yield_now().await;
            take_queued(rx, &mut batch);
        }
        let bytes = batch.iter().map(Bytes::len).sum();
        match write_batch(&mut io, &mut batch, &mut buf, stall).await {
            Ok(()) => shared.wrote(bytes),
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {
                warn!(parent: &shared.span, "peer is not reading; closing");
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
    while let Some(frame) = rx.try_recv() {
        batch.extend(frame.parts());
    }
    let _ = tokio::time::timeout(FINAL_FLUSH, async {
        write_batch(&mut io, &mut batch, &mut buf, FINAL_FLUSH).await?;
        io.shutdown().await
    })
    .await;
}

/// Move the parts of the frames already queued into `batch`, up to [`MAX_BATCH_FRAMES`].
fn take_queued(rx: &WriteQueue, batch: &mut Vec<Bytes>) {
    while batch.len() < MAX_BATCH_FRAMES {
        match rx.try_recv() {
            Some(frame) => batch.extend(frame.parts()),
            None => break,
        }
    }
}

/// Write a batch of frames, coalescing the small ones. Fails with `TimedOut` when the peer
/// takes nothing for `stall`: a single write or the flush makes no progress for that long. A
/// large frame that crosses a slow link slowly but steadily is not a stall.
///
/// Runs of small frames are copied together into `buf`; a large frame is not copied, and goes
/// out in the same vectored write as the small ones around it, so that a data frame's head and
/// its chunk share TLS records and system calls instead of the head taking a record of its own.
pub(super) async fn write_batch<W: AsyncWrite + Unpin>(
    io: &mut W,
    batch: &mut Vec<Bytes>,
    buf: &mut Vec<u8>,
    stall: Duration,
) -> std::io::Result<()> {
    // Segments are listed only once a large frame splits the copied runs: the usual batch,
    // small frames only, is one run and allocates no list.
    let mut segments: Vec<Segment> = Vec::new();
    let mut run_start = 0;
    for frame in batch.drain(..) {
        if frame.len() > COALESCE_LIMIT {
            if buf.len() > run_start {
                segments.push(Segment::Copied(run_start..buf.len()));
                run_start = buf.len();
            }
            segments.push(Segment::Frame(frame));
        } else {
            buf.extend_from_slice(&frame);
        }
    }
    let last = (buf.len() > run_start).then(|| Segment::Copied(run_start..buf.len()));
    let written = if segments.is_empty() {
        write_all(io, buf, last.as_slice(), stall).await
    } else {
        segments.extend(last);
        write_all(io, buf, &segments, stall).await
    };
    buf.clear();
    written?;
    tokio::time::timeout(stall, io.flush())
        .await
        .map_err(|_| std::io::ErrorKind::TimedOut)?
}

/// One part of a batch as it is written: a run of small frames copied into the batch's buffer,
/// or a large frame as it is. Never empty.
enum Segment {
    Copied(std::ops::Range<usize>),
    Frame(Bytes),
}

impl Segment {
    fn bytes<'a>(&'a self, buf: &'a [u8]) -> &'a [u8] {
        match self {
            Segment::Copied(range) => &buf[range.clone()],
            Segment::Frame(frame) => frame,
        }
    }
}

/// Slices given to one vectored write at most. A batch is rarely more than a few segments
/// (runs of small frames are one each), and the array lives in every connection's writer
/// task, idle or not: 64 slices cost 1 KiB per idle connection, measured.
const MAX_IOV: usize = 8;

/// Write every segment in order, in vectored writes, failing with `TimedOut` when one write
/// makes no progress for `stall`.
async fn write_all<W: AsyncWrite + Unpin>(
    io: &mut W,
    buf: &[u8],
    segments: &[Segment],
    stall: Duration,
) -> std::io::Result<()> {
    // The first segment not all written, and how much of it is.
    let (mut first, mut done) = (0, 0);
    while first < segments.len() {
        let mut slices = [IoSlice::new(&[]); MAX_IOV];
        let parts = segments[first..].iter().take(MAX_IOV).map(|s| s.bytes(buf));
        let mut count = 0;
        for (slice, part) in slices.iter_mut().zip(parts) {
            *slice = IoSlice::new(if count == 0 { &part[done..] } else { part });
            count += 1;
        }
        let mut n = tokio::time::timeout(stall, io.write_vectored(&slices[..count]))
            .await
            .map_err(|_| std::io::ErrorKind::TimedOut)??;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        while n > 0 && first < segments.len() {
            let left = segments[first].bytes(buf).len() - done;
            if n >= left {
                n -= left;
                first += 1;
                done = 0;
            } else {
                done += n;
                n = 0;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    fn frame(byte: u8) -> wire::Encoded {
        Bytes::from(vec![byte]).into()
    }

    fn byte(frame: wire::Encoded) -> u8 {
        frame.parts().next().unwrap()[0]
    }

    /// In order, bounded (a full queue refuses at once, and a waiting sender gets in when the
    /// writer takes a frame), drained after closing, and empty of memory once drained after a
    /// burst.
    #[tokio::test]
    async fn the_write_queue_is_ordered_bounded_and_gives_its_memory_back() {
        let queue = Arc::new(WriteQueue::new(3));
        assert_eq!(
            lock(&queue.frames).queue.capacity(),
            0,
            "nothing allocated up front"
        );
        for b in 0..3 {
            queue.try_send(frame(b)).unwrap();
        }
        assert!(queue.try_send(frame(9)).is_err(), "full");
        let waiting = tokio::spawn({
            let queue = queue.clone();
            async move { queue.send(frame(3)).await.is_ok() }
        });
        assert_eq!(byte(queue.recv().await.unwrap()), 0);
        assert!(waiting.await.unwrap(), "the waiting sender got in");
        assert_eq!(byte(queue.try_recv().unwrap()), 1);
        queue.close();
        assert!(queue.try_send(frame(8)).is_err(), "closed");
        assert!(queue.send(frame(8)).await.is_err(), "closed");
        assert_eq!(byte(queue.recv().await.unwrap()), 2);
        assert_eq!(byte(queue.recv().await.unwrap()), 3);
        assert!(queue.recv().await.is_none());

        let big = WriteQueue::new(1024);
        for _ in 0..100 {
            big.try_send(frame(1)).unwrap();
        }
        while big.try_recv().is_some() {}
        assert_eq!(
            lock(&big.frames).queue.capacity(),
            0,
            "a burst's room given back"
        );
    }

    /// A writer waiting on an empty queue wakes for the frame queued after it started to
    /// wait, and for the close.
    #[tokio::test]
    async fn a_waiting_writer_wakes_for_a_frame_and_for_the_close() {
        let queue = Arc::new(WriteQueue::new(8));
        let reader = tokio::spawn({
            let queue = queue.clone();
            async move {
                let first = queue.recv().await.map(byte);
                let end = queue.recv().await.map(byte);
                (first, end)
            }
        });
        tokio::task::yield_now().await;
        queue.send(frame(7)).await.unwrap();
        queue.close();
        assert_eq!(reader.await.unwrap(), (Some(7), None));
    }

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

    /// Small and large frames mixed go out whole and in order: the small ones coalesced, the
    /// large ones beside them in the same vectored writes.
    #[tokio::test]
    async fn a_mixed_batch_arrives_in_order() {
        let (mut ours, mut theirs) = tokio::io::duplex(4096);
        let frames: Vec<Bytes> = [20, 300 * 1024, 7, 12, 40 * 1024, 3]
            .iter()
            .enumerate()
            .map(|(i, &len)| Bytes::from(vec![i as u8 + 1; len]))
            .collect();
        let expected: Vec<u8> = frames.iter().flat_map(|f| f.iter().copied()).collect();
        let total = expected.len();
        let reader = tokio::spawn(async move {
            let mut got = vec![0u8; total];
            theirs.read_exact(&mut got).await.unwrap();
            got
        });
        let mut batch = frames;
        let mut buf = Vec::new();
        write_batch(&mut ours, &mut batch, &mut buf, Duration::from_secs(5))
            .await
            .unwrap();
        assert!(batch.is_empty() && buf.is_empty());
        assert_eq!(reader.await.unwrap(), expected);
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
