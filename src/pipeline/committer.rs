//! Group commit: one thread makes the effects of many requests durable at once.
//!
//! Requests hand their decoded events to the committer and wait. The committer takes every
//! request waiting at that moment (a batch), and in one database transaction: skips events whose
//! `uuid` was handled before, runs the rules (counters, once-keys), queues emails in the outbox,
//! queues the batch's JSONL lines for their files, and commits (redb syncs). Only then does any
//! request of the batch get its answer. One sync per batch instead of one per event is what keeps
//! throughput high with durable acknowledgements. The appender (`appender.rs`) then writes the
//! lines into their files, off the acknowledgement path; the committer records how far it got
//! in its next transaction.
//!
//! If anything fails, the transaction is dropped (no state change, no line queued), and every
//! request of the batch gets an error (503: PostHog retries). A panic while a batch runs is
//! caught and handled the same way, so one bad batch never stops the committer. A file whose
//! lines cannot be written (its disk is full) holds them in the store up to
//! `max_lines_waiting_bytes`; past that, the requests with more lines for it get a 503 and the
//! others of the batch go on.
//!
//! An output file that cannot be opened because of its path (a folder in the way, a name too
//! long) is the rule's fault, not the batch's: that action fails on its own (reported in the
//! reply, `GET /rules` and the metrics) while the rule's other actions and every other rule go on. It is tried again every
//! [`RETRY_UNWRITABLE`], and with every new rule set.

use indexmap::IndexMap;
use lettre::message::Mailbox;
use std::collections::{HashMap, HashSet};
use std::panic::AssertUnwindSafe;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};
use tokio::sync::{Notify, mpsc, oneshot, watch};
use tracing::{debug, error, info, warn};

use crate::actions::jsonl::{self, JsonlFiles, Unwritable};
use crate::actions::{Env, Output};
use crate::actions::{aggregate, remember};
use crate::clock::Clock;
use crate::config::{Durability, WaitSettings};
use crate::engine::{self, DuePlan, Effect, Outcome, Plan, Report};
use crate::explain;
use crate::ingest::event::Event;
use crate::pipeline::activity::{Activity, Firing, RuleActivity};
use crate::pipeline::appender::{Appender, Backlog, Waiting};
use crate::pipeline::journal::{self, Journal};
use crate::rules::RuleSet;
use crate::store::queue::OutboxRecord;
use crate::store::{Backend, Batch, StoreError, Wants};
use crate::telemetry;

/// Most requests in one batch.
const MAX_BATCH: usize = 512;
/// How often event ids past their retention are looked for, in seconds.
const EXPIRE_EVERY: u64 = 3600;
/// Most expired ids forgotten per batch; while more remain, every batch forgets this many.
const EXPIRE_PER_COMMIT: usize = 1000;
/// Keys of rule state looked at for idleness with each batch, and with each minute's tick: a
/// million keys are all looked at within 100 minutes of a quiet service, sooner under load.
/// (256 per batch was 4% of the process's time under the threshold workload, by perf.)
const KEYS_LOOKED_AT_PER_BATCH: usize = 64;
const KEYS_LOOKED_AT_PER_TICK: usize = 10_000;
/// How often an output file that could not be opened is tried again, in seconds.
const RETRY_UNWRITABLE: u64 = 10;
/// Most due waits ended in one transaction, and most waits of removed rules dropped: more are
/// left to the next one, so that requests in between are never held up for long.
const WAITS_PER_COMMIT: usize = 500;

/// Why a batch was not made durable. The request should be retried.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CommitError {
    #[error("{0}")]
    Store(String),
    #[error("cannot write {file}: {reason}")]
    Output { file: PathBuf, reason: String },
    #[error("the service is shutting down")]
    Stopped,
    #[error("an internal error stopped this batch (it changed nothing): {0}")]
    Panicked(String),
    /// The store holds fewer batches than were committed (see `journal.rs`): they are run again
    /// from the journal first.
    #[error("the state store lost batches committed without a sync; they are run again first")]
    Behind,
    /// Another instance changed the same state at once (see [`StoreError::Conflict`]): the
    /// batch is run again.
    #[error("{0}")]
    Conflict(String),
}

impl From<StoreError> for CommitError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Conflict(_) => CommitError::Conflict(e.to_string()),
            e => CommitError::Store(e.to_string()),
        }
    }
}

/// How many times a batch is run again after conflicts with other instances before its
/// requests are answered with an error (and retried by their senders).
const CONFLICT_RETRIES: u32 = 20;

/// How long things are remembered.
#[derive(Debug, Clone, Copy)]
pub struct Retention {
    /// Event ids, so that a retried delivery has no second effect.
    pub event_ids: Duration,
    /// A key's counter, window and action mark, from the last event that used it.
    pub idle_state: Duration,
}

/// A signed request's Standard Webhooks delivery: its source and `webhook-id`.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Delivery {
    pub source: String,
    pub id: String,
}

/// Where a report's outcomes come from: the events of requests, or waits the timer ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    Events,
    Timer,
}

/// What the committer is asked to do.
enum Job {
    /// Make a request's events durable.
    Request(Request),
    /// Do the housekeeping that time makes due (forget expired ids and idle keys), even when no
    /// request comes.
    Tick(oneshot::Sender<Result<(), CommitError>>),
    /// End the waits that are due under these rules, and drop those of rules that no longer
    /// wait; answered with whether more are left.
    EndWaits(
        Arc<RuleSet>,
        oneshot::Sender<Result<(Report, bool), CommitError>>,
    ),
    /// With `--durability interval`: sync what was committed without a sync.
    Sync,
}

/// Ending waits in a batch: under which rules, and who to tell.
struct EndWaits {
    rules: Arc<RuleSet>,
    reply: Option<oneshot::Sender<Result<(Report, bool), CommitError>>>,
}

struct Request {
    rules: Arc<RuleSet>,
    events: Vec<Event>,
    /// Remembered once committed, so that a replay of the same signed request has no effect.
    delivery: Option<Delivery>,
    /// The report, with the events handed back: freeing them is the request's work, not the
    /// committer's (in replay's profile, dropping events was 5% of the samples, all on the
    /// committer thread, which bounds it).
    reply: oneshot::Sender<Result<(Report, Vec<Event>), CommitError>>,
    /// The request's span, entered while its events run, so their log lines carry it.
    span: tracing::Span,
    /// The request as the journal keeps it (`--durability interval`), made by the request's
    /// task.
    journal: Option<Vec<u8>>,
}

/// The handle requests use.
#[derive(Clone)]
pub struct Committer {
    jobs: mpsc::Sender<Job>,
    /// Whether requests are journaled (`--durability interval`).
    journaling: bool,
    shared: Arc<Shared>,
    lines: Backlog,
    next_wait: watch::Receiver<Option<i64>>,
}

/// What the committer thread shows the rest of the service.
struct Shared {
    /// What each rule did lately, for the status page.
    activity: Activity,
    /// Why the last batch failed on an internal error (a panic), until a batch succeeds.
    panicked: Mutex<Option<String>>,
    /// Output files that cannot be opened, with why.
    unwritable: Mutex<Unwritable>,
    /// For each rule, how late its last wait ended (seconds past its deadline and the grace).
    wait_lateness: Mutex<HashMap<String, f64>>,
    /// For each rule and reason, how many times it was held back since start.
    suppressed: Mutex<HashMap<(String, &'static str), u64>>,
}

/// What the committer thread owns.
struct Worker {
    store: Arc<dyn Backend>,
    /// To check that the rules' output files can be opened (the appender writes them).
    files: JsonlFiles,
    appender: Appender,
    /// Most bytes of lines that may wait for one file.
    max_lines_waiting: u64,
    registered: HashSet<PathBuf>,
    /// The last rule set whose files are all registered.
    checked: Option<Arc<RuleSet>>,
    /// The generation of the last rule set the store was told this instance runs.
    running: Option<u64>,
    default_from: Mailbox,
    retention: Retention,
    /// When ids were last looked for (unix seconds by the clock).
    last_expiry: Option<u64>,
    /// A pass found more expired ids than one batch forgets: go on with the next batch.
    expiring: bool,
    deliveries_queued: Arc<Notify>,
    unwritable: Unwritable,
    last_retry: u64,
    shared: Arc<Shared>,
    clock: Clock,
    waits: WaitSettings,
    /// The soonest deadline of a pending wait, for the timer (`pipeline/timers.rs`).
    next_wait: watch::Sender<Option<i64>>,
    /// The newest rule set seen (see [`Worker::newest_rules`]).
    newest: Option<Arc<RuleSet>>,
    /// The journal of batches, and the number of the last one committed (durable or not).
    journal: Journal,
    committed: u64,
    /// While the journal runs again: the entry running.
    replaying: Option<u64>,
    /// With `--durability interval`: what waits for the next sync.
    unsynced: Option<Unsynced>,
}

/// What `--durability interval` keeps between two syncs.
struct Unsynced {
    /// How often to sync.
    every: Duration,
    /// When the oldest commit not yet synced was made.
    since: Option<Instant>,
    /// Deliveries were queued since the last sync: the sender is told once they are durable.
    deliveries: bool,
    /// The last sync failed: every batch syncs until one succeeds.
    failing: bool,
    /// Commits told to the appender were lost: it reads what waits again at the next sync.
    reseed: bool,
}

/// What one round of housekeeping forgot.
#[derive(Debug, Default, PartialEq, Eq)]
struct Forgotten {
    /// Event and delivery ids past their retention; `None` when it was not time to look.
    expired: Option<usize>,
    /// Keys no event has used for `idle_state`.
    idle_keys: usize,
}

impl Committer {
    /// Starts the appender (which first brings the output files back to what was committed),
    /// then the committer thread. `deliveries_queued` is notified
    /// after each commit that queued emails; `clock` dates what is handled. The thread ends once
    /// every `Committer` is dropped.
    #[allow(clippy::too_many_arguments)]
    pub fn start(
        store: Arc<dyn Backend>,
        files: JsonlFiles,
        default_from: Mailbox,
        retention: Retention,
        waits: WaitSettings,
        max_lines_waiting: u64,
        deliveries_queued: Arc<Notify>,
        clock: Clock,
        durability: Durability,
    ) -> Result<(Committer, std::thread::JoinHandle<()>), CommitError> {
        let next_wait = watch::Sender::new(store.next_wait_due()?);
        // A journal left by a run in interval mode is run again in either mode.
        let journal = Journal::open(files.data_dir()).map_err(|e| {
            CommitError::Store(format!(
                "cannot open the journal in {}: {e}",
                files.data_dir().display()
            ))
        })?;
        let in_store = store.begin()?.journaled()?;
        if journal.last() > in_store {
            info!(
                entries = journal.last() - in_store,
                "batches acknowledged before a stop and not synced are run again from the journal"
            );
        }
        let committed = journal.last().max(in_store);
        let unsynced = match durability {
            Durability::Sync => None,
            Durability::Interval(every) => Some(Unsynced {
                every,
                since: None,
                deliveries: false,
                failing: false,
                reseed: false,
            }),
        };
        for (rule, n) in store.waiting()? {
            metrics::gauge!(telemetry::WAITS_PENDING.name, "rule" => rule).set(n as f64);
        }
        let (tx, mut rx) = mpsc::channel::<Job>(4 * MAX_BATCH);
        let appender = Appender::start(
            store.clone(),
            JsonlFiles::new(files.data_dir()),
            clock.clone(),
        )?;
        let mut worker = Worker {
            store,
            files,
            appender,
            max_lines_waiting,
            registered: HashSet::new(),
            checked: None,
            running: None,
            default_from,
            retention,
            last_expiry: None,
            expiring: false,
            deliveries_queued,
            unwritable: Unwritable::new(),
            last_retry: clock.unix(),
            shared: Arc::new(Shared {
                activity: Activity::new(clock.now().timestamp_millis()),
                panicked: Mutex::default(),
                unwritable: Mutex::default(),
                wait_lateness: Mutex::default(),
                suppressed: Mutex::default(),
            }),
            clock,
            waits,
            next_wait,
            newest: None,
            journal,
            committed,
            replaying: None,
            unsynced,
        };
        worker.share_unwritable();
        let shared = worker.shared.clone();
        let lines = worker.appender.view();
        let next_wait = worker.next_wait.subscribe();
        let handle = std::thread::Builder::new()
            .name("committer".into())
            .spawn(move || {
                // A request for another rule set than the batch's waits for the next batch.
                let mut carried: Option<Job> = None;
                loop {
                    let first = match carried.take() {
                        Some(job) => job,
                        None => match rx.blocking_recv() {
                            Some(job) => job,
                            None => break,
                        },
                    };
                    let mut batch: Vec<Request> = Vec::new();
                    let mut ticks = Vec::new();
                    let mut end_waits: Option<EndWaits> = None;
                    let mut sync = false;
                    let mut next = Some(first);
                    while let Some(job) = next {
                        match job {
                            // One rule set per batch: every key is worked out, loaded and
                            // changed under the same rules.
                            Job::Request(request)
                                if batch
                                    .first()
                                    .is_some_and(|b| !Arc::ptr_eq(&b.rules, &request.rules)) =>
                            {
                                carried = Some(Job::Request(request));
                                break;
                            }
                            Job::Request(request) => batch.push(request),
                            Job::Tick(reply) => ticks.push(reply),
                            // The newest rules; an older asker is answered as done.
                            Job::EndWaits(rules, reply) => {
                                if let Some(older) = end_waits.take().and_then(|e| e.reply) {
                                    let _ = older.send(Ok((Report::default(), true)));
                                }
                                end_waits = Some(EndWaits {
                                    rules,
                                    reply: Some(reply),
                                });
                            }
                            Job::Sync => sync = true,
                        }
                        next = (batch.len() < MAX_BATCH)
                            .then(|| rx.try_recv().ok())
                            .flatten();
                    }
                    if !batch.is_empty() || end_waits.is_some() {
                        worker.process(batch, end_waits);
                    }
                    for reply in ticks {
                        let _ = reply.send(worker.tick());
                    }
                    worker.sync_if_due(sync);
                }
                // What is committed is synced, written into the files, and recorded, before
                // stopping.
                worker.sync_if_due(true);
                worker.appender.stop();
                if let Err(e) = worker.tick() {
                    warn!("could not record how far the output files are written ({e}); the next start finds it in the files");
                }
                worker.sync_if_due(true);
                info!("committer stopped");
            })
            .map_err(|e| CommitError::Store(format!("cannot start the committer thread: {e}")))?;
        if let Durability::Interval(every) = durability {
            // Asks for a sync every interval, for as long as the committer runs.
            let jobs = tx.downgrade();
            std::thread::Builder::new()
                .name("sync-ticker".into())
                .spawn(move || {
                    loop {
                        std::thread::sleep(every);
                        let Some(jobs) = jobs.upgrade() else { break };
                        // A full queue means batches are flowing, and each one syncs when due.
                        let _ = jobs.try_send(Job::Sync);
                    }
                })
                .map_err(|e| CommitError::Store(format!("cannot start the sync ticker: {e}")))?;
        }
        Ok((
            Committer {
                jobs: tx,
                journaling: matches!(durability, Durability::Interval(_)),
                shared,
                lines,
                next_wait,
            },
            handle,
        ))
    }

    /// Ends the waits due now under `rules` (at most a transaction's worth) and drops those of
    /// rules that no longer wait; returns what the ended waits did, and whether more are left
    /// for another call.
    pub async fn end_waits(&self, rules: Arc<RuleSet>) -> Result<(Report, bool), CommitError> {
        let (reply, answer) = oneshot::channel();
        self.jobs
            .send(Job::EndWaits(rules, reply))
            .await
            .map_err(|_| CommitError::Stopped)?;
        answer.await.map_err(|_| CommitError::Stopped)?
    }

    /// The soonest deadline of a pending wait (milliseconds since 1970), kept up to date by each
    /// commit.
    pub fn next_wait(&self) -> watch::Receiver<Option<i64>> {
        self.next_wait.clone()
    }

    /// For each rule, how many times it was held back since start, per reason (for
    /// `GET /rules`).
    pub fn suppressed(&self) -> HashMap<(String, &'static str), u64> {
        self.shared
            .suppressed
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// What each rule did in the last hour and day, and the latest firings (for `GET /status`);
    /// and since when it is counted.
    pub fn activity(&self, now_ms: i64) -> (Vec<RuleActivity>, Vec<Firing>, i64) {
        let (rules, recent) = self.shared.activity.snapshot(now_ms);
        (rules, recent, self.shared.activity.started_ms())
    }

    /// For each rule, how late its last wait ended, in seconds (for `GET /rules`).
    pub fn wait_lateness(&self) -> HashMap<String, f64> {
        self.shared
            .wait_lateness
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Makes the effects of `events` durable; returns once they are. A `delivery` already
    /// committed makes them duplicates.
    pub async fn submit(
        &self,
        rules: Arc<RuleSet>,
        events: Vec<Event>,
        delivery: Option<Delivery>,
    ) -> Result<Report, CommitError> {
        let (reply, answer) = oneshot::channel();
        let journal = self
            .journaling
            .then(|| journal::record(&events, delivery.as_ref()));
        self.jobs
            .send(Job::Request(Request {
                rules,
                events,
                delivery,
                reply,
                span: tracing::Span::current(),
                journal,
            }))
            .await
            .map_err(|_| CommitError::Stopped)?;
        let (report, _events) = answer.await.map_err(|_| CommitError::Stopped)??;
        Ok(report)
    }

    /// Asks for the housekeeping that time makes due; returns once it is done.
    pub async fn tick(&self) -> Result<(), CommitError> {
        let (reply, answer) = oneshot::channel();
        self.jobs
            .send(Job::Tick(reply))
            .await
            .map_err(|_| CommitError::Stopped)?;
        answer.await.map_err(|_| CommitError::Stopped)?
    }

    /// `Ok` while batches commit; otherwise what is wrong (for `/readyz`).
    pub fn health(&self) -> Result<(), String> {
        if self.jobs.is_closed() {
            return Err("the committer has stopped: restart the service".into());
        }
        self.lines.health()?;
        match &*self
            .shared
            .panicked
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
        {
            Some(why) => Err(format!("the last batch failed on an internal error: {why}")),
            None => Ok(()),
        }
    }

    /// The output files with acknowledged lines not yet written into them (for `/readyz`).
    pub fn lines_waiting(&self) -> HashMap<String, Waiting> {
        self.lines.waiting()
    }

    /// Output files that cannot be opened now, with why (for `GET /rules`).
    pub fn unwritable(&self) -> Unwritable {
        self.shared
            .unwritable
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

impl Worker {
    /// Shows the unwritable files to the rest of the service.
    fn share_unwritable(&self) {
        *self
            .shared
            .unwritable
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = self.unwritable.clone();
    }

    fn process(&mut self, mut batch: Vec<Request>, mut end_waits: Option<EndWaits>) {
        // Waits end under the newest rules; if those are not the requests' rules, apart from
        // them, so that each commit decides under one rule set.
        if let (Some(first), Some(waits)) = (batch.first(), &end_waits) {
            let newest = self.newest_rules(&batch, &waits.rules);
            if !Arc::ptr_eq(&newest, &first.rules) {
                self.process(std::mem::take(&mut batch), None);
            }
        }
        loop {
            let mut files_of = Vec::new();
            // A panic must not take the committer (and so the whole service) down: the batch
            // fails like any other failed batch, and the next one starts afresh.
            let rules = end_waits
                .as_ref()
                .map(|e| self.newest_rules(&batch, &e.rules));
            let result = std::panic::catch_unwind(AssertUnwindSafe(|| {
                let mut conflicts = 0;
                loop {
                    files_of.clear();
                    match self.commit_batch(&batch, rules.as_ref(), &mut files_of) {
                        Err(CommitError::Behind) => {
                            // Under the rules of this batch, the newest.
                            let newest = batch.first().map(|b| &b.rules).or(rules.as_ref());
                            self.catch_up(newest.expect("a batch has requests or waits"))?;
                            files_of.clear();
                            return self.commit_batch(&batch, rules.as_ref(), &mut files_of);
                        }
                        // The engine decides on what the batch loaded, so running it again
                        // decides on what the other instance committed.
                        Err(CommitError::Conflict(why)) if conflicts < CONFLICT_RETRIES => {
                            conflicts += 1;
                            metrics::counter!(telemetry::BATCHES_CONFLICTED.name).increment(1);
                            debug!(conflicts, "batch run again after a conflict: {why}");
                        }
                        other => return other,
                    }
                }
            }))
            .unwrap_or_else(|panic| {
                let why = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "a panic".into());
                metrics::counter!(telemetry::BATCHES_PANICKED.name).increment(1);
                Err(CommitError::Panicked(why))
            });
            // A panic while the journal ran again must not leave later batches as if it were.
            self.replaying = None;
            *self
                .shared
                .panicked
                .lock()
                .unwrap_or_else(PoisonError::into_inner) = match &result {
                Err(CommitError::Panicked(why)) => Some(why.clone()),
                _ => None,
            };
            let e = match result {
                Ok((reports, ended, more)) => {
                    for (job, report) in batch.into_iter().zip(reports) {
                        let _ = job.reply.send(Ok((report, job.events)));
                    }
                    if let Some(reply) = end_waits.and_then(|e| e.reply) {
                        let _ = reply.send(Ok((ended.unwrap_or_default(), more)));
                    }
                    return;
                }
                Err(e) => e,
            };
            error!("batch of {} requests not committed: {e}", batch.len());
            // Ending waits is not retried here (the timer asks again), and whatever failed, the
            // requests are tried once more without it: a wait that cannot end (its file is
            // full, its record unreadable) never holds up the requests.
            if let Some(waits) = end_waits.take() {
                if let Some(reply) = waits.reply {
                    let _ = reply.send(Err(e.clone()));
                }
                if batch.is_empty() {
                    return;
                }
                continue;
            }
            // A file with too many lines waiting (its disk is full, say) fails the requests with
            // lines for it; the others of the batch are committed without them.
            let blocked = match &e {
                CommitError::Output { file, .. } => Some(file.clone()),
                _ => None,
            };
            let (failed, rest): (Vec<_>, Vec<_>) =
                batch.into_iter().enumerate().partition(|(i, _)| {
                    match (&blocked, files_of.get(*i)) {
                        (Some(file), Some(files)) => files.contains(file),
                        _ => true,
                    }
                });
            // Nothing set apart means nothing to retry without: the whole batch fails.
            let (failed, rest) = if failed.is_empty() {
                (rest, Vec::new())
            } else {
                (failed, rest)
            };
            for (_, job) in failed {
                let _ = job.reply.send(Err(e.clone()));
            }
            if rest.is_empty() {
                return;
            }
            batch = rest.into_iter().map(|(_, job)| job).collect();
        }
    }

    /// The rules to end waits under: the newest set the committer has seen, in this batch's
    /// requests, the timer's ask or before. A set older than one a request already used must
    /// never decide that a rule is gone (its waits would be dropped).
    fn newest_rules(&mut self, batch: &[Request], asked: &Arc<RuleSet>) -> Arc<RuleSet> {
        let sets = batch.iter().map(|job| &job.rules).chain([asked]);
        for set in sets {
            if self
                .newest
                .as_ref()
                .is_none_or(|n| set.generation > n.generation)
            {
                self.newest = Some(set.clone());
            }
        }
        self.newest.clone().unwrap_or_else(|| asked.clone())
    }

    /// Runs the batch in one transaction, and with `end_waits` ends the waits due under those
    /// rules too; records how far the appender wrote. `files_of` collects the files each
    /// request's lines go to. Returns each request's report, what the ended waits did, and
    /// whether waits are left to end or drop.
    fn commit_batch(
        &mut self,
        batch: &[Request],
        end_waits: Option<&Arc<RuleSet>>,
        files_of: &mut Vec<Vec<PathBuf>>,
    ) -> Result<(Vec<Report>, Option<Report>, bool), CommitError> {
        #[cfg(test)]
        if batch.iter().any(|job| {
            job.events
                .iter()
                .any(|e| e.name() == "panic in the committer")
        }) {
            panic!("asked to by a test");
        }
        // Waits due by the clock, less the grace period for events still on their way.
        let now_ms = self.clock.now().timestamp_millis();
        let grace_ms = i64::try_from(self.waits.grace.as_millis()).unwrap_or(i64::MAX);
        let due_by = now_ms.saturating_sub(grace_ms);
        // The files of the rules under which waits end are opened (and their length recorded)
        // like those of requests, but only when some wait is due: nothing is opened for nothing.
        let due_now = self.next_wait.borrow().is_some_and(|at| at <= due_by);
        // A batch is of one rule set.
        let sets: Vec<&Arc<RuleSet>> = (batch.first().map(|job| &job.rules).into_iter())
            .chain(end_waits.filter(|_| due_now))
            .collect();
        self.register_new_files(&sets)?;
        self.register_rules(batch.first().map(|job| &job.rules).or(end_waits))?;
        let now = self.clock.unix();
        let mut txn = self.store.begin()?;
        // Only commits without a sync, or a journal left from before, can leave the store
        // behind: in sync mode, once caught up, no batch reads it.
        let may_be_behind = self.unsynced.is_some() || !self.journal.is_empty();
        if may_be_behind && self.replaying.is_none() && txn.journaled()? < self.committed {
            return Err(CommitError::Behind);
        }
        let forgotten = self.forget(txn.as_mut(), now, KEYS_LOOKED_AT_PER_BATCH)?;
        let written = self.appender.written();
        for (file, applied, len) in &written {
            txn.applied(file, *applied, *len)?;
        }
        // The whole batch's rule state is loaded at once, decided on, and saved at once.
        let mut plans = Vec::with_capacity(batch.len());
        for job in batch {
            let _request = job.span.enter();
            if let Some(d) = &job.delivery
                && !txn.first_signed_delivery(&d.source, &d.id, now)?
            {
                debug!(
                    webhook.id = %d.id,
                    "signed delivery handled before: a replay or retry has no second effect"
                );
                plans.push(None);
                continue;
            }
            plans.push(Some(Plan::new(&job.rules, &job.events)));
        }
        let (due, dropped) = match end_waits {
            Some(rules) => (
                Some(DuePlan::new(
                    rules,
                    txn.due_waits(due_by, WAITS_PER_COMMIT)?,
                )),
                drop_waits_of_gone_rules(txn.as_mut(), rules)?,
            ),
            None => (None, Vec::new()),
        };
        // Asked to end waits, with nothing to end or drop, nothing else to do and nothing
        // forgotten: no commit (and no sync) at all. (The waits the timer expected may have
        // been ended by requests meanwhile: it is told the soonest deadline again. One the store
        // says is due but could not read is a stale index entry, removed by committing.)
        let idle = batch.is_empty()
            && due.as_ref().is_none_or(|d| d.is_empty())
            && dropped.is_empty()
            && written.is_empty()
            && forgotten.idle_keys == 0
            && forgotten.expired.is_none_or(|n| n == 0);
        if idle {
            let next = self.store.next_wait_due()?;
            if next.is_none_or(|at| at > due_by) {
                drop(txn);
                self.forgot(forgotten, now);
                self.next_wait.send_replace(next);
                return Ok((Vec::new(), Some(Report::default()), false));
            }
        }
        let mut wants = Wants::default();
        for (job, plan) in batch.iter().zip(&plans) {
            if let Some(plan) = plan {
                plan.add_wants(&job.rules, &job.events, &mut wants);
            }
        }
        if let Some(due) = &due {
            due.add_wants(&mut wants);
        }
        let mut state = txn.load(&wants)?;
        let mut limits = Vec::new();
        for (job, plan) in batch.iter().zip(&plans) {
            if let Some(plan) = plan {
                limits.extend(plan.limits_of_waits(&job.rules, &state));
            }
        }
        if !limits.is_empty() {
            state.merge(txn.load(&Wants::keys(&limits))?);
        }
        let env = Env {
            default_from: &self.default_from,
            unwritable: &self.unwritable,
            max_pending_waits: self.waits.max_pending_per_rule,
            waits_due_by_ms: due_by,
        };
        let mut reports = Vec::with_capacity(batch.len());
        let mut effects = Vec::new();
        let mut lines: IndexMap<PathBuf, String> = IndexMap::new();
        let mut tally = Tally::default();
        for (job, plan) in batch.iter().zip(&plans) {
            let _request = job.span.enter();
            let Some(plan) = plan else {
                reports.push(Report {
                    duplicates: job.events.len(),
                    ..Report::default()
                });
                files_of.push(Vec::new());
                continue;
            };
            let mut report = plan.decide(&job.rules, &job.events, &mut state, &env, &mut effects);
            let load = |wants: &Wants| txn.load(wants);
            engine::follow_suppressions(
                &job.rules,
                &mut report,
                &mut state,
                load,
                &env,
                &mut effects,
            )?;
            keep_explanations(txn.as_mut(), &job.rules, &job.events, &report, now_ms)?;
            reports.push(report);
            files_of.push(take_effects(
                &mut effects,
                &job.rules,
                txn.as_mut(),
                now,
                &mut lines,
                &mut tally,
            )?);
        }
        // Waits end after the batch's events: one stamped before a deadline still counts.
        let mut late = Vec::new();
        let ended = match (&due, end_waits) {
            (Some(due), Some(rules)) => {
                let mut report =
                    due.decide(rules, &mut state, due_by, &env, &mut effects, &mut late);
                let load = |wants: &Wants| txn.load(wants);
                engine::follow_suppressions(
                    rules,
                    &mut report,
                    &mut state,
                    load,
                    &env,
                    &mut effects,
                )?;
                keep_explanations(txn.as_mut(), rules, &[], &report, now_ms)?;
                take_effects(
                    &mut effects,
                    rules,
                    txn.as_mut(),
                    now,
                    &mut lines,
                    &mut tally,
                )?;
                Some(report)
            }
            _ => None,
        };
        let (soonest, waiting) = state.wait_changes();
        txn.save(state, now)?;
        // In the order of their names: a store several instances share locks each file as its
        // lines are numbered, and two batches must never wait for each other's files both ways.
        lines.sort_keys();
        let mut queued = Vec::with_capacity(lines.len());
        for (file, text) in &lines {
            let name = file.to_string_lossy();
            if let Some(w) = self.appender.backlog(&name)
                && w.bytes + text.len() as u64 > self.max_lines_waiting
            {
                let why = w.error.unwrap_or_else(|| "it is being written".into());
                return Err(CommitError::Output {
                    file: file.clone(),
                    reason: format!(
                        "{} MB of lines already wait to be written into it ({why})",
                        w.bytes >> 20
                    ),
                });
            }
            let seq = txn.queue_lines(&name, text, now_ms)?;
            queued.push((name.into_owned(), seq, text.len() as u64));
        }
        let journaled = self.journal_batch(batch, txn.as_mut())?;
        let durable = self.commit(txn, journaled.is_some())?;
        if let Some(seq) = journaled {
            // A batch run again from the journal never lowers it.
            self.committed = self.committed.max(seq);
        }
        self.appender.recorded(&written);
        self.appender.queued(queued, now_ms, durable);
        for ((kind, rule), n) in tally.done {
            metrics::counter!(telemetry::ACTIONS_SUCCEEDED.name, "kind" => kind, "rule" => rule)
                .increment(n);
        }
        for ((kind, rule), n) in tally.failed {
            metrics::counter!(telemetry::ACTIONS_FAILED.name, "kind" => kind, "rule" => rule)
                .increment(n);
        }
        self.forgot(forgotten, now);
        if tally.queued > 0 {
            match &mut self.unsynced {
                Some(unsynced) if !durable => unsynced.deliveries = true,
                _ => self.deliveries_queued.notify_one(),
            }
        }
        for (job, report) in batch.iter().zip(&reports) {
            self.record_outcomes(&job.rules, report, Source::Events);
        }
        for (rule, n) in waiting {
            metrics::gauge!(telemetry::WAITS_PENDING.name, "rule" => rule).set(n as f64);
        }
        let mut more = false;
        if let (Some(report), Some(due), Some(rules)) = (&ended, &due, end_waits) {
            self.record_outcomes(rules, report, Source::Timer);
            self.ended_late(rules, &late, now_ms, grace_ms);
            more = due.len() == WAITS_PER_COMMIT;
        }
        for (rule, n, left) in &dropped {
            warn!(
                rule,
                dropped = n,
                "dropped pending waits: their rule no longer waits (deleted, renamed or without [wait])"
            );
            metrics::counter!(telemetry::WAITS_DROPPED.name, "rule" => rule.clone(), "reason" => "rule_gone")
                .increment(*n);
            metrics::gauge!(telemetry::WAITS_PENDING.name, "rule" => rule.clone())
                .set(*left as f64);
            more |= *n == WAITS_PER_COMMIT as u64;
        }
        if let Some(report) = &ended {
            for rule in &report.dropped {
                metrics::counter!(telemetry::WAITS_DROPPED.name, "rule" => rule.clone(), "reason" => "rule_gone")
                    .increment(1);
            }
        }
        // The timer sleeps until the soonest deadline: read again once waits ended or were
        // dropped, else lowered by any earlier deadline this batch set.
        if ended.is_some() {
            self.next_wait.send_replace(self.store.next_wait_due()?);
        } else if let Some(at) = soonest {
            self.next_wait.send_if_modified(|next| {
                let sooner = next.is_none_or(|n| at < n);
                if sooner {
                    *next = Some(at);
                }
                sooner
            });
        }
        Ok((reports, ended, more))
    }

    /// Writes the batch's requests into the journal (`--durability interval`) and records its
    /// number in `txn`; while the journal runs again, records the entry's number. Returns the
    /// number, if any.
    fn journal_batch(
        &mut self,
        batch: &[Request],
        txn: &mut dyn Batch,
    ) -> Result<Option<u64>, CommitError> {
        if let Some(seq) = self.replaying {
            txn.set_journaled(seq)?;
            return Ok(Some(seq));
        }
        let records: Vec<&[u8]> = batch.iter().filter_map(|r| r.journal.as_deref()).collect();
        if records.is_empty() {
            return Ok(None);
        }
        // In the transaction first: an entry in the journal is always followed by its commit
        // (or taken back out).
        let seq = self.committed + 1;
        txn.set_journaled(seq)?;
        self.journal
            .append(seq, &records)
            .map_err(|e| CommitError::Store(format!("cannot write the journal: {e}")))?;
        Ok(Some(seq))
    }

    /// Commits `txn`: without a sync in interval mode (unless syncs are failing), else durably.
    /// A batch written into the journal (`journaled`) that fails to commit is taken out of it
    /// again. Returns whether the commit is durable.
    fn commit(&mut self, txn: Box<dyn Batch>, journaled: bool) -> Result<bool, CommitError> {
        let unsynced = self.unsynced.as_ref().is_some_and(|u| !u.failing);
        let committed = match unsynced {
            true => txn.commit_unsynced(),
            false => txn.commit(),
        };
        if let Err(e) = committed {
            if journaled && self.replaying.is_none() {
                self.journal.retract_last().map_err(|why| {
                    CommitError::Store(format!("{e}; and the journal cannot be cut back: {why}"))
                })?;
            }
            return Err(e.into());
        }
        match &mut self.unsynced {
            Some(u) if unsynced => {
                u.since.get_or_insert_with(Instant::now);
            }
            _ => self.synced(),
        }
        Ok(!unsynced)
    }

    /// With `--durability interval`, syncs what was committed without a sync, if the oldest
    /// such commit is an interval old or `now` asks for it.
    fn sync_if_due(&mut self, now: bool) {
        let Some(unsynced) = &mut self.unsynced else {
            return;
        };
        let Some(since) = unsynced.since else {
            return;
        };
        if !now && since.elapsed() < unsynced.every {
            return;
        }
        match self.store.sync() {
            Ok(()) => self.synced(),
            Err(e) => {
                if !unsynced.failing {
                    error!("cannot sync the state store, every batch is synced until it can: {e}");
                }
                unsynced.failing = true;
                // What the store lost is run again from the journal by the next batch.
                unsynced.reseed = true;
            }
        }
    }

    /// Everything committed is durable: the appender and the sender may act on it, and the
    /// journal is emptied. Unless the store lost commits on the way (reopened after a failed
    /// write, by this thread or the sender's): then nothing is released and the journal is
    /// kept, for the next batch to run again.
    fn synced(&mut self) {
        if self.replaying.is_none() && !self.journal.is_empty() {
            let held = self.store.begin().and_then(|mut txn| txn.journaled());
            if held.is_err() || held.is_ok_and(|held| held < self.committed) {
                if let Some(unsynced) = &mut self.unsynced {
                    unsynced.reseed = true;
                }
                return;
            }
        }
        if let Some(unsynced) = &mut self.unsynced {
            unsynced.since = None;
            if unsynced.failing {
                info!("the state store syncs again");
                unsynced.failing = false;
            }
            if unsynced.reseed {
                if let Err(e) = self.appender.reseed(self.store.as_ref()) {
                    // Lines told of may have been lost: none is released until it is read.
                    error!("cannot read the lines waiting for their files again: {e}");
                    return;
                }
                unsynced.reseed = false;
            }
            if std::mem::take(&mut unsynced.deliveries) {
                self.deliveries_queued.notify_one();
            }
            // (In sync mode each commit's lines are told of as durable already.)
            self.appender.synced();
        }
        // Not while it runs again: its later entries are not in the store yet.
        if self.replaying.is_none()
            && let Err(e) = self.journal.clear()
        {
            // Its entries are all in the store: a start skips them.
            warn!("cannot empty the journal: {e}");
        }
    }

    /// The store holds fewer batches than were committed (a kill in interval mode, or the
    /// database reopened after a failed write): runs the journal's entries after what it holds
    /// again, in order, under `rules`.
    fn catch_up(&mut self, rules: &Arc<RuleSet>) -> Result<(), CommitError> {
        let held = self.store.begin()?.journaled()?;
        let entries = self
            .journal
            .entries_after(held)
            .map_err(|e| CommitError::Store(format!("cannot read the journal: {e}")))?;
        if let Some(unsynced) = &mut self.unsynced {
            unsynced.reseed = true;
        }
        info!(
            batches = entries.len(),
            "running again the batches acknowledged and not in the state store"
        );
        for entry in entries {
            let batch: Vec<Request> = entry
                .requests
                .into_iter()
                .map(|r| Request {
                    rules: rules.clone(),
                    events: r.events,
                    delivery: r.delivery,
                    reply: oneshot::channel().0,
                    span: tracing::info_span!("journal", entry = entry.seq),
                    journal: None,
                })
                .collect();
            self.replaying = Some(entry.seq);
            let ran = self.commit_batch(&batch, None, &mut Vec::new());
            self.replaying = None;
            ran?;
        }
        // Entries that could not be read back are given up, so that the next batch goes on.
        let mut txn = self.store.begin()?;
        if txn.journaled()? < self.committed {
            error!("some acknowledged batches could not be run again from the journal (see above)");
            txn.set_journaled(self.committed)?;
            self.commit(txn, false)?;
        }
        Ok(())
    }

    /// Counts what each rule did in a committed `report`, once, in the metrics: matches (events
    /// only), fires, suppressions per reason (also kept for `GET /rules`), held actions, and
    /// what waits did (started, cancelled, ended by acting or not, refused). A rule with
    /// `[wait]` only acts when a wait ends.
    fn record_outcomes(&self, rules: &RuleSet, report: &Report, source: Source) {
        let mut held = None;
        let now_ms = self.clock.now().timestamp_millis();
        for ((index, outcome), about) in report.outcomes.iter().zip(&report.about) {
            let rule = &rules.rules()[*index];
            let name = || rule.name.clone();
            let matched = source == Source::Events;
            (self.shared.activity).record(now_ms, &rule.name, outcome, about, matched);
            if source == Source::Events {
                metrics::counter!(telemetry::RULE_MATCHES.name, "rule" => name()).increment(1);
            }
            if outcome.acted() {
                metrics::counter!(telemetry::RULE_FIRES.name, "rule" => name()).increment(1);
            }
            if let Some(reason) = outcome.suppressed() {
                metrics::counter!(telemetry::RULE_SUPPRESSIONS.name, "rule" => name(), "reason" => reason)
                    .increment(1);
                let held = held.get_or_insert_with(|| {
                    self.shared
                        .suppressed
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                });
                *held.entry((name(), reason)).or_default() += 1;
            }
            let wait_metric = match outcome {
                Outcome::Held { .. } => Some(telemetry::ACTIONS_HELD.name),
                Outcome::WaitRefused { .. } => {
                    metrics::counter!(telemetry::WAITS_DROPPED.name, "rule" => name(), "reason" => "max_pending")
                        .increment(1);
                    None
                }
                _ if rule.wait.is_none() => None,
                Outcome::Waiting { .. } => Some(telemetry::WAITS_STARTED.name),
                Outcome::Cancelled => Some(telemetry::WAITS_CANCELLED.name),
                o if o.acted() => Some(telemetry::WAITS_FIRED.name),
                Outcome::Expired { .. } | Outcome::Failed { .. } => {
                    Some(telemetry::WAITS_EXPIRED.name)
                }
                o if o.suppressed().is_some() => Some(telemetry::WAITS_EXPIRED.name),
                _ => None,
            };
            if let Some(metric) = wait_metric {
                metrics::counter!(metric, "rule" => name()).increment(1);
            }
        }
    }

    /// Records how late each ended wait was: past its deadline and the grace period.
    fn ended_late(&self, rules: &RuleSet, ended: &[(usize, i64)], now_ms: i64, grace_ms: i64) {
        let mut lateness = self
            .shared
            .wait_lateness
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        for (rule, deadline) in ended {
            let late = now_ms
                .saturating_sub(deadline.saturating_add(grace_ms))
                .max(0) as f64
                / 1000.0;
            metrics::histogram!(telemetry::WAIT_LATENESS.name).record(late);
            lateness.insert(rules.rules()[*rule].name.clone(), late);
        }
    }

    /// Forgets, in `txn`, what time has made due: expired ids (when it is time to look, at most
    /// [`EXPIRE_PER_COMMIT`]) and the idle keys among the next `look_at`: a steady trickle with
    /// every batch rather than one long transaction.
    fn forget(
        &mut self,
        txn: &mut dyn Batch,
        now: u64,
        look_at: usize,
    ) -> Result<Forgotten, CommitError> {
        let look = self.expiring
            || self
                .last_expiry
                .is_none_or(|t| now.saturating_sub(t) >= EXPIRE_EVERY);
        let expired = if look {
            let cutoff = now.saturating_sub(self.retention.event_ids.as_secs());
            let ids = txn.expire_seen(cutoff, EXPIRE_PER_COMMIT)?;
            // Remembered events past their time go on the same pass, as many at most.
            let now_ms = i64::try_from(now).unwrap_or(i64::MAX).saturating_mul(1000);
            let remembered = txn.expire_remembered(now_ms, EXPIRE_PER_COMMIT)?;
            // And the days of `[aggregate]` counts older than their rules keep them.
            let date = chrono::DateTime::from_timestamp_millis(now_ms).unwrap_or_default();
            let today = crate::store::aggregates::day_number(date.date_naive());
            let aggregates = txn.expire_aggregates(today, EXPIRE_PER_COMMIT)?;
            Some(ids.max(remembered).max(aggregates))
        } else {
            None
        };
        let cutoff = now.saturating_sub(self.retention.idle_state.as_secs());
        let idle_keys = txn.forget_idle(cutoff, look_at)?;
        Ok(Forgotten { expired, idle_keys })
    }

    /// Once what [`Worker::forget`] did is committed: when to look again, and the logs.
    fn forgot(&mut self, forgotten: Forgotten, now: u64) {
        if forgotten.idle_keys > 0 {
            debug!(
                forgotten = forgotten.idle_keys,
                "forgot the state of keys no event has used for a long time"
            );
        }
        if let Some(expired) = forgotten.expired {
            self.last_expiry = Some(now);
            self.expiring = expired == EXPIRE_PER_COMMIT;
            if expired > 0 {
                info!(expired, "forgot event ids older than the retention period");
            }
        }
    }

    /// The housekeeping of a tick, in a transaction of its own, committed only if it forgot
    /// something.
    fn tick(&mut self) -> Result<(), CommitError> {
        let now = self.clock.unix();
        let mut txn = self.store.begin()?;
        let forgotten = self.forget(txn.as_mut(), now, KEYS_LOOKED_AT_PER_TICK)?;
        let written = self.appender.written();
        for (file, applied, len) in &written {
            txn.applied(file, *applied, *len)?;
        }
        if forgotten.idle_keys > 0
            || forgotten.expired.is_some_and(|n| n > 0)
            || !written.is_empty()
        {
            self.commit(txn, false)?;
            self.appender.recorded(&written);
        }
        self.forgot(forgotten, now);
        Ok(())
    }

    /// Tells the store the rules this instance runs, the first time a newer set is in use
    /// (see `Backend::running`: with a shared store, other instances then leave the waits of
    /// rules only this one runs to it).
    fn register_rules(&mut self, set: Option<&Arc<RuleSet>>) -> Result<(), CommitError> {
        let Some(set) = set.filter(|s| self.running.is_none_or(|g| s.generation > g)) else {
            return Ok(());
        };
        // Only rules that keep pending records: another instance running a rule of the same
        // name without (a deploy adding a `[wait]`) must not be taken to end its waits.
        let names: Vec<&str> = (set.rules().iter())
            .filter(|r| r.keeps_pending())
            .map(|r| r.name.as_str())
            .collect();
        self.store.running(&names)?;
        self.running = Some(set.generation);
        Ok(())
    }

    /// Opens the output files this batch may write for the first time and records their current
    /// length, in a transaction of its own, so that a crash during the batch can be undone at
    /// start-up. A file that cannot be opened because of its path is kept aside as unwritable
    /// (its rules fail alone); one that fails for the disk's sake fails the batch.
    fn register_new_files(&mut self, sets: &[&Arc<RuleSet>]) -> Result<(), CommitError> {
        let mut new = Vec::new();
        for set in sets {
            if self.checked.as_ref().is_some_and(|c| Arc::ptr_eq(c, set)) {
                continue;
            }
            for rule in set.rules() {
                for file in rule.actions.iter().filter_map(|a| a.file()) {
                    if !self.registered.contains(file) && !new.iter().any(|n| n == file) {
                        new.push(file.to_path_buf());
                    }
                }
            }
        }
        let now = self.clock.unix();
        if now.saturating_sub(self.last_retry) >= RETRY_UNWRITABLE {
            self.last_retry = now;
            for file in self.unwritable.keys() {
                if !new.contains(file) {
                    new.push(file.clone());
                }
            }
        }
        let mut opened = Vec::new();
        for file in new {
            match self.files.open(&file) {
                Ok(_) => {
                    if self.unwritable.remove(&file).is_some() {
                        info!(file = %file.display(), "the output file can be written again");
                    }
                    opened.push(file);
                }
                Err(e) if jsonl::is_path_error(&e) => {
                    if !self.unwritable.contains_key(&file) {
                        error!(file = %file.display(), "rules writing to this file fail until it can be opened: {e}");
                    }
                    self.unwritable.insert(file, e.to_string());
                }
                Err(e) => return Err(output_error(&file, e)),
            }
        }
        self.share_unwritable();
        if !opened.is_empty() {
            // A file written before keeps its record; a new one's lines go after what it holds.
            let mut txn = self.store.begin()?;
            for file in &opened {
                let len = self.files.len(file).map_err(|e| output_error(file, e))?;
                txn.start_file(&file.to_string_lossy(), len)?;
            }
            txn.commit()?;
            self.registered.extend(opened);
        }
        if let Some(last) = sets.last() {
            self.checked = Some((*last).clone());
        }
        Ok(())
    }
}

/// What a batch's actions did, for the metrics once committed: one counter update per (kind,
/// rule), not per event.
#[derive(Default)]
struct Tally {
    done: HashMap<(&'static str, String), u64>,
    failed: HashMap<(&'static str, String), u64>,
    queued: usize,
}

/// Makes the effects of one request (or of the waits that ended) part of the transaction:
/// lines gathered per file for one append, deliveries queued, failed deliveries recorded.
/// Returns the files the lines go to.
fn take_effects(
    effects: &mut Vec<Effect>,
    rules: &RuleSet,
    txn: &mut dyn Batch,
    now: u64,
    lines: &mut IndexMap<PathBuf, String>,
    tally: &mut Tally,
) -> Result<Vec<PathBuf>, CommitError> {
    let mut files = Vec::new();
    for effect in effects.drain(..) {
        let name = |i: usize| rules.rules()[i].name.as_str();
        match effect {
            Effect::Output {
                rule: i,
                output: Output::Line { file, line },
            } => {
                match lines.get_mut(&file) {
                    Some(text) => text.push_str(&line),
                    None => {
                        lines.insert(file.clone(), line);
                    }
                }
                if !files.contains(&file) {
                    files.push(file);
                }
                count(&mut tally.done, jsonl::KIND, name(i));
            }
            Effect::Output {
                rule: i,
                output: Output::Remember(remembered),
            } => {
                txn.remember(&remembered)?;
                count(&mut tally.done, remember::KIND, name(i));
            }
            Effect::Output {
                rule: i,
                output: Output::Aggregate(counted),
            } => {
                // Not counted when neither the event nor its person has a group: nothing failed.
                if txn.aggregate(&counted)? {
                    count(&mut tally.done, aggregate::KIND, name(i));
                }
            }
            // Counted once delivered, by the sender.
            Effect::Output {
                rule: i,
                output: Output::Delivery(delivery),
            } => {
                txn.queue(&OutboxRecord::new(name(i).to_string(), delivery, now))?;
                tally.queued += 1;
            }
            Effect::Failed {
                rule: i,
                kind,
                delivered,
                reason,
            } => {
                if delivered {
                    txn.record_failed(&OutboxRecord::not_made(
                        name(i).to_string(),
                        kind,
                        reason,
                        now,
                    ))?;
                }
                count(&mut tally.failed, kind, name(i));
            }
        }
    }
    Ok(files)
}

/// Writes, in `txn`, why each rule did or did not act on `events` (see `explain.rs`), and what
/// `report` adds for earlier events (waits they started that ended).
fn keep_explanations(
    txn: &mut dyn Batch,
    rules: &RuleSet,
    events: &[Event],
    report: &Report,
    now_ms: i64,
) -> Result<(), CommitError> {
    for (uuid, who, record) in explain::records(rules, events, report, now_ms) {
        txn.explain(&uuid, &who, &record)?;
    }
    Ok(())
}

/// Adds one to the tally of (kind, rule), copying the rule's name only the first time.
fn count(tally: &mut HashMap<(&'static str, String), u64>, kind: &'static str, rule: &str) {
    match tally.iter_mut().find(|((k, r), _)| *k == kind && r == rule) {
        Some((_, n)) => *n += 1,
        None => {
            tally.insert((kind, rule.to_string()), 1);
        }
    }
}

/// Drops, in `txn`, the pending waits (and held actions) of rules that no longer wait under
/// `rules` (deleted, renamed, or without `[wait]` and `[send_window]` now), at most [`WAITS_PER_COMMIT`] per rule; returns how many
/// per rule, and how many are left.
fn drop_waits_of_gone_rules(
    txn: &mut dyn Batch,
    rules: &RuleSet,
) -> Result<Vec<(String, u64, u64)>, CommitError> {
    let mut dropped = Vec::new();
    for (rule, pending) in txn.waiting()? {
        if rules.named(&rule).is_some_and(|(_, r)| r.keeps_pending()) {
            continue;
        }
        let n = txn.drop_waits(&rule, WAITS_PER_COMMIT)?;
        let left = match n < WAITS_PER_COMMIT as u64 {
            true => 0,
            false => pending.saturating_sub(n),
        };
        dropped.push((rule, n, left));
    }
    Ok(dropped)
}

fn output_error(file: &std::path::Path, e: std::io::Error) -> CommitError {
    CommitError::Output {
        file: file.to_path_buf(),
        reason: e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ingest::event::BodyLimits;
    use crate::store::redb::Db;

    /// A committer over one rule that writes every event's name to `out.jsonl`.
    struct Running {
        dir: tempfile::TempDir,
        committer: Committer,
        thread: std::thread::JoinHandle<()>,
        rules: Arc<RuleSet>,
        runtime: tokio::runtime::Runtime,
        clock: Clock,
    }

    impl Running {
        fn start() -> Running {
            Running::start_in(Durability::Sync)
        }

        fn start_in(durability: Durability) -> Running {
            Running::start_in_folder(tempfile::tempdir().unwrap(), durability)
        }

        fn start_in_folder(dir: tempfile::TempDir, durability: Durability) -> Running {
            let root = dir.path();
            std::fs::create_dir_all(root.join("rules")).unwrap();
            std::fs::write(
                root.join("rules/out.toml"),
                "name = \"out\"\n[when]\nevent = \"*\"\n[jsonl]\nfile = \"out.jsonl\"\nfields = { e = \"event\" }\n",
            )
            .unwrap();
            let rules = Arc::new(
                RuleSet::load(&crate::config::Declared::folders(
                    &root.join("rules"),
                    &root.join("templates"),
                    root,
                ))
                .unwrap(),
            );
            let clock = Clock::manual("2026-01-01T00:00:00Z".parse().unwrap());
            let (committer, thread) = Committer::start(
                Arc::new(Db::open(root).unwrap()),
                JsonlFiles::new(root),
                "t <t@localhost>".parse().unwrap(),
                Retention {
                    event_ids: Duration::from_secs(60),
                    idle_state: Duration::from_secs(86_400),
                },
                crate::config::WaitSettings::default(),
                64 << 20,
                Arc::new(Notify::new()),
                clock.clone(),
                durability,
            )
            .unwrap();
            let runtime = tokio::runtime::Builder::new_current_thread()
                .build()
                .unwrap();
            Running {
                dir,
                committer,
                thread,
                rules,
                runtime,
                clock,
            }
        }

        /// Submits one request of events with these names (`name#uuid` gives one a uuid).
        fn submit(
            &self,
            names: &[&str],
            delivery: Option<Delivery>,
        ) -> Result<Report, CommitError> {
            let events = names
                .iter()
                .map(|n| {
                    let body = match n.split_once('#') {
                        Some((n, uuid)) => format!(r#"{{"event":"{n}","uuid":"{uuid}"}}"#),
                        None => format!(r#"{{"event":"{n}"}}"#),
                    };
                    crate::ingest::event::decode(
                        body.as_bytes(),
                        self.clock.now(),
                        &crate::ingest::event::BodyLimits::LOCAL_FILES,
                    )
                    .unwrap()
                    .remove(0)
                })
                .collect();
            self.runtime
                .block_on(self.committer.submit(self.rules.clone(), events, delivery))
        }

        fn out(&self) -> PathBuf {
            self.dir.path().join("out.jsonl")
        }

        /// The output file once the appender has written every line acknowledged.
        fn written(&self) -> String {
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while !self.committer.lines_waiting().is_empty() {
                assert!(std::time::Instant::now() < deadline, "lines still wait");
                std::thread::sleep(Duration::from_millis(5));
            }
            std::fs::read_to_string(self.out()).unwrap_or_default()
        }

        /// Stops the committer; returns the folder, kept until it is dropped.
        fn stop(self) -> tempfile::TempDir {
            drop(self.committer);
            self.thread.join().unwrap();
            self.dir
        }
    }

    #[test]
    fn a_panic_fails_its_batch_and_the_next_one_commits() {
        let running = Running::start();
        let failed = running.submit(&["panic in the committer"], None);
        assert!(
            matches!(failed, Err(CommitError::Panicked(_))),
            "{failed:?}"
        );
        let health = running.committer.health();
        assert!(health.unwrap_err().contains("internal error"));
        let ok = running.submit(&["a"], None);
        assert!(ok.is_ok(), "{ok:?}");
        assert_eq!(running.committer.health(), Ok(()));
        assert_eq!(
            running.written(),
            "{\"e\":\"a\"}\n",
            "nothing of the failed batch"
        );
        running.stop();
    }

    #[test]
    fn lines_past_the_recorded_length_are_cut_off_before_the_next_append() {
        let running = Running::start();
        running.submit(&["a"], None).unwrap();
        // Someone else appended to the file.
        let mut text = running.written();
        text.push_str("{\"e\":\"never acknowledged\"}\n");
        std::fs::write(running.out(), text).unwrap();
        running.submit(&["b"], None).unwrap();
        assert_eq!(running.written(), "{\"e\":\"a\"}\n{\"e\":\"b\"}\n");
        running.stop();
    }

    #[test]
    fn requests_under_two_rule_sets_at_once_are_each_committed() {
        let running = Running::start();
        let root = running.dir.path();
        let reloaded = Arc::new(
            RuleSet::load(&crate::config::Declared::folders(
                &root.join("rules"),
                &root.join("templates"),
                root,
            ))
            .unwrap(),
        );
        let events = |name: &str| {
            let body = format!(r#"{{"event":"{name}"}}"#);
            let limits = &crate::ingest::event::BodyLimits::LOCAL_FILES;
            crate::ingest::event::decode(body.as_bytes(), running.clock.now(), limits).unwrap()
        };
        let c = &running.committer;
        // Queued together: the second set's request waits for a batch of its own, and the one
        // after it is not lost.
        let (a, b, d) = running.runtime.block_on(async {
            tokio::join!(
                c.submit(running.rules.clone(), events("a"), None),
                c.submit(reloaded.clone(), events("b"), None),
                c.submit(running.rules.clone(), events("d"), None),
            )
        });
        assert!(a.is_ok() && b.is_ok() && d.is_ok(), "{a:?} {b:?} {d:?}");
        assert_eq!(running.written().lines().count(), 3);
        running.stop();
    }

    #[test]
    fn a_signed_delivery_is_handled_once() {
        let running = Running::start();
        let delivery = || {
            Some(Delivery {
                source: "s".into(),
                id: "msg_1".into(),
            })
        };
        let first = running.submit(&["a", "b"], delivery()).unwrap();
        assert_eq!(first.duplicates, 0);
        let again = running.submit(&["a", "b"], delivery()).unwrap();
        assert_eq!(again.duplicates, 2);
        assert!(again.outcomes.is_empty());
        assert_eq!(running.written().lines().count(), 2);
        running.stop();
    }

    #[test]
    fn a_tick_forgets_ids_once_the_clock_is_past_their_retention() {
        let running = Running::start();
        assert_eq!(running.submit(&["a#u1"], None).unwrap().duplicates, 0);
        assert_eq!(running.submit(&["a#u1"], None).unwrap().duplicates, 1);
        // Within the hour, ids are not looked at again, whatever the retention.
        running.clock.advance(Duration::from_secs(120));
        running.runtime.block_on(running.committer.tick()).unwrap();
        assert_eq!(running.submit(&["a#u1"], None).unwrap().duplicates, 1);
        // Past the hour: the tick forgets u1 (60 s retention here) without any request.
        running.clock.advance(Duration::from_secs(3600));
        running.runtime.block_on(running.committer.tick()).unwrap();
        assert_eq!(running.submit(&["a#u1"], None).unwrap().duplicates, 0);
        assert_eq!(running.written().lines().count(), 2);
        running.stop();
    }

    #[test]
    fn in_interval_mode_lines_wait_for_the_sync_and_a_stop_syncs_them() {
        // No sync comes by itself during the test.
        let running = Running::start_in(Durability::Interval(Duration::from_secs(60)));
        running.submit(&["a#u1", "b"], None).unwrap();
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(
            std::fs::read_to_string(running.out()).unwrap_or_default(),
            "",
            "acknowledged, not durable: not in the file yet"
        );
        assert_eq!(running.committer.lines_waiting()["out.jsonl"].bytes, 20);
        let out = running.out();
        let dir = running.stop();
        assert_eq!(
            std::fs::read_to_string(out).unwrap(),
            "{\"e\":\"a\"}\n{\"e\":\"b\"}\n"
        );
        assert_eq!(
            std::fs::metadata(dir.path().join(journal::FILE_NAME))
                .unwrap()
                .len(),
            0,
            "synced: the journal is emptied"
        );
    }

    #[test]
    fn batches_of_the_journal_the_store_does_not_hold_run_again_once_before_the_next() {
        // An event id to expire, so that the first job after the next start (a tick) commits.
        let earlier = Running::start();
        earlier.submit(&["z#u0"], None).unwrap();
        let dir = earlier.stop();
        // As a kill in interval mode leaves them: two batches in the journal, not in the store.
        let events = |body: &str| {
            let now = Clock::wall().now();
            crate::ingest::event::decode(body.as_bytes(), now, &BodyLimits::LOCAL_FILES).unwrap()
        };
        let signed = Delivery {
            source: "s".into(),
            id: "msg_1".into(),
        };
        let mut journal = Journal::open(dir.path()).unwrap();
        let ab = events(r#"[{"event":"a","uuid":"u1"},{"event":"b"}]"#);
        let c = events(r#"{"event":"c","uuid":"u3"}"#);
        journal.append(1, &[&journal::record(&ab, None)]).unwrap();
        journal
            .append(2, &[&journal::record(&c, Some(&signed))])
            .unwrap();
        drop(journal);
        // Started in either mode. A tick's commit comes first and must not empty the journal;
        // the first batch runs its entries first.
        let running = Running::start_in_folder(dir, Durability::Sync);
        running.clock.advance(Duration::from_secs(7200));
        running.runtime.block_on(running.committer.tick()).unwrap();
        assert_eq!(
            running.submit(&["z#u0"], None).unwrap().duplicates,
            0,
            "expired"
        );
        assert_eq!(running.submit(&["d#u4"], None).unwrap().duplicates, 0);
        assert_eq!(running.submit(&["a#u1"], None).unwrap().duplicates, 1);
        assert_eq!(
            running.submit(&["c#u3"], Some(signed)).unwrap().duplicates,
            1
        );
        assert_eq!(
            running.written(),
            "{\"e\":\"z\"}\n{\"e\":\"a\"}\n{\"e\":\"b\"}\n{\"e\":\"c\"}\n{\"e\":\"z\"}\n{\"e\":\"d\"}\n"
        );
        // Once in the store, never again: not even the uuid-less `b`.
        let running = Running::start_in_folder(running.stop(), Durability::Sync);
        running.submit(&["e"], None).unwrap();
        assert_eq!(running.written().lines().count(), 7);
        running.stop();
    }
}
