//! Arbitrary bytes as they would arrive on a connection, through restpipe's frame reading:
//! the length-delimited codec of `wire::codec` with a small limit (fed in chunks, straight to
//! `Decoder::decode`), and the reader of `wire::frame_reader` that connections use (polled by
//! hand: no runtime). Each frame then goes through `wire::decode`, with its checks, and what
//! decoded is checked as `check_message` says.
//!
//! Properties: no panic; no frame longer than the limit is returned; a frame announced longer
//! than the limit is refused with `InvalidData`, and nothing is reserved for it; no single
//! allocation is larger than the limit plus what was actually received (times two for buffer
//! growth), whatever length a prefix announces.
//!
//! Input: byte 0 picks the limit (x4, so 0..=1020 bytes), byte 1 the read size (1..=128) and,
//! in its top bit, whether every other read is `Pending`; the rest is the stream.

#![no_main]

use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use bytes::BytesMut;
use futures_util::Stream;
use libfuzzer_sys::fuzz_target;
use restpipe::wire;
use restpipe_fuzz::{check_payload, largest_allocation};
use tokio::io::{AsyncRead, ReadBuf};
use tokio_util::codec::Decoder;

const PREFIX: usize = 4;

fuzz_target!(|data: &[u8]| {
    let [limit, read, stream @ ..] = data else {
        return;
    };
    let limit = usize::from(*limit) * 4;
    let chunk = usize::from(read & 0x7f) + 1;
    let pending = read & 0x80 != 0;
    codec_in_chunks(stream, limit, chunk);
    frame_reader(stream, chunk, pending);
});

/// The largest single allocation allowed while decoding: the limit plus what was received,
/// doubled for the buffer's growth. A length prefix alone can never push past it.
fn bound(limit: usize, received: usize) -> usize {
    2 * (limit + PREFIX + received) + 64
}

fn codec_in_chunks(stream: &[u8], limit: usize, chunk: usize) {
    let mut codec = wire::codec(limit);
    let mut buf = BytesMut::new();
    let mut received = 0;
    // Whether the codec waits for a length prefix, and the length the current frame announced.
    let mut at_head = true;
    let mut announced = 0usize;
    for piece in stream.chunks(chunk) {
        buf.extend_from_slice(piece);
        received += piece.len();
        loop {
            let reads_head = at_head && buf.len() >= PREFIX;
            if reads_head {
                announced = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
            }
            let (result, peak) = largest_allocation(|| codec.decode(&mut buf));
            assert!(
                peak <= bound(limit, received),
                "allocated {peak} bytes at once with a limit of {limit} after {received} bytes"
            );
            match result {
                Ok(Some(frame)) => {
                    assert!(frame.len() <= limit, "a frame over the limit was returned");
                    assert_eq!(frame.len(), announced, "the frame is as long as announced");
                    at_head = true;
                    check_payload(frame.freeze());
                }
                Ok(None) => {
                    assert!(
                        !(reads_head && announced > limit),
                        "an oversized frame was not refused"
                    );
                    if reads_head {
                        at_head = false;
                    }
                    break;
                }
                Err(e) => {
                    assert!(
                        reads_head && announced > limit,
                        "refused a frame within the limit: {e}"
                    );
                    assert_eq!(e.kind(), std::io::ErrorKind::InvalidData);
                    assert!(peak < 1024, "{peak} bytes allocated to refuse a frame");
                    // The connection closes here.
                    return;
                }
            }
        }
    }
    // End of stream: a partial frame is an error, never a panic.
    let _ = codec.decode_eof(&mut buf);
}

/// A reader that hands out `chunk` bytes at a time, and `Pending` every other time if asked.
struct Chunks<'a> {
    data: &'a [u8],
    chunk: usize,
    pending: bool,
    skip: bool,
}

impl AsyncRead for Chunks<'_> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if self.pending {
            self.skip = !self.skip;
            if self.skip {
                return Poll::Pending;
            }
        }
        let n = self.chunk.min(self.data.len()).min(buf.remaining());
        let (now, later) = self.data.split_at(n);
        buf.put_slice(now);
        self.data = later;
        Poll::Ready(Ok(()))
    }
}

/// The reader connections use, with the smallest frame limit it allows.
fn frame_reader(stream: &[u8], chunk: usize, pending: bool) {
    let io = Chunks {
        data: stream,
        chunk,
        pending,
        skip: false,
    };
    let limit = wire::ENVELOPE_ALLOWANCE;
    let mut reader = wire::frame_reader(io, 0);
    let mut cx = Context::from_waker(Waker::noop());
    loop {
        let (poll, peak) = largest_allocation(|| Pin::new(&mut reader).poll_next(&mut cx));
        assert!(
            peak <= bound(limit, stream.len()),
            "allocated {peak} bytes at once with a limit of {limit}"
        );
        match poll {
            Poll::Pending => continue,
            Poll::Ready(Some(Ok(frame))) => {
                assert!(frame.len() <= limit);
                check_payload(frame.freeze());
            }
            Poll::Ready(Some(Err(_)) | None) => return,
        }
    }
}
