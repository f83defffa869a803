//! Writing certificates and keys to disk, and the development set.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use crate::{CertificateAuthority, Crl, Error, IssueOptions, Result};

/// The directory where `restpipe server` and `restpipe client` look for their certificates
/// by default, and where `restpipe-certs` writes them.
pub const DEFAULT_DIR: &str = "certs";

/// The identity of the client certificate in the development set.
pub const DEV_CLIENT_IDENTITY: &str = "dev-client";

/// The common name of the CA in the development set.
pub const DEV_CA_NAME: &str = "restpipe dev CA";

/// The server name of the development set; `127.0.0.1` and `::1` are added as IP SANs.
pub const DEV_SERVER_NAME: &str = "localhost";

const KEY_MODE: u32 = 0o600;
const CERT_MODE: u32 = 0o644;

/// Writes a private key with mode 0600 (set when the file is created, never widened).
///
/// Without `force` the file must not exist ([`Error::FileExists`]); with `force` an existing
/// file is replaced atomically by a new one that has mode 0600. Missing parent directories
/// are created.
pub fn write_private_key(path: &Path, pem: &str, force: bool) -> Result<()> {
    write_file(path, pem.as_bytes(), KEY_MODE, force)
}

/// Writes a certificate with mode 0644; same overwrite rule as [`write_private_key`].
pub fn write_certificate(path: &Path, pem: &str, force: bool) -> Result<()> {
    write_file(path, pem.as_bytes(), CERT_MODE, force)
}

/// Writes a CRL as PEM with mode 0644, replacing the file if it exists: a CRL is updated
/// in place by design. The new CRL is written to a temporary file next to `path` and
/// renamed over it, so a node reading `path` sees the old list or the new one, never half
/// of one. Missing parent directories are created.
///
/// This does not check what `path` held; [`CertificateAuthority::revoke`] and
/// [`refresh_crl`](CertificateAuthority::refresh_crl) callers load the previous CRL from
/// `path` first (which fails for a file that is not a CRL of this CA).
pub fn write_crl(path: &Path, crl: &Crl) -> Result<()> {
    write_file(path, crl.pem().as_bytes(), CERT_MODE, true)
}

fn io_err(action: &'static str, path: &Path) -> impl FnOnce(io::Error) -> Error {
    let path = path.to_owned();
    move |source| Error::Io {
        action,
        path,
        source,
    }
}

fn write_file(path: &Path, contents: &[u8], mode: u32, force: bool) -> Result<()> {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        if !parent.is_dir() {
            fs::create_dir_all(parent).map_err(io_err("create directory", parent))?;
        }
    }
    if !force {
        let file = create_new(path, mode).map_err(|source| {
            if source.kind() == io::ErrorKind::AlreadyExists {
                Error::FileExists {
                    path: path.to_owned(),
                }
            } else {
                io_err("create", path)(source)
            }
        })?;
        return fill(file, contents).map_err(|source| {
            let _ = fs::remove_file(path);
            io_err("write", path)(source)
        });
    }
    // Replace: write a fresh file next to the target, then rename it over the target, so
    // the result has `mode` whatever the old file had, and is never half written.
    let tmp = temp_sibling(path);
    let file = create_new(&tmp, mode).map_err(io_err("create", &tmp))?;
    let result = fill(file, contents)
        .map_err(io_err("write", &tmp))
        .and_then(|()| fs::rename(&tmp, path).map_err(io_err("replace", path)));
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

fn create_new(path: &Path, mode: u32) -> io::Result<File> {
    let mut options = OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(mode);
    }
    #[cfg(not(unix))]
    let _ = mode;
    options.open(path)
}

fn fill(mut file: File, contents: &[u8]) -> io::Result<()> {
    file.write_all(contents)?;
    file.sync_all()
}

fn temp_sibling(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.{}.tmp", std::process::id()))
}

/// The six files of a development set in one directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DevPaths {
    /// The directory.
    pub dir: PathBuf,
    /// `ca.pem`: the CA certificate, on both nodes.
    pub ca_cert: PathBuf,
    /// `ca.key`: the CA private key, for issuing more certificates.
    pub ca_key: PathBuf,
    /// `server.pem`: the server certificate.
    pub server_cert: PathBuf,
    /// `server.key`: the server private key.
    pub server_key: PathBuf,
    /// `client.pem`: the client certificate (identity [`DEV_CLIENT_IDENTITY`]).
    pub client_cert: PathBuf,
    /// `client.key`: the client private key.
    pub client_key: PathBuf,
}

impl DevPaths {
    /// `ca.pem`, `ca.key`, `server.pem`, `server.key`, `client.pem` and `client.key` in `dir`.
    pub fn in_dir(dir: &Path) -> Self {
        Self {
            dir: dir.to_owned(),
            ca_cert: dir.join("ca.pem"),
            ca_key: dir.join("ca.key"),
            server_cert: dir.join("server.pem"),
            server_key: dir.join("server.key"),
            client_cert: dir.join("client.pem"),
            client_key: dir.join("client.key"),
        }
    }

    /// The six files, in the order above.
    pub fn files(&self) -> [&Path; 6] {
        [
            &self.ca_cert,
            &self.ca_key,
            &self.server_cert,
            &self.server_key,
            &self.client_cert,
            &self.client_key,
        ]
    }
}

/// What [`write_dev_set`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DevOutcome {
    /// A new set was written to these paths.
    Written(DevPaths),
    /// Some of the files existed and `force` was not given: nothing was written. These are
    /// the files that exist.
    AlreadyPresent(Vec<PathBuf>),
}

/// Writes a complete development set into `dir`: a CA ([`DEV_CA_NAME`]), a server
/// certificate (CN `localhost`; SANs `localhost`, `127.0.0.1`, `::1`) and a client
/// certificate (identity [`DEV_CLIENT_IDENTITY`]), with the file names of [`DevPaths`].
///
/// If any of the six files exists and `force` is false, nothing is written and
/// [`DevOutcome::AlreadyPresent`] lists the files found; this is not an error. With `force`
/// all six are replaced.
pub fn write_dev_set(dir: &Path, force: bool) -> Result<DevOutcome> {
    let paths = DevPaths::in_dir(dir);
    if !force {
        let present: Vec<PathBuf> = paths
            .files()
            .into_iter()
            .filter(|p| p.symlink_metadata().is_ok())
            .map(Path::to_path_buf)
            .collect();
        if !present.is_empty() {
            return Ok(DevOutcome::AlreadyPresent(present));
        }
    }
    let ca = CertificateAuthority::generate(DEV_CA_NAME, &IssueOptions::ca_default())?;
    let leaf = IssueOptions::default();
    let server = ca.issue_server(
        DEV_SERVER_NAME,
        &["127.0.0.1".to_owned(), "::1".to_owned()],
        &leaf,
    )?;
    let client = ca.issue_client(DEV_CLIENT_IDENTITY, &leaf)?;

    fs::create_dir_all(dir).map_err(io_err("create directory", dir))?;
    write_private_key(&paths.ca_key, &ca.key_pem(), force)?;
    write_certificate(&paths.ca_cert, ca.cert_pem(), force)?;
    write_private_key(&paths.server_key, &server.key_pem, force)?;
    write_certificate(&paths.server_cert, &server.cert_pem, force)?;
    write_private_key(&paths.client_key, &client.key_pem, force)?;
    write_certificate(&paths.client_cert, &client.cert_pem, force)?;
    Ok(DevOutcome::Written(paths))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(unix)]
    fn mode(path: &Path) -> u32 {
        use std::os::unix::fs::PermissionsExt;
        fs::metadata(path).expect("metadata").permissions().mode() & 0o777
    }

    #[test]
    fn key_is_0600_and_not_overwritten_without_force() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("sub/dir/x.key");
        write_private_key(&path, "one", false).expect("first write");
        #[cfg(unix)]
        assert_eq!(mode(&path), 0o600);
        let err = write_private_key(&path, "two", false).expect_err("exists");
        assert!(err.to_string().contains("use --force"), "{err}");
        assert_eq!(fs::read_to_string(&path).expect("read"), "one");
        write_private_key(&path, "three", true).expect("forced");
        assert_eq!(fs::read_to_string(&path).expect("read"), "three");
        #[cfg(unix)]
        assert_eq!(mode(&path), 0o600);
    }

    #[cfg(unix)]
    #[test]
    fn forced_key_replaces_a_world_readable_file_with_0600() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("x.key");
        fs::write(&path, "old").expect("write");
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).expect("chmod");
        write_private_key(&path, "new", true).expect("forced");
        assert_eq!(mode(&path), 0o600);
        let leftovers: Vec<_> = fs::read_dir(dir.path()).expect("read dir").collect();
        assert_eq!(leftovers.len(), 1, "no temporary file left behind");
    }

    #[test]
    fn dev_set_is_written_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let target = dir.path().join("certs");
        let DevOutcome::Written(paths) = write_dev_set(&target, false).expect("dev") else {
            panic!("expected a new set");
        };
        for f in paths.files() {
            assert!(f.is_file(), "{}", f.display());
        }
        match write_dev_set(&target, false).expect("dev again") {
            DevOutcome::AlreadyPresent(found) => assert_eq!(found.len(), 6),
            other => panic!("expected AlreadyPresent, got {other:?}"),
        }
        let ca = CertificateAuthority::load(&paths.ca_cert, &paths.ca_key).expect("load");
        assert_eq!(ca.subject(), format!("CN={DEV_CA_NAME}"));
    }

    #[test]
    fn load_names_the_missing_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cert = dir.path().join("ca.pem");
        let key = dir.path().join("ca.key");
        let err = CertificateAuthority::load(&cert, &key).expect_err("missing");
        let text = err.to_string();
        assert!(text.contains(&cert.display().to_string()), "{text}");
        assert!(text.contains("restpipe-certs ca"), "{text}");
    }
}
