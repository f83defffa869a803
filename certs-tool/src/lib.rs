//! Certificates for restpipe's mutual TLS.
//!
//! restpipe's server node accepts only clients whose certificate chains to a CA it trusts,
//! and routes `/client/{identity}/...` by the client certificate's identity (its subject CN).
//! This crate makes those certificates with [rcgen] (ring backend) and reads them back; the
//! `restpipe-certs` binary is its command line. It replaces RestPipe's CaKit.
//!
//! - [`CertificateAuthority`]: make a CA ([`generate`](CertificateAuthority::generate)) or
//!   load one ([`load`](CertificateAuthority::load)), then
//!   [`issue_server`](CertificateAuthority::issue_server) (DNS and IP SANs, serverAuth) and
//!   [`issue_client`](CertificateAuthority::issue_client) (CN = identity, clientAuth).
//! - [`write_dev_set`]: a whole CA + server + client set for one machine, in [`DEFAULT_DIR`].
//! - [`write_private_key`] (mode 0600) and [`write_certificate`]: never overwrite without
//!   `force`.
//! - [`identity_from_der`]: the identity restpipe routes a peer by; [`describe`]: what
//!   `restpipe-certs show` prints.
//! - Revocation: [`CertificateAuthority::revoke`] adds a [`Serial`] to the CA's [`Crl`]
//!   (get it from a certificate with
//!   [`serial_of_issued`](CertificateAuthority::serial_of_issued)),
//!   [`refresh_crl`](CertificateAuthority::refresh_crl) re-signs it before its next update,
//!   [`write_crl`] replaces the file atomically, and [`Crl::load`] /
//!   [`Crl::verify_signed_by`] read it back and check it, as a node does before handing
//!   [`Crl::der`] to rustls.
//!
//! PEM is read with rustls-pki-types' `PemObject`. Keys are generated as ECDSA P-256 (the
//! default) or Ed25519; ring cannot generate RSA keys, so [`KeyAlgorithm::Rsa`] gives
//! [`Error::RsaUnsupported`].
//!
//! ```
//! use restpipe_certs::{identity_from_der, CertificateAuthority, IssueOptions};
//!
//! let ca = CertificateAuthority::generate("example CA", &IssueOptions::ca_default())?;
//! let client = ca.issue_client("fileserver-1", &IssueOptions::default())?;
//! assert!(client.key_pem.starts_with("-----BEGIN PRIVATE KEY-----"));
//!
//! // The server node routes this client as /client/fileserver-1/...
//! let der = client.cert_der()?;
//! assert_eq!(identity_from_der(&der).as_deref(), Some("fileserver-1"));
//! # Ok::<(), restpipe_certs::Error>(())
//! ```

mod ca;
mod crl;
mod error;
mod files;
mod inspect;
mod names;
mod options;
mod pem;

pub use ca::{CertificateAuthority, IssuedCert};
pub use crl::{
    Crl, CrlInfo, CrlOptions, RevocationReason, RevokeOutcome, RevokedCert, Serial,
    DEFAULT_CRL_DAYS, DEFAULT_CRL_FILE,
};
pub use error::{Error, Result};
pub use files::{
    write_certificate, write_crl, write_dev_set, write_private_key, DevOutcome, DevPaths,
    DEFAULT_DIR, DEV_CA_NAME, DEV_CLIENT_IDENTITY, DEV_SERVER_NAME,
};
pub use inspect::{describe, identity_from_der, sha256_fingerprint, CertInfo};
pub use names::{validate_dns_name, validate_identity, MAX_IDENTITY_LEN};
pub use options::{IssueOptions, KeyAlgorithm, DEFAULT_CA_DAYS, DEFAULT_LEAF_DAYS};

/// Reads a PEM text file of at most 1 MiB; errors name the file. A binary (DER) file is
/// refused with advice on converting it.
pub fn read_pem_file(path: &std::path::Path) -> Result<String> {
    let bytes = pem::read_pem_file_checked(path)?;
    String::from_utf8(bytes).map_err(|_| Error::InvalidPem {
        origin: path.display().to_string(),
        reason: "it is binary, not PEM text (a DER certificate? convert it with \
                 `openssl x509 -inform der -in FILE -out FILE.pem`)"
            .into(),
    })
}

/// The first certificate in PEM text, as DER; `origin` names the input in errors.
pub fn first_certificate_der(
    pem_text: &str,
    origin: &str,
) -> Result<rustls_pki_types::CertificateDer<'static>> {
    pem::first_certificate(pem_text.as_bytes(), origin)
}

/// How many certificates a PEM text holds (`show` describes the first).
pub fn count_certificates(pem_text: &str) -> Result<usize> {
    Ok(pem::all_certificates(pem_text.as_bytes(), "the input")?.len())
}
