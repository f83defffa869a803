//! What the fuzz targets in `fuzz_targets/` share: an allocator that records the largest
//! single allocation, and the checks every decoded message goes through (docs/FUZZING.md).

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use bytes::Bytes;
use libfuzzer_sys::arbitrary::{self, Unstructured};
use restpipe::wire::{self, DataEnd, ErrorKind, Hello, Message, Streamed};
use restpipe_handler::{Reply, Request, Side};

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

/// Check a message that decoded: it re-encodes (in one buffer or in parts) to bytes whose
/// prefix is their length and that decode to the same message, and what the node does with
/// it (the handler name, the query, the HTTP response of a reply) runs without a panic and
/// with the documented results.
pub fn check_message(message: &Message) {
    let encoded: Vec<u8> = wire::encode(copy(message))
        .parts()
        .flat_map(|p| p.to_vec())
        .collect();
    let announced = u32::from_be_bytes([encoded[0], encoded[1], encoded[2], encoded[3]]);
    assert_eq!(
        announced as usize,
        encoded.len() - wire::PREFIX,
        "prefix is the payload length"
    );
    let again = wire::decode(Bytes::from(encoded).slice(wire::PREFIX..))
        .expect("a re-encoded message decodes");
    assert_eq!(&again, message, "decode(encode(message)) == message");

    match message {
        Message::Event { id, request, .. } => {
            assert_ne!(*id, 0, "an event with id 0 never decodes");
            assert!(
                wire::check_request(request).is_ok(),
                "a decoded event obeys the grammar"
            );
            let _ = request.handler_name();
            let _ = request.query_pairs();
            let _ = request.is_json();
        }
        Message::Reply { reply, .. } => {
            if let Some(status) = reply.status {
                assert!(
                    (100..=599).contains(&status),
                    "a decoded status is in range"
                );
            }
            assert!(reply.content_type.len() <= wire::limits::CONTENT_TYPE);
            // The HTTP response the front door makes of it.
            let response = restpipe::http::reply_response(copy_reply(reply));
            if let Some(status) = reply.status {
                assert_eq!(response.status().as_u16(), status);
            }
            let code = response
                .headers()
                .get(restpipe::http::RETURN_CODE_HEADER)
                .expect("the return code header is set");
            assert_eq!(code.to_str().ok(), Some(reply.code.to_string().as_str()));
        }
        Message::Hello(hello) => {
            assert!(hello.versions.start() <= hello.versions.end());
            assert!(hello.software_version.len() <= wire::limits::SOFTWARE_VERSION);
            assert!(hello.identity.len() <= wire::limits::IDENTITY);
        }
        Message::Error { message, .. } | Message::Close(message) => {
            assert!(message.len() <= wire::limits::MESSAGE);
        }
        Message::Data { id, end, .. } => {
            assert_ne!(*id, 0, "data with id 0 never decodes");
            if let DataEnd::Aborted(why) = end {
                assert!(!why.is_empty() && why.len() <= wire::limits::MESSAGE);
            }
        }
        Message::Cancel { id, .. } => assert_ne!(*id, 0, "a cancel with id 0 never decodes"),
        Message::Credit { .. } | Message::Ping(_) | Message::Pong(_) | Message::Unknown { .. } => {}
        Message::Subscribe {
            globs,
            resume_after,
        } => {
            assert!(wire::check_subscription(globs, resume_after).is_ok());
        }
        Message::Publish { id, event } => {
            assert!(wire::check_published(event).is_ok());
            assert_eq!(*id == 0, !event.id.is_empty(), "a request has no event id");
        }
    }
}

/// Decode a payload as the connection does and check what decoded.
pub fn check_payload(payload: Bytes) {
    if let Ok(message) = wire::decode(payload) {
        check_message(&message);
    }
}

/// Check a message built by [`arbitrary_message`]: it decodes back to itself exactly when it
/// obeys the protocol's rules, and is refused as invalid, with its id, when it breaks one.
pub fn check_built(message: &Message) {
    let encoded: Vec<u8> = wire::encode(copy(message))
        .parts()
        .flat_map(|p| p.to_vec())
        .collect();
    match wire::decode(Bytes::from(encoded).slice(wire::PREFIX..)) {
        Ok(again) => check_message(&again),
        Err(wire::DecodeError::Invalid { id, .. }) => {
            let expected = match message {
                Message::Event { id, .. }
                | Message::Reply { id, .. }
                | Message::Error { id, .. }
                | Message::Data { id, .. }
                | Message::Cancel { id, .. }
                | Message::Publish { id, .. } => *id,
                _ => 0,
            };
            assert_eq!(id, expected, "an invalid frame names its own id");
            if let Message::Event { id, request, .. } = message {
                assert!(
                    *id == 0 || wire::check_request(request).is_err(),
                    "only a rule breaker is refused"
                );
            }
        }
        Err(e) => panic!("a message this node encoded is malformed: {e}"),
    }
}

/// A body: usually a few arbitrary bytes, sometimes a large one around
/// [`wire::SPLIT_BODY`], where encoding starts to split.
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

/// A verb: usually one of the list, sometimes anything.
fn verb(u: &mut Unstructured) -> arbitrary::Result<String> {
    if u.ratio(1, 8)? {
        u.arbitrary()
    } else {
        Ok(u.choose(&restpipe_handler::grammar::VERBS)?.to_string())
    }
}

/// An arbitrary message of any kind, built field by field; it may break the rules.
pub fn arbitrary_message(u: &mut Unstructured) -> arbitrary::Result<Message> {
    Ok(match u.int_in_range(0..=12u8)? {
        0 => Message::Unknown { id: u.arbitrary()? },
        1 => {
            let a: u32 = u.arbitrary()?;
            let b: u32 = u.arbitrary()?;
            Message::Hello(Hello {
                versions: a.min(b).max(1)..=a.max(b).max(1),
                role: if u.arbitrary()? {
                    Side::Server
                } else {
                    Side::Client
                },
                software_version: u.arbitrary()?,
                identity: u.arbitrary()?,
                max_frame_bytes: u.arbitrary()?,
                features: u.arbitrary()?,
            })
        }
        2 => {
            let mut request = Request::new(verb(u)?, u.arbitrary::<String>()?);
            request.parameters = u.arbitrary()?;
            request.query = u.arbitrary()?;
            request.content_type = u.arbitrary()?;
            request.body = body(u)?;
            if u.arbitrary()? {
                let name = *u.choose(&restpipe_handler::headers::ALLOWED)?;
                request.headers = request.headers.with(name, u.arbitrary::<String>()?);
            }
            Message::Event {
                id: u.arbitrary()?,
                request,
                timeout_ms: u.arbitrary()?,
                streamed: stream_head(u)?,
            }
        }
        3 => {
            let status: u16 = u.arbitrary()?;
            let mut reply =
                Reply::bytes(u.arbitrary::<String>()?, body(u)?).with_code(u.arbitrary()?);
            reply.status = (100..=599).contains(&status).then_some(status);
            Message::Reply {
                id: u.arbitrary()?,
                reply,
                streamed: stream_head(u)?,
            }
        }
        4 => Message::Ping(u.arbitrary()?),
        5 => Message::Pong(u.arbitrary()?),
        6 => Message::Error {
            id: u.arbitrary()?,
            kind: *u.choose(&[
                ErrorKind::UnknownMessage,
                ErrorKind::Overloaded,
                ErrorKind::BadRequest,
                ErrorKind::ShuttingDown,
                ErrorKind::Other,
            ])?,
            message: u.arbitrary()?,
        },
        8 => Message::Data {
            id: u.arbitrary()?,
            from_caller: u.arbitrary()?,
            chunk: body(u)?,
            end: match u.int_in_range(0..=2u8)? {
                0 => DataEnd::More,
                1 => DataEnd::Done,
                _ => DataEnd::Aborted(u.arbitrary()?),
            },
        },
        9 => Message::Credit {
            id: u.arbitrary()?,
            from_caller: u.arbitrary()?,
            bytes: u.arbitrary()?,
        },
        10 => Message::Cancel {
            id: u.arbitrary()?,
            from_caller: u.arbitrary()?,
        },
        11 => Message::Subscribe {
            globs: u.arbitrary()?,
            resume_after: u.arbitrary()?,
        },
        12 => Message::Publish {
            id: u.arbitrary()?,
            event: wire::Published {
                topic: u.arbitrary()?,
                content_type: u.arbitrary()?,
                body: body(u)?,
                id: u.arbitrary()?,
                published_ms: u.arbitrary()?,
            },
        },
        _ => Message::Close(u.arbitrary()?),
    })
}

/// Whether a built event or reply announces a streamed body, and its length.
fn stream_head(u: &mut Unstructured) -> arbitrary::Result<Option<Streamed>> {
    Ok(if u.arbitrary()? {
        Some(Streamed {
            length: u.arbitrary()?,
        })
    } else {
        None
    })
}

/// A copy of a reply as the wire carries it (a decoded reply never holds a stream).
fn copy_reply(reply: &Reply) -> Reply {
    Reply {
        content_type: reply.content_type.clone(),
        code: reply.code,
        body: reply.body.clone(),
        status: reply.status,
        headers: reply.headers.clone(),
        stream: None,
    }
}

/// A copy of a message (messages are not `Clone`: a reply may hold a stream, which a message
/// from the wire never does).
fn copy(message: &Message) -> Message {
    match message {
        Message::Hello(h) => Message::Hello(h.clone()),
        Message::Event {
            id,
            request,
            timeout_ms,
            streamed,
        } => Message::Event {
            id: *id,
            request: request.clone(),
            timeout_ms: *timeout_ms,
            streamed: *streamed,
        },
        Message::Reply {
            id,
            reply,
            streamed,
        } => Message::Reply {
            id: *id,
            reply: copy_reply(reply),
            streamed: *streamed,
        },
        Message::Data {
            id,
            from_caller,
            chunk,
            end,
        } => Message::Data {
            id: *id,
            from_caller: *from_caller,
            chunk: chunk.clone(),
            end: end.clone(),
        },
        Message::Credit {
            id,
            from_caller,
            bytes,
        } => Message::Credit {
            id: *id,
            from_caller: *from_caller,
            bytes: *bytes,
        },
        Message::Cancel { id, from_caller } => Message::Cancel {
            id: *id,
            from_caller: *from_caller,
        },
        Message::Error { id, kind, message } => Message::Error {
            id: *id,
            kind: *kind,
            message: message.clone(),
        },
        Message::Ping(n) => Message::Ping(*n),
        Message::Pong(n) => Message::Pong(*n),
        Message::Close(reason) => Message::Close(reason.clone()),
        Message::Unknown { id } => Message::Unknown { id: *id },
        Message::Subscribe {
            globs,
            resume_after,
        } => Message::Subscribe {
            globs: globs.clone(),
            resume_after: resume_after.clone(),
        },
        Message::Publish { id, event } => Message::Publish {
            id: *id,
            event: event.clone(),
        },
    }
}
