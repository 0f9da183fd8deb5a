//! Group commit: one thread makes the effects of many requests durable at once.
//!
//! Requests hand their decoded events to the committer and wait. The committer takes every
//! request waiting at that moment (a batch), and in one database transaction: skips events whose
//! `uuid` was handled before, runs the rules (counters, once-keys), queues emails in the outbox,
//! appends the batch's JSONL lines and syncs each file, records each file's new length, and
//! commits (redb syncs). Only then does any request of the batch get its answer. One sync per
//! batch instead of one per event is what keeps throughput high with durable acknowledgements.
//!
//! If anything fails, the transaction is dropped (no state change), lines written by the batch
//! are cut off again, and every request of the batch gets an error (503: PostHog retries).
//! Lines past a file's recorded length can only come from a batch that never committed (a crash);
//! they are cut off at start-up, before the senders retry those events.

use indexmap::IndexMap;
use lettre::message::Mailbox;
use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{Notify, mpsc, oneshot};
use tracing::{debug, error, info, warn};

use crate::actions::jsonl::JsonlFiles;
use crate::db::Db;
use crate::engine::{self, Effect, Report};
use crate::event::Event;
use crate::outbox::{OutboxRecord, now_unix};
use crate::rules::RuleSet;
use crate::store::StoreError;

/// Most requests in one batch.
const MAX_BATCH: usize = 512;
/// How often event ids past their retention are forgotten.
const EXPIRE_EVERY: Duration = Duration::from_secs(3600);

/// Why a batch was not made durable. The request should be retried.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CommitError {
    #[error("{0}")]
    Store(String),
    #[error("cannot write {file}: {reason}")]
    Output { file: PathBuf, reason: String },
    #[error("the service is shutting down")]
    Stopped,
}

impl From<StoreError> for CommitError {
    fn from(e: StoreError) -> Self {
        CommitError::Store(e.to_string())
    }
}

/// How long things are remembered.
#[derive(Debug, Clone, Copy)]
pub struct Retention {
    /// Event ids, so that a retried delivery has no second effect.
    pub event_ids: Duration,
    /// A key's counter, window and action mark, from the last event that used it.
    pub idle_state: Duration,
}

struct Job {
    rules: Arc<RuleSet>,
    events: Vec<Event>,
    reply: oneshot::Sender<Result<Report, CommitError>>,
    /// The request's span, entered while its events run, so their log lines carry it.
    span: tracing::Span,
}

/// The handle requests use.
#[derive(Clone)]
pub struct Committer {
    jobs: mpsc::Sender<Job>,
}

/// What the committer thread owns.
struct Worker {
    db: Arc<Db>,
    files: JsonlFiles,
    registered: HashSet<PathBuf>,
    /// The last rule set whose files are all registered.
    checked: Option<Arc<RuleSet>>,
    default_from: Mailbox,
    retention: Retention,
    last_expiry: Option<Instant>,
    emails_queued: Arc<Notify>,
}

impl Committer {
    /// Recovers the output files, then starts the committer thread. `emails_queued` is notified
    /// after each commit that queued emails. The thread ends once every `Committer` is dropped.
    pub fn start(
        db: Arc<Db>,
        files: JsonlFiles,
        default_from: Mailbox,
        retention: Retention,
        emails_queued: Arc<Notify>,
    ) -> Result<(Committer, std::thread::JoinHandle<()>), CommitError> {
        let mut worker = Worker {
            db,
            files,
            registered: HashSet::new(),
            checked: None,
            default_from,
            retention,
            last_expiry: None,
            emails_queued,
        };
        worker.recover()?;
        let (tx, mut rx) = mpsc::channel::<Job>(4 * MAX_BATCH);
        let handle = std::thread::Builder::new()
            .name("committer".into())
            .spawn(move || {
                while let Some(first) = rx.blocking_recv() {
                    let mut batch = vec![first];
                    while batch.len() < MAX_BATCH {
                        match rx.try_recv() {
                            Ok(job) => batch.push(job),
                            Err(_) => break,
                        }
                    }
                    worker.process(batch);
                }
                info!("committer stopped");
            })
            .map_err(|e| CommitError::Store(format!("cannot start the committer thread: {e}")))?;
        Ok((Committer { jobs: tx }, handle))
    }

    /// Makes the effects of `events` durable; returns once they are.
    pub async fn submit(
        &self,
        rules: Arc<RuleSet>,
        events: Vec<Event>,
    ) -> Result<Report, CommitError> {
        let (reply, answer) = oneshot::channel();
        self.jobs
            .send(Job {
                rules,
                events,
                reply,
                span: tracing::Span::current(),
            })
            .await
            .map_err(|_| CommitError::Stopped)?;
        answer.await.map_err(|_| CommitError::Stopped)?
    }
}

impl Worker {
    /// Cuts every output file back to its committed length.
    fn recover(&mut self) -> Result<(), CommitError> {
        let mut fixes = Vec::new();
        for (file, committed) in self.db.jsonl_lengths()? {
            let path = PathBuf::from(&file);
            let actual = self.files.len(&path).map_err(|e| output_error(&path, e))?;
            if actual > committed {
                warn!(
                    file,
                    bytes = actual - committed,
                    "removing lines that were never acknowledged (the service stopped before committing them)"
                );
                self.files
                    .truncate(&path, committed)
                    .map_err(|e| output_error(&path, e))?;
            } else if actual < committed {
                warn!(
                    file,
                    "the file is shorter than tripline wrote it: was it truncated or replaced? continuing from its current end"
                );
                fixes.push((file.clone(), actual));
            }
            self.registered.insert(path);
        }
        if !fixes.is_empty() {
            let mut txn = self.db.write()?;
            for (file, len) in fixes {
                txn.set_jsonl_len(&file, len)?;
            }
            txn.commit()?;
        }
        Ok(())
    }

    fn process(&mut self, batch: Vec<Job>) {
        let mut written = Vec::new();
        match self.commit_batch(&batch, &mut written) {
            Ok(reports) => {
                for (job, report) in batch.into_iter().zip(reports) {
                    let _ = job.reply.send(Ok(report));
                }
            }
            Err(e) => {
                error!("batch of {} requests not committed: {e}", batch.len());
                for (file, before) in written {
                    if let Err(t) = self.files.truncate(&file, before) {
                        error!(file = %file.display(), "cannot cut off the lines of the failed batch ({t}); they will be removed at the next start");
                    }
                }
                for job in batch {
                    let _ = job.reply.send(Err(e.clone()));
                }
            }
        }
    }

    /// Runs the batch in one transaction. `written` collects (file, length before) for each file
    /// appended to, so a failure can undo it.
    fn commit_batch(
        &mut self,
        batch: &[Job],
        written: &mut Vec<(PathBuf, u64)>,
    ) -> Result<Vec<Report>, CommitError> {
        self.register_new_files(batch)?;
        let now = now_unix();
        let mut txn = self.db.write()?;
        let expire = self.last_expiry.is_none_or(|t| t.elapsed() >= EXPIRE_EVERY);
        let expired = if expire {
            txn.expire_seen(now.saturating_sub(self.retention.event_ids.as_secs()))?
        } else {
            0
        };
        // A few idle keys with every batch: a steady trickle rather than one long transaction.
        let forgotten =
            txn.forget_idle(now.saturating_sub(self.retention.idle_state.as_secs()), 64)?;
        let mut reports = Vec::with_capacity(batch.len());
        let mut effects = Vec::new();
        // The rule of each line written, for the metrics once committed.
        let mut line_rules = Vec::new();
        for job in batch {
            let first = effects.len();
            let _request = job.span.enter();
            reports.push(engine::run(
                &job.rules,
                &job.events,
                &mut txn,
                &self.default_from,
                now,
                &mut effects,
            )?);
            for effect in &effects[first..] {
                if let Effect::Line { rule, .. } = effect {
                    line_rules.push(job.rules.rules()[*rule].name.clone());
                }
            }
        }
        let mut lines: IndexMap<PathBuf, String> = IndexMap::new();
        let mut emails = 0;
        let mut not_made = Vec::new();
        for effect in effects {
            match effect {
                Effect::Line { file, line, .. } => lines.entry(file).or_default().push_str(&line),
                Effect::Email(email) => {
                    txn.queue_email(&OutboxRecord::new(email, now))?;
                    emails += 1;
                }
                Effect::EmailFailed { rule, reason } => {
                    txn.record_failed_email(&OutboxRecord::not_made(rule.clone(), reason, now))?;
                    not_made.push(rule);
                }
            }
        }
        for (file, text) in &lines {
            let (before, after) = self
                .files
                .append_durably(file, text)
                .map_err(|e| output_error(file, e))?;
            written.push((file.clone(), before));
            txn.set_jsonl_len(&file.to_string_lossy(), after)?;
        }
        txn.commit()?;
        for rule in line_rules {
            metrics::counter!("tripline_actions_succeeded_total", "kind" => "jsonl", "rule" => rule)
                .increment(1);
        }
        for rule in not_made {
            metrics::counter!("tripline_actions_failed_total", "kind" => "email", "rule" => rule)
                .increment(1);
        }
        if forgotten > 0 {
            debug!(
                forgotten,
                "forgot the state of keys no event has used for a long time"
            );
        }
        if expire {
            self.last_expiry = Some(Instant::now());
            if expired > 0 {
                info!(expired, "forgot event ids older than the retention period");
            }
        }
        if emails > 0 {
            self.emails_queued.notify_one();
        }
        Ok(reports)
    }

    /// Records the current length of output files this batch may write for the first time, in a
    /// transaction of its own, so that a crash during the batch can be undone at start-up.
    fn register_new_files(&mut self, batch: &[Job]) -> Result<(), CommitError> {
        let mut new = Vec::new();
        for job in batch {
            if self
                .checked
                .as_ref()
                .is_some_and(|c| Arc::ptr_eq(c, &job.rules))
            {
                continue;
            }
            for rule in job.rules.rules() {
                if let Some(jsonl) = &rule.jsonl
                    && !self.registered.contains(&jsonl.file)
                    && !new.contains(&jsonl.file)
                {
                    new.push(jsonl.file.clone());
                }
            }
        }
        if !new.is_empty() {
            let mut txn = self.db.write()?;
            for file in &new {
                let len = self.files.len(file).map_err(|e| output_error(file, e))?;
                txn.set_jsonl_len(&file.to_string_lossy(), len)?;
            }
            txn.commit()?;
            self.registered.extend(new);
        }
        if let Some(last) = batch.last() {
            self.checked = Some(last.rules.clone());
        }
        Ok(())
    }
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
    use std::collections::HashMap;

    #[test]
    fn start_up_cuts_off_lines_that_were_never_committed() {
        let dir = tempfile::tempdir().unwrap();
        let db = Arc::new(Db::open(dir.path()).unwrap());
        let mut txn = db.write().unwrap();
        txn.set_jsonl_len("out.jsonl", 6).unwrap();
        txn.set_jsonl_len("gone.jsonl", 10).unwrap();
        txn.commit().unwrap();
        // A crash after the lines were synced but before the commit leaves them behind.
        std::fs::write(dir.path().join("out.jsonl"), "{\"a\"}\n{\"b\"}\n{\"c").unwrap();
        let from: Mailbox = "t <t@localhost>".parse().unwrap();
        let started = Committer::start(
            db.clone(),
            JsonlFiles::new(dir.path()),
            from,
            Retention {
                event_ids: Duration::from_secs(60),
                idle_state: Duration::from_secs(86_400),
            },
            Arc::new(Notify::new()),
        );
        let (committer, thread) = started.unwrap();
        assert_eq!(
            std::fs::read_to_string(dir.path().join("out.jsonl")).unwrap(),
            "{\"a\"}\n"
        );
        // A file that is shorter than recorded (truncated by someone) is taken as it is.
        let lengths: HashMap<String, u64> = db.jsonl_lengths().unwrap().into_iter().collect();
        assert_eq!(lengths["gone.jsonl"], 0);
        drop(committer);
        thread.join().unwrap();
    }
}
