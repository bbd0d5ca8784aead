//! Ingest: scans spool files line by line, validates each job, splits its
//! recipients by domain, and hands batches to the shard that owns each domain
//! (a stable hash of the lower-cased domain). It runs on its own thread, so
//! its blocking sends into the bounded shard inboxes are the back-pressure
//! that keeps memory flat however large the spool is.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::Weak;
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context;

use crossbeam_channel::{Receiver, Sender, TryRecvError};

use crate::collector::{Report, StorageError};
use crate::config::Config;
use crate::journal::{self, Done, Journal, WHOLE_LINE};
use crate::lock::Lock;
use crate::messages::{MessageBudget, MessageFile, NoRoom};
use crate::outcome::{JobId, LogRecord, Outcome, RcptKey, Recorder};
use crate::spool::{self, JobBody, MappedFile, Span};

/// Transactions per batch sent to a shard, and recipients: a batch goes when
/// it has either, so a shard's inbox (a bounded number of batches) holds a
/// bounded number of recipients however wide the jobs are.
pub const BATCH_ITEMS: usize = 256;
const BATCH_RCPTS: usize = 2048;
/// Where ingest is in one file.
struct Cursor {
    input: SpoolInput,
    name: String,
    at: spool::LineCursor,
    recipients: u64,
    already_final: u64,
}

/// Lines read from one spool file before the next file gets a turn.
const LINES_PER_TURN: usize = 1024;
/// Rejections reported on stderr before the rest are only counted and logged.
const MAX_REPORTED: u64 = 20;

/// Messages from ingest to a shard.
pub enum ToShard {
    /// A spool file the following work refers to by `id`.
    File { id: u32, file: Arc<MappedFile> },
    /// Work, with the message files its items refer to by id.
    Work {
        items: Vec<WorkItem>,
        messages: Vec<Arc<MessageFile>>,
    },
    /// Every recipient of spool file `file` is final: drop it.
    Forget { file: u32 },
}

/// What ingest is given to do.
pub enum IngestInput {
    /// A spool file to read.
    Spool(SpoolInput),
    /// A spool file is done (service mode): the shards let go of it.
    Forget(u32),
}

/// Recipients of one job that share a domain (at most `max_rcpts_per_txn`).
#[derive(Debug)]
pub struct WorkItem {
    pub file: u32,
    pub line: u32,
    pub id: Option<Span>,
    pub from: Span,
    pub body: BodyKey,
    pub rcpts: Vec<Rcpt>,
    pub first_seen: Instant,
}

/// A recipient and its index in the job's `to` (its name in the journal).
#[derive(Debug, Clone)]
pub struct Rcpt {
    pub addr: Span,
    pub idx: u32,
}

/// A spool file to ingest, with what its journal says is already final.
pub struct SpoolInput {
    /// Its number for the shards and the collector (unique in a process).
    pub id: u32,
    pub file: Arc<MappedFile>,
    /// Where the producer put it: `message` paths are relative to this file's folder.
    pub origin: PathBuf,
    /// The journal writer, handed to the collector.
    pub journal: Option<Journal>,
    pub done: Done,
    /// When the spool was first seen (from its journal): `max_age` runs from here.
    pub first_seen: Instant,
    /// This process's lock on the spool file, handed to the collector.
    pub lock: Option<Lock>,
}

impl SpoolInput {
    /// Locks a spool file (unless `lock` is already held), maps it and opens
    /// its journal. `origin` is where the producer put it (message paths are
    /// relative to its folder). A file another process is sending is refused
    /// with a [`LockError`] before its journal is touched; a journal that
    /// cannot be written is a [`StorageError`].
    pub fn open(cfg: &Config, id: u32, path: &Path, origin: &Path, lock: Option<Lock>) -> anyhow::Result<SpoolInput> {
        let lock = match lock {
            Some(l) => l,
            None => Lock::file(path, "spool file")?,
        };
        let file =
            Arc::new(MappedFile::open(path).with_context(|| format!("cannot read spool file {}", path.display()))?);
        let (done, first_seen, journal) = if cfg.journal {
            let opened = match Journal::open(path, file.bytes().len() as u64) {
                Ok(o) => o,
                Err(e) if e.kind() == std::io::ErrorKind::InvalidData => {
                    return Err(e).with_context(|| format!("cannot read the journal of {}", path.display()));
                }
                Err(e) => return Err(StorageError::new("the journal", &journal::path_for(path), e).into()),
            };
            (opened.done, opened.first_seen, Some(opened.journal))
        } else {
            (Done::default(), SystemTime::now(), None)
        };
        // max_age runs from when the spool was first seen, by an earlier run too.
        let age = SystemTime::now().duration_since(first_seen).unwrap_or_default();
        let first_seen = Instant::now().checked_sub(age).unwrap_or_else(Instant::now);
        Ok(SpoolInput {
            id,
            file,
            origin: origin.to_path_buf(),
            journal,
            done,
            first_seen,
            lock: Some(lock),
        })
    }
}

#[derive(Debug, Clone)]
pub enum BodyKey {
    /// A message file, by its id (the batch carries the file).
    File(u32),
    Inline(Span),
}

/// Limits on what one job may bring in.
#[derive(Debug, Clone)]
pub struct IngestLimits {
    pub max_rcpts_per_txn: usize,
    /// A spool line longer than this is rejected unread.
    pub max_line_bytes: usize,
    /// A message file larger than this is refused (its job's recipients rejected).
    pub max_message_bytes: u64,
}

impl IngestLimits {
    pub fn of(cfg: &Config) -> IngestLimits {
        IngestLimits {
            max_rcpts_per_txn: cfg.max_rcpts_per_txn,
            max_line_bytes: cfg.max_job_line_bytes,
            max_message_bytes: cfg.max_message_bytes,
        }
    }
}

/// Recipients in a job past which its transactions are found by domain in
/// a map rather than by a scan.
const INDEX_GROUPS_OVER: usize = 16;
/// How long ingest waits for room in the message budget before it looks
/// again (it flushes its own batches first: they may hold what must go).
const BUDGET_WAIT: Duration = Duration::from_millis(50);

/// An address as a mailbox: equal when the local parts are equal and the
/// domains equal but for ASCII case.
struct Mailbox<'a>(&'a str);

impl Mailbox<'_> {
    fn parts(&self) -> (&str, &str) {
        self.0.rsplit_once('@').unwrap_or((self.0, ""))
    }
}

impl PartialEq for Mailbox<'_> {
    fn eq(&self, other: &Self) -> bool {
        let ((l1, d1), (l2, d2)) = (self.parts(), other.parts());
        l1 == l2 && d1.eq_ignore_ascii_case(d2)
    }
}

impl Eq for Mailbox<'_> {}

impl std::hash::Hash for Mailbox<'_> {
    fn hash<H: std::hash::Hasher>(&self, h: &mut H) {
        let (local, domain) = self.parts();
        local.hash(h);
        for b in domain.bytes() {
            h.write_u8(b.to_ascii_lowercase());
        }
    }
}

/// The shard that owns `domain`: FNV-1a of its lower-cased bytes, stable
/// across runs and platforms.
pub fn shard_of(domain: &str, shards: usize) -> usize {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in domain.bytes() {
        h ^= u64::from(b.to_ascii_lowercase());
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    (h % shards as u64) as usize
}

pub struct Ingest {
    shards: Vec<Sender<ToShard>>,
    reports: Sender<Report>,
    limits: IngestLimits,
    batches: Vec<Vec<WorkItem>>,
    /// The message files each shard's next batch refers to.
    batch_messages: Vec<Vec<Arc<MessageFile>>>,
    /// Recipients in each shard's next batch.
    batch_rcpts: Vec<usize>,
    /// Message files by (spool file, path), while some work uses them (or
    /// why they cannot be used). Per spool file, so a message file replaced
    /// later under the same name is read anew.
    messages: HashMap<(u32, PathBuf), Result<Weak<MessageFile>, String>>,
    budget: Arc<MessageBudget>,
    next_message: u32,
    recorder: Recorder,
    recipients: u64,
    bad_lines: u64,
    reported: u64,
    already_final: u64,
}

impl Ingest {
    pub fn new(
        shards: Vec<Sender<ToShard>>,
        reports: Sender<Report>,
        limits: IngestLimits,
        budget: Arc<MessageBudget>,
        log: bool,
    ) -> Ingest {
        let n = shards.len();
        Ingest {
            shards,
            reports,
            limits,
            batches: (0..n).map(|_| Vec::with_capacity(BATCH_ITEMS)).collect(),
            batch_messages: (0..n).map(|_| Vec::new()).collect(),
            batch_rcpts: vec![0; n],
            messages: HashMap::new(),
            budget,
            next_message: 0,
            recorder: Recorder::new(log),
            recipients: 0,
            bad_lines: 0,
            reported: 0,
            already_final: 0,
        }
    }

    /// Reads the files that come through `inputs`, in turns of
    /// LINES_PER_TURN lines each so several files go out side by side,
    /// until the channel is closed and every file is read. Returns early
    /// only if a shard or the collector went away.
    pub fn run(mut self, inputs: Receiver<IngestInput>) -> Result<(), &'static str> {
        let mut open: Vec<Cursor> = Vec::new();
        let mut closed = false;
        loop {
            loop {
                let next = if open.is_empty() && !closed {
                    inputs.recv().map_err(|_| TryRecvError::Disconnected)
                } else {
                    inputs.try_recv()
                };
                match next {
                    Ok(IngestInput::Spool(input)) => open.push(self.start(input)?),
                    Ok(IngestInput::Forget(file)) => {
                        for tx in &self.shards {
                            tx.send(ToShard::Forget { file }).map_err(|_| "a shard stopped")?;
                        }
                    }
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => {
                        closed = true;
                        break;
                    }
                }
            }
            if open.is_empty() {
                if closed {
                    break;
                }
                continue;
            }
            for c in &mut open {
                self.turn(c)?;
            }
            let mut i = 0;
            while i < open.len() {
                if open[i].at.at_end(open[i].input.file.bytes()) {
                    let c = open.swap_remove(i);
                    self.finish(c)?;
                } else {
                    i += 1;
                }
            }
        }
        if self.reported > MAX_REPORTED {
            tracing::warn!("{} rejections in all (the delivery log has each)", self.reported);
        }
        self.reports
            .send(Report::IngestDone {
                recipients: self.recipients,
                bad_lines: self.bad_lines,
                already_final: self.already_final,
            })
            .map_err(|_| "the collector stopped")
    }

    /// Announces a file to the collector (with its journal) and to every shard.
    fn start(&mut self, mut input: SpoolInput) -> Result<Cursor, &'static str> {
        self.reports
            .send(Report::FileOpened {
                file: input.id,
                name: input.file.path().file_name().map_or_else(
                    || input.file.path().display().to_string(),
                    |n| n.to_string_lossy().into_owned(),
                ),
                journal: input.journal.take(),
                lock: input.lock.take(),
                earlier: input.done.counts,
            })
            .map_err(|_| "the collector stopped")?;
        for tx in &self.shards {
            tx.send(ToShard::File {
                id: input.id,
                file: input.file.clone(),
            })
            .map_err(|_| "a shard stopped")?;
        }
        let path = input.file.path();
        let name = path
            .file_name()
            .map_or_else(|| path.display().to_string(), |n| n.to_string_lossy().into_owned());
        Ok(Cursor {
            input,
            name,
            at: spool::LineCursor::default(),
            recipients: 0,
            already_final: 0,
        })
    }

    /// Reads up to LINES_PER_TURN lines of a file.
    fn turn(&mut self, c: &mut Cursor) -> Result<(), &'static str> {
        let file = c.input.file.clone();
        let map = file.bytes();
        for _ in 0..LINES_PER_TURN {
            let Some((line_no, line)) = c.at.next_line(map) else {
                break;
            };
            let (r0, a0) = (self.recipients, self.already_final);
            self.line(&c.input, &c.name, line_no, line)?;
            c.recipients += self.recipients - r0;
            c.already_final += self.already_final - a0;
        }
        Ok(())
    }

    /// A file is read: everything of it goes out now, and the collector learns its count.
    fn finish(&mut self, c: Cursor) -> Result<(), &'static str> {
        self.send_all()?;
        let id = c.input.id;
        self.messages.retain(|(spool, _), _| *spool != id);
        self.flush_outcomes()?;
        self.reports
            .send(Report::FileRead {
                file: c.input.id,
                recipients: c.recipients,
                already_final: c.already_final,
            })
            .map_err(|_| "the collector stopped")
    }

    fn line(&mut self, input: &SpoolInput, name: &str, line_no: u32, line: &[u8]) -> Result<(), &'static str> {
        let fid = input.id;
        let file = &input.file;
        let map = file.bytes();
        if input.done.contains(line_no, WHOLE_LINE) {
            self.already_final += 1;
            return Ok(());
        }
        let parsed = if line.len() > self.limits.max_line_bytes {
            Err(format!(
                "line of {} bytes is longer than max_job_line_bytes ({})",
                line.len(),
                self.limits.max_line_bytes
            ))
        } else {
            spool::parse_job(map, line)
        };
        match parsed {
            Ok(job) => self.job(fid, input, name, map, line_no, job)?,
            Err(reason) => {
                self.bad_lines += 1;
                let reason = format!("{}:{line_no}: {reason}", file.path().display());
                self.warn(&reason);
                let key = RcptKey {
                    file: fid,
                    line: line_no,
                    idx: WHOLE_LINE,
                };
                self.reject(key, JobId::Line(name, line_no), None, &reason);
            }
        }
        if self.recorder.pending_bytes() > 64 * 1024 {
            self.flush_outcomes()?;
        }
        Ok(())
    }

    fn job(
        &mut self,
        fid: u32,
        input: &SpoolInput,
        name: &str,
        map: &[u8],
        line: u32,
        job: spool::Job,
    ) -> Result<(), &'static str> {
        let file = &input.file;
        let id = match &job.id {
            Some(s) => JobId::Given(s.get(map)),
            None => JobId::Line(name, line),
        };
        let key = |idx: usize| RcptKey {
            file: fid,
            line,
            idx: idx as u32,
        };
        // Recipients an earlier run already finished are not sent again.
        let pending = || {
            job.to
                .iter()
                .enumerate()
                .filter(|(i, _)| !input.done.contains(line, *i as u32))
        };
        let pending_count = if input.done.is_empty() {
            job.to.len()
        } else {
            pending().count()
        };
        self.already_final += (job.to.len() - pending_count) as u64;
        if pending_count == 0 {
            return Ok(());
        }
        let body = match &job.body {
            JobBody::Inline(s) => Ok((BodyKey::Inline(s.clone()), None)),
            JobBody::File(s) => self
                .message(fid, &input.origin, s.get(map))?
                .map(|m| (BodyKey::File(m.id), Some(m))),
        };
        let (body, message) = match body {
            Ok(b) => b,
            Err(reason) => {
                let reason = format!("{}:{line}: {reason}", file.path().display());
                self.warn(&reason);
                self.bad_lines += 1;
                for (i, rcpt) in pending() {
                    self.reject(key(i), id, Some(rcpt.get(map)), &reason);
                }
                return Ok(());
            }
        };
        let groups = self.group(input, name, map, line, &job, pending());
        for (shard, _, rcpts) in groups {
            let n = rcpts.len();
            if let Some(m) = &message
                && !self.batch_messages[shard].iter().any(|b| b.id == m.id)
            {
                self.batch_messages[shard].push(m.clone());
            }
            self.batches[shard].push(WorkItem {
                file: fid,
                line,
                id: job.id.clone(),
                from: job.from.clone(),
                body: body.clone(),
                rcpts,
                first_seen: input.first_seen,
            });
            self.batch_rcpts[shard] += n;
            if self.batches[shard].len() >= BATCH_ITEMS || self.batch_rcpts[shard] >= BATCH_RCPTS {
                self.send_batch(shard)?;
            }
        }
        Ok(())
    }

    /// Splits a job's pending recipients into transactions: (shard, domain,
    /// up to max_rcpts_per_txn recipients of that domain). Bad and duplicate
    /// recipients are rejected here.
    fn group<'m>(
        &mut self,
        input: &SpoolInput,
        name: &str,
        map: &'m [u8],
        line: u32,
        job: &'m spool::Job,
        pending: impl Iterator<Item = (usize, &'m Span)>,
    ) -> Vec<(usize, &'m str, Vec<Rcpt>)> {
        let file = &input.file;
        let id = match &job.id {
            Some(s) => JobId::Given(s.get(map)),
            None => JobId::Line(name, line),
        };
        let key = |idx: usize| RcptKey {
            file: input.id,
            line,
            idx: idx as u32,
        };
        // A mailbox named twice in one job is sent once: the domain is
        // case-insensitive, the local part is compared as written (RFC 5321 §2.4).
        let mut first_of: HashMap<Mailbox<'_>, usize> = HashMap::new();
        // For a long list, the open transaction per lower-cased domain (a
        // scan of the groups would be quadratic).
        let mut groups: Vec<(usize, &str, Vec<Rcpt>)> = Vec::new();
        let mut open: HashMap<String, usize> = HashMap::new();
        let indexed = job.to.len() > INDEX_GROUPS_OVER;
        let max = self.limits.max_rcpts_per_txn;
        for (i, rcpt) in pending {
            let addr = rcpt.get(map);
            if let Err(why) = spool::validate_address(addr) {
                let reason = format!("{}:{line}: bad recipient {addr:?}: {why}", file.path().display());
                self.warn(&reason);
                self.reject(key(i), id, Some(addr), &reason);
                continue;
            }
            if job.to.len() > 1 {
                match first_of.entry(Mailbox(addr)) {
                    Entry::Occupied(first) => {
                        let reason = format!(
                            "{}:{line}: duplicate recipient {addr:?}: the same mailbox as to[{}], which is sent once",
                            file.path().display(),
                            first.get()
                        );
                        self.warn(&reason);
                        self.reject(key(i), id, Some(addr), &reason);
                        continue;
                    }
                    Entry::Vacant(v) => {
                        v.insert(i);
                    }
                }
            }
            self.recipients += 1;
            let domain = spool::domain_of(addr);
            let r = Rcpt {
                addr: rcpt.clone(),
                idx: i as u32,
            };
            let slot = if !indexed {
                groups
                    .iter()
                    .position(|(_, d, g)| d.eq_ignore_ascii_case(domain) && g.len() < max)
            } else if domain.bytes().any(|b| b.is_ascii_uppercase()) {
                open.get(&domain.to_ascii_lowercase()).copied()
            } else {
                open.get(domain).copied()
            };
            match slot {
                Some(g) if groups[g].2.len() < max => groups[g].2.push(r),
                _ => {
                    if indexed {
                        open.insert(domain.to_ascii_lowercase(), groups.len());
                    }
                    groups.push((shard_of(domain, self.shards.len()), domain, vec![r]));
                }
            }
        }
        groups
    }

    /// A message file, mapped on first sight (and again once nothing uses
    /// it any more), within the budget of message files in use.
    fn message(
        &mut self,
        spool: u32,
        origin: &std::path::Path,
        name: &str,
    ) -> Result<Result<Arc<MessageFile>, String>, &'static str> {
        let path = match spool::message_path(origin, name) {
            Ok(p) => p,
            Err(e) => return Ok(Err(e)),
        };
        let key = (spool, path);
        match self.messages.get(&key) {
            Some(Err(e)) => return Ok(Err(e.clone())),
            Some(Ok(m)) => {
                if let Some(m) = m.upgrade() {
                    return Ok(Ok(m));
                }
            }
            None => {}
        }
        let path = &key.1;
        let len = match std::fs::metadata(path) {
            Ok(m) if !m.is_file() => Err(format!("message {name:?} is not a regular file")),
            Ok(m) if m.len() == 0 => Err(format!("message {name:?} is empty")),
            Ok(m) if m.len() > self.limits.max_message_bytes => Err(format!(
                "message {name:?} is {} bytes, more than max_message_bytes ({})",
                m.len(),
                self.limits.max_message_bytes
            )),
            Ok(m) => Ok(m.len()),
            Err(e) => Err(format!("message {name:?} cannot be read: {e}")),
        };
        let opened = match len {
            Ok(len) => loop {
                match self.budget.open(self.next_message, path, len, BUDGET_WAIT) {
                    Ok(Ok(m)) => break Ok(Arc::new(m)),
                    Ok(Err(e)) => break Err(format!("message {name:?} cannot be read: {e}")),
                    // What is queued here may be what holds the room: send it on and wait.
                    Err(NoRoom::Full) => self.send_all()?,
                    Err(NoRoom::Closed) => return Err("the send is stopping"),
                }
            },
            Err(e) => Err(e),
        };
        match &opened {
            Ok(m) => {
                self.next_message += 1;
                self.messages.insert(key, Ok(Arc::downgrade(m)));
            }
            Err(e) => {
                self.messages.insert(key, Err(e.clone()));
            }
        }
        Ok(opened)
    }

    fn warn(&mut self, reason: &str) {
        self.reported += 1;
        if self.reported <= MAX_REPORTED {
            tracing::warn!("rejected {reason}");
        }
    }

    fn reject(&mut self, key: RcptKey, id: JobId<'_>, rcpt: Option<&str>, reason: &str) {
        self.recipients += 1;
        self.recorder.record(
            key,
            &LogRecord {
                ts: SystemTime::now(),
                id,
                rcpt,
                domain: rcpt.map(spool::domain_of).filter(|d| !d.is_empty()),
                outcome: Outcome::Rejected,
                code: None,
                enhanced: None,
                reply: Some(reason),
                mx: None,
                ip: None,
                attempt: 0,
                latency_ms: None,
                tls: None,
                category: None,
            },
        );
    }

    fn send_all(&mut self) -> Result<(), &'static str> {
        for shard in 0..self.shards.len() {
            self.send_batch(shard)?;
        }
        Ok(())
    }

    fn send_batch(&mut self, shard: usize) -> Result<(), &'static str> {
        if self.batches[shard].is_empty() {
            return Ok(());
        }
        let items = std::mem::replace(&mut self.batches[shard], Vec::with_capacity(BATCH_ITEMS));
        let messages = std::mem::take(&mut self.batch_messages[shard]);
        self.batch_rcpts[shard] = 0;
        self.shards[shard]
            .send(ToShard::Work { items, messages })
            .map_err(|_| "a shard stopped")?;
        self.reports
            .send(Report::Ingested {
                recipients: self.recipients,
            })
            .map_err(|_| "the collector stopped")
    }

    fn flush_outcomes(&mut self) -> Result<(), &'static str> {
        match self.recorder.take() {
            Some(batch) => self
                .reports
                .send(Report::Outcomes(batch))
                .map_err(|_| "the collector stopped"),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shard_of_ignores_case_and_is_stable() {
        assert_eq!(shard_of("Example.COM", 7), shard_of("example.com", 7));
        // FNV-1a pinned (computed independently): a change here moves domains between shards.
        assert_eq!(shard_of("example.com", 1_000_003), 800_822);
        let spread: std::collections::HashSet<_> = (0..100).map(|i| shard_of(&format!("d{i}.test"), 4)).collect();
        assert_eq!(spread.len(), 4);
    }
}
