//! Scoped tokens of the front door: a name, a secret read from a file or an environment
//! variable, and scopes (verbs, and path prefixes matched on segment boundaries).

use std::path::Path;

use subtle::{ConditionallySelectable, ConstantTimeEq};
use toml::Spanned;

use super::file::{RawToken, Source};

/// The shortest secret a token may have, in bytes.
pub const MIN_SECRET: usize = 16;

/// The verbs a token may name (`HEAD` goes with `GET`).
const VERBS: [&str; 7] = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"];

/// A token of the front door. Its `Debug` shows its name and scopes, never its secret.
#[derive(Clone)]
pub struct Token {
    name: String,
    secret: Box<[u8]>,
    /// Upper case; `None` for every verb (`"*"`).
    verbs: Option<Vec<String>>,
    /// The path prefixes as written (trailing `/` removed, except for `/` itself).
    paths: Vec<String>,
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Token")
            .field("name", &self.name)
            .field("secret", &"<hidden>")
            .field(
                "verbs",
                &self.verbs.as_deref().unwrap_or(&["*".to_string()]),
            )
            .field("paths", &self.paths)
            .finish()
    }
}

impl Token {
    /// The token's name, as the policy file gives it.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether a request of `method` to the raw request path `path` is within this token's
    /// scopes. The error says which scope it lacks, for a 403.
    ///
    /// A path prefix matches on segment boundaries: `/client/web-1` (or `/client/web-1/`)
    /// covers `/client/web-1` and everything under `/client/web-1/`, never `/client/web-10`.
    /// The raw path is compared, as the router sees it: a percent-encoded spelling of an
    /// allowed path is out of scope. A path with a `.` or `..` segment, raw or
    /// percent-encoded, or with an encoded `/` or `\`, is out of every scope.
    pub fn permits(&self, method: &str, path: &str) -> Result<(), String> {
        if let Some(verbs) = &self.verbs {
            let allowed = |v: &str| verbs.iter().any(|w| w.eq_ignore_ascii_case(v));
            if !(allowed(method) || method.eq_ignore_ascii_case("HEAD") && allowed("GET")) {
                return Err(format!(
                    "token {} may not use {method} (its verbs: {})",
                    self.name,
                    verbs.join(", ")
                ));
            }
        }
        if let Some(why) = ambiguous(path) {
            return Err(format!("token {} may not reach {path:?}: {why}", self.name));
        }
        if self.paths.iter().any(|prefix| under(path, prefix)) {
            Ok(())
        } else {
            Err(format!(
                "token {} may not reach {path:?} (its paths: {})",
                self.name,
                self.paths.join(", ")
            ))
        }
    }
}

/// Whether `path` is `prefix` or lies under it, on a segment boundary.
fn under(path: &str, prefix: &str) -> bool {
    if prefix == "/" {
        return path.starts_with('/');
    }
    match path.strip_prefix(prefix) {
        Some(rest) => rest.is_empty() || rest.starts_with('/'),
        None => false,
    }
}

/// Why a path cannot be judged by prefix: a dot segment (raw or percent-encoded), or an
/// encoded separator that a later decoding would turn into one.
fn ambiguous(path: &str) -> Option<&'static str> {
    for segment in path.split('/') {
        let decoded = percent_encoding::percent_decode_str(segment).collect::<Vec<u8>>();
        if decoded == b"." || decoded == b".." {
            return Some("a scoped token may not use `.` or `..` segments");
        }
        if decoded.iter().any(|&b| b == b'/' || b == b'\\' || b == 0) {
            return Some("a scoped token may not use an encoded `/`, `\\` or NUL");
        }
    }
    None
}

/// The token of `tokens` whose secret is `presented`: every secret is compared in constant
/// time, and the loop never stops early.
pub(super) fn find<'a>(tokens: &'a [Token], presented: &[u8]) -> Option<&'a Token> {
    let mut found = u32::MAX;
    for (i, token) in tokens.iter().enumerate() {
        let index = u32::try_from(i).unwrap_or(u32::MAX);
        found.conditional_assign(&index, token.secret.as_ref().ct_eq(presented));
    }
    tokens.get(usize::try_from(found).ok()?)
}

/// The `[[token]]` tables compiled, their secrets read.
pub(super) fn compile(source: &Source, raw: Vec<Spanned<RawToken>>) -> Result<Vec<Token>, String> {
    let mut tokens: Vec<Token> = Vec::with_capacity(raw.len());
    for table in raw {
        let at = table.span().start;
        let raw = table.into_inner();
        let name = raw.name.get_ref().trim().to_string();
        let name_at = raw.name.span().start;
        let err =
            |at: usize, reason: String| source.error(at, &format!("token {name:?}: {reason}"));
        if name.is_empty()
            || !name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        {
            return Err(source.error(
                name_at,
                &format!("token name {name:?} must be A-Z a-z 0-9 - _ . and not empty"),
            ));
        }
        if tokens.iter().any(|t| t.name == name) {
            return Err(err(name_at, "another token has this name".into()));
        }
        if let Some(secret) = &raw.secret {
            return Err(err(
                secret.span().start,
                "a secret is never written in the policy file: give secret_file (a file that holds it) or secret_env (an environment variable)".into(),
            ));
        }
        let secret = match (&raw.secret_file, &raw.secret_env) {
            (Some(file), None) => read_file_secret(source.path, file.get_ref())
                .map_err(|reason| err(file.span().start, reason))?,
            (None, Some(var)) => {
                read_env_secret(var.get_ref()).map_err(|reason| err(var.span().start, reason))?
            }
            _ => {
                return Err(err(
                    at,
                    "give exactly one of secret_file and secret_env".into(),
                ))
            }
        };
        if tokens.iter().any(|t| bool::from(t.secret.ct_eq(&secret))) {
            return Err(err(
                at,
                "its secret is also another token's; each token needs its own".into(),
            ));
        }
        if raw.verbs.is_empty() {
            return Err(err(
                at,
                "`verbs` is empty: name verbs, or \"*\" for every verb".into(),
            ));
        }
        let mut verbs = Some(Vec::new());
        for verb in &raw.verbs {
            let v = verb.get_ref().trim().to_ascii_uppercase();
            if v == "*" {
                verbs = None;
            } else if VERBS.contains(&v.as_str()) {
                if let Some(list) = verbs.as_mut() {
                    list.push(v);
                }
            } else {
                return Err(err(
                    verb.span().start,
                    format!(
                        "unknown verb {:?} (use {} or \"*\")",
                        verb.get_ref(),
                        VERBS.join(", ")
                    ),
                ));
            }
        }
        if raw.paths.is_empty() {
            return Err(err(
                at,
                "`paths` is empty: name path prefixes, or \"/\" for every path".into(),
            ));
        }
        let mut paths = Vec::with_capacity(raw.paths.len());
        for path in &raw.paths {
            let p = path.get_ref().trim();
            if !p.starts_with('/') || p.contains(['?', '#']) || ambiguous(p).is_some() {
                return Err(err(
                    path.span().start,
                    format!(
                        "path {p:?} must start with `/`, hold no `?` or `#`, and no `.` or `..` segment"
                    ),
                ));
            }
            let p = if p == "/" { p } else { p.trim_end_matches('/') };
            let p = if p.is_empty() { "/" } else { p };
            paths.push(p.to_string());
        }
        tokens.push(Token {
            name,
            secret,
            verbs,
            paths,
        });
    }
    Ok(tokens)
}

/// A secret checked: not empty, at least [`MIN_SECRET`] bytes, visible ASCII only (what a
/// bearer token can carry).
fn checked(secret: &[u8], from: &str) -> Result<Box<[u8]>, String> {
    if secret.is_empty() {
        return Err(format!("the secret in {from} is empty"));
    }
    if secret.len() < MIN_SECRET {
        return Err(format!(
            "the secret in {from} is {} bytes; it must be at least {MIN_SECRET}",
            secret.len()
        ));
    }
    if !secret.iter().all(|b| b.is_ascii_graphic()) {
        return Err(format!(
            "the secret in {from} holds spaces, control or non-ASCII characters, which a bearer token cannot carry"
        ));
    }
    Ok(secret.into())
}

/// The secret in `file` (relative to the policy file's directory), surrounding whitespace
/// (a final newline) removed.
fn read_file_secret(policy: &Path, file: &str) -> Result<Box<[u8]>, String> {
    let path = policy
        .parent()
        .map_or_else(|| Path::new(file).to_path_buf(), |dir| dir.join(file));
    let bytes = std::fs::read(&path)
        .map_err(|e| format!("cannot read secret_file {}: {e}", path.display()))?;
    checked(
        bytes.trim_ascii(),
        &format!("secret_file {}", path.display()),
    )
}

/// The secret in the environment variable `var`, surrounding whitespace removed.
fn read_env_secret(var: &str) -> Result<Box<[u8]>, String> {
    let value = std::env::var_os(var)
        .ok_or_else(|| format!("the environment variable {var} (secret_env) is not set"))?;
    let value = value
        .into_string()
        .map_err(|_| format!("the environment variable {var} is not valid UTF-8"))?;
    checked(
        value.trim().as_bytes(),
        &format!("the environment variable {var}"),
    )
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn token(verbs: Option<&[&str]>, paths: &[&str]) -> Token {
        Token {
            name: "t".into(),
            secret: b"0123456789abcdef".as_slice().into(),
            verbs: verbs.map(|v| v.iter().map(|s| s.to_string()).collect()),
            paths: paths.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn prefixes_match_on_segment_boundaries() {
        let t = token(None, &["/client/web-1", "/status"]);
        assert!(t.permits("GET", "/client/web-1").is_ok());
        assert!(t.permits("GET", "/client/web-1/time").is_ok());
        assert!(t.permits("GET", "/client/web-10/time").is_err());
        assert!(t.permits("GET", "/client/web-1x").is_err());
        assert!(t.permits("GET", "/status").is_ok());
        assert!(t.permits("GET", "/statusx").is_err());
        assert!(t.permits("GET", "/clients").is_err());
        let all = token(None, &["/"]);
        assert!(all.permits("GET", "/anything/at/all").is_ok());
        assert!(all.permits("OPTIONS", "*").is_err());
    }

    #[test]
    fn dots_and_encoded_separators_are_out_of_scope() {
        let t = token(None, &["/client/web-1"]);
        for path in [
            "/client/web-1/../web-2/time",
            "/client/web-1/%2e%2e/web-2/time",
            "/client/web-1/%2E./x",
            "/client/web-1/./time",
            "/client/web-1%2f..%2fweb-2/time",
            "/client/web-1/file//a%2f..%2fb",
            "/client/web-1/x%5cy",
        ] {
            assert!(t.permits("GET", path).is_err(), "{path}");
        }
        assert!(t.permits("GET", "/client/web%2D1/time").is_err());
        assert!(t.permits("GET", "/client/web-1/file//a%20b").is_ok());
    }

    #[test]
    fn verbs_are_checked_and_head_goes_with_get() {
        let t = token(Some(&["GET"]), &["/"]);
        assert!(t.permits("GET", "/status").is_ok());
        assert!(t.permits("HEAD", "/status").is_ok());
        let e = t.permits("POST", "/server/jobs").unwrap_err();
        assert!(e.contains("token t") && e.contains("POST"), "{e}");
    }

    #[test]
    fn lookup_compares_every_token_and_lengths_matter() {
        let mut a = token(None, &["/"]);
        a.name = "a".into();
        let mut b = token(None, &["/"]);
        b.name = "b".into();
        b.secret = b"0123456789abcdefg".as_slice().into();
        let tokens = [a, b];
        assert_eq!(find(&tokens, b"0123456789abcdef").unwrap().name, "a");
        assert_eq!(find(&tokens, b"0123456789abcdefg").unwrap().name, "b");
        assert!(find(&tokens, b"0123456789abcde").is_none());
        assert!(find(&tokens, b"0123456789abcdefgh").is_none());
        assert!(find(&tokens, b"").is_none());
        assert!(find(&[], b"x").is_none());
    }

    #[test]
    fn debug_hides_the_secret() {
        let shown = format!("{:?}", token(None, &["/"]));
        assert!(!shown.contains("0123456789abcdef") && shown.contains("<hidden>"));
    }
}
