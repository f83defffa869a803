//! What the fuzz targets in `fuzz_targets/` share: an allocator that records the largest
//! single allocation, and the checks every decoded frame goes through (docs/FUZZING.md).

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use bytes::Bytes;
use libfuzzer_sys::arbitrary::{self, Unstructured};
use restpipe::proto::{self, frame::Kind, Frame};
use restpipe::wire;

/// The system allocator, recording the largest single allocation made while armed.
pub struct Tracking;

static ARMED: AtomicBool = AtomicBool::new(false);
static PEAK: AtomicUsize = AtomicUsize::new(0);

fn note(size: usize) {
    if ARMED.load(Ordering::Relaxed) {
        PEAK.fetch_max(size, Ordering::Relaxed);
    }
}

// SAFETY: every call is forwarded unchanged to the system allocator; only sizes are noted.
unsafe impl GlobalAlloc for Tracking {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        System.alloc(layout)
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        System.alloc_zeroed(layout)
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size);
        System.realloc(ptr, layout, new_size)
    }
}

#[global_allocator]
static ALLOCATOR: Tracking = Tracking;

/// Run `f` and return its result with the size of the largest single allocation it made.
/// (The targets are single-threaded: nothing else allocates meanwhile.)
pub fn largest_allocation<T>(f: impl FnOnce() -> T) -> (T, usize) {
    PEAK.store(0, Ordering::Relaxed);
    ARMED.store(true, Ordering::Relaxed);
    let out = f();
    ARMED.store(false, Ordering::Relaxed);
    (out, PEAK.load(Ordering::Relaxed))
}

/// Check a frame that decoded: it re-encodes (whole and in parts) to bytes that decode to the
/// same frame, and its kind converts the way `connection::on_frame` converts it, without a
/// panic and with the documented results.
pub fn check_frame(frame: &Frame) {
    let encoded = wire::encode(frame);
    let announced = u32::from_be_bytes([encoded[0], encoded[1], encoded[2], encoded[3]]);
    assert_eq!(
        announced as usize,
        encoded.len() - 4,
        "prefix is the payload length"
    );
    assert_eq!(wire::payload_len(&encoded), encoded.len() - 4);
    let again = wire::decode(encoded.slice(4..)).expect("a re-encoded frame decodes");
    assert_eq!(&again, frame, "decode(encode(frame)) == frame");
    let parts: Vec<u8> = wire::encode_parts(frame.clone())
        .parts()
        .flat_map(|p| p.to_vec())
        .collect();
    assert_eq!(
        &parts[..],
        &encoded[..],
        "encode_parts gives the bytes of encode"
    );

    match &frame.kind {
        Some(Kind::Event(event)) => match wire::request_from_event(event.clone()) {
            Ok((request, timeout_ms)) => {
                assert!(!event.verb.is_empty() && !event.noun.is_empty());
                assert_eq!(timeout_ms, event.timeout_ms);
                let _ = request.handler_name();
                let _ = request.query_pairs();
                let _ = request.is_json();
                assert_eq!(&wire::event_from_request(request, timeout_ms), event);
            }
            Err(_) => assert!(event.verb.is_empty() || event.noun.is_empty()),
        },
        Some(Kind::Reply(reply)) => {
            let domain = wire::reply_from_wire(reply.clone());
            let in_range = (100..=599).contains(&reply.http_status);
            assert_eq!(
                domain.status.map(u32::from),
                in_range.then_some(reply.http_status)
            );
            let back = wire::reply_to_wire(domain.clone());
            let expected = proto::Reply {
                http_status: if in_range { reply.http_status } else { 0 },
                ..reply.clone()
            };
            assert_eq!(
                back, expected,
                "reply_to_wire(reply_from_wire(r)) keeps all but a bad status"
            );
            // The HTTP response the front door makes of it.
            let response = restpipe::http::reply_response(domain.clone());
            if let Some(status) = domain.status {
                assert_eq!(response.status().as_u16(), status);
            }
            let code = response
                .headers()
                .get(restpipe::http::RETURN_CODE_HEADER)
                .expect("the return code header is set");
            assert_eq!(code.to_str().ok(), Some(reply.code.to_string().as_str()));
        }
        Some(Kind::Error(err)) => {
            let _ = proto::error::Kind::try_from(err.kind);
        }
        Some(Kind::Hello(hello)) => {
            let _ = proto::Role::try_from(hello.role);
            let _ = usize::try_from(hello.max_frame_bytes)
                .unwrap_or(usize::MAX)
                .max(1024);
        }
        Some(Kind::Ping(_) | Kind::Pong(_) | Kind::Close(_)) | None => {}
    }
}

/// Decode a payload as the connection does and check what decoded.
pub fn check_payload(payload: Bytes) {
    if let Ok(frame) = wire::decode(payload) {
        check_frame(&frame);
    }
}

/// A body: usually a few arbitrary bytes, sometimes a large one around
/// [`wire::SPLIT_BODY`], where [`wire::encode_parts`] starts to split.
fn body(u: &mut Unstructured) -> arbitrary::Result<Bytes> {
    if u.ratio(1, 8)? {
        let len = u.int_in_range(wire::SPLIT_BODY - 2..=wire::SPLIT_BODY * 3)?;
        let seed: u8 = u.arbitrary()?;
        Ok((0..len)
            .map(|i| (i as u8).wrapping_mul(31) ^ seed)
            .collect::<Vec<u8>>()
            .into())
    } else {
        Ok(Bytes::from(u.arbitrary::<Vec<u8>>()?))
    }
}

/// An arbitrary valid frame of any kind, built field by field.
pub fn arbitrary_frame(u: &mut Unstructured) -> arbitrary::Result<Frame> {
    let id = u.arbitrary()?;
    let kind = match u.int_in_range(0..=7u8)? {
        0 => None,
        1 => Some(Kind::Hello(proto::Hello {
            protocol_version: u.arbitrary()?,
            role: u.arbitrary()?,
            software_version: u.arbitrary()?,
            identity: u.arbitrary()?,
            max_frame_bytes: u.arbitrary()?,
        })),
        2 => Some(Kind::Event(proto::Event {
            verb: u.arbitrary()?,
            noun: u.arbitrary()?,
            parameters: u.arbitrary()?,
            query: u.arbitrary()?,
            content_type: u.arbitrary()?,
            body: body(u)?,
            timeout_ms: u.arbitrary()?,
        })),
        3 => Some(Kind::Reply(proto::Reply {
            content_type: u.arbitrary()?,
            code: u.arbitrary()?,
            body: body(u)?,
            http_status: u.arbitrary()?,
        })),
        4 => Some(Kind::Ping(proto::Ping {
            nonce: u.arbitrary()?,
        })),
        5 => Some(Kind::Pong(proto::Pong {
            nonce: u.arbitrary()?,
        })),
        6 => Some(Kind::Error(proto::Error {
            kind: u.arbitrary()?,
            message: u.arbitrary()?,
        })),
        _ => Some(Kind::Close(proto::Close {
            reason: u.arbitrary()?,
        })),
    };
    Ok(Frame { id, kind })
}
