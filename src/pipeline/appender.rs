//! The appender: writes the lines committed for each output file into the file, in order, each
//! exactly once.
//!
//! The committer makes a batch's JSONL lines durable in the store, in the same transaction as
//! the batch's state: that one sync is all an acknowledgement waits for. This thread then
//! appends the lines to their files and syncs each file, and hands back how far each file is
//! written (up to which queued text, and its length then). The committer records that in a later
//! transaction (its next batch, its minute tick, or when it stops) and the store forgets those
//! lines.
//!
//! A crash between an append and that record leaves a file longer than recorded. Before a file
//! is first written after a start, the queued lines found whole after the recorded length are
//! kept (synced, then recorded), what follows them (part of a write) is cut off, and the rest of
//! the queue is appended: no line is lost, doubled or partial, and a reader of the file never
//! sees a line go away and come back. A write that fails (a full disk) is cut off at once and
//! tried again every [`RETRY`]; the lines wait in the store meanwhile, visible in `/readyz` and
//! the metrics. One file's trouble never holds up the others.
//!
//! One case is not caught: a file cut shorter by someone else (a copy-and-truncate rotation)
//! while lines are written and not yet recorded, then a crash, gets those lines again.
//!
//! With a store several instances share (PostgreSQL), one instance at a time writes each file:
//! the one holding its lock (`Backend::writes_file`). Its appender looks at the store every
//! [`LOOK_AGAIN`] for lines the other instances committed, writes them into the file in its own
//! data folder, and records how far itself when its committer has not within [`RECORD_AFTER`]. The others write nothing, and count what waits for
//! the file as done once the store says it is written.

use std::collections::{HashMap, VecDeque};
use std::path::Path;
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, sync_channel};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};
use tracing::{error, info, warn};

use crate::actions::jsonl::JsonlFiles;
use crate::clock::Clock;
use crate::store::{Backend, FileProgress, QueuedLines, StoreError};
use crate::telemetry;

/// How often a file that could not be written is tried again.
const RETRY: Duration = Duration::from_secs(1);
/// Most bytes appended to one file in one write.
const MAX_WRITE: usize = 8 << 20;
/// How far back from its end a file taken over from another instance is searched for its last
/// whole line.
const MAX_LINE_TAIL: u64 = 1 << 20;
/// With a shared store, how often the store is looked at for lines other instances committed.
const LOOK_AGAIN: Duration = Duration::from_millis(100);
/// With a shared store, how long how far a file is written may wait for the committer to record
/// it before the appender records it itself.
const RECORD_AFTER: Duration = Duration::from_millis(500);

/// What the appender and the committer share.
#[derive(Default)]
struct Shared {
    files: Mutex<HashMap<String, FileState>>,
    /// How far each file was written and synced, not yet recorded by the committer.
    written: Mutex<HashMap<String, (u64, u64)>>,
    /// Why the thread stopped on its own (a panic).
    stopped: Mutex<Option<String>>,
}

impl Shared {
    /// How far files were written and not recorded yet: (file, last text, length).
    fn written(&self) -> Vec<(String, u64, u64)> {
        (lock(&self.written).iter())
            .map(|(f, &(s, l))| (f.clone(), s, l))
            .collect()
    }

    /// `done` (from [`Shared::written`]) is recorded: forgets it, unless the file was written
    /// further since.
    fn recorded(&self, done: &[(String, u64, u64)]) {
        let mut written = lock(&self.written);
        for (file, seq, len) in done {
            if written.get(file) == Some(&(*seq, *len)) {
                written.remove(file);
            }
        }
    }
}

/// One file's lines between the committer and the appender.
#[derive(Debug, Default)]
struct FileState {
    /// The texts committed and not yet written, in order: (number, bytes, committed at ms).
    waiting: VecDeque<(u64, u64, i64)>,
    /// The last text written: a number at or below it is done, even if the committer tells of
    /// it only afterwards.
    applied: u64,
    /// The last text whose commit is durable: only those are written (with `--durability
    /// interval`, a commit becomes durable at the next sync).
    durable: u64,
    /// Why the last write failed, until one succeeds.
    error: Option<String>,
}

impl FileState {
    fn add(&mut self, seq: u64, bytes: u64, at_ms: i64) {
        let newer = self.waiting.back().is_none_or(|(last, _, _)| seq > *last);
        if seq > self.applied && newer {
            self.waiting.push_back((seq, bytes, at_ms));
        }
    }

    /// Every text told of is durable.
    fn all_durable(&mut self) {
        if let Some((last, _, _)) = self.waiting.back() {
            self.durable = self.durable.max(*last);
        }
    }

    /// Whether a text waits that may be written.
    fn ready(&self) -> bool {
        self.waiting
            .front()
            .is_some_and(|(seq, _, _)| *seq <= self.durable)
    }

    fn done_through(&mut self, seq: u64) {
        self.applied = self.applied.max(seq);
        while self
            .waiting
            .front()
            .is_some_and(|(s, _, _)| *s <= self.applied)
        {
            self.waiting.pop_front();
        }
    }

    fn view(&self) -> Option<Waiting> {
        let (_, _, since) = self.waiting.front()?;
        Some(Waiting {
            bytes: self.waiting.iter().map(|(_, b, _)| b).sum(),
            since_ms: Some(*since),
            error: self.error.clone(),
        })
    }
}

/// Lines committed for a file and not yet in it.
#[derive(Debug, Clone, Default)]
pub struct Waiting {
    pub bytes: u64,
    /// When the oldest of them was committed (milliseconds since 1970).
    pub since_ms: Option<i64>,
    /// Why the last write failed, until one succeeds.
    pub error: Option<String>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The lines waiting for their files, as the rest of the service sees them (`/readyz`).
#[derive(Clone)]
pub struct Backlog(Arc<Shared>);

impl Backlog {
    /// Every file with lines waiting.
    pub fn waiting(&self) -> HashMap<String, Waiting> {
        let files = lock(&self.0.files);
        files
            .iter()
            .filter_map(|(f, state)| Some((f.clone(), state.view()?)))
            .collect()
    }

    /// `Ok` while the appender runs; otherwise why it stopped.
    pub fn health(&self) -> Result<(), String> {
        match &*lock(&self.0.stopped) {
            None => Ok(()),
            Some(why) => Err(format!(
                "the appender stopped on an internal error ({why}): acknowledged lines wait in the store and are written at the next start; restart the service"
            )),
        }
    }
}

/// The committer's side of the appender.
pub struct Appender {
    shared: Arc<Shared>,
    wake: Option<SyncSender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Appender {
    /// Starts the thread, which brings each file to what was committed before it first writes
    /// it, and appends the lines still queued at once.
    pub fn start(
        store: Arc<dyn Backend>,
        files: JsonlFiles,
        clock: Clock,
    ) -> Result<Appender, StoreError> {
        let shared = Arc::new(Shared::default());
        *lock(&shared.files) = read_waiting(store.as_ref(), &HashMap::new())?;
        let (wake, woken) = sync_channel(1);
        let mut thread = Thread {
            shared_store: store.is_shared(),
            unrecorded_since: None,
            store_error: None,
            store,
            files,
            progress: HashMap::new(),
            failed: HashMap::new(),
            shared: shared.clone(),
            clock,
        };
        let on_panic = shared.clone();
        let thread = std::thread::Builder::new()
            .name("appender".into())
            .spawn(move || {
                let run = std::panic::AssertUnwindSafe(|| thread.run(woken));
                if let Err(panic) = std::panic::catch_unwind(run) {
                    let why = panic
                        .downcast_ref::<&str>()
                        .map(|s| s.to_string())
                        .or_else(|| panic.downcast_ref::<String>().cloned())
                        .unwrap_or_else(|| "a panic".into());
                    error!("the appender stopped: {why}");
                    *lock(&on_panic.stopped) = Some(why);
                }
            })
            .map_err(|e| StoreError::Unavailable(format!("cannot start the appender: {e}")))?;
        let appender = Appender {
            shared,
            wake: Some(wake),
            thread: Some(thread),
        };
        appender.wake();
        Ok(appender)
    }

    /// Texts were committed at `at_ms`, each (file, number, bytes): append them once their
    /// commit is `durable` (else once [`synced`](Self::synced) says so).
    pub fn queued(
        &self,
        texts: impl IntoIterator<Item = (String, u64, u64)>,
        at_ms: i64,
        durable: bool,
    ) {
        {
            let mut files = lock(&self.shared.files);
            for (file, seq, bytes) in texts {
                let state = files.entry(file).or_default();
                state.add(seq, bytes, at_ms);
                if durable {
                    state.all_durable();
                }
            }
        }
        if durable {
            self.wake();
        }
    }

    /// Every commit so far is durable: its texts may be written.
    pub fn synced(&self) {
        lock(&self.shared.files)
            .values_mut()
            .for_each(FileState::all_durable);
        self.wake();
    }

    /// Every commit so far is durable, and some that were told of were lost (the database was
    /// reopened after a failed write, and the journal run again): what waits is read again
    /// from the store.
    pub fn reseed(&self, store: &dyn Backend) -> Result<(), StoreError> {
        let known = (lock(&self.shared.files).iter())
            .map(|(file, state)| (file.clone(), state.applied))
            .collect();
        let mut fresh = read_waiting(store, &known)?;
        let mut files = lock(&self.shared.files);
        // The thread may have written more meanwhile; its errors still stand.
        for (file, state) in &mut fresh {
            if let Some(old) = files.get_mut(file) {
                state.done_through(old.applied);
                state.error = old.error.take();
            }
        }
        *files = fresh;
        drop(files);
        self.wake();
        Ok(())
    }

    /// What waits for `file`.
    pub fn backlog(&self, file: &str) -> Option<Waiting> {
        lock(&self.shared.files).get(file)?.view()
    }

    /// A view of the lines waiting, for the rest of the service.
    pub fn view(&self) -> Backlog {
        Backlog(self.shared.clone())
    }

    /// How far files were written since the committer last recorded it: (file, last text, length).
    pub fn written(&self) -> Vec<(String, u64, u64)> {
        self.shared.written()
    }

    /// The committer recorded `done` (from [`written`](Self::written)): forgets it, unless the
    /// file was written further since.
    pub fn recorded(&self, done: &[(String, u64, u64)]) {
        self.shared.recorded(done);
    }

    fn wake(&self) {
        if let Some(wake) = &self.wake {
            let _ = wake.try_send(());
        }
    }

    /// Lets the thread append what is committed, then waits for it to end.
    pub fn stop(&mut self) {
        self.wake.take();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for Appender {
    fn drop(&mut self) {
        self.stop();
    }
}

/// What waits for each file: every text the store holds after what the file is known to hold
/// (the store's record, or `known` when this run wrote further), all of them durable (the store
/// is read at a start, or right after a sync).
fn read_waiting(
    store: &dyn Backend,
    known: &HashMap<String, u64>,
) -> Result<HashMap<String, FileState>, StoreError> {
    let mut files = HashMap::new();
    for (file, recorded) in store.files()? {
        let mut state = FileState {
            applied: recorded.applied.max(known.get(&file).copied().unwrap_or(0)),
            ..FileState::default()
        };
        for q in store.queued_lines(&file, state.applied, usize::MAX)? {
            state.add(q.seq, q.text.len() as u64, q.at_ms);
        }
        state.all_durable();
        files.insert(file, state);
    }
    Ok(files)
}

/// The appender's thread.
struct Thread {
    store: Arc<dyn Backend>,
    /// Whether other instances share the store (see the module's documentation).
    shared_store: bool,
    /// Since when a file's progress waits to be recorded (with a shared store).
    unrecorded_since: Option<Instant>,
    /// The last error reading or recording the files' progress (with a shared store).
    store_error: Option<String>,
    files: JsonlFiles,
    /// How far each file is written, as this thread knows it (ahead of the store until the
    /// committer records it); a file not in it is brought to what was committed first.
    progress: HashMap<String, FileProgress>,
    /// When each file whose last write failed may be tried again.
    failed: HashMap<String, Instant>,
    shared: Arc<Shared>,
    clock: Clock,
}

impl Thread {
    fn run(&mut self, woken: Receiver<()>) {
        let mut retry = None;
        loop {
            if self.shared_store {
                retry = Some(retry.map_or(LOOK_AGAIN, |r: Duration| r.min(LOOK_AGAIN)));
            }
            let stopping = match retry {
                None => woken.recv().is_err(),
                Some(after) => matches!(
                    woken.recv_timeout(after),
                    Err(RecvTimeoutError::Disconnected)
                ),
            };
            if self.shared_store {
                // Said once, not every turn, while the store stays unreachable.
                match (
                    self.take_turns().and_then(|()| self.record_if_late()),
                    &self.store_error,
                ) {
                    (Ok(()), Some(_)) => {
                        info!("the output files' progress can be read from the store again");
                        self.store_error = None;
                    }
                    (Err(e), last) if last.as_deref() != Some(&e.to_string()) => {
                        warn!("cannot read or record the output files' progress in the store: {e}");
                        self.store_error = Some(e.to_string());
                    }
                    _ => {}
                }
            }
            retry = self.round();
            if stopping {
                break;
            }
        }
        info!("appender stopped");
    }

    /// Appends what waits, a write per file in turn, until nothing waits or only files that
    /// failed are left; returns when to try those again.
    fn round(&mut self) -> Option<Duration> {
        loop {
            let now = Instant::now();
            let mut files: Vec<String> = {
                let files = lock(&self.shared.files);
                files
                    .iter()
                    .filter(|(_, state)| state.ready())
                    .map(|(f, _)| f.clone())
                    .collect()
            };
            // A file another instance writes is left to it.
            if self.shared_store {
                files.retain(|f| self.store.writes_file(f).unwrap_or(false));
            }
            let mut wrote = false;
            for file in &files {
                if self.failed.get(file).is_some_and(|at| *at > now) {
                    continue;
                }
                match self.append(file) {
                    Ok(()) => {
                        wrote = true;
                        self.failed.remove(file);
                    }
                    Err(e) => self.failed_to_write(file, e),
                }
            }
            self.show_lag();
            if !wrote {
                let soonest = self.failed.values().min()?;
                return Some(soonest.saturating_duration_since(Instant::now()));
            }
        }
    }

    /// With a shared store: for each file, whether this instance writes it. A file another
    /// instance writes is left to it (what waits here is done once the store says so, and a
    /// turn of this instance later starts from the store's record); one this instance writes
    /// has what the others committed for it read from the store.
    fn take_turns(&mut self) -> Result<(), StoreError> {
        for (file, recorded) in self.store.files()? {
            let ours = self.store.writes_file(&file)?;
            let mut files = lock(&self.shared.files);
            let state = files.entry(file.clone()).or_default();
            if !ours {
                self.progress.remove(&file);
                state.done_through(recorded.applied);
                continue;
            }
            let from = state.applied.max(recorded.applied);
            if recorded.next > from + 1
                && state.waiting.back().is_none_or(|w| w.0 < recorded.next - 1)
            {
                drop(files);
                let queued = self.store.queued_lines(&file, from, usize::MAX)?;
                let mut files = lock(&self.shared.files);
                let state = files.entry(file.clone()).or_default();
                for q in queued {
                    state.add(q.seq, q.text.len() as u64, q.at_ms);
                }
                // What another instance committed is durable (PostgreSQL's commit).
                state.all_durable();
            }
        }
        Ok(())
    }

    fn failed_to_write(&mut self, file: &str, e: String) {
        let mut files = lock(&self.shared.files);
        let state = files.entry(file.to_string()).or_default();
        if state.error.as_deref() != Some(&e) {
            error!(
                file,
                "cannot write the lines committed for this file; they wait and are tried again every second: {e}"
            );
        }
        state.error = Some(e);
        drop(files);
        metrics::counter!(telemetry::LINES_WRITE_ERRORS.name, "file" => file.to_string())
            .increment(1);
        self.failed.insert(file.to_string(), Instant::now() + RETRY);
    }

    /// Appends the next texts queued for `file` (as many as fit in one write).
    fn append(&mut self, file: &str) -> Result<(), String> {
        let progress = match self.progress.get(file) {
            Some(p) => *p,
            None => self.recover(file)?,
        };
        let durable = lock(&self.shared.files)
            .get(file)
            .map_or(0, |state| state.durable);
        let mut queued = self
            .store
            .queued_lines(file, progress.applied, MAX_WRITE)
            .map_err(|e| e.to_string())?;
        queued.retain(|q| q.seq <= durable);
        let Some(last) = queued.last() else {
            // Nothing durable in the store after what is written: what was waiting is done.
            let mut files = lock(&self.shared.files);
            let state = files.entry(file.to_string()).or_default();
            state.done_through(progress.applied);
            if state.ready() {
                warn!(
                    file,
                    "lines counted as waiting are not in the store: not counted any more"
                );
                while state.ready() {
                    state.waiting.pop_front();
                }
            }
            return Ok(());
        };
        cut_to(&mut self.files, file, progress.len).map_err(|e| e.to_string())?;
        let text: String = queued.iter().map(|q| q.text.as_str()).collect();
        let (_, len) = self
            .files
            .append_durably(Path::new(file), &text)
            .map_err(|e| e.to_string())?;
        let done = FileProgress {
            len,
            applied: last.seq,
            ..progress
        };
        self.progress.insert(file.to_string(), done);
        self.written(file, done);
        self.done(file, done.applied);
        Ok(())
    }

    /// `file` is written as far as `done` says: the committer records it with its next batch
    /// (with a shared store, this thread does if the committer has not within
    /// [`RECORD_AFTER`]: see [`Thread::record_if_late`]).
    fn written(&self, file: &str, done: FileProgress) {
        lock(&self.shared.written).insert(file.to_string(), (done.applied, done.len));
    }

    /// With a shared store, records how far files are written when the committer has not done
    /// it for [`RECORD_AFTER`]: this instance may receive no events while the others send it
    /// lines to write, and the others count theirs as waiting until the record says otherwise.
    fn record_if_late(&mut self) -> Result<(), StoreError> {
        let done = self.shared.written();
        if done.is_empty() {
            self.unrecorded_since = None;
            return Ok(());
        }
        let since = *self.unrecorded_since.get_or_insert_with(Instant::now);
        if since.elapsed() < RECORD_AFTER {
            return Ok(());
        }
        let mut txn = self.store.begin()?;
        for (file, applied, len) in &done {
            txn.applied(file, *applied, *len)?;
        }
        txn.commit()?;
        self.shared.recorded(&done);
        self.unrecorded_since = None;
        Ok(())
    }

    /// Brings `file` to what was committed before it is first written (see [`recover`]).
    fn recover(&mut self, file: &str) -> Result<FileProgress, String> {
        let files = self.store.files().map_err(|e| e.to_string())?;
        let recorded = files.into_iter().find(|(f, _)| f == file).map_or(
            FileProgress {
                len: 0,
                applied: 0,
                next: 1,
                ours: true,
            },
            |(_, p)| p,
        );
        let queued = (self.store)
            .queued_lines(file, recorded.applied, usize::MAX)
            .map_err(|e| e.to_string())?;
        let found = recover(&mut self.files, file, recorded, &queued).map_err(|e| e.to_string())?;
        if found != recorded {
            self.written(file, found);
            self.done(file, found.applied);
        }
        self.progress.insert(file.to_string(), found);
        Ok(found)
    }

    /// Texts up to `seq` are in `file`.
    fn done(&self, file: &str, seq: u64) {
        let mut files = lock(&self.shared.files);
        let state = files.entry(file.to_string()).or_default();
        state.done_through(seq);
        if state.error.take().is_some() {
            info!(file, "the lines waiting for this file are written");
        }
    }

    /// Sets the gauges of what waits: bytes and seconds, per file.
    fn show_lag(&self) {
        let now_ms = self.clock.now().timestamp_millis();
        let files = lock(&self.shared.files);
        for (file, state) in files.iter() {
            let w = state.view().unwrap_or_default();
            let lag = w
                .since_ms
                .map_or(0.0, |t| (now_ms - t).max(0) as f64 / 1000.0);
            metrics::gauge!(telemetry::LINES_WAITING_BYTES.name, "file" => file.clone())
                .set(w.bytes as f64);
            metrics::gauge!(telemetry::LINES_LAG.name, "file" => file.clone()).set(lag);
        }
    }
}

/// How far `file` really is written, from what was `recorded` and the texts `queued` after it.
/// A crash between a write and its record leaves those texts in the file already: they are
/// recognised, synced and kept (a reader of the file never sees a line twice), and only what
/// follows them, which can only be part of a write, is cut off. A file shorter than recorded
/// was cut or replaced by someone else, and is taken as it is.
fn recover(
    files: &mut JsonlFiles,
    file: &str,
    recorded: FileProgress,
    queued: &[QueuedLines],
) -> std::io::Result<FileProgress> {
    let path = Path::new(file);
    files.open(path)?;
    let actual = files.len(path)?;
    // Another instance wrote it last, in its own data folder: this copy goes on from its end,
    // after its last whole line (part of a line left by a stop in the middle of a write goes).
    if !recorded.ours {
        let tail = files.read_from(path, actual.saturating_sub(MAX_LINE_TAIL), MAX_LINE_TAIL)?;
        let whole = match tail.iter().rposition(|b| *b == b'\n') {
            Some(at) => actual - tail.len() as u64 + at as u64 + 1,
            None if actual <= MAX_LINE_TAIL => 0,
            None => actual,
        };
        if whole < actual {
            warn!(
                file,
                bytes = actual - whole,
                "removing part of a line at the end of the file"
            );
            files.truncate(path, whole)?;
        }
        info!(
            file,
            bytes = whole,
            applied = recorded.applied,
            "taking the file over from another instance: the lines after the last one it wrote go on in this data folder's copy"
        );
        return Ok(FileProgress {
            len: whole,
            ours: true,
            ..recorded
        });
    }
    if actual <= recorded.len {
        return cut_to(files, file, recorded.len).map(|len| FileProgress { len, ..recorded });
    }
    // No more than the queue could have written is read.
    let most: u64 = queued.iter().map(|q| q.text.len() as u64).sum();
    let tail = files.read_from(path, recorded.len, most)?;
    let mut found = recorded;
    let mut rest = tail.as_slice();
    for q in queued {
        let Some(after) = rest.strip_prefix(q.text.as_bytes()) else {
            break;
        };
        rest = after;
        found.applied = q.seq;
        found.len += q.text.len() as u64;
    }
    if found.applied > recorded.applied {
        // The write may not have been synced before the crash.
        files.open(path)?.sync_data()?;
        info!(
            file,
            bytes = found.len - recorded.len,
            "lines written before a stop and not yet recorded are in the file: kept"
        );
    }
    cut_to(files, file, found.len)?;
    Ok(found)
}

/// Makes `file` as long as recorded before more is appended, and returns the length it has
/// then: what is past `recorded` is cut off (part of a write cut short, or lines someone else
/// added); a file shorter than recorded was cut or replaced by someone else, and is taken as it
/// is.
fn cut_to(files: &mut JsonlFiles, file: &str, recorded: u64) -> std::io::Result<u64> {
    let path = Path::new(file);
    files.open(path)?;
    let actual = files.len(path)?;
    if actual > recorded {
        warn!(
            file,
            bytes = actual - recorded,
            "removing the end of the file: part of a write cut short, or lines tripline did not write"
        );
        files.truncate(path, recorded)?;
        return Ok(recorded);
    }
    if actual < recorded {
        warn!(
            file,
            "the file is shorter than tripline wrote it (truncated or replaced, or written so far by another instance sharing the store, in its data folder): continuing from its current end"
        );
    }
    Ok(actual)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::redb::Db;

    /// Waits until nothing waits for any file.
    fn settled(appender: &Appender) {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !appender.view().waiting().is_empty() {
            assert!(std::time::Instant::now() < deadline, "lines still wait");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn start_up_brings_a_file_to_what_was_committed_and_writes_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let db: Arc<dyn Backend> = Arc::new(Db::open(dir.path()).unwrap());
        let mut txn = db.begin().unwrap();
        txn.start_file("out.jsonl", 0).unwrap();
        txn.queue_lines("out.jsonl", "{\"a\"}\n", 1).unwrap();
        txn.queue_lines("out.jsonl", "{\"b\"}\n", 2).unwrap();
        txn.applied("out.jsonl", 1, 6).unwrap();
        txn.start_file("gone.jsonl", 10).unwrap();
        txn.queue_lines("out.jsonl", "{\"c\"}\n", 3).unwrap();
        txn.commit().unwrap();
        // The crash came after `b` was written, and part of `c`, before the committer recorded
        // either: `b` is kept as it is, the part of `c` cut off and `c` written again. The file
        // recorded 10 bytes long is gone: taken as it is.
        std::fs::write(dir.path().join("out.jsonl"), "{\"a\"}\n{\"b\"}\n{\"c").unwrap();
        let mut appender =
            Appender::start(db.clone(), JsonlFiles::new(dir.path()), Clock::wall()).unwrap();
        settled(&appender);
        assert_eq!(
            std::fs::read_to_string(dir.path().join("out.jsonl")).unwrap(),
            "{\"a\"}\n{\"b\"}\n{\"c\"}\n"
        );
        // For the committer to record.
        assert_eq!(appender.written(), [("out.jsonl".to_string(), 3, 18)]);
        appender.stop();
    }

    #[test]
    fn recovery_keeps_the_queued_lines_found_whole_and_cuts_off_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let mut files = JsonlFiles::new(dir.path());
        let queued = |seq: u64, text: &str| QueuedLines {
            seq,
            at_ms: 0,
            text: text.into(),
        };
        let recorded = FileProgress {
            len: 4,
            applied: 1,
            next: 4,
            ours: true,
        };
        let b_and_c = [queued(2, "bb\n"), queued(3, "cc\n")];
        std::fs::write(dir.path().join("f"), "aaa\nbb\ncc").unwrap();
        let found = recover(&mut files, "f", recorded, &b_and_c).unwrap();
        assert_eq!(
            (found.applied, found.len),
            (2, 7),
            "b kept, part of c cut off"
        );
        assert_eq!(std::fs::read(dir.path().join("f")).unwrap(), b"aaa\nbb\n");
        // Something else after the record: cut off, nothing kept.
        std::fs::write(dir.path().join("f"), "aaa\nxx\n").unwrap();
        let found = recover(&mut files, "f", recorded, &b_and_c).unwrap();
        assert_eq!(found, recorded);
        assert_eq!(std::fs::read(dir.path().join("f")).unwrap(), b"aaa\n");
        // Shorter than recorded (cut by someone): taken as it is.
        std::fs::write(dir.path().join("f"), "").unwrap();
        let found = recover(&mut files, "f", recorded, &b_and_c).unwrap();
        assert_eq!((found.applied, found.len), (1, 0));
        // Written last by another instance (a shared store): this copy is not cut to that
        // instance's length, whatever it holds; it goes on from its end.
        std::fs::write(dir.path().join("f"), "aaa\nzzzzzz\nyy\n").unwrap();
        let theirs = FileProgress {
            ours: false,
            ..recorded
        };
        let found = recover(&mut files, "f", theirs, &b_and_c).unwrap();
        assert_eq!((found.applied, found.len, found.ours), (1, 14, true));
        assert_eq!(
            std::fs::read(dir.path().join("f")).unwrap(),
            b"aaa\nzzzzzz\nyy\n"
        );
        // ... after its last whole line: part of one, left by a stop in the middle of a write,
        // goes.
        std::fs::write(dir.path().join("f"), "aaa\nzzzzzz\nyy").unwrap();
        let found = recover(&mut files, "f", theirs, &b_and_c).unwrap();
        assert_eq!(found.len, 11);
        assert_eq!(
            std::fs::read(dir.path().join("f")).unwrap(),
            b"aaa\nzzzzzz\n"
        );
    }

    #[test]
    fn what_the_committer_records_is_forgotten_by_the_store() {
        let dir = tempfile::tempdir().unwrap();
        let db: Arc<dyn Backend> = Arc::new(Db::open(dir.path()).unwrap());
        let mut txn = db.begin().unwrap();
        for text in ["1\n", "2\n", "3\n"] {
            txn.queue_lines("n.jsonl", text, 1).unwrap();
        }
        txn.applied("n.jsonl", 2, 4).unwrap();
        txn.commit().unwrap();
        let left = db.queued_lines("n.jsonl", 0, usize::MAX).unwrap();
        assert_eq!(left.len(), 1);
        assert_eq!((left[0].seq, left[0].text.as_str()), (3, "3\n"));
        // At most `max_bytes`, but always one.
        let mut txn = db.begin().unwrap();
        txn.queue_lines("n.jsonl", "4\n", 1).unwrap();
        txn.commit().unwrap();
        assert_eq!(db.queued_lines("n.jsonl", 2, 1).unwrap().len(), 1);
        assert_eq!(db.queued_lines("n.jsonl", 2, 4).unwrap().len(), 2);
    }
}
