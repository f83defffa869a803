//! Mutual TLS: loading the PEM files, building the rustls configurations, and running a
//! handshake within a time limit.
//!
//! The server requires a client certificate that chains to the configured CA; the client
//! verifies the server's chain and name. Both sides learn the peer's identity from its
//! certificate (subject CN, else first DNS SAN). There is no plaintext mode and no way to skip
//! verification. Only TLS 1.3 is spoken: under 1.2 a client certificate, and so the identity,
//! would cross the network in clear text.

mod peer;

pub use peer::{CertSummary, PeerCert};

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::client::danger::ServerCertVerifier;
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::ring::default_provider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{
    CertificateDer, CertificateRevocationListDer, PrivateKeyDer, ServerName, UnixTime,
};
use rustls::server::danger::ClientCertVerifier;
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
    /// A client's certificate names an IP address as its identity: it would shadow the lookup
    /// of clients by address.
    #[error("the client certificate's identity {0:?} is an IP address; identities must be names")]
    IpIdentity(String),
    /// The name to verify the server against is not a valid DNS name or IP address.
    #[error("invalid server name {0:?}")]
    ServerName(String),
}

/// The PEM files of one node: the CA to trust, its own certificate chain and its key, and
/// optionally a separate CA for client certificates and certificate revocation lists.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TlsFiles {
    /// The CA certificate(s) peers must chain to.
    pub ca: PathBuf,
    /// This node's certificate (chain).
    pub cert: PathBuf,
    /// This node's private key.
    pub key: PathBuf,
    /// Server: the CA certificate(s) client certificates must chain to, when not `ca`.
    pub client_ca: Option<PathBuf>,
    /// CRLs (PEM) whose revoked certificates are refused.
    pub crls: Vec<PathBuf>,
}

/// TLS material in memory: trusted CA certificates, own chain and key, revocation lists.
#[derive(Debug)]
pub struct TlsMaterial {
    roots: Vec<CertificateDer<'static>>,
    client_roots: Option<Vec<CertificateDer<'static>>>,
    crls: Vec<CertificateRevocationListDer<'static>>,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    identity: String,
}

impl Clone for TlsMaterial {
    fn clone(&self) -> Self {
        TlsMaterial {
            roots: self.roots.clone(),
            client_roots: self.client_roots.clone(),
            crls: self.crls.clone(),
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
        let mut material =
            Self::from_pem_parts(&ca, &cert, &key).map_err(|(which, message)| TlsError::File {
                path: match which {
                    Part::Ca => files.ca.clone(),
                    Part::Cert => files.cert.clone(),
                    Part::Key => files.key.clone(),
                },
                message,
            })?;
        if let Some(path) = &files.client_ca {
            let pem = read(path, "client CA certificate")?;
            let roots = pem_certificates(&pem).map_err(|message| TlsError::File {
                path: path.clone(),
                message,
            })?;
            material.client_roots = Some(roots);
        }
        for path in &files.crls {
            let pem = read(path, "certificate revocation list")?;
            let crls: Vec<_> = CertificateRevocationListDer::pem_slice_iter(&pem)
                .collect::<Result<_, _>>()
                .map_err(|e| TlsError::File {
                    path: path.clone(),
                    message: format!("not a valid PEM CRL: {e}"),
                })?;
            if crls.is_empty() {
                return Err(TlsError::File {
                    path: path.clone(),
                    message: "holds no PEM CRL (make one with `restpipe-certs crl`)".into(),
                });
            }
            material.crls.extend(crls);
        }
        // Refuse now what a handshake would refuse later: CRLs that do not parse or are not
        // signed by a trusted CA, a certificate that does not fit its key.
        material.acceptor()?;
        material.connector()?;
        Ok(material)
    }

    /// The same material, refusing also the certificates these CRLs (DER) revoke.
    pub fn with_crls(mut self, crls: Vec<CertificateRevocationListDer<'static>>) -> Self {
        self.crls = crls;
        self
    }

    /// Build from PEM text: the CA certificate(s), own certificate chain, own key.
    pub fn from_pem(ca: &str, cert: &str, key: &str) -> Result<Self, TlsError> {
        Self::from_pem_parts(ca.as_bytes(), cert.as_bytes(), key.as_bytes())
            .map_err(|(which, message)| TlsError::Config(format!("{which:?}: {message}")))
    }

    fn from_pem_parts(ca: &[u8], cert: &[u8], key: &[u8]) -> Result<Self, (Part, String)> {
        let roots = pem_certificates(ca).map_err(|m| (Part::Ca, m))?;
        let chain = pem_certificates(cert).map_err(|m| (Part::Cert, m))?;
        let key = PrivateKeyDer::from_pem_slice(key)
            .map_err(|e| (Part::Key, format!("holds no usable PEM private key: {e}")))?;
        let identity = restpipe_certs::identity_from_der(&chain[0]).ok_or((
            Part::Cert,
            "certificate has neither a subject CN nor a DNS name to use as identity".to_string(),
        ))?;
        Ok(TlsMaterial {
            roots,
            client_roots: None,
            crls: Vec::new(),
            chain,
            key,
            identity,
        })
    }

    /// This node's own certificate, as `/status` shows it.
    pub fn own_cert(&self) -> Result<PeerCert, TlsError> {
        PeerCert::from_chain(&self.chain)
    }

    /// This node's identity, from its own certificate.
    pub fn identity(&self) -> &str {
        &self.identity
    }

    fn root_store(roots: &[CertificateDer<'static>]) -> Result<RootCertStore, TlsError> {
        let mut store = RootCertStore::empty();
        for root in roots {
            store
                .add(root.clone())
                .map_err(|e| TlsError::Config(format!("CA certificate refused: {e}")))?;
        }
        Ok(store)
    }

    /// How a server node verifies client certificates: they must chain to the client CA
    /// (`--client-ca`, else the CA) and not be revoked by a CRL. A CRL that does not cover a
    /// certificate's issuer leaves it unchecked, rather than refused.
    pub fn client_verifier(&self) -> Result<Arc<dyn ClientCertVerifier>, TlsError> {
        let roots = self.client_roots.as_deref().unwrap_or(&self.roots);
        WebPkiClientVerifier::builder_with_provider(
            Arc::new(Self::root_store(roots)?),
            Arc::new(default_provider()),
        )
        .with_crls(self.crls.clone())
        .only_check_end_entity_revocation()
        .allow_unknown_revocation_status()
        .build()
        .map_err(|e| TlsError::Config(format!("client certificate verifier: {e}")))
    }

    /// How a client node verifies the server's certificate: it must chain to the CA, name the
    /// server name, and not be revoked by a CRL.
    pub fn server_verifier(&self) -> Result<Arc<WebPkiServerVerifier>, TlsError> {
        WebPkiServerVerifier::builder_with_provider(
            Arc::new(Self::root_store(&self.roots)?),
            Arc::new(default_provider()),
        )
        .with_crls(self.crls.clone())
        .only_check_end_entity_revocation()
        .allow_unknown_revocation_status()
        .build()
        .map_err(|e| TlsError::Config(format!("server certificate verifier: {e}")))
    }

    /// The acceptor of a server node: TLS 1.3, ALPN `restpipe/1`, client certificates as
    /// [`TlsMaterial::client_verifier`] says. No session resumption: a resumed session would
    /// skip the certificate check, and so let a certificate revoked since back in.
    pub fn acceptor(&self) -> Result<TlsAcceptor, TlsError> {
        let mut config = ServerConfig::builder_with_provider(Arc::new(default_provider()))
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| TlsError::Config(e.to_string()))?
            .with_client_cert_verifier(self.client_verifier()?)
            .with_single_cert(self.chain.clone(), self.key.clone_key())
            .map_err(|e| TlsError::Config(format!("certificate and key do not fit: {e}")))?;
        config.alpn_protocols = vec![ALPN.to_vec()];
        config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
        config.send_tls13_tickets = 0;
        Ok(TlsAcceptor::from(Arc::new(config)))
    }

    /// The connector of a client node: TLS 1.3, ALPN `restpipe/1`, the server as
    /// [`TlsMaterial::server_verifier`] says, no session resumption.
    pub fn connector(&self) -> Result<TlsConnector, TlsError> {
        let mut config = ClientConfig::builder_with_provider(Arc::new(default_provider()))
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| TlsError::Config(e.to_string()))?
            .with_webpki_verifier(self.server_verifier()?)
            .with_client_auth_cert(self.chain.clone(), self.key.clone_key())
            .map_err(|e| TlsError::Config(format!("certificate and key do not fit: {e}")))?;
        config.alpn_protocols = vec![ALPN.to_vec()];
        config.resumption = rustls::client::Resumption::disabled();
        Ok(TlsConnector::from(Arc::new(config)))
    }

    /// Check a connected peer's certificate again with this material: a client's on a server
    /// node, the server's (for `server_name`) on a client node. A reload closes the
    /// connections whose peer fails.
    pub fn verify_peer(&self, peer: &PeerCert, server_name: Option<&str>) -> Result<(), String> {
        let (end_entity, intermediates) = peer
            .chain
            .split_first()
            .ok_or_else(|| "no certificate".to_string())?;
        let now = UnixTime::now();
        match server_name {
            None => self
                .client_verifier()
                .map_err(|e| e.to_string())?
                .verify_client_cert(end_entity, intermediates, now)
                .map(|_| ()),
            Some(name) => {
                let name = ServerName::try_from(name.to_string()).map_err(|e| e.to_string())?;
                self.server_verifier()
                    .map_err(|e| e.to_string())?
                    .verify_server_cert(end_entity, intermediates, &name, &[], now)
                    .map(|_| ())
            }
        }
        .map_err(|e| refusal_of(&e).to_string() + ": " + &e.to_string())
    }
}

/// The certificates of a PEM text, at least one.
fn pem_certificates(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, String> {
    let list: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<_, _>>()
        .map_err(|e| format!("not valid PEM certificates: {e}"))?;
    if list.is_empty() {
        return Err("holds no PEM certificate".to_string());
    }
    Ok(list)
}

#[derive(Debug, Clone, Copy)]
enum Part {
    Ca,
    Cert,
    Key,
}

/// Accept a TLS connection on the server side within `timeout`. Returns the stream and the
/// client's certificate. A client whose identity is an IP address is refused.
pub async fn accept(
    acceptor: &TlsAcceptor,
    tcp: TcpStream,
    timeout: Duration,
) -> Result<(server::TlsStream<TcpStream>, PeerCert), TlsError> {
    let stream = tokio::time::timeout(timeout, acceptor.accept(tcp))
        .await
        .map_err(|_| TlsError::HandshakeTimeout(timeout))?
        .map_err(TlsError::Handshake)?;
    let peer = PeerCert::from_chain(stream.get_ref().1.peer_certificates().unwrap_or(&[]))?;
    if peer.identity.parse::<std::net::IpAddr>().is_ok() {
        return Err(TlsError::IpIdentity(peer.identity));
    }
    Ok((stream, peer))
}

/// Open a TLS connection on the client side within `timeout`, verifying the server against
/// `server_name`. Returns the stream and the server's certificate.
pub async fn connect(
    connector: &TlsConnector,
    server_name: &str,
    tcp: TcpStream,
    timeout: Duration,
) -> Result<(client::TlsStream<TcpStream>, PeerCert), TlsError> {
    let name = ServerName::try_from(server_name.to_string())
        .map_err(|_| TlsError::ServerName(server_name.to_string()))?;
    let stream = tokio::time::timeout(timeout, connector.connect(name, tcp))
        .await
        .map_err(|_| TlsError::HandshakeTimeout(timeout))?
        .map_err(TlsError::Handshake)?;
    let peer = PeerCert::from_chain(stream.get_ref().1.peer_certificates().unwrap_or(&[]))?;
    Ok((stream, peer))
}

/// A short word for why a handshake was refused, for logs and metrics.
pub fn refusal_reason(err: &TlsError) -> &'static str {
    match err {
        TlsError::HandshakeTimeout(_) => "timeout",
        TlsError::NoIdentity => "no_identity",
        TlsError::IpIdentity(_) => "ip_identity",
        TlsError::Handshake(io) => {
            match io.get_ref().and_then(|e| e.downcast_ref::<rustls::Error>()) {
                Some(e) => refusal_of(e),
                None => "io_error",
            }
        }
        _ => "other",
    }
}

/// The short word for a rustls error.
fn refusal_of(err: &rustls::Error) -> &'static str {
    match err {
        rustls::Error::NoCertificatesPresented => "no_client_cert",
        rustls::Error::InvalidCertificate(cert_err) => match cert_err {
            rustls::CertificateError::Expired | rustls::CertificateError::ExpiredContext { .. } => {
                "expired"
            }
            rustls::CertificateError::Revoked => "revoked",
            rustls::CertificateError::UnknownIssuer => "unknown_issuer",
            rustls::CertificateError::NotValidForName
            | rustls::CertificateError::NotValidForNameContext { .. } => "bad_name",
            _ => "bad_certificate",
        },
        rustls::Error::PeerIncompatible(_) | rustls::Error::NoApplicationProtocol => "incompatible",
        rustls::Error::InvalidMessage(_) => "not_tls",
        rustls::Error::AlertReceived(_) => "alert",
        _ => "tls_error",
    }
}
