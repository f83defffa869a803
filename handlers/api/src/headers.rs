//! The HTTP headers that cross the pipe with events and replies: an explicit allow-list,
//! each bounded in size and count. Every other header is dropped at the front door.
//!
//! The list holds what conditional and partial requests need (`Range`, `If-Range`,
//! `If-None-Match`, `If-Modified-Since`, `ETag`, `Last-Modified`, `Content-Range`) and what
//! describes a body (`Content-Disposition`, `Cache-Control`, `Accept`, `Content-Encoding`,
//! `Accept-Ranges`).
//! `Content-Type` and `Content-Length` travel in fields of their own.

use std::fmt;

/// The headers that may cross the pipe, lower case.
pub const ALLOWED: [&str; 12] = [
    "range",
    "if-range",
    "if-none-match",
    "if-modified-since",
    "etag",
    "last-modified",
    "content-range",
    "content-disposition",
    "cache-control",
    "accept",
    "content-encoding",
    "accept-ranges",
];

/// The most headers one event or one reply carries.
pub const MAX_COUNT: usize = 16;

/// The longest value of one header, in bytes.
pub const MAX_VALUE: usize = 2048;

/// Whether `name` (any case) may cross the pipe.
pub fn is_allowed(name: &str) -> bool {
    ALLOWED.iter().any(|a| a.eq_ignore_ascii_case(name))
}

/// Why a header cannot cross the pipe.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HeaderError {
    /// Not on the allow-list.
    NotAllowed(String),
    /// Its value is longer than [`MAX_VALUE`], or not visible ASCII and spaces.
    BadValue(String),
    /// More than [`MAX_COUNT`] headers.
    TooMany,
}

impl fmt::Display for HeaderError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HeaderError::NotAllowed(name) => {
                write!(f, "header {name:?} does not cross the pipe")
            }
            HeaderError::BadValue(name) => write!(
                f,
                "header {name:?} has a value longer than {MAX_VALUE} bytes or not printable ASCII"
            ),
            HeaderError::TooMany => write!(f, "more than {MAX_COUNT} headers"),
        }
    }
}

impl std::error::Error for HeaderError {}

/// Allow-listed headers, names in lower case, in the order they were added.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Headers(Vec<(String, String)>);

impl Headers {
    /// No headers.
    pub fn new() -> Self {
        Headers::default()
    }

    /// Add a header, after checking it against the allow-list and the bounds. A name
    /// already present is replaced.
    pub fn insert(&mut self, name: &str, value: impl Into<String>) -> Result<(), HeaderError> {
        let value = value.into();
        check(name, &value)?;
        let name = name.to_ascii_lowercase();
        if let Some(slot) = self.0.iter_mut().find(|(n, _)| *n == name) {
            slot.1 = value;
            return Ok(());
        }
        if self.0.len() >= MAX_COUNT {
            return Err(HeaderError::TooMany);
        }
        self.0.push((name, value));
        Ok(())
    }

    /// The same headers with this one added; a header that may not cross is left out.
    pub fn with(mut self, name: &str, value: impl Into<String>) -> Self {
        let _ = self.insert(name, value);
        self
    }

    /// The value of `name` (any case).
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// Every header, in order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(n, v)| (n.as_str(), v.as_str()))
    }

    /// How many there are.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether there is none.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// Check one header against the allow-list and the bounds.
pub fn check(name: &str, value: &str) -> Result<(), HeaderError> {
    if !is_allowed(name) {
        return Err(HeaderError::NotAllowed(name.chars().take(64).collect()));
    }
    let printable = value
        .bytes()
        .all(|b| b == b'\t' || (b' '..=b'~').contains(&b));
    if value.len() > MAX_VALUE || !printable {
        return Err(HeaderError::BadValue(name.to_string()));
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn only_the_allowed_cross_bounded() {
        let mut h = Headers::new();
        h.insert("Range", "bytes=0-9").unwrap();
        h.insert("ETAG", "\"abc\"").unwrap();
        assert_eq!(h.get("range"), Some("bytes=0-9"));
        assert_eq!(h.get("ETag"), Some("\"abc\""));
        assert!(matches!(
            h.insert("Cookie", "x"),
            Err(HeaderError::NotAllowed(_))
        ));
        assert!(matches!(
            h.insert("accept", "a".repeat(MAX_VALUE + 1)),
            Err(HeaderError::BadValue(_))
        ));
        assert!(matches!(
            h.insert("accept", "a\r\nx: y"),
            Err(HeaderError::BadValue(_))
        ));
        h.insert("range", "bytes=1-2").unwrap();
        assert_eq!(h.len(), 2);
        assert_eq!(h.get("range"), Some("bytes=1-2"));
    }
}
