//! The durable outbox: deliveries decided by rules wait here until they are delivered.
//!
//! The committer queues a delivery (an email, for one) in the same transaction as the state
//! change that decided it, so an acknowledged one is never lost. This background task delivers
//! pending ones through their kind's [`Sender`](crate::actions::Sender) (`actions/<kind>/`), soonest due first, up to
//! [`MAX_IN_FLIGHT`] at once and at most each kind's own bound (its destination's). A temporary
//! failure waits and is retried with exponential backoff, across restarts; a permanent one is
//! recorded as failed, visible at `GET /outbox`.
//!
//! A silent destination holds the slots of the attempts it is silent to, never the others. The
//! sender reads only what it starts: the store's due index gives the next due deliveries, one per
//! free slot, and when the next one after them is due. An attempt lives only in memory until its
//! outcome is recorded, so shutdown drops the attempts in flight at once: those deliveries are
//! still pending and are tried again at the next start.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{Notify, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tracing::{error, info, warn};

use crate::actions::{Attempt, Bound, Senders};
use crate::clock::Clock;
use crate::store::queue::{Lane, OutboxRecord, Skip, Status, take_room};
use crate::store::{Backend, StoreError};
use crate::telemetry;

/// Delivery attempts at once, of every kind together: a guard on memory only. What bounds
/// attempts is each lane's own bound (8 for the mail server, each HTTP endpoint's
/// `max_in_flight`, at most 64), so endpoints that hang hold their own slots and never the
/// email's: this is above what the lanes of many endpoints add up to.
pub const MAX_IN_FLIGHT: usize = 1024;

/// How long the sender waits before it reads or writes the store again after that failed.
const STORE_RETRY: Duration = Duration::from_secs(1);

/// Longest wait between two attempts at one delivery.
const MAX_BACKOFF_SECS: u64 = 300;

/// One attempt that has ended, waiting to be recorded.
struct Ended {
    id: u64,
    record: OutboxRecord,
    attempt: Attempt,
}

/// The attempts in flight, and how they are started and recorded.
struct Deliveries {
    db: Arc<dyn Backend>,
    senders: Senders,
    clock: Clock,
    attempts: JoinSet<Ended>,
    /// The delivery each running attempt is for, with its lane, by task: a task that panics is
    /// known only by its id.
    in_flight: HashMap<tokio::task::Id, (u64, Lane)>,
    /// Attempts that ended and whose outcome could not be written yet (the store failed): their
    /// deliveries are still pending in the store, so no attempt starts before they are written
    /// (`run_sender` writes them first), or a delivered request would be sent again.
    unrecorded: Vec<Ended>,
}

impl Deliveries {
    fn new(db: Arc<dyn Backend>, senders: Senders, clock: Clock) -> Deliveries {
        Deliveries {
            db,
            senders,
            clock,
            attempts: JoinSet::new(),
            in_flight: HashMap::new(),
            unrecorded: Vec::new(),
        }
    }

    fn free_slots(&self) -> usize {
        MAX_IN_FLIGHT.saturating_sub(self.in_flight.len())
    }

    /// Starts an attempt at each due delivery not in flight, at most one per free slot and as
    /// many of a kind as its sender allows; returns when the next one not started is due (a
    /// delivery left out because its kind has no room waits for an attempt of that kind to end,
    /// which wakes the sender).
    async fn start_due(&mut self) -> Result<Option<u64>, StoreError> {
        let mut skip = Skip::default();
        for (kind, sender) in self.senders.iter() {
            let lane = |destination| Lane {
                kind: kind.to_string(),
                destination,
            };
            match sender.max_in_flight() {
                Bound::Kind(n) => {
                    skip.room.insert(lane(None), n);
                }
                Bound::PerDestination(bounds) => {
                    for (destination, n) in bounds {
                        skip.room.insert(lane(Some(destination)), n);
                    }
                }
            }
        }
        // An attempt whose outcome is not written yet is over: it must not be claimed again.
        skip.in_flight.extend(self.unrecorded.iter().map(|e| e.id));
        for (id, lane) in self.in_flight.values() {
            skip.in_flight.insert(*id);
            // Its attempt is running, so it takes its lane's room (a lane with none left
            // takes nothing more, which is all that matters here).
            take_room(&mut skip.room, lane);
        }
        let free = self.free_slots();
        let db = self.db.clone();
        let now = self.clock.unix();
        let due = tokio::task::spawn_blocking(move || db.due(now, free, &skip))
            .await
            .map_err(|e| StoreError::Unavailable(e.to_string()))??;
        for (id, record) in due.deliveries {
            let sender = self.senders.get(&record.kind).cloned();
            let lane = (id, record.lane());
            let task = self.attempts.spawn(async move {
                let attempt = match sender {
                    Some(sender) => sender.attempt(id, &record).await,
                    None => Attempt::Permanent(format!(
                        "this tripline cannot deliver a `{}` action (was it made by another version?)",
                        record.kind
                    )),
                };
                Ended {
                    id,
                    record,
                    attempt,
                }
            });
            self.in_flight.insert(task.id(), lane);
        }
        Ok(due.next_due_unix)
    }

    /// Records how `first` and every other attempt already over ended, in one transaction
    /// (with any whose outcome could not be written before).
    async fn record(
        &mut self,
        first: Result<(tokio::task::Id, Ended), tokio::task::JoinError>,
    ) -> Result<(), StoreError> {
        let mut ended = std::mem::take(&mut self.unrecorded);
        let mut next = Some(first);
        while let Some(joined) = next {
            match joined {
                Ok((task, attempt)) => {
                    self.in_flight.remove(&task);
                    ended.push(attempt);
                }
                Err(e) => {
                    // The delivery stays pending, due as it was: it is tried again.
                    let id = self.in_flight.remove(&e.id()).map(|(id, ..)| id);
                    error!(delivery.id = ?id, "a delivery attempt failed: {e}");
                }
            }
            next = self.attempts.try_join_next_with_id();
        }
        self.unrecorded = ended;
        self.write_outcomes().await
    }

    /// Writes the outcomes not written yet; on failure keeps them, to write at the next try.
    async fn write_outcomes(&mut self) -> Result<(), StoreError> {
        if self.unrecorded.is_empty() {
            return Ok(());
        }
        let ended = std::mem::take(&mut self.unrecorded);
        let db = self.db.clone();
        let now = self.clock.unix();
        let (ended, written) = tokio::task::spawn_blocking(move || {
            let written = record_outcomes(db.as_ref(), &ended, now);
            (ended, written)
        })
        .await
        .map_err(|e| StoreError::Unavailable(e.to_string()))?;
        if written.is_err() {
            self.unrecorded = ended;
        }
        written
    }
}

/// Writes what became of each attempt: delivered or failed for good moves the delivery to the
/// finished history; a temporary failure reschedules it with backoff.
fn record_outcomes(db: &dyn Backend, ended: &[Ended], now: u64) -> Result<(), StoreError> {
    let mut txn = db.begin()?;
    let mut recorded = Vec::with_capacity(ended.len());
    for Ended {
        id,
        record,
        attempt,
    } in ended
    {
        let (id, mut record) = (*id, record.clone());
        record.attempts += 1;
        match attempt {
            Attempt::Delivered => {
                record.status = Status::Sent;
                record.last_error = None;
                record.finished_unix = Some(now);
                txn.finish(id, &record)?;
            }
            Attempt::Temporary(reason) | Attempt::RetryAfter(reason, _) => {
                // What the destination asked (`Retry-After`), never sooner than the backoff: a
                // `Retry-After: 0` must not turn retries into a request a second. `now` is
                // whole seconds, up to one behind: one more keeps the wait what was asked.
                let asked = match attempt {
                    Attempt::RetryAfter(_, after) => after.as_secs_f64().ceil() as u64 + 1,
                    _ => 0,
                };
                record.next_attempt_unix = now + asked.max(backoff_secs(record.attempts));
                record.last_error = Some(reason.clone());
                txn.update_pending(id, &record)?;
            }
            Attempt::Permanent(reason) => {
                record.status = Status::Failed;
                record.last_error = Some(reason.clone());
                record.finished_unix = Some(now);
                txn.finish(id, &record)?;
            }
        }
        recorded.push((id, record, attempt));
    }
    txn.commit()?;
    for (id, record, attempt) in recorded {
        let kind = record.kind.as_str();
        match attempt {
            Attempt::Delivered => {
                info!(delivery.id = id, action.kind = kind, rule.id = %record.rule, to = %record.destination, "{kind} delivered");
                metrics::counter!(telemetry::ACTIONS_SUCCEEDED.name, "kind" => record.kind, "rule" => record.rule)
                    .increment(1);
            }
            Attempt::Temporary(reason) | Attempt::RetryAfter(reason, _) => {
                let retry_in_secs = record.next_attempt_unix.saturating_sub(now);
                warn!(delivery.id = id, action.kind = kind, attempts = record.attempts, retry_in_secs, %reason, "{kind} not delivered yet");
            }
            Attempt::Permanent(reason) => {
                error!(delivery.id = id, action.kind = kind, rule.id = %record.rule, to = %record.destination, %reason, "{kind} failed for good");
                metrics::counter!(telemetry::ACTIONS_FAILED.name, "kind" => record.kind, "rule" => record.rule)
                    .increment(1);
            }
        }
    }
    Ok(())
}

/// The wait after the `attempts`-th failed attempt: 2 s doubling, at most [`MAX_BACKOFF_SECS`].
fn backoff_secs(attempts: u32) -> u64 {
    (1u64 << attempts.min(16)).min(MAX_BACKOFF_SECS)
}

/// Delivers pending deliveries until `shutdown` turns true (or its sender is gone). `wake` is
/// notified when some are queued. Attempts still in flight then are dropped at once: their
/// deliveries stay pending for the next start.
pub async fn run_sender(
    db: Arc<dyn Backend>,
    senders: Senders,
    wake: Arc<Notify>,
    mut shutdown: watch::Receiver<bool>,
    clock: Clock,
) {
    let mut deliveries = Deliveries::new(db, senders, clock.clone());
    // Set when the database failed, so that the sender waits a moment instead of spinning.
    let mut store_failed: Option<Instant> = None;
    while !*shutdown.borrow_and_update() {
        let mut wake_at = None;
        if let Some(failed) = store_failed.filter(|t| t.elapsed() < STORE_RETRY) {
            wake_at = Some(failed + STORE_RETRY);
        } else if let Err(e) = deliveries.write_outcomes().await {
            error!("outbox: {e}");
            store_failed = Some(Instant::now());
            wake_at = Some(Instant::now() + STORE_RETRY);
        } else if deliveries.free_slots() > 0 {
            match deliveries.start_due().await {
                Ok(next_due) => wake_at = next_due.map(|t| Instant::now() + clock.until_unix(t)),
                Err(e) => {
                    error!("outbox: {e}");
                    store_failed = Some(Instant::now());
                    wake_at = Some(Instant::now() + STORE_RETRY);
                }
            }
        }
        tokio::select! {
            biased;
            changed = shutdown.changed() => {
                if changed.is_err() {
                    break;
                }
            }
            Some(ended) = deliveries.attempts.join_next_with_id() => {
                if let Err(e) = deliveries.record(ended).await {
                    error!("outbox: {e}");
                    store_failed = Some(Instant::now());
                }
            }
            () = wake.notified() => {}
            () = sleep_until(wake_at) => {}
        }
    }
    let interrupted = deliveries.in_flight.len();
    deliveries.attempts.shutdown().await;
    if interrupted > 0 {
        info!(
            deliveries = interrupted,
            "stopped the delivery attempts in flight; those deliveries stay pending for the next start"
        );
    }
}

/// Delivers everything due now, and returns once nothing is left in flight; returns when the
/// next pending one is due. For `replay --execute-into`, which writes files and then exits.
pub async fn deliver_due(
    db: Arc<dyn Backend>,
    senders: Senders,
    clock: Clock,
) -> Result<Option<u64>, StoreError> {
    let mut deliveries = Deliveries::new(db, senders, clock);
    loop {
        let next_due = deliveries.start_due().await?;
        match deliveries.attempts.join_next_with_id().await {
            Some(ended) => deliveries.record(ended).await?,
            None => return Ok(next_due),
        }
    }
}

/// Sleeps until `at`, or for ever without one.
async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::actions::email::send::{self, Transport};
    use crate::actions::{Delivery, Sender};
    use crate::store::queue::{Due, OutboxStatus};
    use crate::store::redb::Db;
    use lettre::Tokio1Executor;
    use lettre::transport::smtp::AsyncSmtpTransport;
    use lettre::transport::smtp::client::Tls;
    use serde_json::json;

    /// A pending email to dana, due at `due_unix`.
    fn email(due_unix: u64) -> OutboxRecord {
        let payload = json!({
            "from": "growth@example.com",
            "to": ["dana@example.com"],
            "subject": "Hi",
            "text": "Hello",
            "message": "Subject: Hi\r\n\r\nHello\r\n",
        });
        let delivery = Delivery {
            kind: "email",
            to: "d***@example.com".into(),
            lane: None,
            person: None,
            event: None,
            payload: payload.as_object().unwrap().clone(),
        };
        let mut record = OutboxRecord::new("r".into(), delivery, due_unix);
        record.next_attempt_unix = due_unix;
        record
    }

    fn queue(db: &Db, due: impl IntoIterator<Item = u64>) {
        let mut txn = db.begin().unwrap();
        for due in due {
            txn.queue(&email(due)).unwrap();
        }
        txn.commit().unwrap();
    }

    /// Emails only, through `transport`.
    fn emails_through(transport: Transport) -> Senders {
        Senders::from_iter([("email", Arc::new(transport) as Arc<dyn Sender>)])
    }

    /// SMTP to 127.0.0.1:`port`, in plain text.
    fn smtp_to(port: u16) -> Senders {
        let smtp = AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous("127.0.0.1")
            .port(port)
            .tls(Tls::None)
            .build();
        emails_through(Transport::Smtp(Box::new(smtp)))
    }

    #[tokio::test]
    async fn due_emails_are_written_and_later_ones_wait() {
        let dir = tempfile::tempdir().unwrap();
        let db = Arc::new(Db::open(dir.path()).unwrap());
        let now = Clock::wall().unix();
        // More than there are slots, and one not due for an hour.
        queue(&db, (0..send::MAX_IN_FLIGHT as u64 + 3).map(|_| now));
        queue(&db, [now + 3600]);
        let transport = emails_through(Transport::files_in(dir.path()).unwrap());
        let next = deliver_due(db.clone(), transport, Clock::wall())
            .await
            .unwrap();
        assert_eq!(next, Some(now + 3600), "when the sender wakes next");
        let status = db.outbox_status(50).unwrap();
        assert_eq!(status.pending, 1);
        assert_eq!(status.finished, send::MAX_IN_FLIGHT as u64 + 3);
        assert!(status.recent.iter().all(|(_, r)| r.status == Status::Sent));
        let written = std::fs::read_dir(dir.path().join("outbox"))
            .unwrap()
            .count();
        assert_eq!(written, send::MAX_IN_FLIGHT + 3);
    }

    #[tokio::test]
    async fn an_unreachable_server_is_retried_later() {
        let dir = tempfile::tempdir().unwrap();
        let db = Arc::new(Db::open(dir.path()).unwrap());
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = closed.local_addr().unwrap().port();
        drop(closed);
        queue(&db, [Clock::wall().unix()]);
        let before = Clock::wall().unix();
        let next = deliver_due(db.clone(), smtp_to(port), Clock::wall())
            .await
            .unwrap();
        let status = db.outbox_status(50).unwrap();
        let (_, record) = &status.waiting[0];
        assert_eq!(record.attempts, 1);
        assert!(record.next_attempt_unix >= before + 2, "{record:?}");
        assert_eq!(next, Some(record.next_attempt_unix));
        assert!(
            record
                .last_error
                .as_deref()
                .unwrap()
                .contains("not reachable"),
            "{record:?}"
        );
    }

    #[tokio::test]
    async fn a_silent_server_fills_the_slots_and_shutdown_leaves_the_emails_pending() {
        let dir = tempfile::tempdir().unwrap();
        let db = Arc::new(Db::open(dir.path()).unwrap());
        queue(
            &db,
            (0..send::MAX_IN_FLIGHT as u64 + 2).map(|_| Clock::wall().unix()),
        );
        // Accepts every connection and never says a word.
        let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = silent.local_addr().unwrap().port();
        let (accepted_tx, mut accepted) = tokio::sync::mpsc::unbounded_channel();
        let server = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((stream, _)) = silent.accept().await {
                held.push(stream);
                let _ = accepted_tx.send(held.len());
            }
        });

        let (stop, stopped) = watch::channel(false);
        let sender = tokio::spawn(run_sender(
            db.clone(),
            smtp_to(port),
            Arc::new(Notify::new()),
            stopped,
            Clock::wall(),
        ));
        for n in 1..=send::MAX_IN_FLIGHT {
            assert_eq!(accepted.recv().await, Some(n), "attempts run side by side");
        }
        // A bound on the sender, not on the silent server: one more connection would be a
        // ninth attempt at once.
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(
            accepted.is_empty(),
            "at most {} at once",
            send::MAX_IN_FLIGHT
        );

        stop.send(true).unwrap();
        tokio::time::timeout(Duration::from_secs(5), sender)
            .await
            .expect("the sender stops without waiting for the silent server")
            .unwrap();
        let status = db.outbox_status(50).unwrap();
        assert_eq!(status.pending, send::MAX_IN_FLIGHT as u64 + 2);
        assert!(
            status.waiting.iter().all(|(_, r)| r.attempts == 0),
            "an interrupted attempt is not counted: {:?}",
            status.waiting
        );
        server.abort();
    }

    /// A store whose transactions fail while `failing` is set.
    struct Failing {
        db: Db,
        failing: std::sync::atomic::AtomicBool,
    }

    impl Backend for Failing {
        fn begin(&self) -> Result<Box<dyn crate::store::Batch>, StoreError> {
            if self.failing.load(std::sync::atomic::Ordering::SeqCst) {
                return Err(StoreError::Unavailable("the disk is full".into()));
            }
            self.db.begin()
        }
        fn files(&self) -> Result<Vec<(String, crate::store::FileProgress)>, StoreError> {
            self.db.files()
        }
        fn queued_lines(
            &self,
            file: &str,
            after: u64,
            max_bytes: usize,
        ) -> Result<Vec<crate::store::QueuedLines>, StoreError> {
            self.db.queued_lines(file, after, max_bytes)
        }
        fn due(&self, now: u64, max: usize, skip: &Skip) -> Result<Due, StoreError> {
            self.db.due(now, max, skip)
        }
        fn pending_count(&self) -> Result<u64, StoreError> {
            self.db.pending_count()
        }
        fn outbox_status(&self, shown: usize) -> Result<OutboxStatus, StoreError> {
            self.db.outbox_status(shown)
        }
        fn check(&self) -> Result<(), StoreError> {
            self.db.check()
        }
        fn sync(&self) -> Result<(), StoreError> {
            self.db.sync()
        }
        fn waiting(&self) -> Result<Vec<(String, u64)>, StoreError> {
            self.db.waiting()
        }
        fn next_wait_due(&self) -> Result<Option<i64>, StoreError> {
            self.db.next_wait_due()
        }
        fn person(&self, distinct_id: &str) -> Result<crate::store::Person, StoreError> {
            self.db.person(distinct_id)
        }
        fn aggregates(
            &self,
            rule: &str,
            from: i32,
            to: i32,
        ) -> Result<Vec<crate::store::aggregates::DayData>, StoreError> {
            self.db.aggregates(rule, from, to)
        }
        fn aggregate_rules(&self) -> Result<Vec<String>, StoreError> {
            self.db.aggregate_rules()
        }
        fn explanation(&self, uuid: &str) -> Result<Option<String>, StoreError> {
            self.db.explanation(uuid)
        }
    }

    /// Delivers everything at once, counting the attempts.
    struct Counting(std::sync::atomic::AtomicUsize);

    impl Sender for Counting {
        fn attempt<'a>(
            &'a self,
            _id: u64,
            _record: &'a OutboxRecord,
        ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Attempt> + Send + 'a>> {
            self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            Box::pin(async { Attempt::Delivered })
        }
        fn max_in_flight(&self) -> Bound {
            Bound::Kind(8)
        }
    }

    #[tokio::test]
    async fn a_delivered_attempt_whose_outcome_cannot_be_written_is_not_made_again() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Failing {
            db: Db::open(dir.path()).unwrap(),
            failing: false.into(),
        });
        queue(&store.db, [Clock::wall().unix()]);
        store
            .failing
            .store(true, std::sync::atomic::Ordering::SeqCst);
        let counting = Arc::new(Counting(0.into()));
        let senders = Senders::from_iter([("email", counting.clone() as Arc<dyn Sender>)]);
        let (stop, stopped) = watch::channel(false);
        let sender = tokio::spawn(run_sender(
            store.clone(),
            senders,
            Arc::new(Notify::new()),
            stopped,
            Clock::wall(),
        ));
        // Long enough for the sender to try writing the outcome again (every second) and, if
        // it forgot the attempt, to make it again.
        tokio::time::sleep(Duration::from_millis(2500)).await;
        assert_eq!(store.db.pending_count().unwrap(), 1, "not written yet");
        store
            .failing
            .store(false, std::sync::atomic::Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(1500)).await;
        stop.send(true).unwrap();
        sender.await.unwrap();
        assert_eq!(
            store.db.pending_count().unwrap(),
            0,
            "written once the store works"
        );
        assert_eq!(counting.0.load(std::sync::atomic::Ordering::SeqCst), 1);
    }
}
