//! A raw peer: a peer driven by hand, frame by frame, over TLS or plain TCP, to play a
//! misbehaving client (or server).
//!
//! It speaks the wire protocol from the kit's own compile of `proto/restpipe.proto`
//! ([`proto`]) and its own length-prefix framing ([`encode`]), not through `restpipe`'s
//! internals: a peer written against its own copy of the schema, as a peer of another release
//! would be.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use prost::Message;
use restpipe::handler::Request;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use crate::certs::SERVER_NAME;
use crate::wait::within;

use proto::{frame::Kind, Frame};

/// The wire schema, `restpipe.v1`, compiled by the kit's `build.rs` from
/// `proto/restpipe.proto`.
#[allow(missing_docs, clippy::all)]
pub mod proto {
    include!(concat!(env!("OUT_DIR"), "/restpipe.v1.rs"));
}

/// The largest frame [`RawPeer::recv_any`] reads (64 MiB); a longer prefix is an error.
pub const MAX_READ: usize = 64 * 1024 * 1024;

/// `frame` as it goes on the wire: a 4-byte big-endian length, then the protobuf encoding.
pub fn encode(frame: &Frame) -> Vec<u8> {
    let payload = frame.encode_to_vec();
    let len = u32::try_from(payload.len()).expect("a test frame shorter than 4 GiB");
    let mut bytes = Vec::with_capacity(4 + payload.len());
    bytes.extend_from_slice(&len.to_be_bytes());
    bytes.extend_from_slice(&payload);
    bytes
}

// A raw peer

/// A peer driven by hand, frame by frame, over any stream (TLS or plain TCP).
pub struct RawPeer<S> {
    stream: S,
}

/// A raw peer over a client-side TLS stream.
pub type TlsPeer = RawPeer<tokio_rustls::client::TlsStream<TcpStream>>;

impl TlsPeer {
    /// Open TCP and TLS to `addr` with `connector`, verifying the server as `localhost`. On
    /// TLS 1.3 a client whose certificate the server refuses can still finish its side of
    /// the handshake; the refusal then shows on the first read.
    pub async fn connect_tls(addr: SocketAddr, connector: &TlsConnector) -> io::Result<TlsPeer> {
        let tcp = TcpStream::connect(addr).await?;
        let name = ServerName::try_from(SERVER_NAME).expect("server name");
        let stream = connector.connect(name, tcp).await?;
        Ok(RawPeer { stream })
    }

    /// The local address of the TCP socket (what the server logs as `peer`).
    pub fn local_addr(&self) -> SocketAddr {
        self.stream.get_ref().0.local_addr().expect("local address")
    }
}

impl RawPeer<TcpStream> {
    /// Open a plain TCP connection to `addr`.
    pub async fn connect_tcp(addr: SocketAddr) -> io::Result<RawPeer<TcpStream>> {
        Ok(RawPeer {
            stream: TcpStream::connect(addr).await?,
        })
    }

    /// The local address of the socket (what the server logs as `peer`).
    pub fn local_addr(&self) -> SocketAddr {
        self.stream.local_addr().expect("local address")
    }
}

/// A client hello with `protocol_version`.
pub fn client_hello(identity: &str, protocol_version: u32) -> Frame {
    hello_frame(proto::Role::Client, identity, protocol_version)
}

/// A hello of `role` with `protocol_version`.
#[allow(clippy::needless_update)]
pub fn hello_frame(role: proto::Role, identity: &str, protocol_version: u32) -> Frame {
    Frame {
        id: 0,
        kind: Some(Kind::Hello(proto::Hello {
            protocol_version,
            role: role as i32,
            software_version: "raw-test-peer".into(),
            identity: identity.into(),
            max_frame_bytes: restpipe::wire::DEFAULT_MAX_FRAME as u64,
            // Fields a later schema adds keep their defaults, as an older peer's would.
            ..Default::default()
        })),
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> RawPeer<S> {
    /// A raw peer over `stream` (for example a server-side TLS stream, to play a server).
    pub fn new(stream: S) -> Self {
        RawPeer { stream }
    }

    /// Write raw bytes.
    pub async fn send_raw(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.stream.write_all(bytes).await?;
        self.stream.flush().await
    }

    /// Write one frame, length-prefixed.
    pub async fn send(&mut self, frame: &Frame) -> io::Result<()> {
        self.send_raw(&encode(frame)).await
    }

    /// Write one frame whose payload is `payload`, as is, with a correct length prefix.
    pub async fn send_payload(&mut self, payload: &[u8]) -> io::Result<()> {
        let mut bytes = (payload.len() as u32).to_be_bytes().to_vec();
        bytes.extend_from_slice(payload);
        self.send_raw(&bytes).await
    }

    /// Read the next frame, whatever it is; `None` on a clean end of stream.
    pub async fn recv_any(&mut self) -> io::Result<Option<Frame>> {
        let mut prefix = [0u8; 4];
        match self.stream.read_exact(&mut prefix).await {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
            Err(e) => return Err(e),
        }
        let len = u32::from_be_bytes(prefix) as usize;
        if len > MAX_READ {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "frame too large",
            ));
        }
        let mut payload = vec![0u8; len];
        self.stream.read_exact(&mut payload).await?;
        Frame::decode(&payload[..])
            .map(Some)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
    }

    /// Read the next frame that is not a heartbeat, answering pings on the way; `None` on a
    /// clean end of stream. Fails the test after 5 s.
    pub async fn recv(&mut self) -> io::Result<Option<Frame>> {
        within(Duration::from_secs(5), "waiting for a frame", async {
            loop {
                match self.recv_any().await? {
                    Some(Frame {
                        kind: Some(Kind::Ping(ping)),
                        ..
                    }) => {
                        let pong = Frame {
                            id: 0,
                            kind: Some(Kind::Pong(proto::Pong { nonce: ping.nonce })),
                        };
                        self.send(&pong).await?;
                    }
                    Some(Frame {
                        kind: Some(Kind::Pong(_)),
                        ..
                    }) => {}
                    other => return Ok(other),
                }
            }
        })
        .await
    }

    /// Send a client hello with `protocol_version` and return the server's hello.
    pub async fn hello(&mut self, identity: &str, protocol_version: u32) -> proto::Hello {
        self.hello_offering(identity, protocol_version, &[]).await
    }

    /// Send a client hello with `protocol_version` that offers `features`, and return the
    /// server's hello.
    pub async fn hello_offering(
        &mut self,
        identity: &str,
        protocol_version: u32,
        features: &[&str],
    ) -> proto::Hello {
        let mut hello = client_hello(identity, protocol_version);
        if let Some(Kind::Hello(h)) = hello.kind.as_mut() {
            h.features = features.iter().map(|f| f.to_string()).collect();
        }
        self.send(&hello).await.expect("send hello");
        match self.recv().await.expect("read the server's hello") {
            Some(Frame {
                kind: Some(Kind::Hello(hello)),
                ..
            }) => hello,
            other => panic!("expected the server's hello, got {other:?}"),
        }
    }

    /// Read and discard until the server ends the stream (clean end or error). Returns the
    /// frames read on the way. Fails the test if the stream stays open for 5 s.
    pub async fn expect_end(&mut self) -> Vec<Frame> {
        within(
            Duration::from_secs(5),
            "waiting for the server to hang up",
            async {
                let mut frames = Vec::new();
                loop {
                    match self.recv_any().await {
                        Ok(Some(frame)) => frames.push(frame),
                        Ok(None) | Err(_) => return frames,
                    }
                }
            },
        )
        .await
    }
}

/// An event frame with request id `id` that carries `request`, with a 5 s timeout.
#[allow(clippy::needless_update)]
pub fn event_frame(id: u64, request: Request) -> Frame {
    Frame {
        id,
        kind: Some(Kind::Event(proto::Event {
            verb: request.verb,
            noun: request.noun,
            parameters: request.parameters,
            query: request.query,
            content_type: request.content_type,
            body: request.body,
            timeout_ms: 5000,
            ..Default::default()
        })),
    }
}
