//! The collector: the one place where outcomes become records. Ingest and
//! the shards send it `Report`s; it writes each group of outcomes to the
//! delivery log first (write(2), and fdatasync with `journal_fsync`), then
//! appends the group's final outcomes to the journals (group commit), and
//! only then counts them. So every outcome the journal holds as final is in
//! the log too, whatever moment a crash picks. After a write fails it writes
//! and counts nothing more: the caller stops the send.

use foldhash::{HashMap, HashMapExt};
use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{self, IoSlice, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::journal::Journal;
use crate::lock::Lock;
use crate::metrics::SpoolGauges;
use crate::metrics::export::{Board, FileStatus};
use crate::outcome::{Outcome, OutcomeBatch};

/// The window of the rates `/status` shows.
const RATE_WINDOW: Duration = Duration::from_secs(10);
/// iovecs per writev(2) (Linux's IOV_MAX).
const MAX_IOVECS: usize = 1024;

/// Messages to the collector, from ingest and the shards.
pub enum Report {
    Outcomes(OutcomeBatch),
    /// Recipients found so far (progress).
    Ingested {
        recipients: u64,
    },
    /// A file is about to be read; its journal (if any) goes to the collector.
    FileOpened {
        file: u32,
        /// Its file name, for `/status`.
        name: String,
        journal: Option<Journal>,
        /// The lock on the spool file: let go once the file is done.
        lock: Option<Lock>,
        /// Final outcomes its journal held from earlier runs, per outcome.
        earlier: [u64; 5],
    },
    /// A file was read to its end: the final outcomes to wait for from it.
    FileRead {
        file: u32,
        recipients: u64,
        already_final: u64,
    },
    /// Every line was read: the number of final outcomes to wait for, and
    /// how many recipients were already final (journaled by an earlier run).
    IngestDone {
        recipients: u64,
        bad_lines: u64,
        already_final: u64,
        /// Lines read again for shards or domains that were full the first time.
        lines_read_again: u64,
    },
}

/// A file that volley must write could not be written (a full disk, an I/O
/// error, a read-only filesystem). The send stops; what was not recorded
/// goes out again on the next run.
#[derive(Debug, thiserror::Error)]
#[error("cannot write {what} {}: {error}", path.display())]
pub struct StorageError {
    /// Which file: "the delivery log", "the journal", "the spool directory"…
    pub what: &'static str,
    pub path: PathBuf,
    pub error: io::Error,
}

impl StorageError {
    pub fn new(what: &'static str, path: &Path, error: io::Error) -> StorageError {
        StorageError {
            what,
            path: path.to_path_buf(),
            error,
        }
    }
}

/// What a send did.
#[derive(Debug, Clone, Default)]
pub struct Summary {
    /// Log records per outcome (deferrals count each attempt).
    pub counts: [u64; 5],
    /// Recipients found in the spool (each bad line counts as one).
    pub recipients: u64,
    pub bad_lines: u64,
    /// Spool lines ingest read again for shards or domains that had no room the first time.
    pub lines_read_again: u64,
    /// Recipients an earlier run had already finished (from the journal).
    pub already_final: u64,
    /// The send was stopped before every recipient was final.
    pub interrupted: bool,
    /// It kept a journal (a rerun then skips what is final).
    pub journaled: bool,
    /// Transactions that delivered to at least one recipient.
    pub messages: u64,
    pub codes: HashMap<u16, u64>,
    /// Why recipients were deferred, bounced or expired, by outcome and reason.
    pub reasons: HashMap<(Outcome, Box<str>), ReasonTally>,
    pub duration: Duration,
}

/// How often one reason came, and for which domains.
#[derive(Debug, Clone, Default)]
pub struct ReasonTally {
    pub count: u64,
    /// The domains it came for (at most `MAX_REASON_DOMAINS` kept).
    pub domains: std::collections::HashSet<Box<str>>,
    /// Past `MAX_REASON_DOMAINS`, more domains than `domains` holds.
    pub more_domains: bool,
}

/// Finished files `/status` lists.
const FINISHED_SHOWN: usize = 20;

/// Distinct reasons kept per run; later new ones are counted as one.
const MAX_REASONS: usize = 1000;
const MAX_REASON_DOMAINS: usize = 10_000;
/// Where reasons past `MAX_REASONS` are counted.
const OTHER_REASONS: &str = "(other reasons)";

impl Summary {
    /// Adds `n` records of `r`.
    pub fn add_reason(&mut self, r: crate::outcome::Reason, n: u64) {
        let mut key = (r.outcome, r.text);
        if !self.reasons.contains_key(&key) && self.reasons.len() >= MAX_REASONS {
            key.1 = OTHER_REASONS.into();
        }
        let t = self.reasons.entry(key).or_default();
        t.count += n;
        if t.domains.len() < MAX_REASON_DOMAINS {
            t.domains.insert(r.domain);
        } else if !t.domains.contains(&r.domain) {
            t.more_domains = true;
        }
    }

    /// The `n` most frequent reasons of `outcome`: text, count, domains (and
    /// whether there were more than that), one of them.
    pub fn top_reasons(&self, outcome: Outcome, n: usize) -> Vec<(&str, u64, usize, bool, &str)> {
        let mut v: Vec<_> = self
            .reasons
            .iter()
            .filter(|((o, _), _)| *o == outcome)
            .map(|((_, text), t)| {
                let example = t.domains.iter().min().map(|d| &**d).unwrap_or_default();
                (&**text, t.count, t.domains.len(), t.more_domains, example)
            })
            .collect();
        v.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
        v.truncate(n);
        v
    }

    /// A warning when one DNS failure (the resolver's, most likely) took
    /// at least half of the run's outcomes over ten domains or more.
    pub fn dns_alarm(&self) -> Option<String> {
        let total: u64 = self.counts.iter().sum();
        let ((_, text), t) = self
            .reasons
            .iter()
            .filter(|((_, text), _)| {
                ["no-such-domain:", "dns:", "no-resolver:"]
                    .iter()
                    .any(|k| text.starts_with(k))
            })
            .max_by_key(|(_, t)| t.count)?;
        (t.domains.len() >= 10 && t.count * 2 >= total).then(|| {
            format!(
                "WARNING: {} of {} outcomes over {}{} domains are one DNS failure ({text}): is the resolver working \
                 (/etc/resolv.conf, --dns, [dns] servers)? Once it is, `volley send --resend bounced,expired FILE...` \
                 sends them again.",
                group_digits(t.count),
                group_digits(total),
                t.domains.len(),
                if t.more_domains { "+" } else { "" },
            )
        })
    }

    /// One reason as a line: `250 × 421 4.7.0 try later (12 domains: a.test, …)`.
    pub fn reason_line(r: &(&str, u64, usize, bool, &str)) -> String {
        let (text, count, domains, more, example) = *r;
        let domains = match (domains, more) {
            (1, false) => example.to_string(),
            (n, more) => format!("{n}{} domains: {example}, …", if more { "+" } else { "" }),
        };
        format!("{} × {text} ({domains})", group_digits(count))
    }

    pub fn count(&self, o: Outcome) -> u64 {
        self.counts[o.index()]
    }
    pub fn finals(&self) -> u64 {
        Outcome::ALL
            .iter()
            .filter(|o| o.is_final())
            .map(|o| self.count(*o))
            .sum()
    }

    /// The summary as printed at the end of `send`.
    pub fn render(&self) -> String {
        let secs = self.duration.as_secs_f64().max(1e-9);
        let mut s = format!(
            "{} recipients in {:.2}s: {} delivered, {} bounced, {} expired, {} rejected ({} bad lines); {} deferrals retried\n",
            self.recipients,
            secs,
            self.count(Outcome::Delivered),
            self.count(Outcome::Bounced),
            self.count(Outcome::Expired),
            self.count(Outcome::Rejected),
            self.bad_lines,
            self.count(Outcome::Deferred),
        );
        if self.interrupted {
            let rerun = if self.journaled {
                "run send again on the same files to finish them (their journals skip what is final)"
            } else {
                "with --no-journal there is no record of them: sending the same files again sends every recipient again"
            };
            s += &format!(
                "interrupted: {} recipients are not final yet; {rerun}\n",
                self.recipients.saturating_sub(self.finals())
            );
        }
        if self.lines_read_again > 0 {
            s += &format!(
                "{} spool lines read again for shards or domains that were full when they were first read\n",
                self.lines_read_again
            );
        }
        if self.already_final > 0 {
            s += &format!(
                "{} more were already final (from the journal of an earlier run)\n",
                self.already_final
            );
        }
        s += &format!(
            "{:.0} messages/s ({} messages), {:.0} recipients/s delivered\n",
            self.messages as f64 / secs,
            self.messages,
            self.count(Outcome::Delivered) as f64 / secs
        );
        let mut codes: Vec<_> = self.codes.iter().collect();
        codes.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
        if !codes.is_empty() {
            let top: Vec<String> = codes.iter().take(5).map(|(c, n)| format!("{c} ×{n}")).collect();
            s += &format!("top reply codes: {}\n", top.join(", "));
        }
        if let Some(alarm) = self.dns_alarm() {
            s += &format!("{alarm}\n");
        }
        for (outcome, what) in [
            (Outcome::Deferred, "deferral"),
            (Outcome::Bounced, "bounce"),
            (Outcome::Expired, "expiry"),
        ] {
            let top = self.top_reasons(outcome, 3);
            if !top.is_empty() {
                s += &format!("top {what} reasons:\n");
                for r in &top {
                    s += &format!("  {}\n", Summary::reason_line(r));
                }
            }
        }
        s
    }
}

/// `1234567` as `1,234,567`.
pub fn group_digits(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::with_capacity(s.len() + s.len() / 3);
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// What the collector knows of one spool file.
#[derive(Default)]
pub struct FileTrack {
    pub name: String,
    pub journal: Option<Journal>,
    pub lock: Option<Lock>,
    /// Final outcomes of earlier runs (from the journal), per outcome.
    pub earlier: [u64; 5],
    /// Final outcomes to wait for, once the file is read to its end.
    pub expected: Option<u64>,
    pub already_final: u64,
    /// Final outcomes committed, in all and per outcome.
    pub finals: u64,
    pub counts: [u64; 5],
    /// Recipients deferred and not final yet (counted at their first
    /// deferral, until their final outcome).
    pub deferred: u64,
    /// (when, finals) samples for the rate `/status` shows.
    samples: VecDeque<(Instant, u64)>,
}

impl FileTrack {
    pub fn complete(&self) -> bool {
        self.expected.is_some_and(|e| self.finals >= e)
    }

    /// The file as `/status` shows it; takes a rate sample.
    fn status(&mut self, now: Instant) -> FileStatus {
        self.samples.push_back((now, self.finals));
        while self.samples.len() > 2 && now.duration_since(self.samples[0].0) > RATE_WINDOW {
            self.samples.pop_front();
        }
        let (t0, f0) = self.samples[0];
        let secs = now.duration_since(t0).as_secs_f64();
        let rate = if secs > 0.0 {
            (self.finals - f0) as f64 / secs
        } else {
            0.0
        };
        let c = |o: Outcome| self.counts[o.index()];
        let left = self.expected.map(|e| e.saturating_sub(self.finals));
        let retrying = left.is_some_and(|l| l > 0 && self.deferred >= l);
        FileStatus {
            name: self.name.clone(),
            state: match (self.expected, retrying) {
                (None, _) => "reading",
                (Some(_), true) => "retrying",
                (Some(_), false) => "sending",
            },
            recipients: self.expected,
            finals: self.finals,
            delivered: c(Outcome::Delivered),
            bounced: c(Outcome::Bounced),
            expired: c(Outcome::Expired),
            rejected: c(Outcome::Rejected),
            deferred: self.deferred,
            rate_per_second: rate,
            eta_seconds: match self.expected {
                _ if retrying => None,
                Some(e) if rate > 0.0 => Some(e.saturating_sub(self.finals) as f64 / rate),
                Some(e) if e <= self.finals => Some(0.0),
                _ => None,
            },
            finished_at: None,
        }
    }

    /// The file as `/status` lists it once finished: its counts with earlier runs'.
    fn finished_status(&mut self, now: Instant) -> FileStatus {
        let mut f = self.status(now);
        let c = |o: Outcome| self.counts[o.index()] + self.earlier[o.index()];
        f.state = "done";
        f.recipients = Some(self.finals + self.already_final);
        f.finals = self.finals + self.already_final;
        f.delivered = c(Outcome::Delivered);
        f.bounced = c(Outcome::Bounced);
        f.expired = c(Outcome::Expired);
        f.rejected = c(Outcome::Rejected);
        f.deferred = 0;
        f.eta_seconds = Some(0.0);
        f.finished_at = Some(humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string());
        f
    }
}

/// The delivery log, opened for appending. Unbuffered: a group is in the
/// file (the kernel's page cache) as soon as `write_group` returns, so a
/// process killed after that loses none of it.
pub struct DeliveryLog {
    path: PathBuf,
    file: File,
}

impl DeliveryLog {
    /// Opens the log for appending. A process killed in the middle of a
    /// write leaves a torn last line: it is cut off, so that every line stays
    /// one JSON record (that recipient is not in the journal, which is
    /// written after the log, so it goes out again and is logged again).
    pub fn open(path: &Path) -> io::Result<DeliveryLog> {
        let mut file = OpenOptions::new().create(true).read(true).append(true).open(path)?;
        let len = file.metadata()?.len();
        if len > 0 {
            let tail_len = len.min(1 << 20);
            let mut tail = vec![0u8; tail_len as usize];
            file.seek(SeekFrom::Start(len - tail_len))?;
            file.read_exact(&mut tail)?;
            if tail.last() != Some(&b'\n') {
                match tail.iter().rposition(|&b| b == b'\n') {
                    Some(i) => cut_torn_line(&file, path, len, len - tail_len + i as u64 + 1)?,
                    None if tail_len == len => cut_torn_line(&file, path, len, 0)?,
                    // A last line longer than 1 MiB: not one of volley's; leave it and start afresh.
                    None => file.write_all(b"\n")?,
                }
            }
        }
        Ok(DeliveryLog {
            path: path.to_path_buf(),
            file,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends `parts` with as few writev(2) calls as the kernel takes and,
    /// with `sync`, waits until they are on disk.
    pub fn write_group(&mut self, parts: &[&[u8]], sync: bool) -> io::Result<()> {
        let mut slices: Vec<IoSlice<'_>> = parts
            .iter()
            .filter(|p| !p.is_empty())
            .map(|p| IoSlice::new(p))
            .collect();
        if slices.is_empty() {
            return Ok(());
        }
        let mut left = &mut slices[..];
        while !left.is_empty() {
            let n = left.len().min(MAX_IOVECS);
            match self.file.write_vectored(&left[..n]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(written) => IoSlice::advance_slices(&mut left, written),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        if sync {
            self.file.sync_data()?;
        }
        Ok(())
    }
}

fn cut_torn_line(file: &File, path: &Path, len: u64, keep: u64) -> io::Result<()> {
    tracing::warn!(
        "{}: cut a torn last line ({} bytes) left by an interrupted run",
        path.display(),
        len - keep
    );
    file.set_len(keep)
}

/// Takes reports and makes outcomes count, in this order: delivery log,
/// journal, counts.
pub struct Collector {
    /// Files being worked on, by id.
    files: HashMap<u32, FileTrack>,
    fsync: bool,
    log: Option<DeliveryLog>,
    pending: Vec<OutcomeBatch>,
    /// When the oldest pending batch arrived.
    pending_since: Option<Instant>,
    /// Per shard, the records pending (not committed yet).
    pending_by_shard: Vec<u64>,
    /// Final outcomes pending.
    pending_finals: u64,
    pub summary: Summary,
    /// Files finished in this run (in `send`, their counts stay in the gauges).
    finished: SpoolGauges,
    /// The last `FINISHED_SHOWN` files finished, as `/status` lists them, the newest first.
    recent: VecDeque<FileStatus>,
    /// Recipients ingest has found so far, and in all once it is done.
    pub ingested: u64,
    pub total: Option<u64>,
    /// A write failed: nothing more is written or counted.
    failed: bool,
    /// Final outcomes that could not be recorded (after a failed write).
    pub unrecorded: u64,
    /// Per shard, its outcome records written so far: the shard holds its
    /// sending back while too many of its outcomes are not.
    recorded: Vec<Arc<AtomicU64>>,
}

impl Collector {
    pub fn new(fsync: bool, log: Option<DeliveryLog>, recorded: Vec<Arc<AtomicU64>>) -> Collector {
        Collector {
            files: HashMap::new(),
            fsync,
            log,
            pending: Vec::new(),
            pending_since: None,
            pending_by_shard: Vec::new(),
            pending_finals: 0,
            summary: Summary::default(),
            finished: SpoolGauges::default(),
            recent: VecDeque::new(),
            ingested: 0,
            total: None,
            failed: false,
            unrecorded: 0,
            recorded,
        }
    }

    /// Every recipient of every file is final (and counted).
    pub fn all_final(&self) -> bool {
        self.total.is_some_and(|t| self.summary.finals() >= t)
    }

    /// When the oldest outcome not yet committed arrived.
    pub fn pending_since(&self) -> Option<Instant> {
        self.pending_since
    }

    /// Whether to commit now: the oldest pending outcome has waited
    /// `interval` (the group commit), or a shard has
    /// `COMMIT_PENDING_PER_SHARD` (a quarter of `MAX_UNRECORDED_PER_SHARD`)
    /// records pending. A shard that sends faster than
    /// `MAX_UNRECORDED_PER_SHARD` a commit interval would otherwise stop
    /// starting transactions until the commit; committed at a quarter, it
    /// has the rest to send on while its outcomes reach the collector and
    /// the commit's writes and syncs run (committed at half, a shard at
    /// 450,000 messages a second still met the bound at each commit).
    ///
    /// And at once when the pending outcomes are the last ones: nothing
    /// more will come to share the commit, and the run ends with it.
    pub fn commit_due(&self, interval: Duration) -> bool {
        self.pending_since.is_some_and(|t| t.elapsed() >= interval)
            || (self.pending_finals > 0
                && self
                    .total
                    .is_some_and(|t| self.summary.finals() + self.pending_finals >= t))
            || self
                .pending_by_shard
                .iter()
                .any(|&n| n >= crate::shard::COMMIT_PENDING_PER_SHARD)
    }

    pub fn take(&mut self, report: Report) {
        match report {
            Report::Outcomes(batch) => {
                if self.failed {
                    self.unrecorded += batch.final_count();
                } else {
                    self.pending_since.get_or_insert_with(Instant::now);
                    if let Some(shard) = batch.shard {
                        if self.pending_by_shard.len() <= shard {
                            self.pending_by_shard.resize(shard + 1, 0);
                        }
                        self.pending_by_shard[shard] += batch.records();
                    }
                    self.pending_finals += batch.final_count();
                    self.pending.push(batch);
                }
            }
            Report::Ingested { recipients } => self.ingested = recipients,
            Report::FileOpened {
                file,
                name,
                journal,
                lock,
                earlier,
            } => {
                let track = self.files.entry(file).or_default();
                track.journal = journal;
                track.lock = lock;
                track.earlier = earlier;
                track.name = name;
            }
            Report::FileRead {
                file,
                recipients,
                already_final,
            } => {
                let track = self.files.entry(file).or_default();
                track.expected = Some(recipients);
                track.already_final = already_final;
            }
            Report::IngestDone {
                recipients,
                bad_lines,
                already_final,
                lines_read_again,
            } => {
                self.summary.lines_read_again = lines_read_again;
                self.ingested = recipients;
                self.total = Some(recipients);
                self.summary.recipients = recipients;
                self.summary.bad_lines = bad_lines;
                self.summary.already_final = already_final;
            }
        }
    }

    /// Records the pending outcomes: the log (synced with fsync), then the
    /// journals (the group commit), then the counts. On a failed write
    /// nothing of the group is counted, and nothing is written from then on.
    pub fn commit(&mut self) -> Result<(), StorageError> {
        self.pending_since = None;
        self.pending_by_shard.iter_mut().for_each(|n| *n = 0);
        self.pending_finals = 0;
        if self.pending.is_empty() {
            return Ok(());
        }
        if let Err(e) = self.write_pending() {
            self.failed = true;
            self.unrecorded += self.pending.drain(..).map(|b| b.final_count()).sum::<u64>();
            return Err(e);
        }
        for k in self.pending.iter().flat_map(|b| &b.deferred) {
            self.files.entry(k.file).or_default().deferred += 1;
        }
        for f in self.pending.iter().flat_map(|b| &b.finals) {
            let track = self.files.entry(f.key.file).or_default();
            track.finals += 1;
            track.counts[f.outcome.index()] += 1;
            if f.retried {
                track.deferred = track.deferred.saturating_sub(1);
            }
        }
        for batch in self.pending.drain(..) {
            if let Some(credit) = batch.shard.and_then(|i| self.recorded.get(i)) {
                credit.fetch_add(batch.records(), Ordering::Relaxed);
            }
            for (a, b) in self.summary.counts.iter_mut().zip(batch.counts) {
                *a += b;
            }
            for (code, n) in batch.codes {
                *self.summary.codes.entry(code).or_default() += n;
            }
            for (r, n) in batch.reasons {
                self.summary.add_reason(r, n);
            }
            self.summary.messages += batch.messages;
        }
        Ok(())
    }

    fn write_pending(&mut self) -> Result<(), StorageError> {
        if let Some(log) = self.log.as_mut() {
            let parts: Vec<&[u8]> = self.pending.iter().map(|b| &b.log[..]).collect();
            log.write_group(&parts, self.fsync)
                .map_err(|e| StorageError::new("the delivery log", &log.path, e))?;
        }
        for f in self.pending.iter().flat_map(|b| &b.finals) {
            if let Some(j) = self.files.get_mut(&f.key.file).and_then(|t| t.journal.as_mut()) {
                j.append(f.key.line, f.key.idx, f.outcome);
            }
        }
        for j in self.files.values_mut().filter_map(|t| t.journal.as_mut()) {
            if j.has_pending() {
                j.commit(self.fsync)
                    .map_err(|e| StorageError::new("the journal", j.path(), e))?;
            }
        }
        Ok(())
    }

    /// Removes and returns the files whose every recipient is final and
    /// recorded (their log lines and journal records are written).
    pub fn take_finished(&mut self) -> Vec<(u32, FileTrack)> {
        let ids: Vec<u32> = self
            .files
            .iter()
            .filter(|(_, t)| t.complete())
            .map(|(id, _)| *id)
            .collect();
        ids.into_iter()
            .map(|id| {
                let mut track = self.files.remove(&id).expect("listed above");
                self.recent.push_front(track.finished_status(Instant::now()));
                self.recent.truncate(FINISHED_SHOWN);
                self.finished.read += track.finals;
                self.finished.finals += track.finals;
                (id, track)
            })
            .collect()
    }

    /// What `/status` and the spool gauges show now; `files` is (done, failed) in service mode.
    pub fn board(&mut self, files: Option<(u64, u64)>) -> Board {
        let now = Instant::now();
        let mut statuses: Vec<FileStatus> = self.files.values_mut().map(|t| t.status(now)).collect();
        statuses.sort_by(|a, b| a.name.cmp(&b.name));
        let mut spool = self.finished.clone();
        for f in &statuses {
            spool.finals += f.finals;
            spool.deferred += f.deferred;
        }
        spool.read = self.ingested.max(spool.finals);
        spool.rejected = self.summary.count(Outcome::Rejected);
        spool.files_active = statuses.len() as u64;
        if let Some((done, failed)) = files {
            spool.files_done = done;
            spool.files_failed = failed;
        }
        Board {
            files: statuses,
            finished: self.recent.iter().cloned().collect(),
            spool,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::journal::{self, Journal};
    use crate::outcome::{Final, RcptKey};

    #[test]
    fn a_file_whose_rest_waits_for_retries_has_no_eta_and_a_finished_one_counts_earlier_runs() {
        let now = Instant::now();
        let mut t = FileTrack {
            name: "f.jsonl".into(),
            expected: Some(10),
            finals: 9,
            already_final: 5,
            ..FileTrack::default()
        };
        t.counts[Outcome::Delivered.index()] = 9;
        t.earlier[Outcome::Delivered.index()] = 4;
        t.earlier[Outcome::Bounced.index()] = 1;
        t.samples.push_back((now - Duration::from_secs(5), 0));
        let sending = t.status(now);
        assert_eq!((sending.state, sending.eta_seconds.is_some()), ("sending", true));
        t.deferred = 1;
        let waiting = t.status(now);
        assert_eq!((waiting.state, waiting.eta_seconds), ("retrying", None));
        t.deferred = 0;
        t.finals = 10;
        t.counts[Outcome::Delivered.index()] = 10;
        let done = t.finished_status(now);
        assert_eq!(done.state, "done");
        assert_eq!((done.recipients, done.delivered, done.bounced), (Some(15), 14, 1));
        assert!(done.finished_at.is_some());
    }

    #[test]
    fn an_interrupted_summary_says_what_a_rerun_does() {
        let mut s = Summary {
            interrupted: true,
            recipients: 10,
            journaled: true,
            ..Summary::default()
        };
        assert!(
            s.render()
                .contains("10 recipients are not final yet; run send again on the same files")
        );
        s.journaled = false;
        assert!(
            s.render().contains("with --no-journal there is no record of them"),
            "{}",
            s.render()
        );
    }

    #[test]
    fn reasons_are_counted_by_text_with_their_domains() {
        let mut s = Summary::default();
        let r = |text: &str, domain: &str| crate::outcome::Reason {
            outcome: Outcome::Deferred,
            text: text.into(),
            domain: domain.into(),
        };
        s.add_reason(r("421 busy", "a.test"), 3);
        s.add_reason(r("421 busy", "b.test"), 2);
        s.add_reason(r("450 later", "a.test"), 1);
        let top = s.top_reasons(Outcome::Deferred, 5);
        assert_eq!(Summary::reason_line(&top[0]), "5 × 421 busy (2 domains: a.test, …)");
        assert_eq!(Summary::reason_line(&top[1]), "1 × 450 later (a.test)");
        assert!(s.top_reasons(Outcome::Bounced, 5).is_empty());
        assert!(
            s.render().contains("top deferral reasons:\n  5 × 421 busy"),
            "{}",
            s.render()
        );
        assert!(s.dns_alarm().is_none());
        let mut nx = Summary {
            counts: [1, 20, 0, 0, 0],
            ..Summary::default()
        };
        for i in 0..20 {
            nx.add_reason(
                crate::outcome::Reason {
                    outcome: Outcome::Bounced,
                    text: "no-such-domain: {domain}: no such domain (NXDOMAIN)".into(),
                    domain: format!("d{i}.test").into(),
                },
                1,
            );
        }
        let alarm = nx.dns_alarm().unwrap();
        assert!(
            alarm.contains("20 of 21 outcomes over 20 domains") && alarm.contains("--resend"),
            "{alarm}"
        );
        assert!(nx.render().contains("WARNING: 20 of 21"), "{}", nx.render());
        assert_eq!(group_digits(1_234_567), "1,234,567");
        assert_eq!(group_digits(999), "999");
    }

    #[test]
    fn a_torn_last_log_line_is_cut_before_appending() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("log.jsonl");
        std::fs::write(&p, "{\"a\":1}\n{\"ts\":\"2026-").unwrap();
        let mut log = DeliveryLog::open(&p).unwrap();
        log.write_group(&[b"{\"b\":2}\n"], false).unwrap();
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "{\"a\":1}\n{\"b\":2}\n");
        // A whole log is left as it is; a torn first line goes entirely.
        let mut log = DeliveryLog::open(&p).unwrap();
        log.write_group(&[b"{\"c\":3}\n", b"", b"{\"d\":4}\n"], true).unwrap();
        assert_eq!(
            std::fs::read_to_string(&p).unwrap(),
            "{\"a\":1}\n{\"b\":2}\n{\"c\":3}\n{\"d\":4}\n"
        );
        std::fs::write(&p, "{\"torn").unwrap();
        drop(DeliveryLog::open(&p).unwrap());
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "");
    }

    #[test]
    fn a_group_of_more_parts_than_one_writev_takes_is_written_whole_and_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("log.jsonl");
        let lines: Vec<String> = (0..3000).map(|i| format!("{{\"n\":{i}}}\n")).collect();
        let parts: Vec<&[u8]> = lines.iter().map(|l| l.as_bytes()).collect();
        DeliveryLog::open(&p).unwrap().write_group(&parts, false).unwrap();
        assert_eq!(std::fs::read_to_string(&p).unwrap(), lines.concat());
    }

    fn batch(file: u32, lines: std::ops::Range<u32>) -> OutcomeBatch {
        let mut b = OutcomeBatch::default();
        for line in lines {
            b.finals.push(Final {
                key: RcptKey { file, line, idx: 0 },
                outcome: Outcome::Delivered,
                retried: false,
            });
            b.log.extend_from_slice(format!("{{\"line\":{line}}}\n").as_bytes());
            b.counts[Outcome::Delivered.index()] += 1;
        }
        b
    }

    fn collector_with_journal(dir: &Path, log: &Path) -> Collector {
        let spool = dir.join("s.jsonl");
        let journal = Journal::open(&spool, 10).unwrap().journal;
        let mut c = Collector::new(true, Some(DeliveryLog::open(log).unwrap()), Vec::new());
        c.take(Report::FileOpened {
            file: 0,
            name: "s.jsonl".into(),
            journal: Some(journal),
            lock: None,
            earlier: [0; 5],
        });
        c
    }

    #[test]
    fn outcomes_are_logged_then_journaled_then_counted() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("log.jsonl");
        let mut c = collector_with_journal(dir.path(), &log);
        c.take(Report::Outcomes(batch(0, 1..4)));
        c.take(Report::Outcomes(batch(0, 4..6)));
        assert!(c.pending_since().is_some());
        assert_eq!(c.summary.finals(), 0, "nothing counts before it is recorded");
        c.commit().unwrap();
        assert_eq!(c.summary.finals(), 5);
        assert_eq!(std::fs::read_to_string(&log).unwrap().lines().count(), 5);
        let records = journal::read_records(&journal::path_for(&dir.path().join("s.jsonl"))).unwrap();
        assert_eq!(records.iter().map(|r| r.0).collect::<Vec<_>>(), vec![1, 2, 3, 4, 5]);
    }

    #[test]
    fn the_last_outcomes_are_committed_without_waiting_for_the_interval() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("log.jsonl");
        let mut c = collector_with_journal(dir.path(), &log);
        let interval = Duration::from_secs(3600);
        c.take(Report::Outcomes(batch(0, 1..4)));
        assert!(!c.commit_due(interval), "the total is not known yet");
        c.take(Report::IngestDone {
            recipients: 5,
            bad_lines: 0,
            already_final: 0,
            lines_read_again: 0,
        });
        assert!(!c.commit_due(interval), "two recipients are still to come");
        c.commit().unwrap();
        c.take(Report::Outcomes(batch(0, 4..5)));
        assert!(!c.commit_due(interval), "one is still to come");
        c.take(Report::Outcomes(batch(0, 5..6)));
        assert!(c.commit_due(interval), "the pending outcomes are the last ones");
        c.commit().unwrap();
        assert!(c.all_final());
        assert!(!c.commit_due(interval), "nothing pending");
    }

    #[test]
    fn a_shard_a_quarter_of_the_way_to_its_unrecorded_bound_is_committed_before_the_interval() {
        use crate::shard::COMMIT_PENDING_PER_SHARD;
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("log.jsonl");
        let mut c = collector_with_journal(dir.path(), &log);
        let interval = Duration::from_secs(3600);
        let part = COMMIT_PENDING_PER_SHARD as u32;
        let from_shard = |shard, lines| {
            let mut b = batch(0, lines);
            b.shard = Some(shard);
            b
        };
        assert!(!c.commit_due(interval), "nothing pending");
        c.take(Report::Outcomes(from_shard(0, 1..part)));
        c.take(Report::Outcomes(from_shard(1, part..2 * part - 1)));
        assert!(!c.commit_due(interval), "each shard one short: the interval decides");
        c.take(Report::Outcomes(from_shard(1, 2 * part - 1..2 * part)));
        assert!(c.commit_due(interval), "shard 1 has a quarter of its bound pending");
        c.commit().unwrap();
        assert_eq!(c.summary.finals(), 2 * part as u64 - 1);
        assert!(!c.commit_due(interval), "a commit starts the counts again");
        c.take(Report::Outcomes(from_shard(0, 2 * part..2 * part + 1)));
        assert!(!c.commit_due(interval));
        assert!(
            c.commit_due(Duration::ZERO),
            "the interval still commits what is pending"
        );
    }

    #[test]
    fn a_failed_log_write_journals_and_counts_nothing_more() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("log.jsonl");
        let mut c = collector_with_journal(dir.path(), &log);
        c.take(Report::Outcomes(batch(0, 1..3)));
        c.commit().unwrap();
        // The log's descriptor now refuses writes, as a full or failed disk does.
        let read_only = OpenOptions::new().read(true).open(&log).unwrap();
        c.log.as_mut().unwrap().file = read_only;
        c.take(Report::Outcomes(batch(0, 3..6)));
        let e = c.commit().unwrap_err();
        assert_eq!(e.what, "the delivery log");
        assert!(e.to_string().contains("log.jsonl"), "{e}");
        assert_eq!(c.summary.finals(), 2);
        assert_eq!(c.unrecorded, 3);
        // Later outcomes are not recorded either.
        c.take(Report::Outcomes(batch(0, 6..7)));
        c.commit().unwrap();
        assert_eq!((c.summary.finals(), c.unrecorded), (2, 4));
        let records = journal::read_records(&journal::path_for(&dir.path().join("s.jsonl"))).unwrap();
        assert_eq!(records.len(), 2, "the journal holds only what the log holds");
    }
}
