//! `restpipe-certs`: make the CA, server and client certificates restpipe's mutual TLS needs,
//! and inspect them.

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context as _};
use clap::{Args, Parser, Subcommand, ValueEnum};
use restpipe_certs::{
    describe, write_certificate, write_dev_set, write_private_key, CertInfo, CertificateAuthority,
    DevOutcome, IssueOptions, IssuedCert, KeyAlgorithm, DEFAULT_CA_DAYS, DEFAULT_DIR,
    DEFAULT_LEAF_DAYS, DEV_CLIENT_IDENTITY,
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
        mode 0600; no file is ever overwritten without --force."
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
    /// Print what a certificate file holds: subject, identity, SANs, validity, fingerprint.
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

#[derive(Args, Debug)]
struct ShowArgs {
    /// A PEM certificate file (the first certificate in it is shown).
    file: PathBuf,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
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

fn show(args: ShowArgs) -> anyhow::Result<String> {
    let text = restpipe_certs::read_pem_file(&args.file)?;
    let info = describe(&text).with_context(|| format!("cannot show {}", args.file.display()))?;
    if args.json {
        let mut json = serde_json::to_string_pretty(&info)?;
        json.push('\n');
        return Ok(json);
    }
    let count = restpipe_certs::count_certificates(&text).unwrap_or(1);
    Ok(show_text(&args.file, &info, count))
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
