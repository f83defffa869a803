//! The `restpipe` command: parse the arguments, set up logging, run a node, the demo, or one of
//! the operator's commands (`status`, `completions`).

mod status_cmd;

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::{CommandFactory, Parser};
use restpipe::app;
use restpipe::config::{Cli, Command, LogFormat, NodeArgs, Settings};
use restpipe::handler::Side;
use tracing_subscriber::EnvFilter;

/// jemalloc instead of glibc's malloc: about 4.6 k fewer instructions per request, and the same
/// memory per idle connection (docs/PERFORMANCE.md). Without the `jemalloc` feature the
/// binary keeps glibc's, for the heap profilers that see only that.
#[cfg(feature = "jemalloc")]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Logs on stderr: `RUST_LOG` if set, else info (debug with `debug`), as text or as one JSON
/// object a line.
fn init_logs(debug: bool, format: LogFormat) {
    let default = if debug { "debug" } else { "info" };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => logs.with_ansi(std::io::stderr().is_terminal()).init(),
        LogFormat::Json => logs
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .init(),
    }
    if let Err(e) = restpipe::util::raise_open_files_limit() {
        tracing::warn!(cause = %e, "cannot raise the open-files limit");
    }
}

/// Run a node of `side` from its flags until SIGINT or SIGTERM.
async fn run_node(side: Side, args: NodeArgs) -> anyhow::Result<()> {
    let settings = Settings::resolve(args, side).map_err(anyhow::Error::msg)?;
    init_logs(settings.debug, settings.log_format);
    app::run(side, settings, app::shutdown_signal()).await
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Server(args) => run_node(Side::Server, args.into()).await,
        Command::Client(args) => run_node(Side::Client, args.into()).await,
        Command::Demo(args) => {
            init_logs(
                args.log.debug.unwrap_or(false),
                args.log.log_format.unwrap_or_default(),
            );
            app::demo(args, app::shutdown_signal()).await
        }
        Command::Status(args) => status_cmd::run(&args).await,
        Command::Completions(args) => {
            clap_complete::generate(
                args.shell,
                &mut Cli::command(),
                "restpipe",
                &mut std::io::stdout(),
            );
            Ok(())
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
