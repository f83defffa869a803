//! The files handler's path check: arbitrary parameter lists (the input split on `\n`, at most
//! eight) through `get_file` and `get_files` of a `FilesPlugin` over a temporary root. The
//! root holds files, a directory, links that stay inside and links that leave it (to a
//! sibling directory with a secret, to `/etc`, to `..`, in a loop, dangling).
//!
//! Properties: no panic; an accepted request names only plain segments (not empty, not `.` or
//! `..`, no `/`, `\` or NUL), and the path it names, resolved by the operating system, is
//! inside the root; no reply carries the secret; no error message shows the root's absolute
//! path (unless the input itself spells them out: replies and errors echo the parameters).

#![no_main]

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use restpipe_handler::{Context, Handlers, Plugin, Request, Side};
use restpipe_handler_files::FilesPlugin;

const SECRET: &str = "OUTSIDE-SECRET-7f3a";

struct Fixture {
    /// The directory that holds the root and what lies outside it; never removed (the
    /// process ends by exiting), a few bytes under the temporary directory.
    outer: PathBuf,
    root: PathBuf,
    handlers: Handlers,
    runtime: tokio::runtime::Runtime,
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let outer = tempfile::Builder::new()
            .prefix("restpipe-fuzz-files-")
            .tempdir()
            .expect("a temporary directory")
            .keep();
        let outer = std::fs::canonicalize(outer).expect("canonical");
        let root = outer.join("root");
        let write = |p: &Path, s: &str| std::fs::write(p, s).expect("write");
        let mkdir = |p: &Path| std::fs::create_dir_all(p).expect("mkdir");
        mkdir(&root.join("sub/deep"));
        mkdir(&outer.join("secretdir"));
        write(&outer.join("secret.txt"), SECRET);
        write(&outer.join("secretdir/x.txt"), SECRET);
        write(&root.join("hello.txt"), "inside hello\n");
        write(&root.join("sub/inner.csv"), "a,b\n1,2\n");
        write(&root.join("sub/deep/d.json"), "{}");
        #[cfg(unix)]
        {
            use std::os::unix::fs::symlink;
            let link = |target: &str, at: &str| symlink(target, root.join(at)).expect("symlink");
            link("sub/inner.csv", "link.csv");
            link("sub", "linkdir");
            link("../hello.txt", "sub/up.txt");
            link("/etc", "etc");
            link(
                outer.join("secret.txt").to_str().expect("utf-8"),
                "secret.txt",
            );
            link("../../secret.txt", "sub/relative-secret.txt");
            link("../secretdir", "outdir");
            link("..", "up");
            link("loop", "loop");
            link("nowhere", "dangling");
        }
        let handlers = FilesPlugin::new(&root)
            .expect("the root exists")
            .handlers(Side::Client);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("a runtime");
        Fixture {
            outer,
            root,
            handlers,
            runtime,
        }
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let parameters: Vec<String> = text.split('\n').take(8).map(str::to_string).collect();
    let fx = fixture();
    for noun in ["file", "files"] {
        let request = Request::new("GET", noun).with_parameters(parameters.clone());
        let result = fx
            .runtime
            .block_on(fx.handlers.call(Context::for_test(Side::Client), request));
        match result {
            Ok(mut reply) => {
                for p in &parameters {
                    assert!(
                        !p.is_empty() && p != "." && p != ".." && !p.contains(['/', '\\', '\0']),
                        "{noun} accepted the parameter {p:?} in {parameters:?}"
                    );
                }
                let named = fx.root.join(parameters.join("/"));
                let resolved = std::fs::canonicalize(&named).expect("an accepted path exists");
                assert!(
                    resolved.starts_with(&fx.root),
                    "{noun} {parameters:?} resolves to {resolved:?}, outside the root"
                );
                // A file's reply is a stream (a listing's too): read it whole.
                let body = fx
                    .runtime
                    .block_on(reply.collect_body(usize::MAX))
                    .expect("an accepted reply reads whole");
                let body = String::from_utf8_lossy(&body);
                // (Replies and errors echo the parameters: a secret or a root the input
                // itself spells out proves nothing.)
                assert!(
                    text.contains(SECRET) || !body.contains(SECRET),
                    "{noun} {parameters:?} read the secret"
                );
            }
            Err(err) => {
                let outer = fx.outer.to_string_lossy();
                assert!(
                    text.contains(&*outer) || !err.message.contains(&*outer),
                    "{noun} {parameters:?}: the error shows the root: {}",
                    err.message
                );
                assert!(text.contains(SECRET) || !err.message.contains(SECRET));
            }
        }
    }
});
