//! The commands a rule author runs without starting the service: `check`, `test` and `replay`.
//! Each prints for people on the terminal and returns the process's exit code.

pub mod check;
pub mod replay;
pub mod test;

use clap::Args;
use std::path::{Path, PathBuf};

use crate::rules::RuleSet;
use crate::rules::diagnostic::Diagnostic;

/// Where the rules, templates and data are: the same flags and variables as `serve`.
#[derive(Debug, Clone, Args)]
pub struct Folders {
    /// Folder of rule files (*.toml).
    #[arg(long, env = "TRIPLINE_RULES", default_value = "rules")]
    pub rules: PathBuf,
    /// Folder of email templates (NAME.text.hbs, NAME.html.hbs).
    #[arg(long, env = "TRIPLINE_TEMPLATES", default_value = "templates")]
    pub templates: PathBuf,
    /// Data folder that output paths are checked against.
    #[arg(long, env = "TRIPLINE_DATA", default_value = "data")]
    pub data: PathBuf,
}

impl Folders {
    /// Loads the rule set, or prints every problem.
    fn load_rules(&self) -> Option<RuleSet> {
        match RuleSet::load(&self.rules, &self.templates, &self.data) {
            Ok(set) => Some(set),
            Err(problems) => {
                print_problems(&problems);
                None
            }
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

/// The test files (`*.test.toml`) in `dir`, sorted.
fn test_files(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| {
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or_default();
            name.ends_with(crate::testcase::SUFFIX) && !name.starts_with('.') && p.is_file()
        })
        .collect();
    files.sort();
    Ok(files)
}
