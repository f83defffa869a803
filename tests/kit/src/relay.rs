//! A TCP relay between a client and a server that can stop forwarding without closing
//! ([`Relay::pause`]), slow down ([`Relay::throttle`]) or cut every connection at once
//! ([`Relay::cut`]).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::AbortHandle;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
struct RelayState {
    /// Whether bytes flow at all.
    forwarding: bool,
    /// Bytes per second in each direction of each connection; `None` for no limit.
    rate: Option<u64>,
}

/// A TCP relay on `127.0.0.1:0` in front of `target`. It forwards both ways until told to
/// pause (bytes stop flowing, sockets stay open: a peer that went silent), to slow down
/// ([`Relay::throttle`]: a slow link), or to cut (every relayed connection is closed at once:
/// the network broke). New connections keep being accepted whatever it was told.
pub struct Relay {
    addr: SocketAddr,
    state: watch::Sender<RelayState>,
    links: Arc<Mutex<Vec<AbortHandle>>>,
    accept: AbortHandle,
}

impl Relay {
    /// Start relaying to `target`.
    pub async fn start(target: SocketAddr) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind relay");
        let addr = listener.local_addr().expect("relay address");
        let state = watch::Sender::new(RelayState {
            forwarding: true,
            rate: None,
        });
        let links: Arc<Mutex<Vec<AbortHandle>>> = Arc::default();
        let accept = tokio::spawn({
            let state = state.clone();
            let links = links.clone();
            async move {
                loop {
                    let Ok((inbound, _)) = listener.accept().await else {
                        continue;
                    };
                    let Ok(outbound) = TcpStream::connect(target).await else {
                        continue;
                    };
                    let _ = inbound.set_nodelay(true);
                    let _ = outbound.set_nodelay(true);
                    let (in_read, in_write) = inbound.into_split();
                    let (out_read, out_write) = outbound.into_split();
                    let up = tokio::spawn(pump(in_read, out_write, state.subscribe()));
                    let down = tokio::spawn(pump(out_read, in_write, state.subscribe()));
                    let mut links = links.lock().unwrap_or_else(|p| p.into_inner());
                    links.push(up.abort_handle());
                    links.push(down.abort_handle());
                }
            }
        })
        .abort_handle();
        Relay {
            addr,
            state,
            links,
            accept,
        }
    }

    /// Where clients should dial.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stop forwarding in both directions, keeping every socket open.
    pub fn pause(&self) {
        self.state.send_modify(|s| s.forwarding = false);
    }

    /// Forward again.
    pub fn resume(&self) {
        self.state.send_modify(|s| s.forwarding = true);
    }

    /// Forward at most `bytes_per_second` in each direction of each connection (`None`: as
    /// fast as possible).
    pub fn throttle(&self, bytes_per_second: Option<u64>) {
        self.state.send_modify(|s| s.rate = bytes_per_second);
    }

    /// Close every relayed connection now (both ends see the socket close, without any TLS
    /// goodbye). The relay keeps accepting new connections.
    pub fn cut(&self) {
        let links = std::mem::take(&mut *self.links.lock().unwrap_or_else(|p| p.into_inner()));
        for link in links {
            link.abort();
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut();
    }
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut state: watch::Receiver<RelayState>,
) {
    // Chunks stay small so that a throttled link trickles rather than bursts.
    let mut buf = vec![0u8; 16 * 1024];
    let mut next_send = tokio::time::Instant::now();
    loop {
        if state.wait_for(|s| s.forwarding).await.is_err() {
            return;
        }
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        // Paused while the read was pending: hold the bytes until forwarding resumes.
        let Ok(now) = state.wait_for(|s| s.forwarding).await.map(|s| *s) else {
            return;
        };
        if let Some(rate) = now.rate {
            let start = next_send.max(tokio::time::Instant::now());
            next_send = start + Duration::from_secs_f64(n as f64 / rate.max(1) as f64);
            tokio::time::sleep_until(next_send).await;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    let _ = to.shutdown().await;
}
