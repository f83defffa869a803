//! Mutual TLS: loading the PEM files, building the rustls configurations, and running a
//! handshake within a time limit.
//!
//! The server requires a client certificate that chains to the configured CA; the client
//! verifies the server's chain and name. Both sides learn the peer's identity from its
//! certificate (subject CN, else first DNS SAN). There is no plaintext mode and no way to skip
//! verification. Only TLS 1.3 is spoken: under 1.2 a client certificate, and so the identity,
//! would cross the network in clear text.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::crypto::ring::default_provider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use tokio::net::TcpStream;
use tokio_rustls::{client, server, TlsAcceptor, TlsConnector};

/// The ALPN protocol name of the pipe. Both sides offer it; a peer of the previous release,
/// which offers none, is still accepted (ALPN is then simply not negotiated), while a client
/// that offers only other protocols is refused by the server.
pub const ALPN: &[u8] = b"restpipe/1";

/// Errors of loading TLS material or of a handshake.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A PEM file could not be read or holds nothing usable.
    #[error("{path}: {message}")]
    File {
        /// The file.
        path: PathBuf,
        /// What was wrong, and how to fix it.
        message: String,
    },
    /// The material was read but rustls refused it.
    #[error("TLS configuration refused: {0}")]
    Config(String),
    /// The handshake did not finish in time.
    #[error("TLS handshake timed out after {0:?}")]
    HandshakeTimeout(Duration),
    /// The handshake failed.
    #[error("TLS handshake failed: {0}")]
    Handshake(#[source] std::io::Error),
    /// The peer's certificate names no identity.
    #[error("peer certificate has neither a subject CN nor a DNS name")]
    NoIdentity,
    /// The name to verify the server against is not a valid DNS name or IP address.
    #[error("invalid server name {0:?}")]
    ServerName(String),
}

/// The PEM files of one node: the CA to trust, its own certificate chain and its key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsFiles {
    /// The CA certificate(s) peers must chain to.
    pub ca: PathBuf,
    /// This node's certificate (chain).
    pub cert: PathBuf,
    /// This node's private key.
    pub key: PathBuf,
}

/// TLS material in memory: trusted CA certificates, own chain and key.
#[derive(Debug)]
pub struct TlsMaterial {
    roots: Vec<CertificateDer<'static>>,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    identity: String,
}

impl Clone for TlsMaterial {
    fn clone(&self) -> Self {
        TlsMaterial {
            roots: self.roots.clone(),
            chain: self.chain.clone(),
            key: self.key.clone_key(),
            identity: self.identity.clone(),
        }
    }
}

impl TlsMaterial {
    /// Read the three PEM files.
    pub fn from_files(files: &TlsFiles) -> Result<Self, TlsError> {
        let read = |path: &Path, what: &str| {
            std::fs::read(path).map_err(|e| TlsError::File {
                path: path.to_owned(),
                message: format!(
                    "cannot read the {what}: {e} (make one with `restpipe-certs dev`, or pass its path)"
                ),
            })
        };
        let ca = read(&files.ca, "CA certificate")?;
        let cert = read(&files.cert, "certificate")?;
        let key = read(&files.key, "private key")?;
        Self::from_pem_parts(&ca, &cert, &key).map_err(|(which, message)| TlsError::File {
            path: match which {
                Part::Ca => files.ca.clone(),
                Part::Cert => files.cert.clone(),
                Part::Key => files.key.clone(),
            },
            message,
        })
    }

    /// Build from PEM text: the CA certificate(s), own certificate chain, own key.
    pub fn from_pem(ca: &str, cert: &str, key: &str) -> Result<Self, TlsError> {
        Self::from_pem_parts(ca.as_bytes(), cert.as_bytes(), key.as_bytes())
            .map_err(|(which, message)| TlsError::Config(format!("{which:?}: {message}")))
    }

    fn from_pem_parts(ca: &[u8], cert: &[u8], key: &[u8]) -> Result<Self, (Part, String)> {
        let certs = |pem: &[u8], part: Part| {
            let list: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(pem)
                .collect::<Result<_, _>>()
                .map_err(|e| (part, format!("not valid PEM certificates: {e}")))?;
            if list.is_empty() {
                return Err((part, "holds no PEM certificate".to_string()));
            }
            Ok(list)
        };
        let roots = certs(ca, Part::Ca)?;
        let chain = certs(cert, Part::Cert)?;
        let key = PrivateKeyDer::from_pem_slice(key)
            .map_err(|e| (Part::Key, format!("holds no usable PEM private key: {e}")))?;
        let identity = restpipe_certs::identity_from_der(&chain[0]).ok_or((
            Part::Cert,
            "certificate has neither a subject CN nor a DNS name to use as identity".to_string(),
        ))?;
        Ok(TlsMaterial {
            roots,
            chain,
            key,
            identity,
        })
    }

    /// This node's identity, from its own certificate.
    pub fn identity(&self) -> &str {
        &self.identity
    }

    fn root_store(&self) -> Result<RootCertStore, TlsError> {
        let mut store = RootCertStore::empty();
        for root in &self.roots {
            store
                .add(root.clone())
                .map_err(|e| TlsError::Config(format!("CA certificate refused: {e}")))?;
        }
        Ok(store)
    }

    /// The acceptor of a server node: client certificates chaining to the CA are required.
    pub fn acceptor(&self) -> Result<TlsAcceptor, TlsError> {
        let provider = Arc::new(default_provider());
        let verifier = WebPkiClientVerifier::builder_with_provider(
            Arc::new(self.root_store()?),
            provider.clone(),
        )
        .build()
        .map_err(|e| TlsError::Config(e.to_string()))?;
        let mut config = ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| TlsError::Config(e.to_string()))?
            .with_client_cert_verifier(verifier)
            .with_single_cert(self.chain.clone(), self.key.clone_key())
            .map_err(|e| TlsError::Config(format!("certificate and key do not fit: {e}")))?;
        config.alpn_protocols = vec![ALPN.to_vec()];
        Ok(TlsAcceptor::from(Arc::new(config)))
    }

    /// The connector of a client node: the server must chain to the CA, and its certificate
    /// must name the server name it is dialled by.
    pub fn connector(&self) -> Result<TlsConnector, TlsError> {
        let provider = Arc::new(default_provider());
        let mut config = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| TlsError::Config(e.to_string()))?
            .with_root_certificates(self.root_store()?)
            .with_client_auth_cert(self.chain.clone(), self.key.clone_key())
            .map_err(|e| TlsError::Config(format!("certificate and key do not fit: {e}")))?;
        config.alpn_protocols = vec![ALPN.to_vec()];
        Ok(TlsConnector::from(Arc::new(config)))
    }
}

#[derive(Debug, Clone, Copy)]
enum Part {
    Ca,
    Cert,
    Key,
}

/// The identity named by the first certificate of a peer's chain.
fn peer_identity(certs: Option<&[CertificateDer<'static>]>) -> Result<String, TlsError> {
    certs
        .and_then(|c| c.first())
        .and_then(|c| restpipe_certs::identity_from_der(c))
        .ok_or(TlsError::NoIdentity)
}

/// Accept a TLS connection on the server side within `timeout`. Returns the stream and the
/// client's identity.
pub async fn accept(
    acceptor: &TlsAcceptor,
    tcp: TcpStream,
    timeout: Duration,
) -> Result<(server::TlsStream<TcpStream>, String), TlsError> {
    let stream = tokio::time::timeout(timeout, acceptor.accept(tcp))
        .await
        .map_err(|_| TlsError::HandshakeTimeout(timeout))?
        .map_err(TlsError::Handshake)?;
    let identity = peer_identity(stream.get_ref().1.peer_certificates())?;
    Ok((stream, identity))
}

/// Open a TLS connection on the client side within `timeout`, verifying the server against
/// `server_name`. Returns the stream and the server's identity.
pub async fn connect(
    connector: &TlsConnector,
    server_name: &str,
    tcp: TcpStream,
    timeout: Duration,
) -> Result<(client::TlsStream<TcpStream>, String), TlsError> {
    let name = ServerName::try_from(server_name.to_string())
        .map_err(|_| TlsError::ServerName(server_name.to_string()))?;
    let stream = tokio::time::timeout(timeout, connector.connect(name, tcp))
        .await
        .map_err(|_| TlsError::HandshakeTimeout(timeout))?
        .map_err(TlsError::Handshake)?;
    let identity = peer_identity(stream.get_ref().1.peer_certificates())?;
    Ok((stream, identity))
}

/// A short word for why a handshake was refused, for logs and metrics.
pub fn refusal_reason(err: &TlsError) -> &'static str {
    match err {
        TlsError::HandshakeTimeout(_) => "timeout",
        TlsError::NoIdentity => "no_identity",
        TlsError::Handshake(io) => {
            let inner = io.get_ref().and_then(|e| e.downcast_ref::<rustls::Error>());
            match inner {
                Some(rustls::Error::NoCertificatesPresented) => "no_client_cert",
                Some(rustls::Error::InvalidCertificate(cert_err)) => match cert_err {
                    rustls::CertificateError::Expired
                    | rustls::CertificateError::ExpiredContext { .. } => "expired",
                    rustls::CertificateError::UnknownIssuer => "unknown_issuer",
                    rustls::CertificateError::NotValidForName
                    | rustls::CertificateError::NotValidForNameContext { .. } => "bad_name",
                    _ => "bad_certificate",
                },
                Some(rustls::Error::PeerIncompatible(_) | rustls::Error::NoApplicationProtocol) => {
                    "incompatible"
                }
                Some(rustls::Error::InvalidMessage(_)) => "not_tls",
                Some(rustls::Error::AlertReceived(_)) => "alert",
                Some(_) => "tls_error",
                None => "io_error",
            }
        }
        _ => "other",
    }
}
