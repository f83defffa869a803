//! Framing: how frames are laid onto a stream and read back, within a size limit.
//!
//! A frame is a 4-byte big-endian length followed by the protobuf `Frame`. The reading side
//! uses tokio-util's `LengthDelimitedCodec`, which checks the announced length against the
//! limit before it reserves any memory. The writing side encodes a frame in one buffer, or in
//! three parts when its body is large, so that a large body is never copied.

use bytes::{BufMut, Bytes, BytesMut};
use prost::Message;
use tokio::io::AsyncRead;
use tokio_util::codec::{FramedRead, LengthDelimitedCodec};

use super::proto::{self, frame::Kind, Frame};
use super::ENVELOPE_ALLOWANCE;

/// Bytes of the length prefix.
pub const PREFIX: usize = 4;

/// The initial read buffer of a connection.
const READ_BUFFER: usize = 512;

/// Encode a frame with its length prefix, in one allocation.
fn encode_whole(frame: &Frame) -> Bytes {
    let len = frame.encoded_len();
    let mut buf = BytesMut::with_capacity(PREFIX + len);
    // A frame longer than u32::MAX cannot be built: bodies are bounded far below that before
    // they get here, and the receiver's limit refuses anything near it.
    buf.put_u32(u32::try_from(len).unwrap_or(u32::MAX));
    // Encoding into a buffer with enough capacity cannot fail.
    let _ = frame.encode(&mut buf);
    buf.freeze()
}

/// Bodies larger than this are not copied into their frame: they are handed to the writer as
/// a part of their own.
pub const SPLIT_BODY: usize = 16 * 1024;

/// An encoded frame, prefix included, as the writer takes it: whole, or in three parts that
/// are written in order (the head, a large body as it is, not copied, and the fields after
/// the body). Small, so that a connection's write queue stays small.
#[derive(Clone, Debug)]
pub enum Encoded {
    /// The whole frame in one buffer.
    Whole(Bytes),
    /// Head, body, tail.
    Split(Box<[Bytes; 3]>),
}

impl Encoded {
    /// The frame's length on the wire, prefix included.
    pub fn len(&self) -> usize {
        match self {
            Encoded::Whole(b) => b.len(),
            Encoded::Split(parts) => parts.iter().map(Bytes::len).sum(),
        }
    }

    /// Whether it holds no byte at all.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The non-empty parts, in order.
    pub fn parts(self) -> impl Iterator<Item = Bytes> {
        let parts = match self {
            Encoded::Whole(b) => [b, Bytes::new(), Bytes::new()],
            Encoded::Split(parts) => *parts,
        };
        parts.into_iter().filter(|p| !p.is_empty())
    }
}

impl From<Bytes> for Encoded {
    fn from(whole: Bytes) -> Self {
        Encoded::Whole(whole)
    }
}

/// Encode a frame with its length prefix. An event's or a reply's body over [`SPLIT_BODY`] is
/// not copied: it becomes the middle part of the result. The three parts written in order are
/// byte for byte the frame's plain encoding.
pub(super) fn encode_frame(mut frame: Frame) -> Encoded {
    use prost::encoding::{encode_key, encode_varint, encoded_len_varint, WireType};
    // The body's field number, and the encoding of the fields that follow it (the messages
    // declare their fields in tag order, and prost writes them in that order).
    let (kind_tag, body_tag, body, mut inner, tail) = match &mut frame.kind {
        Some(Kind::Event(e)) if e.body.len() > SPLIT_BODY => {
            // Every field numbered after the body (6).
            let tail = proto::Event {
                timeout_ms: e.timeout_ms,
                traceparent: e.traceparent.clone(),
                request_id: e.request_id.clone(),
                streamed: e.streamed,
                headers: e.headers.clone(),
                content_length: e.content_length,
                delivery_id: e.delivery_id.clone(),
                ..Default::default()
            }
            .encode_to_vec();
            (3, 6, std::mem::take(&mut e.body), e.encode_to_vec(), tail)
        }
        Some(Kind::Reply(r)) if r.body.len() > SPLIT_BODY => {
            let tail = proto::Reply {
                http_status: r.http_status,
                streamed: r.streamed,
                headers: r.headers.clone(),
                content_length: r.content_length,
                ..Default::default()
            }
            .encode_to_vec();
            (4, 3, std::mem::take(&mut r.body), r.encode_to_vec(), tail)
        }
        Some(Kind::Data(d)) if d.chunk.len() > SPLIT_BODY => {
            let tail = proto::Data {
                from_caller: d.from_caller,
                end: d.end,
                abort: d.abort.clone(),
                ..Default::default()
            }
            .encode_to_vec();
            (9, 1, std::mem::take(&mut d.chunk), d.encode_to_vec(), tail)
        }
        _ => return encode_whole(&frame).into(),
    };
    // `inner` is the message without its body: the fields before the body, then `tail`.
    inner.truncate(inner.len() - tail.len());
    let body_key = encoded_len_varint(u64::from(body_tag) << 3);
    let inner_len =
        inner.len() + body_key + encoded_len_varint(body.len() as u64) + body.len() + tail.len();
    let id = Frame {
        id: frame.id,
        kind: None,
    };
    let payload = id.encoded_len()
        + encoded_len_varint(u64::from(kind_tag) << 3)
        + encoded_len_varint(inner_len as u64)
        + inner_len;
    let mut head = BytesMut::with_capacity(PREFIX + payload - body.len() - tail.len());
    head.put_u32(u32::try_from(payload).unwrap_or(u32::MAX));
    // Encoding into a buffer with enough capacity cannot fail.
    let _ = id.encode(&mut head);
    encode_key(kind_tag, WireType::LengthDelimited, &mut head);
    encode_varint(inner_len as u64, &mut head);
    head.extend_from_slice(&inner);
    encode_key(body_tag, WireType::LengthDelimited, &mut head);
    encode_varint(body.len() as u64, &mut head);
    Encoded::Split(Box::new([head.freeze(), body, tail.into()]))
}

/// A stream of raw frames (without prefix) read from `io`, refusing any frame whose announced
/// length exceeds `max_frame + ENVELOPE_ALLOWANCE` before allocating it.
pub fn frame_reader<R: AsyncRead>(io: R, max_frame: usize) -> FramedRead<R, LengthDelimitedCodec> {
    let codec = codec(max_frame.saturating_add(ENVELOPE_ALLOWANCE));
    // Small: an idle connection reads only heartbeats, and a busy one grows the buffer to
    // what its frames need (the codec reserves a frame's announced length). Every byte here
    // is paid once per idle connection.
    FramedRead::with_capacity(io, codec, READ_BUFFER)
}

/// The codec [`frame_reader`] reads with: a 4-byte big-endian length prefix, and a frame
/// announced longer than `limit` bytes (prefix excluded) refused with `InvalidData` before any
/// memory is reserved for it. Public so that the fuzz targets in `fuzz/` drive this exact
/// configuration, with a small `limit`.
pub fn codec(limit: usize) -> LengthDelimitedCodec {
    LengthDelimitedCodec::builder()
        .length_field_length(PREFIX)
        .max_frame_length(limit)
        .new_codec()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use futures_util::StreamExt;

    fn frame(id: u64, kind: Kind) -> Frame {
        Frame {
            id,
            kind: Some(kind),
        }
    }

    #[tokio::test]
    async fn round_trip_and_limit() {
        let f = frame(7, Kind::Ping(proto::Ping { nonce: 42 }));
        let mut bytes = encode_whole(&f).to_vec();
        // A second frame that announces more than the limit.
        bytes.extend_from_slice(&(u32::MAX).to_be_bytes());
        let mut reader = FramedRead::new(&bytes[..], codec(1024));
        let first = reader.next().await.unwrap().unwrap();
        assert_eq!(Frame::decode(first.freeze()).unwrap(), f);
        let err = reader.next().await.unwrap().unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::InvalidData);
    }

    #[test]
    fn split_encoding_is_the_same_bytes() {
        let body = Bytes::from((0..100_000u32).map(|i| i as u8).collect::<Vec<u8>>());
        let event = |timeout_ms| {
            Kind::Event(proto::Event {
                verb: "POST".into(),
                noun: "jobs".into(),
                parameters: vec!["a".into(), "b c".into()],
                query: "x=1".into(),
                content_type: "application/octet-stream".into(),
                body: body.clone(),
                timeout_ms,
                traceparent: "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into(),
                request_id: "r-1".into(),
                streamed: false,
                headers: vec![proto::Header {
                    name: "range".into(),
                    value: "bytes=0-1".into(),
                }],
                content_length: Some(3),
                delivery_id: "00000000000000010123456789abcdef".into(),
            })
        };
        let reply = |http_status| {
            Kind::Reply(proto::Reply {
                content_type: "text/csv".into(),
                code: 0,
                body: body.clone(),
                http_status,
                streamed: false,
                headers: vec![proto::Header {
                    name: "etag".into(),
                    value: "\"x\"".into(),
                }],
                content_length: None,
            })
        };
        let data = |end| {
            Kind::Data(proto::Data {
                chunk: body.clone(),
                from_caller: true,
                end,
                abort: "gone".into(),
            })
        };
        for f in [
            frame(7, event(30_000)),
            frame(0, event(0)),
            frame(u64::MAX, reply(201)),
            frame(1, reply(0)),
            frame(3, Kind::Ping(proto::Ping { nonce: 9 })),
            frame(5, data(true)),
            frame(6, data(false)),
        ] {
            let whole = encode_whole(&f);
            let parts = encode_frame(f.clone());
            assert_eq!(parts.len(), whole.len());
            let joined: Vec<u8> = parts.parts().flat_map(|p| p.to_vec()).collect();
            assert_eq!(joined, whole.to_vec());
        }
        // The large body is shared, not copied.
        let parts: Vec<Bytes> = encode_frame(frame(1, reply(0))).parts().collect();
        assert_eq!(parts[1].as_ptr(), body.as_ptr());
        // A write queue slot is no larger than a `Bytes` and a tag.
        assert!(std::mem::size_of::<Encoded>() <= 40);
    }
}
