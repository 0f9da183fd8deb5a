//! `tripline replay FILE`: streams past events through the rules and prints, per rule, what would
//! have happened. By default nothing is written or sent (state lives in memory); with
//! `--execute-into DIR` the actions really run into a separate data folder.
//!
//! The file may be JSON lines (one event or webhook body per line, any shape `/webhook` accepts),
//! one JSON body, or a JSON list of events (a PostHog export); it is read as a stream, so its size
//! does not matter. Windows and `again_after` go by the events' own timestamps, as in the service.

use chrono::DateTime;
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use lettre::message::Mailbox;
use std::io::{BufRead, BufReader};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::mpsc::{Receiver, SyncSender};
use std::time::{Duration, Instant};

use super::event_file::{Position, read_items};
use super::load_rules;
use crate::actions::email::{Queued, mask_email};
use crate::actions::http::Request;
use crate::actions::jsonl::JsonlFiles;
use crate::actions::{self, Destinations, Env, Output};
use crate::clock::Clock;
use crate::config::{Durability, FolderArgs, Paths, WaitSettings};
use crate::engine::{self, Effect, Outcome, Report};
use crate::ingest::event::{self, Event};
use crate::pipeline::committer::{Committer, Retention};
use crate::pipeline::outbox;
use crate::redact::HashKey;
use crate::rules::RuleSet;
use crate::store::Backend;
use crate::store::MemoryStore;
use crate::store::redb::Db;

/// Events handled together (one transaction with `--execute-into`).
const BATCH: usize = 1024;
/// Unreadable items reported one by one; the rest are only counted.
const SHOWN_ERRORS: usize = 5;

/// Arguments of `tripline replay`.
#[derive(Debug, Args)]
pub struct ReplayArgs {
    /// File of past events: JSON lines, one JSON body, or a JSON list (a PostHog export).
    pub file: PathBuf,
    #[command(flatten)]
    pub folders: FolderArgs,
    /// Really run the actions into this data folder (not the service's): lines are appended to
    /// its files and emails written as .eml files to its outbox/ folder, never sent.
    #[arg(long, value_name = "DIR")]
    pub execute_into: Option<PathBuf>,
    /// How many example outputs to show for each rule.
    #[arg(long, default_value_t = 1)]
    pub examples: usize,
}

/// What one rule did over the whole file.
#[derive(Debug, Default, Clone)]
struct RuleStats {
    matched: u64,
    fired: u64,
    counting: u64,
    held_back: u64,
    no_key: u64,
    failed: u64,
    /// `[wait]`: started (or started again), cancelled, ended without acting, still pending.
    waiting: u64,
    cancelled: u64,
    expired: u64,
    pending: u64,
    /// `[send_window]`: actions held until the window opened.
    held: u64,
    examples: Vec<String>,
}

/// Where the events go: state in memory, or the real store of another data folder.
enum Sink {
    DryRun {
        store: MemoryStore,
        clock: Clock,
    },
    Execute {
        runtime: tokio::runtime::Runtime,
        committer: Committer,
        thread: std::thread::JoinHandle<()>,
        db: Arc<dyn Backend>,
        dir: PathBuf,
        clock: Clock,
    },
}

/// The replay's clock: it follows the events' own times as they are replayed (never back), so
/// that what depends on the time of handling (handled ids remembered for days, deliveries due)
/// behaves as it did then, without waiting.
fn history_clock() -> Clock {
    Clock::manual(DateTime::UNIX_EPOCH)
}

/// Runs the replay.
pub fn run(args: &ReplayArgs) -> ExitCode {
    let mut paths = match super::paths(&args.folders) {
        Ok(paths) => paths,
        Err(code) => return code,
    };
    // A dry run writes nothing, so hashing with the test key changes nothing that lasts; files
    // written with --execute-into need the operator's key, like the service's.
    if args.execute_into.is_none() {
        paths
            .declared
            .hash_key
            .get_or_insert_with(HashKey::for_tests);
    }
    match replay(args, &paths) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn replay(args: &ReplayArgs, paths: &Paths) -> anyhow::Result<()> {
    let Some(rules) = load_rules(&paths.declared) else {
        anyhow::bail!("the rules have problems, so nothing was replayed (see `tripline check`)");
    };
    let rules = Arc::new(rules);
    let file = std::fs::File::open(&args.file)
        .map_err(|e| anyhow::anyhow!("cannot open {}: {e}", args.file.display()))?;
    let size = file.metadata().map(|m| m.len()).unwrap_or(0);
    let bar = ProgressBar::new(size).with_style(
        ProgressStyle::with_template(
            "{bar:40} {binary_bytes}/{binary_total_bytes} · {binary_bytes_per_sec} · {eta} left",
        )
        .expect("a valid template"),
    );
    let reader = BufReader::with_capacity(1 << 16, bar.wrap_read(file));

    let sink = match &args.execute_into {
        None => Sink::DryRun {
            store: MemoryStore::default(),
            clock: history_clock(),
        },
        Some(dir) => open_sink(dir, &paths.declared.folders.data, &paths.email_from)?,
    };
    let mut run = Run {
        rules: &rules,
        from: &paths.email_from,
        sink,
        effects: Vec::new(),
        stats: vec![RuleStats::default(); rules.rules().len()],
        totals: Totals::default(),
        examples: args.examples,
    };
    let started = Instant::now();
    // Reading and decoding (most of the work) go on in their own thread while this one runs the
    // rules over the previous batch; the batches arrive in file order.
    let (batches, received) = std::sync::mpsc::sync_channel::<Batch>(4);
    let reading = {
        let rules = rules.clone();
        std::thread::spawn(move || decode_file(reader, &rules, &batches))
    };
    let mut failure = None;
    for batch in &received {
        if let Err(e) = run.handle(batch) {
            failure = Some(e);
            break;
        }
    }
    // Without a receiver, the reading thread stops at its next batch.
    drop(received);
    let read = reading
        .join()
        .map_err(|_| anyhow::anyhow!("the reading thread panicked"))?;
    bar.finish_and_clear();
    if let Some(e) = failure {
        return Err(e);
    }
    read.map_err(|e| anyhow::anyhow!("{}: {e}", args.file.display()))?;
    run.end_waits()?;
    let elapsed = started.elapsed();
    let Run {
        mut stats,
        totals,
        sink,
        ..
    } = run;
    for (rule, n) in sink.waiting()? {
        if let Some((i, _)) = rules.named(&rule) {
            stats[i].pending = n;
        }
    }
    let written = sink.finish()?;

    print_summary(args, &rules, &stats, &totals, elapsed, written.as_deref());
    Ok(())
}

fn open_sink(dir: &Path, service_data: &Path, from: &Mailbox) -> anyhow::Result<Sink> {
    std::fs::create_dir_all(dir)
        .map_err(|e| anyhow::anyhow!("cannot create {}: {e}", dir.display()))?;
    if let (Ok(a), Ok(b)) = (dir.canonicalize(), service_data.canonicalize())
        && a == b
    {
        anyhow::bail!(
            "{} is the service's data folder; replay into a separate folder so that the real state and outputs stay as they are",
            dir.display()
        );
    }
    let clock = history_clock();
    let db: Arc<dyn Backend> = Arc::new(Db::open(dir).map_err(|e| {
        anyhow::anyhow!(
            "cannot open the state database in {} (is a tripline using it?): {e}",
            dir.display()
        )
    })?);
    let (committer, thread) = Committer::start(
        db.clone(),
        JsonlFiles::new(dir),
        from.clone(),
        // Nothing is forgotten during a replay: its clock follows history, so a retention
        // would forget the ids (and state) of the file's own earlier events, and replaying the
        // same file again would act on them twice.
        Retention {
            event_ids: Duration::MAX,
            idle_state: Duration::MAX,
        },
        // Waits end as the history clock passes them: events come in order, no grace needed.
        WaitSettings {
            grace: Duration::ZERO,
            max_pending_per_rule: u64::MAX,
        },
        // A replay writes into a folder of its own: its lines never wait long.
        u64::MAX,
        Arc::new(tokio::sync::Notify::new()),
        clock.clone(),
        Durability::Sync,
    )?;
    let runtime = tokio::runtime::Builder::new_current_thread().build()?;
    Ok(Sink::Execute {
        runtime,
        committer,
        thread,
        db,
        dir: dir.to_path_buf(),
        clock,
    })
}

impl Sink {
    /// Runs one batch; in a dry run, the effects are left in `effects` for the examples. The
    /// history clock follows the events; a wait whose deadline it passes ends before the first
    /// event stamped after that deadline, so the batch is cut there.
    fn handle(
        &mut self,
        rules: &Arc<RuleSet>,
        mut events: Vec<Event>,
        from: &Mailbox,
        effects: &mut Vec<Effect>,
    ) -> anyhow::Result<Report> {
        let mut report = Report::default();
        while !events.is_empty() {
            let next_due = self.next_due();
            let mut latest = self.clock().now().timestamp_millis();
            let cut = events.iter().position(|e| {
                latest = latest.max(e.time.timestamp_millis());
                next_due.is_some_and(|due| due < latest)
            });
            let Some(cut) = cut else {
                report.append(self.run(rules, events, from, effects)?);
                break;
            };
            let later = events.split_off(cut);
            report.append(self.run(rules, events, from, effects)?);
            // Everything due before the event at the cut ends, so the next round moves on.
            report.append(self.end_waits(rules, latest - 1, from, effects)?);
            events = later;
        }
        Ok(report)
    }

    /// The history clock.
    fn clock(&self) -> &Clock {
        match self {
            Sink::DryRun { clock, .. } | Sink::Execute { clock, .. } => clock,
        }
    }

    /// The soonest deadline of a pending wait.
    fn next_due(&self) -> Option<i64> {
        match self {
            Sink::DryRun { store, .. } => store.next_due(),
            Sink::Execute { committer, .. } => *committer.next_wait().borrow(),
        }
    }

    /// Runs events through the rules, the clock moved to the latest of them.
    fn run(
        &mut self,
        rules: &Arc<RuleSet>,
        events: Vec<Event>,
        from: &Mailbox,
        effects: &mut Vec<Effect>,
    ) -> anyhow::Result<Report> {
        let Some(latest) = events.iter().map(|e| e.time).max() else {
            return Ok(Report::default());
        };
        match self {
            Sink::DryRun { store, clock } => {
                clock.advance_to(latest);
                let env = Env::offline(from);
                Ok(engine::run(
                    rules,
                    &events,
                    store,
                    &env,
                    clock.unix(),
                    effects,
                )?)
            }
            Sink::Execute {
                runtime,
                committer,
                clock,
                ..
            } => {
                clock.advance_to(latest);
                Ok(runtime.block_on(committer.submit(rules.clone(), events, None))?)
            }
        }
    }

    /// Ends every wait due by `until_ms` (the clock moved there: no grace, events come in
    /// order).
    fn end_waits(
        &mut self,
        rules: &Arc<RuleSet>,
        until_ms: i64,
        from: &Mailbox,
        effects: &mut Vec<Effect>,
    ) -> anyhow::Result<Report> {
        let until = DateTime::from_timestamp_millis(until_ms).unwrap_or(DateTime::UNIX_EPOCH);
        match self {
            Sink::DryRun { store, clock } => {
                clock.advance_to(until);
                let env = Env::offline(from);
                let now = clock.unix();
                Ok(engine::end_due_waits(
                    rules,
                    store,
                    until_ms,
                    usize::MAX,
                    &env,
                    now,
                    effects,
                )?)
            }
            Sink::Execute {
                runtime,
                committer,
                clock,
                ..
            } => runtime.block_on(async {
                clock.advance_to(until);
                let mut report = Report::default();
                let mut more = true;
                while more {
                    let ended;
                    (ended, more) = committer.end_waits(rules.clone()).await?;
                    report.append(ended);
                }
                Ok(report)
            }),
        }
    }

    /// The rules with waits still pending, and how many.
    fn waiting(&self) -> anyhow::Result<Vec<(String, u64)>> {
        Ok(match self {
            Sink::DryRun { store, .. } => store.waiting(),
            Sink::Execute { db, .. } => db.waiting()?,
        })
    }

    /// Ends the run; with `--execute-into`, writes the queued emails and says where things went.
    fn finish(self) -> anyhow::Result<Option<String>> {
        let Sink::Execute {
            runtime,
            committer,
            thread,
            db,
            dir,
            clock,
        } = self
        else {
            return Ok(None);
        };
        drop(committer);
        thread
            .join()
            .map_err(|_| anyhow::anyhow!("the committer thread panicked"))?;
        let senders = actions::senders(&Destinations::Files(&dir))?;
        runtime.block_on(outbox::deliver_due(db, senders, clock))?;
        Ok(Some(format!(
            "Actions were run into {}: lines in its files, emails as .eml files in {}",
            dir.display(),
            dir.join("outbox").display()
        )))
    }
}

#[derive(Debug, Default)]
struct Totals {
    events: u64,
    duplicates: u64,
    unreadable: u64,
    errors: Vec<String>,
}

impl Totals {
    fn unreadable(&mut self, message: String) {
        self.unreadable += 1;
        if self.errors.len() < SHOWN_ERRORS {
            self.errors.push(message);
        }
    }
}

/// One replay in progress: the events waiting to be run, and what the rules did so far.
struct Run<'a> {
    rules: &'a Arc<RuleSet>,
    from: &'a Mailbox,
    sink: Sink,
    effects: Vec<Effect>,
    stats: Vec<RuleStats>,
    totals: Totals,
    examples: usize,
}

impl Run<'_> {
    /// Runs one batch of decoded events, adds their outcomes to the per-rule counts, and keeps
    /// the first examples.
    fn handle(&mut self, batch: Batch) -> anyhow::Result<()> {
        self.totals.events += batch.read as u64;
        for message in batch.unreadable {
            self.totals.unreadable(message);
        }
        let report = self
            .sink
            .handle(self.rules, batch.events, self.from, &mut self.effects)?;
        self.record(report);
        Ok(())
    }

    /// Ends the waits whose deadline the history clock has passed at the end of the file.
    fn end_waits(&mut self) -> anyhow::Result<()> {
        let now = self.sink.clock().now().timestamp_millis();
        let report = self
            .sink
            .end_waits(self.rules, now, self.from, &mut self.effects)?;
        self.record(report);
        Ok(())
    }

    /// Adds what the rules did to the per-rule counts, and keeps the first examples.
    fn record(&mut self, report: Report) {
        let examples = self.examples;
        self.totals.duplicates += report.duplicates as u64;
        for (index, outcome) in &report.outcomes {
            let s = &mut self.stats[*index];
            // A rule with [wait] acts (or not) when a wait ends: that is no event matching.
            let ending = matches!(
                outcome,
                Outcome::Fired
                    | Outcome::PartlyFailed { .. }
                    | Outcome::Failed { .. }
                    | Outcome::Expired { .. }
            );
            if !(ending && self.rules.rules()[*index].wait.is_some()) {
                s.matched += 1;
            }
            match outcome {
                Outcome::Fired => s.fired += 1,
                Outcome::PartlyFailed { reasons } => {
                    s.fired += 1;
                    s.failed += 1;
                    if s.examples.len() < examples {
                        s.examples.push(format!("failed: {}", reasons.join("; ")));
                    }
                }
                Outcome::Counting { .. } => s.counting += 1,
                Outcome::Suppressed { .. } | Outcome::Capped { .. } => s.held_back += 1,
                Outcome::NoKey { .. } => s.no_key += 1,
                Outcome::Failed { reasons } => {
                    s.failed += 1;
                    if s.examples.len() < examples {
                        s.examples.push(format!("failed: {}", reasons.join("; ")));
                    }
                }
                Outcome::WaitRefused { reason } => {
                    s.failed += 1;
                    if s.examples.len() < examples {
                        s.examples.push(format!("failed: {reason}"));
                    }
                }
                Outcome::Waiting { .. } => s.waiting += 1,
                Outcome::Held { .. } | Outcome::Collected { .. } => s.held += 1,
                Outcome::Cancelled => s.cancelled += 1,
                Outcome::Expired { .. } => s.expired += 1,
            }
        }
        for effect in self.effects.drain(..) {
            let (index, example) = match effect {
                Effect::Output {
                    rule,
                    output: Output::Line { file, line },
                } => (
                    rule,
                    format!("{} ← {}", file.display(), clip(line.trim_end(), 200)),
                ),
                Effect::Output {
                    rule,
                    output: Output::Delivery(d),
                } => match Queued::of(&d) {
                    Some(q) => (
                        rule,
                        format!(
                            "email to {}: \"{}\"",
                            mask_email(&q.to.join(", ")),
                            q.subject
                        ),
                    ),
                    None => match Request::of(&d) {
                        Some(r) => (
                            rule,
                            format!("request to {}: {}", r.endpoint, clip(&r.body, 200)),
                        ),
                        None => (rule, format!("{} to {}", d.kind, d.to)),
                    },
                },
                Effect::Output {
                    rule,
                    output: Output::Remember(r),
                } => (
                    rule,
                    format!(
                        "remembered for {}: {}",
                        clip(&r.distinct_id, 60),
                        clip(r.entry.label.as_deref().unwrap_or(&r.entry.event), 140)
                    ),
                ),
                Effect::Output {
                    rule,
                    output: Output::Aggregate(c),
                } => (rule, c.describe()),
                Effect::Failed { .. } => continue,
            };
            if self.stats[index].examples.len() < examples {
                self.stats[index].examples.push(example);
            }
        }
    }
}

fn print_summary(
    args: &ReplayArgs,
    rules: &RuleSet,
    stats: &[RuleStats],
    totals: &Totals,
    elapsed: Duration,
    written: Option<&str>,
) {
    let events: u64 = totals.events;
    let per_sec = events as f64 / elapsed.as_secs_f64().max(1e-9);
    println!(
        "Replayed {} events from {} in {:.2} s ({} events/s){}.",
        thousands(events),
        args.file.display(),
        elapsed.as_secs_f64(),
        thousands(per_sec as u64),
        if totals.duplicates > 0 {
            format!(
                "; {} repeated event ids skipped",
                thousands(totals.duplicates)
            )
        } else {
            String::new()
        }
    );
    if totals.unreadable > 0 {
        println!(
            "{} items could not be read and were skipped:",
            thousands(totals.unreadable)
        );
        for e in &totals.errors {
            println!("  {e}");
        }
    }
    let width = rules
        .rules()
        .iter()
        .map(|r| r.name.chars().count())
        .max()
        .unwrap_or(4)
        .max(4);
    println!();
    println!(
        "{:width$}  {:>10}  {:>10}  {:>10}  {:>10}  {:>10}  {:>10}",
        "rule", "matched", "fired", "counting", "held back", "no key", "failed"
    );
    for (rule, s) in rules.rules().iter().zip(stats) {
        println!(
            "{:width$}  {:>10}  {:>10}  {:>10}  {:>10}  {:>10}  {:>10}",
            rule.name,
            thousands(s.matched),
            thousands(s.fired),
            thousands(s.counting),
            thousands(s.held_back),
            thousands(s.no_key),
            thousands(s.failed)
        );
    }
    println!();
    println!(
        "matched: [when] held (with [wait]: the events that started or cancelled a wait) · counting: below [count] at_least · held back: by [limits] (once, or its cap group) · no key: the event lacked a `per`/`once_per` field"
    );
    if rules.rules().iter().any(crate::rules::Rule::keeps_pending) {
        println!();
        println!(
            "{:width$}  {:>10}  {:>10}  {:>10}  {:>10}  {:>10}  {:>10}",
            "waits", "started", "cancelled", "fired", "ended", "held", "pending"
        );
        for (rule, s) in rules.rules().iter().zip(stats) {
            if rule.keeps_pending() {
                println!(
                    "{:width$}  {:>10}  {:>10}  {:>10}  {:>10}  {:>10}  {:>10}",
                    rule.name,
                    thousands(s.waiting),
                    thousands(s.cancelled),
                    thousands(s.fired),
                    thousands(s.expired),
                    thousands(s.held),
                    thousands(s.pending)
                );
            }
        }
        println!();
        println!(
            "started: by a triggering event (again, if one was pending) · ended: without acting (no `until` event in time, or `then` did not hold) · held: decided outside the [send_window], run when it opened · pending: waits and held actions left at the end of the file"
        );
    }
    if stats.iter().any(|s| !s.examples.is_empty()) {
        println!();
        println!("Examples:");
        for (rule, s) in rules.rules().iter().zip(stats) {
            for e in &s.examples {
                println!("  {}: {e}", rule.name);
            }
        }
    }
    println!();
    match written {
        Some(w) => println!("{w}"),
        None => println!(
            "Dry run: nothing was written or sent. Add --execute-into DIR to run the actions into a separate folder."
        ),
    }
}

/// The decoded events of up to [`BATCH`] items read, and what could not be read on the way.
#[derive(Default)]
struct Batch {
    /// Events read, wanted by a rule or not.
    read: usize,
    /// The events some rule wants.
    events: Vec<Event>,
    unreadable: Vec<String>,
}

/// The text of up to [`BATCH`] items of the file, one after the other, and where each is.
#[derive(Default)]
struct Chunk {
    text: Vec<u8>,
    items: Vec<(Position, Range<usize>)>,
}

/// Reads the whole file and sends its events in batches, in file order; stops early when nobody
/// receives them any more. Decoding is most of a replay's work, so chunks of items go round in
/// turn to one decoding thread per core while the next chunks are read, and only events some rule
/// is tried on are built (see [`event::decode_wanted`]).
fn decode_file(
    reader: impl BufRead,
    rules: &RuleSet,
    batches: &SyncSender<Batch>,
) -> Result<(), String> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    std::thread::scope(|scope| {
        let mut decoders = Decoders {
            workers: (0..threads)
                .map(|_| {
                    let (give, chunks) = std::sync::mpsc::sync_channel::<Chunk>(1);
                    let (done, decoded) = std::sync::mpsc::sync_channel(1);
                    scope.spawn(move || {
                        for chunk in chunks {
                            if done.send((decode_chunk(&chunk, rules), chunk)).is_err() {
                                break;
                            }
                        }
                    });
                    (give, decoded)
                })
                .collect(),
            given: 0,
            batches,
        };
        let mut chunk = Chunk::default();
        let mut receiving = true;
        let read = read_items(reader, |position, text| {
            let start = chunk.text.len();
            chunk.text.extend_from_slice(text);
            chunk.items.push((position, start..chunk.text.len()));
            if chunk.items.len() >= BATCH {
                match decoders.give(std::mem::take(&mut chunk)) {
                    Some(spare) => chunk = spare,
                    None => receiving = false,
                }
            }
            receiving
        });
        if receiving && (chunk.items.is_empty() || decoders.give(chunk).is_some()) {
            decoders.finish();
        }
        read
    })
}

/// One decoding thread's way in (chunks) and out (their batches, with the chunk's buffers back).
type Worker = (SyncSender<Chunk>, Receiver<(Batch, Chunk)>);

/// The decoding threads: chunk number `n` goes to thread `n % threads`, so taking their batches
/// in turn keeps the file's order.
struct Decoders<'a> {
    workers: Vec<Worker>,
    /// Chunks given so far.
    given: usize,
    batches: &'a SyncSender<Batch>,
}

impl Decoders<'_> {
    /// Gives `chunk` to the next thread, first passing on the batch of the chunk it had before.
    /// Returns an empty chunk to read into, or `None` when nobody receives batches any more.
    fn give(&mut self, chunk: Chunk) -> Option<Chunk> {
        let turn = self.given % self.workers.len();
        let spare = if self.given >= self.workers.len() {
            self.pass_on(turn)?
        } else {
            Chunk::default()
        };
        self.workers[turn].0.send(chunk).ok()?;
        self.given += 1;
        Some(spare)
    }

    /// Passes on the batches of the chunks still being decoded, in order.
    fn finish(mut self) {
        let first = self.given.saturating_sub(self.workers.len());
        for n in first..self.given {
            if self.pass_on(n % self.workers.len()).is_none() {
                return;
            }
        }
    }

    /// Waits for thread `turn`'s batch and sends it on; gives back the chunk's emptied buffers.
    /// `None` when nobody receives any more, or the thread is gone (it panicked: the scope
    /// rethrows the panic).
    fn pass_on(&mut self, turn: usize) -> Option<Chunk> {
        let (batch, mut chunk) = self.workers[turn].1.recv().ok()?;
        self.batches.send(batch).ok()?;
        chunk.text.clear();
        chunk.items.clear();
        Some(chunk)
    }
}

/// Decodes a chunk's items.
fn decode_chunk(chunk: &Chunk, rules: &RuleSet) -> Batch {
    let mut batch = Batch::default();
    // Events without a timestamp happened when they were read.
    let now = Clock::wall().now();
    // No receive time exists for past events: one stamped ahead of the replay's own clock by
    // more than the service's default skew is timed at that limit, as the service would.
    let limits = &event::BodyLimits {
        max_clock_skew: Some(event::DEFAULT_CLOCK_SKEW),
        ..event::BodyLimits::LOCAL_FILES
    };
    for (position, range) in &chunk.items {
        let text = &chunk.text[range.clone()];
        match event::decode_wanted(text, now, limits, |name| rules.wants(name)) {
            Ok(mut decoded) => {
                batch.read += decoded.received;
                batch.events.append(&mut decoded.events);
            }
            Err(e) => batch.unreadable.push(format!("{position}: {e}")),
        }
    }
    batch
}

/// 1234567 → "1,234,567".
fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn clip(text: &str, max_chars: usize) -> String {
    match text.char_indices().nth(max_chars) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_thousands() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1000), "1,000");
        assert_eq!(thousands(1234567), "1,234,567");
    }
}
