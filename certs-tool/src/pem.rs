//! Reading PEM with rustls-pki-types' `PemObject`, and writing it.

use std::io::Read;
use std::path::Path;

use rustls_pki_types::pem::{self, PemObject};
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::{Error, Result};

/// The largest PEM file read, in bytes. Certificates and keys are a few KB.
pub(crate) const MAX_PEM_FILE: u64 = 1024 * 1024;

/// Reads a PEM file of at most [`MAX_PEM_FILE`] bytes.
pub(crate) fn read_pem_file(path: &Path) -> std::io::Result<Vec<u8>> {
    let file = std::fs::File::open(path)?;
    let mut buf = Vec::new();
    file.take(MAX_PEM_FILE + 1).read_to_end(&mut buf)?;
    Ok(buf)
}

/// The same as [`read_pem_file`], with errors turned into [`Error`]s.
pub(crate) fn read_pem_file_checked(path: &Path) -> Result<Vec<u8>> {
    let buf = read_pem_file(path).map_err(|source| Error::Io {
        action: "read",
        path: path.to_owned(),
        source,
    })?;
    if buf.len() as u64 > MAX_PEM_FILE {
        let size = std::fs::metadata(path)
            .map(|m| m.len())
            .unwrap_or(buf.len() as u64);
        return Err(Error::FileTooLarge {
            path: path.to_owned(),
            size,
            max: MAX_PEM_FILE,
        });
    }
    Ok(buf)
}

/// The first certificate in `pem`; `origin` names the input in error messages.
pub(crate) fn first_certificate(pem: &[u8], origin: &str) -> Result<CertificateDer<'static>> {
    match CertificateDer::from_pem_slice(pem) {
        Ok(der) => Ok(der),
        Err(pem::Error::NoItemsFound) => {
            let hint = if PrivateKeyDer::from_pem_slice(pem).is_ok() {
                ", it holds a private key".to_owned()
            } else {
                String::new()
            };
            Err(Error::NoCertificate {
                origin: origin.to_owned(),
                hint,
            })
        }
        Err(e) => Err(invalid_pem(origin, e)),
    }
}

/// Every certificate in `pem`.
pub(crate) fn all_certificates(pem: &[u8], origin: &str) -> Result<Vec<CertificateDer<'static>>> {
    CertificateDer::pem_slice_iter(pem)
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| invalid_pem(origin, e))
}

/// The first private key in `pem`.
pub(crate) fn first_private_key(pem: &[u8], origin: &str) -> Result<PrivateKeyDer<'static>> {
    match PrivateKeyDer::from_pem_slice(pem) {
        Ok(der) => Ok(der),
        Err(pem::Error::NoItemsFound) => Err(Error::NoPrivateKey {
            origin: origin.to_owned(),
        }),
        Err(e) => Err(invalid_pem(origin, e)),
    }
}

fn invalid_pem(origin: &str, e: pem::Error) -> Error {
    Error::InvalidPem {
        origin: origin.to_owned(),
        reason: e.to_string(),
    }
}

/// Encodes DER as PEM with the given label, 64 base64 characters a line, `\n` line ends.
pub(crate) fn encode(label: &str, der: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut b64 = String::with_capacity(der.len().div_ceil(3) * 4);
    for chunk in der.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                b64.push(char::from(ALPHABET[((n >> (18 - 6 * i)) & 0x3f) as usize]));
            } else {
                b64.push('=');
            }
        }
    }
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in b64.as_bytes().chunks(64) {
        // base64 output is ASCII, so every chunk is valid UTF-8.
        out.push_str(std::str::from_utf8(line).unwrap_or_default());
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encode_round_trips_through_pem_object() {
        for len in 0..70 {
            let der: Vec<u8> = (0..len).map(|i| (i * 37 % 256) as u8).collect();
            let text = encode("CERTIFICATE", &der);
            let back = CertificateDer::from_pem_slice(text.as_bytes());
            if len == 0 {
                // An empty section is not a certificate; nothing else to check.
                continue;
            }
            assert_eq!(back.expect("parses").as_ref(), &der[..], "length {len}");
        }
    }

    #[test]
    fn encode_matches_known_base64() {
        let text = encode("X", b"foobar");
        assert_eq!(text, "-----BEGIN X-----\nZm9vYmFy\n-----END X-----\n");
        assert!(encode("X", b"fo").contains("\nZm8=\n"));
        assert!(encode("X", b"f").contains("\nZg==\n"));
    }

    #[test]
    fn missing_certificate_is_reported() {
        let err = first_certificate(b"hello", "input").expect_err("no cert");
        assert!(matches!(err, Error::NoCertificate { .. }), "{err}");
    }
}
