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
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

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

#[derive(Debug, Default)]
struct InUse {
    files: usize,
    bytes: u64,
}

/// How many message files, and bytes of them, may be in use at once.
#[derive(Debug)]
pub struct MessageBudget {
    max_files: usize,
    max_bytes: u64,
    in_use: Mutex<InUse>,
    freed: Condvar,
    closed: std::sync::atomic::AtomicBool,
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
            in_use: Mutex::new(InUse::default()),
            freed: Condvar::new(),
            closed: Default::default(),
        })
    }

    /// Maps `path` (of `len` bytes) within the budget, waiting up to `wait`
    /// for room. The first file always fits, however big.
    pub fn open(
        self: &Arc<Self>,
        id: u32,
        path: &Path,
        len: u64,
        wait: Duration,
    ) -> Result<io::Result<MessageFile>, NoRoom> {
        {
            let mut u = self.in_use.lock().unwrap_or_else(|e| e.into_inner());
            let fits = |u: &InUse| u.files == 0 || (u.files < self.max_files && u.bytes + len <= self.max_bytes);
            if !fits(&u) {
                u = self
                    .freed
                    .wait_timeout_while(u, wait, |u| !fits(u) && !self.is_closed())
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
            }
            if self.is_closed() {
                return Err(NoRoom::Closed);
            }
            if !fits(&u) {
                return Err(NoRoom::Full);
            }
            u.files += 1;
            u.bytes += len;
        }
        let file = match MappedFile::open(path) {
            Ok(f) => f,
            Err(e) => {
                self.release(len);
                return Ok(Err(e));
            }
        };
        // What was mapped counts, if the file changed since it was measured.
        let mapped = file.bytes().len() as u64;
        if mapped != len {
            let mut u = self.in_use.lock().unwrap_or_else(|e| e.into_inner());
            u.bytes = u.bytes + mapped - len;
        }
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
        let mut u = self.in_use.lock().unwrap_or_else(|e| e.into_inner());
        u.files -= 1;
        u.bytes -= len;
        self.freed.notify_all();
    }

    /// Ends every wait: the send is stopping.
    pub fn close(&self) {
        self.closed.store(true, std::sync::atomic::Ordering::Relaxed);
        let _guard = self.in_use.lock().unwrap_or_else(|e| e.into_inner());
        self.freed.notify_all();
    }

    fn is_closed(&self) -> bool {
        self.closed.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// (files, bytes) in use now.
    pub fn in_use(&self) -> (usize, u64) {
        let u = self.in_use.lock().unwrap_or_else(|e| e.into_inner());
        (u.files, u.bytes)
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
