//! The server's registry of connected clients, by identity.
//!
//! A newer connection with an identity already present replaces the older one (the caller
//! closes it). A client can be found by identity, or by IP address while exactly one connected
//! client has that address (RestPipe routed by IP). Waiters are woken on every change.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::watch;

use crate::connection::Connection;
use crate::error::CallError;

/// Connected clients by identity.
#[derive(Debug)]
pub struct Registry {
    clients: Mutex<HashMap<String, Connection>>,
    changed: watch::Sender<u64>,
}

impl Default for Registry {
    fn default() -> Self {
        Registry {
            clients: Mutex::new(HashMap::new()),
            changed: watch::Sender::new(0),
        }
    }
}

impl Registry {
    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<String, Connection>> {
        crate::util::lock(&self.clients)
    }

    fn notify(&self) {
        self.changed.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// Add a connection; returns the one it replaces, which the caller should close. The
    /// second value is the count of clients now connected.
    pub fn insert(&self, conn: Connection) -> (Option<Connection>, usize) {
        let (old, count) = {
            let mut map = self.map();
            let old = map.insert(conn.peer().identity.clone(), conn);
            (old, map.len())
        };
        self.notify();
        (old, count)
    }

    /// Remove `conn` if it is still the registered connection of its identity. Returns the
    /// count of clients now connected, or `None` when `conn` was not registered (replaced).
    pub fn remove(&self, conn: &Connection) -> Option<usize> {
        let removed = {
            let mut map = self.map();
            let identity = &conn.peer().identity;
            if map.get(identity).is_some_and(|c| c.id() == conn.id()) {
                map.remove(identity);
                Some(map.len())
            } else {
                None
            }
        };
        if removed.is_some() {
            self.notify();
        }
        removed
    }

    /// A receiver that sees every change of the registry (coalesced).
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// How many clients are connected.
    pub fn len(&self) -> usize {
        self.map().len()
    }

    /// Whether no client is connected.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every connected client, sorted by identity.
    pub fn all(&self) -> Vec<Connection> {
        let mut all: Vec<Connection> = self.map().values().cloned().collect();
        all.sort_by(|a, b| a.peer().identity.cmp(&b.peer().identity));
        all
    }

    /// The client named `target`: an identity, else an IP address that exactly one connected
    /// client has.
    pub fn find(&self, target: &str) -> Result<Connection, CallError> {
        let map = self.map();
        if let Some(conn) = map.get(target) {
            return Ok(conn.clone());
        }
        if let Ok(ip) = target.parse::<IpAddr>() {
            // On a dual-stack listener an IPv4 client shows as `::ffff:a.b.c.d`: compare the
            // canonical forms, so that it is found by its IPv4 address.
            let ip = ip.to_canonical();
            let has_ip = |c: &&Connection| c.peer().addr.ip().to_canonical() == ip;
            let mut matches = map.values().filter(has_ip);
            match (matches.next(), matches.next()) {
                (Some(conn), None) => return Ok(conn.clone()),
                (Some(_), Some(_)) => {
                    let mut names: Vec<&str> = map
                        .values()
                        .filter(has_ip)
                        .map(|c| c.peer().identity.as_str())
                        .collect();
                    names.sort_unstable();
                    return Err(CallError::Ambiguous(format!(
                        "{target} is the address of several clients ({}); name one by identity",
                        names.join(", ")
                    )));
                }
                _ => {}
            }
        }
        Err(CallError::NotConnected(format!(
            "client {target} is not connected"
        )))
    }

    /// The client named `target`, waiting up to `wait` for it to connect.
    pub async fn wait_for(&self, target: &str, wait: Duration) -> Result<Connection, CallError> {
        let mut changes = self.changed.subscribe();
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            match self.find(target) {
                Ok(conn) if !conn.is_closed() => return Ok(conn),
                Err(e @ CallError::Ambiguous(_)) => return Err(e),
                _ => {}
            }
            match tokio::time::timeout_at(deadline, changes.changed()).await {
                Ok(Ok(())) => continue,
                _ => {
                    return Err(CallError::NotConnected(format!(
                        "client {target} is not connected (waited {wait:?})"
                    )))
                }
            }
        }
    }
}
