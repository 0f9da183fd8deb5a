//! The `tripline` command: `serve` runs the service, `check` validates rule files.

use clap::{Parser, Subcommand};
use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use tracing_subscriber::EnvFilter;

use tripline::config::ServeConfig;
use tripline::rules::RuleSet;

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
    Serve(ServeConfig),
    /// Check the rule and template files without starting the service.
    Check {
        /// Folder of rule files.
        #[arg(long, env = "TRIPLINE_RULES", default_value = "rules")]
        rules: PathBuf,
        /// Folder of email templates.
        #[arg(long, env = "TRIPLINE_TEMPLATES", default_value = "templates")]
        templates: PathBuf,
        /// Data folder that output paths are checked against.
        #[arg(long, env = "TRIPLINE_DATA", default_value = "data")]
        data: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_env("TRIPLINE_LOG").unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    match cli.command {
        Command::Serve(config) => {
            let runtime = match tokio::runtime::Runtime::new() {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("error: cannot start the async runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            match runtime.block_on(tripline::server::serve(config, shutdown_signal())) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Check {
            rules,
            templates,
            data,
        } => match RuleSet::load(&rules, &templates, &data) {
            Ok(set) => {
                println!("ok: {} rules", set.rules().len());
                ExitCode::SUCCESS
            }
            Err(problems) => {
                for p in &problems {
                    eprintln!("{}\n", p.render());
                }
                eprintln!("{} problem(s) found", problems.len());
                ExitCode::FAILURE
            }
        },
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
