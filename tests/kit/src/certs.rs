//! Certificates for tests: a CA made in memory with its server certificate ([`Pki`]), for
//! in-process nodes and raw peers; and a development set written as files ([`Certs`]), for
//! `restpipe` processes, with more client identities (valid or expired) on demand.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use restpipe::TlsMaterial;
use restpipe_certs::{CertificateAuthority, DevOutcome, DevPaths, IssueOptions, IssuedCert};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use tokio_rustls::TlsConnector;

/// The name on the test server's certificate (with the IP SAN `127.0.0.1`).
pub const SERVER_NAME: &str = "localhost";

/// A test CA with its server certificate; issues client certificates on demand.
pub struct Pki {
    ca: CertificateAuthority,
    server: IssuedCert,
}

impl Pki {
    /// A new CA, and a server certificate for `localhost` and `127.0.0.1`.
    pub fn new() -> Pki {
        Pki::with_ca_name("restpipe test CA")
    }

    /// Like [`Pki::new`], with a CA of this common name. Two CAs of the same name are told
    /// apart only by their keys.
    pub fn with_ca_name(name: &str) -> Pki {
        let ca = CertificateAuthority::generate(name, &IssueOptions::ca_default())
            .expect("generate the test CA");
        let server = ca
            .issue_server(SERVER_NAME, &["127.0.0.1".into()], &IssueOptions::default())
            .expect("issue the server certificate");
        Pki { ca, server }
    }

    /// The CA certificate, PEM.
    pub fn ca_pem(&self) -> &str {
        self.ca.cert_pem()
    }

    /// The server node's TLS material.
    pub fn server_tls(&self) -> TlsMaterial {
        TlsMaterial::from_pem(self.ca_pem(), &self.server.cert_pem, &self.server.key_pem)
            .expect("server TLS material")
    }

    /// A client certificate for `identity`, issued by this CA.
    pub fn client_cert(&self, identity: &str) -> IssuedCert {
        self.ca
            .issue_client(identity, &IssueOptions::default())
            .expect("issue a client certificate")
    }

    /// A client node's TLS material for `identity`.
    pub fn client_tls(&self, identity: &str) -> TlsMaterial {
        let cert = self.client_cert(identity);
        TlsMaterial::from_pem(self.ca_pem(), &cert.cert_pem, &cert.key_pem)
            .expect("client TLS material")
    }

    /// A connector that presents a client certificate for `identity` and trusts this CA.
    pub fn connector(&self, identity: &str) -> TlsConnector {
        self.client_tls(identity).connector().expect("connector")
    }

    /// A connector that trusts this CA but presents no client certificate at all.
    pub fn connector_without_client_cert(&self) -> TlsConnector {
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(self.ca_pem().as_bytes()) {
            roots.add(cert.expect("CA PEM")).expect("CA accepted");
        }
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
        TlsConnector::from(Arc::new(config))
    }
}

impl Default for Pki {
    fn default() -> Self {
        Pki::new()
    }
}

/// A certificate and its key, as files.
#[derive(Clone, Debug)]
pub struct CertFiles {
    /// The identity (subject CN).
    pub identity: String,
    /// The certificate, PEM.
    pub cert: PathBuf,
    /// The private key, PEM.
    pub key: PathBuf,
}

/// A development certificate set in a temporary directory, and its CA to issue more.
pub struct Certs {
    dir: tempfile::TempDir,
    /// The six files of the dev set.
    pub paths: DevPaths,
    ca: CertificateAuthority,
}

impl Certs {
    /// `restpipe_certs::write_dev_set` into a fresh temporary directory.
    pub fn new() -> Certs {
        let dir = tempfile::tempdir().expect("temporary directory");
        let paths = match restpipe_certs::write_dev_set(&dir.path().join("certs"), false)
            .expect("write the dev set")
        {
            DevOutcome::Written(paths) => paths,
            DevOutcome::AlreadyPresent(files) => panic!("a fresh directory holds {files:?}"),
        };
        let ca = CertificateAuthority::load(&paths.ca_cert, &paths.ca_key).expect("load the CA");
        Certs { dir, paths, ca }
    }

    /// The scratch directory (logs, files to serve).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The CA certificate, PEM text.
    pub fn ca_pem(&self) -> &str {
        self.ca.cert_pem()
    }

    /// A client certificate for `identity`, valid as usual, written as `<identity>.pem/.key`.
    pub fn client(&self, identity: &str) -> CertFiles {
        self.client_with(identity, &IssueOptions::default())
    }

    /// A client certificate for `identity` with these options (an expired one, say).
    pub fn client_with(&self, identity: &str, options: &IssueOptions) -> CertFiles {
        let issued = self
            .ca
            .issue_client(identity, options)
            .expect("issue a client certificate");
        write_pair(&self.dir.path().join("certs"), identity, &issued)
    }

    /// Client TLS material for `identity`, for a hand-driven peer in the test process.
    pub fn material(&self, identity: &str) -> TlsMaterial {
        let issued = self
            .ca
            .issue_client(identity, &IssueOptions::default())
            .expect("issue a client certificate");
        TlsMaterial::from_pem(self.ca_pem(), &issued.cert_pem, &issued.key_pem)
            .expect("client TLS material")
    }

    /// A connector for a hand-driven peer with a certificate for `identity`.
    pub fn connector(&self, identity: &str) -> tokio_rustls::TlsConnector {
        self.material(identity).connector().expect("connector")
    }
}

/// Write `issued` as `<dir>/<name>.pem` and `<dir>/<name>.key`.
pub fn write_pair(dir: &Path, name: &str, issued: &restpipe_certs::IssuedCert) -> CertFiles {
    let cert = dir.join(format!("{name}.pem"));
    let key = dir.join(format!("{name}.key"));
    restpipe_certs::write_certificate(&cert, &issued.cert_pem, true).expect("write certificate");
    restpipe_certs::write_private_key(&key, &issued.key_pem, true).expect("write key");
    CertFiles {
        identity: name.to_string(),
        cert,
        key,
    }
}

/// Issue options whose validity ended a day ago (it began 30 days ago).
pub fn expired_options() -> IssueOptions {
    let now = IssueOptions::valid_for_days(1);
    let day = Duration::from_secs(24 * 3600);
    IssueOptions {
        not_before: now.not_before - 30 * day,
        not_after: now.not_before - day,
        ..now
    }
}

impl Default for Certs {
    fn default() -> Self {
        Certs::new()
    }
}
