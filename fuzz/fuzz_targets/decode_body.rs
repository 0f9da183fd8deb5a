//! A request body, as the server gets it: decoded with the server's default limits and, when it
//! holds events, run through the shipped rules in memory. Nothing may panic, and decoding only
//! the wanted events accepts every body that decoding all of them does, with the same events.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::path::Path;
use std::sync::OnceLock;
use tripline::ingest::event::{BodyLimits, decode, decode_wanted};
use tripline::rules::RuleSet;
use tripline::store::MemoryStore;

fn rules() -> &'static RuleSet {
    static RULES: OnceLock<RuleSet> = OnceLock::new();
    RULES.get_or_init(|| {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let data = std::env::temp_dir().join("tripline-fuzz-data");
        RuleSet::load(&root.join("rules"), &root.join("templates"), &data)
            .unwrap_or_else(|p| panic!("the shipped rules do not load: {p:?}"))
    })
}

fuzz_target!(|body: &[u8]| {
    let limits = BodyLimits {
        max_depth: 32,
        max_events: 1000,
    };
    let now = chrono::DateTime::from_timestamp(1_750_000_000, 0).expect("a valid time");
    // As the server decodes: every event checked, only those some rule is tried on built. What
    // decoding every event accepts must be accepted alike, with the same wanted events.
    let wanted = decode_wanted(body, now, &limits, |name| rules().wants(name));
    if let Ok(all) = decode(body, now, &limits) {
        let decoded = wanted.as_ref().expect("accepted when every event is decoded");
        assert_eq!(decoded.received, all.len());
        let kept: Vec<_> = all.into_iter().filter(|e| rules().wants(e.name())).collect();
        assert_eq!(decoded.events, kept);
    }
    if let Ok(decoded) = wanted {
        let events = decoded.events;
        let mut store = MemoryStore::default();
        let from = "t <t@localhost>".parse().expect("a valid address");
        let mut effects = Vec::new();
        tripline::engine::run(rules(), &events, &mut store, &from, 0, &mut effects)
            .expect("the memory store does not fail");
    }
});
