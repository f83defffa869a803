//! The `restpipe` command: parse the arguments, set up logging, run a node.

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Parser;
use restpipe::app;
use restpipe::config::{Cli, Command, Settings};
use restpipe::handler::Side;
use tracing_subscriber::EnvFilter;

fn init_logs(debug: bool) {
    let default = if debug { "debug" } else { "info" };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    if let Err(e) = restpipe::util::raise_open_files_limit() {
        tracing::warn!(cause = %e, "cannot raise the open-files limit");
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Server(args) => {
            let settings = Settings::resolve(args, Side::Server).map_err(anyhow::Error::msg)?;
            init_logs(settings.debug);
            app::run(Side::Server, settings, app::shutdown_signal()).await
        }
        Command::Client(args) => {
            let settings = Settings::resolve(args, Side::Client).map_err(anyhow::Error::msg)?;
            init_logs(settings.debug);
            app::run(Side::Client, settings, app::shutdown_signal()).await
        }
        Command::Demo(args) => {
            init_logs(args.debug);
            app::demo(args, app::shutdown_signal()).await
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
