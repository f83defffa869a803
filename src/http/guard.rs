//! The Host and Origin guard of the front door: a browser tricked into calling the node (DNS
//! rebinding, a cross-site form or `fetch`) is refused before anything crosses the pipe.
//!
//! A request is let through when its `Host` (and the authority of an absolute request target,
//! if it has one) names loopback (`localhost`, `127.0.0.0/8`, `[::1]`, with or without a port)
//! or one of the names given to `--http-allowed-hosts`; when its `Origin`, if it has one, is
//! `http` or `https` on such a host; and when it does not say `Sec-Fetch-Site: cross-site`.
//! Names are compared without regard to case and without a trailing dot. A request with no
//! `Host` at all is let through on HTTP/1.0 (no browser sends one; RFC 9112 allows it there)
//! and is a 400 on HTTP/1.1, as RFC 9112 section 3.2 requires; so are two `Host` headers.

use std::net::IpAddr;
use std::str::FromStr;

use axum::http::{header, HeaderMap, StatusCode, Uri, Version};

/// The setting that widens the guard, as it is named in errors.
const SETTING: &str = "--http-allowed-hosts (RP_HTTP_ALLOWED_HOSTS)";

/// One host the guard accepts besides loopback: a name (lower case, no trailing dot) or an
/// address.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Allowed {
    Name(String),
    Ip(IpAddr),
}

/// The hosts a request may name besides loopback: the values of `--http-allowed-hosts`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AllowedHosts(Vec<Allowed>);

impl AllowedHosts {
    /// The hosts given, each a name (`rp.example.com`), an IPv4 address or an IPv6 address
    /// with or without brackets, without a port. Case and a trailing dot do not matter.
    pub fn parse<S: AsRef<str>>(hosts: &[S]) -> Result<AllowedHosts, String> {
        let mut allowed = Vec::new();
        for raw in hosts {
            let raw = raw.as_ref().trim();
            if raw.is_empty() {
                continue;
            }
            let unbracketed = raw
                .strip_prefix('[')
                .and_then(|r| r.strip_suffix(']'))
                .unwrap_or(raw);
            let host = if let Ok(ip) = unbracketed.parse::<IpAddr>() {
                Allowed::Ip(canonical(ip))
            } else if raw.contains(':') {
                return Err(format!(
                    "--http-allowed-hosts takes host names and addresses without a port, not {raw:?}"
                ));
            } else {
                let name = normalise_name(raw)
                    .ok_or_else(|| format!("--http-allowed-hosts: {raw:?} is not a host name"))?;
                Allowed::Name(name)
            };
            if !allowed.contains(&host) {
                allowed.push(host);
            }
        }
        Ok(AllowedHosts(allowed))
    }

    /// Whether `host` (an address or a name, as given) is among these.
    pub fn contains(&self, host: &str) -> bool {
        match parse_host(host) {
            Some(Host::Ip(ip)) => self.0.contains(&Allowed::Ip(ip)),
            Some(Host::Name(name)) => self.0.contains(&Allowed::Name(name)),
            None => false,
        }
    }

    /// Whether no host is given.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    fn allows(&self, host: &Host) -> bool {
        match host {
            Host::Ip(ip) => ip.is_loopback() || self.0.contains(&Allowed::Ip(*ip)),
            Host::Name(name) => {
                name == "localhost" || self.0.contains(&Allowed::Name(name.clone()))
            }
        }
    }
}

/// A host as a request names it, normalised.
#[derive(Debug, PartialEq, Eq)]
enum Host {
    Ip(IpAddr),
    Name(String),
}

/// An IPv4-mapped IPv6 address as the IPv4 address it maps.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    }
}

/// A DNS name in lower case without its trailing dot, if it is one (letters, digits, `-`,
/// `_` and dots between non-empty labels).
fn normalise_name(name: &str) -> Option<String> {
    let name = name.strip_suffix('.').unwrap_or(name);
    let ok = !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        });
    ok.then(|| name.to_ascii_lowercase())
}

/// A host without a port: `[v6]`, a bare address or a name.
fn parse_host(host: &str) -> Option<Host> {
    if let Some(inner) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        return inner
            .parse::<std::net::Ipv6Addr>()
            .ok()
            .map(|ip| Host::Ip(canonical(IpAddr::V6(ip))));
    }
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Some(Host::Ip(canonical(ip)));
    }
    // `127.0.0.1.` is the address with a trailing dot.
    if let Some(ip) = host
        .strip_suffix('.')
        .and_then(|h| std::net::Ipv4Addr::from_str(h).ok())
    {
        return Some(Host::Ip(IpAddr::V4(ip)));
    }
    normalise_name(host).map(Host::Name)
}

/// The host of an authority (`host[:port]`), if it is well formed.
fn authority_host(authority: &str) -> Option<Host> {
    let (host, port) = if authority.starts_with('[') {
        let end = authority.find(']')?;
        let (host, rest) = authority.split_at(end + 1);
        (
            host,
            rest.strip_prefix(':')
                .or(Some(rest).filter(|r| r.is_empty()))?,
        )
    } else {
        match authority.split_once(':') {
            Some((host, port)) => (host, port),
            None => (authority, ""),
        }
    };
    if !port.bytes().all(|b| b.is_ascii_digit()) || port.len() > 5 {
        return None;
    }
    parse_host(host)
}

/// Why a request is refused: the status and the message of its JSON error.
#[derive(Debug)]
pub struct Refusal {
    /// 403, or 400 for a request that HTTP itself says is malformed.
    pub status: StatusCode,
    /// The message, naming the header and the setting.
    pub message: String,
}

fn forbidden(message: String) -> Refusal {
    Refusal {
        status: StatusCode::FORBIDDEN,
        message,
    }
}

/// Check the request's `Host`, request-target authority, `Origin` and `Sec-Fetch-Site`.
///
/// The headers are read in one pass (this runs for every request), and the refusals are given
/// in that order: Host, target, Origin, Sec-Fetch-Site.
pub fn check(
    allowed: &AllowedHosts,
    version: Version,
    uri: &Uri,
    headers: &HeaderMap,
) -> Result<(), Refusal> {
    let refuse_host = |header: &str, value: &str| {
        forbidden(format!(
            "{header} {value:?} is not allowed: the front door answers loopback names (localhost, 127.0.0.1, [::1]) and the hosts given to {SETTING}; nothing was sent"
        ))
    };
    let (mut host, mut hosts) = (None, 0usize);
    let (mut bad_origin, mut cross_site) = (None, false);
    for (name, value) in headers {
        if name == header::HOST {
            host = Some(value);
            hosts += 1;
        } else if name == header::ORIGIN {
            if bad_origin.is_none() && !origin_allowed(allowed, value.as_bytes()) {
                bad_origin = Some(value);
            }
        } else if name == super::names::SEC_FETCH_SITE {
            cross_site |= value.as_bytes().eq_ignore_ascii_case(b"cross-site");
        }
    }
    match (host, hosts) {
        (Some(_), 2..) => {
            return Err(Refusal {
                status: StatusCode::BAD_REQUEST,
                message: "more than one Host header; nothing was sent".into(),
            })
        }
        (Some(value), _) => {
            if !authority_allowed(allowed, value.to_str().unwrap_or("")) {
                return Err(refuse_host("Host", &String::from_utf8_lossy(value.as_bytes())));
            }
        }
        (None, _) if version == Version::HTTP_11 => {
            return Err(Refusal {
                status: StatusCode::BAD_REQUEST,
                message: format!(
                    "an HTTP/1.1 request must carry a Host header (loopback, or a host given to {SETTING}); nothing was sent"
                ),
            })
        }
        // HTTP/1.0 without Host: no browser sends that.
        (None, _) => {}
    }
    // An absolute request target (`GET http://host/path`) names the host that counts.
    if let Some(authority) = uri.authority() {
        if !authority_allowed(allowed, authority.as_str()) {
            return Err(refuse_host("the request target's host", authority.as_str()));
        }
    }
    if let Some(origin) = bad_origin {
        return Err(forbidden(format!(
            "Origin {:?} is not allowed: a page may call the front door only from a loopback origin or one of the hosts given to {SETTING}; nothing was sent",
            String::from_utf8_lossy(origin.as_bytes())
        )));
    }
    if cross_site {
        return Err(forbidden(format!(
            "Sec-Fetch-Site: cross-site: a page of another site may not call the front door (the hosts given to {SETTING} do not change that); nothing was sent"
        )));
    }
    Ok(())
}

/// Whether an authority (`host[:port]`) names an allowed host. The loopback names that nearly
/// every request carries are recognised before any parsing.
fn authority_allowed(allowed: &AllowedHosts, authority: &str) -> bool {
    let host = authority
        .rsplit_once(':')
        .filter(|(_, port)| port.len() <= 5 && port.bytes().all(|b| b.is_ascii_digit()))
        .map_or(authority, |(host, _)| host);
    if host == "127.0.0.1" || host.eq_ignore_ascii_case("localhost") {
        return true;
    }
    authority_host(authority).is_some_and(|h| allowed.allows(&h))
}

/// Whether an `Origin` is `http` or `https` on an allowed host, with no path.
fn origin_allowed(allowed: &AllowedHosts, origin: &[u8]) -> bool {
    let Ok(text) = std::str::from_utf8(origin) else {
        return false;
    };
    text.strip_prefix("http://")
        .or_else(|| text.strip_prefix("https://"))
        .filter(|rest| !rest.contains('/'))
        .is_some_and(|authority| authority_allowed(allowed, authority))
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn with(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for (name, value) in pairs {
            headers.append(*name, HeaderValue::from_str(value).unwrap());
        }
        headers
    }

    fn allowed(hosts: &[&str]) -> AllowedHosts {
        AllowedHosts::parse(hosts).unwrap()
    }

    fn ok(hosts: &AllowedHosts, pairs: &[(&'static str, &str)]) -> bool {
        check(
            hosts,
            Version::HTTP_11,
            &Uri::from_static("/status"),
            &with(pairs),
        )
        .is_ok()
    }

    #[test]
    fn loopback_hosts_pass_and_others_do_not() {
        let none = AllowedHosts::default();
        for host in [
            "localhost",
            "LOCALHOST:8080",
            "localhost.",
            "localhost.:80",
            "127.0.0.1",
            "127.0.0.1:8081",
            "127.1.2.3",
            "[::1]",
            "[::1]:8080",
            "[::ffff:127.0.0.1]:1",
            "localhost:",
        ] {
            assert!(ok(&none, &[("host", host)]), "{host}");
        }
        for host in [
            "evil.example",
            "evil.example:8080",
            "localhost.evil.example",
            "10.0.0.5",
            "[::2]",
            "::1",
            "localhost:80:80",
            "localhost:port",
            "127.0.0.1:123456",
            "127.0.0.1:80:80",
            "127.0.0.1 ",
            "",
            "local host",
            "[::1",
        ] {
            let refusal = check(
                &none,
                Version::HTTP_11,
                &Uri::from_static("/"),
                &with(&[("host", host)]),
            )
            .unwrap_err();
            assert_eq!(refusal.status, StatusCode::FORBIDDEN, "{host}");
            assert!(
                refusal.message.contains("Host") && refusal.message.contains(SETTING),
                "{}",
                refusal.message
            );
        }
    }

    #[test]
    fn the_setting_widens_the_hosts() {
        let hosts = allowed(&["RP.Example.com.", "10.0.0.5", "[fe80::1]", "::2"]);
        for host in [
            "rp.example.com",
            "rp.example.com.:443",
            "RP.EXAMPLE.COM",
            "10.0.0.5:8080",
            "[fe80::1]",
            "[::2]:1",
        ] {
            assert!(ok(&hosts, &[("host", host)]), "{host}");
        }
        assert!(!ok(&hosts, &[("host", "example.com")]));
        assert!(hosts.contains("10.0.0.5") && hosts.contains("rp.example.com"));
        assert!(AllowedHosts::parse(&["rp.example.com:8080"]).is_err());
        assert!(AllowedHosts::parse(&["bad host"]).is_err());
    }

    #[test]
    fn origins_and_fetch_site() {
        let hosts = allowed(&["app.example"]);
        let host = ("host", "localhost:8080");
        for origin in [
            "http://localhost:3000",
            "https://app.example",
            "http://[::1]",
        ] {
            assert!(ok(&hosts, &[host, ("origin", origin)]), "{origin}");
        }
        for origin in [
            "null",
            "http://evil.example",
            "ftp://localhost",
            "http://localhost/path",
            "localhost",
        ] {
            assert!(!ok(&hosts, &[host, ("origin", origin)]), "{origin}");
        }
        assert!(!ok(&hosts, &[host, ("sec-fetch-site", "cross-site")]));
        assert!(ok(&hosts, &[host, ("sec-fetch-site", "same-origin")]));
        assert!(ok(&hosts, &[host, ("sec-fetch-site", "none")]));
    }

    #[test]
    fn missing_or_doubled_host() {
        let none = AllowedHosts::default();
        let uri = Uri::from_static("/");
        assert!(check(&none, Version::HTTP_10, &uri, &HeaderMap::new()).is_ok());
        let refusal = check(&none, Version::HTTP_11, &uri, &HeaderMap::new()).unwrap_err();
        assert_eq!(refusal.status, StatusCode::BAD_REQUEST);
        let two = with(&[("host", "localhost"), ("host", "localhost")]);
        assert_eq!(
            check(&none, Version::HTTP_11, &uri, &two)
                .unwrap_err()
                .status,
            StatusCode::BAD_REQUEST
        );
        // An absolute target names the host that counts.
        let absolute = Uri::from_static("http://evil.example/status");
        let localhost = with(&[("host", "localhost")]);
        assert!(check(&none, Version::HTTP_11, &absolute, &localhost).is_err());
        let absolute = Uri::from_static("http://localhost:8080/status");
        assert!(check(&none, Version::HTTP_11, &absolute, &localhost).is_ok());
    }
}
