//! Hot reload: the running rule set, and the watcher that replaces it when files change.
//!
//! The watcher only signals. One task waits for a quiet moment (editors write in bursts, often
//! through a temporary file and a rename), loads the whole set again, and swaps it in on success.
//! On failure the running set stays and the errors are kept for `GET /rules` and logged. Requests
//! hold an `Arc` of the set they started with, so a swap never cuts one short.

use arc_swap::ArcSwapOption;
use chrono::SecondsFormat;
use notify::{EventKind, RecursiveMode, Watcher};
use serde::Serialize;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Notify;
use tracing::{error, info, warn};

use crate::clock::Clock;
use crate::config::Declared;
use crate::rules::RuleSet;
use crate::telemetry;

/// How long the folders must stay quiet before a reload.
const QUIET: Duration = Duration::from_millis(250);
/// The longest a change waits for quiet: files rewritten without pause still reload this often.
const AT_MOST: Duration = Duration::from_secs(1);

/// The outcome of the last load, as shown at `GET /rules`.
#[derive(Debug, Clone, Serialize)]
pub struct ReloadStatus {
    /// When it happened (RFC 3339).
    pub at: String,
    /// Whether the files on disk are the ones running.
    pub ok: bool,
    /// Every problem, as `file:line:col: message`.
    pub errors: Vec<String>,
    /// What the load noticed that did not stop it (an entry skipped because it is not a file),
    /// as `file: message`.
    pub warnings: Vec<String>,
}

/// The running rule set and where it comes from.
pub struct LiveRules {
    current: ArcSwapOption<RuleSet>,
    status: Mutex<ReloadStatus>,
    /// What the rules compile against.
    declared: Declared,
    /// Dates each load.
    clock: Clock,
    /// How many sets have been swapped in, for those who act on a new set (`timers.rs`).
    generation: tokio::sync::watch::Sender<u64>,
}

impl LiveRules {
    /// Loads the set once. If it has problems the service still starts, with no rules, and
    /// reports them.
    pub fn load(declared: &Declared, clock: Clock) -> LiveRules {
        let live = LiveRules {
            current: ArcSwapOption::empty(),
            status: Mutex::new(ReloadStatus {
                at: now(&clock),
                ok: false,
                errors: vec![],
                warnings: vec![],
            }),
            declared: declared.clone(),
            clock,
            generation: tokio::sync::watch::Sender::new(0),
        };
        live.reload();
        live
    }

    /// The rule set to use for one request, or `None` if no good set has loaded yet.
    /// The rules folder.
    pub fn rules_dir(&self) -> &std::path::Path {
        &self.declared.folders.rules
    }

    pub fn snapshot(&self) -> Option<Arc<RuleSet>> {
        self.current.load_full()
    }

    /// Changes each time a new set is swapped in.
    pub fn reloaded(&self) -> tokio::sync::watch::Receiver<u64> {
        self.generation.subscribe()
    }

    /// The last load's outcome.
    pub fn status(&self) -> ReloadStatus {
        self.status
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Loads the files again; swaps the new set in if it has no problems. Returns whether it did.
    pub fn reload(&self) -> bool {
        let (result, warnings) = RuleSet::load_with_warnings(&self.declared);
        for w in &warnings {
            warn!("{w}");
        }
        let warnings: Vec<String> = warnings.iter().map(ToString::to_string).collect();
        let status = match result {
            Ok(mut set) => {
                info!(rules = set.rules().len(), "rules loaded");
                set.loaded_at = self.clock.now();
                // Swapped in before those who watch for a new set are told.
                set.generation = *self.generation.borrow() + 1;
                let generation = set.generation;
                self.current.store(Some(Arc::new(set)));
                self.generation.send_replace(generation);
                ReloadStatus {
                    at: now(&self.clock),
                    ok: true,
                    errors: vec![],
                    warnings,
                }
            }
            Err(problems) => {
                let keeping = if self.current.load().is_some() {
                    "the previous rules keep running"
                } else {
                    "no rules are running: /webhook answers 503 until this is fixed"
                };
                for p in &problems {
                    error!("{p}");
                }
                warn!(problems = problems.len(), "rules not reloaded: {keeping}");
                ReloadStatus {
                    at: now(&self.clock),
                    ok: false,
                    errors: problems.iter().map(ToString::to_string).collect(),
                    warnings,
                }
            }
        };
        let ok = status.ok;
        let result = if ok { "ok" } else { "failed" };
        metrics::counter!(telemetry::RULES_RELOADS.name, "result" => result).increment(1);
        metrics::gauge!(telemetry::RULES_RELOAD_SUCCESS.name).set(if ok { 1.0 } else { 0.0 });
        metrics::gauge!(telemetry::RULES_LAST_RELOAD.name)
            .set(self.clock.now().timestamp_millis() as f64 / 1000.0);
        if let Some(set) = self.current.load().as_ref() {
            metrics::gauge!(telemetry::RULES_LOADED.name).set(set.rules().len() as f64);
        }
        *self.status.lock().unwrap_or_else(|p| p.into_inner()) = status;
        ok
    }
}

/// Watches the rules and templates folders and reloads `live` after each burst of changes.
/// The returned watcher must be kept alive for as long as watching should go on.
pub fn watch(live: Arc<LiveRules>) -> notify::Result<notify::RecommendedWatcher> {
    let changed = Arc::new(Notify::new());
    let signal = changed.clone();
    let mut watcher =
        notify::recommended_watcher(move |event: notify::Result<notify::Event>| match event {
            // Our own reads of the files show up as access events; they must not cause a reload.
            Ok(e) if matches!(e.kind, EventKind::Access(_)) => {}
            Ok(_) => signal.notify_one(),
            Err(e) => warn!("file watcher: {e}"),
        })?;
    // Recursive: a source's rules are in a folder of their own (`rules/<source>/`).
    watcher.watch(&live.declared.folders.rules, RecursiveMode::Recursive)?;
    if live.declared.folders.templates.is_dir() {
        watcher.watch(
            &live.declared.folders.templates,
            RecursiveMode::NonRecursive,
        )?;
    } else {
        warn!(dir = %live.declared.folders.templates.display(), "templates folder not found; not watching it");
    }
    tokio::spawn(async move {
        loop {
            changed.notified().await;
            // Debounce: wait until nothing has changed for QUIET, but no longer than AT_MOST.
            let deadline = tokio::time::Instant::now() + AT_MOST;
            while tokio::time::timeout(QUIET, changed.notified())
                .await
                .is_ok()
                && tokio::time::Instant::now() < deadline
            {}
            let live = live.clone();
            if let Err(e) = tokio::task::spawn_blocking(move || live.reload()).await {
                error!("reload task failed: {e}");
            }
        }
    });
    Ok(watcher)
}

/// The clock's time as RFC 3339 text.
fn now(clock: &Clock) -> String {
    clock.now().to_rfc3339_opts(SecondsFormat::Millis, true)
}
