//! Message files in use. Ingest maps a message file when a job names it and
//! hands the map to the shards with the work that uses it; the map lives as
//! long as some queued or in-flight transaction (or its prepared wire copy)
//! refers to it, then it is unmapped. A budget bounds how many message files,
//! and how many of their bytes, are in use at once: a spool that names
//! 100,000 different files neither runs out of mappings (the kernel allows
//! about 65,000 per process) nor holds them all in memory; ingest waits for
//! room instead. The budget is touched once per message file opened and
//! closed, never per message.

use std::io;
use std::path::Path;
use std::sync::atomic::Ordering::SeqCst;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::spool::MappedFile;

/// A mapped message file; dropping the last reference unmaps it and then
/// gives its room back to the budget (fields drop in order: the map first).
#[derive(Debug)]
pub struct MessageFile {
    /// Unique in the process (a file mapped again later gets a new one).
    pub id: u32,
    pub file: MappedFile,
    _room: Room,
}

/// A message file's share of the budget, returned when dropped.
#[derive(Debug)]
struct Room {
    len: u64,
    budget: Arc<MessageBudget>,
}

impl Drop for Room {
    fn drop(&mut self) {
        self.budget.release(self.len);
    }
}

/// How many message files, and bytes of them, may be in use at once. Only
/// ingest opens files; whoever drops the last reference to one (a shard's
/// executor, usually) gives its room back with two atomic subtractions, and
/// takes the lock only to wake ingest when it is waiting for room.
#[derive(Debug)]
pub struct MessageBudget {
    max_files: usize,
    max_bytes: u64,
    files: AtomicUsize,
    bytes: AtomicU64,
    /// Ingest waits for room in `open`.
    waiting: AtomicBool,
    parked: Mutex<()>,
    freed: Condvar,
    closed: AtomicBool,
}

/// Why no room was given.
#[derive(Debug, PartialEq, Eq)]
pub enum NoRoom {
    /// Nothing was freed within the wait; try again.
    Full,
    /// The send is stopping.
    Closed,
}

impl MessageBudget {
    pub fn new(max_files: usize, max_bytes: u64) -> Arc<MessageBudget> {
        Arc::new(MessageBudget {
            max_files: max_files.max(1),
            max_bytes,
            files: AtomicUsize::new(0),
            bytes: AtomicU64::new(0),
            waiting: AtomicBool::new(false),
            parked: Mutex::new(()),
            freed: Condvar::new(),
            closed: AtomicBool::new(false),
        })
    }

    /// A file of `len` bytes fits now (the first one always does, however big).
    fn fits(&self, len: u64) -> bool {
        let files = self.files.load(SeqCst);
        files == 0 || (files < self.max_files && self.bytes.load(SeqCst) + len <= self.max_bytes)
    }

    /// Maps `path` (of `len` bytes) within the budget, waiting up to `wait`
    /// for room. Called by one thread only (ingest): room checked is room taken.
    pub fn open(
        self: &Arc<Self>,
        id: u32,
        path: &Path,
        len: u64,
        wait: Duration,
    ) -> Result<io::Result<MessageFile>, NoRoom> {
        if !self.fits(len) {
            let deadline = Instant::now() + wait;
            let mut parked = self.parked.lock().unwrap_or_else(|e| e.into_inner());
            // Set under the lock, before looking again: a release after this
            // look sees it and wakes this wait.
            self.waiting.store(true, SeqCst);
            while !self.fits(len) && !self.closed.load(SeqCst) {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break;
                }
                parked = self
                    .freed
                    .wait_timeout(parked, left)
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
            }
            self.waiting.store(false, SeqCst);
        }
        if self.closed.load(SeqCst) {
            return Err(NoRoom::Closed);
        }
        if !self.fits(len) {
            return Err(NoRoom::Full);
        }
        self.files.fetch_add(1, SeqCst);
        self.bytes.fetch_add(len, SeqCst);
        let file = match MappedFile::open(path) {
            Ok(f) => f,
            Err(e) => {
                self.release(len);
                return Ok(Err(e));
            }
        };
        // What was mapped counts, if the file changed since it was measured.
        let mapped = file.bytes().len() as u64;
        self.bytes.fetch_add(mapped, SeqCst);
        self.bytes.fetch_sub(len, SeqCst);
        Ok(Ok(MessageFile {
            id,
            file,
            _room: Room {
                len: mapped,
                budget: self.clone(),
            },
        }))
    }

    fn release(&self, len: u64) {
        self.files.fetch_sub(1, SeqCst);
        self.bytes.fetch_sub(len, SeqCst);
        if self.waiting.load(SeqCst) {
            let _parked = self.parked.lock().unwrap_or_else(|e| e.into_inner());
            self.freed.notify_all();
        }
    }

    /// Ends every wait: the send is stopping.
    pub fn close(&self) {
        self.closed.store(true, SeqCst);
        let _parked = self.parked.lock().unwrap_or_else(|e| e.into_inner());
        self.freed.notify_all();
    }

    /// (files, bytes) in use now.
    pub fn in_use(&self) -> (usize, u64) {
        (self.files.load(SeqCst), self.bytes.load(SeqCst))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_are_counted_while_referred_to_and_the_budget_waits_for_room() {
        let dir = tempfile::tempdir().unwrap();
        let p = |i: u32| {
            let path = dir.path().join(format!("m{i}.eml"));
            std::fs::write(&path, format!("Subject: {i}\n\nbody\n")).unwrap();
            path
        };
        let budget = MessageBudget::new(2, 1 << 20);
        let short = Duration::from_millis(10);
        let a = budget.open(0, &p(0), 20, short).unwrap().unwrap();
        let b = budget.open(1, &p(1), 20, short).unwrap().unwrap();
        assert_eq!(budget.in_use().0, 2);
        assert_eq!(budget.open(2, &p(2), 20, short).unwrap_err(), NoRoom::Full);
        // A file let go on another thread makes room for the waiter.
        let waiter = {
            let budget = budget.clone();
            let path = p(3);
            std::thread::spawn(move || {
                budget
                    .open(3, &path, 20, Duration::from_secs(10))
                    .map(|r| r.unwrap().id)
            })
        };
        std::thread::sleep(Duration::from_millis(20));
        drop(a);
        assert_eq!(waiter.join().unwrap(), Ok(3));
        drop(b);
        assert_eq!(
            budget.in_use().0,
            0,
            "the waiter's file is dropped with its thread's result"
        );
        budget.close();
        assert_eq!(budget.open(4, &p(4), 20, short).unwrap_err(), NoRoom::Closed);
    }

    #[test]
    fn bytes_are_bounded_but_one_file_always_fits() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("big.eml");
        std::fs::write(&path, vec![b'x'; 5000]).unwrap();
        let budget = MessageBudget::new(100, 1000);
        let short = Duration::from_millis(5);
        let big = budget.open(0, &path, 5000, short).unwrap().unwrap();
        assert_eq!(budget.in_use(), (1, 5000));
        assert_eq!(budget.open(1, &path, 5000, short).unwrap_err(), NoRoom::Full);
        drop(big);
        assert_eq!(budget.in_use(), (0, 0));
        let missing = budget.open(2, &dir.path().join("none.eml"), 10, short).unwrap();
        assert!(missing.is_err());
        assert_eq!(budget.in_use(), (0, 0), "a file that cannot be mapped takes no room");
    }
}
