//! Validation of the names that go into certificates: DNS names, client identities, CA names.

use std::net::IpAddr;

use crate::{Error, Result};

/// The longest client identity accepted, in characters (an X.509 common name holds 64).
pub const MAX_IDENTITY_LEN: usize = 64;

const MAX_DNS_NAME_LEN: usize = 253;
const MAX_DNS_LABEL_LEN: usize = 63;
const MAX_CA_NAME_LEN: usize = 64;

/// Checks that `name` is a usable DNS name for a certificate.
///
/// Labels are 1 to 63 characters of `A-Z a-z 0-9 -`, not starting or ending with `-`,
/// separated by single dots; the whole name is at most 253 characters, has no trailing dot,
/// and its last label is not all digits (that would be a mistyped IP address). When
/// `allow_wildcard` is true the first label may be `*` (as in `*.example.com`).
pub fn validate_dns_name(name: &str, allow_wildcard: bool) -> Result<()> {
    let fail = |reason: String| {
        Err(Error::InvalidDnsName {
            name: name.to_owned(),
            reason,
        })
    };
    if name.is_empty() {
        return fail("it is empty".into());
    }
    if name.len() > MAX_DNS_NAME_LEN {
        return fail(format!(
            "it is {} characters long (at most {MAX_DNS_NAME_LEN})",
            name.len()
        ));
    }
    if name.ends_with('.') {
        return fail("remove the trailing dot".into());
    }
    let labels: Vec<&str> = name.split('.').collect();
    for (i, label) in labels.iter().enumerate() {
        if label.is_empty() {
            return fail("it has an empty label (a leading dot or two dots in a row)".into());
        }
        if *label == "*" {
            if allow_wildcard && i == 0 && labels.len() > 1 {
                continue;
            }
            return fail(if allow_wildcard {
                "a wildcard `*` is only allowed as the whole first label, as in *.example.com"
                    .into()
            } else {
                "a wildcard `*` is not allowed here".into()
            });
        }
        if label.len() > MAX_DNS_LABEL_LEN {
            return fail(format!(
                "the label {label:?} is {} characters long (at most {MAX_DNS_LABEL_LEN})",
                label.len()
            ));
        }
        if let Some(c) = label
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || *c == '-'))
        {
            return fail(format!("the character {c:?} is not allowed"));
        }
        if label.starts_with('-') || label.ends_with('-') {
            return fail(format!("the label {label:?} starts or ends with a hyphen"));
        }
    }
    if labels
        .last()
        .is_some_and(|l| l.chars().all(|c| c.is_ascii_digit()))
    {
        return fail("its last label is all digits, which makes it look like an IP address".into());
    }
    Ok(())
}

/// Checks that `identity` is a valid client identity.
///
/// An identity is 1 to 64 characters of `A-Z a-z 0-9 _ - .`, and not `.` or `..`: it is
/// used as the path segment in `/client/{identity}/...` on the server node.
pub fn validate_identity(identity: &str) -> Result<()> {
    let fail = |reason: String| {
        Err(Error::InvalidIdentity {
            identity: identity.to_owned(),
            reason,
        })
    };
    if identity.is_empty() {
        return fail("it is empty".into());
    }
    let len = identity.chars().count();
    if len > MAX_IDENTITY_LEN {
        return fail(format!(
            "it is {len} characters long (at most {MAX_IDENTITY_LEN})"
        ));
    }
    if identity == "." || identity == ".." {
        return fail("\".\" and \"..\" are not allowed".into());
    }
    if let Some(c) = identity
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.')))
    {
        return fail(format!("the character {c:?} is not allowed"));
    }
    Ok(())
}

/// Checks a CA common name: 1 to 64 characters, no control characters, not blank.
pub(crate) fn validate_ca_name(name: &str) -> Result<()> {
    let fail = |reason: String| {
        Err(Error::InvalidCaName {
            name: name.to_owned(),
            reason,
        })
    };
    if name.trim().is_empty() {
        return fail("it is empty".into());
    }
    let len = name.chars().count();
    if len > MAX_CA_NAME_LEN {
        return fail(format!(
            "it is {len} characters long (at most {MAX_CA_NAME_LEN})"
        ));
    }
    if name.chars().any(char::is_control) {
        return fail("it contains a control character".into());
    }
    Ok(())
}

/// A server name or SAN after validation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum HostName {
    Ip(IpAddr),
    Dns(String),
}

/// Parses a server name or SAN: an IP address, else a DNS name (wildcard allowed).
pub(crate) fn parse_host_name(name: &str) -> Result<HostName> {
    if let Ok(ip) = name.parse::<IpAddr>() {
        return Ok(HostName::Ip(ip));
    }
    validate_dns_name(name, true)?;
    Ok(HostName::Dns(name.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dns_names() {
        for ok in [
            "localhost",
            "rp.example.com",
            "a-b.c1",
            "x",
            "fileserver-1",
            "A.B.example",
        ] {
            assert!(validate_dns_name(ok, false).is_ok(), "{ok}");
        }
        assert!(validate_dns_name("*.example.com", true).is_ok());
        for bad in [
            "",
            "a..b",
            ".a",
            "a.",
            "-a.com",
            "a-.com",
            "a_b.com",
            "a b",
            "10.0.0.256",
            "1234",
            "*.example.com",
            "é.com",
        ] {
            assert!(validate_dns_name(bad, false).is_err(), "{bad}");
        }
        assert!(validate_dns_name("a.*.com", true).is_err());
        assert!(validate_dns_name("*", true).is_err());
        let long_label = "a".repeat(64);
        assert!(validate_dns_name(&format!("{long_label}.com"), false).is_err());
        let long_name = ["abcdefghi"; 26].join(".");
        assert!(long_name.len() > 253);
        assert!(validate_dns_name(&long_name, false).is_err());
    }

    #[test]
    fn identities() {
        for ok in ["dev-client", "fileserver-1", "a", "node_7.eu", "..."] {
            assert!(validate_identity(ok).is_ok(), "{ok}");
        }
        for bad in ["", ".", "..", "a/b", "a b", "ü", "a%20"] {
            assert!(validate_identity(bad).is_err(), "{bad}");
        }
        assert!(validate_identity(&"a".repeat(64)).is_ok());
        let err = validate_identity(&"a".repeat(65))
            .expect_err("65 chars is too long")
            .to_string();
        assert!(err.contains("at most 64"), "{err}");
    }

    #[test]
    fn host_names() {
        assert!(matches!(parse_host_name("127.0.0.1"), Ok(HostName::Ip(_))));
        assert!(matches!(parse_host_name("::1"), Ok(HostName::Ip(_))));
        assert!(matches!(
            parse_host_name("rp.internal"),
            Ok(HostName::Dns(_))
        ));
        assert!(parse_host_name("rp internal").is_err());
    }

    #[test]
    fn ca_names() {
        assert!(validate_ca_name("restpipe CA").is_ok());
        assert!(validate_ca_name(" ").is_err());
        assert!(validate_ca_name("a\nb").is_err());
        assert!(validate_ca_name(&"x".repeat(65)).is_err());
    }
}
