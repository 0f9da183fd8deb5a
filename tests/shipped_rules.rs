//! Every shipped rule and template, and every rule shown in docs/RULES.md, loads.

mod common;

use common::root;
use std::process::Command;
use tripline::rules::RuleSet;

#[test]
fn shipped_rules_and_templates_load() {
    let data = tempfile::tempdir().unwrap();
    let set = RuleSet::load(&tripline::config::Declared::folders(
        &root().join("rules"),
        &root().join("templates"),
        data.path(),
    ))
    .unwrap_or_else(|problems| panic!("{problems:#?}"));
    let mut names: Vec<&str> = set.rules().iter().map(|r| r.name.as_str()).collect();
    names.sort();
    assert_eq!(names, ["power-user-discount", "training-data"]);
}

#[test]
fn shipped_rules_pass_tripline_check() {
    let data = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_tripline"))
        .current_dir(root())
        .args(["check", "--data"])
        .arg(data.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.starts_with("ok: 2 rules, 9 tests; no HTTP endpoints declared; rule set hash "),
        "{stdout}"
    );
}

#[test]
fn shipped_rules_pass_their_tests() {
    let out = Command::new(env!("CARGO_BIN_EXE_tripline"))
        .current_dir(root())
        .arg("test")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.ends_with("9 passed, 0 failed\n"), "{stdout}");
}

#[test]
fn tripline_check_reports_problems_and_fails() {
    let dir = tempfile::tempdir().unwrap();
    let rules = dir.path().join("rules");
    std::fs::create_dir(&rules).unwrap();
    std::fs::write(
        rules.join("r.toml"),
        "name = \"r\"\n[when]\nevent = \"x\"\n[jsonl]\nfile = \"o.jsonl\"\nfeilds = {}\n",
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_tripline"))
        .arg("check")
        .arg("--rules")
        .arg(&rules)
        .arg("--templates")
        .arg(root().join("templates"))
        .arg("--data")
        .arg(dir.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("r.toml:6:1: unknown key `feilds` (did you mean `fields`?"),
        "{stderr}"
    );
    assert!(stderr.contains("6 | feilds = {}\n  | ^"), "{stderr}");
}

/// The ```toml blocks of docs/RULES.md: every one is valid TOML, and every one with a `name` is a
/// complete rule that loads (together, so their names must differ too). Recipes that name their
/// file (`# file: ...`) are checked against that file, with its own templates, in
/// tests/authoring.rs.
#[test]
fn every_rule_in_the_docs_loads() {
    let doc = std::fs::read_to_string(root().join("docs/RULES.md")).unwrap();
    let blocks: Vec<&str> = doc
        .split("```toml\n")
        .skip(1)
        .map(|rest| rest.split("```").next().unwrap())
        .collect();
    assert!(blocks.len() >= 10, "found {} toml blocks", blocks.len());
    let dir = tempfile::tempdir().unwrap();
    let rules = dir.path().join("rules");
    std::fs::create_dir(&rules).unwrap();
    let mut complete = 0;
    for (i, block) in blocks.iter().enumerate() {
        let table: toml::Table =
            toml::from_str(block).unwrap_or_else(|e| panic!("block {i}:\n{block}\n{e}"));
        if table.contains_key("name") && !block.starts_with("# file: ") {
            std::fs::write(rules.join(format!("doc{i:02}.toml")), block).unwrap();
            complete += 1;
        }
    }
    assert!(complete >= 2, "found {complete} complete rules");
    // With the endpoints the examples declare, which the docs' examples name too.
    let mut declared = tripline::config::FolderArgs {
        config: Some(root().join("examples/tripline.toml")),
        rules: Some(rules),
        templates: Some(root().join("templates")),
        data: Some(dir.path().to_path_buf()),
        email_from: None,
    }
    .resolve()
    .unwrap()
    .declared;
    declared.hash_key = Some(tripline::redact::HashKey::for_tests());
    let set = RuleSet::load(&declared).unwrap_or_else(|problems| {
        panic!(
            "{:#?}",
            problems.iter().map(ToString::to_string).collect::<Vec<_>>()
        )
    });
    assert_eq!(set.rules().len(), complete);
}
