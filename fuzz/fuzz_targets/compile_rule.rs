//! A rule file's text through the rule compiler: a rule or diagnostics, each inside the file.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::path::Path;
use tripline::rules::compile::compile;
use tripline::actions::email::templates::Templates;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let (mut templates, _) = Templates::load(&root.join("templates"));
    if let Err(problems) = compile(Path::new("rules/fuzz.toml"), &text, &mut templates) {
        assert!(!problems.is_empty());
        let lines = text.lines().count().max(1);
        for p in &problems {
            assert!(p.line >= 1 && p.line <= lines + 1, "{p:?}");
            let _ = p.render();
        }
    }
});
