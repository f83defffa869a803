//! `restpipe-certs`: make the CA, server and client certificates restpipe's mutual TLS needs,
//! and inspect them.

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context as _};
use clap::{Args, Parser, Subcommand, ValueEnum};
use restpipe_certs::{
    describe, write_certificate, write_crl, write_dev_set, write_private_key, CertInfo,
    CertificateAuthority, Crl, CrlInfo, CrlOptions, DevOutcome, IssueOptions, IssuedCert,
    KeyAlgorithm, RevocationReason, RevokeOutcome, Serial, DEFAULT_CA_DAYS, DEFAULT_CRL_DAYS,
    DEFAULT_CRL_FILE, DEFAULT_DIR, DEFAULT_LEAF_DAYS, DEV_CLIENT_IDENTITY,
};

#[derive(Parser, Debug)]
#[command(
    name = "restpipe-certs",
    version,
    about = "Make and inspect the certificates for restpipe's mutual TLS",
    long_about = "Make and inspect the certificates for restpipe's mutual TLS.\n\n\
        Quick start on one machine: `restpipe-certs dev`, then `restpipe server` and \
        `restpipe client`.\n\
        Real deployment: `ca` once (on the operator's machine), `server` for the server node, \
        and `client --name <identity>` for each client node. Private keys are written with \
        mode 0600; no file is ever overwritten without --force.\n\n\
        Revocation: `revoke <cert.pem>` (or `--serial <hex>`) adds a certificate to the CA's \
        revocation list, certs/ca.crl.pem, which nodes read with --crl; `crl` re-signs that \
        list, which must happen before its next update (30 days by default)."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Create a certificate authority: DIR/ca.pem and DIR/ca.key.
    Ca(CaArgs),
    /// Issue a server certificate signed by the CA.
    Server(ServerArgs),
    /// Issue a client certificate signed by the CA; its name is the identity the server
    /// routes by (/client/<name>/...).
    Client(ClientArgs),
    /// Write a complete development set (CA, server for localhost, client "dev-client").
    Dev(DevArgs),
    /// Revoke a certificate: add it to the CA's revocation list (CRL), DIR/ca.crl.pem.
    Revoke(RevokeArgs),
    /// Re-sign the CA's revocation list with a new next update (or create an empty one),
    /// revoking nothing new. Run it before the CRL's next update passes.
    Crl(CrlArgs),
    /// Print what a certificate or CRL file holds: subject, identity, SANs, validity,
    /// fingerprint; for a CRL its issuer, number, updates and revoked serials.
    Show(ShowArgs),
}

#[derive(Args, Debug)]
struct CaArgs {
    /// Directory to write ca.pem and ca.key into (created if missing).
    #[arg(long, default_value = DEFAULT_DIR)]
    dir: PathBuf,
    /// Common name of the CA.
    #[arg(long, default_value = "restpipe CA")]
    name: String,
    /// Days the CA certificate is valid.
    #[arg(long, default_value_t = DEFAULT_CA_DAYS, value_parser = clap::value_parser!(u32).range(1..))]
    days: u32,
    /// Key algorithm (ring cannot generate RSA keys; rsa gives an error).
    #[arg(long, value_enum, default_value_t = AlgorithmArg::EcdsaP256)]
    algorithm: AlgorithmArg,
    /// Replace existing files.
    #[arg(long)]
    force: bool,
}

/// Options shared by `server` and `client`.
#[derive(Args, Debug)]
struct IssueArgs {
    /// Directory holding the CA and receiving the new files (created if missing).
    #[arg(long, default_value = DEFAULT_DIR)]
    dir: PathBuf,
    /// CA certificate [default: DIR/ca.pem].
    #[arg(long, value_name = "FILE")]
    ca: Option<PathBuf>,
    /// CA private key [default: DIR/ca.key].
    #[arg(long, value_name = "FILE")]
    ca_key: Option<PathBuf>,
    /// Where to write the certificate.
    #[arg(long, value_name = "FILE")]
    out_cert: Option<PathBuf>,
    /// Where to write the private key (mode 0600).
    #[arg(long, value_name = "FILE")]
    out_key: Option<PathBuf>,
    /// Days the certificate is valid.
    #[arg(long, default_value_t = DEFAULT_LEAF_DAYS, value_parser = clap::value_parser!(u32).range(1..))]
    days: u32,
    /// Key algorithm (ring cannot generate RSA keys; rsa gives an error).
    #[arg(long, value_enum, default_value_t = AlgorithmArg::EcdsaP256)]
    algorithm: AlgorithmArg,
    /// Replace existing files.
    #[arg(long)]
    force: bool,
}

#[derive(Args, Debug)]
struct ServerArgs {
    /// The server's name: subject CN and first SAN. Clients check it (--server-name,
    /// default the host they dial), so use the name or address they dial.
    #[arg(long)]
    name: String,
    /// Another name or address the server is reached by (repeatable). An IP address becomes
    /// an IP SAN, anything else a DNS SAN.
    #[arg(long = "san", value_name = "NAME_OR_IP")]
    sans: Vec<String>,
    #[command(flatten)]
    issue: IssueArgs,
}

#[derive(Args, Debug)]
struct ClientArgs {
    /// The client's identity (subject CN): 1-64 characters of A-Z a-z 0-9 _ - .
    /// Default output: DIR/<name>.pem and DIR/<name>.key.
    #[arg(long)]
    name: String,
    #[command(flatten)]
    issue: IssueArgs,
}

#[derive(Args, Debug)]
struct DevArgs {
    /// Directory for the six files (created if missing).
    #[arg(long, default_value = DEFAULT_DIR)]
    dir: PathBuf,
    /// Replace an existing set.
    #[arg(long)]
    force: bool,
}

/// Options shared by `revoke` and `crl`.
#[derive(Args, Debug)]
struct CrlArgs {
    /// Directory holding the CA and the CRL.
    #[arg(long, default_value = DEFAULT_DIR)]
    dir: PathBuf,
    /// CA certificate [default: DIR/ca.pem].
    #[arg(long, value_name = "FILE")]
    ca: Option<PathBuf>,
    /// CA private key [default: DIR/ca.key].
    #[arg(long, value_name = "FILE")]
    ca_key: Option<PathBuf>,
    /// The CRL to update in place (created if missing) [default: DIR/ca.crl.pem].
    #[arg(long, value_name = "FILE")]
    out: Option<PathBuf>,
    /// Days until the CRL's next update; nodes may refuse the CRL after that, so re-sign
    /// it (`restpipe-certs crl`) before then.
    #[arg(long, default_value_t = DEFAULT_CRL_DAYS, value_parser = clap::value_parser!(u32).range(1..))]
    days: u32,
}

#[derive(Args, Debug)]
struct RevokeArgs {
    /// The certificate to revoke (PEM); it must have been issued by the CA.
    #[arg(
        value_name = "CERT",
        required_unless_present = "serial",
        conflicts_with = "serial"
    )]
    cert: Option<PathBuf>,
    /// Revoke by serial number instead, in hex as `show` prints it (colons optional).
    #[arg(long, value_name = "HEX")]
    serial: Option<Serial>,
    /// Why the certificate is revoked (recorded in the CRL).
    #[arg(long, value_enum)]
    reason: Option<ReasonArg>,
    #[command(flatten)]
    crl: CrlArgs,
}

#[derive(Args, Debug)]
struct ShowArgs {
    /// A PEM certificate file (the first certificate in it is shown), or a CRL (PEM or DER).
    file: PathBuf,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
    /// For a certificate: also say whether this CRL revokes it.
    #[arg(long, value_name = "FILE")]
    crl: Option<PathBuf>,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum ReasonArg {
    /// The private key was, or may have been, disclosed.
    #[value(name = "keyCompromise", alias = "key-compromise")]
    KeyCompromise,
    /// The CA's key was compromised.
    #[value(name = "cACompromise", alias = "ca-compromise")]
    CaCompromise,
    /// The subject's name or other information changed.
    #[value(name = "affiliationChanged", alias = "affiliation-changed")]
    AffiliationChanged,
    /// The certificate was replaced by a new one.
    #[value(name = "superseded")]
    Superseded,
    /// The node was retired.
    #[value(name = "cessationOfOperation", alias = "cessation-of-operation")]
    CessationOfOperation,
    /// A privilege the certificate granted was withdrawn.
    #[value(name = "privilegeWithdrawn", alias = "privilege-withdrawn")]
    PrivilegeWithdrawn,
    /// No reason recorded (the same as leaving --reason out).
    #[value(name = "unspecified")]
    Unspecified,
}

impl From<ReasonArg> for RevocationReason {
    fn from(r: ReasonArg) -> Self {
        match r {
            ReasonArg::KeyCompromise => RevocationReason::KeyCompromise,
            ReasonArg::CaCompromise => RevocationReason::CaCompromise,
            ReasonArg::AffiliationChanged => RevocationReason::AffiliationChanged,
            ReasonArg::Superseded => RevocationReason::Superseded,
            ReasonArg::CessationOfOperation => RevocationReason::CessationOfOperation,
            ReasonArg::PrivilegeWithdrawn => RevocationReason::PrivilegeWithdrawn,
            ReasonArg::Unspecified => RevocationReason::Unspecified,
        }
    }
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum AlgorithmArg {
    /// ECDSA P-256 (default).
    EcdsaP256,
    /// Ed25519.
    Ed25519,
    /// RSA: not available (ring cannot generate RSA keys).
    Rsa,
}

impl From<AlgorithmArg> for KeyAlgorithm {
    fn from(a: AlgorithmArg) -> Self {
        match a {
            AlgorithmArg::EcdsaP256 => KeyAlgorithm::EcdsaP256,
            AlgorithmArg::Ed25519 => KeyAlgorithm::Ed25519,
            AlgorithmArg::Rsa => KeyAlgorithm::Rsa,
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(report) => {
            // A closed stdout (e.g. `| head`) is not worth a panic or an error.
            let _ = std::io::stdout().lock().write_all(report.as_bytes());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Runs one command and returns what to print on stdout.
fn run(cli: Cli) -> anyhow::Result<String> {
    match cli.command {
        Command::Ca(args) => ca(args),
        Command::Server(args) => server(args),
        Command::Client(args) => client(args),
        Command::Dev(args) => dev(args),
        Command::Revoke(args) => revoke(args),
        Command::Crl(args) => crl(args),
        Command::Show(args) => show(args),
    }
}

fn ca(args: CaArgs) -> anyhow::Result<String> {
    let cert_path = args.dir.join("ca.pem");
    let key_path = args.dir.join("ca.key");
    refuse_existing(&[&cert_path, &key_path], args.force)?;
    let opts = IssueOptions::valid_for_days(args.days).with_algorithm(args.algorithm.into());
    let ca = CertificateAuthority::generate(&args.name, &opts)?;
    write_private_key(&key_path, &ca.key_pem(), args.force)?;
    write_certificate(&cert_path, ca.cert_pem(), args.force)?;

    let mut out = String::new();
    let _ = writeln!(out, "wrote CA certificate {}", cert_path.display());
    let _ = writeln!(
        out,
        "wrote CA private key {} (mode 0600)",
        key_path.display()
    );
    let _ = writeln!(
        out,
        "  {}, {}, valid until {}",
        ca.subject(),
        opts.algorithm,
        date(opts.not_after)
    );
    let _ = writeln!(
        out,
        "copy {} to every node; keep {} with the operator, never on a node",
        cert_path.display(),
        key_path.display()
    );
    let _ = writeln!(
        out,
        "next: restpipe-certs server --name <host> [--san <name or IP>]...\n      \
         restpipe-certs client --name <identity>"
    );
    Ok(out)
}

fn server(args: ServerArgs) -> anyhow::Result<String> {
    let dir = &args.issue.dir;
    let out_cert = args
        .issue
        .out_cert
        .clone()
        .unwrap_or_else(|| dir.join("server.pem"));
    let out_key = args
        .issue
        .out_key
        .clone()
        .unwrap_or_else(|| dir.join("server.key"));
    let (ca, ca_cert) = prepare_issue(&args.issue, &out_cert, &out_key)?;
    let issued = ca.issue_server(&args.name, &args.sans, &issue_options(&args.issue))?;
    let info = write_issued(&issued, &out_cert, &out_key, args.issue.force)?;

    let mut out = written_report(&out_cert, &out_key, &info, &ca);
    let mut names: Vec<String> = info.dns_names.clone();
    names.extend(info.ip_addresses.iter().map(ToString::to_string));
    let _ = writeln!(out, "  valid for: {}", names.join(", "));
    let _ = writeln!(
        out,
        "put {}, {} and {} on the server node; clients must dial one of the names above \
         (or pass it as --server-name)",
        ca_cert.display(),
        out_cert.display(),
        out_key.display()
    );
    Ok(out)
}

fn client(args: ClientArgs) -> anyhow::Result<String> {
    // Check the name before it is used to build file names.
    restpipe_certs::validate_identity(&args.name)?;
    let dir = &args.issue.dir;
    let out_cert = args
        .issue
        .out_cert
        .clone()
        .unwrap_or_else(|| dir.join(format!("{}.pem", args.name)));
    let out_key = args
        .issue
        .out_key
        .clone()
        .unwrap_or_else(|| dir.join(format!("{}.key", args.name)));
    let (ca, ca_cert) = prepare_issue(&args.issue, &out_cert, &out_key)?;
    let issued = ca.issue_client(&args.name, &issue_options(&args.issue))?;
    let info = write_issued(&issued, &out_cert, &out_key, args.issue.force)?;

    let mut out = written_report(&out_cert, &out_key, &info, &ca);
    let _ = writeln!(
        out,
        "put {}, {} and {} on the client node; the server reaches it as /client/{}/...",
        ca_cert.display(),
        out_cert.display(),
        out_key.display(),
        args.name
    );
    Ok(out)
}

/// Checks the output paths, then loads the CA. Returns the CA and its certificate path.
fn prepare_issue(
    args: &IssueArgs,
    out_cert: &Path,
    out_key: &Path,
) -> anyhow::Result<(CertificateAuthority, PathBuf)> {
    let ca_cert = args.ca.clone().unwrap_or_else(|| args.dir.join("ca.pem"));
    let ca_key = args
        .ca_key
        .clone()
        .unwrap_or_else(|| args.dir.join("ca.key"));
    if out_cert == out_key {
        bail!(
            "--out-cert and --out-key are both {}; give them different paths",
            out_cert.display()
        );
    }
    for out in [out_cert, out_key] {
        for ca_file in [&ca_cert, &ca_key] {
            if same_file(out, ca_file) {
                bail!(
                    "refusing to write {}: it is the CA's own file (see --ca and --ca-key); \
                     choose another name or pass --out-cert/--out-key",
                    out.display()
                );
            }
        }
    }
    refuse_existing(&[out_cert, out_key], args.force)?;
    let ca = CertificateAuthority::load(&ca_cert, &ca_key)?;
    Ok((ca, ca_cert))
}

fn issue_options(args: &IssueArgs) -> IssueOptions {
    IssueOptions::valid_for_days(args.days).with_algorithm(args.algorithm.into())
}

/// Writes key then certificate, and describes the certificate for the report.
fn write_issued(
    issued: &IssuedCert,
    out_cert: &Path,
    out_key: &Path,
    force: bool,
) -> anyhow::Result<CertInfo> {
    write_private_key(out_key, &issued.key_pem, force)?;
    write_certificate(out_cert, &issued.cert_pem, force)?;
    Ok(describe(&issued.cert_pem)?)
}

fn written_report(
    out_cert: &Path,
    out_key: &Path,
    info: &CertInfo,
    ca: &CertificateAuthority,
) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "wrote certificate {}", out_cert.display());
    let _ = writeln!(out, "wrote private key {} (mode 0600)", out_key.display());
    let _ = writeln!(
        out,
        "  {}, {}, signed by {}, valid until {}",
        info.subject,
        info.key_type,
        ca.subject(),
        date(info.not_after)
    );
    if let Some(identity) = &info.identity {
        let _ = writeln!(out, "  routes as: {identity}");
    }
    out
}

fn dev(args: DevArgs) -> anyhow::Result<String> {
    let mut out = String::new();
    match write_dev_set(&args.dir, args.force)? {
        DevOutcome::AlreadyPresent(found) => {
            let list: Vec<String> = found.iter().map(|p| p.display().to_string()).collect();
            let _ = writeln!(
                out,
                "a certificate set already exists in {} ({}); it was left untouched",
                args.dir.display(),
                list.join(", ")
            );
            let _ = writeln!(
                out,
                "to replace it with a new set, run: restpipe-certs dev --dir {} --force",
                args.dir.display()
            );
        }
        DevOutcome::Written(paths) => {
            let _ = writeln!(
                out,
                "wrote a development certificate set to {}:",
                paths.dir.display()
            );
            for (path, what) in [
                (&paths.ca_cert, "CA certificate (both nodes trust it)"),
                (
                    &paths.ca_key,
                    "CA private key, mode 0600 (issues more certificates)",
                ),
                (
                    &paths.server_cert,
                    "server certificate (localhost, 127.0.0.1, ::1)",
                ),
                (&paths.server_key, "server private key, mode 0600"),
                (
                    &paths.client_cert,
                    "client certificate (identity dev-client)",
                ),
                (&paths.client_key, "client private key, mode 0600"),
            ] {
                let _ = writeln!(out, "  {:<24} {what}", path.display());
            }
            let _ = writeln!(out, "run the two nodes on this machine:");
            let _ = writeln!(out, "  restpipe server");
            let _ = writeln!(out, "  restpipe client");
            if args.dir != Path::new(DEFAULT_DIR) {
                let _ = writeln!(
                    out,
                    "(they read ./{DEFAULT_DIR} by default: run them where that is {}, or \
                     point their certificate options at it)",
                    args.dir.display()
                );
            }
            let _ = writeln!(
                out,
                "the server reaches the client as \
                 http://127.0.0.1:8081/client/{DEV_CLIENT_IDENTITY}/time"
            );
        }
    }
    Ok(out)
}

/// The CA, the CRL path and the CRL there now (if any) for `revoke` and `crl`.
struct CrlTarget {
    ca: CertificateAuthority,
    ca_cert: PathBuf,
    out: PathBuf,
    previous: Option<Crl>,
}

fn crl_target(args: &CrlArgs) -> anyhow::Result<CrlTarget> {
    let ca_cert = args.ca.clone().unwrap_or_else(|| args.dir.join("ca.pem"));
    let ca_key = args
        .ca_key
        .clone()
        .unwrap_or_else(|| args.dir.join("ca.key"));
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| args.dir.join(DEFAULT_CRL_FILE));
    for ca_file in [&ca_cert, &ca_key] {
        if same_file(&out, ca_file) {
            bail!(
                "refusing to write the CRL to {}: it is the CA's own file (see --ca and \
                 --ca-key); choose another --out",
                out.display()
            );
        }
    }
    let ca = CertificateAuthority::load(&ca_cert, &ca_key)?;
    // The CRL is updated in place, but only a CRL of this CA: anything else at --out is
    // refused here, before it could be replaced.
    let previous = if out.symlink_metadata().is_ok() {
        let crl = Crl::load(&out).with_context(|| {
            format!(
                "refusing to replace {}: it is not a CRL that can be updated",
                out.display()
            )
        })?;
        crl.verify_signed_by(ca.cert_der(), &ca_cert.display().to_string())
            .with_context(|| format!("refusing to update {}", out.display()))?;
        // The CRL is written as PEM; do not turn a DER file into PEM behind its users' back.
        let bytes =
            std::fs::read(&out).with_context(|| format!("cannot read {}", out.display()))?;
        if !bytes.trim_ascii_start().starts_with(b"-----BEGIN") {
            bail!(
                "{} is a DER CRL; restpipe-certs writes CRLs as PEM: convert it with \
                 `openssl crl -inform der -in {} -out ca.crl.pem` and pass --out ca.crl.pem",
                out.display(),
                out.display()
            );
        }
        Some(crl)
    } else {
        None
    };
    Ok(CrlTarget {
        ca,
        ca_cert,
        out,
        previous,
    })
}

fn revoke(args: RevokeArgs) -> anyhow::Result<String> {
    let target = crl_target(&args.crl)?;
    let (serial, subject) = match (&args.cert, args.serial) {
        (Some(path), _) => {
            let text = restpipe_certs::read_pem_file(path)?;
            let info =
                describe(&text).with_context(|| format!("cannot revoke {}", path.display()))?;
            let der = restpipe_certs::first_certificate_der(&text, &path.display().to_string())?;
            let serial = target
                .ca
                .serial_of_issued(&der, &path.display().to_string())?;
            (serial, Some(info.subject))
        }
        (None, Some(serial)) => (serial, None),
        (None, None) => bail!("give the certificate to revoke, or --serial <hex>"),
    };
    let opts = CrlOptions::valid_for_days(args.crl.days);
    let reason = args.reason.map(RevocationReason::from);
    let what = match &subject {
        Some(subject) => format!("serial {serial} ({subject})"),
        None => format!("serial {serial}"),
    };
    let mut out = String::new();
    match target
        .ca
        .revoke(target.previous.as_ref(), serial, reason, &opts)?
    {
        RevokeOutcome::AlreadyRevoked(entry) => {
            let _ = writeln!(
                out,
                "{what} was already revoked on {}{}; {} left unchanged",
                date(entry.revoked_at),
                reason_note(entry.reason),
                target.out.display()
            );
            let _ = writeln!(
                out,
                "(to push its next update out, run: restpipe-certs crl{})",
                crl_flags(&args.crl)
            );
        }
        RevokeOutcome::Revoked { crl, entry } => {
            write_crl(&target.out, &crl)?;
            let _ = writeln!(out, "revoked {what}{}", reason_note(entry.reason));
            crl_report(&mut out, &target, &crl, &args.crl);
        }
    }
    Ok(out)
}

fn crl(args: CrlArgs) -> anyhow::Result<String> {
    let target = crl_target(&args)?;
    let opts = CrlOptions::valid_for_days(args.days);
    let crl = target.ca.refresh_crl(target.previous.as_ref(), &opts)?;
    write_crl(&target.out, &crl)?;
    let mut out = String::new();
    if target.previous.is_none() {
        let _ = writeln!(out, "created an empty revocation list");
    } else {
        let _ = writeln!(out, "re-signed the revocation list");
    }
    crl_report(&mut out, &target, &crl, &args);
    Ok(out)
}

fn reason_note(reason: Option<RevocationReason>) -> String {
    match reason {
        Some(r) if r != RevocationReason::Unspecified => format!(", reason {r}"),
        _ => String::new(),
    }
}

/// The options to repeat in a suggested `restpipe-certs crl` command.
fn crl_flags(args: &CrlArgs) -> String {
    let mut flags = String::new();
    if args.dir != Path::new(DEFAULT_DIR) {
        let _ = write!(flags, " --dir {}", args.dir.display());
    }
    for (flag, value) in [
        ("--ca", &args.ca),
        ("--ca-key", &args.ca_key),
        ("--out", &args.out),
    ] {
        if let Some(v) = value {
            let _ = write!(flags, " {flag} {}", v.display());
        }
    }
    flags
}

fn crl_report(out: &mut String, target: &CrlTarget, crl: &Crl, args: &CrlArgs) {
    let info = crl.info();
    let next = info
        .next_update
        .map(date)
        .unwrap_or_else(|| "(none)".into());
    let _ = writeln!(out, "wrote CRL {}", target.out.display());
    let _ = writeln!(
        out,
        "  signed by {}, CRL number {}, {} revoked, next update {next}",
        target.ca.subject(),
        info.crl_number.as_deref().unwrap_or("(none)"),
        info.revoked.len()
    );
    let _ = writeln!(
        out,
        "copy {} to the nodes that check peers (they read it with --crl and re-read it on \
         SIGHUP); re-sign it before {next} with: restpipe-certs crl{}",
        target.out.display(),
        crl_flags(args)
    );
    let _ = writeln!(
        out,
        "check it: openssl crl -in {} -CAfile {} -noout",
        target.out.display(),
        target.ca_cert.display()
    );
}

fn show(args: ShowArgs) -> anyhow::Result<String> {
    let text = match restpipe_certs::read_pem_file(&args.file) {
        Ok(text) => text,
        // A binary file may be a DER CRL; if it is not, report the original error.
        Err(e @ restpipe_certs::Error::InvalidPem { .. }) => match Crl::load(&args.file) {
            Ok(crl) => return show_crl(&args, &crl),
            Err(_) => return Err(e.into()),
        },
        Err(e) => return Err(e.into()),
    };
    if text.contains("-----BEGIN X509 CRL-----") && !text.contains("-----BEGIN CERTIFICATE-----") {
        let crl = Crl::from_pem(text.as_bytes(), &args.file.display().to_string())?;
        return show_crl(&args, &crl);
    }
    let info = describe(&text).with_context(|| format!("cannot show {}", args.file.display()))?;
    let revocation = match &args.crl {
        Some(path) => {
            let der =
                restpipe_certs::first_certificate_der(&text, &args.file.display().to_string())?;
            let serial = Serial::of_certificate(&der, &args.file.display().to_string())?;
            let crl = Crl::load(path)?;
            Some(revocation_status(&info, &serial, path, &crl))
        }
        None => None,
    };
    if args.json {
        let mut value = serde_json::to_value(&info)?;
        if let (Some(status), Some(map)) = (&revocation, value.as_object_mut()) {
            map.insert("revocation".into(), status.json());
        }
        let mut json = serde_json::to_string_pretty(&value)?;
        json.push('\n');
        return Ok(json);
    }
    let count = restpipe_certs::count_certificates(&text).unwrap_or(1);
    let mut out = show_text(&args.file, &info, count);
    if let Some(status) = revocation {
        let _ = writeln!(out, "{:<14}{}", "revocation:", status.text());
    }
    Ok(out)
}

/// Whether a CRL revokes a certificate, for `show --crl`.
enum Revocation {
    /// The CRL's issuer is not the certificate's issuer: it says nothing about it.
    NotCovered { crl: PathBuf, crl_issuer: String },
    /// Listed.
    Revoked {
        crl: PathBuf,
        entry: restpipe_certs::RevokedCert,
    },
    /// Not listed.
    Good {
        crl: PathBuf,
        number: Option<String>,
        expired: bool,
    },
}

fn revocation_status(info: &CertInfo, serial: &Serial, path: &Path, crl: &Crl) -> Revocation {
    let crl_path = path.to_owned();
    if crl.info().issuer != info.issuer {
        return Revocation::NotCovered {
            crl: crl_path,
            crl_issuer: crl.info().issuer.clone(),
        };
    }
    match crl.find(serial) {
        Some(entry) => Revocation::Revoked {
            crl: crl_path,
            entry: entry.clone(),
        },
        None => Revocation::Good {
            crl: crl_path,
            number: crl.info().crl_number.clone(),
            expired: crl.info().expired,
        },
    }
}

impl Revocation {
    fn text(&self) -> String {
        match self {
            Self::NotCovered { crl, crl_issuer } => format!(
                "unknown: {} is issued by {crl_issuer}, not by this certificate's issuer",
                crl.display()
            ),
            Self::Revoked { crl, entry } => format!(
                "REVOKED on {}{} (listed in {})",
                date(entry.revoked_at),
                reason_note(entry.reason),
                crl.display()
            ),
            Self::Good {
                crl,
                number,
                expired,
            } => format!(
                "not revoked (per {}, CRL number {}{})",
                crl.display(),
                number.as_deref().unwrap_or("(none)"),
                if *expired {
                    "; that CRL is EXPIRED, re-sign it"
                } else {
                    ""
                }
            ),
        }
    }

    fn json(&self) -> serde_json::Value {
        match self {
            Self::NotCovered { crl, crl_issuer } => serde_json::json!({
                "crl": crl.display().to_string(),
                "status": "unknown",
                "crl_issuer": crl_issuer,
            }),
            Self::Revoked { crl, entry } => serde_json::json!({
                "crl": crl.display().to_string(),
                "status": "revoked",
                "revoked_at": date(entry.revoked_at),
                "reason": entry.reason.map(|r| r.as_str()),
            }),
            Self::Good {
                crl,
                number,
                expired,
            } => serde_json::json!({
                "crl": crl.display().to_string(),
                "status": "good",
                "crl_number": number,
                "crl_expired": expired,
            }),
        }
    }
}

fn show_crl(args: &ShowArgs, crl: &Crl) -> anyhow::Result<String> {
    if args.crl.is_some() {
        bail!(
            "{} is a CRL; --crl goes with a certificate (restpipe-certs show CERT --crl CRL)",
            args.file.display()
        );
    }
    let info = crl.info();
    if args.json {
        let mut json = serde_json::to_string_pretty(info)?;
        json.push('\n');
        return Ok(json);
    }
    Ok(show_crl_text(&args.file, info))
}

fn show_crl_text(file: &Path, info: &CrlInfo) -> String {
    let mut out = String::new();
    let mut line = |label: &str, value: String| {
        let _ = writeln!(out, "{label:<14}{value}");
    };
    line("file:", file.display().to_string());
    line("kind:", "certificate revocation list (CRL)".into());
    line("issuer:", info.issuer.clone());
    line(
        "CRL number:",
        info.crl_number.clone().unwrap_or_else(|| "(none)".into()),
    );
    line("this update:", date(info.this_update));
    let next = match info.next_update {
        Some(t) if info.expired => format!("{}  EXPIRED (re-sign it: restpipe-certs crl)", date(t)),
        Some(t) => date(t),
        None => "(none)".into(),
    };
    line("next update:", next);
    line("SHA-256:", info.sha256_fingerprint.clone());
    line("revoked:", info.revoked.len().to_string());
    for entry in &info.revoked {
        let _ = writeln!(
            out,
            "  {}  revoked {}{}",
            entry.serial,
            date(entry.revoked_at),
            reason_note(entry.reason)
        );
    }
    out
}

fn show_text(file: &Path, info: &CertInfo, count: usize) -> String {
    let none = || "(none)".to_owned();
    let list = |items: Vec<String>| {
        if items.is_empty() {
            none()
        } else {
            items.join(", ")
        }
    };
    let mut out = String::new();
    let mut line = |label: &str, value: String| {
        let _ = writeln!(out, "{label:<14}{value}");
    };
    line("file:", file.display().to_string());
    line("subject:", info.subject.clone());
    line("issuer:", info.issuer.clone());
    line(
        "routes as:",
        info.identity
            .clone()
            .unwrap_or_else(|| "(no CN or DNS name)".into()),
    );
    line("DNS names:", list(info.dns_names.clone()));
    line(
        "IP addresses:",
        list(info.ip_addresses.iter().map(ToString::to_string).collect()),
    );
    line("not before:", date(info.not_before));
    let status = if info.expired {
        "  EXPIRED"
    } else if info.not_yet_valid {
        "  NOT YET VALID"
    } else {
        ""
    };
    line("not after:", format!("{}{status}", date(info.not_after)));
    line("key type:", info.key_type.clone());
    line("CA:", if info.is_ca { "yes" } else { "no" }.to_owned());
    line("usage:", list(info.extended_key_usage.clone()));
    line("serial:", info.serial.clone());
    line("SHA-256:", info.sha256_fingerprint.clone());
    if count > 1 {
        let _ = writeln!(
            out,
            "({} more certificate(s) in this file not shown)",
            count - 1
        );
    }
    out
}

fn date(t: time::OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| t.to_string())
}

/// Refuses, before anything is generated, when an output file exists and --force is not
/// given (the writes themselves refuse too; this keeps a half-written pair from happening).
fn refuse_existing(paths: &[&Path], force: bool) -> anyhow::Result<()> {
    if force {
        return Ok(());
    }
    if let Some(p) = paths.iter().find(|p| p.symlink_metadata().is_ok()) {
        return Err(restpipe_certs::Error::FileExists {
            path: p.to_path_buf(),
        }
        .into());
    }
    Ok(())
}

/// True when `a` and `b` name the same file (lexically, or after resolving both).
fn same_file(a: &Path, b: &Path) -> bool {
    if a == b {
        return true;
    }
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}
