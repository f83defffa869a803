//! The `files` handler plug-in: read the files under one directory from the other side of
//! the pipe.
//!
//! This is RestPipe's use case. A file server that accepts no inbound connection runs the
//! client node with this plug-in; a public web server runs the server node and reads
//! `http://127.0.0.1:8081/client/fileserver-1/file//reports/q3.csv`. The same handlers exist
//! on both sides:
//!
//! - `get_file` (`GET .../file//reports/q3.csv`): the parameters are the segments of a path
//!   relative to the root; the reply is the file's bytes, streamed in chunks as the caller
//!   reads them, whatever the size, with its length (`Content-Length`) and a content type
//!   guessed from its extension (see [`content_type_for`]; for a symbolic link, the extension
//!   of the file it points to). See [Files](#files) for caching, ranges and `HEAD`.
//! - `get_files` (`GET .../files//reports`, or `GET .../files` for the root): one page of the
//!   directory's listing, see [Listings](#listings).
//!
//! # Files
//!
//! Every reply of `get_file` about a file (200, 206, 304, 416, and `HEAD`) carries:
//!
//! - `ETag`: a strong entity tag made of the file's inode, size and modification time
//!   (nanoseconds), as in `"1a2b-4d2-65943e45.0"`. A file rewritten with the same size within
//!   the resolution of the file system's clock keeps its tag; any other change gives a new one.
//! - `Last-Modified`: the modification time as an IMF-fixdate (`Tue, 02 Jan 2024 03:04:05
//!   GMT`), left out when the time is before 1970 or after 9999.
//!
//! They answer conditional and partial requests (RFC 9110):
//!
//! | request | reply |
//! |---|---|
//! | `If-None-Match` that lists the `ETag` (weak comparison, `W/` ignored) or is `*` | 304, no body |
//! | else `If-Modified-Since` a date not older than `Last-Modified` (and no `If-None-Match`) | 304, no body |
//! | `Range: bytes=a-b`, `bytes=a-` or `bytes=-n` (one range) | 206, `Content-Range: bytes a-b/size`, exactly those bytes |
//! | a range that starts at or past the end, or `bytes=-0` | 416, `Content-Range: bytes */size` |
//! | several ranges, another unit, or a malformed `Range` | 200, the whole file (the `Range` is ignored) |
//! | `If-Range` whose entity tag is not the `ETag` (strong comparison), or whose date is not `Last-Modified`, or names a file modified less than a second ago | 200, the whole file |
//!
//! A range's end past the end of the file is cut to it, and a suffix longer than the file is
//! the whole file. A suffix range of an empty file is answered 200, empty.
//!
//! `HEAD` (served by `get_file`) answers the status and the headers a `GET` without `Range`
//! would, with the length of the file as the body's length, and neither reads nor opens the
//! file: it takes the facts from the path's metadata. A `HEAD` of a file that the node may
//! not read is therefore 200 where the `GET` would be 403. `Range` and `If-Range` apply to
//! `GET` only (RFC 9110 §14.2: range handling is defined for `GET` alone).
//!
//! The file is opened once, and its size, type, modification time and inode are taken from
//! the open handle: the reply describes the file that is read. The stream reads exactly the
//! length it announced: a file that grows meanwhile is cut at that length, and one that
//! shrinks ends the stream with an error (the caller sees an incomplete body). Dropping the
//! stream (the caller went away) closes the file.
//!
//! # Listings
//!
//! `get_files` answers one page of a directory, in name order (byte-wise):
//!
//! ```json
//! {"path": "reports",
//!  "entries": [{"name": "q3.csv", "type": "file", "size": 1234}, ...],
//!  "next": "q3.csv"}
//! ```
//!
//! `type` is `file`, `dir` or `other`; `size` is the file's length in bytes and 0 for anything
//! else. `path` is the parameters joined by `/` (empty for the root). A symbolic link is listed
//! as what it points to when that is inside the root, else as `other`. Names that are not
//! UTF-8 are left out: no request could name them.
//!
//! The query parameters choose the page:
//!
//! - `limit`: how many entries at most, from 1 to [`FilesPlugin::MAX_PAGE`] (10,000; a
//!   larger number counts as 10,000), [`FilesPlugin::DEFAULT_PAGE`] (1,000) when absent;
//! - `after`: only names that sort after this one.
//!
//! `next` is the last name of the page when more entries follow it, else `null`; pass it as
//! `after` (percent-encoded: `+` in a query means a space) for the next page:
//! `GET .../files//reports?limit=500&after=q3.csv`. Each page reads the whole directory but
//! keeps only the `limit` smallest names after `after`: the memory a listing takes is bounded
//! by `limit`, not by the size of the directory. A directory that changes between pages may
//! show a name twice or miss one added before the cursor, as any listing by cursor does.
//!
//! # No request reads outside the root
//!
//! | request | HTTP status | class |
//! |---|---|---|
//! | a parameter that is empty, `.`, `..`, absolute, or holds `/`, `\` or NUL | 400 | `PathRefused` |
//! | a path that leaves the root once symbolic links are followed | 403 | `PathRefused` |
//! | no such file or directory | 404 | `NotFound` |
//! | `get_file` of a directory or of a special file, `get_files` of a file | 400 | `NotAFile` / `NotADirectory` |
//! | `get_files` with a `limit` that is 0 or not a number | 400 | `BadQuery` |
//! | the operating system refuses access | 403 | `PermissionDenied` |
//!
//! A symbolic link inside the root that points inside the root is followed. The path is
//! checked one segment at a time, so a link that points outside the root is refused whether
//! or not the rest of the path exists there (nothing is told about files outside the root).
//! Errors name the path as the request gave it, never the root's absolute path.
//!
//! A special file (a FIFO, a device, a socket) is refused without being opened. The checks
//! assume that nobody who could attack the node can write inside the root while it serves: a
//! link swapped in between the check and the read is not detected. On Unix the file is opened
//! with `O_NOFOLLOW` (the last segment may not have become a link), `O_NONBLOCK` (a FIFO
//! swapped in does not block the open; it has no effect on a regular file) and `O_NOCTTY`, and
//! what was opened must still be a regular file.
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
//! let mut reply = handlers.call(Context::for_test(Side::Client), request).await.unwrap();
//! assert_eq!(reply.content_type, "text/csv; charset=utf-8");
//! assert!(reply.headers.get("etag").is_some());
//! // The body is a stream that knows its length.
//! assert_eq!(reply.stream.as_ref().unwrap().length(), Some(22));
//! let body = reply.collect_body(usize::MAX).await.unwrap();
//! assert_eq!(&body[..], b"region,total\nnorth,42\n");
//!
//! // The last 3 bytes.
//! let mut request = Request::new("GET", "file")
//!     .with_parameters(vec!["reports".into(), "q3.csv".into()]);
//! request.headers = request.headers.with("range", "bytes=-3");
//! let mut reply = handlers.call(Context::for_test(Side::Client), request).await.unwrap();
//! assert_eq!(reply.status, Some(206));
//! assert_eq!(reply.headers.get("content-range"), Some("bytes 19-21/22"));
//! assert_eq!(&reply.collect_body(usize::MAX).await.unwrap()[..], b"42\n");
//!
//! // Nothing above the root can be named.
//! let request = Request::new("GET", "file").with_parameters(vec!["..".into()]);
//! let err = handlers.call(Context::for_test(Side::Client), request).await.unwrap_err();
//! assert_eq!((err.class.as_str(), err.status), ("PathRefused", Some(400)));
//! # });
//! ```

use std::collections::BinaryHeap;
use std::io;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use restpipe_handler::body::CHUNK;
use restpipe_handler::{
    BodyStream, Context, HandlerError, Handlers, Headers, Plugin, PluginSetup, PluginSpec, Reply,
    Request, SettingSpec, Side,
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
    Ok(Arc::new(files))
}

/// Serves `get_file` and `get_files` for the files under one root directory.
///
/// Register it with a node under the name `files`. Files are streamed, so their size is not
/// bounded by the pipe's frame limit; listings are paged (see the [crate](crate#listings)).
#[derive(Clone, Debug)]
pub struct FilesPlugin {
    root: PathBuf,
}

impl FilesPlugin {
    /// The entries of a `get_files` page when the query gives no `limit`: 1,000.
    pub const DEFAULT_PAGE: usize = 1000;

    /// The most entries of a `get_files` page: 10,000. A larger `limit` is taken as this.
    pub const MAX_PAGE: usize = 10_000;

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
        Ok(FilesPlugin { root })
    }

    /// The root directory, canonical.
    pub fn root(&self) -> &Path {
        &self.root
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
            async move { files.read_file(&req).await }
        });
        let files = shared;
        handlers.add("get_files", move |_ctx: Context, req: Request| {
            let files = Arc::clone(&files);
            async move { files.list_dir(&req).await }
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

/// The reply of `get_files`: one page.
#[derive(Debug, Serialize)]
struct Listing {
    path: String,
    entries: Vec<Entry>,
    /// The `after` of the next page; `None` (`null`) on the last page.
    next: Option<String>,
}

impl FilesPlugin {
    async fn read_file(&self, req: &Request) -> Result<Reply, HandlerError> {
        let parameters = &req.parameters;
        if parameters.is_empty() {
            return Err(HandlerError::new(
                "get_file needs the path of a file after `//`, as in file//reports/q3.csv",
            )
            .with_class("PathRefused")
            .with_status(400));
        }
        let shown = parameters.join("/");
        let path = self.resolve(parameters).await?;
        // HEAD is served by this handler too: it needs the facts, not the bytes.
        let head = req.verb.eq_ignore_ascii_case("HEAD");
        let from = path.clone();
        let opened = tokio::task::spawn_blocking(move || open_regular(&from, !head))
            .await
            .map_err(|e| io_error(&shown, io::Error::other(e)))?
            .map_err(|e| io_error(&shown, e))?;
        let (file, meta) = match opened {
            Opened::File(file, meta) => (file, meta),
            Opened::NotAFile { dir } => {
                return Err(HandlerError::new(format!(
                    "{shown} is not a regular file{}",
                    if dir {
                        " (list a directory with get_files)"
                    } else {
                        ""
                    }
                ))
                .with_class("NotAFile")
                .with_status(400));
            }
        };
        let size = meta.len();
        let validators = Validators::of(&meta);
        let content_type = content_type_for(&path);
        let answer = answer(&req.headers, head, size, &validators, SystemTime::now());
        let reply = match answer {
            Answer::NotModified => Reply::bytes(content_type, Bytes::new()).with_status(304),
            Answer::Unsatisfiable => Reply::text(format!(
                "{shown}: the range asked for is not satisfiable: the file is {size} bytes"
            ))
            .with_status(416)
            .with_header("content-range", format!("bytes */{size}")),
            Answer::Whole => Reply::stream(content_type, body_of(file, 0, size)),
            Answer::Part { start, len } => {
                let end = start + len - 1;
                Reply::stream(content_type, body_of(file, start, len))
                    .with_status(206)
                    .with_header("content-range", format!("bytes {start}-{end}/{size}"))
            }
        };
        Ok(validators.put_on(reply))
    }

    async fn list_dir(&self, req: &Request) -> Result<Reply, HandlerError> {
        let page = Page::of(&req.query_pairs())?;
        let parameters = &req.parameters;
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
        // The `limit` smallest names after `after`, in a max-heap: its top is the first to go
        // when a smaller name comes. Whatever the size of the directory, it holds `limit`.
        let mut smallest: BinaryHeap<String> = BinaryHeap::new();
        let mut more = false;
        while let Some(entry) = dir.next_entry().await.map_err(|e| io_error(&shown, e))? {
            let Ok(name) = entry.file_name().into_string() else {
                continue;
            };
            if page
                .after
                .as_deref()
                .is_some_and(|after| name.as_str() <= after)
            {
                continue;
            }
            if smallest.len() < page.limit {
                smallest.push(name);
                continue;
            }
            // One name of those after `after` is left out of the page: this one or the top.
            more = true;
            if let Some(mut largest) = smallest.peek_mut() {
                if name < *largest {
                    *largest = name;
                }
            }
        }
        let names = smallest.into_sorted_vec();
        let next = if more { names.last().cloned() } else { None };
        let mut entries = Vec::with_capacity(names.len());
        for name in names {
            let (kind, size) = self.describe(&path.join(&name)).await;
            entries.push(Entry { name, kind, size });
        }
        let json = Reply::json(&Listing {
            path: shown,
            entries,
            next,
        })?;
        // As a stream of chunks: a page of long names may be larger than a frame.
        Ok(Reply::stream(json.content_type, chunks_of(json.body)))
    }

    /// The type and size of one directory entry. A symbolic link is described by its target
    /// when the target is inside the root, else as `other`; an entry that vanished or cannot be
    /// read is `other`.
    async fn describe(&self, entry: &Path) -> (&'static str, u64) {
        let Ok(meta) = tokio::fs::symlink_metadata(entry).await else {
            return ("other", 0);
        };
        let meta = if meta.file_type().is_symlink() {
            match tokio::fs::canonicalize(entry).await {
                Ok(target) if target.starts_with(&self.root) => tokio::fs::metadata(&target).await,
                _ => return ("other", 0),
            }
        } else {
            Ok(meta)
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

/// What [`open_regular`] found.
enum Opened {
    /// A regular file: open (unless only its metadata was asked for), with the metadata of
    /// the open handle (else of the path).
    File(Option<std::fs::File>, std::fs::Metadata),
    /// Not a regular file; never opened, or closed at once.
    NotAFile {
        /// It is a directory.
        dir: bool,
    },
}

/// Open the regular file at `path` (canonical), or with `open` false only look at it. A
/// special file is refused from the path's metadata without being opened; what is opened is
/// described by the metadata of the open handle, so that the reply's facts are those of the
/// bytes it carries.
fn open_regular(path: &Path, open: bool) -> io::Result<Opened> {
    let meta = std::fs::metadata(path)?;
    if !meta.is_file() {
        return Ok(Opened::NotAFile { dir: meta.is_dir() });
    }
    if !open {
        return Ok(Opened::File(None, meta));
    }
    let mut options = std::fs::OpenOptions::new();
    options.read(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY | libc::O_NOFOLLOW);
    }
    let file = options.open(path)?;
    let meta = file.metadata()?;
    if !meta.is_file() {
        return Ok(Opened::NotAFile { dir: meta.is_dir() });
    }
    Ok(Opened::File(Some(file), meta))
}

/// A body of the `len` bytes of `file` from byte `start`, or, with no file (`HEAD`), a body
/// that reads nothing and tells the length.
fn body_of(file: Option<std::fs::File>, start: u64, len: u64) -> BodyStream {
    match file {
        Some(file) => BodyStream::from_file(file, start, len),
        None => BodyStream::new(futures_util::stream::empty(), Some(len)),
    }
}

/// `bytes` as a stream of chunks of at most [`CHUNK`] bytes, with its length.
fn chunks_of(bytes: Bytes) -> BodyStream {
    let len = bytes.len();
    let chunks: Vec<Result<Bytes, _>> = (0..len)
        .step_by(CHUNK)
        .map(|at| Ok(bytes.slice(at..len.min(at + CHUNK))))
        .collect();
    BodyStream::new(futures_util::stream::iter(chunks), Some(len as u64))
}

/// The latest time an IMF-fixdate can show (the end of year 9999), in seconds after 1970.
const HTTP_DATE_END: u64 = 253_402_300_800;

/// The validators of a file: its `ETag` and `Last-Modified`.
#[derive(Clone, Debug, PartialEq)]
struct Validators {
    /// The strong entity tag, quoted.
    etag: String,
    /// The modification time in whole seconds, when an HTTP date can show it.
    modified: Option<SystemTime>,
}

impl Validators {
    fn of(meta: &std::fs::Metadata) -> Self {
        #[cfg(unix)]
        let inode = std::os::unix::fs::MetadataExt::ino(meta);
        #[cfg(not(unix))]
        let inode = 0u64;
        let mtime = meta.modified().ok();
        // Before 1970 is told apart by a `-` (the tag is opaque: it only has to change).
        let (sign, since) = match mtime.map(|t| t.duration_since(UNIX_EPOCH)) {
            Some(Ok(d)) => ("", d),
            Some(Err(before)) => ("-", before.duration()),
            None => ("", Duration::ZERO),
        };
        let etag = format!(
            "\"{inode:x}-{:x}-{sign}{:x}.{:x}\"",
            meta.len(),
            since.as_secs(),
            since.subsec_nanos()
        );
        let modified = mtime
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .filter(|d| d.as_secs() < HTTP_DATE_END)
            .map(|d| UNIX_EPOCH + Duration::from_secs(d.as_secs()));
        Validators { etag, modified }
    }

    /// `Last-Modified`, as an IMF-fixdate.
    fn last_modified(&self) -> Option<String> {
        self.modified.map(httpdate::fmt_http_date)
    }

    /// `reply` with `ETag` and `Last-Modified`.
    fn put_on(&self, reply: Reply) -> Reply {
        let reply = reply.with_header("etag", self.etag.clone());
        match self.last_modified() {
            Some(date) => reply.with_header("last-modified", date),
            None => reply,
        }
    }
}

/// How `get_file` answers, once the conditional and range headers are weighed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Answer {
    /// 304: the caller's copy is current.
    NotModified,
    /// 200: the whole file.
    Whole,
    /// 206: `len` bytes (at least 1) from `start`.
    Part {
        /// The first byte.
        start: u64,
        /// How many bytes.
        len: u64,
    },
    /// 416: the range asked for lies past the end.
    Unsatisfiable,
}

/// The answer to the request headers `headers` for a file of `size` bytes with these
/// validators, at `now`, in the order of RFC 9110 §13.2.2 (the `If-Match` and
/// `If-Unmodified-Since` headers do not cross the pipe). `head` is a `HEAD`, for which the
/// range headers do not count.
fn answer(
    headers: &Headers,
    head: bool,
    size: u64,
    validators: &Validators,
    now: SystemTime,
) -> Answer {
    if let Some(tags) = headers.get("if-none-match") {
        if none_match_lists(tags, &validators.etag) {
            return Answer::NotModified;
        }
    } else if let (Some(since), Some(modified)) =
        (headers.get("if-modified-since"), validators.modified)
    {
        // A date that does not parse is ignored.
        if httpdate::parse_http_date(since.trim()).is_ok_and(|since| modified <= since) {
            return Answer::NotModified;
        }
    }
    if head {
        return Answer::Whole;
    }
    let Some(range) = headers.get("range").and_then(parse_range) else {
        return Answer::Whole;
    };
    if let Some(validator) = headers.get("if-range") {
        if !if_range_holds(validator, validators, now) {
            return Answer::Whole;
        }
    }
    range.within(size)
}

/// Whether an `If-None-Match` value is `*` or lists `etag` (weak comparison: a `W/` prefix
/// is ignored). A list that stops parsing matches nothing past that point.
fn none_match_lists(value: &str, etag: &str) -> bool {
    let mut rest = value.trim();
    if rest == "*" {
        return true;
    }
    loop {
        rest = rest.trim_start_matches([' ', '\t', ',']);
        let tag = rest.strip_prefix("W/").unwrap_or(rest);
        let Some(inside) = tag.strip_prefix('"') else {
            return false;
        };
        let Some(end) = inside.find('"') else {
            return false;
        };
        // The tag with both quotes.
        if tag[..end + 2] == *etag {
            return true;
        }
        rest = &inside[end + 1..];
    }
}

/// Whether an `If-Range` value lets the range through: an entity tag equal to the `ETag`
/// (strong comparison: a weak tag never is), or the exact `Last-Modified` date of a file
/// modified at least a second before `now` (else the date is not a strong validator, RFC 9110
/// §8.8.2.2).
fn if_range_holds(value: &str, validators: &Validators, now: SystemTime) -> bool {
    let value = value.trim();
    if value.starts_with('"') || value.starts_with("W/") {
        return value == validators.etag;
    }
    let Some(modified) = validators.modified else {
        return false;
    };
    let settled = modified
        .checked_add(Duration::from_secs(1))
        .is_some_and(|t| t <= now);
    settled && httpdate::parse_http_date(value).is_ok_and(|date| date == modified)
}

/// The one range of a `Range` header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ByteRange {
    /// `bytes=first-last` or `bytes=first-`.
    From {
        /// The first byte.
        first: u64,
        /// The last byte, included; `None` for the end of the file.
        last: Option<u64>,
    },
    /// `bytes=-n`: the last `n` bytes.
    Suffix(u64),
}

/// The range of a `Range: bytes=...` header holding exactly one range; `None` for any other
/// unit, several ranges, or a malformed value (which are then ignored). Numbers too large for
/// 64 bits are taken as the largest. The work is linear in the value, which the handler API
/// bounds to 2 KiB.
fn parse_range(value: &str) -> Option<ByteRange> {
    let (unit, set) = value.trim().split_once('=')?;
    if !unit.trim().eq_ignore_ascii_case("bytes") {
        return None;
    }
    let mut specs = set.split(',').map(str::trim).filter(|s| !s.is_empty());
    let spec = specs.next()?;
    if specs.next().is_some() {
        return None;
    }
    let (first, last) = spec.split_once('-')?;
    if first.is_empty() {
        return Some(ByteRange::Suffix(number(last)?));
    }
    let first = number(first)?;
    let last = match last {
        "" => None,
        last => Some(number(last)?),
    };
    if last.is_some_and(|last| last < first) {
        return None;
    }
    Some(ByteRange::From { first, last })
}

/// A string of ASCII digits as a number, saturating at `u64::MAX`; `None` for anything else.
fn number(digits: &str) -> Option<u64> {
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some(digits.bytes().fold(0u64, |n, d| {
        n.saturating_mul(10).saturating_add(u64::from(d - b'0'))
    }))
}

impl ByteRange {
    /// The answer for a file of `size` bytes.
    fn within(self, size: u64) -> Answer {
        match self {
            ByteRange::From { first, .. } if first >= size => Answer::Unsatisfiable,
            ByteRange::From { first, last } => {
                let last = last.map_or(size - 1, |last| last.min(size - 1));
                Answer::Part {
                    start: first,
                    len: last - first + 1,
                }
            }
            ByteRange::Suffix(0) => Answer::Unsatisfiable,
            // No byte range can name part of an empty file.
            ByteRange::Suffix(_) if size == 0 => Answer::Whole,
            ByteRange::Suffix(n) => {
                let len = n.min(size);
                Answer::Part {
                    start: size - len,
                    len,
                }
            }
        }
    }
}

/// The page of a `get_files` listing that the query asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Page {
    /// The most entries, 1 to [`FilesPlugin::MAX_PAGE`].
    limit: usize,
    /// Only names after this one.
    after: Option<String>,
}

impl Page {
    /// The page from the query's `limit` and `after` (other keys are ignored; a key given
    /// twice counts the last time).
    fn of(query: &[(String, String)]) -> Result<Page, HandlerError> {
        let mut page = Page {
            limit: FilesPlugin::DEFAULT_PAGE,
            after: None,
        };
        for (key, value) in query {
            match key.as_str() {
                "limit" => {
                    page.limit = match number(value) {
                        Some(0) | None => {
                            return Err(HandlerError::new(format!(
                                "limit={value:?}: the limit of a listing is a number from 1 to {}",
                                FilesPlugin::MAX_PAGE
                            ))
                            .with_class("BadQuery")
                            .with_status(400));
                        }
                        Some(n) => usize::try_from(n)
                            .unwrap_or(usize::MAX)
                            .min(FilesPlugin::MAX_PAGE),
                    }
                }
                "after" => page.after = Some(value.clone()).filter(|a| !a.is_empty()),
                _ => {}
            }
        }
        Ok(page)
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
    use futures_util::Stream as _;
    use restpipe_handler::codes;
    use serde_json::{json, Value};

    struct Fixture {
        // Kept alive for the test; removed on drop.
        _dir: tempfile::TempDir,
        root: PathBuf,
        handlers: Handlers,
    }

    /// A root with `hello.txt`, `data.bin` (every byte value, 512 bytes), `sub/inner.csv`,
    /// `sub/deep/`, and `big.pdf` of 2 KiB.
    fn fixture() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        std::fs::create_dir(&root).unwrap();
        std::fs::write(root.join("hello.txt"), "hello\n").unwrap();
        std::fs::write(root.join("data.bin"), all_bytes()).unwrap();
        std::fs::create_dir_all(root.join("sub/deep")).unwrap();
        std::fs::write(root.join("sub/inner.csv"), "a,b\n1,2\n").unwrap();
        std::fs::write(root.join("big.pdf"), vec![b'x'; 2048]).unwrap();
        let plugin = FilesPlugin::new(&root).unwrap();
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
    async fn the_spec_needs_a_root_and_files_are_not_bound_by_the_frame_limit() {
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

        // A frame of 1600 bytes: a file of 100 KB streams whole all the same.
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("large"), vec![b'x'; 100_000]).unwrap();
        let root = dir.path().to_str().unwrap();
        let plugin = SPEC.build(&setup(&[("root", root)], 1600)).unwrap();
        assert_eq!(plugin.name(), "files");
        let handlers = plugin.handlers(Side::Client);
        let request = Request::new("GET", "file").with_parameters(params(&["large"]));
        let reply = handlers
            .call(Context::for_test(Side::Client), request)
            .await
            .unwrap();
        assert_eq!(reply.stream.as_ref().unwrap().length(), Some(100_000));
        assert_eq!(body(reply).await.len(), 100_000);
    }

    fn all_bytes() -> Vec<u8> {
        (0..=255u8).chain((0..=255u8).rev()).collect()
    }

    /// `n` bytes that do not repeat with any short period.
    fn patterned(n: usize) -> Vec<u8> {
        (0..n as u64)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8 ^ (i >> 16) as u8)
            .collect()
    }

    fn params(p: &[&str]) -> Vec<String> {
        p.iter().map(|s| s.to_string()).collect()
    }

    async fn call(
        fx: &Fixture,
        verb: &str,
        noun: &str,
        p: &[&str],
        headers: &[(&str, &str)],
    ) -> Result<Reply, HandlerError> {
        let mut request = Request::new(verb, noun).with_parameters(params(p));
        for (name, value) in headers {
            request.headers.insert(name, *value).unwrap();
        }
        fx.handlers
            .call(Context::for_test(Side::Client), request)
            .await
    }

    async fn get(fx: &Fixture, noun: &str, p: &[&str]) -> Result<Reply, HandlerError> {
        call(fx, "GET", noun, p, &[]).await
    }

    /// `GET file//<p>` with these headers.
    async fn get_file(fx: &Fixture, p: &[&str], headers: &[(&str, &str)]) -> Reply {
        call(fx, "GET", "file", p, headers).await.unwrap()
    }

    /// The whole body of a reply, streamed or not.
    async fn body(mut reply: Reply) -> Vec<u8> {
        reply.collect_body(usize::MAX).await.unwrap().to_vec()
    }

    /// `GET files//<p>?<query>`, as JSON.
    async fn listing(fx: &Fixture, p: &[&str], query: &str) -> Value {
        let mut request = Request::new("GET", "files").with_parameters(params(p));
        request.query = query.into();
        let reply = fx
            .handlers
            .call(Context::for_test(Side::Client), request)
            .await
            .unwrap();
        assert_eq!(reply.content_type, "application/json");
        serde_json::from_slice(&body(reply).await).unwrap()
    }

    async fn refused(fx: &Fixture, noun: &str, p: &[&str]) -> HandlerError {
        let err = get(fx, noun, p).await.unwrap_err();
        assert_eq!(err.class, "PathRefused", "{p:?}: {err}");
        err
    }

    /// 2024-01-02 03:04:05 UTC.
    const JAN_2: u64 = 1_704_164_645;
    const JAN_2_HTTP: &str = "Tue, 02 Jan 2024 03:04:05 GMT";

    fn set_mtime(path: &Path, secs: u64, nanos: u32) {
        let file = std::fs::File::options().write(true).open(path).unwrap();
        file.set_modified(UNIX_EPOCH + Duration::new(secs, nanos))
            .unwrap();
    }

    #[test]
    fn name_handlers_and_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let plugin = FilesPlugin::new(dir.path()).unwrap();
        assert_eq!(plugin.name(), "files");
        assert_eq!(plugin.root(), std::fs::canonicalize(dir.path()).unwrap());
        assert_eq!(FilesPlugin::DEFAULT_PAGE, 1000);
        assert_eq!(FilesPlugin::MAX_PAGE, 10_000);
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
        assert!(reply.body.is_empty());
        assert_eq!(reply.stream.as_ref().unwrap().length(), Some(6));
        assert_eq!(body(reply).await, b"hello\n");
    }

    #[tokio::test]
    async fn reads_a_binary_file_byte_for_byte() {
        let fx = fixture();
        let reply = get(&fx, "file", &["data.bin"]).await.unwrap();
        assert_eq!(reply.content_type, "application/octet-stream");
        assert_eq!(body(reply).await, all_bytes());
    }

    #[tokio::test]
    async fn reads_a_nested_file_and_an_empty_one() {
        let fx = fixture();
        let reply = get(&fx, "file", &["sub", "inner.csv"]).await.unwrap();
        assert_eq!(reply.content_type, "text/csv; charset=utf-8");
        assert_eq!(body(reply).await, b"a,b\n1,2\n");
        std::fs::write(fx.root.join("empty.txt"), "").unwrap();
        let reply = get(&fx, "file", &["empty.txt"]).await.unwrap();
        assert_eq!(reply.stream.as_ref().unwrap().length(), Some(0));
        assert_eq!(body(reply).await, b"");
    }

    #[tokio::test]
    async fn a_large_file_streams_in_chunks_byte_for_byte() {
        let fx = fixture();
        let data = patterned(5 * 1024 * 1024 + 17);
        std::fs::write(fx.root.join("large.bin"), &data).unwrap();
        let mut reply = get(&fx, "file", &["large.bin"]).await.unwrap();
        let mut stream = reply.stream.take().unwrap();
        assert_eq!(stream.length(), Some(data.len() as u64));
        let mut read = Vec::with_capacity(data.len());
        let mut chunks = 0;
        while let Some(chunk) = stream.chunk().await {
            let chunk = chunk.unwrap();
            assert!(!chunk.is_empty() && chunk.len() <= CHUNK, "{}", chunk.len());
            read.extend_from_slice(&chunk);
            chunks += 1;
        }
        assert!(chunks >= data.len() / CHUNK, "{chunks} chunks");
        assert!(read == data, "the bytes differ");
    }

    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn dropping_the_stream_closes_the_file() {
        let fx = fixture();
        let path = fx.root.join("large.bin");
        std::fs::write(&path, patterned(1024 * 1024)).unwrap();
        let open_on_it = || {
            std::fs::read_dir("/proc/self/fd")
                .unwrap()
                .filter_map(|fd| std::fs::read_link(fd.ok()?.path()).ok())
                .filter(|target| *target == path)
                .count()
        };
        let mut reply = get(&fx, "file", &["large.bin"]).await.unwrap();
        let mut stream = reply.stream.take().unwrap();
        assert_eq!(stream.chunk().await.unwrap().unwrap().len(), CHUNK);
        assert_eq!(open_on_it(), 1);
        drop(stream);
        // The read of the next chunk may be in progress on a blocking thread: the file closes
        // when it returns (polled, no event tells it; the bound is far above the aim).
        let started = std::time::Instant::now();
        while open_on_it() != 0 {
            assert!(
                started.elapsed() < std::time::Duration::from_secs(2),
                "the file is still open 2 s after the stream was dropped"
            );
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
        // A HEAD never opens it.
        let reply = call(&fx, "HEAD", "file", &["large.bin"], &[])
            .await
            .unwrap();
        assert_eq!(open_on_it(), 0);
        drop(reply);
    }

    #[tokio::test]
    async fn ranges_give_exactly_their_bytes() {
        let fx = fixture();
        let data = all_bytes();
        for (range, start, end) in [
            ("bytes=0-99", 0, 99),       // the start
            ("bytes=100-199", 100, 199), // the middle
            ("bytes=-50", 462, 511),     // a suffix
            ("bytes=500-", 500, 511),    // open-ended
            ("bytes=511-511", 511, 511), // the last byte
            ("bytes=500-9999", 500, 511),
            ("bytes=-1000", 0, 511),
            ("bytes=0-99999999999999999999999", 0, 511),
            ("BYTES = 3-4", 3, 4),
            ("bytes=7-8,", 7, 8), // an empty list element is no second range
        ] {
            let reply = get_file(&fx, &["data.bin"], &[("range", range)]).await;
            assert_eq!(reply.status, Some(206), "{range}");
            assert_eq!(reply.code, codes::OK);
            assert_eq!(reply.content_type, "application/octet-stream");
            assert_eq!(
                reply.headers.get("content-range"),
                Some(format!("bytes {start}-{end}/512").as_str()),
                "{range}"
            );
            let len = end - start + 1;
            assert_eq!(reply.stream.as_ref().unwrap().length(), Some(len as u64));
            assert_eq!(body(reply).await, &data[start..=end], "{range}");
        }

        // Across chunks of a large file.
        let large = patterned(3 * CHUNK + 5);
        std::fs::write(fx.root.join("large.bin"), &large).unwrap();
        for (start, end) in [(CHUNK - 6, 2 * CHUNK + 9), (3 * CHUNK, 3 * CHUNK + 4)] {
            let range = format!("bytes={start}-{end}");
            let reply = get_file(&fx, &["large.bin"], &[("range", &range)]).await;
            assert_eq!(reply.status, Some(206));
            assert!(body(reply).await == large[start..=end], "{range}");
        }
    }

    #[tokio::test]
    async fn a_range_past_the_end_is_416() {
        let fx = fixture();
        std::fs::write(fx.root.join("empty.txt"), "").unwrap();
        for (file, range, size) in [
            ("data.bin", "bytes=512-", 512),
            ("data.bin", "bytes=1000-2000", 512),
            ("data.bin", "bytes=-0", 512),
            ("data.bin", "bytes=99999999999999999999999-", 512),
            ("empty.txt", "bytes=0-", 0),
        ] {
            let reply = get_file(&fx, &[file], &[("range", range)]).await;
            assert_eq!(reply.status, Some(416), "{range}");
            assert_eq!(
                reply.headers.get("content-range"),
                Some(format!("bytes */{size}").as_str())
            );
            assert!(reply.headers.get("etag").is_some());
            assert!(reply.stream.is_none());
        }
        // The last bytes of an empty file: the empty file.
        let reply = get_file(&fx, &["empty.txt"], &[("range", "bytes=-5")]).await;
        assert_eq!(reply.status, None);
        assert_eq!(body(reply).await, b"");
    }

    #[tokio::test]
    async fn several_ranges_or_a_malformed_one_give_the_whole_file() {
        let fx = fixture();
        for range in [
            "bytes=0-1,5-6",
            "bytes=0-1, 600-700",
            "bytes=5-1",
            "bytes=a-b",
            "bytes=1-2-3",
            "bytes=-",
            "bytes=",
            "bytes= ",
            "bytes 0-1",
            "items=0-1",
            "bytes=+1-2",
            "bytes=0x10-",
            "=0-1",
        ] {
            let reply = get_file(&fx, &["data.bin"], &[("range", range)]).await;
            assert_eq!(reply.status, None, "{range}");
            assert!(reply.headers.get("content-range").is_none());
            assert_eq!(body(reply).await, all_bytes(), "{range}");
        }
        let long = format!("bytes={}", "0-1,".repeat(400));
        let reply = get_file(&fx, &["data.bin"], &[("range", &long)]).await;
        assert_eq!(reply.status, None);
    }

    #[tokio::test]
    async fn etag_and_last_modified_are_on_every_reply_and_stable() {
        let fx = fixture();
        let path = fx.root.join("data.bin");
        set_mtime(&path, JAN_2, 500);
        let first = get_file(&fx, &["data.bin"], &[]).await;
        let etag = first.headers.get("etag").unwrap().to_string();
        assert!(etag.starts_with('"') && etag.ends_with('"') && etag.len() > 2);
        assert!(!etag[1..etag.len() - 1].contains('"'), "{etag}");
        assert_eq!(first.headers.get("last-modified"), Some(JAN_2_HTTP));
        let again = get_file(&fx, &["data.bin"], &[]).await;
        assert_eq!(again.headers, first.headers);

        for headers in [
            &[("range", "bytes=0-0")][..],
            &[("range", "bytes=600-")],
            &[("if-none-match", &etag)],
        ] {
            let reply = get_file(&fx, &["data.bin"], headers).await;
            assert_eq!(
                reply.headers.get("etag"),
                Some(etag.as_str()),
                "{headers:?}"
            );
            assert_eq!(reply.headers.get("last-modified"), Some(JAN_2_HTTP));
        }
        let head = call(&fx, "HEAD", "file", &["data.bin"], &[]).await.unwrap();
        assert_eq!(head.headers, first.headers);

        // Another modification time, even within the same second, is another tag.
        set_mtime(&path, JAN_2, 501);
        let touched = get_file(&fx, &["data.bin"], &[]).await;
        assert_ne!(touched.headers.get("etag"), Some(etag.as_str()));
        assert_eq!(touched.headers.get("last-modified"), Some(JAN_2_HTTP));
        // And so is another size at the same time.
        std::fs::write(&path, b"shorter").unwrap();
        set_mtime(&path, JAN_2, 500);
        let rewritten = get_file(&fx, &["data.bin"], &[]).await;
        assert_ne!(rewritten.headers.get("etag"), Some(etag.as_str()));
        // And another file of the same size and time.
        std::fs::write(fx.root.join("twin.bin"), b"shorter").unwrap();
        set_mtime(&fx.root.join("twin.bin"), JAN_2, 500);
        let twin = get_file(&fx, &["twin.bin"], &[]).await;
        assert_ne!(twin.headers.get("etag"), rewritten.headers.get("etag"));
    }

    #[tokio::test]
    async fn a_time_before_1970_has_a_tag_but_no_date() {
        let fx = fixture();
        let path = fx.root.join("hello.txt");
        let file = std::fs::File::options().write(true).open(&path).unwrap();
        if file
            .set_modified(UNIX_EPOCH - Duration::from_secs(86_400))
            .is_err()
        {
            return; // a file system that cannot store it
        }
        let reply = get_file(&fx, &["hello.txt"], &[("if-modified-since", JAN_2_HTTP)]).await;
        assert_eq!(reply.status, None);
        // The tag keeps the sign of a time before 1970: `...-<size>--<seconds>.<nanos>"`.
        assert!(reply.headers.get("etag").unwrap().contains("--"));
        assert_eq!(reply.headers.get("last-modified"), None);
        assert_eq!(body(reply).await, b"hello\n");
    }

    #[tokio::test]
    async fn if_none_match_the_etag_is_304() {
        let fx = fixture();
        set_mtime(&fx.root.join("data.bin"), JAN_2, 0);
        let etag = get_file(&fx, &["data.bin"], &[])
            .await
            .headers
            .get("etag")
            .unwrap()
            .to_string();
        for value in [
            etag.clone(),
            format!("W/{etag}"),
            format!("\"other\", {etag}"),
            format!("W/\"a,b\" ,\t{etag} , \"c\""),
            "*".to_string(),
            " * ".to_string(),
        ] {
            let reply = get_file(&fx, &["data.bin"], &[("if-none-match", &value)]).await;
            assert_eq!(reply.status, Some(304), "{value}");
            assert_eq!(reply.code, codes::OK);
            assert!(reply.stream.is_none() && reply.body.is_empty());
            assert_eq!(reply.headers.get("etag"), Some(etag.as_str()));
            assert_eq!(reply.headers.get("last-modified"), Some(JAN_2_HTTP));
            // HEAD too.
            let headers = [("if-none-match", value.as_str())];
            let head = call(&fx, "HEAD", "file", &["data.bin"], &headers).await;
            assert_eq!(head.unwrap().status, Some(304));
        }
        let unquoted = etag.trim_matches('"').to_string();
        for value in [
            "\"other\"".to_string(),
            unquoted.clone(),
            format!("{unquoted}, {etag}"), // the list stops at what does not parse
            format!("\"{unquoted}"),
            etag[..etag.len() - 1].to_string(), // no closing quote
            "**".to_string(),
            String::new(),
        ] {
            let reply = get_file(&fx, &["data.bin"], &[("if-none-match", &value)]).await;
            assert_eq!(reply.status, None, "{value}");
            assert_eq!(body(reply).await, all_bytes());
        }
    }

    #[tokio::test]
    async fn if_modified_since_the_last_change_is_304() {
        let fx = fixture();
        set_mtime(&fx.root.join("data.bin"), JAN_2, 999_999_999);
        for (since, status) in [
            (JAN_2_HTTP, Some(304)),
            ("Tue, 02 Jan 2024 03:04:06 GMT", Some(304)),
            ("Tuesday, 02-Jan-24 03:04:05 GMT", Some(304)),
            ("Tue, 02 Jan 2024 03:04:04 GMT", None),
            ("Mon, 01 Jan 2024 00:00:00 GMT", None),
            ("yesterday", None),
            ("", None),
        ] {
            let reply = get_file(&fx, &["data.bin"], &[("if-modified-since", since)]).await;
            assert_eq!(reply.status, status, "{since}");
            assert_eq!(reply.headers.get("last-modified"), Some(JAN_2_HTTP));
        }
        // An If-None-Match that does not match wins over the date.
        let reply = get_file(
            &fx,
            &["data.bin"],
            &[
                ("if-none-match", "\"other\""),
                ("if-modified-since", JAN_2_HTTP),
            ],
        )
        .await;
        assert_eq!(reply.status, None);
        assert_eq!(body(reply).await, all_bytes());
    }

    #[tokio::test]
    async fn if_range_that_does_not_match_gives_the_whole_file() {
        let fx = fixture();
        set_mtime(&fx.root.join("data.bin"), JAN_2, 0);
        let etag = get_file(&fx, &["data.bin"], &[])
            .await
            .headers
            .get("etag")
            .unwrap()
            .to_string();
        for (if_range, status) in [
            (etag.as_str(), Some(206)),
            (JAN_2_HTTP, Some(206)),
            ("\"other\"", None),
            (&*format!("W/{etag}"), None), // a weak tag never matches
            ("Tue, 02 Jan 2024 03:04:06 GMT", None),
            ("Tue, 02 Jan 2024 03:04:04 GMT", None),
            ("garbage", None),
        ] {
            let reply = get_file(
                &fx,
                &["data.bin"],
                &[("range", "bytes=0-9"), ("if-range", if_range)],
            )
            .await;
            assert_eq!(reply.status, status, "{if_range}");
            let expected = if status.is_some() {
                &all_bytes()[..10]
            } else {
                &all_bytes()[..]
            };
            assert_eq!(body(reply).await, expected, "{if_range}");
        }
        // If-Range alone changes nothing.
        let reply = get_file(&fx, &["data.bin"], &[("if-range", "\"other\"")]).await;
        assert_eq!(reply.status, None);
    }

    #[test]
    fn a_date_is_a_strong_validator_a_second_after_the_change() {
        let modified = UNIX_EPOCH + Duration::from_secs(JAN_2);
        let validators = Validators {
            etag: "\"x\"".into(),
            modified: Some(modified),
        };
        let just_after = modified + Duration::from_millis(999);
        assert!(!if_range_holds(JAN_2_HTTP, &validators, just_after));
        let later = modified + Duration::from_secs(1);
        assert!(if_range_holds(JAN_2_HTTP, &validators, later));
        assert!(if_range_holds("\"x\"", &validators, just_after));
        assert!(!if_range_holds("W/\"x\"", &validators, later));
        let undated = Validators {
            modified: None,
            ..validators
        };
        assert!(!if_range_holds(JAN_2_HTTP, &undated, later));
    }

    #[tokio::test]
    async fn head_tells_the_length_and_reads_nothing() {
        let fx = fixture();
        let whole = get_file(&fx, &["data.bin"], &[]).await;
        let mut head = call(&fx, "HEAD", "file", &["data.bin"], &[]).await.unwrap();
        assert_eq!(head.status, whole.status);
        assert_eq!(head.content_type, whole.content_type);
        assert_eq!(head.headers, whole.headers);
        let mut stream = head.stream.take().unwrap();
        assert_eq!(stream.length(), Some(512));
        // Nothing was read: the stream ends at once (the node sends no body for a HEAD).
        assert!(stream.chunk().await.is_none());

        // Range is for GET only: a HEAD answers for the whole file.
        let headers = [("range", "bytes=0-9")];
        let head = call(&fx, "HEAD", "file", &["data.bin"], &headers).await;
        let head = head.unwrap();
        assert_eq!(head.status, None);
        assert!(head.headers.get("content-range").is_none());
        assert_eq!(head.stream.as_ref().unwrap().length(), Some(512));

        // The same refusals as GET.
        let err = call(&fx, "HEAD", "file", &["sub"], &[]).await.unwrap_err();
        assert_eq!((err.class.as_str(), err.status), ("NotAFile", Some(400)));
        let err = call(&fx, "HEAD", "file", &[".."], &[]).await.unwrap_err();
        assert_eq!((err.class.as_str(), err.status), ("PathRefused", Some(400)));
        let err = call(&fx, "HEAD", "file", &["nope"], &[]).await.unwrap_err();
        assert_eq!((err.class.as_str(), err.status), ("NotFound", Some(404)));

        // A file this process may not read: GET opens it and fails, HEAD does not open it.
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let path = fx.root.join("locked.bin");
            std::fs::write(&path, b"locked").unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o000)).unwrap();
            // (Skipped when the tests run with the privilege to open it anyway.)
            if std::fs::File::open(&path).is_err() {
                let err = get(&fx, "file", &["locked.bin"]).await.unwrap_err();
                assert_eq!(err.status, Some(403));
                let head = call(&fx, "HEAD", "file", &["locked.bin"], &[])
                    .await
                    .unwrap();
                assert_eq!(head.stream.as_ref().unwrap().length(), Some(6));
            }
        }
    }

    #[test]
    fn range_values_parse_bounded() {
        use ByteRange::{From, Suffix};
        for (value, range) in [
            (
                "bytes=0-9",
                Some(From {
                    first: 0,
                    last: Some(9),
                }),
            ),
            (
                "bytes=10-",
                Some(From {
                    first: 10,
                    last: None,
                }),
            ),
            ("bytes=-10", Some(Suffix(10))),
            (
                "bytes=5-5",
                Some(From {
                    first: 5,
                    last: Some(5),
                }),
            ),
            (
                " Bytes=1-2 ",
                Some(From {
                    first: 1,
                    last: Some(2),
                }),
            ),
            ("bytes=-99999999999999999999", Some(Suffix(u64::MAX))),
            ("bytes=5-4", None),
            ("bytes=1-2,3-4", None),
            ("bytes=-", None),
            ("bytes=1", None),
            ("bytes=1-2-", None),
            ("bytes=--1", None),
            ("bytes=١-٢", None), // not ASCII digits
            ("bytes", None),
            ("chars=1-2", None),
        ] {
            assert_eq!(parse_range(value), range, "{value}");
        }
        assert_eq!(
            Suffix(u64::MAX).within(10),
            Answer::Part { start: 0, len: 10 }
        );
        assert_eq!(
            From {
                first: 9,
                last: None
            }
            .within(10),
            Answer::Part { start: 9, len: 1 }
        );
        assert_eq!(
            From {
                first: 10,
                last: None
            }
            .within(10),
            Answer::Unsatisfiable
        );
        assert_eq!(Suffix(0).within(10), Answer::Unsatisfiable);
        assert_eq!(Suffix(3).within(0), Answer::Whole);
    }

    #[test]
    fn chunks_of_a_listing_are_bounded() {
        let bytes = Bytes::from(vec![1u8; 2 * CHUNK + 1]);
        let stream = chunks_of(bytes);
        assert_eq!(stream.length(), Some(2 * CHUNK as u64 + 1));
        assert_eq!(stream.size_hint(), (3, Some(3)));
        assert_eq!(chunks_of(Bytes::new()).size_hint(), (0, Some(0)));
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
        let reply = get_file(&fx, &["data.bin"], &[("range", "bytes=999-")]).await;
        assert!(!String::from_utf8_lossy(&body(reply).await).contains(&root));
    }

    #[tokio::test]
    async fn get_file_of_a_directory_or_nothing_is_400() {
        let fx = fixture();
        let err = get(&fx, "file", &["sub"]).await.unwrap_err();
        assert_eq!((err.class.as_str(), err.status), ("NotAFile", Some(400)));
        assert!(err.message.contains("get_files"), "{err}");
        let err = get(&fx, "file", &[]).await.unwrap_err();
        assert_eq!((err.class.as_str(), err.status), ("PathRefused", Some(400)));
    }

    #[tokio::test]
    async fn lists_the_root_sorted() {
        let fx = fixture();
        assert_eq!(
            listing(&fx, &[], "").await,
            json!({
                "path": "",
                "entries": [
                    {"name": "big.pdf", "type": "file", "size": 2048},
                    {"name": "data.bin", "type": "file", "size": 512},
                    {"name": "hello.txt", "type": "file", "size": 6},
                    {"name": "sub", "type": "dir", "size": 0},
                ],
                "next": null
            })
        );
    }

    #[tokio::test]
    async fn lists_a_subdirectory() {
        let fx = fixture();
        assert_eq!(
            listing(&fx, &["sub"], "").await,
            json!({
                "path": "sub",
                "entries": [
                    {"name": "deep", "type": "dir", "size": 0},
                    {"name": "inner.csv", "type": "file", "size": 8},
                ],
                "next": null
            })
        );
        assert_eq!(
            listing(&fx, &["sub", "deep"], "").await,
            json!({"path": "sub/deep", "entries": [], "next": null})
        );
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

    /// A directory `many` of 25 files, `f-00` to `f-24`, of 0 to 24 bytes, created out of
    /// order.
    fn many(fx: &Fixture) -> Vec<String> {
        let many = fx.root.join("many");
        std::fs::create_dir(&many).unwrap();
        let mut names = Vec::new();
        for i in (0..25).map(|i| (i * 7) % 25) {
            std::fs::write(many.join(format!("f-{i:02}")), vec![b'x'; i]).unwrap();
            names.push(format!("f-{i:02}"));
        }
        names.sort();
        names
    }

    #[tokio::test]
    async fn a_listing_pages_through_every_entry_once() {
        let fx = fixture();
        let names = many(&fx);
        let mut seen = Vec::new();
        let mut after: Option<String> = None;
        let mut pages = Vec::new();
        loop {
            let query = match &after {
                Some(a) => format!("limit=10&after={a}"),
                None => "limit=10".into(),
            };
            let page = listing(&fx, &["many"], &query).await;
            let entries = page["entries"].as_array().unwrap();
            pages.push(entries.len());
            for e in entries {
                let name = e["name"].as_str().unwrap().to_string();
                let size: usize = name[2..].parse().unwrap();
                assert_eq!(e["type"], "file");
                assert_eq!(e["size"], size);
                seen.push(name);
            }
            assert_eq!(page["path"], "many");
            match &page["next"] {
                Value::Null => break,
                Value::String(next) => {
                    assert_eq!(Some(next), seen.last());
                    after = Some(next.clone());
                }
                other => panic!("next is {other}"),
            }
        }
        assert_eq!(pages, [10, 10, 5]);
        assert_eq!(seen, names);

        // A page that ends exactly at the last entry says so.
        let page = listing(&fx, &["many"], "limit=25").await;
        assert_eq!(page["entries"].as_array().unwrap().len(), 25);
        assert_eq!(page["next"], Value::Null);
        let page = listing(&fx, &["many"], "limit=5&after=f-19").await;
        assert_eq!(page["entries"].as_array().unwrap().len(), 5);
        assert_eq!(page["next"], Value::Null);
        // One by one, and after a name that is not there.
        let page = listing(&fx, &["many"], "limit=1&after=f-07x").await;
        assert_eq!(
            page["entries"],
            json!([{"name": "f-08", "type": "file", "size": 8}])
        );
        assert_eq!(page["next"], "f-08");
        // After the last name: nothing more.
        let page = listing(&fx, &["many"], "after=f-24").await;
        assert_eq!(page["entries"], json!([]));
        assert_eq!(page["next"], Value::Null);
        // The default page holds them all.
        let page = listing(&fx, &["many"], "").await;
        assert_eq!(page["entries"].as_array().unwrap().len(), 25);
    }

    #[tokio::test]
    async fn a_cursor_with_odd_characters_is_decoded() {
        let fx = fixture();
        let dir = fx.root.join("odd");
        std::fs::create_dir(&dir).unwrap();
        for name in ["a b", "a+b", "a&b", "é"] {
            std::fs::write(dir.join(name), "").unwrap();
        }
        let names = |page: &Value| -> Vec<String> {
            let entries = page["entries"].as_array().unwrap();
            entries
                .iter()
                .map(|e| e["name"].as_str().unwrap().into())
                .collect()
        };
        let page = listing(&fx, &["odd"], "limit=2").await;
        assert_eq!(names(&page), ["a b", "a&b"]);
        assert_eq!(page["next"], "a&b");
        let page = listing(&fx, &["odd"], "limit=2&after=a%26b").await;
        assert_eq!(names(&page), ["a+b", "é"]);
        let page = listing(&fx, &["odd"], "after=a%2Bb").await;
        assert_eq!(names(&page), ["é"]);
    }

    #[test]
    fn the_limit_of_a_page_is_bounded() {
        let pairs = |q: &str| {
            let mut r = Request::new("GET", "files");
            r.query = q.into();
            r.query_pairs()
        };
        let page = |q: &str| Page::of(&pairs(q));
        let limit = |q: &str| page(q).unwrap().limit;
        assert_eq!(limit(""), FilesPlugin::DEFAULT_PAGE);
        assert_eq!(limit("limit=1"), 1);
        assert_eq!(limit("limit=10000"), 10_000);
        assert_eq!(limit("limit=10001"), FilesPlugin::MAX_PAGE);
        assert_eq!(
            limit("limit=99999999999999999999999999"),
            FilesPlugin::MAX_PAGE
        );
        assert_eq!(limit("limit=5&limit=7&other=x"), 7);
        for bad in [
            "limit=0",
            "limit=",
            "limit=x",
            "limit=-1",
            "limit=+5",
            "limit=1.5",
        ] {
            let err = page(bad).unwrap_err();
            assert_eq!(
                (err.class.as_str(), err.status),
                ("BadQuery", Some(400)),
                "{bad}"
            );
        }
        assert_eq!(page("after=").unwrap().after, None);
        assert_eq!(page("after=x%20y").unwrap().after.as_deref(), Some("x y"));
    }

    #[tokio::test]
    async fn a_bad_limit_is_400() {
        let fx = fixture();
        let mut request = Request::new("GET", "files");
        request.query = "limit=0".into();
        let err = fx
            .handlers
            .call(Context::for_test(Side::Client), request)
            .await
            .unwrap_err();
        assert_eq!((err.class.as_str(), err.status), ("BadQuery", Some(400)));
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
            // HEAD too.
            let err = call(&fx, "HEAD", noun, p, &[]).await.unwrap_err();
            assert_eq!(err.status, Some(403), "HEAD {noun} {p:?}");
        }

        // The listing shows the links, but not what lies outside.
        let value = listing(&fx, &[], "").await;
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
        assert_eq!(body(reply).await, b"a,b\n1,2\n");
        let reply = get(&fx, "file", &["linkdir", "inner.csv"]).await.unwrap();
        assert_eq!(body(reply).await, b"a,b\n1,2\n");
        let reply = get(&fx, "file", &["sub", "up.txt"]).await.unwrap();
        assert_eq!(body(reply).await, b"hello\n");
        // The content type follows the name of the file the link points to.
        symlink("sub/inner.csv", fx.root.join("current")).unwrap();
        let reply = get(&fx, "file", &["current"]).await.unwrap();
        assert_eq!(reply.content_type, "text/csv; charset=utf-8");
        // The validators are the target's.
        let target = get_file(&fx, &["sub", "inner.csv"], &[]).await;
        assert_eq!(reply.headers, target.headers);

        let value = listing(&fx, &[], "").await;
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
        assert_eq!(body(reply).await, b"hello\n");
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
        for verb in ["GET", "HEAD"] {
            let err = call(&fx, verb, "file", &["pipe"], &[]).await.unwrap_err();
            assert_eq!((err.class.as_str(), err.status), ("NotAFile", Some(400)));
        }
        // Were it swapped in after the check, the open neither blocks nor serves it.
        let opened = open_regular(&fx.root.join("pipe"), true).unwrap();
        assert!(matches!(opened, Opened::NotAFile { dir: false }));
        let value = listing(&fx, &[], "").await;
        let entries = value["entries"].as_array().unwrap();
        let pipe = entries.iter().find(|e| e["name"] == "pipe").unwrap();
        assert_eq!(pipe["type"], "other");
    }
}
