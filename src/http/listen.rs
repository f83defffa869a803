//! Where and how the front door listens: a TCP address or a Unix socket, the hosts it
//! answers, its timeouts and its connection cap.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;

use super::{AllowedHosts, HttpLimits};

/// Where the front door listens: a TCP address, or a Unix socket (`unix:/path/to/node.sock`).
#[derive(Clone, Debug, PartialEq, Eq, serde::Deserialize)]
#[serde(try_from = "String")]
pub enum HttpListen {
    /// A TCP address.
    Tcp(SocketAddr),
    /// The path of a Unix socket.
    Unix(PathBuf),
}

impl FromStr for HttpListen {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                return Err(
                    "unix: needs the path of the socket, as in unix:/run/restpipe/node.sock".into(),
                );
            }
            // sockaddr_un holds 108 bytes, the last a NUL.
            if path.len() > 107 {
                return Err(format!("the socket path {path:?} is over 107 bytes"));
            }
            return Ok(HttpListen::Unix(PathBuf::from(path)));
        }
        s.parse::<SocketAddr>().map(HttpListen::Tcp).map_err(|_| {
            format!("{s:?} is neither an address with a port (127.0.0.1:8080) nor unix:<path>")
        })
    }
}

impl TryFrom<String> for HttpListen {
    type Error = String;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl fmt::Display for HttpListen {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HttpListen::Tcp(addr) => write!(f, "{addr}"),
            HttpListen::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

impl From<SocketAddr> for HttpListen {
    fn from(addr: SocketAddr) -> Self {
        HttpListen::Tcp(addr)
    }
}

/// How the front door listens and whom it answers, besides [`HttpOptions`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServeOptions {
    /// Hosts that `Host` and `Origin` may name besides loopback.
    pub allowed_hosts: AllowedHosts,
    /// Timeouts and the connection cap.
    pub limits: HttpLimits,
    /// The permissions of a Unix socket (`0o660`: its owner and group may call).
    pub socket_mode: u32,
}

impl Default for ServeOptions {
    fn default() -> Self {
        ServeOptions {
            allowed_hosts: AllowedHosts::default(),
            limits: HttpLimits::default(),
            socket_mode: 0o660,
        }
    }
}
