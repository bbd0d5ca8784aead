//! The progress journal: `NAME.jsonl.journal` beside each spool file records
//! every final outcome as a fixed 9-byte record (line, recipient index,
//! outcome) after a 32-byte header. The collector appends records in groups
//! and fdatasyncs each group before counting it (group commit). On start,
//! ingest skips every recipient the journal lists, so a restart re-sends only
//! what was not yet durably final; the header keeps when the spool was first
//! seen, so `max_age` runs from then across restarts.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::outcome::Outcome;

const MAGIC: &[u8; 8] = b"VOLLEYJ1";
const HEADER_BYTES: u64 = 32;
pub const RECORD_BYTES: usize = 9;
/// Recipient index of a record that stands for a whole rejected line.
pub const WHOLE_LINE: u32 = u32::MAX;

/// The journal path of a spool file.
pub fn path_for(spool: &Path) -> PathBuf {
    let mut p = spool.as_os_str().to_owned();
    p.push(".journal");
    PathBuf::from(p)
}

/// What a journal says is already final.
#[derive(Debug, Default, Clone)]
pub struct Done {
    /// `line << 32 | index`, sorted.
    keys: Vec<u64>,
    /// The last outcome recorded for each of `keys`.
    outcomes: Vec<Outcome>,
    /// Recipients per outcome (their last), indexed by `Outcome::index`.
    pub counts: [u64; 5],
}

impl Done {
    /// Forgets the recipients whose last outcome is one of `outcomes`, so
    /// they are sent again (`volley send --resend`); how many.
    pub fn resend(&mut self, outcomes: &[Outcome]) -> u64 {
        let before = self.keys.len();
        let mut kept_keys = Vec::with_capacity(before);
        let mut kept = Vec::with_capacity(before);
        for (&k, &o) in self.keys.iter().zip(&self.outcomes) {
            if outcomes.contains(&o) {
                self.counts[o.index()] -= 1;
            } else {
                kept_keys.push(k);
                kept.push(o);
            }
        }
        self.keys = kept_keys;
        self.outcomes = kept;
        (before - self.keys.len()) as u64
    }

    pub fn contains(&self, line: u32, idx: u32) -> bool {
        self.keys.binary_search(&key(line, idx)).is_ok()
    }
    pub fn len(&self) -> usize {
        self.keys.len()
    }
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

fn key(line: u32, idx: u32) -> u64 {
    (u64::from(line) << 32) | u64::from(idx)
}

fn outcome_code(o: Outcome) -> u8 {
    o.index() as u8
}

fn outcome_of(code: u8) -> Option<Outcome> {
    Outcome::ALL.get(usize::from(code)).copied().filter(|o| o.is_final())
}

/// An open journal, appending.
pub struct Journal {
    path: PathBuf,
    file: File,
    pending: Vec<u8>,
}

/// A journal opened at start: the writer, what it already holds, and when its spool was first seen.
pub struct Opened {
    pub journal: Journal,
    pub done: Done,
    pub first_seen: SystemTime,
}

impl Journal {
    /// Opens (or creates) the journal of a spool file of `spool_len` bytes. A
    /// journal written for a spool of another size belongs to another file:
    /// it is set aside as `.journal.stale` and a new one is started. A torn
    /// last record (a crash mid-write) is cut off.
    pub fn open(spool: &Path, spool_len: u64) -> io::Result<Opened> {
        let path = path_for(spool);
        if let Some(opened) = Self::reopen(&path, spool_len)? {
            return Ok(opened);
        }
        let first_seen = SystemTime::now();
        let mut file = OpenOptions::new()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(&path)?;
        let mut header = Vec::with_capacity(HEADER_BYTES as usize);
        header.extend_from_slice(MAGIC);
        header.extend_from_slice(&spool_len.to_le_bytes());
        let ms = first_seen.duration_since(UNIX_EPOCH).unwrap_or_default().as_millis() as u64;
        header.extend_from_slice(&ms.to_le_bytes());
        header.extend_from_slice(&0u64.to_le_bytes());
        file.write_all(&header)?;
        file.sync_data()?;
        Ok(Opened {
            journal: Journal {
                path,
                file,
                pending: Vec::new(),
            },
            done: Done::default(),
            first_seen,
        })
    }

    fn reopen(path: &Path, spool_len: u64) -> io::Result<Option<Opened>> {
        let mut file = match OpenOptions::new().read(true).write(true).open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)?;
        let header_ok = bytes.len() as u64 >= HEADER_BYTES
            && &bytes[..8] == MAGIC
            && u64::from_le_bytes(bytes[8..16].try_into().expect("8 bytes")) == spool_len;
        if !header_ok {
            drop(file);
            let mut stale = path.as_os_str().to_owned();
            stale.push(".stale");
            std::fs::rename(path, &stale)?;
            tracing::warn!(
                "{}: journal does not match its spool file (changed after it was journaled); set aside as {}",
                path.display(),
                PathBuf::from(stale).display()
            );
            return Ok(None);
        }
        let ms = u64::from_le_bytes(bytes[16..24].try_into().expect("8 bytes"));
        let first_seen = UNIX_EPOCH + Duration::from_millis(ms);
        let body = &bytes[HEADER_BYTES as usize..];
        let whole = body.len() / RECORD_BYTES * RECORD_BYTES;
        // (key, order written, outcome): a recipient recorded twice (a crash
        // between the log and the journal, or a --resend) counts by its last.
        let mut records = Vec::with_capacity(whole / RECORD_BYTES);
        for (n, r) in body[..whole].chunks_exact(RECORD_BYTES).enumerate() {
            let line = u32::from_le_bytes(r[0..4].try_into().expect("4 bytes"));
            let idx = u32::from_le_bytes(r[4..8].try_into().expect("4 bytes"));
            let Some(outcome) = outcome_of(r[8]) else {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("{}: a record has outcome code {}", path.display(), r[8]),
                ));
            };
            records.push((key(line, idx), n, outcome));
        }
        records.sort_unstable_by_key(|&(k, n, _)| (k, n));
        let mut done = Done::default();
        for (i, &(k, _, o)) in records.iter().enumerate() {
            if records.get(i + 1).is_some_and(|next| next.0 == k) {
                continue;
            }
            done.keys.push(k);
            done.outcomes.push(o);
            done.counts[o.index()] += 1;
        }
        if whole < body.len() {
            file.set_len(HEADER_BYTES + whole as u64)?;
        }
        file.seek(SeekFrom::End(0))?;
        Ok(Some(Opened {
            journal: Journal {
                path: path.to_path_buf(),
                file,
                pending: Vec::new(),
            },
            done,
            first_seen,
        }))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Queues a record; it is durable after the next `commit`.
    pub fn append(&mut self, line: u32, idx: u32, outcome: Outcome) {
        debug_assert!(outcome.is_final());
        self.pending.extend_from_slice(&line.to_le_bytes());
        self.pending.extend_from_slice(&idx.to_le_bytes());
        self.pending.push(outcome_code(outcome));
    }

    pub fn has_pending(&self) -> bool {
        !self.pending.is_empty()
    }

    /// Writes what is queued and, with `fsync`, waits until it is on disk.
    pub fn commit(&mut self, fsync: bool) -> io::Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        self.file.write_all(&self.pending)?;
        self.pending.clear();
        if fsync {
            self.file.sync_data()?;
        }
        Ok(())
    }
}

/// Reads the records of a journal file: (line, index, outcome), in the order written.
pub fn read_records(path: &Path) -> io::Result<Vec<(u32, u32, Outcome)>> {
    let bytes = std::fs::read(path)?;
    if bytes.len() < HEADER_BYTES as usize || &bytes[..8] != MAGIC {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{}: not a volley journal", path.display()),
        ));
    }
    Ok(bytes[HEADER_BYTES as usize..]
        .chunks_exact(RECORD_BYTES)
        .filter_map(|r| {
            let line = u32::from_le_bytes(r[0..4].try_into().ok()?);
            let idx = u32::from_le_bytes(r[4..8].try_into().ok()?);
            Some((line, idx, outcome_of(r[8])?))
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reopen_skips_what_is_done_and_keeps_first_seen() {
        let dir = tempfile::tempdir().unwrap();
        let spool = dir.path().join("a.jsonl");
        let first = Journal::open(&spool, 100).unwrap();
        assert!(first.done.is_empty());
        let mut j = first.journal;
        j.append(3, 0, Outcome::Delivered);
        j.append(3, 1, Outcome::Bounced);
        j.append(7, WHOLE_LINE, Outcome::Rejected);
        j.commit(true).unwrap();
        drop(j);
        let again = Journal::open(&spool, 100).unwrap();
        assert!(again.done.contains(3, 0) && again.done.contains(3, 1) && again.done.contains(7, WHOLE_LINE));
        assert!(!again.done.contains(3, 2));
        assert_eq!(again.done.counts[Outcome::Delivered.index()], 1);
        let ms = |t: SystemTime| t.duration_since(UNIX_EPOCH).unwrap().as_millis();
        assert_eq!(ms(again.first_seen), ms(first.first_seen));
        assert_eq!(read_records(&path_for(&spool)).unwrap().len(), 3);
    }

    #[test]
    fn a_recipient_counts_by_its_last_record_and_resend_forgets_the_outcomes_asked() {
        let dir = tempfile::tempdir().unwrap();
        let spool = dir.path().join("r.jsonl");
        let mut j = Journal::open(&spool, 10).unwrap().journal;
        j.append(1, 0, Outcome::Bounced);
        j.append(2, 0, Outcome::Expired);
        j.append(3, 0, Outcome::Delivered);
        j.append(4, WHOLE_LINE, Outcome::Rejected);
        // Sent again by an earlier --resend, and delivered this time.
        j.append(1, 0, Outcome::Delivered);
        j.commit(false).unwrap();
        drop(j);
        let mut done = Journal::open(&spool, 10).unwrap().done;
        assert_eq!(done.len(), 4);
        assert_eq!(
            (
                done.counts[Outcome::Delivered.index()],
                done.counts[Outcome::Bounced.index()]
            ),
            (2, 0),
            "by the last record"
        );
        assert_eq!(done.resend(&[Outcome::Bounced, Outcome::Expired]), 1);
        assert!(done.contains(1, 0), "delivered at last: not sent again");
        assert!(!done.contains(2, 0), "expired: sent again");
        assert!(done.contains(3, 0) && done.contains(4, WHOLE_LINE));
        assert_eq!(done.counts[Outcome::Expired.index()], 0);
        assert_eq!(done.resend(&[Outcome::Rejected]), 1);
        assert!(!done.contains(4, WHOLE_LINE));
    }

    #[test]
    fn a_torn_record_is_cut_and_a_foreign_journal_set_aside() {
        let dir = tempfile::tempdir().unwrap();
        let spool = dir.path().join("b.jsonl");
        let mut j = Journal::open(&spool, 50).unwrap().journal;
        j.append(1, 0, Outcome::Delivered);
        j.commit(false).unwrap();
        drop(j);
        let path = path_for(&spool);
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(&[9, 0, 0]).unwrap();
        drop(f);
        let again = Journal::open(&spool, 50).unwrap();
        assert_eq!(again.done.len(), 1);
        assert_eq!(
            std::fs::metadata(&path).unwrap().len(),
            HEADER_BYTES + RECORD_BYTES as u64
        );
        drop(again);
        let other = Journal::open(&spool, 51).unwrap();
        assert!(other.done.is_empty(), "a journal for another file size is not trusted");
        assert!(dir.path().join("b.jsonl.journal.stale").exists());
    }
}
