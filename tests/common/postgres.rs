//! The throw-away PostgreSQL server of the tests (`scripts/postgres.sh` starts it and exports
//! its URL as TRIPLINE_TEST_POSTGRES): a new database for each test that asks.

use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};

/// Whether the tests run on PostgreSQL (TRIPLINE_TEST_STORE=postgres).
pub fn on_postgres() -> bool {
    std::env::var("TRIPLINE_TEST_STORE").as_deref() == Ok("postgres")
}

/// Whether the tests run on PostgreSQL, where a test of what only the embedded store has says
/// it is skipped, and why.
pub fn redb_only(why: &str) -> bool {
    if on_postgres() {
        eprintln!("skipped on PostgreSQL: {why}");
    }
    on_postgres()
}

/// The URL of a new, empty database; `None` (with a line saying the test is skipped) when no
/// server was started for the tests.
pub fn database() -> Option<String> {
    let Ok(server) = std::env::var("TRIPLINE_TEST_POSTGRES") else {
        eprintln!(
            "skipped: no PostgreSQL for the tests (scripts/test.sh starts one; TRIPLINE_TEST_POSTGRES is not set)"
        );
        return None;
    };
    static NEXT: AtomicU64 = AtomicU64::new(1);
    let name = format!(
        "test_{}_{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    );
    psql(&server, &format!("CREATE DATABASE {name}"));
    let base = server.rsplit_once('/').expect("a URL with a database").0;
    Some(format!("{base}/{name}"))
}

/// Runs `sql` on the database at `url` with psql, and returns what it printed (unaligned, no
/// headers).
pub fn psql(url: &str, sql: &str) -> String {
    let bin = std::env::var("TRIPLINE_TEST_PGBIN").map_or("psql".into(), |b| format!("{b}/psql"));
    let out = Command::new(bin)
        .args([url, "-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-c", sql])
        .output()
        .expect("psql runs");
    assert!(
        out.status.success(),
        "psql {sql:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}
