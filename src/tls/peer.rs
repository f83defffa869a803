//! What a node knows of a certificate once a handshake is done: the chain, the identity it
//! names, its SHA-256 fingerprint and when it expires. Peers' certificates are kept with their
//! connection, so that a reload can check them again and `/status` can show them.

use std::time::{Duration, SystemTime};

use rustls::pki_types::CertificateDer;
use serde::Serialize;

use super::TlsError;
use crate::util::epoch_secs;

/// A certificate chain as a handshake presented it, with what the node reads from it.
#[derive(Clone, Debug)]
pub struct PeerCert {
    /// The chain, end entity first.
    pub chain: Vec<CertificateDer<'static>>,
    /// The identity the end-entity certificate names (subject CN, else first DNS SAN).
    pub identity: String,
    /// SHA-256 of the end-entity certificate, colon-separated upper-case hex (as
    /// `openssl x509 -fingerprint -sha256` prints it).
    pub fingerprint: String,
    /// When the end-entity certificate expires.
    pub not_after: SystemTime,
}

/// A certificate as `/status` shows it.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct CertSummary {
    /// SHA-256 fingerprint.
    pub fingerprint: String,
    /// Expiry, seconds since the epoch.
    pub not_after: f64,
    /// Whole days left until expiry (negative once expired).
    pub days_left: i64,
}

impl PeerCert {
    /// Read a chain presented in a handshake. Fails when it is empty or names no identity.
    pub fn from_chain(chain: &[CertificateDer<'static>]) -> Result<Self, TlsError> {
        let end_entity = chain.first().ok_or(TlsError::NoIdentity)?;
        let identity = restpipe_certs::identity_from_der(end_entity).ok_or(TlsError::NoIdentity)?;
        Ok(PeerCert {
            chain: chain.to_vec(),
            identity,
            fingerprint: restpipe_certs::sha256_fingerprint(end_entity),
            not_after: not_after(end_entity).unwrap_or(SystemTime::UNIX_EPOCH),
        })
    }

    /// The summary `/status` shows.
    pub fn summary(&self) -> CertSummary {
        summary(&self.fingerprint, self.not_after)
    }
}

/// The summary of a certificate with `fingerprint` that expires at `not_after`.
pub fn summary(fingerprint: &str, not_after: SystemTime) -> CertSummary {
    let days_left = match not_after.duration_since(SystemTime::now()) {
        Ok(left) => (left.as_secs() / 86_400) as i64,
        Err(past) => -((past.duration().as_secs() / 86_400) as i64) - 1,
    };
    CertSummary {
        fingerprint: fingerprint.to_string(),
        not_after: epoch_secs(not_after),
        days_left,
    }
}

/// When a DER certificate expires, if it parses.
pub fn not_after(der: &[u8]) -> Option<SystemTime> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let secs = cert.validity().not_after.timestamp();
    let secs = u64::try_from(secs).ok()?;
    SystemTime::UNIX_EPOCH.checked_add(Duration::from_secs(secs))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn reads_identity_fingerprint_and_expiry() {
        let ca = restpipe_certs::CertificateAuthority::generate(
            "test CA",
            &restpipe_certs::IssueOptions::ca_default(),
        )
        .unwrap();
        let leaf = ca
            .issue_client("web-1", &restpipe_certs::IssueOptions::valid_for_days(10))
            .unwrap();
        let der: Vec<CertificateDer<'static>> = {
            use rustls::pki_types::pem::PemObject;
            CertificateDer::pem_slice_iter(leaf.cert_pem.as_bytes())
                .map(Result::unwrap)
                .collect()
        };
        let peer = PeerCert::from_chain(&der).unwrap();
        assert_eq!(peer.identity, "web-1");
        assert_eq!(peer.fingerprint.len(), 32 * 3 - 1);
        let s = peer.summary();
        assert!((9..=10).contains(&s.days_left), "{s:?}");
        assert!(PeerCert::from_chain(&[]).is_err());
    }
}
