//! The `tripline` command: `serve` runs the service; `check`, `test` and `replay` help rule
//! authors (see `commands`).

use clap::{Parser, Subcommand};
use std::io::IsTerminal;
use std::process::ExitCode;
use tracing_subscriber::EnvFilter;

use tripline::authoring::{self, explain::ExplainArgs, replay::ReplayArgs, test::TestArgs};
use tripline::clock::Clock;
use tripline::config::{FolderArgs, LogFormat, ServeArgs};

#[derive(Parser)]
#[command(
    name = "tripline",
    version,
    about = "Turns PostHog events into actions described by rule files"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the service: receive events on POST /webhook and apply the rules.
    Serve(Box<ServeArgs>),
    /// Check the rule, template and test files without starting the service.
    Check(FolderArgs),
    /// Run the rule tests (*.test.toml beside the rules) with no side effects.
    Test(TestArgs),
    /// Replay a file of past events through the rules and show what would have happened.
    Replay(ReplayArgs),
    /// Ask the running service why each rule did or did not act on one event (by its uuid).
    Explain(ExplainArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The service logs what it does; the authoring commands print their own results and only
    // log errors.
    match cli.command {
        Command::Serve(args) => {
            return_freed_memory_promptly();
            let config = match args.resolve() {
                Ok(config) => config,
                Err(e) => return authoring::report_config_error(&e),
            };
            init_logs("info", config.log_format);
            let runtime = match tokio::runtime::Runtime::new() {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("error: cannot start the async runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            match runtime.block_on(tripline::app::serve(
                config,
                Clock::wall(),
                shutdown_signal(),
            )) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Check(folders) => {
            init_logs("error", LogFormat::Text);
            authoring::check::run(&folders)
        }
        Command::Test(args) => {
            init_logs("error", LogFormat::Text);
            authoring::test::run(&args)
        }
        Command::Replay(args) => {
            init_logs("error", LogFormat::Text);
            authoring::replay::run(&args)
        }
        Command::Explain(args) => {
            init_logs("error", LogFormat::Text);
            authoring::explain::run(&args)
        }
    }
}

/// Logs to stderr at the level of `TRIPLINE_LOG` (else `default_level`: the service logs what it
/// does, the authoring commands print their own results and only log errors).
fn init_logs(default_level: &str, format: LogFormat) {
    let filter =
        EnvFilter::try_from_env("TRIPLINE_LOG").unwrap_or_else(|_| EnvFilter::new(default_level));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => logs.with_ansi(std::io::stderr().is_terminal()).init(),
        LogFormat::Json => logs.json().flatten_event(true).init(),
    }
}

/// Completes on Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
    tracing::info!("shutting down: finishing requests in flight");
}

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The position of the purge delay in mimalloc's `mi_option_e` (v3, `mimalloc.h`), which the
/// crate's bindings do not name; a test checks its default, so that a mimalloc with another
/// order fails it rather than setting something else.
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// A long-running service gives the memory it frees back to the system at once, instead of
/// after mimalloc's default second: under the threshold workload its RSS after 20 s was 76–79 MB
/// with the default and 64–68 MB with this, at the same throughput (docs/PERFORMANCE.md). The
/// commands that run to an end (`replay`) keep the default, and so does an operator who sets
/// `MIMALLOC_PURGE_DELAY`.
fn return_freed_memory_promptly() {
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_some() {
        return;
    }
    // SAFETY: sets one of mimalloc's global options, a plain variable: called first thing in
    // `main`, before any other thread exists.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, 0) };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_mimalloc_option_set_is_the_purge_delay() {
        if std::env::var_os("MIMALLOC_PURGE_DELAY").is_some() {
            eprintln!("skipped: MIMALLOC_PURGE_DELAY is set, so the default is not seen");
            return;
        }
        // Its default in mimalloc v3's options.c is 1000 ms.
        // SAFETY: a plain getter of one of mimalloc's global options.
        let delay = unsafe { libmimalloc_sys::mi_option_get(MI_OPTION_PURGE_DELAY) };
        assert_eq!(delay, 1000);
    }
}
