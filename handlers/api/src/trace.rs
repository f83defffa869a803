//! Trace context: the W3C `traceparent` and the request id that follow one request across the
//! pipe, so that its log lines on both nodes (and an upstream's, through `forward`) can be
//! found from one another.
//!
//! A `traceparent` is `00-<trace id: 32 hex>-<parent id: 16 hex>-<flags: 2 hex>`, lower case,
//! neither id all zeros (W3C Trace Context, level 1). The request id is what the front door
//! answers in `X-Request-Id`: the caller's own, when it sent a usable one, else the trace id.

use std::fmt;

/// The longest request id carried, in bytes.
pub const MAX_REQUEST_ID: usize = 128;

/// The trace context of one request.
///
/// It holds no allocation unless the caller gave a request id of its own: the trace id's hex,
/// which is the request id by default, is kept inline (this runs for every request).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TraceContext {
    trace_id: [u8; 16],
    parent_id: [u8; 8],
    flags: u8,
    /// The trace id in lower-case hex.
    trace_hex: [u8; 32],
    /// The caller's own request id, when it gave a usable one.
    custom_id: Option<Box<str>>,
}

/// Why a `traceparent` or a request id was refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TraceError(String);

impl fmt::Display for TraceError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for TraceError {}

impl TraceContext {
    /// A new trace from random bytes (the caller supplies them: this crate has no random source).
    /// All-zero ids are replaced by ones of value 1, which W3C allows.
    pub fn new(trace_id: [u8; 16], parent_id: [u8; 8]) -> Self {
        let mut trace = TraceContext::from_parts(trace_id, parent_id, 1);
        trace.fix_zero_ids();
        trace
    }

    fn from_parts(trace_id: [u8; 16], parent_id: [u8; 8], flags: u8) -> Self {
        let mut trace_hex = [0u8; 32];
        write_hex(&mut trace_hex, &trace_id);
        TraceContext {
            trace_id,
            parent_id,
            flags,
            trace_hex,
            custom_id: None,
        }
    }

    /// Parse a `traceparent` header value.
    pub fn parse(traceparent: &str) -> Result<Self, TraceError> {
        let bad = |why: &str| TraceError(format!("traceparent {traceparent:?}: {why}"));
        // The usual form, read by position: this runs for every request that crosses the pipe.
        let b = traceparent.as_bytes();
        if b.len() == 55 && b[..3] == *b"00-" && b[35] == b'-' && b[52] == b'-' {
            if let (Some(trace_id), Some(parent_id), Some([flags])) = (
                hex::<16>(&b[3..35]),
                hex::<8>(&b[36..52]),
                hex::<1>(&b[53..]),
            ) {
                if trace_id == [0; 16] || parent_id == [0; 8] {
                    return Err(bad("an id is all zeros"));
                }
                return Ok(TraceContext::from_parts(trace_id, parent_id, flags));
            }
        }
        let mut parts = traceparent.trim().split('-');
        let (Some(version), Some(trace), Some(parent), Some(flags), None) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) else {
            return Err(bad("not four fields joined by -"));
        };
        if version != "00" {
            return Err(bad("version is not 00"));
        }
        let trace_id: [u8; 16] =
            hex(trace.as_bytes()).ok_or_else(|| bad("trace id is not 32 hex digits"))?;
        let parent_id: [u8; 8] =
            hex(parent.as_bytes()).ok_or_else(|| bad("parent id is not 16 hex digits"))?;
        let [flags]: [u8; 1] =
            hex(flags.as_bytes()).ok_or_else(|| bad("flags are not 2 hex digits"))?;
        if trace_id == [0; 16] || parent_id == [0; 8] {
            return Err(bad("an id is all zeros"));
        }
        Ok(TraceContext::from_parts(trace_id, parent_id, flags))
    }

    /// The same trace with the caller's request id, when it is usable: 1 to
    /// [`MAX_REQUEST_ID`] bytes of visible ASCII.
    pub fn with_request_id(mut self, request_id: &str) -> Result<Self, TraceError> {
        if request_id.is_empty()
            || request_id.len() > MAX_REQUEST_ID
            || !request_id.bytes().all(|b| b.is_ascii_graphic())
        {
            return Err(TraceError(format!(
                "request id {:?}: 1 to {MAX_REQUEST_ID} visible ASCII characters",
                request_id.chars().take(32).collect::<String>()
            )));
        }
        self.custom_id = (request_id.as_bytes() != self.trace_hex).then(|| request_id.into());
        Ok(self)
    }

    /// The same trace with a new parent id: what a hop that forwards the request sends on.
    pub fn child(&self, parent_id: [u8; 8]) -> Self {
        let mut child = self.clone();
        child.parent_id = parent_id;
        child.fix_zero_ids();
        child
    }

    /// The `traceparent` header value.
    pub fn traceparent(&self) -> String {
        let mut out = [0u8; 55];
        out[..3].copy_from_slice(b"00-");
        out[3..35].copy_from_slice(&self.trace_hex);
        out[35] = b'-';
        write_hex(&mut out[36..52], &self.parent_id);
        out[52] = b'-';
        write_hex(&mut out[53..55], &[self.flags]);
        ascii(&out).to_owned()
    }

    /// The trace id, 32 lower-case hex digits.
    pub fn trace_id_hex(&self) -> String {
        self.trace_id_str().to_owned()
    }

    /// The trace id, 32 lower-case hex digits, borrowed.
    pub fn trace_id_str(&self) -> &str {
        ascii(&self.trace_hex)
    }

    /// The request id (`X-Request-Id`).
    pub fn request_id(&self) -> &str {
        self.custom_id
            .as_deref()
            .unwrap_or_else(|| self.trace_id_str())
    }

    /// The caller's own request id, or `None` when the request id is the trace id's hex (what
    /// the wire leaves out: the far side derives it again).
    pub fn custom_request_id(&self) -> Option<&str> {
        self.custom_id.as_deref()
    }

    fn fix_zero_ids(&mut self) {
        if self.trace_id == [0; 16] {
            self.trace_id[15] = 1;
            write_hex(&mut self.trace_hex, &self.trace_id);
        }
        if self.parent_id == [0; 8] {
            self.parent_id[7] = 1;
        }
    }
}

/// Write the lower-case hex of `bytes` into `out`, which holds exactly twice as many bytes.
fn write_hex(out: &mut [u8], bytes: &[u8]) {
    for (pair, &b) in out.chunks_exact_mut(2).zip(bytes) {
        pair.copy_from_slice(&HEX_PAIRS[usize::from(b)]);
    }
}

/// The two lower-case hex digits of each byte value.
const HEX_PAIRS: [[u8; 2]; 256] = {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut table = [[0u8; 2]; 256];
    let mut i = 0;
    while i < 256 {
        table[i] = [DIGITS[i >> 4], DIGITS[i & 0x0f]];
        i += 1;
    }
    table
};

/// Bytes known to be ASCII (hex digits and `-`) as a `str`.
fn ascii(bytes: &[u8]) -> &str {
    std::str::from_utf8(bytes).unwrap_or_default()
}

/// `N` bytes from exactly `2 * N` lowercase hex digits.
fn hex<const N: usize>(text: &[u8]) -> Option<[u8; N]> {
    if text.len() != 2 * N {
        return None;
    }
    let mut out = [0u8; N];
    // Any digit that is not one sets the high bit of `bad`: one test at the end.
    let mut bad = 0u8;
    for (byte, pair) in out.iter_mut().zip(text.chunks_exact(2)) {
        let (high, low) = (NIBBLE[usize::from(pair[0])], NIBBLE[usize::from(pair[1])]);
        bad |= high | low;
        *byte = (high << 4) | (low & 0x0f);
    }
    (bad & 0x80 == 0).then_some(out)
}

/// The value of each byte as a lowercase hex digit, or `0x80` when it is not one.
const NIBBLE: [u8; 256] = {
    let mut table = [0x80u8; 256];
    let mut i = 0;
    while i < 10 {
        table[b'0' as usize + i] = i as u8;
        i += 1;
    }
    let mut i = 0;
    while i < 6 {
        table[b'a' as usize + i] = 10 + i as u8;
        i += 1;
    }
    table
};

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_formats_w3c_traceparent() {
        let header = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let t = TraceContext::parse(header).unwrap();
        assert_eq!(t.traceparent(), header);
        assert_eq!(t.request_id(), "4bf92f3577b34da6a3ce929d0e0e4736");
        let child = t.child([1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(
            child.traceparent(),
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0102030405060708-01"
        );
        for bad in [
            "",
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-x",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-1",
            // The right length and dashes, but a two-byte character among the digits.
            "00-4bf92f3577b34da6a3ce929d0e0e4\u{e9}-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902\u{e9}-01",
        ] {
            assert!(TraceContext::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn request_ids_are_bounded() {
        let t = TraceContext::new([7; 16], [9; 8]);
        assert_eq!(t.request_id(), t.trace_id_hex());
        assert_eq!(
            t.clone().with_request_id("abc-1").unwrap().request_id(),
            "abc-1"
        );
        // What an older peer sends, the trace id as the request id, is the default one: the
        // wire leaves it out, and the trace compares equal to one that never had it.
        let hex = t.trace_id_hex();
        let same = t.clone().with_request_id(&hex).unwrap();
        assert_eq!(same.custom_request_id(), None);
        assert_eq!(same, t);
        assert_eq!(same.request_id(), hex);
        assert_eq!(
            t.clone()
                .with_request_id("abc-1")
                .unwrap()
                .custom_request_id(),
            Some("abc-1")
        );
        assert!(t.clone().with_request_id("").is_err());
        assert!(t.clone().with_request_id("a b").is_err());
        assert!(t.clone().with_request_id(&"x".repeat(129)).is_err());
        assert!(TraceContext::new([0; 16], [0; 8])
            .traceparent()
            .contains("0001-"));
    }
}
