//! The error type of the library. Every message says what was wrong and how to fix it.

use std::path::PathBuf;

/// Everything that can go wrong while making, loading, writing or reading certificates.
///
/// The `Display` text of each variant is meant to be shown to a person as it is: it names
/// the file or value at fault and says what to do. Underlying causes (I/O errors, rcgen
/// errors) are kept as [`std::error::Error::source`], so print the chain (anyhow's `{:#}`) to
/// see them.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The output file exists and overwriting was not asked for.
    #[error("{} already exists; use --force to replace it", path.display())]
    FileExists {
        /// The file that exists.
        path: PathBuf,
    },

    /// A file system operation failed.
    #[error("cannot {action} {}", path.display())]
    Io {
        /// What was being done, e.g. "read" or "create".
        action: &'static str,
        /// The file or directory concerned.
        path: PathBuf,
        /// The underlying I/O error.
        #[source]
        source: std::io::Error,
    },

    /// A CA file that is needed to issue a certificate does not exist.
    #[error(
        "CA {kind} {} does not exist; create a CA first with `restpipe-certs ca` \
         (or pass --ca and --ca-key to use an existing CA)",
        path.display()
    )]
    CaMissing {
        /// "certificate" or "private key".
        kind: &'static str,
        /// The path that was looked for.
        path: PathBuf,
    },

    /// A file is too large to be a PEM certificate or key.
    #[error(
        "{} is {size} bytes, too large for a PEM certificate or key file (at most {max} bytes); \
         check that it is the right file",
        path.display()
    )]
    FileTooLarge {
        /// The file.
        path: PathBuf,
        /// Its size in bytes.
        size: u64,
        /// The largest size accepted.
        max: u64,
    },

    /// The input is not valid PEM text.
    #[error("{origin} is not valid PEM: {reason}")]
    InvalidPem {
        /// Where the PEM came from (a file name or a description).
        origin: String,
        /// What the PEM parser reported.
        reason: String,
    },

    /// The input holds no certificate.
    #[error(
        "{origin} contains no certificate (no -----BEGIN CERTIFICATE----- block){hint}; \
         pass a certificate file such as ca.pem, server.pem or client.pem"
    )]
    NoCertificate {
        /// Where the PEM came from.
        origin: String,
        /// Extra advice, e.g. when the input is a private key; empty or starting with ", ".
        hint: String,
    },

    /// The input holds no private key.
    #[error(
        "{origin} contains no private key (no -----BEGIN PRIVATE KEY----- block); \
         pass the key file that was written together with the certificate, such as ca.key"
    )]
    NoPrivateKey {
        /// Where the PEM came from.
        origin: String,
    },

    /// The certificate cannot be parsed as X.509.
    #[error("{origin} holds a certificate that cannot be parsed ({reason}); check that the file is not damaged")]
    InvalidCertificate {
        /// Where the certificate came from.
        origin: String,
        /// What the parser reported.
        reason: String,
    },

    /// The private key is in a format or of a type this tool cannot use.
    #[error("{origin}: {reason}")]
    UnsupportedKey {
        /// Where the key came from.
        origin: String,
        /// What is wrong and how to convert it.
        reason: String,
    },

    /// A certificate given as a CA is not a CA certificate.
    #[error(
        "{origin} is not a CA certificate (it lacks basic constraints CA:TRUE); \
         pass the CA certificate (ca.pem), not a server or client certificate"
    )]
    NotCa {
        /// Where the certificate came from.
        origin: String,
    },

    /// The private key does not belong to the certificate.
    #[error(
        "the private key {key} does not match the certificate {cert} (their public keys differ); \
         pass the key that was created together with this certificate"
    )]
    KeyMismatch {
        /// Where the certificate came from.
        cert: String,
        /// Where the key came from.
        key: String,
    },

    /// A server name or SAN is not a valid DNS name (nor an IP address).
    #[error(
        "invalid DNS name {name:?}: {reason}; use an IP address or a DNS name made of \
         letters, digits, hyphens and dots, such as rp.example.com"
    )]
    InvalidDnsName {
        /// The name as given.
        name: String,
        /// What is wrong with it.
        reason: String,
    },

    /// A client identity is not valid.
    #[error(
        "invalid client identity {identity:?}: {reason}; use 1 to 64 characters from \
         A-Z a-z 0-9 _ - . (the identity becomes the URL path segment /client/<identity>/)"
    )]
    InvalidIdentity {
        /// The identity as given.
        identity: String,
        /// What is wrong with it.
        reason: String,
    },

    /// A CA common name is not valid.
    #[error("invalid CA name {name:?}: {reason}; use 1 to 64 printable characters, such as \"restpipe CA\"")]
    InvalidCaName {
        /// The name as given.
        name: String,
        /// What is wrong with it.
        reason: String,
    },

    /// The validity period is unusable.
    #[error("invalid validity period: {reason}")]
    InvalidValidity {
        /// What is wrong with it.
        reason: String,
    },

    /// RSA keys were asked for, but ring cannot generate them.
    #[error(
        "cannot generate an RSA key: restpipe-certs uses the ring crypto library, which has no \
         RSA key generation; use --algorithm ecdsa-p256 (the default) or ed25519 \
         (an existing RSA CA key in PKCS#8 PEM can still be loaded and used to sign)"
    )]
    RsaUnsupported,

    /// A certificate serial number given on the command line is not usable.
    #[error(
        "invalid serial number {serial:?}: {reason}; give it in hex as `restpipe-certs show` \
         prints it, such as 4a:3b:9c:01 (colons optional)"
    )]
    InvalidSerial {
        /// The serial as given.
        serial: String,
        /// What is wrong with it.
        reason: String,
    },

    /// The input holds no CRL.
    #[error(
        "{origin} contains no CRL (no -----BEGIN X509 CRL----- block){hint}; \
         pass a revocation list such as certs/ca.crl.pem"
    )]
    NoCrl {
        /// Where the PEM came from.
        origin: String,
        /// Extra advice, e.g. when the input is a certificate; empty or starting with ", ".
        hint: String,
    },

    /// The CRL cannot be parsed.
    #[error(
        "{origin} holds a CRL that cannot be used ({reason}); check that the file is not damaged"
    )]
    InvalidCrl {
        /// Where the CRL came from.
        origin: String,
        /// What is wrong with it.
        reason: String,
    },

    /// A CRL was not signed by the CA it is used with.
    #[error(
        "the CRL (issuer {crl_issuer}) was not signed by the CA {ca}: {reason}; \
         pass the CA that signed it with --ca and --ca-key, or another CRL file"
    )]
    CrlNotFromCa {
        /// The CRL's issuer name.
        crl_issuer: String,
        /// The CA: its file and subject.
        ca: String,
        /// What did not match.
        reason: String,
    },

    /// A certificate to revoke was not issued by the CA.
    #[error(
        "{origin} was not issued by the CA {ca} (its issuer is {issuer}, or its signature does \
         not verify with the CA's key); pass the CA that issued it with --ca and --ca-key"
    )]
    NotIssuedByCa {
        /// Where the certificate came from.
        origin: String,
        /// The certificate's issuer name.
        issuer: String,
        /// The CA's subject.
        ca: String,
    },

    /// The certificate to revoke is the CA's own certificate.
    #[error(
        "{origin} is the CA certificate itself, which its own CRL cannot revoke; to retire a \
         CA, make a new one with `restpipe-certs ca` and put its ca.pem on every node"
    )]
    RevokeCa {
        /// Where the certificate came from.
        origin: String,
    },

    /// rcgen failed to generate a key or certificate.
    #[error("could not generate the {what}")]
    Generate {
        /// What was being generated.
        what: &'static str,
        /// The rcgen error.
        #[source]
        source: rcgen::Error,
    },
}

/// The result type of this library.
pub type Result<T> = std::result::Result<T, Error>;
