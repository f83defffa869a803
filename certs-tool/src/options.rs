//! Key algorithms and validity periods.

use std::fmt;
use std::str::FromStr;

use time::{Duration, OffsetDateTime};

use crate::{Error, Result};

/// Validity of server and client certificates when nothing else is asked for, in days.
pub const DEFAULT_LEAF_DAYS: u32 = 825;
/// Validity of a CA certificate when nothing else is asked for, in days.
pub const DEFAULT_CA_DAYS: u32 = 3650;

/// How far `not_before` is set in the past, so that a node whose clock is a little behind
/// still accepts a certificate made just now.
const CLOCK_SKEW: Duration = Duration::hours(1);

/// The kind of key pair to generate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum KeyAlgorithm {
    /// ECDSA on curve P-256 with SHA-256. The default: small, fast and accepted everywhere.
    #[default]
    EcdsaP256,
    /// Ed25519. Accepted by rustls and OpenSSL; some older TLS stacks lack it.
    Ed25519,
    /// RSA. Generating RSA keys is **not supported**: ring, the crypto library this tool
    /// uses, cannot generate them, and asking for it gives [`Error::RsaUnsupported`]. An
    /// existing RSA CA key (PKCS#8 PEM) can still be loaded and used to sign.
    Rsa,
}

impl KeyAlgorithm {
    /// The name used on the command line: `ecdsa-p256`, `ed25519` or `rsa`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::EcdsaP256 => "ecdsa-p256",
            Self::Ed25519 => "ed25519",
            Self::Rsa => "rsa",
        }
    }

    /// Generates a new key pair of this kind.
    pub(crate) fn generate(self) -> Result<rcgen::KeyPair> {
        let alg = match self {
            Self::EcdsaP256 => &rcgen::PKCS_ECDSA_P256_SHA256,
            Self::Ed25519 => &rcgen::PKCS_ED25519,
            Self::Rsa => return Err(Error::RsaUnsupported),
        };
        rcgen::KeyPair::generate_for(alg).map_err(|source| Error::Generate {
            what: "key pair",
            source,
        })
    }
}

impl fmt::Display for KeyAlgorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for KeyAlgorithm {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "ecdsa-p256" | "ecdsa" | "p256" => Ok(Self::EcdsaP256),
            "ed25519" => Ok(Self::Ed25519),
            "rsa" => Ok(Self::Rsa),
            _ => Err(format!(
                "unknown key algorithm {s:?}; use ecdsa-p256, ed25519 or rsa"
            )),
        }
    }
}

/// How to issue a certificate: the key algorithm and the validity period.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IssueOptions {
    /// The kind of key pair to generate for the new certificate.
    pub algorithm: KeyAlgorithm,
    /// Start of validity.
    pub not_before: OffsetDateTime,
    /// End of validity.
    pub not_after: OffsetDateTime,
}

impl IssueOptions {
    /// ECDSA P-256, valid from one hour ago (to allow for clock skew) until `days` days from
    /// now. A period that would end after the year 9999 is cut there.
    pub fn valid_for_days(days: u32) -> Self {
        let now = OffsetDateTime::now_utc();
        let not_after = now
            .checked_add(Duration::days(i64::from(days)))
            .filter(|t| t.year() <= 9999)
            .unwrap_or_else(last_representable);
        Self {
            algorithm: KeyAlgorithm::default(),
            not_before: now - CLOCK_SKEW,
            not_after,
        }
    }

    /// The defaults for a CA: ECDSA P-256, valid for [`DEFAULT_CA_DAYS`] days.
    pub fn ca_default() -> Self {
        Self::valid_for_days(DEFAULT_CA_DAYS)
    }

    /// The same options with another key algorithm.
    pub fn with_algorithm(mut self, algorithm: KeyAlgorithm) -> Self {
        self.algorithm = algorithm;
        self
    }

    /// Checks that the period can be written into a certificate.
    pub(crate) fn check(&self) -> Result<()> {
        let fail = |reason: String| Err(Error::InvalidValidity { reason });
        if self.not_after <= self.not_before {
            return fail(format!(
                "not_after ({}) must be later than not_before ({})",
                self.not_after, self.not_before
            ));
        }
        for (what, t) in [
            ("not_before", self.not_before),
            ("not_after", self.not_after),
        ] {
            if !(1950..=9999).contains(&t.year()) {
                return fail(format!(
                    "{what} ({t}) must lie between the years 1950 and 9999"
                ));
            }
        }
        Ok(())
    }
}

impl Default for IssueOptions {
    /// ECDSA P-256, valid for [`DEFAULT_LEAF_DAYS`] days.
    fn default() -> Self {
        Self::valid_for_days(DEFAULT_LEAF_DAYS)
    }
}

pub(crate) fn last_representable() -> OffsetDateTime {
    // 9999-12-31T23:59:59Z, the last instant an X.509 GeneralizedTime can hold.
    OffsetDateTime::from_unix_timestamp(253_402_300_799).unwrap_or(OffsetDateTime::UNIX_EPOCH)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_is_p256_for_825_days() {
        let o = IssueOptions::default();
        assert_eq!(o.algorithm, KeyAlgorithm::EcdsaP256);
        let days = (o.not_after - o.not_before).whole_days();
        assert_eq!(days, 825, "825 days plus the hour of skew");
        assert!(o.not_before < OffsetDateTime::now_utc());
        assert!(o.check().is_ok());
    }

    #[test]
    fn huge_validity_is_clamped() {
        let o = IssueOptions::valid_for_days(u32::MAX);
        assert_eq!(o.not_after.year(), 9999);
        assert!(o.check().is_ok());
    }

    #[test]
    fn empty_period_is_refused() {
        let now = OffsetDateTime::now_utc();
        let o = IssueOptions {
            algorithm: KeyAlgorithm::EcdsaP256,
            not_before: now,
            not_after: now,
        };
        assert!(matches!(o.check(), Err(Error::InvalidValidity { .. })));
    }

    #[test]
    fn algorithm_names_round_trip() {
        for a in [
            KeyAlgorithm::EcdsaP256,
            KeyAlgorithm::Ed25519,
            KeyAlgorithm::Rsa,
        ] {
            assert_eq!(a.as_str().parse::<KeyAlgorithm>(), Ok(a));
        }
        assert!("dsa".parse::<KeyAlgorithm>().is_err());
        assert!(matches!(
            KeyAlgorithm::Rsa.generate(),
            Err(Error::RsaUnsupported)
        ));
    }
}
