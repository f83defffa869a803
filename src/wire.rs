//! Framing: how frames are encoded onto a stream and read back, within a size limit.
//!
//! A frame is a 4-byte big-endian length followed by the protobuf [`Frame`]. The reading side
//! uses tokio-util's `LengthDelimitedCodec`, which checks the announced length against the
//! limit before it reserves any memory. Conversions between the wire types and the handler
//! API's [`Request`] and [`Reply`] live here, so that the rest of the crate sees domain types.

use bytes::{BufMut, Bytes, BytesMut};
use prost::Message;
use restpipe_handler::{Reply, Request};
use tokio::io::AsyncRead;
use tokio_util::codec::{FramedRead, LengthDelimitedCodec};

use crate::proto::{self, frame::Kind, Frame};

/// The version of the wire protocol this build speaks. A peer with another one is refused.
pub const PROTOCOL_VERSION: u32 = 1;

/// The default limit on an event's or a reply's body: 16 MiB.
pub const DEFAULT_MAX_FRAME: usize = 16 * 1024 * 1024;

/// Room allowed on top of the body limit for the rest of a frame (verb, noun, parameters,
/// query, content type), so that a body of exactly the limit still fits.
pub const ENVELOPE_ALLOWANCE: usize = 64 * 1024;

/// Bytes of the length prefix.
const PREFIX: usize = 4;

/// Encode a frame with its length prefix, in one allocation.
pub fn encode(frame: &Frame) -> Bytes {
    let len = frame.encoded_len();
    let mut buf = BytesMut::with_capacity(PREFIX + len);
    // A frame longer than u32::MAX cannot be built: bodies are bounded far below that before
    // they get here, and the receiver's limit refuses anything near it.
    buf.put_u32(u32::try_from(len).unwrap_or(u32::MAX));
    // Encoding into a buffer with enough capacity cannot fail.
    let _ = frame.encode(&mut buf);
    buf.freeze()
}

/// The size on the wire of an encoded frame without its prefix.
pub fn payload_len(encoded: &Bytes) -> usize {
    encoded.len().saturating_sub(PREFIX)
}

/// A stream of raw frames (without prefix) read from `io`, refusing any frame whose announced
/// length exceeds `max_frame + ENVELOPE_ALLOWANCE` before allocating it.
pub fn frame_reader<R: AsyncRead>(io: R, max_frame: usize) -> FramedRead<R, LengthDelimitedCodec> {
    let codec = LengthDelimitedCodec::builder()
        .length_field_length(PREFIX)
        .max_frame_length(max_frame.saturating_add(ENVELOPE_ALLOWANCE))
        .new_codec();
    FramedRead::with_capacity(io, codec, 2048)
}

/// Decode one frame's payload.
pub fn decode(payload: Bytes) -> Result<Frame, prost::DecodeError> {
    Frame::decode(payload)
}

/// A frame of `kind` with request id `id`.
pub fn frame(id: u64, kind: Kind) -> Frame {
    Frame {
        id,
        kind: Some(kind),
    }
}

/// The wire event for a request, with the caller's timeout.
pub fn event_from_request(request: Request, timeout_ms: u64) -> proto::Event {
    proto::Event {
        verb: request.verb,
        noun: request.noun,
        parameters: request.parameters,
        query: request.query,
        content_type: request.content_type,
        body: request.body,
        timeout_ms,
    }
}

/// The request a wire event carries, or why it is not one.
pub fn request_from_event(event: proto::Event) -> Result<(Request, u64), &'static str> {
    if event.verb.is_empty() || event.noun.is_empty() {
        return Err("event without a verb or a noun");
    }
    let timeout_ms = event.timeout_ms;
    Ok((
        Request {
            verb: event.verb,
            noun: event.noun,
            parameters: event.parameters,
            query: event.query,
            content_type: event.content_type,
            body: event.body,
        },
        timeout_ms,
    ))
}

/// The wire reply for a handler's reply.
pub fn reply_to_wire(reply: Reply) -> proto::Reply {
    proto::Reply {
        content_type: reply.content_type,
        code: reply.code,
        body: reply.body,
        http_status: reply.status.map(u32::from).unwrap_or(0),
    }
}

/// The handler's reply that a wire reply carries. An HTTP status outside 100..=599 is dropped.
pub fn reply_from_wire(reply: proto::Reply) -> Reply {
    let status = u16::try_from(reply.http_status)
        .ok()
        .filter(|s| (100..=599).contains(s));
    Reply {
        content_type: reply.content_type,
        code: reply.code,
        body: reply.body,
        status,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::StreamExt;

    #[tokio::test]
    async fn round_trip_and_limit() {
        let f = frame(7, Kind::Ping(proto::Ping { nonce: 42 }));
        let mut bytes = encode(&f).to_vec();
        // A second frame that announces more than the limit.
        bytes.extend_from_slice(&(u32::MAX).to_be_bytes());
        let mut reader = frame_reader(&bytes[..], 1024);
        let first = reader.next().await.unwrap().unwrap();
        assert_eq!(decode(first.freeze()).unwrap(), f);
        let err = reader.next().await.unwrap().unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::InvalidData);
    }

    #[test]
    fn bad_status_is_dropped() {
        let r = reply_from_wire(proto::Reply {
            http_status: 70000,
            ..Default::default()
        });
        assert_eq!(r.status, None);
    }
}
