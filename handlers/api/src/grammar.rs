//! The grammar of events: which verbs cross the pipe and what a noun may look like.
//!
//! One place for the rule, used by the node's HTTP front door (for requests made locally), by
//! the wire decoder (for events that arrive from a peer) and by plug-ins that take nouns in
//! their settings (`forward` routes).
//!
//! A noun is one or more segments joined by `/`. A segment is non-empty, made of
//! `A-Z a-z 0-9 _ - .`, and never `.` or `..` alone. A noun is at most [`MAX_NOUN`] bytes.

use std::fmt;

/// The verbs that cross the pipe, upper case.
pub const VERBS: [&str; 6] = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"];

/// The verbs as an HTTP `Allow` header value.
pub const ALLOW: &str = "GET, HEAD, POST, PUT, PATCH, DELETE";

/// The longest noun, in bytes.
pub const MAX_NOUN: usize = 1024;

/// Whether `verb` is one of [`VERBS`] (exact, upper case).
pub fn is_verb(verb: &str) -> bool {
    VERBS.contains(&verb)
}

/// Why a noun or a segment breaks the grammar. Its `Display` is a message a person can act on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GrammarError {
    /// The noun is empty.
    EmptyNoun,
    /// The noun is longer than [`MAX_NOUN`].
    TooLong(usize),
    /// A segment is empty (`a//b` inside a noun, or a leading or trailing `/`).
    EmptySegment,
    /// A segment is `.` or `..`.
    DotSegment(String),
    /// A segment holds a character outside `A-Z a-z 0-9 _ - .`.
    BadChar(char),
}

impl fmt::Display for GrammarError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GrammarError::EmptyNoun => f.write_str("the noun is empty"),
            GrammarError::TooLong(n) => {
                write!(f, "the noun is {n} bytes, longer than {MAX_NOUN} bytes")
            }
            GrammarError::EmptySegment => f.write_str("an empty path segment"),
            GrammarError::DotSegment(s) => write!(f, "{s:?} is not allowed as a segment"),
            GrammarError::BadChar(c) => write!(
                f,
                "{c:?} is not allowed (segments use A-Z a-z 0-9 _ - . only)"
            ),
        }
    }
}

impl std::error::Error for GrammarError {}

/// Check one segment of a noun (or a client identity in a path).
pub fn check_segment(segment: &str) -> Result<(), GrammarError> {
    if segment.is_empty() {
        return Err(GrammarError::EmptySegment);
    }
    if segment == "." || segment == ".." {
        return Err(GrammarError::DotSegment(segment.to_string()));
    }
    match segment
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.')))
    {
        Some(c) => Err(GrammarError::BadChar(c)),
        None => Ok(()),
    }
}

/// Check a whole noun: its length, then each of its `/`-separated segments.
pub fn check_noun(noun: &str) -> Result<(), GrammarError> {
    if noun.is_empty() {
        return Err(GrammarError::EmptyNoun);
    }
    if noun.len() > MAX_NOUN {
        return Err(GrammarError::TooLong(noun.len()));
    }
    noun.split('/').try_for_each(check_segment)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nouns() {
        for ok in ["time", "time/utc", "a.b-c_d/0", "..a", "a..b"] {
            assert_eq!(check_noun(ok), Ok(()), "{ok}");
        }
        for bad in ["", "/a", "a/", "a//b", ".", "a/../b", "a b", "a%2Fb", "é"] {
            assert!(check_noun(bad).is_err(), "{bad}");
        }
        assert_eq!(
            check_noun(&"a".repeat(MAX_NOUN + 1)),
            Err(GrammarError::TooLong(MAX_NOUN + 1))
        );
        assert_eq!(check_noun(&"a".repeat(MAX_NOUN)), Ok(()));
    }

    #[test]
    fn verbs() {
        assert!(is_verb("GET") && is_verb("DELETE"));
        assert!(!is_verb("get") && !is_verb("OPTIONS") && !is_verb(""));
        assert_eq!(ALLOW, VERBS.join(", "));
    }
}
