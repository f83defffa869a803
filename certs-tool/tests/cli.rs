//! The `restpipe-certs` binary, run as a user would.

use std::path::Path;
use std::process::{Command, Output};

use restpipe_certs::{CertificateAuthority, IssueOptions, KeyAlgorithm};

fn run(args: &[&str], dir: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_restpipe-certs"))
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run restpipe-certs")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The value of a `label: value` line of `show`'s text output.
fn field(out: &str, label: &str) -> String {
    out.lines()
        .find_map(|l| l.strip_prefix(label))
        .map(|v| v.trim().to_owned())
        .unwrap_or_else(|| panic!("no {label:?} line in:\n{out}"))
}

fn assert_ok(o: &Output) {
    assert!(
        o.status.success(),
        "expected success, got {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status.code(),
        stdout(o),
        stderr(o)
    );
}

/// Exit code 1 and one `error: ...` line on stderr.
fn assert_error(o: &Output) -> String {
    assert_eq!(
        o.status.code(),
        Some(1),
        "stdout:\n{}\nstderr:\n{}",
        stdout(o),
        stderr(o)
    );
    let err = stderr(o);
    assert!(err.starts_with("error: "), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "one line: {err}");
    assert!(!err.contains("panicked"), "{err}");
    err
}

const DEV_FILES: [&str; 6] = [
    "ca.pem",
    "ca.key",
    "server.pem",
    "server.key",
    "client.pem",
    "client.key",
];

fn read_all(dir: &Path) -> Vec<Vec<u8>> {
    DEV_FILES
        .iter()
        .map(|f| std::fs::read(dir.join(f)).expect("read"))
        .collect()
}

#[cfg(unix)]
fn mode(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path)
        .expect("metadata")
        .permissions()
        .mode()
        & 0o777
}

#[test]
fn dev_writes_once_then_leaves_the_set_untouched_and_force_replaces_it() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let first = run(&["dev"], tmp.path());
    assert_ok(&first);
    let out = stdout(&first);
    assert!(
        out.contains("restpipe server") && out.contains("restpipe client"),
        "{out}"
    );
    let certs = tmp.path().join("certs");
    let before = read_all(&certs);
    #[cfg(unix)]
    for key in ["ca.key", "server.key", "client.key"] {
        assert_eq!(mode(&certs.join(key)), 0o600, "{key}");
    }

    let second = run(&["dev"], tmp.path());
    assert_ok(&second);
    let out = stdout(&second);
    assert!(out.contains("left untouched"), "{out}");
    assert!(out.contains("--force"), "{out}");
    assert_eq!(
        read_all(&certs),
        before,
        "second run must not change a byte"
    );

    let forced = run(&["dev", "--force"], tmp.path());
    assert_ok(&forced);
    let after = read_all(&certs);
    for (i, name) in DEV_FILES.iter().enumerate() {
        assert_ne!(after[i], before[i], "{name} was not replaced");
    }
    #[cfg(unix)]
    for key in ["ca.key", "server.key", "client.key"] {
        assert_eq!(mode(&certs.join(key)), 0o600, "{key} after --force");
    }
}

#[test]
fn dev_with_one_file_present_writes_nothing() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("set");
    std::fs::create_dir(&dir).expect("mkdir");
    std::fs::write(dir.join("client.key"), "mine").expect("write");
    let o = run(&["dev", "--dir", "set"], tmp.path());
    assert_ok(&o);
    assert!(stdout(&o).contains("left untouched"), "{}", stdout(&o));
    assert!(!dir.join("ca.pem").exists());
    assert_eq!(
        std::fs::read_to_string(dir.join("client.key")).expect("read"),
        "mine"
    );
}

#[test]
fn ca_refuses_to_overwrite_without_force() {
    let tmp = tempfile::tempdir().expect("tempdir");
    assert_ok(&run(&["ca", "--name", "Test CA"], tmp.path()));
    let ca_pem = tmp.path().join("certs/ca.pem");
    let before = std::fs::read(&ca_pem).expect("read");
    #[cfg(unix)]
    assert_eq!(mode(&tmp.path().join("certs/ca.key")), 0o600);

    let err = assert_error(&run(&["ca"], tmp.path()));
    assert!(
        err.contains("already exists") && err.contains("--force"),
        "{err}"
    );
    assert_eq!(std::fs::read(&ca_pem).expect("read"), before);

    assert_ok(&run(&["ca", "--force"], tmp.path()));
    assert_ne!(std::fs::read(&ca_pem).expect("read"), before);
}

#[test]
fn server_without_a_ca_says_to_create_one() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let err = assert_error(&run(&["server", "--name", "rp.example"], tmp.path()));
    assert!(err.contains("ca.pem"), "{err}");
    assert!(err.contains("restpipe-certs ca"), "{err}");
    assert!(!tmp.path().join("certs/server.pem").exists());
    assert!(!tmp.path().join("certs/server.key").exists());
}

#[test]
fn server_and_client_from_a_ca_and_show_reports_identity_and_sans() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let d = tmp.path();
    assert_ok(&run(&["ca", "--algorithm", "ed25519"], d));
    let o = run(
        &[
            "server",
            "--name",
            "rp.example",
            "--san",
            "10.0.0.5",
            "--san",
            "rp.internal",
        ],
        d,
    );
    assert_ok(&o);
    let o = run(&["client", "--name", "fileserver-1"], d);
    assert_ok(&o);
    assert!(
        stdout(&o).contains("/client/fileserver-1/"),
        "{}",
        stdout(&o)
    );
    #[cfg(unix)]
    assert_eq!(mode(&d.join("certs/fileserver-1.key")), 0o600);
    assert_ok(&run(&["client", "--name", "fileserver-2"], d));

    let o = run(&["show", "certs/server.pem"], d);
    assert_ok(&o);
    let out = stdout(&o);
    assert_eq!(field(&out, "routes as:"), "rp.example");
    assert_eq!(field(&out, "DNS names:"), "rp.example, rp.internal");
    assert_eq!(field(&out, "IP addresses:"), "10.0.0.5");
    assert_eq!(field(&out, "SHA-256:").len(), 32 * 3 - 1);
    assert!(!out.contains("EXPIRED"), "{out}");

    let o = run(&["show", "--json", "certs/fileserver-1.pem"], d);
    assert_ok(&o);
    let json: serde_json::Value = serde_json::from_str(&stdout(&o)).expect("json");
    assert_eq!(json["identity"], "fileserver-1");
    assert_eq!(json["subject"], "CN=fileserver-1");
    assert_eq!(json["dns_names"][0], "fileserver-1");
    assert_eq!(json["expired"], false);
    assert_eq!(json["is_ca"], false);
    // The leaf key is the default ECDSA P-256, whatever the CA's key is.
    assert_eq!(json["key_type"], "ECDSA P-256");
    assert_eq!(json["extended_key_usage"][0], "clientAuth");

    let o = run(&["show", "--json", "certs/ca.pem"], d);
    let json: serde_json::Value = serde_json::from_str(&stdout(&o)).expect("json");
    assert_eq!(json["key_type"], "Ed25519");
    assert_eq!(json["is_ca"], true);

    let o = run(&["show", "--json", "certs/server.pem"], d);
    let json: serde_json::Value = serde_json::from_str(&stdout(&o)).expect("json");
    assert_eq!(json["ip_addresses"][0], "10.0.0.5");
    assert_eq!(json["identity"], "rp.example");

    // Issuing the same client again is refused; --force replaces.
    let err = assert_error(&run(&["client", "--name", "fileserver-1"], d));
    assert!(err.contains("--force"), "{err}");
    assert_ok(&run(&["client", "--name", "fileserver-1", "--force"], d));
}

#[test]
fn show_flags_an_expired_certificate() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let now = time::OffsetDateTime::now_utc();
    let past = IssueOptions {
        algorithm: KeyAlgorithm::EcdsaP256,
        not_before: now - time::Duration::days(400),
        not_after: now - time::Duration::days(2),
    };
    let ca = CertificateAuthority::generate("CA", &IssueOptions::ca_default()).expect("ca");
    let old = ca.issue_client("old-node", &past).expect("client");
    let path = tmp.path().join("old.pem");
    std::fs::write(&path, &old.cert_pem).expect("write");

    let o = run(&["show", "old.pem"], tmp.path());
    assert_ok(&o);
    let out = stdout(&o);
    assert!(field(&out, "not after:").ends_with("EXPIRED"), "{out}");
    assert_eq!(field(&out, "routes as:"), "old-node");
    let o = run(&["show", "--json", "old.pem"], tmp.path());
    let json: serde_json::Value = serde_json::from_str(&stdout(&o)).expect("json");
    assert_eq!(json["expired"], true);
}

#[test]
fn bad_input_gives_one_line_errors() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let d = tmp.path();
    assert_ok(&run(&["ca"], d));

    let err = assert_error(&run(&["client", "--name", "../etc"], d));
    assert!(err.contains("invalid client identity"), "{err}");
    let err = assert_error(&run(&["client", "--name", "ca"], d));
    assert!(err.contains("CA's own file"), "{err}");
    let err = assert_error(&run(&["server", "--name", "bad_name"], d));
    assert!(err.contains("invalid DNS name"), "{err}");
    let err = assert_error(&run(&["ca", "--dir", "other", "--algorithm", "rsa"], d));
    assert!(err.contains("RSA"), "{err}");
    assert!(
        !d.join("other/ca.key").exists(),
        "nothing written for a refused RSA CA"
    );

    let err = assert_error(&run(&["show", "certs/ca.key"], d));
    assert!(
        err.contains("no certificate") && err.contains("private key"),
        "{err}"
    );
    let err = assert_error(&run(&["show", "missing.pem"], d));
    assert!(err.contains("missing.pem"), "{err}");

    // A CA key that belongs to another CA is refused.
    assert_ok(&run(&["ca", "--dir", "two"], d));
    let err = assert_error(&run(
        &["server", "--name", "x.example", "--ca-key", "two/ca.key"],
        d,
    ));
    assert!(err.contains("does not match"), "{err}");

    // Usage errors are clap's: exit code 2.
    let o = run(&["server"], d);
    assert_eq!(o.status.code(), Some(2));
    let o = run(&["ca", "--days", "0"], d);
    assert_eq!(o.status.code(), Some(2));
}

/// The `serial:` of `show --json` for a certificate file.
fn serial_of(dir: &Path, file: &str) -> String {
    let o = run(&["show", "--json", file], dir);
    assert_ok(&o);
    let json: serde_json::Value = serde_json::from_str(&stdout(&o)).expect("json");
    json["serial"].as_str().expect("serial").to_owned()
}

/// `show --json` of a CRL file.
fn crl_json(dir: &Path, file: &str) -> serde_json::Value {
    let o = run(&["show", "--json", file], dir);
    assert_ok(&o);
    serde_json::from_str(&stdout(&o)).expect("json")
}

#[test]
fn revoke_writes_the_crl_show_reads_it_and_crl_re_signs_it() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let d = tmp.path();
    assert_ok(&run(&["dev"], d));
    let client_serial = serial_of(d, "certs/client.pem");
    let server_serial = serial_of(d, "certs/server.pem");

    let o = run(
        &["revoke", "certs/client.pem", "--reason", "keyCompromise"],
        d,
    );
    assert_ok(&o);
    let out = stdout(&o);
    assert!(
        out.contains(&format!("revoked serial {client_serial} (CN=dev-client)")),
        "{out}"
    );
    assert!(out.contains("reason keyCompromise"), "{out}");
    assert!(out.contains("restpipe-certs crl"), "{out}");
    let crl_path = d.join("certs/ca.crl.pem");
    let first = std::fs::read(&crl_path).expect("CRL written");
    assert!(first.starts_with(b"-----BEGIN X509 CRL-----"));
    #[cfg(unix)]
    assert_eq!(mode(&crl_path), 0o644);

    let o = run(&["show", "certs/ca.crl.pem"], d);
    assert_ok(&o);
    let out = stdout(&o);
    assert_eq!(field(&out, "issuer:"), "CN=restpipe dev CA");
    assert_eq!(field(&out, "CRL number:"), "1");
    assert_eq!(field(&out, "revoked:"), "1");
    assert!(!field(&out, "next update:").contains("EXPIRED"), "{out}");
    let entry = field(&out, "  ");
    assert!(
        entry.starts_with(&client_serial) && entry.ends_with("reason keyCompromise"),
        "{out}"
    );
    let json = crl_json(d, "certs/ca.crl.pem");
    assert_eq!(json["crl_number"], "1");
    assert_eq!(json["expired"], false);
    assert_eq!(json["revoked"][0]["serial"], client_serial.as_str());
    assert_eq!(json["revoked"][0]["reason"], "keyCompromise");

    // Revoking again is a no-op, said so.
    let o = run(&["revoke", "certs/client.pem"], d);
    assert_ok(&o);
    let out = stdout(&o);
    assert!(out.contains("already revoked"), "{out}");
    assert!(out.contains("reason keyCompromise"), "{out}");
    assert_eq!(std::fs::read(&crl_path).expect("read"), first, "unchanged");

    // show --crl on certificates.
    let o = run(
        &["show", "certs/client.pem", "--crl", "certs/ca.crl.pem"],
        d,
    );
    assert_ok(&o);
    let status = field(&stdout(&o), "revocation:");
    assert!(status.starts_with("REVOKED on "), "{status}");
    let o = run(
        &["show", "certs/server.pem", "--crl", "certs/ca.crl.pem"],
        d,
    );
    assert_ok(&o);
    let status = field(&stdout(&o), "revocation:");
    assert!(status.starts_with("not revoked"), "{status}");
    let o = run(
        &[
            "show",
            "--json",
            "certs/client.pem",
            "--crl",
            "certs/ca.crl.pem",
        ],
        d,
    );
    assert_ok(&o);
    let json: serde_json::Value = serde_json::from_str(&stdout(&o)).expect("json");
    assert_eq!(json["revocation"]["status"], "revoked");
    assert_eq!(json["revocation"]["reason"], "keyCompromise");

    // `crl` re-signs: same serials, next number.
    let o = run(&["crl"], d);
    assert_ok(&o);
    assert!(stdout(&o).contains("re-signed"), "{}", stdout(&o));
    let json = crl_json(d, "certs/ca.crl.pem");
    assert_eq!(json["crl_number"], "2");
    assert_eq!(json["revoked"].as_array().expect("list").len(), 1);

    // By serial, without colons, with a shorter next update.
    let plain: String = server_serial.chars().filter(|c| *c != ':').collect();
    let o = run(&["revoke", "--serial", &plain, "--days", "7"], d);
    assert_ok(&o);
    assert!(
        stdout(&o).contains(&format!("revoked serial {server_serial}")),
        "{}",
        stdout(&o)
    );
    let json = crl_json(d, "certs/ca.crl.pem");
    assert_eq!(json["crl_number"], "3");
    let serials: Vec<&str> = json["revoked"]
        .as_array()
        .expect("list")
        .iter()
        .map(|r| r["serial"].as_str().expect("serial"))
        .collect();
    assert_eq!(serials, [client_serial.as_str(), server_serial.as_str()]);
    let info = restpipe_certs::Crl::load(&crl_path)
        .expect("load")
        .info()
        .clone();
    let next = info.next_update.expect("next update");
    assert_eq!((next - info.this_update).whole_days(), 7);

    // Nothing but the six files and the CRL: no temporary file left behind.
    let names: Vec<String> = std::fs::read_dir(d.join("certs"))
        .expect("read dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names.len(), 7, "{names:?}");
}

#[test]
fn crl_creates_an_empty_list() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let d = tmp.path();
    assert_ok(&run(&["ca"], d));
    let o = run(&["crl", "--out", "lists/empty.crl.pem", "--days", "2"], d);
    assert_ok(&o);
    assert!(stdout(&o).contains("created an empty"), "{}", stdout(&o));
    let json = crl_json(d, "lists/empty.crl.pem");
    assert_eq!(json["crl_number"], "1");
    assert_eq!(json["revoked"].as_array().expect("list").len(), 0);
    assert_eq!(json["issuer"], "CN=restpipe CA");
}

#[test]
fn revoke_refuses_what_it_must_not_touch() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let d = tmp.path();

    let err = assert_error(&run(&["revoke", "--serial", "4a3b"], d));
    assert!(err.contains("restpipe-certs ca"), "{err}");

    assert_ok(&run(&["dev"], d));
    assert_ok(&run(&["ca", "--dir", "two"], d));
    assert_ok(&run(&["client", "--dir", "two", "--name", "stranger"], d));
    let crl_path = d.join("certs/ca.crl.pem");

    // A certificate of another CA.
    let err = assert_error(&run(&["revoke", "two/stranger.pem"], d));
    assert!(
        err.contains("two/stranger.pem") && err.contains("was not issued by the CA"),
        "{err}"
    );
    assert!(!crl_path.exists(), "nothing written");
    // The CA itself.
    let err = assert_error(&run(&["revoke", "certs/ca.pem"], d));
    assert!(err.contains("CA certificate itself"), "{err}");
    // Not a certificate.
    let err = assert_error(&run(&["revoke", "certs/client.key"], d));
    assert!(err.contains("no certificate"), "{err}");
    assert!(!crl_path.exists(), "nothing written");

    // --out must not be the CA's file, nor any file that is not a CRL of this CA.
    let err = assert_error(&run(
        &["revoke", "certs/client.pem", "--out", "certs/ca.pem"],
        d,
    ));
    assert!(err.contains("CA's own file"), "{err}");
    let server_before = std::fs::read(d.join("certs/server.pem")).expect("read");
    let err = assert_error(&run(
        &["revoke", "certs/client.pem", "--out", "certs/server.pem"],
        d,
    ));
    assert!(
        err.contains("refusing to replace") && err.contains("no CRL"),
        "{err}"
    );
    assert_eq!(
        std::fs::read(d.join("certs/server.pem")).expect("read"),
        server_before
    );
    assert_ok(&run(&["crl", "--dir", "two"], d));
    let other_before = std::fs::read(d.join("two/ca.crl.pem")).expect("read");
    let err = assert_error(&run(
        &["revoke", "certs/client.pem", "--out", "two/ca.crl.pem"],
        d,
    ));
    assert!(err.contains("not signed by the CA"), "{err}");
    assert_eq!(
        std::fs::read(d.join("two/ca.crl.pem")).expect("read"),
        other_before
    );

    // A DER CRL is read by `show`, but not turned into PEM by an update.
    let crl_der = restpipe_certs::Crl::load(&d.join("two/ca.crl.pem"))
        .expect("load")
        .der()
        .to_vec();
    std::fs::write(d.join("two/ca.crl.der"), &crl_der).expect("write");
    let o = run(&["show", "two/ca.crl.der"], d);
    assert_ok(&o);
    assert_eq!(field(&stdout(&o), "CRL number:"), "1");
    let err = assert_error(&run(&["crl", "--dir", "two", "--out", "two/ca.crl.der"], d));
    assert!(err.contains("DER CRL"), "{err}");
    assert_eq!(
        std::fs::read(d.join("two/ca.crl.der")).expect("read"),
        crl_der
    );

    // show --crl with a CRL of another CA cannot tell.
    let o = run(&["show", "certs/client.pem", "--crl", "two/ca.crl.pem"], d);
    assert_ok(&o);
    assert!(
        field(&stdout(&o), "revocation:").starts_with("unknown"),
        "{}",
        stdout(&o)
    );

    // Usage errors are clap's: exit code 2.
    for args in [
        &["revoke"][..],
        &["revoke", "--serial", "zz"],
        &["revoke", "--serial", "4a", "certs/client.pem"],
        &["revoke", "certs/client.pem", "--reason", "stolen"],
        &["crl", "--days", "0"],
    ] {
        let o = run(args, d);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", stderr(&o));
    }
}
