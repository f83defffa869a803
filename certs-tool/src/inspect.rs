//! Reading certificates: the routing identity, and a description for `show`.

use std::net::IpAddr;

use serde::Serialize;
use time::OffsetDateTime;
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::GeneralName;
use x509_parser::oid_registry::{
    Oid, OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY, OID_NIST_EC_P384, OID_NIST_EC_P521,
    OID_PKCS1_RSAENCRYPTION, OID_SIG_ED25519,
};

use crate::{pem, Error, Result};

/// What `restpipe-certs show` reports about a certificate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CertInfo {
    /// The subject, e.g. `CN=fileserver-1`.
    pub subject: String,
    /// The issuer, e.g. `CN=restpipe CA`.
    pub issuer: String,
    /// The identity restpipe routes by (see [`identity_from_der`]); `None` when the
    /// certificate has neither a CN nor a DNS SAN.
    pub identity: Option<String>,
    /// DNS subject alternative names.
    pub dns_names: Vec<String>,
    /// IP address subject alternative names.
    pub ip_addresses: Vec<IpAddr>,
    /// Start of validity (RFC 3339 in JSON).
    #[serde(serialize_with = "rfc3339")]
    pub not_before: OffsetDateTime,
    /// End of validity (RFC 3339 in JSON).
    #[serde(serialize_with = "rfc3339")]
    pub not_after: OffsetDateTime,
    /// True when `not_after` has passed.
    pub expired: bool,
    /// True when `not_before` is still in the future.
    pub not_yet_valid: bool,
    /// The public key, e.g. `ECDSA P-256`, `Ed25519`, `RSA 2048`.
    pub key_type: String,
    /// SHA-256 of the DER certificate, upper-case hex pairs joined by colons (the form
    /// `openssl x509 -noout -fingerprint -sha256` prints).
    pub sha256_fingerprint: String,
    /// True for a CA certificate (basic constraints CA:TRUE).
    pub is_ca: bool,
    /// Extended key usages: `serverAuth`, `clientAuth`, ...; empty when unrestricted.
    pub extended_key_usage: Vec<String>,
    /// The serial number, hex pairs joined by colons.
    pub serial: String,
}

fn rfc3339<S: serde::Serializer>(t: &OffsetDateTime, s: S) -> std::result::Result<S::Ok, S::Error> {
    let text = t
        .format(&time::format_description::well_known::Rfc3339)
        .map_err(serde::ser::Error::custom)?;
    s.serialize_str(&text)
}

/// The identity restpipe routes a peer by: the certificate's subject common name, else its
/// first DNS subject alternative name. `None` when the DER does not parse or has neither.
///
/// The TLS layer calls this on the peer's end-entity certificate after the handshake.
pub fn identity_from_der(cert_der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(cert_der).ok()?;
    identity_of(&cert)
}

fn identity_of(cert: &X509Certificate<'_>) -> Option<String> {
    let cn = cert
        .subject()
        .iter_common_name()
        .find_map(|attr| attr.as_str().ok())
        .filter(|cn| !cn.is_empty());
    if let Some(cn) = cn {
        return Some(cn.to_owned());
    }
    dns_names(cert).into_iter().next()
}

fn dns_names(cert: &X509Certificate<'_>) -> Vec<String> {
    general_names(cert)
        .iter()
        .filter_map(|n| match n {
            GeneralName::DNSName(d) if !d.is_empty() => Some((*d).to_owned()),
            _ => None,
        })
        .collect()
}

fn general_names<'a>(cert: &'a X509Certificate<'_>) -> &'a [GeneralName<'a>] {
    match cert.subject_alternative_name() {
        Ok(Some(ext)) => &ext.value.general_names,
        _ => &[],
    }
}

/// Describes the first certificate in `pem` (for `restpipe-certs show`).
pub fn describe(pem: &str) -> Result<CertInfo> {
    describe_bytes(pem.as_bytes(), "the PEM input")
}

pub(crate) fn describe_bytes(pem_bytes: &[u8], origin: &str) -> Result<CertInfo> {
    let der = pem::first_certificate(pem_bytes, origin)?;
    describe_der(&der, origin)
}

/// Describes a DER certificate; `origin` names it in error messages.
pub(crate) fn describe_der(der: &[u8], origin: &str) -> Result<CertInfo> {
    let (_, cert) =
        x509_parser::parse_x509_certificate(der).map_err(|e| Error::InvalidCertificate {
            origin: origin.to_owned(),
            reason: e.to_string(),
        })?;
    let ip_addresses = general_names(&cert)
        .iter()
        .filter_map(|n| match n {
            GeneralName::IPAddress(bytes) => ip_from_bytes(bytes),
            _ => None,
        })
        .collect();
    let not_before = cert.validity().not_before.to_datetime();
    let not_after = cert.validity().not_after.to_datetime();
    let now = OffsetDateTime::now_utc();
    Ok(CertInfo {
        subject: cert.subject().to_string(),
        issuer: cert.issuer().to_string(),
        identity: identity_of(&cert),
        dns_names: dns_names(&cert),
        ip_addresses,
        not_before,
        not_after,
        expired: now > not_after,
        not_yet_valid: now < not_before,
        key_type: key_type(&cert),
        sha256_fingerprint: sha256_fingerprint(der),
        is_ca: cert.is_ca(),
        extended_key_usage: extended_key_usage(&cert),
        serial: cert.raw_serial_as_string(),
    })
}

fn ip_from_bytes(bytes: &[u8]) -> Option<IpAddr> {
    match bytes.len() {
        4 => <[u8; 4]>::try_from(bytes).ok().map(IpAddr::from),
        16 => <[u8; 16]>::try_from(bytes).ok().map(IpAddr::from),
        _ => None,
    }
}

fn key_type(cert: &X509Certificate<'_>) -> String {
    let spki = cert.public_key();
    let alg = &spki.algorithm.algorithm;
    if *alg == OID_SIG_ED25519 {
        "Ed25519".to_owned()
    } else if *alg == OID_KEY_TYPE_EC_PUBLIC_KEY {
        let curve: Option<Oid<'_>> = spki
            .algorithm
            .parameters
            .as_ref()
            .and_then(|p| p.as_oid().ok());
        match curve {
            Some(c) if c == OID_EC_P256 => "ECDSA P-256".to_owned(),
            Some(c) if c == OID_NIST_EC_P384 => "ECDSA P-384".to_owned(),
            Some(c) if c == OID_NIST_EC_P521 => "ECDSA P-521".to_owned(),
            Some(c) => format!("ECDSA (curve {c})"),
            None => "ECDSA (unknown curve)".to_owned(),
        }
    } else if *alg == OID_PKCS1_RSAENCRYPTION {
        match spki.parsed() {
            Ok(x509_parser::public_key::PublicKey::RSA(rsa)) => {
                let significant = rsa.modulus.iter().skip_while(|b| **b == 0).count();
                format!("RSA {}", significant * 8)
            }
            _ => "RSA".to_owned(),
        }
    } else {
        format!("unknown ({alg})")
    }
}

fn extended_key_usage(cert: &X509Certificate<'_>) -> Vec<String> {
    let Ok(Some(ext)) = cert.extended_key_usage() else {
        return Vec::new();
    };
    let eku = ext.value;
    let mut out = Vec::new();
    for (set, name) in [
        (eku.any, "any"),
        (eku.server_auth, "serverAuth"),
        (eku.client_auth, "clientAuth"),
        (eku.code_signing, "codeSigning"),
        (eku.email_protection, "emailProtection"),
        (eku.time_stamping, "timeStamping"),
        (eku.ocsp_signing, "OCSPSigning"),
    ] {
        if set {
            out.push(name.to_owned());
        }
    }
    out.extend(eku.other.iter().map(|oid| oid.to_id_string()));
    out
}

/// SHA-256 of `der` as upper-case hex pairs joined by colons.
/// (Public: nodes show the same fingerprint of their peers' certificates.)
pub fn sha256_fingerprint(der: &[u8]) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, der);
    digest
        .as_ref()
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect::<Vec<_>>()
        .join(":")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{CertificateAuthority, IssueOptions, KeyAlgorithm};

    #[test]
    fn identity_is_the_cn() {
        let ca = CertificateAuthority::generate("CA", &IssueOptions::ca_default()).expect("ca");
        let client = ca
            .issue_client("node_7", &IssueOptions::default())
            .expect("client");
        let der = client.cert_der().expect("der");
        assert_eq!(identity_from_der(&der).as_deref(), Some("node_7"));
        assert_eq!(identity_from_der(b"not a certificate"), None);
    }

    #[test]
    fn identity_falls_back_to_first_dns_san() {
        let key = rcgen::KeyPair::generate().expect("key");
        let mut params = rcgen::CertificateParams::new(vec![
            "first.example".to_owned(),
            "second.example".to_owned(),
        ])
        .expect("params");
        params.distinguished_name = rcgen::DistinguishedName::new();
        let cert = params.self_signed(&key).expect("cert");
        assert_eq!(
            identity_from_der(cert.der()).as_deref(),
            Some("first.example")
        );
    }

    #[test]
    fn describes_a_server_certificate() {
        let ca = CertificateAuthority::generate("My CA", &IssueOptions::ca_default()).expect("ca");
        let opts = IssueOptions::default().with_algorithm(KeyAlgorithm::Ed25519);
        let server = ca
            .issue_server(
                "rp.example",
                &[
                    "10.0.0.5".to_owned(),
                    "rp.internal".to_owned(),
                    "::1".to_owned(),
                ],
                &opts,
            )
            .expect("server");
        let info = describe(&server.cert_pem).expect("describe");
        assert_eq!(info.subject, "CN=rp.example");
        assert_eq!(info.issuer, "CN=My CA");
        assert_eq!(info.identity.as_deref(), Some("rp.example"));
        assert_eq!(info.dns_names, ["rp.example", "rp.internal"]);
        assert_eq!(
            info.ip_addresses,
            [
                "10.0.0.5".parse::<IpAddr>().expect("ip"),
                "::1".parse().expect("ip")
            ]
        );
        assert_eq!(info.key_type, "Ed25519");
        assert_eq!(info.extended_key_usage, ["serverAuth"]);
        assert!(!info.expired && !info.not_yet_valid && !info.is_ca);
        assert_eq!(info.sha256_fingerprint.len(), 32 * 3 - 1);

        let ca_info = describe(ca.cert_pem()).expect("describe CA");
        assert!(ca_info.is_ca);
        assert_eq!(ca_info.key_type, "ECDSA P-256");
    }

    #[test]
    fn expired_certificate_is_flagged() {
        let now = OffsetDateTime::now_utc();
        let past = IssueOptions {
            algorithm: KeyAlgorithm::EcdsaP256,
            not_before: now - time::Duration::days(30),
            not_after: now - time::Duration::days(1),
        };
        let ca = CertificateAuthority::generate("CA", &IssueOptions::ca_default()).expect("ca");
        let old = ca.issue_client("old-client", &past).expect("client");
        let info = describe(&old.cert_pem).expect("describe");
        assert!(info.expired);
        assert!(!info.not_yet_valid);
    }

    #[test]
    fn json_has_rfc3339_times() {
        let ca = CertificateAuthority::generate("CA", &IssueOptions::ca_default()).expect("ca");
        let info = describe(ca.cert_pem()).expect("describe");
        let json = serde_json::to_value(&info).expect("json");
        let nb = json["not_before"].as_str().expect("string");
        assert!(nb.ends_with('Z') && nb.contains('T'), "{nb}");
        assert_eq!(json["is_ca"], serde_json::Value::Bool(true));
    }
}
