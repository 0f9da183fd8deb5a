//! The commands a rule author runs without starting the service: `check`, `test` and `replay`.
//! Each prints for people on the terminal and returns the process's exit code.

pub mod check;
pub mod replay;
pub mod test;

use crate::config::Folders;
use crate::rules::RuleSet;
use crate::rules::diagnostic::Diagnostic;

/// Loads the rule set of `folders`, or prints every problem.
fn load_rules(folders: &Folders) -> Option<RuleSet> {
    match RuleSet::load(&folders.rules, &folders.templates, &folders.data) {
        Ok(set) => Some(set),
        Err(problems) => {
            print_problems(&problems);
            None
        }
    }
}

/// Prints problems to stderr, each with its line and caret, then how many there were.
fn print_problems(problems: &[Diagnostic]) {
    for p in problems {
        eprintln!("{}\n", p.render());
    }
    eprintln!("{} problem(s) found", problems.len());
}
