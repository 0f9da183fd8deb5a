//! The timer of pending waits (`[wait]`): sleeps until the soonest deadline plus the grace
//! period, then asks the committer to end the waits that are due. The soonest deadline comes
//! from the store's due index and is lowered by each commit that sets an earlier one, so idle
//! waiting costs nothing: no polling of the pending waits. After each reload it asks too, so
//! that the waits of rules that are gone are dropped. With a store several instances share,
//! any of them ends a due wait (see `store/postgres/`), and each looks every second.

use std::sync::Arc;
use std::time::Duration;
use tracing::warn;

use crate::clock::Clock;
use crate::pipeline::committer::{CommitError, Committer};
use crate::pipeline::reload::LiveRules;

/// How long the timer sleeps at most before looking at the clock again: a wall clock that was
/// set forward, or a machine that slept, is noticed within this.
const LOOK_AGAIN: Duration = Duration::from_secs(60);
/// How long it waits before asking again after the committer failed.
const AFTER_FAILURE: Duration = Duration::from_secs(1);
/// With a store other instances share, how often the timer asks anyway: their waits come due
/// without this instance's commits telling it.
const SHARED_LOOK_AGAIN_MS: i64 = 1000;

/// Runs until the committer stops. With a `shared` store, it also asks every second.
pub async fn run(
    committer: Committer,
    live: Arc<LiveRules>,
    clock: Clock,
    grace: Duration,
    shared: bool,
) {
    let mut next = committer.next_wait();
    let mut reloaded = live.reloaded();
    // A first round at start: waits due while the service was stopped end, and those of rules
    // deleted meanwhile are dropped.
    reloaded.mark_changed();
    let grace_ms = i64::try_from(grace.as_millis()).unwrap_or(i64::MAX);
    loop {
        let mut due = next
            .borrow_and_update()
            .map(|at| at.saturating_add(grace_ms));
        if shared {
            let soon = clock.now().timestamp_millis() + SHARED_LOOK_AGAIN_MS;
            due = Some(due.map_or(soon, |at| at.min(soon)));
        }
        let woken = tokio::select! {
            () = sleep_until(&clock, due) => Wake::Time,
            changed = next.changed() => match changed {
                Ok(()) => continue,
                Err(_) => return,
            },
            changed = reloaded.changed() => match changed {
                Ok(()) => Wake::Reload,
                Err(_) => return,
            },
        };
        let time_is_up = due.is_some_and(|at| clock.now().timestamp_millis() >= at);
        if woken == Wake::Time && !time_is_up {
            continue;
        }
        // No rules loaded (the files had errors at start): nothing can end until a set loads.
        if live.snapshot().is_none() {
            if reloaded.changed().await.is_err() {
                return;
            }
            continue;
        }
        // The rules as they are at each round (a reload may come in between).
        while let Some(rules) = live.snapshot() {
            match committer.end_waits(rules).await {
                Ok((_, true)) => continue,
                Ok((_, false)) => break,
                Err(CommitError::Stopped) => return,
                Err(e) => {
                    warn!("pending waits could not be ended now, trying again shortly: {e}");
                    tokio::time::sleep(AFTER_FAILURE).await;
                    break;
                }
            }
        }
    }
}

#[derive(PartialEq, Eq)]
enum Wake {
    Time,
    Reload,
}

/// Sleeps until `at` by `clock` (at most [`LOOK_AGAIN`] on the system's clock), or for ever.
async fn sleep_until(clock: &Clock, at: Option<i64>) {
    match at {
        Some(at) => {
            let _ = tokio::time::timeout(LOOK_AGAIN, clock.sleep_until_ms(at)).await;
        }
        None => std::future::pending().await,
    }
}
