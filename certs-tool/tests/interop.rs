//! Certificates from this crate are accepted by OpenSSL (`openssl verify` with the TLS
//! purposes) and by rustls in a real mutual-TLS handshake, as the restpipe node uses it.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use restpipe_certs::{
    describe, identity_from_der, write_certificate, write_crl, write_dev_set, write_private_key,
    CertificateAuthority, Crl, CrlOptions, DevOutcome, IssueOptions, KeyAlgorithm,
    RevocationReason, RevokeOutcome,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer, ServerName};

fn openssl_available() -> bool {
    match Command::new("openssl").arg("version").output() {
        Ok(out) if out.status.success() => true,
        _ => {
            eprintln!("openssl not found on PATH: skipping the OpenSSL checks");
            false
        }
    }
}

/// Runs `openssl verify -CAfile ca -purpose purpose cert` and asserts it says OK.
fn openssl_verify(ca: &Path, cert: &Path, purpose: &str) {
    let out = Command::new("openssl")
        .arg("verify")
        .arg("-CAfile")
        .arg(ca)
        .args(["-purpose", purpose])
        .arg(cert)
        .output()
        .expect("run openssl");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stdout.trim_end().ends_with(": OK"),
        "openssl verify -purpose {purpose} {} failed:\n{stdout}\n{stderr}",
        cert.display()
    );
}

/// `openssl verify` must refuse `cert` for `purpose`.
fn openssl_refuses(ca: &Path, cert: &Path, purpose: &str) {
    let out = Command::new("openssl")
        .arg("verify")
        .arg("-CAfile")
        .arg(ca)
        .args(["-purpose", purpose])
        .arg(cert)
        .output()
        .expect("run openssl");
    assert!(
        !out.status.success(),
        "openssl accepted {} for {purpose}",
        cert.display()
    );
}

#[test]
fn openssl_verifies_the_dev_set() {
    if !openssl_available() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let DevOutcome::Written(p) = write_dev_set(dir.path(), false).expect("dev set") else {
        panic!("expected a new set");
    };
    openssl_verify(&p.ca_cert, &p.server_cert, "sslserver");
    openssl_verify(&p.ca_cert, &p.client_cert, "sslclient");
    // The usages are kept apart: a client certificate is no server certificate.
    openssl_refuses(&p.ca_cert, &p.client_cert, "sslserver");
    openssl_refuses(&p.ca_cert, &p.server_cert, "sslclient");

    // Our fingerprint is the one OpenSSL prints.
    let out = Command::new("openssl")
        .args(["x509", "-noout", "-fingerprint", "-sha256", "-in"])
        .arg(&p.server_cert)
        .output()
        .expect("run openssl");
    let text = String::from_utf8_lossy(&out.stdout);
    let theirs = text
        .trim()
        .rsplit('=')
        .next()
        .unwrap_or_default()
        .to_owned();
    let pem = std::fs::read_to_string(&p.server_cert).expect("read");
    assert_eq!(describe(&pem).expect("describe").sha256_fingerprint, theirs);
}

#[test]
fn openssl_verifies_certificates_from_a_loaded_ca_for_both_algorithms() {
    if !openssl_available() {
        return;
    }
    for algorithm in [KeyAlgorithm::EcdsaP256, KeyAlgorithm::Ed25519] {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path();
        let ca_opts = IssueOptions::ca_default().with_algorithm(algorithm);
        let ca = CertificateAuthority::generate("interop CA", &ca_opts).expect("ca");
        write_certificate(&d.join("ca.pem"), ca.cert_pem(), false).expect("write");
        write_private_key(&d.join("ca.key"), &ca.key_pem(), false).expect("write");

        // Issue from the CA as loaded back from disk, as `restpipe-certs server` does.
        let ca = CertificateAuthority::load(&d.join("ca.pem"), &d.join("ca.key")).expect("load");
        let opts = IssueOptions::default().with_algorithm(algorithm);
        let server = ca
            .issue_server(
                "rp.example",
                &["10.0.0.5".into(), "rp.internal".into()],
                &opts,
            )
            .expect("server");
        let client = ca.issue_client("fileserver-1", &opts).expect("client");
        write_certificate(&d.join("server.pem"), &server.cert_pem, false).expect("write");
        write_certificate(&d.join("client.pem"), &client.cert_pem, false).expect("write");

        openssl_verify(&d.join("ca.pem"), &d.join("server.pem"), "sslserver");
        openssl_verify(&d.join("ca.pem"), &d.join("client.pem"), "sslclient");
    }
}

#[test]
fn openssl_refuses_a_certificate_from_another_ca() {
    if !openssl_available() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let ca = CertificateAuthority::generate("one", &IssueOptions::ca_default()).expect("ca");
    let other = CertificateAuthority::generate("two", &IssueOptions::ca_default()).expect("ca");
    let client = other
        .issue_client("intruder", &IssueOptions::default())
        .expect("client");
    write_certificate(&d.join("ca.pem"), ca.cert_pem(), false).expect("write");
    write_certificate(&d.join("client.pem"), &client.cert_pem, false).expect("write");
    openssl_refuses(&d.join("ca.pem"), &d.join("client.pem"), "sslclient");
}

fn cert_der(pem: &str) -> CertificateDer<'static> {
    CertificateDer::from_pem_slice(pem.as_bytes()).expect("certificate PEM")
}

fn key_der(pem: &str) -> PrivateKeyDer<'static> {
    PrivateKeyDer::from_pem_slice(pem.as_bytes()).expect("key PEM")
}

/// Runs a complete rustls mutual-TLS handshake in memory: the server requires a client
/// certificate chaining to `ca_pem`, the client verifies the server against `ca_pem` and
/// `server_name`. Returns the client certificate as the server saw it.
fn handshake(
    ca_pem: &str,
    server: (&str, &str),
    client: (&str, &str),
    server_name: &str,
) -> Result<CertificateDer<'static>, rustls::Error> {
    handshake_with_crls(ca_pem, server, client, server_name, Vec::new(), false)
}

/// [`handshake`], with the server's client verifier checking `crls` (as a node started with
/// `--crl` does), and refusing an expired CRL when `enforce_expiry`.
fn handshake_with_crls(
    ca_pem: &str,
    server: (&str, &str),
    client: (&str, &str),
    server_name: &str,
    crls: Vec<CertificateRevocationListDer<'static>>,
    enforce_expiry: bool,
) -> Result<CertificateDer<'static>, rustls::Error> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert_der(ca_pem)).expect("add root");
    let roots = Arc::new(roots);

    let mut builder = rustls::server::WebPkiClientVerifier::builder_with_provider(
        roots.clone(),
        provider.clone(),
    )
    .with_crls(crls);
    if enforce_expiry {
        builder = builder.enforce_revocation_expiration();
    }
    let verifier = builder.build().expect("client verifier");
    let server_config = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_client_cert_verifier(verifier)
        .with_single_cert(vec![cert_der(server.0)], key_der(server.1))?;
    let client_config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_client_auth_cert(vec![cert_der(client.0)], key_der(client.1))?;

    let name = ServerName::try_from(server_name.to_owned()).expect("server name");
    let mut c = rustls::ClientConnection::new(Arc::new(client_config), name)?;
    let mut s = rustls::ServerConnection::new(Arc::new(server_config))?;
    for _ in 0..20 {
        if !c.is_handshaking() && !s.is_handshaking() {
            break;
        }
        let mut buf = Vec::new();
        c.write_tls(&mut buf).expect("client write");
        s.read_tls(&mut buf.as_slice()).expect("server read");
        s.process_new_packets()?;
        let mut buf = Vec::new();
        s.write_tls(&mut buf).expect("server write");
        c.read_tls(&mut buf.as_slice()).expect("client read");
        c.process_new_packets()?;
    }
    // The client's last flight (its certificate proof and Finished) reaches the server.
    let mut buf = Vec::new();
    c.write_tls(&mut buf).expect("client write");
    s.read_tls(&mut buf.as_slice()).expect("server read");
    s.process_new_packets()?;
    assert!(
        !s.is_handshaking() && !c.is_handshaking(),
        "handshake did not finish"
    );
    let peer = s
        .peer_certificates()
        .and_then(|certs| certs.first())
        .expect("server sees a client certificate")
        .clone();
    Ok(peer)
}

#[test]
fn rustls_mutual_tls_accepts_the_dev_set_and_routes_by_identity() {
    let dir = tempfile::tempdir().expect("tempdir");
    let DevOutcome::Written(p) = write_dev_set(dir.path(), false).expect("dev set") else {
        panic!("expected a new set");
    };
    let read = |path: &Path| std::fs::read_to_string(path).expect("read");
    let (ca, sc, sk, cc, ck) = (
        read(&p.ca_cert),
        read(&p.server_cert),
        read(&p.server_key),
        read(&p.client_cert),
        read(&p.client_key),
    );
    for server_name in ["localhost", "127.0.0.1", "::1"] {
        let peer = handshake(&ca, (&sc, &sk), (&cc, &ck), server_name)
            .unwrap_or_else(|e| panic!("handshake as {server_name} failed: {e}"));
        assert_eq!(identity_from_der(&peer).as_deref(), Some("dev-client"));
    }
    // A name the server certificate does not hold is refused by the client.
    assert!(handshake(&ca, (&sc, &sk), (&cc, &ck), "other.example").is_err());
}

#[test]
fn rustls_refuses_a_client_from_another_ca_and_a_server_cert_as_client() {
    let ca = CertificateAuthority::generate("one", &IssueOptions::ca_default()).expect("ca");
    let other = CertificateAuthority::generate("two", &IssueOptions::ca_default()).expect("ca");
    let opts = IssueOptions::default().with_algorithm(KeyAlgorithm::Ed25519);
    let server = ca.issue_server("localhost", &[], &opts).expect("server");
    let intruder = other.issue_client("intruder", &opts).expect("client");
    let result = handshake(
        ca.cert_pem(),
        (&server.cert_pem, &server.key_pem),
        (&intruder.cert_pem, &intruder.key_pem),
        "localhost",
    );
    assert!(result.is_err(), "a client of another CA must be refused");

    // A server certificate (serverAuth only) does not work as a client certificate.
    let result = handshake(
        ca.cert_pem(),
        (&server.cert_pem, &server.key_pem),
        (&server.cert_pem, &server.key_pem),
        "localhost",
    );
    assert!(
        result.is_err(),
        "serverAuth-only certificate must not pass as a client"
    );

    // And a proper client certificate of the same CA with Ed25519 keys passes.
    let client = ca.issue_client("ed-node", &opts).expect("client");
    let peer = handshake(
        ca.cert_pem(),
        (&server.cert_pem, &server.key_pem),
        (&client.cert_pem, &client.key_pem),
        "localhost",
    )
    .expect("handshake");
    assert_eq!(identity_from_der(&peer).as_deref(), Some("ed-node"));
}

/// Runs openssl with `args`; returns (success, stdout + stderr).
fn openssl(args: &[&std::ffi::OsStr]) -> (bool, String) {
    let out = Command::new("openssl")
        .args(args)
        .output()
        .expect("run openssl");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn openssl_verifies_the_crl_and_sees_the_revoked_client() {
    if !openssl_available() {
        return;
    }
    for algorithm in [KeyAlgorithm::EcdsaP256, KeyAlgorithm::Ed25519] {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path();
        let ca_opts = IssueOptions::ca_default().with_algorithm(algorithm);
        let ca = CertificateAuthority::generate("crl CA", &ca_opts).expect("ca");
        write_certificate(&d.join("ca.pem"), ca.cert_pem(), false).expect("write");
        write_private_key(&d.join("ca.key"), &ca.key_pem(), false).expect("write");
        // Revoke with the CA as loaded back from disk, as `restpipe-certs revoke` does.
        let ca = CertificateAuthority::load(&d.join("ca.pem"), &d.join("ca.key")).expect("load");
        let opts = IssueOptions::default().with_algorithm(algorithm);
        let leaked = ca.issue_client("leaked", &opts).expect("client");
        let kept = ca.issue_client("kept", &opts).expect("client");
        write_certificate(&d.join("leaked.pem"), &leaked.cert_pem, false).expect("write");
        write_certificate(&d.join("kept.pem"), &kept.cert_pem, false).expect("write");

        let serial = ca
            .serial_of_issued(&leaked.cert_der().expect("der"), "leaked.pem")
            .expect("serial");
        let crl_path = d.join("ca.crl.pem");
        let empty = ca
            .refresh_crl(None, &CrlOptions::default())
            .expect("empty CRL");
        write_crl(&crl_path, &empty).expect("write");
        let previous = Crl::load(&crl_path).expect("load");
        let RevokeOutcome::Revoked { crl, .. } = ca
            .revoke(
                Some(&previous),
                serial.clone(),
                Some(RevocationReason::KeyCompromise),
                &CrlOptions::default(),
            )
            .expect("revoke")
        else {
            panic!("expected a new CRL");
        };
        write_crl(&crl_path, &crl).expect("write");

        let p = |path: &Path| path.as_os_str().to_owned();
        let (ok, text) = openssl(&[
            "crl".as_ref(),
            "-in".as_ref(),
            &p(&crl_path),
            "-CAfile".as_ref(),
            &p(&d.join("ca.pem")),
            "-noout".as_ref(),
        ]);
        assert!(ok && text.contains("verify OK"), "{algorithm}: {text}");

        // OpenSSL reads the same number, serial and reason.
        let (ok, text) = openssl(&[
            "crl".as_ref(),
            "-in".as_ref(),
            &p(&crl_path),
            "-noout".as_ref(),
            "-text".as_ref(),
        ]);
        assert!(ok, "{text}");
        let hex: String = serial
            .to_string()
            .chars()
            .filter(|c| *c != ':')
            .collect::<String>()
            .to_uppercase();
        assert!(text.contains(&hex), "serial {hex} not in:\n{text}");
        assert!(text.contains("Key Compromise"), "{text}");
        assert!(text.contains("X509v3 CRL Number"), "{text}");

        let verify = |cert: &str| {
            openssl(&[
                "verify".as_ref(),
                "-crl_check".as_ref(),
                "-CRLfile".as_ref(),
                &p(&crl_path),
                "-CAfile".as_ref(),
                &p(&d.join("ca.pem")),
                &p(&d.join(cert)),
            ])
        };
        let (ok, text) = verify("leaked.pem");
        assert!(
            !ok && text.contains("certificate revoked"),
            "{algorithm}: {text}"
        );
        let (ok, text) = verify("kept.pem");
        assert!(
            ok && text.trim_end().ends_with(": OK"),
            "{algorithm}: {text}"
        );
    }
}

#[test]
fn rustls_with_the_crl_refuses_the_revoked_client_and_accepts_the_others() {
    let dir = tempfile::tempdir().expect("tempdir");
    let DevOutcome::Written(p) = write_dev_set(dir.path(), false).expect("dev set") else {
        panic!("expected a new set");
    };
    let read = |path: &Path| std::fs::read_to_string(path).expect("read");
    let (ca_pem, sc, sk, cc, ck) = (
        read(&p.ca_cert),
        read(&p.server_cert),
        read(&p.server_key),
        read(&p.client_cert),
        read(&p.client_key),
    );
    let ca = CertificateAuthority::load(&p.ca_cert, &p.ca_key).expect("load");
    let other = ca
        .issue_client("other-node", &IssueOptions::default())
        .expect("client");
    let serial = ca
        .serial_of_issued(&cert_der(&cc), "client.pem")
        .expect("serial");
    let RevokeOutcome::Revoked { crl, .. } = ca
        .revoke(None, serial, None, &CrlOptions::default())
        .expect("revoke")
    else {
        panic!("expected a new CRL");
    };
    // The node reads the CRL file back, checks it against its CA, and hands rustls the DER.
    let crl_path = dir.path().join("ca.crl.pem");
    write_crl(&crl_path, &crl).expect("write");
    let loaded = Crl::load(&crl_path).expect("load");
    loaded
        .verify_signed_by(&cert_der(&ca_pem), "ca.pem")
        .expect("signed by the CA");
    let crls = || vec![loaded.der().clone()];

    for enforce_expiry in [false, true] {
        let err = handshake_with_crls(
            &ca_pem,
            (&sc, &sk),
            (&cc, &ck),
            "localhost",
            crls(),
            enforce_expiry,
        )
        .expect_err("a revoked client must be refused");
        assert!(
            matches!(
                err,
                rustls::Error::InvalidCertificate(rustls::CertificateError::Revoked)
            ),
            "{err:?}"
        );
        let peer = handshake_with_crls(
            &ca_pem,
            (&sc, &sk),
            (&other.cert_pem, &other.key_pem),
            "localhost",
            crls(),
            enforce_expiry,
        )
        .expect("a client not on the CRL is accepted");
        assert_eq!(identity_from_der(&peer).as_deref(), Some("other-node"));
    }
    // Without the CRL the revoked client still gets in: the CRL is what shuts it out.
    handshake(&ca_pem, (&sc, &sk), (&cc, &ck), "localhost").expect("no CRL, no revocation");

    // A CRL past its next update is refused when the node enforces expiry: it must be
    // re-signed (`restpipe-certs crl`) before then.
    let now = time::OffsetDateTime::now_utc();
    let stale = ca
        .refresh_crl(
            Some(&loaded),
            &CrlOptions {
                this_update: now - time::Duration::days(31),
                next_update: now - time::Duration::days(1),
            },
        )
        .expect("stale CRL");
    let err = handshake_with_crls(
        &ca_pem,
        (&sc, &sk),
        (&other.cert_pem, &other.key_pem),
        "localhost",
        vec![stale.der().clone()],
        true,
    )
    .expect_err("an expired CRL is refused when expiry is enforced");
    assert!(
        matches!(
            err,
            rustls::Error::InvalidCertificate(
                rustls::CertificateError::ExpiredRevocationList
                    | rustls::CertificateError::ExpiredRevocationListContext { .. }
            )
        ),
        "{err:?}"
    );
    let fresh = ca
        .refresh_crl(Some(&stale), &CrlOptions::default())
        .expect("fresh CRL");
    handshake_with_crls(
        &ca_pem,
        (&sc, &sk),
        (&other.cert_pem, &other.key_pem),
        "localhost",
        vec![fresh.der().clone()],
        true,
    )
    .expect("a re-signed CRL is accepted");
}
