//! The `restpipe` command as a user runs it: the demo and the curl lines it prints, start-up
//! errors that are one clear line, and a server and a client as two real processes talking
//! over certificate files. Each child is stopped with SIGTERM and must exit 0.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use reqwest::StatusCode;
use restpipe_certs::{write_dev_set, DevOutcome, DevPaths, DEV_CLIENT_IDENTITY};
use restpipe_testkit::procs::{log_field, READY_LINE};
use restpipe_testkit::wait::{wait_until_async, within};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio::process::{Child, Command};

const BIN: &str = env!("CARGO_BIN_EXE_restpipe");

/// The command with a clean environment (no `RP_*`, `DEBUG` or `RUST_LOG` from the caller)
/// run in `dir`, so that no default `certs/` directory is found by accident.
fn restpipe(dir: &Path) -> Command {
    let mut command = Command::new(BIN);
    command
        .env_clear()
        .current_dir(dir)
        .stdin(Stdio::null())
        .kill_on_drop(true);
    command
}

fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap()
}

fn now_secs() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// Send SIGTERM to `child`, as `kill -TERM <pid>` does.
fn terminate(child: &Child) {
    let pid = child.id().expect("the child is still running");
    let status = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success(), "kill -TERM {pid} failed");
}

/// Wait (at most 10 s) for `child` to exit after SIGTERM and assert it exited 0.
async fn assert_exits_cleanly(child: &mut Child, what: &str) {
    let status = within(Duration::from_secs(10), what, child.wait())
        .await
        .unwrap();
    assert!(status.success(), "{what} exited with {status}");
}

/// Collect everything the child writes on stderr, to show it when a test fails.
/// Start `restpipe demo` on ports 0 with `env`, and read its output until its instructions
/// end ("Ctrl-C stops both."). Returns the child, its stderr (collected until it exits) and
/// what it printed. Fails the test if the demo ends first.
async fn start_demo(
    dir: &std::path::Path,
    env: &[(&str, &str)],
) -> (Child, tokio::task::JoinHandle<String>, String) {
    let mut command = restpipe(dir);
    for (key, value) in env {
        command.env(key, value);
    }
    let mut child = command
        .args([
            "demo",
            "--client-http",
            "127.0.0.1:0",
            "--server-http",
            "127.0.0.1:0",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = collect_stderr(&mut child);
    let mut stdout = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut printed = String::new();
    let finished = within(Duration::from_secs(30), "the demo's instructions", async {
        while let Some(line) = stdout.next_line().await.unwrap() {
            printed.push_str(&line);
            printed.push('\n');
            if line.trim() == "Ctrl-C stops both." {
                return true;
            }
        }
        false
    })
    .await;
    if !finished {
        child.kill().await.unwrap();
        panic!(
            "the demo ended before its instructions:\n{printed}\nstderr:\n{}",
            stderr.await.unwrap()
        );
    }
    (child, stderr, printed)
}

fn collect_stderr(child: &mut Child) -> tokio::task::JoinHandle<String> {
    let mut stderr = child.stderr.take().unwrap();
    tokio::spawn(async move {
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text).await;
        text
    })
}

async fn get(url: &str) -> reqwest::Response {
    within(Duration::from_secs(30), url, http().get(url).send())
        .await
        .unwrap_or_else(|e| panic!("GET {url}: {e}"))
}

async fn get_json(url: &str) -> Value {
    let response = get(url).await;
    assert_eq!(response.status(), StatusCode::OK, "GET {url}");
    assert_eq!(
        response.headers()["x-event-return-code"],
        "0",
        "GET {url} crossed the pipe"
    );
    response.json().await.unwrap()
}

// ----------------------------------------------------------------------------------------
// restpipe demo

/// One `curl` line the demo printed.
#[derive(Debug)]
struct CurlLine {
    line: String,
    url: String,
    /// `-i`: the user wants to see the status, which the comment states.
    shows_status: bool,
    /// `-d 'data'`: a POST with this body.
    data: Option<String>,
    comment: String,
}

fn parse_curl_line(line: &str) -> Option<CurlLine> {
    let line = line.trim();
    let rest = line.strip_prefix("curl ")?;
    let (command, comment) = rest.split_once('#').unwrap_or((rest, ""));
    let words: Vec<&str> = command.split_whitespace().collect();
    let url = words
        .iter()
        .find(|w| w.starts_with("http://"))
        .unwrap_or_else(|| panic!("no URL in {line:?}"));
    let mut data = None;
    let mut words_left = words.iter();
    while let Some(word) = words_left.next() {
        if *word == "-d" {
            let value = words_left
                .next()
                .unwrap_or_else(|| panic!("-d without data in {line:?}"));
            data = Some(value.trim_matches('\'').to_string());
            continue;
        }
        // `-N`: no buffering, for an event stream.
        assert!(
            word.starts_with("http://") || *word == "-i" || *word == "-N",
            "option {word:?} in {line:?} is not handled by this test"
        );
    }
    Some(CurlLine {
        line: line.to_string(),
        url: url.to_string(),
        shows_status: words.contains(&"-i"),
        data,
        comment: comment.trim().to_string(),
    })
}

/// Run one curl line as the user would and check what it answers.
async fn check_curl_line(curl: &CurlLine) {
    let url = curl.url.as_str();
    if curl.shows_status {
        // The comment says what to expect: "404, X-Event-Return-Code: 255" or "400".
        let expected: u16 = curl
            .comment
            .split(|c: char| !c.is_ascii_digit())
            .find(|w| !w.is_empty())
            .unwrap_or_else(|| panic!("no status in the comment of {:?}", curl.line))
            .parse()
            .unwrap();
        let response = get(url).await;
        assert_eq!(response.status().as_u16(), expected, "{}", curl.line);
        let code = response
            .headers()
            .get("x-event-return-code")
            .map(|v| v.to_str().unwrap().to_string());
        match curl.comment.split_once("X-Event-Return-Code:") {
            Some((_, promised)) => {
                assert_eq!(code.as_deref(), Some(promised.trim()), "{}", curl.line)
            }
            None => assert_eq!(code, None, "{}", curl.line),
        }
        let body: Value = response.json().await.unwrap();
        assert!(body["error"].is_string(), "{}: {body}", curl.line);
        return;
    }
    let path = url.splitn(4, '/').nth(3).map(|p| format!("/{p}")).unwrap();
    match path.as_str() {
        "/server/time" => {
            let body = get_json(url).await;
            let time = body["time_from_server"].as_f64().expect("time_from_server");
            assert!((time - now_secs()).abs() < 60.0, "{body}");
        }
        "/server/cat//hello%20/world" => {
            assert_eq!(
                get_json(url).await,
                json!({ "result_from_server": "hello world" })
            );
        }
        "/client/dev-client/time" => {
            let body = get_json(url).await;
            let time = body["time_from_client"].as_f64().expect("time_from_client");
            assert!((time - now_secs()).abs() < 60.0, "{body}");
        }
        "/client/dev-client/files//" => {
            let body = get_json(url).await;
            let names: Vec<&str> = body["entries"]
                .as_array()
                .unwrap()
                .iter()
                .map(|e| e["name"].as_str().unwrap())
                .collect();
            assert_eq!(names, ["hello.txt", "reports"], "{body}");
        }
        "/client/dev-client/file//reports/q3.csv" => {
            let response = get(url).await;
            assert_eq!(response.status(), StatusCode::OK);
            assert_eq!(response.headers()["x-event-return-code"], "0");
            assert_eq!(response.text().await.unwrap(), "quarter,revenue\nq3,42\n");
        }
        "/clients" => {
            let response = get(url).await;
            assert_eq!(response.status(), StatusCode::OK);
            let body: Value = response.json().await.unwrap();
            assert_eq!(body[0]["identity"], DEV_CLIENT_IDENTITY, "{body}");
        }
        "/events/news/**" => {
            let mut response = get(url).await;
            assert_eq!(response.status(), StatusCode::OK);
            assert_eq!(response.headers()["content-type"], "text/event-stream");
            let first = within(Duration::from_secs(10), url, response.chunk())
                .await
                .unwrap()
                .unwrap();
            assert!(first.starts_with(b": connected"), "{first:?}");
        }
        "/publish/news/today" => {
            let data = curl.data.clone().expect("the publish line sends data");
            let response = within(
                Duration::from_secs(30),
                url,
                http().post(url).body(data).send(),
            )
            .await
            .unwrap();
            assert_eq!(response.status(), StatusCode::ACCEPTED, "{}", curl.line);
            let body: Value = response.json().await.unwrap();
            assert!(body["id"].is_string(), "{body}");
        }
        "/status" => {
            let response = get(url).await;
            assert_eq!(response.status(), StatusCode::OK);
            let body: Value = response.json().await.unwrap();
            assert_eq!(body["role"], "client", "{body}");
            assert_eq!(body["connected"], true, "{body}");
            assert_eq!(body["peers"][0]["identity"], "localhost", "{body}");
        }
        other => panic!(
            "the demo prints {:?} ({other}), which this test does not know",
            curl.line
        ),
    }
}

/// `restpipe demo` on ports chosen by the system prints curl lines with the real ports;
/// every one of them answers what it promises; SIGTERM stops the demo with exit code 0.
#[tokio::test]
async fn demo_prints_curl_lines_that_work_and_stops_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let (mut child, stderr, printed) = start_demo(dir.path(), &[("RP_STATSD_HOST", "")]).await;
    let curls: Vec<_> = printed.lines().filter_map(parse_curl_line).collect();
    assert!(curls.len() >= 9, "too few curl lines:\n{printed}");
    // RP_STATSD_HOST is empty: the demo says its metrics are off.
    assert!(
        printed.lines().any(|l| l.starts_with("Metrics: off")),
        "{printed}"
    );
    for curl in &curls {
        assert!(!curl.url.contains(":0/"), "port 0 printed: {}", curl.line);
        check_curl_line(curl).await;
    }
    assert!(curls
        .iter()
        .any(|c| c.shows_status && c.comment.contains("404")));
    assert!(curls
        .iter()
        .any(|c| c.shows_status && c.comment.contains("400")));

    terminate(&child);
    assert_exits_cleanly(&mut child, "the demo").await;
    let stderr = stderr.await.unwrap();
    assert!(!stderr.contains("panicked"), "{stderr}");
}

// ----------------------------------------------------------------------------------------
// Start-up errors

/// Run the command to its end; returns the exit code and stderr.
async fn run_to_end(dir: &Path, args: &[&str]) -> (Option<i32>, String) {
    let (code, _, stderr) = output_of(dir, args).await;
    (code, stderr)
}

/// Assert a start-up failure: exit code 1 and one line on stderr, `error: ...`, naming
/// `needle`; never a panic.
async fn assert_fails_with(dir: &Path, args: &[&str], needle: &str) {
    let (code, stderr) = run_to_end(dir, args).await;
    assert_eq!(code, Some(1), "restpipe {args:?}: {stderr}");
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(
        lines.len(),
        1,
        "restpipe {args:?} said more than one line:\n{stderr}"
    );
    assert!(lines[0].starts_with("error: "), "{stderr}");
    assert!(
        lines[0].contains(needle),
        "expected {needle:?} in: {stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
}

/// Missing certificate files, a config file with an unknown key, a public `--http` without a
/// token, an unknown handler set and `files` without a root: each is one clear line and exit
/// code 1.
#[tokio::test]
async fn start_up_errors_are_one_clear_line_and_exit_code_1() {
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    let DevOutcome::Written(paths) = write_dev_set(&certs, false).unwrap() else {
        panic!("a fresh directory already held certificates");
    };
    let ca = paths.ca_cert.to_str().unwrap();
    let cert = paths.server_cert.to_str().unwrap();
    let key = paths.server_key.to_str().unwrap();
    let ports = [
        "--bind-interface",
        "127.0.0.1",
        "--bind-port",
        "0",
        "--http",
        "127.0.0.1:0",
        "--statsd-host",
        "",
    ];

    let mut args = vec!["server", "--ca", "/nonexistent/ca.pem"];
    args.extend_from_slice(&ports);
    assert_fails_with(dir.path(), &args, "/nonexistent/ca.pem").await;

    let mut args = vec![
        "server",
        "--ca",
        ca,
        "--cert",
        cert,
        "--key",
        "/nonexistent/k",
    ];
    args.extend_from_slice(&ports);
    assert_fails_with(dir.path(), &args, "/nonexistent/k").await;

    let config = dir.path().join("rp.toml");
    std::fs::write(&config, "bind_prt = 4000\n").unwrap();
    assert_fails_with(
        dir.path(),
        &["server", "--config", config.to_str().unwrap()],
        "bind_prt",
    )
    .await;

    assert_fails_with(
        dir.path(),
        &["client", "--http", "0.0.0.0:0"],
        "--http-token",
    )
    .await;

    let tls = ["--ca", ca, "--cert", cert, "--key", key];
    let mut args = vec!["server", "--handlers", "nope"];
    args.extend_from_slice(&tls);
    args.extend_from_slice(&ports);
    assert_fails_with(dir.path(), &args, "\"nope\"").await;

    let mut args = vec!["server", "--handlers", "time,files"];
    args.extend_from_slice(&tls);
    args.extend_from_slice(&ports);
    assert_fails_with(dir.path(), &args, "--files-root").await;
}

// ----------------------------------------------------------------------------------------
// Two real processes

/// A node process started by [`spawn_node`]: the child, the ready line it printed, and
/// everything it writes on stderr (once it has exited).
struct Spawned {
    child: Child,
    ready: String,
    log: tokio::task::JoinHandle<String>,
}

impl Spawned {
    /// The address of the field `key` of its ready line.
    fn addr(&self, key: &str) -> SocketAddr {
        log_field(&self.ready, key)
            .unwrap_or_else(|| panic!("no {key}= in {:?}", self.ready))
            .parse()
            .unwrap()
    }
}

/// Start `restpipe <args>` with stderr collected, and wait (at most 30 s) for the line it
/// prints once its ports are bound ([`READY_LINE`]).
async fn spawn_node(dir: &Path, args: &[&str]) -> Spawned {
    let mut child = restpipe(dir)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    let log = tokio::spawn(async move {
        let mut ready_tx = Some(ready_tx);
        let mut text = String::new();
        while let Ok(Some(line)) = lines.next_line().await {
            if line.contains(READY_LINE) {
                if let Some(tx) = ready_tx.take() {
                    let _ = tx.send(line.clone());
                }
            }
            text.push_str(&line);
            text.push('\n');
        }
        text
    });
    match within(Duration::from_secs(30), "the ready line", ready_rx).await {
        Ok(ready) => Spawned { child, ready, log },
        Err(_) => panic!(
            "restpipe {args:?} ended before it was ready:\n{}",
            log.await.unwrap()
        ),
    }
}

/// `restpipe server` and `restpipe client` as two processes, with the certificate files of
/// `restpipe_certs::write_dev_set`: requests succeed both ways, and SIGTERM stops each with
/// exit code 0.
#[tokio::test]
async fn a_server_and_a_client_process_talk_both_ways_and_stop_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let DevOutcome::Written(paths) = write_dev_set(&dir.path().join("certs"), false).unwrap()
    else {
        panic!("a fresh directory already held certificates");
    };
    let DevPaths {
        ca_cert,
        server_cert,
        server_key,
        client_cert,
        client_key,
        ..
    } = paths;
    let server = spawn_node(
        dir.path(),
        &[
            "server",
            "--ca",
            ca_cert.to_str().unwrap(),
            "--cert",
            server_cert.to_str().unwrap(),
            "--key",
            server_key.to_str().unwrap(),
            "--bind-interface",
            "127.0.0.1",
            "--bind-port",
            "0",
            "--http",
            "127.0.0.1:0",
            "--statsd-host",
            "",
        ],
    )
    .await;
    let (server_http, pipe_port) = (server.addr("http"), server.addr("pipe").port().to_string());
    let client = spawn_node(
        dir.path(),
        &[
            "client",
            "--ca",
            ca_cert.to_str().unwrap(),
            "--cert",
            client_cert.to_str().unwrap(),
            "--key",
            client_key.to_str().unwrap(),
            "--server-host",
            "127.0.0.1",
            "--server-port",
            &pipe_port,
            "--server-name",
            "localhost",
            "--http",
            "127.0.0.1:0",
            "--statsd-host",
            "",
        ],
    )
    .await;
    let client_http = client.addr("http");
    let Spawned {
        child: mut server,
        log: server_log,
        ..
    } = server;
    let Spawned {
        child: mut client,
        log: client_log,
        ..
    } = client;

    // Both front doors report a live pipe (the client reconnects if it dialled too early).
    let up = wait_until_async(Duration::from_secs(15), || async move {
        let healthy = |addr: SocketAddr| async move {
            match http().get(format!("http://{addr}/health")).send().await {
                Ok(r) => r.status() == StatusCode::OK,
                Err(_) => false,
            }
        };
        let clients = async move {
            match http()
                .get(format!("http://{server_http}/clients"))
                .send()
                .await
            {
                Ok(r) => r
                    .json::<Value>()
                    .await
                    .is_ok_and(|v| v[0]["identity"] == DEV_CLIENT_IDENTITY),
                Err(_) => false,
            }
        };
        healthy(client_http).await && healthy(server_http).await && clients.await
    })
    .await;
    if !up {
        let _ = server.kill().await;
        let _ = client.kill().await;
        panic!(
            "the nodes never connected\nserver:\n{}\nclient:\n{}",
            server_log.await.unwrap(),
            client_log.await.unwrap()
        );
    }

    let body = get_json(&format!("http://{client_http}/server/time")).await;
    assert!((body["time_from_server"].as_f64().unwrap() - now_secs()).abs() < 60.0);
    let body = get_json(&format!("http://{client_http}/server/cat//hello%20/world")).await;
    assert_eq!(body, json!({ "result_from_server": "hello world" }));
    let body = get_json(&format!(
        "http://{server_http}/client/{DEV_CLIENT_IDENTITY}/time"
    ))
    .await;
    assert!((body["time_from_client"].as_f64().unwrap() - now_secs()).abs() < 60.0);
    let body = get_json(&format!("http://{server_http}/client/127.0.0.1/cat//a/b")).await;
    assert_eq!(body, json!({ "result_from_client": "ab" }));

    terminate(&client);
    terminate(&server);
    assert_exits_cleanly(&mut client, "the client process").await;
    assert_exits_cleanly(&mut server, "the server process").await;
    for log in [server_log.await.unwrap(), client_log.await.unwrap()] {
        assert!(!log.contains("panicked"), "{log}");
    }
}

// ----------------------------------------------------------------------------------------
// The command line: help, flags, completions

/// Run the command to its end; returns the exit code, stdout and stderr.
async fn output_of(dir: &Path, args: &[&str]) -> (Option<i32>, String, String) {
    let output = within(
        Duration::from_secs(20),
        "the command to end",
        restpipe(dir)
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .output(),
    )
    .await
    .unwrap();
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// Each subcommand's help lists only the options that apply to it; `--debug` takes no value
/// (and `DEBUG=1` still works); a flag of the other side is refused.
#[tokio::test]
async fn each_subcommand_lists_and_takes_only_its_own_options() {
    let dir = tempfile::tempdir().unwrap();
    let help = |side: &'static str| {
        let dir = dir.path().to_path_buf();
        async move {
            let (code, stdout, stderr) = output_of(&dir, &[side, "--help"]).await;
            assert_eq!(code, Some(0), "{side} --help: {stderr}");
            stdout
        }
    };
    let server = help("server").await;
    let client = help("client").await;
    let demo = help("demo").await;
    let status = help("status").await;
    let server_only = [
        "--bind-port",
        "--bind-interface",
        "--max-connections",
        "--max-handshakes",
        "--max-handshakes-per-source",
        "--client-ca",
    ];
    let client_only = [
        "--server-host",
        "--server-port",
        "--server-name",
        "--reconnect-max",
    ];
    let both = [
        "--ca",
        "--http",
        "--http-token",
        "--policy",
        "--files-root",
        "--statsd-host",
        "--debug",
        "--log-format",
    ];
    let has = |help: &str, flag: &str| {
        help.lines()
            .any(|l| l.split([' ', ',', '=']).any(|word| word == flag))
    };
    for flag in server_only {
        assert!(has(&server, flag), "server --help lacks {flag}:\n{server}");
        assert!(!has(&client, flag), "client --help lists {flag}:\n{client}");
    }
    for flag in client_only {
        assert!(has(&client, flag), "client --help lacks {flag}:\n{client}");
        assert!(!has(&server, flag), "server --help lists {flag}:\n{server}");
    }
    for flag in both {
        assert!(has(&server, flag), "server --help lacks {flag}:\n{server}");
        assert!(has(&client, flag), "client --help lacks {flag}:\n{client}");
    }
    for flag in ["--statsd-host", "--statsd-port", "--debug", "--log-format"] {
        assert!(has(&demo, flag), "demo --help lacks {flag}:\n{demo}");
    }
    for flag in ["--http", "--unix", "--token"] {
        assert!(has(&status, flag), "status --help lacks {flag}:\n{status}");
    }
    for help in [&server, &client, &demo] {
        assert!(
            !help.contains("--debug <"),
            "--debug asks for a value:\n{help}"
        );
    }

    // The other side's flags are refused, and --debug takes no value.
    for args in [
        &["client", "--bind-port", "1"][..],
        &["server", "--server-host", "h"],
        &["client", "--debug", "1"],
        &["client", "--debug=1"],
        &["server", "--log-format", "xml"],
    ] {
        let (code, _, stderr) = output_of(dir.path(), args).await;
        assert_eq!(code, Some(2), "restpipe {args:?} was taken: {stderr}");
        assert!(stderr.starts_with("error: "), "{args:?}: {stderr}");
    }
    // `DEBUG=1` is the flag's environment variable: the node starts at debug level (and
    // fails on the missing certificates after saying so).
    let output = restpipe(dir.path())
        .env("DEBUG", "1")
        .args(["client", "--ca", "/nonexistent/ca.pem", "--statsd-host", ""])
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("/nonexistent/ca.pem"), "{stderr}");
    let output = restpipe(dir.path())
        .env("DEBUG", "maybe")
        .args(["client", "--ca", "/nonexistent/ca.pem", "--statsd-host", ""])
        .output()
        .await
        .unwrap();
    assert_eq!(output.status.code(), Some(2), "DEBUG=maybe is refused");
}

/// `restpipe completions bash` prints a script bash parses and sources, which completes
/// `restpipe`.
#[tokio::test]
async fn completions_for_bash_source_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let (code, script, stderr) = output_of(dir.path(), &["completions", "bash"]).await;
    assert_eq!(code, Some(0), "{stderr}");
    assert!(script.contains("restpipe"), "{script}");
    let path = dir.path().join("restpipe.bash");
    std::fs::write(&path, &script).unwrap();
    let syntax = std::process::Command::new("bash")
        .arg("-n")
        .arg(&path)
        .output()
        .unwrap();
    assert!(
        syntax.status.success(),
        "bash -n: {}",
        String::from_utf8_lossy(&syntax.stderr)
    );
    let sourced = std::process::Command::new("bash")
        .arg("-c")
        .arg(format!("source {} && complete -p restpipe", path.display()))
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&sourced.stdout);
    assert!(
        sourced.status.success() && said.contains("restpipe"),
        "{said}{}",
        String::from_utf8_lossy(&sourced.stderr)
    );
    let (code, _, _) = output_of(dir.path(), &["completions", "tcsh"]).await;
    assert_eq!(code, Some(2), "an unknown shell is refused");
}

/// `--log-format json` writes JSON lines; `restpipe status` shows a running server with its
/// connected client's identity, and the client with its server; against a closed port it
/// exits 1 with one line.
#[tokio::test]
async fn status_shows_the_node_and_its_peers_and_json_logs_parse() {
    let dir = tempfile::tempdir().unwrap();
    let DevOutcome::Written(paths) = write_dev_set(&dir.path().join("certs"), false).unwrap()
    else {
        panic!("a fresh directory already held certificates");
    };
    let server = spawn_node(
        dir.path(),
        &[
            "server",
            "--log-format",
            "json",
            "--ca",
            paths.ca_cert.to_str().unwrap(),
            "--cert",
            paths.server_cert.to_str().unwrap(),
            "--key",
            paths.server_key.to_str().unwrap(),
            "--bind-interface",
            "127.0.0.1",
            "--bind-port",
            "0",
            "--http",
            "127.0.0.1:0",
            "--statsd-host",
            "",
        ],
    )
    .await;
    // The ready line is one JSON object whose fields are at the top level.
    let ready: Value = serde_json::from_str(&server.ready)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", server.ready));
    assert_eq!(ready["level"], "INFO", "{ready}");
    assert_eq!(ready["message"], READY_LINE, "{ready}");
    let server_http: SocketAddr = ready["http"].as_str().unwrap().parse().unwrap();
    let pipe: SocketAddr = ready["pipe"].as_str().unwrap().parse().unwrap();
    let client = spawn_node(
        dir.path(),
        &[
            "client",
            "--debug",
            "--ca",
            paths.ca_cert.to_str().unwrap(),
            "--cert",
            paths.client_cert.to_str().unwrap(),
            "--key",
            paths.client_key.to_str().unwrap(),
            "--server-host",
            "127.0.0.1",
            "--server-port",
            &pipe.port().to_string(),
            "--server-name",
            "localhost",
            "--http",
            "127.0.0.1:0",
            "--statsd-host",
            "",
        ],
    )
    .await;
    let client_http = client.addr("http");
    let Spawned {
        child: mut server,
        log: server_log,
        ..
    } = server;
    let Spawned {
        child: mut client,
        log: client_log,
        ..
    } = client;

    let connected = wait_until_async(Duration::from_secs(15), || async move {
        match http()
            .get(format!("http://{server_http}/clients"))
            .send()
            .await
        {
            Ok(r) => r
                .json::<Value>()
                .await
                .is_ok_and(|v| v[0]["identity"] == DEV_CLIENT_IDENTITY),
            Err(_) => false,
        }
    })
    .await;
    assert!(connected, "the client never connected");

    let (code, table, stderr) =
        output_of(dir.path(), &["status", "--http", &server_http.to_string()]).await;
    assert_eq!(code, Some(0), "{stderr}");
    let field = |table: &str, key: &str| -> String {
        table
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .unwrap_or_else(|| panic!("no {key} in:\n{table}"))
            .trim()
            .to_string()
    };
    assert_eq!(field(&table, "role"), "server", "{table}");
    assert_eq!(field(&table, "identity"), "localhost", "{table}");
    assert!(
        field(&table, "certificate").contains("days left"),
        "{table}"
    );
    assert_eq!(field(&table, "last reload"), "none since start", "{table}");
    let peer = table
        .lines()
        .find(|l| l.starts_with(DEV_CLIENT_IDENTITY))
        .unwrap_or_else(|| panic!("no row for {DEV_CLIENT_IDENTITY}:\n{table}"));
    assert!(peer.contains("127.0.0.1:"), "{table}");

    let (code, table, stderr) =
        output_of(dir.path(), &["status", "--http", &client_http.to_string()]).await;
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(field(&table, "role"), "client", "{table}");
    assert!(field(&table, "server").ends_with("(connected)"), "{table}");
    assert!(
        table.lines().any(|l| l.starts_with("localhost ")),
        "{table}"
    );

    // A closed port: one line, exit code 1.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    assert_fails_with(
        dir.path(),
        &["status", "--http", &closed.to_string()],
        "no node answers",
    )
    .await;

    terminate(&client);
    terminate(&server);
    assert_exits_cleanly(&mut client, "the client process").await;
    assert_exits_cleanly(&mut server, "the server process").await;
    let server_log = server_log.await.unwrap();
    for line in server_log.lines() {
        let event: Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("a log line is not JSON ({e}): {line}"));
        assert!(event["message"].is_string(), "{line}");
    }
    let client_log = client_log.await.unwrap();
    assert!(
        client_log.contains("DEBUG"),
        "--debug gave no debug line:\n{client_log}"
    );
}

/// The demo honours `RP_STATSD_HOST` and `RP_STATSD_PORT`: it says where its metrics go and
/// sends them there.
#[tokio::test]
async fn the_demo_sends_metrics_to_the_statsd_it_is_given() {
    let statsd = restpipe_testkit::statsd::Statsd::start().await;
    let dir = tempfile::tempdir().unwrap();
    let port = statsd.port().to_string();
    let (mut child, stderr, printed) = start_demo(
        dir.path(),
        &[("RP_STATSD_HOST", "127.0.0.1"), ("RP_STATSD_PORT", &port)],
    )
    .await;
    let metrics = printed
        .lines()
        .find(|l| l.starts_with("Metrics:"))
        .unwrap_or_else(|| panic!("the demo does not say where its metrics go:\n{printed}"));
    assert!(
        metrics.contains(&format!("127.0.0.1:{}", statsd.port())),
        "{metrics}"
    );
    let time = printed
        .lines()
        .filter_map(parse_curl_line)
        .find(|c| c.url.ends_with("/server/time"))
        .unwrap_or_else(|| panic!("no /server/time line:\n{printed}"));
    get_json(&time.url).await;
    statsd
        .expect("the demo's 2xx tick", |l| {
            l.starts_with("restpipe.http.status.2xx.tick:")
        })
        .await;
    statsd.assert_all_well_formed();

    terminate(&child);
    assert_exits_cleanly(&mut child, "the demo").await;
    let stderr = stderr.await.unwrap();
    assert!(!stderr.contains("panicked"), "{stderr}");
}

// ----------------------------------------------------------------------------------------
// contrib/: the systemd units, the settings files, nginx

/// The `[Service]` keys of a unit file, each with its values in order.
fn unit_keys(text: &str) -> Vec<(String, String)> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#') && !l.starts_with('['))
        .map(|l| {
            let (key, value) = l.split_once('=').unwrap_or_else(|| panic!("{l:?}"));
            (key.trim().to_string(), value.trim().to_string())
        })
        .collect()
}

/// The units run the right subcommand with the usual hardening, reload on SIGHUP and serve the
/// front door in their runtime directory; `systemd-analyze verify` accepts them when it is
/// installed; the settings files are read by the binary (and refused by the other side).
#[tokio::test]
async fn contrib_units_are_hardened_and_their_files_are_read() {
    let contrib = Path::new(env!("CARGO_MANIFEST_DIR")).join("contrib");
    let dir = tempfile::tempdir().unwrap();
    for side in ["server", "client"] {
        let path = contrib
            .join("systemd")
            .join(format!("restpipe-{side}.service"));
        let text = std::fs::read_to_string(&path).unwrap();
        let keys = unit_keys(&text);
        let one = |key: &str| -> String {
            keys.iter()
                .find(|(k, _)| k == key)
                .map(|(_, v)| v.clone())
                .unwrap_or_else(|| panic!("{} has no {key}=", path.display()))
        };
        assert!(
            one("User") == "restpipe" || one("DynamicUser") == "yes",
            "{side}"
        );
        assert_eq!(one("NoNewPrivileges"), "yes");
        assert_eq!(one("ProtectSystem"), "strict");
        assert!(one("LimitNOFILE").parse::<u64>().unwrap() >= 65536);
        assert_eq!(one("ExecReload"), "/bin/kill -HUP $MAINPID");
        let runtime = one("RuntimeDirectory");
        let start = one("ExecStart");
        let words: Vec<&str> = start.split_whitespace().collect();
        assert_eq!(words[1], side, "{start}");
        assert!(
            start.contains(&format!("--http unix:/run/{runtime}/")),
            "{start}"
        );
        assert!(
            start.contains(&format!("--config /etc/restpipe/{side}.toml")),
            "{start}"
        );
    }
    let nginx = std::fs::read_to_string(contrib.join("nginx/restpipe.conf")).unwrap();
    assert!(nginx.contains("server unix:/run/restpipe-client/node.sock;"));
    assert!(nginx.contains("proxy_set_header Host localhost;"));

    let have_systemd = std::process::Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if have_systemd {
        let mut units = Vec::new();
        for side in ["server", "client"] {
            let name = format!("restpipe-{side}.service");
            let text = std::fs::read_to_string(contrib.join("systemd").join(&name)).unwrap();
            let unit = dir.path().join(&name);
            std::fs::write(&unit, text.replace("/usr/local/bin/restpipe", BIN)).unwrap();
            units.push(unit);
        }
        let verified = std::process::Command::new("systemd-analyze")
            .arg("verify")
            .args(&units)
            .output()
            .unwrap();
        let said = String::from_utf8_lossy(&verified.stderr);
        assert!(
            verified.status.success() && said.trim().is_empty(),
            "systemd-analyze verify: {said}"
        );
    } else {
        eprintln!("systemd-analyze is not installed: the units were checked by parsing only");
    }

    // The settings files parse and resolve: the node gets as far as its certificates.
    let server_toml = contrib.join("server.toml");
    let client_toml = contrib.join("client.toml");
    let (server_toml, client_toml) = (server_toml.to_str().unwrap(), client_toml.to_str().unwrap());
    assert_fails_with(
        dir.path(),
        &["server", "--config", server_toml],
        "/etc/restpipe/certs/",
    )
    .await;
    assert_fails_with(
        dir.path(),
        &["client", "--config", client_toml],
        "/etc/restpipe/certs/",
    )
    .await;
    // Each side refuses the other's own keys, naming the key.
    assert_fails_with(
        dir.path(),
        &["client", "--config", server_toml],
        "`bind_interface` is a server setting",
    )
    .await;
    assert_fails_with(
        dir.path(),
        &["server", "--config", client_toml],
        "`server_host` is a client setting",
    )
    .await;
}
