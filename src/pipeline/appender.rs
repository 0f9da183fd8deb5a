//! The appender: writes the lines committed for each output file into the file, in order, each
//! exactly once.
//!
//! The committer makes a batch's JSONL lines durable in the store, in the same transaction as
//! the batch's state: that one sync is all an acknowledgement waits for. This thread then
//! appends the lines to their files and syncs each file, and hands back how far each file is
//! written (up to which queued text, and its length then). The committer records that in its
//! next transaction and the store forgets those lines.
//!
//! A crash between an append and that record leaves a file longer than recorded. At start, the
//! queued lines found whole after the recorded length are kept (and recorded), what follows them
//! (part of a write) is cut off, and the rest of the queue is appended: no line is lost, doubled
//! or partial, and a reader of the file never sees a line go away and come back. A write that fails (a full disk) is cut off at once and tried
//! again every [`RETRY`]; the lines wait in the store meanwhile, visible in `/readyz` and the
//! metrics.

use std::collections::HashMap;
use std::path::Path;
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, sync_channel};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;
use tracing::{error, info, warn};

use crate::actions::jsonl::JsonlFiles;
use crate::clock::Clock;
use crate::store::{Backend, FileProgress, QueuedLines, StoreError};
use crate::telemetry;

/// How often a file that could not be written is tried again.
const RETRY: Duration = Duration::from_secs(1);
/// Most bytes appended to one file in one write.
const MAX_WRITE: usize = 8 << 20;

/// What the appender and the committer share.
#[derive(Default)]
struct Shared {
    /// For each output file with lines waiting: how many bytes, since when, and why the last
    /// write failed.
    waiting: Mutex<HashMap<String, Waiting>>,
    /// How far each file was written and synced, not yet recorded by the committer.
    written: Mutex<HashMap<String, (u64, u64)>>,
}

/// Lines committed for a file and not yet in it.
#[derive(Debug, Clone, Default)]
pub struct Waiting {
    pub bytes: u64,
    /// When the oldest of them was committed (at most: milliseconds since 1970).
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
        lock(&self.0.waiting).clone()
    }
}

/// The committer's side of the appender.
pub struct Appender {
    shared: Arc<Shared>,
    wake: Option<SyncSender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Appender {
    /// Brings every output file back to what was recorded (cutting off what a crash left after
    /// it), then starts the thread, which appends the lines still queued at once. `written` is
    /// called after each write the committer should record.
    pub fn start(
        store: Arc<dyn Backend>,
        mut files: JsonlFiles,
        clock: Clock,
        written: Box<dyn Fn() + Send>,
    ) -> Result<Appender, StoreError> {
        let shared = Arc::new(Shared::default());
        let mut progress = HashMap::new();
        let mut found = Vec::new();
        for (file, recorded) in store.files()? {
            let queued = store.queued_lines(&file, recorded.applied, usize::MAX)?;
            // A file that cannot be opened now is brought back when it can, before its next
            // write (see `Thread::append`).
            let p = match recover(&mut files, &file, recorded, &queued) {
                Ok(p) => p,
                Err(e) => {
                    warn!(file, "cannot open this output file yet: {e}");
                    recorded
                }
            };
            let left: Vec<_> = queued.iter().filter(|q| q.seq > p.applied).collect();
            if let Some(first) = left.first() {
                lock(&shared.waiting).insert(
                    file.clone(),
                    Waiting {
                        bytes: left.iter().map(|q| q.text.len() as u64).sum(),
                        since_ms: Some(first.at_ms),
                        error: None,
                    },
                );
            }
            if p != recorded {
                found.push((file.clone(), p));
            }
            progress.insert(file, p);
        }
        if !found.is_empty() {
            let mut txn = store.begin()?;
            for (file, p) in found {
                txn.applied(&file, p.applied, p.len)?;
            }
            txn.commit()?;
        }
        let (wake, woken) = sync_channel(1);
        let mut thread = Thread {
            store,
            files,
            progress,
            shared: shared.clone(),
            clock,
            written,
        };
        let thread = std::thread::Builder::new()
            .name("appender".into())
            .spawn(move || thread.run(woken))
            .map_err(|e| StoreError::Unavailable(format!("cannot start the appender: {e}")))?;
        let appender = Appender {
            shared,
            wake: Some(wake),
            thread: Some(thread),
        };
        appender.wake();
        Ok(appender)
    }

    /// Lines were committed for these files (bytes each) at `at_ms`: append them.
    pub fn queued(&self, texts: impl IntoIterator<Item = (String, u64)>, at_ms: i64) {
        {
            let mut waiting = lock(&self.shared.waiting);
            for (file, bytes) in texts {
                let w = waiting.entry(file).or_default();
                w.bytes += bytes;
                w.since_ms.get_or_insert(at_ms);
            }
        }
        self.wake();
    }

    /// The bytes committed for `file` and not yet written to it.
    pub fn backlog(&self, file: &str) -> Option<Waiting> {
        lock(&self.shared.waiting).get(file).cloned()
    }

    /// A view of the lines waiting, for the rest of the service.
    pub fn view(&self) -> Backlog {
        Backlog(self.shared.clone())
    }

    /// How far files were written since the committer last recorded it: (file, last text, length).
    pub fn written(&self) -> Vec<(String, u64, u64)> {
        let written = lock(&self.shared.written);
        written
            .iter()
            .map(|(f, &(s, l))| (f.clone(), s, l))
            .collect()
    }

    /// The committer recorded `done` (from [`written`](Self::written)): forgets it, unless the
    /// file was written further since.
    pub fn recorded(&self, done: &[(String, u64, u64)]) {
        let mut written = lock(&self.shared.written);
        for (file, seq, len) in done {
            if written.get(file) == Some(&(*seq, *len)) {
                written.remove(file);
            }
        }
    }

    fn wake(&self) {
        if let Some(wake) = &self.wake {
            let _ = wake.try_send(());
        }
    }
}

impl Appender {
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

/// The appender's thread.
struct Thread {
    store: Arc<dyn Backend>,
    files: JsonlFiles,
    /// How far each file is written, as this thread knows it (ahead of the store until the
    /// committer records it).
    progress: HashMap<String, FileProgress>,
    shared: Arc<Shared>,
    clock: Clock,
    written: Box<dyn Fn() + Send>,
}

impl Thread {
    fn run(&mut self, woken: Receiver<()>) {
        let mut retry = None;
        loop {
            let stopping = match retry {
                None => woken.recv().is_err(),
                Some(after) => matches!(
                    woken.recv_timeout(after),
                    Err(RecvTimeoutError::Disconnected)
                ),
            };
            retry = self.round();
            if stopping {
                break;
            }
        }
        info!("appender stopped");
    }

    /// Appends what waits for every file; returns when to try again if a file failed.
    fn round(&mut self) -> Option<Duration> {
        let files: Vec<String> = lock(&self.shared.waiting).keys().cloned().collect();
        let mut retry = None;
        for file in files {
            loop {
                match self.append(&file) {
                    Ok(true) => continue,
                    Ok(false) => break,
                    Err(e) => {
                        let mut waiting = lock(&self.shared.waiting);
                        let w = waiting.entry(file.clone()).or_default();
                        if w.error.as_deref() != Some(&e) {
                            error!(
                                file,
                                "cannot write the lines committed for this file; they wait and are tried again every second: {e}"
                            );
                        }
                        w.error = Some(e);
                        metrics::counter!(telemetry::LINES_WRITE_ERRORS.name, "file" => file.clone())
                            .increment(1);
                        retry = Some(RETRY);
                        break;
                    }
                }
            }
        }
        self.show_lag();
        retry
    }

    /// Appends the next texts queued for `file`; returns whether more wait.
    fn append(&mut self, file: &str) -> Result<bool, String> {
        // A file first written since the start: as the committer recorded it.
        let progress = match self.progress.get(file) {
            Some(p) => *p,
            None => {
                let files = self.store.files().map_err(|e| e.to_string())?;
                let found = files.into_iter().find(|(f, _)| f == file);
                found.map_or(
                    FileProgress {
                        len: 0,
                        applied: 0,
                        next: 1,
                    },
                    |(_, p)| p,
                )
            }
        };
        let queued = self
            .store
            .queued_lines(file, progress.applied, MAX_WRITE)
            .map_err(|e| e.to_string())?;
        let Some(last) = queued.last() else {
            lock(&self.shared.waiting).remove(file);
            return Ok(false);
        };
        cut_to(&mut self.files, file, progress.len).map_err(|e| e.to_string())?;
        let text: String = queued.iter().map(|q| q.text.as_str()).collect();
        let (_, after) = self
            .files
            .append_durably(Path::new(file), &text)
            .map_err(|e| e.to_string())?;
        let done = FileProgress {
            len: after,
            applied: last.seq,
            next: progress.next,
        };
        self.progress.insert(file.to_string(), done);
        lock(&self.shared.written).insert(file.to_string(), (done.applied, done.len));
        let more = {
            let mut waiting = lock(&self.shared.waiting);
            let w = waiting.entry(file.to_string()).or_default();
            w.bytes = w.bytes.saturating_sub(text.len() as u64);
            if w.error.take().is_some() {
                info!(file, "the lines waiting for this file are written");
            }
            // The next text waiting was committed after this one.
            w.since_ms = (w.bytes > 0).then_some(last.at_ms);
            if w.bytes == 0 {
                waiting.remove(file);
                false
            } else {
                true
            }
        };
        (self.written)();
        Ok(more)
    }

    /// Sets the gauges of what waits: bytes and seconds, per file.
    fn show_lag(&self) {
        let now_ms = self.clock.now().timestamp_millis();
        let waiting = lock(&self.shared.waiting);
        let files = self.progress.keys().chain(waiting.keys());
        for file in files {
            let w = waiting.get(file).cloned().unwrap_or_default();
            let lag = w
                .since_ms
                .map_or(0.0, |t| (now_ms - t).max(0) as f64 / 1000.0);
            metrics::gauge!(telemetry::LINES_WAITING_BYTES.name, "file" => file.clone())
                .set(w.bytes as f64);
            metrics::gauge!(telemetry::LINES_LAG.name, "file" => file.clone()).set(lag);
        }
    }
}

/// How far `file` really is written at start, from what was `recorded` and the texts `queued`
/// after it. A crash between a write and its record leaves those texts in the file already:
/// they are recognised and kept (a reader of the file never sees a line twice), and only what
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
    if actual <= recorded.len {
        return cut_to(files, file, recorded.len).map(|len| FileProgress { len, ..recorded });
    }
    let tail = files.read_from(path, recorded.len)?;
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
/// then: what is past `recorded` was appended before a crash and not recorded (it is in the
/// queue still, and is appended again) and is cut off; a file shorter than recorded was cut or
/// replaced by someone else, and is taken as it is.
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
            "the file is shorter than tripline wrote it: was it truncated or replaced? continuing from its current end"
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
    fn start_up_keeps_whole_lines_a_crash_left_unrecorded_and_cuts_off_a_partial_one() {
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
        // either: `b` is kept as it is, the part of `c` cut off and `c` written again.
        std::fs::write(dir.path().join("out.jsonl"), "{\"a\"}\n{\"b\"}\n{\"c").unwrap();
        let mut appender = Appender::start(
            db.clone(),
            JsonlFiles::new(dir.path()),
            Clock::wall(),
            Box::new(|| {}),
        )
        .unwrap();
        settled(&appender);
        assert_eq!(
            std::fs::read_to_string(dir.path().join("out.jsonl")).unwrap(),
            "{\"a\"}\n{\"b\"}\n{\"c\"}\n"
        );
        assert_eq!(appender.written(), [("out.jsonl".to_string(), 3, 18)]);
        appender.stop();
        // What was found in the file was recorded at start; a file shorter than recorded (cut
        // by someone) is taken as it is.
        let files: HashMap<String, FileProgress> = db.files().unwrap().into_iter().collect();
        assert_eq!(
            (files["out.jsonl"].applied, files["out.jsonl"].len),
            (2, 12)
        );
        assert_eq!(files["out.jsonl"].next, 4);
        assert_eq!(files["gone.jsonl"].len, 0);
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
