//! `tripline test`: runs the rule test cases (`*.test.toml`) against the rules, in memory, on a
//! virtual clock, and says which pass. Exit 0 when every case passes, 1 otherwise.

use clap::{Args, ValueEnum};
use serde_json::json;
use std::path::PathBuf;
use std::process::ExitCode;

use super::{load_rules, print_problems, print_warnings};
use crate::authoring::cases;
use crate::config::FolderArgs;
use crate::diag::Diagnostic;
use crate::redact::HashKey;
use crate::rules::test_files;

/// Arguments of `tripline test`.
#[derive(Debug, Args)]
pub struct TestArgs {
    /// Test files (*.test.toml) or folders holding them; the rules folder when none is given.
    pub paths: Vec<PathBuf>,
    #[command(flatten)]
    pub folders: FolderArgs,
    /// `text` for people; `json` for programs: one JSON object per line and test.
    #[arg(long, value_enum, default_value_t = Format::Text)]
    pub format: Format,
}

/// How results are printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    Text,
    Json,
}

/// Runs the tests.
pub fn run(args: &TestArgs) -> ExitCode {
    let mut paths = match super::paths(&args.folders) {
        Ok(paths) => paths,
        Err(code) => return code,
    };
    // Hashed values come out the same on every machine, whatever key the service has.
    paths.declared.hash_key = Some(HashKey::for_tests());
    let Some(rules) = load_rules(&paths.declared) else {
        eprintln!("the rules have problems, so no test was run (see `tripline check`)");
        return ExitCode::FAILURE;
    };
    let mut files = Vec::new();
    let mut problems = Vec::new();
    let wanted = if args.paths.is_empty() {
        vec![paths.declared.folders.rules.clone()]
    } else {
        args.paths.clone()
    };
    for path in wanted {
        if path.is_dir() {
            match test_files(&path) {
                Ok(mut found) => {
                    print_warnings(&found.warnings);
                    files.append(&mut found.files);
                }
                Err(e) => problems.push(Diagnostic::whole_file(
                    &path,
                    format!("cannot read this folder: {e}"),
                )),
            }
        } else {
            files.push(path);
        }
    }
    let (mut passed, mut failed) = (0, 0);
    for file in &files {
        let cases = match cases::load(file) {
            Ok(cases) => cases,
            Err(mut p) => {
                problems.append(&mut p);
                continue;
            }
        };
        if args.format == Format::Text {
            println!("{}", file.display());
        }
        for case in &cases {
            let differences = cases::run(case, &rules, &paths.email_from);
            if differences.is_empty() {
                passed += 1;
            } else {
                failed += 1;
            }
            match args.format {
                Format::Text if differences.is_empty() => println!("  ok    {}", case.name),
                Format::Text => {
                    println!("  FAIL  {}", case.name);
                    for d in &differences {
                        println!("        {}", d.replace('\n', "\n        "));
                    }
                }
                Format::Json => println!(
                    "{}",
                    json!({
                        "file": file.display().to_string(),
                        "test": case.name,
                        "passed": differences.is_empty(),
                        "problems": differences,
                    })
                ),
            }
        }
    }
    if !problems.is_empty() {
        print_problems(&problems);
    }
    if files.is_empty() {
        eprintln!(
            "no test files found: tests live beside the rules, in files named like power_user_email{}",
            crate::rules::TEST_SUFFIX
        );
    }
    let summary = format!(
        "{passed} passed, {failed} failed{}",
        if problems.is_empty() {
            String::new()
        } else {
            format!(", {} test file problem(s)", problems.len())
        }
    );
    match args.format {
        Format::Text => println!("{summary}"),
        Format::Json => eprintln!("{summary}"),
    }
    if failed == 0 && problems.is_empty() && !files.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
