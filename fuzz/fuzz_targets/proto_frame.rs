//! Protobuf to event: arbitrary bytes decoded as a `proto::Frame`, and every kind converted as
//! a connection converts it; then a valid frame of any kind built from the same bytes, encoded
//! and decoded again.
//!
//! Properties: no panic; `decode(encode(frame)) == frame` for every frame that decodes and for
//! every frame built; `encode_parts` writes the same bytes as `encode`; an event converts to a
//! request exactly when its verb and noun are not empty, and back to the same event; a reply
//! converts back to the same reply except for an HTTP status outside 100..=599, which is
//! dropped; the HTTP response made of a reply has its status and its return code.

#![no_main]

use libfuzzer_sys::arbitrary::Unstructured;
use libfuzzer_sys::fuzz_target;
use prost::Message;
use restpipe::proto::Frame;
use restpipe_fuzz::{arbitrary_frame, check_frame};

fuzz_target!(|data: &[u8]| {
    if let Ok(frame) = Frame::decode(data) {
        check_frame(&frame);
    }
    let mut u = Unstructured::new(data);
    if let Ok(frame) = arbitrary_frame(&mut u) {
        check_frame(&frame);
    }
});
