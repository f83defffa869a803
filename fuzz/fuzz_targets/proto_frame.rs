//! Protobuf to message: arbitrary bytes decoded as the connection decodes a frame's payload,
//! then an arbitrary message of any kind, built from the same bytes, encoded and decoded
//! again.
//!
//! Properties: no panic; `decode(encode(m)) == m` for every message that decodes; a decoded
//! event obeys the grammar and a decoded reply's status is in 100..=599; a built message
//! decodes back to itself exactly when it obeys the rules, and is otherwise refused as invalid
//! with its own id; the HTTP response made of a reply has its status and its return code.

#![no_main]

use bytes::Bytes;
use libfuzzer_sys::arbitrary::Unstructured;
use libfuzzer_sys::fuzz_target;
use restpipe_fuzz::{arbitrary_message, check_built, check_payload};

fuzz_target!(|data: &[u8]| {
    check_payload(Bytes::copy_from_slice(data));
    let mut u = Unstructured::new(data);
    if let Ok(message) = arbitrary_message(&mut u) {
        check_built(&message);
    }
});
