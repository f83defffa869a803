//! Certificate revocation lists (CRLs): revoke certificates, re-sign the list before it
//! expires, read it back and check who signed it.
//!
//! The CA keeps one CRL (`certs/ca.crl.pem` by default). [`CertificateAuthority::revoke`]
//! adds a serial number to it and [`CertificateAuthority::refresh_crl`] re-signs it with no
//! new serial; both keep every serial already listed and give the new list the next CRL
//! number. [`Crl`] reads a CRL (PEM or DER) and [`Crl::verify_signed_by`] checks it against a
//! CA certificate, as a node does before using it.

use std::fmt;
use std::path::Path;
use std::str::FromStr;

use rcgen::{CertificateRevocationListParams, KeyIdMethod, RevokedCertParams, SerialNumber};
use rustls_pki_types::pem::{self as pki_pem, PemObject};
use rustls_pki_types::{CertificateDer, CertificateRevocationListDer};
use serde::Serialize;
use time::{Duration, OffsetDateTime};
use x509_parser::extensions::ParsedExtension;

use crate::inspect::sha256_fingerprint;
use crate::{pem, CertificateAuthority, Error, Result};

/// How many days a CRL is valid (its next update) when nothing else is asked for. The CRL
/// must be re-issued before then (`restpipe-certs crl`).
pub const DEFAULT_CRL_DAYS: u32 = 30;

/// The file name of the CA's CRL, next to `ca.pem` in [`DEFAULT_DIR`](crate::DEFAULT_DIR).
pub const DEFAULT_CRL_FILE: &str = "ca.crl.pem";

/// The longest serial number or CRL number RFC 5280 allows, in octets.
const MAX_SERIAL_OCTETS: usize = 20;

/// Why a certificate was revoked (RFC 5280 §5.3.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RevocationReason {
    /// No reason given. A CRL entry with this reason carries no reason code at all.
    Unspecified,
    /// The certificate's private key was, or may have been, disclosed.
    KeyCompromise,
    /// The CA's key was compromised.
    CaCompromise,
    /// The subject's name or other information changed.
    AffiliationChanged,
    /// The certificate was replaced by a new one.
    Superseded,
    /// The certificate is no longer needed (e.g. the node was retired).
    CessationOfOperation,
    /// Temporarily on hold (restpipe-certs does not take revocations back).
    CertificateHold,
    /// Removed from a delta CRL (not used by restpipe-certs; kept when read).
    RemoveFromCrl,
    /// A privilege the certificate granted was withdrawn.
    PrivilegeWithdrawn,
    /// An attribute authority was compromised.
    AaCompromise,
}

impl RevocationReason {
    /// Every reason, in code order.
    pub const ALL: [Self; 10] = [
        Self::Unspecified,
        Self::KeyCompromise,
        Self::CaCompromise,
        Self::AffiliationChanged,
        Self::Superseded,
        Self::CessationOfOperation,
        Self::CertificateHold,
        Self::RemoveFromCrl,
        Self::PrivilegeWithdrawn,
        Self::AaCompromise,
    ];

    /// The RFC 5280 name, e.g. `keyCompromise` (the name OpenSSL uses too).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Unspecified => "unspecified",
            Self::KeyCompromise => "keyCompromise",
            Self::CaCompromise => "cACompromise",
            Self::AffiliationChanged => "affiliationChanged",
            Self::Superseded => "superseded",
            Self::CessationOfOperation => "cessationOfOperation",
            Self::CertificateHold => "certificateHold",
            Self::RemoveFromCrl => "removeFromCRL",
            Self::PrivilegeWithdrawn => "privilegeWithdrawn",
            Self::AaCompromise => "aACompromise",
        }
    }

    /// The reason code (CRLReason ENUMERATED value).
    pub fn code(self) -> u8 {
        match self {
            Self::Unspecified => 0,
            Self::KeyCompromise => 1,
            Self::CaCompromise => 2,
            Self::AffiliationChanged => 3,
            Self::Superseded => 4,
            Self::CessationOfOperation => 5,
            Self::CertificateHold => 6,
            Self::RemoveFromCrl => 8,
            Self::PrivilegeWithdrawn => 9,
            Self::AaCompromise => 10,
        }
    }

    /// The reason with this code; `None` for 7 and codes above 10.
    pub fn from_code(code: u8) -> Option<Self> {
        Self::ALL.into_iter().find(|r| r.code() == code)
    }

    fn to_rcgen(self) -> rcgen::RevocationReason {
        use rcgen::RevocationReason as R;
        match self {
            Self::Unspecified => R::Unspecified,
            Self::KeyCompromise => R::KeyCompromise,
            Self::CaCompromise => R::CaCompromise,
            Self::AffiliationChanged => R::AffiliationChanged,
            Self::Superseded => R::Superseded,
            Self::CessationOfOperation => R::CessationOfOperation,
            Self::CertificateHold => R::CertificateHold,
            Self::RemoveFromCrl => R::RemoveFromCrl,
            Self::PrivilegeWithdrawn => R::PrivilegeWithdrawn,
            Self::AaCompromise => R::AaCompromise,
        }
    }
}

impl fmt::Display for RevocationReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for RevocationReason {
    type Err = String;

    /// Accepts the RFC 5280 name in any case, with or without `-`/`_` between the words
    /// (`keyCompromise`, `key-compromise`, `KEY_COMPROMISE`).
    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        let squash = |t: &str| {
            t.chars()
                .filter(|c| *c != '-' && *c != '_')
                .collect::<String>()
                .to_ascii_lowercase()
        };
        let wanted = squash(s);
        Self::ALL
            .into_iter()
            .find(|r| squash(r.as_str()) == wanted)
            .ok_or_else(|| {
                let names: Vec<&str> = Self::ALL.iter().map(|r| r.as_str()).collect();
                format!(
                    "unknown revocation reason {s:?}; use one of {}",
                    names.join(", ")
                )
            })
    }
}

impl Serialize for RevocationReason {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

/// A certificate serial number: a positive integer, kept as its big-endian magnitude
/// without leading zero bytes, so that equal numbers compare equal however they were
/// written.
///
/// It displays as hex pairs joined by colons, in the form `restpipe-certs show` and
/// `openssl x509 -serial` use (with a leading `00` when the top bit is set, as in DER).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Serial(Vec<u8>);

impl Serial {
    /// The serial with this big-endian magnitude (leading zero bytes are dropped).
    pub fn from_bytes(bytes: &[u8]) -> Self {
        let start = bytes.iter().position(|b| *b != 0).unwrap_or(bytes.len());
        Self(bytes[start..].to_vec())
    }

    /// The serial number of a DER certificate; `origin` names it in errors.
    pub fn of_certificate(cert_der: &[u8], origin: &str) -> Result<Self> {
        let (_, cert) = x509_parser::parse_x509_certificate(cert_der).map_err(|e| {
            Error::InvalidCertificate {
                origin: origin.to_owned(),
                reason: e.to_string(),
            }
        })?;
        Ok(Self::from_bytes(cert.raw_serial()))
    }

    /// The big-endian magnitude, without leading zero bytes (empty for zero).
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Display for Serial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut bytes = self.0.clone();
        if bytes.first().is_none_or(|b| *b >= 0x80) {
            bytes.insert(0, 0);
        }
        let hex: Vec<String> = bytes.iter().map(|b| format!("{b:02x}")).collect();
        f.write_str(&hex.join(":"))
    }
}

impl fmt::Debug for Serial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Serial({self})")
    }
}

impl FromStr for Serial {
    type Err = Error;

    /// Reads hex, as `show` prints it (`4a:3b:...`) or plain (`4a3b...`, `0x4A3B...`);
    /// colons, spaces and case do not matter. At most 20 octets (RFC 5280).
    fn from_str(s: &str) -> Result<Self> {
        let invalid = |reason: &str| Error::InvalidSerial {
            serial: s.to_owned(),
            reason: reason.to_owned(),
        };
        let trimmed = s.trim();
        let body = trimmed
            .strip_prefix("0x")
            .or_else(|| trimmed.strip_prefix("0X"))
            .unwrap_or(trimmed);
        let digits: Vec<u8> = body
            .chars()
            .filter(|c| *c != ':' && !c.is_whitespace())
            .map(|c| c.to_digit(16).map(|d| d as u8).ok_or(c))
            .collect::<std::result::Result<_, char>>()
            .map_err(|c| invalid(&format!("{c:?} is not a hex digit")))?;
        if digits.is_empty() {
            return Err(invalid("it is empty"));
        }
        // An odd number of digits is read as if it had a leading 0.
        let padded: Vec<u8> = if digits.len() % 2 == 1 {
            std::iter::once(0).chain(digits).collect()
        } else {
            digits
        };
        let bytes: Vec<u8> = padded.chunks(2).map(|p| (p[0] << 4) | p[1]).collect();
        let serial = Self::from_bytes(&bytes);
        if serial.0.is_empty() {
            return Err(invalid("a serial number is positive, not zero"));
        }
        if serial.0.len() > MAX_SERIAL_OCTETS {
            return Err(invalid("it is longer than 20 octets"));
        }
        Ok(serial)
    }
}

impl Serialize for Serial {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// One revoked certificate as a CRL lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RevokedCert {
    /// The certificate's serial number.
    pub serial: Serial,
    /// When it was revoked (RFC 3339 in JSON).
    #[serde(serialize_with = "rfc3339")]
    pub revoked_at: OffsetDateTime,
    /// Why, when the CRL says.
    pub reason: Option<RevocationReason>,
}

/// The validity of a CRL to sign: its this update and next update.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CrlOptions {
    /// When the CRL is issued; also the revocation time of serials it newly revokes.
    pub this_update: OffsetDateTime,
    /// When the next CRL is due. rustls can be told to refuse a CRL past this time
    /// (restpipe nodes should expect a fresh one before then), and OpenSSL refuses it.
    pub next_update: OffsetDateTime,
}

impl CrlOptions {
    /// Issued now (to the second, as the CRL records it), next update `days` days from now
    /// (cut at the year 9999).
    pub fn valid_for_days(days: u32) -> Self {
        let now = OffsetDateTime::now_utc();
        let now = now.replace_nanosecond(0).unwrap_or(now);
        let next_update = now
            .checked_add(Duration::days(i64::from(days)))
            .filter(|t| t.year() <= 9999)
            .unwrap_or_else(crate::options::last_representable);
        Self {
            this_update: now,
            next_update,
        }
    }

    fn check(&self) -> Result<()> {
        let fail = |reason: String| Err(Error::InvalidValidity { reason });
        if self.next_update <= self.this_update {
            return fail(format!(
                "the CRL's next update ({}) must be later than its this update ({})",
                self.next_update, self.this_update
            ));
        }
        for (what, t) in [
            ("this update", self.this_update),
            ("next update", self.next_update),
        ] {
            if !(1950..=9999).contains(&t.year()) {
                return fail(format!(
                    "the CRL's {what} ({t}) must lie between the years 1950 and 9999"
                ));
            }
        }
        Ok(())
    }
}

impl Default for CrlOptions {
    /// Issued now, valid for [`DEFAULT_CRL_DAYS`] days.
    fn default() -> Self {
        Self::valid_for_days(DEFAULT_CRL_DAYS)
    }
}

/// What a CRL says: what `restpipe-certs show` prints for a CRL file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CrlInfo {
    /// The issuer (the CA's subject), e.g. `CN=restpipe CA`.
    pub issuer: String,
    /// The CRL number, in decimal; `None` when the CRL has none.
    pub crl_number: Option<String>,
    /// When the CRL was issued (RFC 3339 in JSON).
    #[serde(serialize_with = "rfc3339")]
    pub this_update: OffsetDateTime,
    /// When the next CRL is due (RFC 3339 in JSON); `None` when the CRL does not say.
    #[serde(serialize_with = "rfc3339_opt")]
    pub next_update: Option<OffsetDateTime>,
    /// True when `next_update` has passed: re-issue the CRL.
    pub expired: bool,
    /// The revoked certificates, in the order the CRL lists them.
    pub revoked: Vec<RevokedCert>,
    /// SHA-256 of the DER CRL, upper-case hex pairs joined by colons.
    pub sha256_fingerprint: String,
}

/// A CRL, DER, with what it says already read.
#[derive(Debug, Clone)]
pub struct Crl {
    der: CertificateRevocationListDer<'static>,
    info: CrlInfo,
    /// The CRL number's big-endian magnitude, without leading zeros.
    number: Option<Vec<u8>>,
}

impl Crl {
    /// Reads a DER CRL; `origin` names it in errors. The signature is not checked: use
    /// [`verify_signed_by`](Self::verify_signed_by).
    pub fn from_der(der: &[u8], origin: &str) -> Result<Self> {
        let invalid = |reason: String| Error::InvalidCrl {
            origin: origin.to_owned(),
            reason,
        };
        let (rest, crl) = x509_parser::parse_x509_crl(der).map_err(|e| invalid(e.to_string()))?;
        if !rest.is_empty() {
            return Err(invalid(format!("{} bytes follow the CRL", rest.len())));
        }
        let mut revoked = Vec::new();
        for entry in crl.iter_revoked_certificates() {
            let reason = match entry.reason_code() {
                None => None,
                Some((_, code)) => Some(RevocationReason::from_code(code.0).ok_or_else(|| {
                    invalid(format!(
                        "serial {} has the unknown reason code {}",
                        Serial::from_bytes(entry.raw_serial()),
                        code.0
                    ))
                })?),
            };
            revoked.push(RevokedCert {
                serial: Serial::from_bytes(entry.raw_serial()),
                revoked_at: entry.revocation_date.to_datetime(),
                reason,
            });
        }
        let number = crl.crl_number();
        let next_update = crl.next_update().map(|t| t.to_datetime());
        let info = CrlInfo {
            issuer: crl.issuer().to_string(),
            crl_number: number.map(ToString::to_string),
            this_update: crl.last_update().to_datetime(),
            next_update,
            expired: next_update.is_some_and(|t| OffsetDateTime::now_utc() >= t),
            revoked,
            sha256_fingerprint: sha256_fingerprint(der),
        };
        let number = number.map(|n| Serial::from_bytes(&n.to_bytes_be()).0);
        Ok(Self {
            der: CertificateRevocationListDer::from(der.to_vec()),
            info,
            number,
        })
    }

    /// Reads the first CRL (`-----BEGIN X509 CRL-----`) in PEM text; `origin` names it.
    pub fn from_pem(pem_text: &[u8], origin: &str) -> Result<Self> {
        match CertificateRevocationListDer::from_pem_slice(pem_text) {
            Ok(der) => Self::from_der(&der, origin),
            Err(pki_pem::Error::NoItemsFound) => {
                let hint = if CertificateDer::from_pem_slice(pem_text).is_ok() {
                    ", it holds a certificate"
                } else {
                    ""
                };
                Err(Error::NoCrl {
                    origin: origin.to_owned(),
                    hint: hint.to_owned(),
                })
            }
            Err(e) => Err(Error::InvalidPem {
                origin: origin.to_owned(),
                reason: e.to_string(),
            }),
        }
    }

    /// Reads a CRL file, PEM or DER (at most 1 MiB). Errors name the file.
    pub fn load(path: &Path) -> Result<Self> {
        let bytes = pem::read_pem_file_checked(path)?;
        let origin = path.display().to_string();
        if is_pem(&bytes) {
            Self::from_pem(&bytes, &origin)
        } else {
            Self::from_der(&bytes, &origin)
        }
    }

    /// The CRL, DER: what rustls' `WebPkiClientVerifier::builder(..).with_crls(..)` takes.
    pub fn der(&self) -> &CertificateRevocationListDer<'static> {
        &self.der
    }

    /// The CRL, PEM (`-----BEGIN X509 CRL-----`), as `restpipe-certs` writes it.
    pub fn pem(&self) -> String {
        pem::encode("X509 CRL", &self.der)
    }

    /// What the CRL says.
    pub fn info(&self) -> &CrlInfo {
        &self.info
    }

    /// The entry for `serial`, when the CRL lists it.
    pub fn find(&self, serial: &Serial) -> Option<&RevokedCert> {
        self.info.revoked.iter().find(|r| r.serial == *serial)
    }

    /// Checks that the CA whose certificate is `ca_cert_der` issued this CRL: the CRL's
    /// issuer is the CA's subject and the CA's key verifies its signature. This is what a
    /// node checks before it uses the CRL. `ca_origin` names the CA in errors.
    pub fn verify_signed_by(&self, ca_cert_der: &[u8], ca_origin: &str) -> Result<()> {
        let (_, ca) = x509_parser::parse_x509_certificate(ca_cert_der).map_err(|e| {
            Error::InvalidCertificate {
                origin: ca_origin.to_owned(),
                reason: e.to_string(),
            }
        })?;
        let (_, crl) = x509_parser::parse_x509_crl(&self.der).map_err(|e| Error::InvalidCrl {
            origin: "the CRL".to_owned(),
            reason: e.to_string(),
        })?;
        let not_from = |reason: &str| Error::CrlNotFromCa {
            crl_issuer: self.info.issuer.clone(),
            ca: format!("{ca_origin} ({})", ca.subject()),
            reason: reason.to_owned(),
        };
        if crl.issuer().as_raw() != ca.subject().as_raw() {
            return Err(not_from("its issuer is not the CA's subject"));
        }
        crl.verify_signature(ca.public_key())
            .map_err(|_| not_from("its signature does not verify with the CA's key"))
    }
}

fn is_pem(bytes: &[u8]) -> bool {
    let start = bytes
        .iter()
        .position(|b| !b.is_ascii_whitespace())
        .unwrap_or(bytes.len());
    bytes[start..].starts_with(b"-----BEGIN")
}

/// What [`CertificateAuthority::revoke`] did.
#[derive(Debug, Clone)]
pub enum RevokeOutcome {
    /// The serial was added: here is the new CRL, to be written.
    Revoked {
        /// The new CRL, holding every serial of the previous one and this one.
        crl: Crl,
        /// The new entry.
        entry: RevokedCert,
    },
    /// The previous CRL already lists the serial: nothing changed, and no new CRL was
    /// signed (re-sign with [`CertificateAuthority::refresh_crl`] to move its next update).
    AlreadyRevoked(RevokedCert),
}

impl CertificateAuthority {
    /// The serial number of `cert_der` when this CA issued it. A certificate whose issuer
    /// is not this CA, or whose signature this CA's key does not verify, is refused with
    /// [`Error::NotIssuedByCa`]; the CA's own certificate with [`Error::RevokeCa`].
    /// `origin` names the certificate in errors.
    pub fn serial_of_issued(&self, cert_der: &[u8], origin: &str) -> Result<Serial> {
        let invalid = |e: String| Error::InvalidCertificate {
            origin: origin.to_owned(),
            reason: e,
        };
        let (_, cert) =
            x509_parser::parse_x509_certificate(cert_der).map_err(|e| invalid(e.to_string()))?;
        let (_, ca) = x509_parser::parse_x509_certificate(self.cert_der())
            .map_err(|e| invalid(format!("the CA certificate cannot be parsed: {e}")))?;
        if cert.as_raw() == ca.as_raw() {
            return Err(Error::RevokeCa {
                origin: origin.to_owned(),
            });
        }
        let signed = cert.issuer().as_raw() == ca.subject().as_raw()
            && cert.verify_signature(Some(ca.public_key())).is_ok();
        if !signed {
            return Err(Error::NotIssuedByCa {
                origin: origin.to_owned(),
                issuer: cert.issuer().to_string(),
                ca: self.subject().to_owned(),
            });
        }
        Ok(Serial::from_bytes(cert.raw_serial()))
    }

    /// Revokes `serial`: signs a new CRL that lists every serial of `previous` (when there
    /// is one) plus `serial`, with the next CRL number, valid as `opts` says. Revoking a
    /// serial that `previous` already lists changes nothing
    /// ([`RevokeOutcome::AlreadyRevoked`]).
    ///
    /// `previous` must have been signed by this CA ([`Error::CrlNotFromCa`] otherwise). The
    /// serial is not checked against issued certificates (the CA keeps no list of them): to
    /// revoke a certificate file, get its serial with
    /// [`serial_of_issued`](Self::serial_of_issued).
    pub fn revoke(
        &self,
        previous: Option<&Crl>,
        serial: Serial,
        reason: Option<RevocationReason>,
        opts: &CrlOptions,
    ) -> Result<RevokeOutcome> {
        if serial.0.is_empty() || serial.0.len() > MAX_SERIAL_OCTETS {
            return Err(Error::InvalidSerial {
                serial: serial.to_string(),
                reason: "a serial number is 1 to 20 octets".into(),
            });
        }
        if let Some(entry) = previous.and_then(|p| p.find(&serial)) {
            self.check_previous(previous)?;
            return Ok(RevokeOutcome::AlreadyRevoked(entry.clone()));
        }
        let entry = RevokedCert {
            serial,
            revoked_at: opts.this_update,
            reason,
        };
        let crl = self.sign_crl(previous, Some(&entry), opts)?;
        Ok(RevokeOutcome::Revoked { crl, entry })
    }

    /// Re-signs the CRL with no new serial: every serial of `previous` (when there is one),
    /// the next CRL number, and the this/next update of `opts`. With no previous CRL this
    /// makes an empty one (number 1). Run it before the CRL's next update passes.
    pub fn refresh_crl(&self, previous: Option<&Crl>, opts: &CrlOptions) -> Result<Crl> {
        self.sign_crl(previous, None, opts)
    }

    fn check_previous(&self, previous: Option<&Crl>) -> Result<()> {
        match previous {
            Some(p) => p.verify_signed_by(self.cert_der(), self.subject()),
            None => Ok(()),
        }
    }

    fn sign_crl(
        &self,
        previous: Option<&Crl>,
        add: Option<&RevokedCert>,
        opts: &CrlOptions,
    ) -> Result<Crl> {
        opts.check()?;
        self.check_previous(previous)?;
        let number = match previous.and_then(|p| p.number.as_deref()) {
            Some(n) => increment(n),
            None => vec![1],
        };
        if number.len() > MAX_SERIAL_OCTETS {
            return Err(Error::InvalidCrl {
                origin: "the previous CRL".into(),
                reason: "its CRL number is at the 20-octet limit and cannot be incremented; \
                         start a new CRL file"
                    .into(),
            });
        }
        let revoked_certs = previous
            .map(|p| p.info.revoked.as_slice())
            .unwrap_or_default()
            .iter()
            .chain(add)
            .map(|r| RevokedCertParams {
                serial_number: SerialNumber::from_slice(r.serial.as_bytes()),
                revocation_time: r.revoked_at,
                reason_code: r.reason.map(RevocationReason::to_rcgen),
                invalidity_date: None,
            })
            .collect();
        let params = CertificateRevocationListParams {
            this_update: opts.this_update,
            next_update: opts.next_update,
            crl_number: SerialNumber::from_slice(&number),
            issuing_distribution_point: None,
            revoked_certs,
            key_identifier_method: self.key_identifier_method(),
        };
        let crl = params
            .signed_by(self.issuer())
            .map_err(|source| match source {
                rcgen::Error::IssuerNotCrlSigner => Error::InvalidCertificate {
                    origin: format!("the CA certificate ({})", self.subject()),
                    reason: "its key usage lacks cRLSign, so it cannot sign revocation lists; \
                         make a new CA with `restpipe-certs ca`"
                        .into(),
                },
                source => Error::Generate {
                    what: "CRL",
                    source,
                },
            })?;
        Crl::from_der(crl.der(), "the new CRL")
    }

    /// The CRL's authority key identifier must be the CA's subject key identifier: use it
    /// as it is when the CA certificate has one, else derive it as rcgen does.
    fn key_identifier_method(&self) -> KeyIdMethod {
        x509_parser::parse_x509_certificate(self.cert_der())
            .ok()
            .and_then(|(_, ca)| {
                ca.extensions()
                    .iter()
                    .find_map(|ext| match ext.parsed_extension() {
                        ParsedExtension::SubjectKeyIdentifier(id) => {
                            Some(KeyIdMethod::PreSpecified(id.0.to_vec()))
                        }
                        _ => None,
                    })
            })
            .unwrap_or(KeyIdMethod::Sha256)
    }
}

/// `n + 1` for a big-endian magnitude.
fn increment(n: &[u8]) -> Vec<u8> {
    let mut out = n.to_vec();
    for byte in out.iter_mut().rev() {
        if *byte == 0xff {
            *byte = 0;
        } else {
            *byte += 1;
            return out;
        }
    }
    out.insert(0, 1);
    out
}

fn rfc3339<S: serde::Serializer>(t: &OffsetDateTime, s: S) -> std::result::Result<S::Ok, S::Error> {
    let text = t
        .format(&time::format_description::well_known::Rfc3339)
        .map_err(serde::ser::Error::custom)?;
    s.serialize_str(&text)
}

fn rfc3339_opt<S: serde::Serializer>(
    t: &Option<OffsetDateTime>,
    s: S,
) -> std::result::Result<S::Ok, S::Error> {
    match t {
        Some(t) => rfc3339(t, s),
        None => s.serialize_none(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{IssueOptions, KeyAlgorithm};

    fn ca() -> CertificateAuthority {
        CertificateAuthority::generate("CRL CA", &IssueOptions::ca_default()).expect("ca")
    }

    fn serial_of(ca: &CertificateAuthority, identity: &str) -> Serial {
        let client = ca
            .issue_client(identity, &IssueOptions::default())
            .expect("client");
        let der = client.cert_der().expect("der");
        ca.serial_of_issued(&der, identity).expect("issued by ca")
    }

    #[test]
    fn serial_parses_in_show_and_plain_forms() {
        let a: Serial = "4a:3B:00:ff".parse().expect("colons");
        let b: Serial = "0x4a3b00FF".parse().expect("0x");
        let c: Serial = "00 4a 3b 00 ff".parse().expect("spaces, leading zero");
        assert_eq!(a, b);
        assert_eq!(a, c);
        assert_eq!(a.to_string(), "4a:3b:00:ff");
        assert_eq!(
            "abc".parse::<Serial>().expect("odd").as_bytes(),
            [0x0a, 0xbc]
        );
        // The DER form of a number with its top bit set has a leading zero byte.
        assert_eq!("80".parse::<Serial>().expect("80").to_string(), "00:80");
        for bad in ["", "xyz", "0", "00:00", &"ab".repeat(21)] {
            let err = bad.parse::<Serial>().expect_err(bad);
            assert!(matches!(err, Error::InvalidSerial { .. }), "{bad}: {err}");
        }
    }

    #[test]
    fn reasons_parse_in_any_spelling() {
        for r in RevocationReason::ALL {
            assert_eq!(r.as_str().parse::<RevocationReason>(), Ok(r));
            assert_eq!(RevocationReason::from_code(r.code()), Some(r));
        }
        assert_eq!(
            "key-compromise".parse::<RevocationReason>(),
            Ok(RevocationReason::KeyCompromise)
        );
        assert_eq!(
            "CESSATION_OF_OPERATION".parse::<RevocationReason>(),
            Ok(RevocationReason::CessationOfOperation)
        );
        assert!("stolen".parse::<RevocationReason>().is_err());
        assert_eq!(RevocationReason::from_code(7), None);
    }

    #[test]
    fn increment_carries() {
        assert_eq!(increment(&[1]), [2]);
        assert_eq!(increment(&[0xff]), [1, 0]);
        assert_eq!(increment(&[1, 0xff, 0xff]), [2, 0, 0]);
        assert_eq!(increment(&[]), [1]);
    }

    #[test]
    fn revoke_keeps_serials_and_counts_up() {
        let ca = ca();
        let first = serial_of(&ca, "one");
        let second = serial_of(&ca, "two");
        let opts = CrlOptions::default();

        let empty = ca.refresh_crl(None, &opts).expect("empty");
        assert_eq!(empty.info().crl_number.as_deref(), Some("1"));
        assert!(empty.info().revoked.is_empty());
        assert_eq!(empty.info().issuer, "CN=CRL CA");
        empty
            .verify_signed_by(ca.cert_der(), "ca")
            .expect("signed by the CA");

        let RevokeOutcome::Revoked { crl, entry } = ca
            .revoke(
                Some(&empty),
                first.clone(),
                Some(RevocationReason::KeyCompromise),
                &opts,
            )
            .expect("revoke")
        else {
            panic!("expected a new CRL");
        };
        assert_eq!(entry.serial, first);
        assert_eq!(
            crl.find(&first),
            Some(&entry),
            "entry as the CRL records it"
        );
        assert_eq!(crl.info().crl_number.as_deref(), Some("2"));
        let RevokeOutcome::Revoked { crl, .. } = ca
            .revoke(Some(&crl), second.clone(), None, &opts)
            .expect("revoke")
        else {
            panic!("expected a new CRL");
        };
        let info = crl.info();
        assert_eq!(info.crl_number.as_deref(), Some("3"));
        let serials: Vec<&Serial> = info.revoked.iter().map(|r| &r.serial).collect();
        assert_eq!(serials, [&first, &second]);
        assert_eq!(
            crl.find(&first).expect("listed").reason,
            Some(RevocationReason::KeyCompromise)
        );
        assert_eq!(crl.find(&second).expect("listed").reason, None);
        assert!(!info.expired);
        let next = info.next_update.expect("next update");
        assert_eq!((next - info.this_update).whole_days(), 30);

        // PEM round trip.
        let again = Crl::from_pem(crl.pem().as_bytes(), "pem").expect("pem");
        assert_eq!(again.info(), crl.info());

        // Revoking again changes nothing.
        match ca
            .revoke(Some(&crl), first.clone(), None, &opts)
            .expect("again")
        {
            RevokeOutcome::AlreadyRevoked(entry) => {
                assert_eq!(entry.reason, Some(RevocationReason::KeyCompromise));
            }
            other => panic!("expected AlreadyRevoked, got {other:?}"),
        }

        // Refreshing keeps both and counts up.
        let refreshed = ca.refresh_crl(Some(&crl), &opts).expect("refresh");
        assert_eq!(refreshed.info().crl_number.as_deref(), Some("4"));
        assert_eq!(refreshed.info().revoked, crl.info().revoked);
    }

    #[test]
    fn crl_of_another_ca_is_refused() {
        let ca = ca();
        let other = CertificateAuthority::generate("CRL CA", &IssueOptions::ca_default())
            .expect("same name, other key");
        let foreign = other
            .refresh_crl(None, &CrlOptions::default())
            .expect("crl");
        let err = foreign
            .verify_signed_by(ca.cert_der(), "ca.pem")
            .expect_err("other key");
        assert!(matches!(err, Error::CrlNotFromCa { .. }), "{err}");
        assert!(err.to_string().contains("signature"), "{err}");
        let err = ca
            .refresh_crl(Some(&foreign), &CrlOptions::default())
            .expect_err("must not extend another CA's CRL");
        assert!(matches!(err, Error::CrlNotFromCa { .. }), "{err}");

        let named = CertificateAuthority::generate("Other", &IssueOptions::ca_default())
            .expect("ca")
            .refresh_crl(None, &CrlOptions::default())
            .expect("crl");
        let err = named
            .verify_signed_by(ca.cert_der(), "ca.pem")
            .expect_err("other name");
        assert!(err.to_string().contains("issuer"), "{err}");
    }

    #[test]
    fn certificate_of_another_ca_and_the_ca_itself_are_refused() {
        let ca = ca();
        let other = CertificateAuthority::generate("CRL CA", &IssueOptions::ca_default())
            .expect("same name, other key");
        let stranger = other
            .issue_client("stranger", &IssueOptions::default())
            .expect("client");
        let err = ca
            .serial_of_issued(&stranger.cert_der().expect("der"), "stranger.pem")
            .expect_err("other CA");
        assert!(matches!(err, Error::NotIssuedByCa { .. }), "{err}");
        assert!(err.to_string().contains("stranger.pem"), "{err}");
        let err = ca
            .serial_of_issued(ca.cert_der(), "ca.pem")
            .expect_err("the CA itself");
        assert!(matches!(err, Error::RevokeCa { .. }), "{err}");
    }

    #[test]
    fn ed25519_ca_signs_verifiable_crls_and_expiry_is_reported() {
        let ca = CertificateAuthority::generate(
            "Ed CA",
            &IssueOptions::ca_default().with_algorithm(KeyAlgorithm::Ed25519),
        )
        .expect("ca");
        let now = OffsetDateTime::now_utc();
        let past = CrlOptions {
            this_update: now - Duration::days(10),
            next_update: now - Duration::days(1),
        };
        let crl = ca.refresh_crl(None, &past).expect("crl");
        crl.verify_signed_by(ca.cert_der(), "ca").expect("verifies");
        assert!(crl.info().expired);
        let bad = CrlOptions {
            this_update: now,
            next_update: now,
        };
        assert!(matches!(
            ca.refresh_crl(None, &bad),
            Err(Error::InvalidValidity { .. })
        ));
    }

    #[test]
    fn json_has_rfc3339_times_and_hex_serials() {
        let ca = ca();
        let serial = serial_of(&ca, "one");
        let RevokeOutcome::Revoked { crl, .. } = ca
            .revoke(
                None,
                serial.clone(),
                Some(RevocationReason::Superseded),
                &CrlOptions::default(),
            )
            .expect("revoke")
        else {
            panic!("expected a new CRL");
        };
        let json = serde_json::to_value(crl.info()).expect("json");
        assert_eq!(json["crl_number"], "1");
        assert_eq!(json["revoked"][0]["serial"], serial.to_string());
        assert_eq!(json["revoked"][0]["reason"], "superseded");
        let at = json["revoked"][0]["revoked_at"].as_str().expect("string");
        assert!(at.ends_with('Z') && at.contains('T'), "{at}");
        assert!(json["next_update"].is_string());
    }

    #[test]
    fn not_a_crl_is_explained() {
        let ca = ca();
        let err = Crl::from_pem(ca.cert_pem().as_bytes(), "ca.pem").expect_err("a certificate");
        assert!(matches!(err, Error::NoCrl { .. }), "{err}");
        assert!(err.to_string().contains("holds a certificate"), "{err}");
        let err = Crl::from_der(b"\x30\x03\x02\x01\x01", "junk").expect_err("junk");
        assert!(matches!(err, Error::InvalidCrl { .. }), "{err}");
    }
}
