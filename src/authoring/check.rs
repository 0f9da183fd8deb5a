//! `tripline check`: validates everything the server would load, and the test files beside the
//! rules, without starting anything. Exit 0 when all is well, 1 when anything is wrong, including
//! a rule whose output file cannot be written in the data folder now (the service would run it,
//! and it would do nothing); other warnings (entries skipped because they are not files) are
//! printed without changing that.

use std::process::ExitCode;

use super::{print_problems, print_warnings};
use crate::authoring::cases;
use crate::config::FolderArgs;
use crate::diag::Diagnostic;
use crate::redact::HashKey;
use crate::rules::test_files;
use crate::rules::{RuleSet, unwritable_outputs};

/// Runs the check.
pub fn run(args: &FolderArgs) -> ExitCode {
    let mut declared = match super::paths(args) {
        Ok(paths) => paths.declared,
        Err(code) => return code,
    };
    // The check does not need the operator's key: only that a rule which hashes could run.
    declared.hash_key.get_or_insert_with(HashKey::for_tests);
    let folders = &declared.folders;
    let mut problems = Vec::new();
    let (rules, mut warnings) = RuleSet::load_with_warnings(&declared);
    let rules = match rules {
        Ok(set) => Some(set),
        Err(mut p) => {
            problems.append(&mut p);
            None
        }
    };
    let mut tests = 0;
    match test_files(&folders.rules) {
        Ok(listing) => {
            warnings.extend(listing.warnings);
            for file in listing.files {
                match cases::load(&file) {
                    Ok(cases) => tests += cases.len(),
                    Err(mut p) => problems.append(&mut p),
                }
            }
        }
        // The rule set already reported an unreadable folder.
        Err(_) if rules.is_none() => {}
        Err(e) => problems.push(Diagnostic::whole_file(
            &folders.rules,
            format!("cannot read the rules folder: {e}"),
        )),
    }
    print_warnings(&warnings);
    // The service would run these rules, and they would do nothing: for an author, a problem.
    let unwritable = rules.as_ref().map_or(0, |set| {
        unwritable_outputs(set.rules(), &folders.data).len()
    });
    if unwritable > 0 {
        eprintln!(
            "{unwritable} rule(s) cannot write their file in the data folder now (see the warnings above)"
        );
    }
    match rules {
        Some(set) if problems.is_empty() && unwritable == 0 => {
            let endpoints = match declared.endpoints.len() {
                0 => "no HTTP endpoints declared".to_string(),
                _ => {
                    let names: Vec<&str> = declared.endpoints.iter().map(String::as_str).collect();
                    format!("HTTP endpoints: {}", names.join(", "))
                }
            };
            println!(
                "ok: {} rules, {tests} tests; {endpoints}; rule set hash {}",
                set.rules().len(),
                set.hash
            );
            ExitCode::SUCCESS
        }
        _ => {
            print_problems(&problems);
            ExitCode::FAILURE
        }
    }
}
