//! The journal of `--durability interval`: what each batch was asked to do, written to the
//! operating system (not synced) before the batch commits.
//!
//! In that mode the committer commits without a sync and answers at once; a sync every
//! `--sync-interval` makes those commits durable. redb keeps a commit without a sync in the
//! process's memory only, so a killed process would lose acknowledged events. This file keeps
//! them: each batch's requests (their decoded events and signed-delivery ids) are appended with a
//! `write` before the commit, which a killed process cannot undo (the operating system holds the
//! page). The store records, in each batch, the number of the last entry it holds
//! ([`Batch::set_journaled`](crate::store::Batch::set_journaled)). Whenever the store holds less
//! than was committed (at start after a kill, or after the database was reopened on a write
//! failure), the committer runs the entries after that number again, in order, through the same
//! rules path, before anything else. Event ids and signed-delivery ids make the second run of an
//! entry the store does hold a duplicate, and the number keeps an entry from running twice.
//!
//! Once a sync has made everything durable, the file is emptied. A machine crash (power loss)
//! can lose what the file held since the last sync, which is the interval mode's stated risk; a
//! torn or garbled end is recognized by its length and checksum and dropped.
//!
//! Each entry: its number (u64), the payload's length (u32) and a CRC-32 of both and the payload
//! (u32), all little-endian, then the payload: a JSON list of the batch's requests.

use serde::{Deserialize, Serialize};
use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use tracing::{error, warn};

use crate::ingest::event::Event;
use crate::pipeline::committer::Delivery;

/// The journal's file name in the data folder.
pub const FILE_NAME: &str = "journal";

const HEADER: usize = 16;

/// Whole entries as read: each one's number and payload.
type Frames = Vec<(u64, Vec<u8>)>;

/// One request as the journal keeps it.
#[derive(Debug, Serialize)]
struct Asked<'a> {
    events: &'a [Event],
    delivery: Option<&'a Delivery>,
}

/// One request read back.
#[derive(Debug, Deserialize)]
pub struct Request {
    pub events: Vec<Event>,
    pub delivery: Option<Delivery>,
}

/// One batch read back.
#[derive(Debug)]
pub struct Entry {
    pub seq: u64,
    pub requests: Vec<Request>,
}

/// A request's events as the journal keeps them: made by the request's own task, so that the
/// committer only copies bytes.
pub fn record(events: &[Event], delivery: Option<&Delivery>) -> Vec<u8> {
    // Events are JSON values and strings: they always serialize.
    serde_json::to_vec(&Asked { events, delivery }).expect("events serialize")
}

/// The open journal file.
pub struct Journal {
    path: PathBuf,
    file: File,
    /// The length of its whole entries: an append that fails is cut back to it.
    len: u64,
    /// The number of its last entry (0 when it has none).
    last: u64,
    /// The length and last number before the last append, to take it back.
    before_last: (u64, u64),
}

impl Journal {
    /// Opens (or creates) the journal in `data_dir`, cutting off a torn end.
    pub fn open(data_dir: &Path) -> std::io::Result<Journal> {
        let path = data_dir.join(FILE_NAME);
        let file = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)?;
        let mut journal = Journal {
            path,
            file,
            len: 0,
            last: 0,
            before_last: (0, 0),
        };
        let (frames, whole) = journal.frames()?;
        journal.last = frames.last().map_or(0, |(seq, _)| *seq);
        journal.len = whole;
        if journal.file.metadata()?.len() > whole {
            warn!(
                file = %journal.path.display(),
                "the journal ends in part of an entry (a write cut short): removed"
            );
            journal.file.set_len(whole)?;
        }
        Ok(journal)
    }

    /// The number of the last entry written (0 when none is).
    pub fn last(&self) -> u64 {
        self.last
    }

    /// Whether it holds no entry.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The entries numbered after `seq`, in order. An entry that cannot be read back (written
    /// by another version) is skipped and logged.
    pub fn entries_after(&mut self, seq: u64) -> std::io::Result<Vec<Entry>> {
        let (frames, _) = self.frames()?;
        let mut entries = Vec::new();
        for (n, payload) in frames.into_iter().filter(|(n, _)| *n > seq) {
            match serde_json::from_slice(&payload) {
                Ok(requests) => entries.push(Entry { seq: n, requests }),
                Err(e) => error!(
                    entry = n,
                    "a journal entry cannot be read back, its events are not run again: {e}"
                ),
            }
        }
        Ok(entries)
    }

    /// Appends entry `seq`, the batch of `requests` (each from [`record`]): written, not synced.
    pub fn append(&mut self, seq: u64, requests: &[&[u8]]) -> std::io::Result<()> {
        let mut payload =
            Vec::with_capacity(requests.iter().map(|r| r.len() + 1).sum::<usize>() + 2);
        payload.push(b'[');
        for (i, r) in requests.iter().enumerate() {
            if i > 0 {
                payload.push(b',');
            }
            payload.extend_from_slice(r);
        }
        payload.push(b']');
        let len = u32::try_from(payload.len()).map_err(|_| {
            std::io::Error::new(std::io::ErrorKind::InvalidInput, "a batch over 4 GB")
        })?;
        let mut frame = Vec::with_capacity(HEADER + payload.len());
        frame.extend_from_slice(&seq.to_le_bytes());
        frame.extend_from_slice(&len.to_le_bytes());
        frame.extend_from_slice(&checksum(seq, &payload).to_le_bytes());
        frame.extend_from_slice(&payload);
        let written = self
            .file
            .seek(SeekFrom::Start(self.len))
            .and_then(|_| self.file.write_all(&frame));
        if let Err(e) = written {
            // A later entry must never follow part of this one.
            let _ = self.file.set_len(self.len);
            return Err(e);
        }
        self.before_last = (self.len, self.last);
        self.len += frame.len() as u64;
        self.last = seq;
        Ok(())
    }

    /// Takes the last entry back out: its batch was not committed.
    pub fn retract_last(&mut self) -> std::io::Result<()> {
        let (len, last) = self.before_last;
        self.file.set_len(len)?;
        self.len = len;
        self.last = last;
        Ok(())
    }

    /// Empties the file: everything in it is durable in the store.
    pub fn clear(&mut self) -> std::io::Result<()> {
        if self.len > 0 {
            self.file.set_len(0)?;
            self.len = 0;
            self.before_last = (0, self.last);
        }
        Ok(())
    }

    /// Every whole entry (number and payload), and the length they take.
    fn frames(&mut self) -> std::io::Result<(Frames, u64)> {
        let mut bytes = Vec::new();
        self.file.seek(SeekFrom::Start(0))?;
        self.file.read_to_end(&mut bytes)?;
        let mut frames = Vec::new();
        let mut at = 0;
        while let Some(header) = bytes.get(at..at + HEADER) {
            let seq = u64::from_le_bytes(header[..8].try_into().expect("8 bytes"));
            let len = u32::from_le_bytes(header[8..12].try_into().expect("4 bytes")) as usize;
            let sum = u32::from_le_bytes(header[12..16].try_into().expect("4 bytes"));
            let Some(payload) = bytes.get(at + HEADER..at + HEADER + len) else {
                break;
            };
            if checksum(seq, payload) != sum {
                break;
            }
            frames.push((seq, payload.to_vec()));
            at += HEADER + len;
        }
        Ok((frames, at as u64))
    }
}

fn checksum(seq: u64, payload: &[u8]) -> u32 {
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&seq.to_le_bytes());
    hasher.update(&(payload.len() as u32).to_le_bytes());
    hasher.update(payload);
    hasher.finalize()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::Clock;
    use crate::ingest::event::{BodyLimits, decode};

    fn events(body: &str) -> Vec<Event> {
        decode(
            body.as_bytes(),
            Clock::wall().now(),
            &BodyLimits::LOCAL_FILES,
        )
        .unwrap()
    }

    #[test]
    fn entries_come_back_as_written_in_order_and_after_a_number() {
        let dir = tempfile::tempdir().unwrap();
        let mut journal = Journal::open(dir.path()).unwrap();
        let a = events(r#"{"event":"a","uuid":"u1","properties":{"x":[1,"two"]}}"#);
        let b = events(r#"[{"event":"b"},{"event":"c","distinct_id":"d"}]"#);
        let delivery = Delivery {
            source: "posthog".into(),
            id: "msg_1".into(),
        };
        journal
            .append(1, &[&record(&a, None), &record(&b, Some(&delivery))])
            .unwrap();
        journal.append(2, &[&record(&b, None)]).unwrap();
        drop(journal);

        let mut journal = Journal::open(dir.path()).unwrap();
        assert_eq!(journal.last(), 2);
        let entries = journal.entries_after(0).unwrap();
        assert_eq!(entries.len(), 2);
        assert_eq!(entries[0].seq, 1);
        assert_eq!(entries[0].requests[0].events, a);
        assert_eq!(entries[0].requests[1].events, b);
        assert_eq!(
            entries[0].requests[1].delivery.as_ref().unwrap().id,
            "msg_1"
        );
        assert_eq!(journal.entries_after(1).unwrap()[0].seq, 2);
        assert!(journal.entries_after(2).unwrap().is_empty());
    }

    #[test]
    fn a_torn_or_garbled_end_is_cut_off_and_the_next_entry_follows_the_whole_ones() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(FILE_NAME);
        let mut journal = Journal::open(dir.path()).unwrap();
        journal
            .append(7, &[&record(&events(r#"{"event":"a"}"#), None)])
            .unwrap();
        let whole = std::fs::metadata(&path).unwrap().len();
        journal
            .append(8, &[&record(&events(r#"{"event":"b"}"#), None)])
            .unwrap();
        drop(journal);

        // A kill in the middle of the second write.
        let f = File::options().write(true).open(&path).unwrap();
        f.set_len(whole + 20).unwrap();
        let mut journal = Journal::open(dir.path()).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().len(), whole);
        assert_eq!(journal.last(), 7);
        journal
            .append(8, &[&record(&events(r#"{"event":"c"}"#), None)])
            .unwrap();
        let entries = journal.entries_after(0).unwrap();
        assert_eq!(entries.len(), 2);
        assert_eq!(entries[1].requests[0].events[0].name(), "c");

        // Zeros where a machine crash left the file longer than what reached the disk.
        let mut f = File::options().append(true).open(&path).unwrap();
        f.write_all(&[0; 64]).unwrap();
        let mut journal = Journal::open(dir.path()).unwrap();
        assert_eq!(journal.entries_after(0).unwrap().len(), 2);

        journal.clear().unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 0);
        assert!(journal.entries_after(0).unwrap().is_empty());
    }
}
