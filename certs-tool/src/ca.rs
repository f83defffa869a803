//! The certificate authority: make or load one, and issue server and client certificates.

use std::fmt;
use std::path::Path;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PublicKeyData, SanType, SerialNumber,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::names::{self, HostName};
use crate::{pem, Error, IssueOptions, Result};

/// A certificate authority: its certificate and the private key that signs with it.
///
/// Make a new one with [`generate`](Self::generate), or load one with
/// [`load`](Self::load) / [`from_pem`](Self::from_pem); then issue certificates with
/// [`issue_server`](Self::issue_server) and [`issue_client`](Self::issue_client).
pub struct CertificateAuthority {
    issuer: Issuer<'static, KeyPair>,
    cert_pem: String,
    cert_der: CertificateDer<'static>,
    subject: String,
}

/// A newly issued certificate and its private key, both PEM.
#[derive(Clone)]
pub struct IssuedCert {
    /// The certificate, PEM (`-----BEGIN CERTIFICATE-----`).
    pub cert_pem: String,
    /// The private key, PKCS#8 PEM (`-----BEGIN PRIVATE KEY-----`). Keep it secret.
    pub key_pem: String,
}

impl IssuedCert {
    /// The certificate as DER, e.g. to pass to [`identity_from_der`](crate::identity_from_der).
    pub fn cert_der(&self) -> Result<CertificateDer<'static>> {
        pem::first_certificate(self.cert_pem.as_bytes(), "the issued certificate")
    }
}

impl fmt::Debug for IssuedCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IssuedCert")
            .field("cert_pem", &self.cert_pem)
            .field("key_pem", &"[secret key elided]")
            .finish()
    }
}

impl fmt::Debug for CertificateAuthority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertificateAuthority")
            .field("subject", &self.subject)
            .field("key", &"[secret key elided]")
            .finish()
    }
}

impl CertificateAuthority {
    /// Makes a new self-signed CA with the given common name.
    ///
    /// The CA may sign end-entity certificates only (path length 0). Its key is of
    /// `opts.algorithm`; its validity is `opts.not_before..opts.not_after` (use
    /// [`IssueOptions::ca_default`] for ten years).
    pub fn generate(common_name: &str, opts: &IssueOptions) -> Result<Self> {
        names::validate_ca_name(common_name)?;
        opts.check()?;
        let key = opts.algorithm.generate()?;
        let mut params = base_params(common_name, opts)?;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let cert = params.self_signed(&key).map_err(|source| Error::Generate {
            what: "CA certificate",
            source,
        })?;
        let cert_der = cert.der().clone();
        let subject = x509_parser::parse_x509_certificate(&cert_der)
            .map(|(_, x509)| x509.subject().to_string())
            .unwrap_or_else(|_| format!("CN={common_name}"));
        Ok(Self {
            cert_pem: cert.pem(),
            subject,
            cert_der,
            issuer: Issuer::new(params, key),
        })
    }

    /// Loads a CA from its certificate and private key, both PEM.
    ///
    /// The certificate must be a CA certificate (basic constraints CA:TRUE), and the key
    /// must be its key: a key that does not match is refused with [`Error::KeyMismatch`].
    /// Keys are read in PKCS#8 form (`-----BEGIN PRIVATE KEY-----`): ECDSA P-256/P-384,
    /// Ed25519 or RSA.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self> {
        Self::from_pem_bytes(
            cert_pem.as_bytes(),
            "the CA certificate",
            key_pem.as_bytes(),
            "the CA private key",
        )
    }

    /// Loads a CA from a certificate file and a private key file (see
    /// [`from_pem`](Self::from_pem)). A missing file gives [`Error::CaMissing`], which
    /// says to run `restpipe-certs ca` first.
    pub fn load(cert_path: &Path, key_path: &Path) -> Result<Self> {
        let read = |path: &Path, kind: &'static str| match pem::read_pem_file_checked(path) {
            Err(Error::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
                Err(Error::CaMissing {
                    kind,
                    path: path.to_owned(),
                })
            }
            other => other,
        };
        let cert = read(cert_path, "certificate")?;
        let key = read(key_path, "private key")?;
        Self::from_pem_bytes(
            &cert,
            &cert_path.display().to_string(),
            &key,
            &key_path.display().to_string(),
        )
    }

    fn from_pem_bytes(
        cert_pem: &[u8],
        cert_origin: &str,
        key_pem: &[u8],
        key_origin: &str,
    ) -> Result<Self> {
        let cert_der = pem::first_certificate(cert_pem, cert_origin)?;
        let invalid = |reason: String| Error::InvalidCertificate {
            origin: cert_origin.to_owned(),
            reason,
        };
        let (_, x509) =
            x509_parser::parse_x509_certificate(&cert_der).map_err(|e| invalid(e.to_string()))?;
        if !x509.is_ca() {
            return Err(Error::NotCa {
                origin: cert_origin.to_owned(),
            });
        }
        let key = parse_key(key_pem, key_origin)?;
        if key.der_bytes() != x509.public_key().subject_public_key.data.as_ref() {
            return Err(Error::KeyMismatch {
                cert: cert_origin.to_owned(),
                key: key_origin.to_owned(),
            });
        }
        let subject = x509.subject().to_string();
        drop(x509);
        let issuer = Issuer::from_ca_cert_der(&cert_der, key)
            .map_err(|e| invalid(format!("cannot use it as an issuer: {e}")))?;
        Ok(Self {
            issuer,
            cert_pem: pem::encode("CERTIFICATE", &cert_der),
            cert_der,
            subject,
        })
    }

    /// The CA certificate, PEM. This file (`ca.pem`) goes on every node.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA certificate, DER.
    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert_der
    }

    /// The CA private key, PKCS#8 PEM. It stays with the operator, never on a node.
    pub fn key_pem(&self) -> String {
        self.issuer.key().serialize_pem()
    }

    /// The rcgen issuer (the CA's name, key usages and key) that signs for this CA.
    pub(crate) fn issuer(&self) -> &Issuer<'static, KeyPair> {
        &self.issuer
    }

    /// The CA's subject, e.g. `CN=restpipe CA`.
    pub fn subject(&self) -> &str {
        &self.subject
    }

    /// Issues a server certificate.
    ///
    /// The subject CN is `name`. The subject alternative names are `name` followed by each
    /// of `sans` (duplicates dropped); each one that parses as an IP address becomes an IP
    /// SAN, any other must be a valid DNS name (a leading `*.` wildcard is allowed) and
    /// becomes a DNS SAN. The extended key usage is serverAuth.
    pub fn issue_server(
        &self,
        name: &str,
        sans: &[String],
        opts: &IssueOptions,
    ) -> Result<IssuedCert> {
        let mut hosts: Vec<HostName> = Vec::with_capacity(sans.len() + 1);
        for candidate in std::iter::once(name).chain(sans.iter().map(String::as_str)) {
            let host = names::parse_host_name(candidate)?;
            if !hosts.iter().any(|h| same_host(h, &host)) {
                hosts.push(host);
            }
        }
        let mut san_types = Vec::with_capacity(hosts.len());
        for host in hosts {
            san_types.push(match host {
                HostName::Ip(ip) => SanType::IpAddress(ip),
                HostName::Dns(dns) => SanType::DnsName(ia5(dns)?),
            });
        }
        self.issue_leaf(
            name,
            san_types,
            ExtendedKeyUsagePurpose::ServerAuth,
            opts,
            "server certificate",
        )
    }

    /// Issues a client certificate for `identity`, the name the server routes by
    /// (`/client/{identity}/...`).
    ///
    /// The subject CN is `identity`; when `identity` is also a valid DNS name it is added
    /// as a DNS SAN. The extended key usage is clientAuth. The identity must pass
    /// [`validate_identity`](crate::validate_identity).
    pub fn issue_client(&self, identity: &str, opts: &IssueOptions) -> Result<IssuedCert> {
        names::validate_identity(identity)?;
        let sans = if names::validate_dns_name(identity, false).is_ok() {
            vec![SanType::DnsName(ia5(identity.to_owned())?)]
        } else {
            Vec::new()
        };
        self.issue_leaf(
            identity,
            sans,
            ExtendedKeyUsagePurpose::ClientAuth,
            opts,
            "client certificate",
        )
    }

    fn issue_leaf(
        &self,
        common_name: &str,
        sans: Vec<SanType>,
        usage: ExtendedKeyUsagePurpose,
        opts: &IssueOptions,
        what: &'static str,
    ) -> Result<IssuedCert> {
        opts.check()?;
        let key = opts.algorithm.generate()?;
        let mut params = base_params(common_name, opts)?;
        params.subject_alt_names = sans;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![usage];
        params.use_authority_key_identifier_extension = true;
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(|source| Error::Generate { what, source })?;
        Ok(IssuedCert {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

/// Parameters shared by CA and leaf certificates: subject CN, validity, random serial.
fn base_params(common_name: &str, opts: &IssueOptions) -> Result<CertificateParams> {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    params.distinguished_name = dn;
    params.not_before = opts.not_before;
    params.not_after = opts.not_after;
    params.serial_number = Some(random_serial()?);
    Ok(params)
}

/// A random, positive 128-bit serial number.
fn random_serial() -> Result<SerialNumber> {
    use ring::rand::SecureRandom;
    let mut bytes = [0u8; 16];
    ring::rand::SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| Error::Generate {
            what: "serial number",
            source: rcgen::Error::RingUnspecified,
        })?;
    // Positive, and no leading zero byte, so it always encodes in 16 bytes.
    bytes[0] = (bytes[0] & 0x7f) | 0x40;
    Ok(SerialNumber::from_slice(&bytes))
}

fn ia5(name: String) -> Result<rcgen::string::Ia5String> {
    rcgen::string::Ia5String::try_from(name.clone()).map_err(|_| Error::InvalidDnsName {
        name,
        reason: "it is not ASCII".into(),
    })
}

fn same_host(a: &HostName, b: &HostName) -> bool {
    match (a, b) {
        (HostName::Ip(a), HostName::Ip(b)) => a == b,
        (HostName::Dns(a), HostName::Dns(b)) => a.eq_ignore_ascii_case(b),
        _ => false,
    }
}

/// Reads a private key and turns it into an rcgen key pair, with errors that say how to
/// fix a key in the wrong format.
fn parse_key(pem_bytes: &[u8], origin: &str) -> Result<KeyPair> {
    let der = pem::first_private_key(pem_bytes, origin)?;
    let format = match &der {
        PrivateKeyDer::Pkcs8(_) => None,
        PrivateKeyDer::Pkcs1(_) => Some("PKCS#1 (-----BEGIN RSA PRIVATE KEY-----)"),
        PrivateKeyDer::Sec1(_) => Some("SEC1 (-----BEGIN EC PRIVATE KEY-----)"),
        _ => Some("an unknown format"),
    };
    if let Some(format) = format {
        return Err(Error::UnsupportedKey {
            origin: origin.to_owned(),
            reason: format!(
                "the key is in {format} form; restpipe-certs reads PKCS#8 keys \
                 (-----BEGIN PRIVATE KEY-----): convert it with \
                 `openssl pkcs8 -topk8 -nocrypt -in OLD.key -out NEW.key`"
            ),
        });
    }
    KeyPair::try_from(&der).map_err(|e| Error::UnsupportedKey {
        origin: origin.to_owned(),
        reason: format!(
            "the key cannot be used ({e}); supported keys are ECDSA P-256/P-384, \
             Ed25519 and RSA in PKCS#8 form"
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_ca_round_trips_through_pem() {
        let opts = IssueOptions::ca_default();
        let ca = CertificateAuthority::generate("test CA", &opts).expect("generate");
        let again = CertificateAuthority::from_pem(ca.cert_pem(), &ca.key_pem()).expect("load");
        assert_eq!(
            again.cert_pem(),
            ca.cert_pem(),
            "PEM is normalised identically"
        );
        assert_eq!(again.subject(), "CN=test CA");
        let leaf = again
            .issue_client("c1", &IssueOptions::default())
            .expect("issue");
        assert!(leaf.cert_pem.starts_with("-----BEGIN CERTIFICATE-----"));
        assert!(leaf.key_pem.starts_with("-----BEGIN PRIVATE KEY-----"));
    }

    #[test]
    fn mismatched_key_is_refused() {
        let opts = IssueOptions::ca_default();
        let a = CertificateAuthority::generate("A", &opts).expect("generate");
        let b = CertificateAuthority::generate("B", &opts).expect("generate");
        let err = CertificateAuthority::from_pem(a.cert_pem(), &b.key_pem())
            .expect_err("mismatch must be refused");
        assert!(matches!(err, Error::KeyMismatch { .. }), "{err}");
        assert!(err.to_string().contains("does not match"), "{err}");
    }

    #[test]
    fn leaf_is_not_a_ca() {
        let ca = CertificateAuthority::generate("A", &IssueOptions::ca_default()).expect("ca");
        let leaf = ca
            .issue_server("localhost", &[], &IssueOptions::default())
            .expect("leaf");
        let err = CertificateAuthority::from_pem(&leaf.cert_pem, &leaf.key_pem)
            .expect_err("a leaf is not a CA");
        assert!(matches!(err, Error::NotCa { .. }), "{err}");
    }

    #[test]
    fn key_and_cert_swapped_are_explained() {
        let ca = CertificateAuthority::generate("A", &IssueOptions::ca_default()).expect("ca");
        let err =
            CertificateAuthority::from_pem(&ca.key_pem(), ca.cert_pem()).expect_err("swapped");
        let text = err.to_string();
        assert!(
            text.contains("no certificate") && text.contains("private key"),
            "{text}"
        );
    }

    #[test]
    fn sec1_key_gets_conversion_advice() {
        let ca = CertificateAuthority::generate("A", &IssueOptions::ca_default()).expect("ca");
        let sec1 = "-----BEGIN EC PRIVATE KEY-----\nMAA=\n-----END EC PRIVATE KEY-----\n";
        let err = CertificateAuthority::from_pem(ca.cert_pem(), sec1).expect_err("sec1");
        assert!(err.to_string().contains("openssl pkcs8 -topk8"), "{err}");
    }

    #[test]
    fn rsa_generation_is_refused_clearly() {
        let opts = IssueOptions::ca_default().with_algorithm(crate::KeyAlgorithm::Rsa);
        let err = CertificateAuthority::generate("A", &opts).expect_err("no RSA with ring");
        assert!(matches!(err, Error::RsaUnsupported));
        assert!(err.to_string().contains("ecdsa-p256"), "{err}");
    }

    #[test]
    fn bad_names_are_refused() {
        let ca = CertificateAuthority::generate("A", &IssueOptions::ca_default()).expect("ca");
        let opts = IssueOptions::default();
        for bad in ["", "a/b", "..", "has space", &"x".repeat(65)] {
            assert!(
                matches!(
                    ca.issue_client(bad, &opts),
                    Err(Error::InvalidIdentity { .. })
                ),
                "{bad:?}"
            );
        }
        assert!(matches!(
            ca.issue_server("bad_name", &[], &opts),
            Err(Error::InvalidDnsName { .. })
        ));
        assert!(matches!(
            ca.issue_server("ok.example", &["not valid".to_owned()], &opts),
            Err(Error::InvalidDnsName { .. })
        ));
        assert!(matches!(
            CertificateAuthority::generate("", &opts),
            Err(Error::InvalidCaName { .. })
        ));
    }
}
