//! The `files` handler plug-in: read the files under one directory from the other side of
//! the pipe.
//!
//! This is RestPipe's use case. A file server that accepts no inbound connection runs the
//! client node with this plug-in; a public web server runs the server node and reads
//! `http://127.0.0.1:8081/client/fileserver-1/file//reports/q3.csv`. The same handlers exist
//! on both sides:
//!
//! - `get_file` (`GET .../file//reports/q3.csv`): the parameters are the segments of a path
//!   relative to the root; the reply is the file's bytes, with a content type guessed from its
//!   extension (see [`content_type_for`]; for a symbolic link, the extension of the file it
//!   points to).
//! - `get_files` (`GET .../files//reports`, or `GET .../files` for the root): the reply is
//!   `{"path": "reports", "entries": [{"name": "q3.csv", "type": "file", "size": 1234}, ...]}`,
//!   sorted by name. `type` is `file`, `dir` or `other`; `size` is the file's length in bytes
//!   and 0 for anything else. `path` is the parameters joined by `/` (empty for the root).
//!   A symbolic link is listed as what it points to when that is inside the root, else as
//!   `other`. Names that are not UTF-8 are left out: no request could name them.
//!
//! No request reads outside the root:
//!
//! | request | HTTP status | class |
//! |---|---|---|
//! | a parameter that is empty, `.`, `..`, absolute, or holds `/`, `\` or NUL | 400 | `PathRefused` |
//! | a path that leaves the root once symbolic links are followed | 403 | `PathRefused` |
//! | no such file or directory | 404 | `NotFound` |
//! | `get_file` of a directory or of a special file, `get_files` of a file | 400 | `NotAFile` / `NotADirectory` |
//! | a file larger than [`FilesPlugin::max_file_bytes`] | 413 | `TooLarge` |
//! | the operating system refuses access | 403 | `PermissionDenied` |
//!
//! A symbolic link inside the root that points inside the root is followed. The path is
//! checked one segment at a time, so a link that points outside the root is refused whether
//! or not the rest of the path exists there (nothing is told about files outside the root).
//!
//! The checks assume that nobody who could attack the node can write inside the root while it
//! serves: a link swapped in between the check and the read is not detected.
//!
//! ```
//! use restpipe_handler::{Context, Plugin, Request, Side};
//! use restpipe_handler_files::FilesPlugin;
//!
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! let dir = tempfile::tempdir().unwrap();
//! std::fs::create_dir(dir.path().join("reports")).unwrap();
//! std::fs::write(dir.path().join("reports/q3.csv"), "region,total\nnorth,42\n").unwrap();
//!
//! let plugin = FilesPlugin::new(dir.path()).unwrap();
//! let handlers = plugin.handlers(Side::Client);
//!
//! // What `GET /client/fileserver-1/file//reports/q3.csv` reaches on the file server.
//! let request = Request::new("GET", "file")
//!     .with_parameters(vec!["reports".into(), "q3.csv".into()]);
//! let reply = handlers.call(Context::for_test(Side::Client), request).await.unwrap();
//! assert_eq!(reply.content_type, "text/csv; charset=utf-8");
//! assert_eq!(&reply.body[..], b"region,total\nnorth,42\n");
//!
//! // Nothing above the root can be named.
//! let request = Request::new("GET", "file").with_parameters(vec!["..".into()]);
//! let err = handlers.call(Context::for_test(Side::Client), request).await.unwrap_err();
//! assert_eq!((err.class.as_str(), err.status), ("PathRefused", Some(400)));
//! # });
//! ```

use std::io;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use restpipe_handler::{
    Context, HandlerError, Handlers, Plugin, PluginSetup, PluginSpec, Reply, Request, SettingSpec,
    Side,
};
use serde::{Deserialize, Serialize};

/// How a node registers this plug-in: the name `files` and one setting, `root`
/// (`--files-root`, `RP_FILES_ROOT`, `[files] root`).
pub const SPEC: PluginSpec = PluginSpec::new(
    "files",
    "get_file and get_files: the files under one directory",
    build,
)
.settings(&[SettingSpec::new(
    "root",
    "files-root",
    "The directory the `files` handlers serve",
)
.env("RP_FILES_ROOT")
.value_name("DIRECTORY")]);

/// The settings of the plug-in, as [`SPEC`] declares them.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FilesSettings {
    root: Option<PathBuf>,
}

fn build(setup: &PluginSetup) -> Result<Arc<dyn Plugin>, String> {
    let settings: FilesSettings = setup.settings()?;
    let root = settings
        .root
        .ok_or("the files handlers need --files-root <directory>")?;
    let files = FilesPlugin::new(&root).map_err(|e| {
        format!(
            "--files-root {} is not a readable directory: {e}",
            root.display()
        )
    })?;
    // A file is one reply frame: its limit follows --max-frame, less a sixteenth for the
    // rest of the frame (15 MiB at the default 16 MiB).
    let max_file_bytes = setup.node().max_frame as u64 / 16 * 15;
    Ok(Arc::new(files.with_max_file_bytes(max_file_bytes)))
}

/// Serves `get_file` and `get_files` for the files under one root directory.
///
/// Register it with a node under the name `files`.
#[derive(Clone, Debug)]
pub struct FilesPlugin {
    root: PathBuf,
    max_file_bytes: u64,
}

impl FilesPlugin {
    /// The default of [`FilesPlugin::max_file_bytes`]: 15 MiB. A reply crosses the pipe in
    /// one frame, and the frame limit is 16 MiB by default; the last MiB is left for the rest
    /// of the frame.
    pub const DEFAULT_MAX_FILE_BYTES: u64 = 15 * 1024 * 1024;

    /// Serve the files under `root`. The root is made absolute with every symbolic link
    /// resolved; it is an error if it does not exist or is not a directory.
    pub fn new(root: impl AsRef<Path>) -> io::Result<Self> {
        let given = root.as_ref();
        let root = std::fs::canonicalize(given).map_err(|e| {
            io::Error::new(e.kind(), format!("files root {}: {e}", given.display()))
        })?;
        if !std::fs::metadata(&root)?.is_dir() {
            return Err(io::Error::new(
                io::ErrorKind::NotADirectory,
                format!("files root {} is not a directory", given.display()),
            ));
        }
        Ok(FilesPlugin {
            root,
            max_file_bytes: Self::DEFAULT_MAX_FILE_BYTES,
        })
    }

    /// The same plug-in with another size limit: `get_file` of a larger file answers 413.
    /// Keep it below the pipe's frame limit (`16 MiB` by default).
    pub fn with_max_file_bytes(mut self, max_file_bytes: u64) -> Self {
        self.max_file_bytes = max_file_bytes;
        self
    }

    /// The root directory, canonical.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The largest file `get_file` replies with, in bytes (also the largest `get_files`
    /// listing).
    pub fn max_file_bytes(&self) -> u64 {
        self.max_file_bytes
    }
}

impl Plugin for FilesPlugin {
    fn name(&self) -> &str {
        "files"
    }

    fn handlers(&self, _side: Side) -> Handlers {
        let shared = Arc::new(self.clone());
        let mut handlers = Handlers::new();
        let files = Arc::clone(&shared);
        handlers.add("get_file", move |_ctx: Context, req: Request| {
            let files = Arc::clone(&files);
            async move { files.read_file(&req.parameters).await }
        });
        let files = shared;
        handlers.add("get_files", move |_ctx: Context, req: Request| {
            let files = Arc::clone(&files);
            async move { files.list_dir(&req.parameters).await }
        });
        handlers
    }
}

/// The content type for a file name, from a small table of extensions (case-insensitive):
/// `txt`, `csv`, `json`, `html`/`htm`, `png`, `jpg`/`jpeg`, `pdf`; anything else is
/// `application/octet-stream`.
pub fn content_type_for(path: &Path) -> &'static str {
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase);
    match ext.as_deref() {
        Some("txt") => "text/plain; charset=utf-8",
        Some("csv") => "text/csv; charset=utf-8",
        Some("json") => "application/json",
        Some("html" | "htm") => "text/html; charset=utf-8",
        Some("png") => "image/png",
        Some("jpg" | "jpeg") => "image/jpeg",
        Some("pdf") => "application/pdf",
        _ => "application/octet-stream",
    }
}

/// One entry of a `get_files` listing.
#[derive(Debug, Serialize)]
struct Entry {
    name: String,
    #[serde(rename = "type")]
    kind: &'static str,
    size: u64,
}

/// The reply of `get_files`.
#[derive(Debug, Serialize)]
struct Listing {
    path: String,
    entries: Vec<Entry>,
}

impl FilesPlugin {
    async fn read_file(&self, parameters: &[String]) -> Result<Reply, HandlerError> {
        if parameters.is_empty() {
            return Err(HandlerError::new(
                "get_file needs the path of a file after `//`, as in file//reports/q3.csv",
            )
            .with_class("PathRefused")
            .with_status(400));
        }
        let shown = parameters.join("/");
        let path = self.resolve(parameters).await?;
        let meta = tokio::fs::metadata(&path)
            .await
            .map_err(|e| io_error(&shown, e))?;
        if !meta.is_file() {
            return Err(HandlerError::new(format!(
                "{shown} is not a regular file{}",
                if meta.is_dir() {
                    " (list a directory with get_files)"
                } else {
                    ""
                }
            ))
            .with_class("NotAFile")
            .with_status(400));
        }
        if meta.len() > self.max_file_bytes {
            return Err(too_large(&shown, meta.len(), self.max_file_bytes));
        }
        // One blocking read straight into the body: tokio's `File` would read in 2 MiB steps
        // through its own buffer, a thread hop and a copy each.
        // The file may have grown since `metadata`: never read more than the limit allows.
        let limit = self.max_file_bytes.saturating_add(1);
        let capacity = usize::try_from(meta.len()).unwrap_or(0);
        let from = path.clone();
        let body = tokio::task::spawn_blocking(move || {
            use std::io::Read as _;
            let mut body = Vec::with_capacity(capacity);
            std::fs::File::open(&from)?
                .take(limit)
                .read_to_end(&mut body)?;
            Ok::<_, io::Error>(body)
        })
        .await
        .map_err(|e| io_error(&shown, io::Error::other(e)))?
        .map_err(|e| io_error(&shown, e))?;
        if body.len() as u64 > self.max_file_bytes {
            return Err(too_large(&shown, body.len() as u64, self.max_file_bytes));
        }
        Ok(Reply::bytes(content_type_for(&path), body))
    }

    async fn list_dir(&self, parameters: &[String]) -> Result<Reply, HandlerError> {
        let shown = parameters.join("/");
        let path = self.resolve(parameters).await?;
        let meta = tokio::fs::metadata(&path)
            .await
            .map_err(|e| io_error(&shown, e))?;
        if !meta.is_dir() {
            return Err(HandlerError::new(format!(
                "{shown} is not a directory (read a file with get_file)"
            ))
            .with_class("NotADirectory")
            .with_status(400));
        }
        let mut dir = tokio::fs::read_dir(&path)
            .await
            .map_err(|e| io_error(&shown, e))?;
        let mut entries = Vec::new();
        while let Some(entry) = dir.next_entry().await.map_err(|e| io_error(&shown, e))? {
            let Ok(name) = entry.file_name().into_string() else {
                continue;
            };
            let (kind, size) = self.describe(&entry).await;
            entries.push(Entry { name, kind, size });
        }
        entries.sort_by(|a, b| a.name.cmp(&b.name));
        let reply = Reply::json(&Listing {
            path: shown.clone(),
            entries,
        })?;
        if reply.body.len() as u64 > self.max_file_bytes {
            return Err(too_large(
                &format!("the listing of {shown}"),
                reply.body.len() as u64,
                self.max_file_bytes,
            ));
        }
        Ok(reply)
    }

    /// The type and size of one directory entry. A symbolic link is described by its target
    /// when the target is inside the root, else as `other`; an entry that vanished or cannot be
    /// read is `other`.
    async fn describe(&self, entry: &tokio::fs::DirEntry) -> (&'static str, u64) {
        let Ok(file_type) = entry.file_type().await else {
            return ("other", 0);
        };
        let meta = if file_type.is_symlink() {
            match tokio::fs::canonicalize(entry.path()).await {
                Ok(target) if target.starts_with(&self.root) => tokio::fs::metadata(&target).await,
                _ => return ("other", 0),
            }
        } else {
            entry.metadata().await
        };
        match meta {
            Ok(m) if m.is_file() => ("file", m.len()),
            Ok(m) if m.is_dir() => ("dir", 0),
            _ => ("other", 0),
        }
    }

    /// The canonical path that `parameters` name under the root. Each parameter must be one
    /// plain name; the path is resolved one segment at a time, and every step must stay under
    /// the root.
    async fn resolve(&self, parameters: &[String]) -> Result<PathBuf, HandlerError> {
        for p in parameters {
            check_segment(p)?;
        }
        let whole = parameters.join("/");
        let mut current = self.root.clone();
        for (i, segment) in parameters.iter().enumerate() {
            current = tokio::fs::canonicalize(current.join(segment))
                .await
                .map_err(|e| io_error(&whole, e))?;
            let shown = parameters[..=i].join("/");
            if !current.starts_with(&self.root) {
                return Err(HandlerError::new(format!(
                    "{shown} leads outside the served directory"
                ))
                .with_class("PathRefused")
                .with_status(403));
            }
        }
        Ok(current)
    }
}

/// Refuse a parameter that is not exactly one plain file name.
fn check_segment(segment: &str) -> Result<(), HandlerError> {
    let refuse = |why: &str| {
        Err(
            HandlerError::new(format!("path segment {segment:?} refused: {why}"))
                .with_class("PathRefused")
                .with_status(400),
        )
    };
    if segment.is_empty() {
        return refuse("it is empty");
    }
    if segment == "." || segment == ".." {
        return refuse("relative segments are not allowed");
    }
    if segment.contains(['/', '\\']) {
        return refuse("a segment may not contain a path separator");
    }
    if segment.contains('\0') {
        return refuse("a segment may not contain NUL");
    }
    let path = Path::new(segment);
    let mut components = path.components();
    let plain =
        matches!(components.next(), Some(Component::Normal(_))) && components.next().is_none();
    if path.is_absolute() || path.has_root() || !plain {
        return refuse("a segment must be a plain name, not an absolute path");
    }
    Ok(())
}

/// The reply for a file or a listing over the limit: 413.
fn too_large(what: &str, size: u64, max: u64) -> HandlerError {
    HandlerError::new(format!(
        "{what} is {size} bytes or more, over the limit of {max} bytes"
    ))
    .with_class("TooLarge")
    .with_status(413)
}

/// An I/O error on `shown` (the path as the request gave it, never the absolute one).
fn io_error(shown: &str, err: io::Error) -> HandlerError {
    let shown = if shown.is_empty() { "/" } else { shown };
    match err.kind() {
        io::ErrorKind::NotFound | io::ErrorKind::NotADirectory => {
            HandlerError::new(format!("{shown}: no such file or directory"))
                .with_class("NotFound")
                .with_status(404)
        }
        io::ErrorKind::PermissionDenied => HandlerError::new(format!("{shown}: permission denied"))
            .with_class("PermissionDenied")
            .with_status(403),
        _ => HandlerError::new(format!("{shown}: {err}")).with_class("IoError"),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests may unwrap: a panic is a failed test
mod tests {
    use super::*;
    use restpipe_handler::codes;
    use serde_json::{json, Value};

    struct Fixture {
        // Kept alive for the test; removed on drop.
        _dir: tempfile::TempDir,
        root: PathBuf,
        handlers: Handlers,
    }

    /// A root with `hello.txt`, `data.bin` (every byte value), `sub/inner.csv`, `sub/deep/`,
    /// and `big.pdf` of 2 KiB; the plug-in's limit is 1 KiB.
    fn fixture() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        std::fs::create_dir(&root).unwrap();
        std::fs::write(root.join("hello.txt"), "hello\n").unwrap();
        std::fs::write(root.join("data.bin"), all_bytes()).unwrap();
        std::fs::create_dir_all(root.join("sub/deep")).unwrap();
        std::fs::write(root.join("sub/inner.csv"), "a,b\n1,2\n").unwrap();
        std::fs::write(root.join("big.pdf"), vec![b'x'; 2048]).unwrap();
        let plugin = FilesPlugin::new(&root).unwrap().with_max_file_bytes(1024);
        Fixture {
            handlers: plugin.handlers(Side::Client),
            root,
            _dir: dir,
        }
    }

    fn setup(values: &[(&str, &str)], max_frame: usize) -> PluginSetup {
        let values = values
            .iter()
            .map(|(k, v)| (k.to_string(), (*v).into()))
            .collect();
        PluginSetup::new(
            &SPEC,
            values,
            restpipe_handler::NodeFacts::new(Side::Client, max_frame),
        )
    }

    #[tokio::test]
    async fn the_spec_needs_a_root_and_follows_the_frame_limit() {
        let err = SPEC.build(&setup(&[], 1024)).err().unwrap();
        assert_eq!(err, "the files handlers need --files-root <directory>");
        let err = SPEC
            .build(&setup(&[("root", "/nonexistent/files")], 1024))
            .err()
            .unwrap();
        assert!(
            err.starts_with("--files-root /nonexistent/files is not a readable directory: "),
            "{err}"
        );
        assert_eq!(
            SPEC.setting("root").unwrap().env_var(),
            Some("RP_FILES_ROOT")
        );

        // A frame of 1600 bytes carries files of at most 1500: 1501 bytes is 413.
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("fits"), vec![b'x'; 1500]).unwrap();
        std::fs::write(dir.path().join("too-big"), vec![b'x'; 1501]).unwrap();
        let root = dir.path().to_str().unwrap();
        let plugin = SPEC.build(&setup(&[("root", root)], 1600)).unwrap();
        assert_eq!(plugin.name(), "files");
        let handlers = plugin.handlers(Side::Client);
        let call = |name: &str| {
            let request = Request::new("GET", "file").with_parameters(params(&[name]));
            handlers.call(Context::for_test(Side::Client), request)
        };
        assert_eq!(call("fits").await.unwrap().body.len(), 1500);
        assert_eq!(call("too-big").await.unwrap_err().status, Some(413));
    }

    fn all_bytes() -> Vec<u8> {
        (0..=255u8).chain((0..=255u8).rev()).collect()
    }

    fn params(p: &[&str]) -> Vec<String> {
        p.iter().map(|s| s.to_string()).collect()
    }

    async fn get(fx: &Fixture, noun: &str, p: &[&str]) -> Result<Reply, HandlerError> {
        let request = Request::new("GET", noun).with_parameters(params(p));
        fx.handlers
            .call(Context::for_test(Side::Client), request)
            .await
    }

    async fn refused(fx: &Fixture, noun: &str, p: &[&str]) -> HandlerError {
        let err = get(fx, noun, p).await.unwrap_err();
        assert_eq!(err.class, "PathRefused", "{p:?}: {err}");
        err
    }

    #[test]
    fn name_handlers_and_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let plugin = FilesPlugin::new(dir.path()).unwrap();
        assert_eq!(plugin.name(), "files");
        assert_eq!(plugin.max_file_bytes(), 15 * 1024 * 1024);
        assert_eq!(plugin.root(), std::fs::canonicalize(dir.path()).unwrap());
        for side in [Side::Server, Side::Client] {
            assert_eq!(plugin.handlers(side).names(), ["get_file", "get_files"]);
        }
    }

    #[test]
    fn new_refuses_a_missing_root_or_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let err = FilesPlugin::new(dir.path().join("nope")).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
        assert!(err.to_string().contains("nope"), "{err}");
        let file = dir.path().join("f.txt");
        std::fs::write(&file, "x").unwrap();
        let err = FilesPlugin::new(&file).unwrap_err();
        assert!(err.to_string().contains("not a directory"), "{err}");
    }

    #[test]
    fn content_types() {
        for (name, ct) in [
            ("a.txt", "text/plain; charset=utf-8"),
            ("a.CSV", "text/csv; charset=utf-8"),
            ("a.json", "application/json"),
            ("a.html", "text/html; charset=utf-8"),
            ("a.png", "image/png"),
            ("a.JPG", "image/jpeg"),
            ("a.jpeg", "image/jpeg"),
            ("a.pdf", "application/pdf"),
            ("a.bin", "application/octet-stream"),
            ("noext", "application/octet-stream"),
        ] {
            assert_eq!(content_type_for(Path::new(name)), ct, "{name}");
        }
    }

    #[tokio::test]
    async fn reads_a_text_file() {
        let fx = fixture();
        let reply = get(&fx, "file", &["hello.txt"]).await.unwrap();
        assert_eq!(reply.code, codes::OK);
        assert_eq!(reply.status, None);
        assert_eq!(reply.content_type, "text/plain; charset=utf-8");
        assert_eq!(&reply.body[..], b"hello\n");
    }

    #[tokio::test]
    async fn reads_a_binary_file_byte_for_byte() {
        let fx = fixture();
        let reply = get(&fx, "file", &["data.bin"]).await.unwrap();
        assert_eq!(reply.content_type, "application/octet-stream");
        assert_eq!(&reply.body[..], &all_bytes()[..]);
    }

    #[tokio::test]
    async fn reads_a_nested_file() {
        let fx = fixture();
        let reply = get(&fx, "file", &["sub", "inner.csv"]).await.unwrap();
        assert_eq!(reply.content_type, "text/csv; charset=utf-8");
        assert_eq!(&reply.body[..], b"a,b\n1,2\n");
    }

    #[tokio::test]
    async fn a_file_at_the_limit_is_read_and_one_over_is_413() {
        let fx = fixture();
        std::fs::write(fx.root.join("exact.bin"), vec![7u8; 1024]).unwrap();
        let reply = get(&fx, "file", &["exact.bin"]).await.unwrap();
        assert_eq!(reply.body.len(), 1024);

        let err = get(&fx, "file", &["big.pdf"]).await.unwrap_err();
        assert_eq!(err.class, "TooLarge");
        assert_eq!(err.status, Some(413));
        assert!(err.message.contains("big.pdf"), "{err}");
        let reply = err.into_reply();
        assert_eq!(reply.code, codes::HANDLER_FAILED);
        assert_eq!(reply.status, Some(413));
    }

    #[tokio::test]
    async fn missing_file_is_404() {
        let fx = fixture();
        for p in [&["nope.txt"][..], &["sub", "nope.txt"], &["nodir", "x"]] {
            let err = get(&fx, "file", p).await.unwrap_err();
            assert_eq!(err.class, "NotFound", "{p:?}");
            assert_eq!(err.status, Some(404));
            assert!(err.message.contains(&p.join("/")), "{err}");
        }
        // A file used as a directory is not found either.
        let err = get(&fx, "file", &["hello.txt", "x"]).await.unwrap_err();
        assert_eq!((err.class.as_str(), err.status), ("NotFound", Some(404)));
        let err = get(&fx, "files", &["nope"]).await.unwrap_err();
        assert_eq!((err.class.as_str(), err.status), ("NotFound", Some(404)));
    }

    #[tokio::test]
    async fn errors_do_not_show_the_absolute_root() {
        let fx = fixture();
        let root = fx.root.to_string_lossy().into_owned();
        for (noun, p) in [
            ("file", &["nope"][..]),
            ("file", &["sub"]),
            ("files", &["x"]),
        ] {
            let err = get(&fx, noun, p).await.unwrap_err();
            assert!(!err.message.contains(&root), "{err}");
        }
    }

    #[tokio::test]
    async fn get_file_of_a_directory_or_nothing_is_400() {
        let fx = fixture();
        let err = get(&fx, "file", &["sub"]).await.unwrap_err();
        assert_eq!((err.class.as_str(), err.status), ("NotAFile", Some(400)));
        let err = get(&fx, "file", &[]).await.unwrap_err();
        assert_eq!((err.class.as_str(), err.status), ("PathRefused", Some(400)));
    }

    #[tokio::test]
    async fn lists_the_root_sorted() {
        let fx = fixture();
        let reply = get(&fx, "files", &[]).await.unwrap();
        assert_eq!(reply.content_type, "application/json");
        let value: Value = serde_json::from_slice(&reply.body).unwrap();
        assert_eq!(
            value,
            json!({
                "path": "",
                "entries": [
                    {"name": "big.pdf", "type": "file", "size": 2048},
                    {"name": "data.bin", "type": "file", "size": 512},
                    {"name": "hello.txt", "type": "file", "size": 6},
                    {"name": "sub", "type": "dir", "size": 0},
                ]
            })
        );
    }

    #[tokio::test]
    async fn lists_a_subdirectory() {
        let fx = fixture();
        let reply = get(&fx, "files", &["sub"]).await.unwrap();
        let value: Value = serde_json::from_slice(&reply.body).unwrap();
        assert_eq!(
            value,
            json!({
                "path": "sub",
                "entries": [
                    {"name": "deep", "type": "dir", "size": 0},
                    {"name": "inner.csv", "type": "file", "size": 8},
                ]
            })
        );
        let reply = get(&fx, "files", &["sub", "deep"]).await.unwrap();
        let value: Value = serde_json::from_slice(&reply.body).unwrap();
        assert_eq!(value, json!({"path": "sub/deep", "entries": []}));
    }

    #[tokio::test]
    async fn get_files_of_a_file_is_400() {
        let fx = fixture();
        let err = get(&fx, "files", &["hello.txt"]).await.unwrap_err();
        assert_eq!(
            (err.class.as_str(), err.status),
            ("NotADirectory", Some(400))
        );
    }

    #[tokio::test]
    async fn a_listing_over_the_limit_is_413() {
        let fx = fixture();
        let many = fx.root.join("many");
        std::fs::create_dir(&many).unwrap();
        for i in 0..40 {
            std::fs::write(many.join(format!("file-number-{i:03}.txt")), "").unwrap();
        }
        let err = get(&fx, "files", &["many"]).await.unwrap_err();
        assert_eq!((err.class.as_str(), err.status), ("TooLarge", Some(413)));
    }

    #[tokio::test]
    async fn refuses_dot_segments() {
        let fx = fixture();
        for noun in ["file", "files"] {
            for p in [
                &[".."][..],
                &["..", "etc", "passwd"],
                &["sub", "..", "..", "x"],
                &["sub", "..", "hello.txt"],
                &["."],
                &["sub", ".", "inner.csv"],
            ] {
                let err = refused(&fx, noun, p).await;
                assert_eq!(err.status, Some(400), "{p:?}");
                assert!(err.message.contains("refused"), "{err}");
            }
        }
    }

    #[tokio::test]
    async fn refuses_empty_segments() {
        let fx = fixture();
        for p in [&[""][..], &["sub", "", "inner.csv"], &["sub", ""]] {
            let err = refused(&fx, "file", p).await;
            assert_eq!(err.status, Some(400));
        }
    }

    #[tokio::test]
    async fn refuses_absolute_paths() {
        let fx = fixture();
        for p in [&["/etc/passwd"][..], &["/"], &["/etc"], &["\\etc\\passwd"]] {
            for noun in ["file", "files"] {
                let err = refused(&fx, noun, p).await;
                assert_eq!(err.status, Some(400));
            }
        }
    }

    #[tokio::test]
    async fn refuses_separators_and_nul_inside_a_segment() {
        // A percent-encoded `%2F` or `%5C` arrives decoded, inside one parameter.
        let fx = fixture();
        for p in [
            &["sub/inner.csv"][..],
            &["a/b"],
            &["../hello.txt"],
            &["sub\\inner.csv"],
            &["..\\..\\etc"],
            &["hello.txt\0"],
            &["sub", "inner.csv\0.png"],
        ] {
            let err = refused(&fx, "file", p).await;
            assert_eq!(err.status, Some(400), "{p:?}");
        }
    }

    #[cfg(unix)]
    #[tokio::test]
    async fn refuses_symlinks_that_leave_the_root() {
        use std::os::unix::fs::symlink;
        let fx = fixture();
        // A secret next to the root, and links to it and to /etc.
        let outside = fx.root.parent().unwrap().join("secret.txt");
        std::fs::write(&outside, "secret").unwrap();
        symlink("/etc", fx.root.join("etc")).unwrap();
        symlink(&outside, fx.root.join("secret.txt")).unwrap();
        symlink("../secret.txt", fx.root.join("sub/relative-secret.txt")).unwrap();
        symlink("..", fx.root.join("up")).unwrap();

        for (noun, p) in [
            ("file", &["etc", "passwd"][..]),
            ("file", &["etc", "no-such-file"]),
            ("files", &["etc"]),
            ("file", &["secret.txt"]),
            ("file", &["sub", "relative-secret.txt"]),
            ("file", &["up", "secret.txt"]),
            ("files", &["up"]),
        ] {
            let err = refused(&fx, noun, p).await;
            assert_eq!(err.status, Some(403), "{noun} {p:?}");
            assert!(err.message.contains("outside"), "{err}");
        }

        // The listing shows the links, but not what lies outside.
        let value: Value =
            serde_json::from_slice(&get(&fx, "files", &[]).await.unwrap().body).unwrap();
        let entries = value["entries"].as_array().unwrap();
        for name in ["etc", "secret.txt", "up"] {
            let entry = entries.iter().find(|e| e["name"] == name).unwrap();
            assert_eq!(entry["type"], "other", "{name}");
            assert_eq!(entry["size"], 0, "{name}");
        }
    }

    #[cfg(unix)]
    #[tokio::test]
    async fn follows_symlinks_that_stay_inside_the_root() {
        use std::os::unix::fs::symlink;
        let fx = fixture();
        symlink("sub/inner.csv", fx.root.join("link.csv")).unwrap();
        symlink("sub", fx.root.join("linkdir")).unwrap();
        symlink("../hello.txt", fx.root.join("sub/up.txt")).unwrap();

        let reply = get(&fx, "file", &["link.csv"]).await.unwrap();
        assert_eq!(&reply.body[..], b"a,b\n1,2\n");
        let reply = get(&fx, "file", &["linkdir", "inner.csv"]).await.unwrap();
        assert_eq!(&reply.body[..], b"a,b\n1,2\n");
        let reply = get(&fx, "file", &["sub", "up.txt"]).await.unwrap();
        assert_eq!(&reply.body[..], b"hello\n");
        // The content type follows the name of the file the link points to.
        symlink("sub/inner.csv", fx.root.join("current")).unwrap();
        let reply = get(&fx, "file", &["current"]).await.unwrap();
        assert_eq!(reply.content_type, "text/csv; charset=utf-8");

        let value: Value =
            serde_json::from_slice(&get(&fx, "files", &[]).await.unwrap().body).unwrap();
        let entries = value["entries"].as_array().unwrap();
        let link = entries.iter().find(|e| e["name"] == "link.csv").unwrap();
        assert_eq!(link["type"], "file");
        assert_eq!(link["size"], 8);
        let linkdir = entries.iter().find(|e| e["name"] == "linkdir").unwrap();
        assert_eq!(linkdir["type"], "dir");
    }

    #[cfg(unix)]
    #[tokio::test]
    async fn a_root_reached_through_a_symlink_works() {
        use std::os::unix::fs::symlink;
        let fx = fixture();
        let alias = fx.root.parent().unwrap().join("alias");
        symlink(&fx.root, &alias).unwrap();
        let handlers = FilesPlugin::new(&alias).unwrap().handlers(Side::Server);
        let request = Request::new("GET", "file").with_parameters(params(&["hello.txt"]));
        let reply = handlers
            .call(Context::for_test(Side::Server), request)
            .await
            .unwrap();
        assert_eq!(&reply.body[..], b"hello\n");
    }

    #[cfg(unix)]
    #[tokio::test]
    async fn special_files_are_not_read() {
        let fx = fixture();
        // A FIFO would block a reader forever; it must be refused, not opened.
        let status = std::process::Command::new("mkfifo")
            .arg(fx.root.join("pipe"))
            .status();
        if !matches!(status, Ok(s) if s.success()) {
            return; // no mkfifo on this system
        }
        let err = get(&fx, "file", &["pipe"]).await.unwrap_err();
        assert_eq!((err.class.as_str(), err.status), ("NotAFile", Some(400)));
        let value: Value =
            serde_json::from_slice(&get(&fx, "files", &[]).await.unwrap().body).unwrap();
        let entries = value["entries"].as_array().unwrap();
        let pipe = entries.iter().find(|e| e["name"] == "pipe").unwrap();
        assert_eq!(pipe["type"], "other");
    }
}
