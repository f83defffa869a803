//! Who may call what: the authorization policy of a node and the scoped tokens of its front
//! door, read from the TOML file of `--policy` (docs/POLICY.md).
//!
//! A [`Policy`] answers two questions. On the pipe, [`Policy::allows`] says whether a peer
//! (its certificate identity) may have a handler of this node run; the node asks it for every
//! event it receives, before it looks the handler up. At the front door,
//! [`Policy::token_for`] finds the token a request presents, in constant time, and
//! [`Token::permits`] says whether its verb and path are within that token's scopes.
//!
//! Without a file the policy is [`Policy::open`]: every peer may call every handler, and there
//! are no tokens. With one, whatever no `[[allow]]` rule allows is refused.
//!
//! The parts:
//!
//! - this file: [`Policy`], its rules, and loading the file;
//! - `file`: the TOML form of the file, and errors that name the file and the line;
//! - `token`: [`Token`], its secret and its scopes.

mod file;
mod token;

pub use token::Token;

use std::path::{Path, PathBuf};

use globset::{Glob, GlobBuilder, GlobMatcher, GlobSet, GlobSetBuilder};

use file::{RawPolicy, Source};

/// The rules and tokens of a node, compiled. Cheap to ask, on every request.
///
/// Its `Debug` never shows a token's secret.
#[derive(Clone, Debug, Default)]
pub struct Policy {
    /// The file it was read from; `None` for the open policy.
    path: Option<PathBuf>,
    /// The `[[allow]]` rules; `None` for the open policy, which allows everything.
    rules: Option<Vec<Rule>>,
    /// Every rule's peer patterns in one set, and the rule each pattern belongs to: a call
    /// matches the caller against all rules at once, then asks only the rules it matched for
    /// the handler (a policy of 100 rules asked rule by rule cost ~10% of req/s at c32).
    peers: GlobSet,
    peer_rule: Vec<usize>,
    tokens: Vec<Token>,
}

/// One `[[allow]]` rule: peers matching any of `peers` may call handlers matching any of
/// `handlers`, publish to topics matching `publish`, and subscribe to topics matching
/// `subscribe`.
#[derive(Clone)]
struct Rule {
    handlers: GlobSet,
    publish: GlobSet,
    subscribe: GlobSet,
    /// The patterns as written (peers, handlers), for `Debug`.
    written: (Vec<String>, Vec<String>),
}

impl std::fmt::Debug for Rule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rule")
            .field("peers", &self.written.0)
            .field("handlers", &self.written.1)
            .finish()
    }
}

impl Policy {
    /// No policy: every peer may call every handler, and there are no tokens.
    pub fn open() -> Policy {
        Policy::default()
    }

    /// Read the policy file at `path`, and the secrets of its tokens, and compile it for a
    /// node whose handlers are `handler_names` (as [`restpipe_handler::Handlers::names`] gives
    /// them, prefix handlers as `name*`).
    ///
    /// Every error is one line that names the file, the line of the TOML where it can, and
    /// the reason: a file that does not parse, an unknown key, a glob that does not compile, a
    /// handler pattern that matches none of `handler_names`, a secret written in the file
    /// itself, a secret that cannot be read, is empty or shorter than 16 bytes, two tokens of
    /// one name or one secret.
    pub fn load(path: &Path, handler_names: &[String]) -> Result<Policy, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("policy {}: cannot read it: {e}", path.display()))?;
        Policy::parse(path, &text, handler_names)
    }

    /// [`Policy::load`] with the file's text already read; `path` names it in errors and is
    /// where a relative `secret_file` is found from.
    pub fn parse(path: &Path, text: &str, handler_names: &[String]) -> Result<Policy, String> {
        let source = Source::new(path, text);
        let raw: RawPolicy = source.parse()?;
        let mut rules = Vec::with_capacity(raw.allow.len());
        let mut all_peers = GlobSetBuilder::new();
        let mut peer_rule = Vec::new();
        for rule in raw.allow {
            let at = rule.span().start;
            let rule = rule.into_inner();
            if rule.peers.is_empty()
                || (rule.handlers.is_empty()
                    && rule.publish.is_empty()
                    && rule.subscribe.is_empty())
            {
                return Err(source.error(
                    at,
                    "an [[allow]] rule needs at least one pattern in `peers`, and one in `handlers`, `publish` or `subscribe`",
                ));
            }
            let topics = |list: &[toml::Spanned<String>]| {
                let mut set = GlobSetBuilder::new();
                for pattern in list {
                    let text = pattern.get_ref();
                    let compiled = GlobBuilder::new(text)
                        .literal_separator(true)
                        .build()
                        .map_err(|e| {
                            source.error(
                                pattern.span().start,
                                &format!("topic pattern {text:?}: {}", e.kind()),
                            )
                        })?;
                    set.add(compiled);
                }
                set.build()
                    .map_err(|e| source.error(at, &format!("the rule does not compile: {e}")))
            };
            let publish = topics(&rule.publish)?;
            let subscribe = topics(&rule.subscribe)?;
            let mut handlers = GlobSetBuilder::new();
            let mut written = (Vec::new(), Vec::new());
            for pattern in &rule.peers {
                written.0.push(pattern.get_ref().clone());
                all_peers.add(glob(
                    &source,
                    pattern.span().start,
                    pattern.get_ref(),
                    "peer",
                )?);
                peer_rule.push(rules.len());
            }
            for pattern in &rule.handlers {
                let text = pattern.get_ref();
                let compiled = glob(&source, pattern.span().start, text, "handler")?;
                let matcher = compiled.compile_matcher();
                if !handler_names
                    .iter()
                    .any(|name| matches_handler(&matcher, text, name))
                {
                    return Err(source.error(
                        pattern.span().start,
                        &format!(
                            "handler pattern {text:?} matches no handler of this node (it has: {})",
                            if handler_names.is_empty() {
                                "none".to_string()
                            } else {
                                handler_names.join(", ")
                            }
                        ),
                    ));
                }
                handlers.add(compiled);
                written.1.push(text.clone());
            }
            let build = |set: GlobSetBuilder| {
                set.build()
                    .map_err(|e| source.error(at, &format!("the rule does not compile: {e}")))
            };
            rules.push(Rule {
                handlers: build(handlers)?,
                publish,
                subscribe,
                written,
            });
        }
        let tokens = token::compile(&source, raw.token)?;
        let peers = all_peers
            .build()
            .map_err(|e| source.error(0, &format!("the peer patterns do not compile: {e}")))?;
        Ok(Policy {
            path: Some(path.to_path_buf()),
            rules: Some(rules),
            peers,
            peer_rule,
            tokens,
        })
    }

    /// Whether `peer` (the calling node's certificate identity) may have the handler named
    /// `handler` run here. The open policy allows everything; a file allows what one of its
    /// rules allows, and nothing else.
    pub fn allows(&self, peer: &str, handler: &str) -> bool {
        self.any_rule(peer, |rule| rule.handlers.is_match(handler))
    }

    /// Whether `peer` may publish to `topic` (docs/PUBSUB.md): the open policy allows it; a
    /// file allows what the `publish` patterns of a rule that names the peer allow.
    pub fn may_publish(&self, peer: &str, topic: &str) -> bool {
        self.any_rule(peer, |rule| rule.publish.is_match(topic))
    }

    /// Whether `peer` may be sent the events of `topic`; asked for every event sent to a
    /// subscribed client.
    pub fn may_subscribe(&self, peer: &str, topic: &str) -> bool {
        self.any_rule(peer, |rule| rule.subscribe.is_match(topic))
    }

    /// Whether `peer` may subscribe with the glob `glob`: a `subscribe` pattern of a rule that
    /// names the peer matches the glob's own text (`sensors/**` allows the glob `sensors/*`,
    /// not `**`). Each event is also checked with [`Policy::may_subscribe`].
    pub fn may_subscribe_glob(&self, peer: &str, glob: &str) -> bool {
        self.may_subscribe(peer, glob)
    }

    /// Whether a rule that names `peer` passes `test`; the open policy allows everything.
    fn any_rule(&self, peer: &str, test: impl Fn(&Rule) -> bool) -> bool {
        match &self.rules {
            None => true,
            Some(rules) => self
                .peers
                .matches(peer)
                .into_iter()
                .filter_map(|i| self.peer_rule.get(i).and_then(|&r| rules.get(r)))
                .any(test),
        }
    }

    /// Whether this is the open policy (no file).
    pub fn is_open(&self) -> bool {
        self.rules.is_none()
    }

    /// The file this policy was read from; `None` for the open policy.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// How many `[[allow]]` rules it has.
    pub fn rule_count(&self) -> usize {
        self.rules.as_ref().map_or(0, Vec::len)
    }

    /// Its tokens, in the order of the file.
    pub fn tokens(&self) -> &[Token] {
        &self.tokens
    }

    /// The token whose secret is `presented`, if one is. Every token's secret is compared,
    /// each in constant time, whether or not an earlier one matched.
    pub fn token_for(&self, presented: &[u8]) -> Option<&Token> {
        token::find(&self.tokens, presented)
    }
}

/// A glob as the policy compiles it: `*`, `?`, `[...]` and `{a,b}`, case-sensitive, `*`
/// crossing every character (identities and handler names hold no `/` anyway).
fn glob(source: &Source, at: usize, pattern: &str, what: &str) -> Result<Glob, String> {
    if pattern.is_empty() {
        return Err(source.error(at, &format!("an empty {what} pattern matches nothing")));
    }
    GlobBuilder::new(pattern)
        .literal_separator(false)
        .backslash_escape(true)
        .build()
        .map_err(|e| source.error(at, &format!("{what} pattern {pattern:?}: {}", e.kind())))
}

/// Whether a handler pattern matches a name of [`restpipe_handler::Handlers::names`]. A plain
/// name must match; a prefix handler (`get_jobs*`, which serves `get_jobs` and
/// `get_jobs_<more>`) counts as matched when the pattern matches its bare name, or when the
/// pattern's literal start (up to its first wildcard) could lead into one of its names.
fn matches_handler(matcher: &GlobMatcher, pattern: &str, name: &str) -> bool {
    let Some(prefix) = name.strip_suffix('*') else {
        return matcher.is_match(name);
    };
    if matcher.is_match(prefix) || matcher.is_match(name) {
        return true;
    }
    let literal_end = pattern
        .find(['*', '?', '[', '{', '\\'])
        .unwrap_or(pattern.len());
    let literal = &pattern[..literal_end];
    if literal.len() > prefix.len() {
        literal.starts_with(prefix) && literal.as_bytes()[prefix.len()] == b'_'
    } else {
        // The literal ends inside the prefix's name: a wildcard follows (else the pattern was
        // the bare prefix, matched above), and it can stand for the rest.
        literal_end < pattern.len() && prefix.starts_with(literal)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn names(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    fn parse(text: &str) -> Result<Policy, String> {
        Policy::parse(
            Path::new("p.toml"),
            text,
            &names(&[
                "get_time",
                "get_cat",
                "get_file",
                "get_files",
                "post_jobs",
                "get_jobs*",
            ]),
        )
    }

    #[test]
    fn the_issue_form_allows_and_refuses() {
        let p = parse(
            r#"
[[allow]]
peers = ["fileserver-*"]
handlers = ["get_time", "get_cat"]
[[allow]]
peers = ["web-?"]
handlers = ["get_file*", "post_jobs"]
"#,
        )
        .unwrap();
        assert!(p.allows("fileserver-1", "get_time"));
        assert!(p.allows("fileserver-eu", "get_cat"));
        assert!(!p.allows("fileserver-1", "get_file"));
        assert!(p.allows("web-1", "get_files"));
        assert!(p.allows("web-2", "post_jobs"));
        assert!(!p.allows("web-10", "post_jobs"));
        assert!(!p.allows("web-1", "get_time"));
        assert!(!p.allows("", "get_time"));
        assert_eq!(p.rule_count(), 2);
        assert!(!p.is_open());
    }

    #[test]
    fn open_allows_everything_and_empty_file_nothing() {
        assert!(Policy::open().allows("anyone", "anything"));
        assert!(Policy::open().is_open());
        let p = parse("").unwrap();
        assert!(!p.allows("anyone", "get_time"));
    }

    #[test]
    fn prefix_handlers_are_matched_by_their_names() {
        let p = parse("[[allow]]\npeers=[\"*\"]\nhandlers=[\"get_jobs*\"]\n").unwrap();
        assert!(p.allows("x", "get_jobs_42_log"));
        assert!(parse("[[allow]]\npeers=[\"*\"]\nhandlers=[\"get_jobs_*_log\"]\n").is_ok());
        assert!(parse("[[allow]]\npeers=[\"*\"]\nhandlers=[\"get_j*\"]\n").is_ok());
        assert!(parse("[[allow]]\npeers=[\"*\"]\nhandlers=[\"get_jobs_42\"]\n").is_ok());
        assert!(parse("[[allow]]\npeers=[\"*\"]\nhandlers=[\"get_jobsx\"]\n").is_err());
    }

    #[test]
    fn errors_name_the_file_the_line_and_the_reason() {
        let e = parse("[[allow]]\npeers = [\"a\"]\nhandlers = [\"get_tmie\"]\n").unwrap_err();
        assert!(e.starts_with("policy p.toml: line 3:"), "{e}");
        assert!(
            e.contains("get_tmie") && e.contains("matches no handler"),
            "{e}"
        );
        let e = parse("[[allow]]\npeers = [\"a\"\nhandlers = []\n").unwrap_err();
        assert!(e.starts_with("policy p.toml: line "), "{e}");
        let e =
            parse("[[allow]]\npeers = [\"a\"]\nhandlers = [\"get_time\"]\nverb = 1\n").unwrap_err();
        assert!(e.contains("line 1") || e.contains("line 4"), "{e}");
        assert!(e.contains("verb"), "{e}");
        let e = parse("[[allow]]\npeers = [\"a[\"]\nhandlers = [\"get_time\"]\n").unwrap_err();
        assert!(e.contains("line 2") && e.contains("peer pattern"), "{e}");
        let e = parse("[[allow]]\npeers = []\nhandlers = [\"get_time\"]\n").unwrap_err();
        assert!(e.contains("at least one pattern"), "{e}");
    }
}
