//! Exclusive locks that name their holder: one spool directory, one
//! service; one spool file, one sender. A lock is flock(2) on an open file,
//! held for as long as the `Lock` lives; the kernel lets go when the process
//! ends, however it ends, so a lock left by a killed process never blocks a
//! restart. The holder's pid comes from /proc/locks.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{self, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// A held lock; dropping it lets go.
#[derive(Debug)]
pub struct Lock {
    file: File,
}

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("{what} {} is in use by another volley process{}", path.display(), holder.map(|p| format!(" (pid {p})")).unwrap_or_default())]
    Held {
        what: &'static str,
        path: PathBuf,
        holder: Option<u32>,
    },
    #[error("cannot lock {what} {}: {error}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        error: io::Error,
    },
}

impl Lock {
    /// Locks an existing file (`what` names it in errors: "spool file").
    pub fn file(path: &Path, what: &'static str) -> Result<Lock, LockError> {
        let io = |error| LockError::Io {
            what,
            path: path.to_path_buf(),
            error,
        };
        let file = File::open(path).map_err(io)?;
        Self::take(file, path, what)
    }

    /// Locks `dir/.lock`, creating it, and writes this process's pid into it
    /// for whoever looks.
    pub fn dir(dir: &Path, what: &'static str) -> Result<Lock, LockError> {
        let path = dir.join(".lock");
        let io = |error| LockError::Io {
            what,
            path: dir.to_path_buf(),
            error,
        };
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&path)
            .map_err(io)?;
        let mut lock = Self::take(file, dir, what)?;
        lock.file.set_len(0).map_err(io)?;
        writeln!(lock.file, "{}", std::process::id()).map_err(io)?;
        Ok(lock)
    }

    fn take(file: File, path: &Path, what: &'static str) -> Result<Lock, LockError> {
        match file.try_lock() {
            Ok(()) => Ok(Lock { file }),
            Err(TryLockError::WouldBlock) => Err(LockError::Held {
                what,
                path: path.to_path_buf(),
                holder: holder_of(&file),
            }),
            Err(TryLockError::Error(error)) => Err(LockError::Io {
                what,
                path: path.to_path_buf(),
                error,
            }),
        }
    }
}

/// The pid holding a flock on `file`, from /proc/locks (lines such as
/// `3: FLOCK  ADVISORY  WRITE 4242 fd:01:1234567 0 EOF`).
fn holder_of(file: &File) -> Option<u32> {
    let meta = file.metadata().ok()?;
    let dev = meta.dev();
    let id = format!("{:02x}:{:02x}:{}", libc::major(dev), libc::minor(dev), meta.ino());
    let locks = std::fs::read_to_string("/proc/locks").ok()?;
    holder_in(&locks, &id)
}

fn holder_in(locks: &str, id: &str) -> Option<u32> {
    locks.lines().find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        // Waiters are listed as "-> FLOCK ..." and shift the fields by one.
        (f.len() >= 6 && f[1] == "FLOCK" && f[5] == id).then(|| f[4].parse().ok())?
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_held_lock_names_its_holder_and_is_free_once_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let first = Lock::dir(dir.path(), "spool directory").unwrap();
        let pid = std::process::id();
        assert_eq!(
            std::fs::read_to_string(dir.path().join(".lock")).unwrap(),
            format!("{pid}\n")
        );
        // A second open file description conflicts even within one process.
        let e = Lock::dir(dir.path(), "spool directory").unwrap_err();
        let LockError::Held { holder, .. } = &e else {
            panic!("{e}")
        };
        assert_eq!(*holder, Some(pid));
        assert!(
            e.to_string()
                .ends_with(&format!("is in use by another volley process (pid {pid})")),
            "{e}"
        );
        drop(first);
        Lock::dir(dir.path(), "spool directory").unwrap();
    }

    #[test]
    fn proc_locks_lines() {
        let locks = "1: POSIX  ADVISORY  WRITE 10 fd:01:99 0 EOF\n\
                     2: FLOCK  ADVISORY  WRITE 4242 fd:01:1234567 0 EOF\n\
                     2: -> FLOCK  ADVISORY  WRITE 77 fd:01:1234567 0 EOF\n";
        assert_eq!(holder_in(locks, "fd:01:1234567"), Some(4242));
        assert_eq!(holder_in(locks, "fd:01:99"), None, "POSIX locks are not volley's");
        assert_eq!(holder_in(locks, "fd:01:5"), None);
    }

    #[test]
    fn a_missing_file_is_an_io_error_naming_it() {
        let e = Lock::file(Path::new("/nonexistent/x.jsonl"), "spool file").unwrap_err();
        assert!(matches!(e, LockError::Io { .. }));
        assert!(
            e.to_string().starts_with("cannot lock spool file /nonexistent/x.jsonl"),
            "{e}"
        );
    }
}
