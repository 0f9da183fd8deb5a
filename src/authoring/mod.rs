//! The commands a rule author runs without starting the service (`check`, `test`, `replay`), and
//! `explain`, which asks the running service about one event. Each prints for people on the terminal and returns the process's exit code.

pub mod cases;
pub mod check;
pub mod event_file;
pub mod explain;
pub mod replay;
pub mod test;

use std::process::ExitCode;

use crate::config::{ConfigError, Declared, FolderArgs, Paths};
use crate::diag::{Diagnostic, Warning};
use crate::rules::RuleSet;

/// The folders and sender of `args`, or the configuration file's problems printed and exit
/// code 2.
fn paths(args: &FolderArgs) -> Result<Paths, ExitCode> {
    args.resolve().map_err(|e| report_config_error(&e))
}

/// Prints why the settings cannot be used; returns exit code 2 (a usage error, as clap's).
pub fn report_config_error(e: &ConfigError) -> ExitCode {
    match e {
        ConfigError::File(problems) => print_problems(problems),
        ConfigError::Other(message) => eprintln!("error: {message}"),
    }
    ExitCode::from(2)
}

/// Loads the rule set of `declared`, or prints every problem. Warnings are printed either way.
fn load_rules(declared: &Declared) -> Option<RuleSet> {
    let (result, warnings) = RuleSet::load_with_warnings(declared);
    print_warnings(&warnings);
    match result {
        Ok(set) => Some(set),
        Err(problems) => {
            print_problems(&problems);
            None
        }
    }
}

/// Prints warnings to stderr, as `warning: file: message`. They do not change the exit code.
fn print_warnings(warnings: &[Warning]) {
    for w in warnings {
        eprintln!("warning: {w}");
    }
}

/// Prints problems to stderr, each with its line and caret, then how many there were.
fn print_problems(problems: &[Diagnostic]) {
    for p in problems {
        eprintln!("{}\n", p.render());
    }
    eprintln!("{} problem(s) found", problems.len());
}
