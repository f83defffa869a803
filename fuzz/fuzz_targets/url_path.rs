//! URL path to event: arbitrary paths through `http::parse_path`, on both sides, as given and
//! behind the side's prefix (`/server/`, `/client/`).
//!
//! Properties: no panic; an accepted noun is 1..=1024 bytes of segments that are not empty,
//! not `.` or `..`, and made of `A-Z a-z 0-9 _ - .` only; an accepted client identity (server
//! side) is such a segment or an IP address; the parameters round-trip: each one
//! percent-encoded (everything but letters and digits, or only `%`, `/` and what is not
//! printable ASCII), the path rebuilt and parsed again gives the same target.

#![no_main]

use libfuzzer_sys::fuzz_target;
use percent_encoding::{utf8_percent_encode, AsciiSet, CONTROLS, NON_ALPHANUMERIC};
use restpipe::handler::Side;
use restpipe::http::{parse_path, Target};

/// The least a parameter needs encoded: `%`, `/`, controls and non-ASCII.
const MINIMAL: &AsciiSet = &CONTROLS.add(b'%').add(b'/');

fuzz_target!(|data: &[u8]| {
    let Ok(path) = std::str::from_utf8(data) else {
        return;
    };
    for side in [Side::Client, Side::Server] {
        check(side, path);
        check(side, &format!("{}{path}", prefix(side)));
    }
});

fn prefix(side: Side) -> &'static str {
    match side {
        Side::Client => "/server/",
        Side::Server => "/client/",
    }
}

fn segment_ok(segment: &str) -> bool {
    !segment.is_empty()
        && segment != "."
        && segment != ".."
        && segment
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
}

fn check(side: Side, path: &str) {
    let Ok(target) = parse_path(side, path) else {
        return;
    };
    assert!(
        !target.noun.is_empty() && target.noun.len() <= 1024,
        "{path:?}"
    );
    for segment in target.noun.split('/') {
        assert!(
            segment_ok(segment),
            "{path:?} gave the noun {:?}",
            target.noun
        );
    }
    match side {
        Side::Client => assert_eq!(target.client, None),
        Side::Server => {
            let client = target
                .client
                .as_deref()
                .expect("a server side target names a client");
            assert!(
                segment_ok(client) || client.parse::<std::net::IpAddr>().is_ok(),
                "{path:?} gave the client {client:?}"
            );
        }
    }
    for set in [NON_ALPHANUMERIC, MINIMAL] {
        let rebuilt = rebuild(side, &target, set);
        assert_eq!(
            parse_path(side, &rebuilt).as_ref(),
            Ok(&target),
            "{path:?} rebuilt as {rebuilt:?}"
        );
    }
}

fn rebuild(side: Side, target: &Target, set: &'static AsciiSet) -> String {
    let mut path = prefix(side).to_string();
    if let Some(client) = &target.client {
        path.push_str(client);
        path.push('/');
    }
    path.push_str(&target.noun);
    if !target.parameters.is_empty() {
        path.push_str("//");
        let encoded: Vec<String> = target
            .parameters
            .iter()
            .map(|p| utf8_percent_encode(p, set).to_string())
            .collect();
        path.push_str(&encoded.join("/"));
    }
    path
}
