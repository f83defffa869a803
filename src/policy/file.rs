//! The TOML form of a policy file, as written, and errors that name the file and the line.

use std::path::Path;

use serde::Deserialize;
use toml::Spanned;

/// The whole file: `[[allow]]` rules and `[[token]]` tables, both optional.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawPolicy {
    /// The rules; none means nothing is allowed on the pipe.
    #[serde(default)]
    pub(super) allow: Vec<Spanned<RawRule>>,
    /// The front door's tokens.
    #[serde(default)]
    pub(super) token: Vec<Spanned<RawToken>>,
}

/// One `[[allow]]` table.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRule {
    /// Globs on the calling peer's certificate identity.
    pub(super) peers: Vec<Spanned<String>>,
    /// Globs on handler names.
    #[serde(default)]
    pub(super) handlers: Vec<Spanned<String>>,
    /// Globs on the topics the peers may publish to (docs/PUBSUB.md).
    #[serde(default)]
    pub(super) publish: Vec<Spanned<String>>,
    /// Globs on the topics the peers may subscribe to.
    #[serde(default)]
    pub(super) subscribe: Vec<Spanned<String>>,
}

/// One `[[token]]` table.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawToken {
    /// What the token is called in logs and errors.
    pub(super) name: Spanned<String>,
    /// Refused: a secret is never written in the policy file. Read only to say so.
    pub(super) secret: Option<Spanned<toml::Value>>,
    /// A file that holds the secret (relative paths from the policy file's directory).
    pub(super) secret_file: Option<Spanned<String>>,
    /// An environment variable that holds the secret.
    pub(super) secret_env: Option<Spanned<String>>,
    /// The verbs the token may use, or `"*"`.
    pub(super) verbs: Vec<Spanned<String>>,
    /// The path prefixes the token may reach, on segment boundaries.
    pub(super) paths: Vec<Spanned<String>>,
}

/// A policy file being read: its path and text, to turn byte offsets into line numbers.
pub(super) struct Source<'a> {
    pub(super) path: &'a Path,
    text: &'a str,
}

impl<'a> Source<'a> {
    pub(super) fn new(path: &'a Path, text: &'a str) -> Self {
        Source { path, text }
    }

    /// The file parsed as a [`RawPolicy`], or the one-line error of the TOML parser.
    pub(super) fn parse(&self) -> Result<RawPolicy, String> {
        toml::from_str(self.text).map_err(|e: toml::de::Error| {
            let reason = e.message().trim_end().replace('\n', "; ");
            match e.span() {
                Some(span) => self.error(span.start, &reason),
                None => format!("policy {}: {reason}", self.path.display()),
            }
        })
    }

    /// `policy FILE: line N: reason`, N being the line of byte `at`.
    pub(super) fn error(&self, at: usize, reason: &str) -> String {
        let before = self.text.get(..at).unwrap_or(self.text);
        let line = before.matches('\n').count() + 1;
        format!("policy {}: line {line}: {reason}", self.path.display())
    }
}
