//! Ingest: scans spool files line by line, validates each job, splits its
//! recipients by domain, and hands batches to the shard that owns each domain
//! (a stable hash of the lower-cased domain; for a spread domain, of the
//! recipient). It never waits on one shard: each shard grants credit (room
//! for recipients) as it finishes work, and a shard or domain without room
//! is passed over — its lane in the file stays behind (offsets only) and
//! reads those lines again from the map once room comes back.

pub mod lanes;
mod spread;

use foldhash::{HashMap, HashMapExt, HashSet, HashSetExt};
use smallvec::SmallVec;
use std::borrow::Cow;
use std::collections::VecDeque;
use std::collections::hash_map::Entry;
use std::hash::{BuildHasherDefault, Hasher};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::Weak;
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context;

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, TryRecvError};

use crate::collector::{Report, StorageError};
use crate::config::Config;
use crate::journal::{self, Done, Journal, WHOLE_LINE};
use crate::lock::Lock;
use crate::messages::{MessageBudget, MessageFile, NoRoom};
use crate::outcome::{JobId, LogRecord, Outcome, RcptKey, Recorder};
use crate::spool::{self, JobBody, MappedFile, Span};
use lanes::{LaneKey, LaneRef, Lanes};
use spread::Spread;

/// Transactions per batch sent to a shard, and recipients: a batch goes when
/// it has either, so it holds a bounded number of recipients however wide
/// the jobs are (what a shard's inbox holds is bounded by its credit).
pub const BATCH_ITEMS: usize = 256;
const BATCH_RCPTS: usize = 2048;
/// Lines one pass (the lead, or one lane) reads in a file before the next gets a turn.
const LINES_PER_TURN: usize = 1024;
/// Lines in a row the lead may pass over whole (nothing in them could be
/// sent) before it waits for one of the lanes it passed them to: reading on
/// would only give those lanes more to read again.
const LEAD_SKIP_LINES: usize = 2048;
/// Lanes a waiting lead remembers (one of them catching up wakes it).
const LEAD_WAKERS: usize = 16;
/// How long ingest sleeps when nothing can move, before it looks again
/// (short: a shard's PASS_OVER_AFTER may run out meanwhile).
const IDLE_WAIT: Duration = Duration::from_millis(10);
/// How long a shard may be out of room before the lead passes it over.
const PASS_OVER_AFTER: Duration = Duration::from_millis(20);
/// Rejections reported on stderr before the rest are only counted and logged.
const MAX_REPORTED: u64 = 20;

/// Where ingest is in one file: the lead, the lanes behind it, and where
/// each spread domain started to spread in this file.
struct Cursor {
    input: SpoolInput,
    name: String,
    lead: spool::LineCursor,
    lanes: Lanes,
    spread_from: HashMap<Box<str>, usize>,
    /// Lines in a row the lead passed over whole, and lanes it passed them to.
    lead_skips: usize,
    lead_wakers: Vec<LaneKey>,
    /// Lines already counted as bad (a lane that reads one again does not count it twice).
    bad_lines: HashSet<u32>,
    recipients: u64,
    already_final: u64,
}

impl Cursor {
    fn done(&self) -> bool {
        self.lead.at_end(self.input.file.bytes()) && self.lanes.all_caught_up()
    }
}

/// Messages from the shards to ingest: credit and full domains.
#[derive(Debug)]
pub enum Credit {
    /// Shard `shard` takes up to `allowed` recipients in all (a running total
    /// of what it was sent; it only grows), and has taken `received` of
    /// them from its inbox (each counted in its domain's queue).
    Room { shard: usize, allowed: u64, received: u64 },
    /// The shard holds `max_queued_recipients_per_domain` of `domain`: pass it over.
    DomainFull { shard: usize, domain: Box<str> },
    /// The domain has room again on the shard.
    DomainOpen { shard: usize, domain: Box<str> },
}

/// Which pass reads a line: the lead (the first read: recipients are
/// counted and bad ones rejected there) or a lane reading again what the
/// lead passed over for it.
#[derive(Clone, Copy)]
enum Pass<'a> {
    Lead,
    Lane(LaneRef<'a>),
}

/// What one pass did with a line.
#[derive(Default)]
struct LineSeen {
    /// Something of it went to a shard (or was settled).
    sent: bool,
    /// Something of it was passed over for a lane.
    passed_over: bool,
}

/// Recipients of one job for one shard and domain (at most `max_rcpts_per_txn`).
struct Group<'m> {
    shard: usize,
    /// Lower-cased, and its key in the per-domain counts.
    domain: Cow<'m, str>,
    hash: u64,
    rcpts: Rcpts,
}

/// Messages from ingest to a shard.
pub enum ToShard {
    /// A spool file the following work refers to by `id`.
    File {
        id: u32,
        file: Arc<MappedFile>,
        /// When the file was first seen (`max_age` runs from then).
        first_seen: Instant,
    },
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

/// Message files whose template check is remembered at once (then forgotten, and checked again).
const MAX_TEMPLATE_ANSWERS: usize = 4096;

/// Recipients of one job that share a domain (at most `max_rcpts_per_txn`).
#[derive(Debug)]
pub struct WorkItem {
    pub file: u32,
    pub line: u32,
    /// Where the line starts in the spool file.
    pub off: u64,
    pub id: Option<Span>,
    pub from: Span,
    pub body: BodyKey,
    pub rcpts: Rcpts,
    pub first_seen: Instant,
    /// Spool v2: the message is a template; the job's variables (JSON object text).
    pub personal: Option<Option<Span>>,
    /// Spool v2: the template of each recipient's envelope sender (VERP).
    pub verp: Option<Span>,
    /// Spool v2: the job's List-Unsubscribe (a template).
    pub list_unsubscribe: Option<Span>,
}

/// A transaction's recipients: inline for one, the usual newsletter job
/// (no allocation made by ingest and freed by a shard, and no pointer to
/// follow to the addresses).
pub type Rcpts = smallvec::SmallVec<[Rcpt; 1]>;

/// A recipient and its index in the job's `to` (its name in the journal).
#[derive(Debug, Clone)]
pub struct Rcpt {
    pub addr: Span,
    pub idx: u32,
    /// Its own template variables (spool v2), as JSON object text (boxed:
    /// a v1 recipient pays a pointer for it).
    pub vars: Option<Box<Span>>,
}

impl Rcpt {
    /// Recipient `i` of a parsed job, with its own variables.
    pub fn of(job: &crate::spool::Job, i: usize) -> Rcpt {
        Rcpt {
            addr: job.to[i].clone(),
            idx: i as u32,
            vars: job
                .personal
                .as_ref()
                .and_then(|p| p.rcpt_vars.get(i).cloned().flatten())
                .map(Box::new),
        }
    }
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
            let mut done = opened.done;
            let mut first_seen = opened.first_seen;
            if !cfg.resend.is_empty() {
                let again = done.resend(&cfg.resend);
                if again > 0 {
                    // Their max_age runs anew from now.
                    first_seen = SystemTime::now();
                    tracing::info!("{}: {again} recipients finished earlier are sent again", path.display());
                }
            }
            (done, first_seen, Some(opened.journal))
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
    /// The credit each shard starts with (`max_queued_recipients_per_shard`).
    pub shard_credit: u64,
    /// Recipients of one domain a shard may hold queued (see `Config::domain_queue_bound`).
    pub domain_bound: u64,
    pub spread_domains: Vec<String>,
    /// Every recipient's copy differs (a List-Unsubscribe per recipient):
    /// each goes in a transaction of its own.
    pub per_recipient: bool,
}

impl IngestLimits {
    pub fn of(cfg: &Config) -> IngestLimits {
        IngestLimits {
            max_rcpts_per_txn: cfg.max_rcpts_per_txn,
            max_line_bytes: cfg.max_job_line_bytes,
            max_message_bytes: cfg.max_message_bytes,
            shard_credit: cfg.max_queued_recipients_per_shard as u64,
            domain_bound: cfg.domain_queue_bound(),
            spread_domains: cfg.spread_domains.clone(),
            per_recipient: cfg.headers.per_recipient() || cfg.verp.is_some(),
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

/// A hasher for keys that are hashes already (domain hashes).
#[derive(Default)]
struct Prehashed(u64);

impl Hasher for Prehashed {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 << 8) ^ u64::from(b);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

/// A lower-cased domain's key in ingest's per-domain counts.
fn domain_hash(domain: &str) -> u64 {
    fnv1a(domain)
}

fn fnv1a(s: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in s.bytes() {
        h ^= u64::from(b.to_ascii_lowercase());
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// The shard that owns `domain`: FNV-1a of its lower-cased bytes, stable
/// across runs and platforms.
pub fn shard_of(domain: &str, shards: usize) -> usize {
    shard_of_hash(fnv1a(domain), shards)
}

/// [`shard_of`] for a domain whose [`domain_hash`] is known.
fn shard_of_hash(hash: u64, shards: usize) -> usize {
    (hash % shards as u64) as usize
}

/// A message file mapped (while anything uses it), or why it cannot be.
type KnownMessage = Result<Weak<MessageFile>, String>;
/// The last message file asked for: its id and the file, or why it cannot be used.
type LastMessage = Result<(u32, Weak<MessageFile>), String>;

pub struct Ingest {
    shards: Vec<Sender<ToShard>>,
    reports: Sender<Report>,
    credits: Receiver<Credit>,
    limits: IngestLimits,
    /// Per shard: the running total of recipients it allows (its room is
    /// that less `sent`; below zero after a line that took more than was
    /// left), and the domains it says are full.
    allowed: Vec<u64>,
    /// Per shard: since when it has had no room (while it has none).
    starved_since: Vec<Option<Instant>>,
    full: Vec<HashSet<Box<str>>>,
    /// Per shard: recipients sent that it has not taken from its inbox yet,
    /// per domain (by hash), and the groups they went in (running total of
    /// recipients sent to the shard, domain hash, count), oldest first. A
    /// domain with `domain_bound` of them is full before the shard can say
    /// so: ingest reads far faster than a shard takes work.
    unconfirmed: Vec<std::collections::HashMap<u64, u64, BuildHasherDefault<Prehashed>>>,
    in_inbox: Vec<VecDeque<(u64, u64, u64)>>,
    sent: Vec<u64>,
    spread: Spread,
    /// The lead's decision per lane for the line it reads (kept to reuse its allocation).
    decided: Vec<(LaneKey, bool)>,
    batches: Vec<Vec<WorkItem>>,
    /// The message files each shard's next batch refers to.
    batch_messages: Vec<Vec<Arc<MessageFile>>>,
    /// Recipients in each shard's next batch.
    batch_rcpts: Vec<usize>,
    /// Message files by (spool file, path), while some work uses them (or
    /// why they cannot be used). Per spool file, so a message file replaced
    /// later under the same name is read anew.
    messages: HashMap<(u32, PathBuf), KnownMessage>,
    /// The last message asked for by name (lines in a row mostly name the
    /// same): found again without building and hashing its path.
    last_message: Option<(u32, Box<str>, LastMessage)>,
    /// Reads the job lines (and remembers the last sender found good).
    parser: spool::JobParser,
    budget: Arc<MessageBudget>,
    next_message: u32,
    /// Whether each message file used as a template compiles, by message id.
    templates: HashMap<u32, Result<(), String>>,
    recorder: Recorder,
    recipients: u64,
    bad_lines: u64,
    reported: u64,
    already_final: u64,
    lines_read_again: u64,
}

impl Ingest {
    pub fn new(
        shards: Vec<Sender<ToShard>>,
        credits: Receiver<Credit>,
        reports: Sender<Report>,
        limits: IngestLimits,
        budget: Arc<MessageBudget>,
        log: bool,
    ) -> Ingest {
        let n = shards.len();
        Ingest {
            shards,
            reports,
            credits,
            allowed: vec![limits.shard_credit; n],
            starved_since: vec![None; n],
            full: (0..n).map(|_| HashSet::new()).collect(),
            unconfirmed: (0..n).map(|_| std::collections::HashMap::default()).collect(),
            in_inbox: (0..n).map(|_| VecDeque::new()).collect(),
            sent: vec![0; n],
            spread: Spread::new(n, &limits.spread_domains),
            decided: Vec::new(),
            limits,
            batches: (0..n).map(|_| Vec::with_capacity(BATCH_ITEMS)).collect(),
            batch_messages: (0..n).map(|_| Vec::new()).collect(),
            batch_rcpts: vec![0; n],
            messages: HashMap::new(),
            last_message: None,
            parser: spool::JobParser::default(),
            budget,
            next_message: 0,
            templates: HashMap::new(),
            recorder: Recorder::new(log),
            recipients: 0,
            bad_lines: 0,
            reported: 0,
            already_final: 0,
            lines_read_again: 0,
        }
    }

    /// Reads the files that come through `inputs`, in turns so several
    /// files go out side by side (the first turn of each round goes to each
    /// file in rotation), until the channel is closed and every file is
    /// read. Returns early only if a shard or the collector went away.
    pub fn run(mut self, inputs: Receiver<IngestInput>) -> Result<(), &'static str> {
        let mut open: Vec<Cursor> = Vec::new();
        let mut closed = false;
        let mut first = 0usize;
        loop {
            loop {
                let next = if open.is_empty() && !closed {
                    inputs.recv().map_err(|_| TryRecvError::Disconnected)
                } else {
                    inputs.try_recv()
                };
                match next {
                    Ok(input) => self.take(input, &mut open)?,
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => {
                        closed = true;
                        break;
                    }
                }
            }
            while let Ok(c) = self.credits.try_recv() {
                self.credit(c);
            }
            if open.is_empty() {
                if closed {
                    break;
                }
                continue;
            }
            let mut moved = false;
            let n = open.len();
            for j in 0..n {
                moved |= self.turn(&mut open[(first + j) % n])?;
                let fresh = self.spread.take_fresh();
                for c in &mut open {
                    for d in &fresh {
                        c.spread_from.entry(d.clone()).or_insert(c.lead.pos);
                    }
                }
            }
            if moved {
                // Rotated only when something moved: a round that found no
                // room must not decide who gets the credit that comes next.
                first = first.wrapping_add(1);
            }
            let mut i = 0;
            while i < open.len() {
                if open[i].done() {
                    let c = open.swap_remove(i);
                    self.finish(c)?;
                    moved = true;
                } else {
                    i += 1;
                }
            }
            if !moved {
                // Everything left waits for a shard: what is batched goes now
                // (it may be what they wait for), then wait for credit or a file.
                self.send_all()?;
                self.flush_outcomes()?;
                // The shards gone (stopped, or failed) end ingest too.
                let gone = "the shards stopped";
                let credit = if closed {
                    match self.credits.recv_timeout(IDLE_WAIT) {
                        Ok(c) => Some(c),
                        Err(RecvTimeoutError::Timeout) => None,
                        Err(RecvTimeoutError::Disconnected) => return Err(gone),
                    }
                } else {
                    crossbeam_channel::select! {
                        recv(self.credits) -> c => Some(c.map_err(|_| gone)?),
                        recv(inputs) -> input => {
                            match input {
                                Ok(input) => self.take(input, &mut open)?,
                                Err(_) => closed = true,
                            }
                            None
                        },
                        default(IDLE_WAIT) => None,
                    }
                };
                if let Some(c) = credit {
                    self.credit(c);
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
                lines_read_again: self.lines_read_again,
            })
            .map_err(|_| "the collector stopped")
    }

    fn take(&mut self, input: IngestInput, open: &mut Vec<Cursor>) -> Result<(), &'static str> {
        match input {
            IngestInput::Spool(input) => open.push(self.start(input)?),
            IngestInput::Forget(file) => {
                for tx in &self.shards {
                    tx.send(ToShard::Forget { file }).map_err(|_| "a shard stopped")?;
                }
            }
        }
        Ok(())
    }

    fn credit(&mut self, c: Credit) {
        match c {
            Credit::Room {
                shard,
                allowed,
                received,
            } => {
                if allowed > self.allowed[shard] {
                    self.allowed[shard] = allowed;
                    if self.room(shard) > 0 {
                        self.starved_since[shard] = None;
                    }
                }
                let (queue, unconfirmed) = (&mut self.in_inbox[shard], &mut self.unconfirmed[shard]);
                while let Some(&(upto, domain, n)) = queue.front()
                    && upto <= received
                {
                    queue.pop_front();
                    if let Entry::Occupied(mut e) = unconfirmed.entry(domain) {
                        *e.get_mut() -= n;
                        if *e.get() == 0 {
                            e.remove();
                        }
                    }
                }
            }
            Credit::DomainFull { shard, domain } => {
                self.full[shard].insert(domain);
            }
            Credit::DomainOpen { shard, domain } => {
                self.full[shard].remove(&domain);
            }
        }
    }

    fn is_full(&self, shard: usize, domain: &str) -> bool {
        self.is_full_hashed(shard, domain, domain_hash(domain))
    }

    /// `is_full`, with the domain's hash at hand.
    fn is_full_hashed(&self, shard: usize, domain: &str, hash: u64) -> bool {
        (!self.full[shard].is_empty() && self.full[shard].contains(domain))
            || (!self.unconfirmed[shard].is_empty()
                && self.unconfirmed[shard]
                    .get(&hash)
                    .is_some_and(|&n| n >= self.limits.domain_bound))
    }

    /// Whether the lead may read on. Not while every shard is out of room
    /// (nothing could be sent), nor while a shard has been out of room for
    /// less than PASS_OVER_AFTER: credit usually comes back within
    /// milliseconds, and what the lead passes over must be read twice. A
    /// shard out of room for longer is passed over.
    fn lead_may_read(&self) -> bool {
        let mut any_room = false;
        for k in 0..self.allowed.len() {
            if self.room(k) > 0 {
                any_room = true;
            } else if self.starved_since[k].is_some_and(|t| t.elapsed() < PASS_OVER_AFTER) {
                return false;
            }
        }
        any_room
    }

    /// Recipients shard `k` may still be sent.
    fn room(&self, k: usize) -> i64 {
        self.allowed[k] as i64 - self.sent[k] as i64
    }

    /// Whether what `lane` owns may go to its shard now.
    fn can_send(&self, lane: LaneRef<'_>) -> bool {
        self.room(lane.shard) > 0 && lane.domain.is_none_or(|d| !self.is_full(lane.shard, d))
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
                first_seen: input.first_seen,
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
            lead: spool::LineCursor::default(),
            lanes: Lanes::new(self.shards.len()),
            spread_from: self.spread.all().iter().map(|d| (d.clone(), 0)).collect(),
            lead_skips: 0,
            lead_wakers: Vec::new(),
            bad_lines: HashSet::new(),
            recipients: 0,
            already_final: 0,
        })
    }

    /// One turn of a file: each lane behind that has room reads again, up
    /// to LINES_PER_TURN lines, then the lead reads on. Whether anything moved.
    fn turn(&mut self, c: &mut Cursor) -> Result<bool, &'static str> {
        let file = c.input.file.clone();
        let map = file.bytes();
        let mut moved = false;
        for key in c.lanes.behind() {
            let lane = key.as_ref();
            for _ in 0..LINES_PER_TURN {
                if !self.can_send(lane) {
                    break;
                }
                let Some(mut at) = c.lanes.cursor(lane) else {
                    break;
                };
                let before = at;
                let next = if at.pos < c.lead.pos { at.next_line(map) } else { None };
                let Some((line_no, line)) = next else {
                    c.lanes.caught_up(lane);
                    break;
                };
                self.pass_line(c, Pass::Lane(lane), before, line_no, line)?;
                self.lines_read_again += 1;
                c.lanes.advance(lane, at);
                moved = true;
            }
            if c.lanes.cursor(lane).is_some_and(|at| at.pos >= c.lead.pos) {
                c.lanes.caught_up(lane);
            }
        }
        if c.lead_skips >= LEAD_SKIP_LINES {
            let wake = c.lead_wakers.iter().any(|k| {
                let lane = k.as_ref();
                !c.lanes.exists(lane) || (c.lanes.cursor(lane).is_none() && self.can_send(lane))
            });
            if wake {
                c.lead_skips = 0;
                c.lead_wakers.clear();
            }
        }
        for _ in 0..LINES_PER_TURN {
            if c.lead_skips >= LEAD_SKIP_LINES || !self.lead_may_read() {
                break;
            }
            let before = c.lead;
            let Some((line_no, line)) = c.lead.next_line(map) else {
                break;
            };
            let (r0, a0) = (self.recipients, self.already_final);
            let seen = self.pass_line(c, Pass::Lead, before, line_no, line)?;
            c.recipients += self.recipients - r0;
            c.already_final += self.already_final - a0;
            if seen.sent {
                c.lead_skips = 0;
                c.lead_wakers.clear();
            } else if seen.passed_over {
                c.lead_skips += 1;
            }
            moved = true;
        }
        let this = &*self;
        c.lanes.tidy(|shard, d| this.is_full(shard, d));
        Ok(moved)
    }

    /// A file is read by every lane: everything of it goes out now, and the
    /// collector learns its count.
    fn finish(&mut self, c: Cursor) -> Result<(), &'static str> {
        self.send_all()?;
        let id = c.input.id;
        self.messages.retain(|(spool, _), _| *spool != id);
        if self.last_message.as_ref().is_some_and(|(spool, _, _)| *spool == id) {
            self.last_message = None;
        }
        self.flush_outcomes()?;
        self.reports
            .send(Report::FileRead {
                file: c.input.id,
                recipients: c.recipients,
                already_final: c.already_final,
            })
            .map_err(|_| "the collector stopped")
    }

    /// One line, by one pass: the lead counts it, rejects what is bad, and
    /// sends what has room (passing the rest over to its lanes); a lane sends
    /// what it owns of the line.
    fn pass_line(
        &mut self,
        c: &mut Cursor,
        pass: Pass<'_>,
        at: spool::LineCursor,
        line_no: u32,
        line: &[u8],
    ) -> Result<LineSeen, &'static str> {
        let lead = matches!(pass, Pass::Lead);
        let input = &c.input;
        let fid = input.id;
        let file = &input.file;
        let map = file.bytes();
        let mut seen = LineSeen::default();
        if input.done.contains(line_no, WHOLE_LINE) {
            if lead {
                self.already_final += 1;
            }
            return Ok(seen);
        }
        let parsed = if line.len() > self.limits.max_line_bytes {
            Err(format!(
                "line of {} bytes is longer than max_job_line_bytes ({})",
                line.len(),
                self.limits.max_line_bytes
            ))
        } else {
            self.parser.parse(map, line)
        };
        let job = match parsed {
            Ok(job) => job,
            Err(reason) => {
                if lead {
                    self.bad_lines += 1;
                    let reason = format!("{}:{line_no}: {reason}", file.path().display());
                    self.warn(&reason);
                    let key = RcptKey {
                        file: fid,
                        line: line_no,
                        idx: WHOLE_LINE,
                    };
                    self.recipients += 1;
                    // A line that is JSON with an "id" keeps it in the log (one
                    // over max_job_line_bytes stays unread).
                    let given = (line.len() <= self.limits.max_line_bytes)
                        .then(|| spool::id_of_bad_line(line))
                        .flatten();
                    let id = match &given {
                        Some(id) => JobId::Given(id),
                        None => JobId::Line(&c.name, line_no),
                    };
                    self.reject(key, id, None, &reason);
                    seen.sent = true;
                }
                return Ok(seen);
            }
        };
        let id = match &job.id {
            Some(s) => JobId::Given(s.get(map)),
            None => JobId::Line(&c.name, line_no),
        };
        // Recipients an earlier run already finished are not sent again.
        let pending = || {
            job.to
                .iter()
                .enumerate()
                .filter(|(i, _)| !input.done.contains(line_no, *i as u32))
        };
        let pending_count = if input.done.is_empty() {
            job.to.len()
        } else {
            pending().count()
        };
        if lead {
            self.already_final += (job.to.len() - pending_count) as u64;
        }
        if pending_count == 0 {
            return Ok(seen);
        }
        let groups = self.group(
            input,
            &c.name,
            map,
            line_no,
            &job,
            pending(),
            lead,
            &c.spread_from,
            at.pos,
        );
        // Which groups go now. The lead decides once per lane and line, so a
        // lane that passes a line over owns all of its part of that line.
        let frontier = if lead { at } else { c.lead };
        let mut groups = groups;
        let mut decided = std::mem::take(&mut self.decided);
        decided.clear();
        groups.retain(|g| {
            let full = self.is_full_hashed(g.shard, &g.domain, g.hash);
            let lane = c.lanes.lane_of(g.shard, &g.domain, full, frontier);
            match pass {
                Pass::Lane(own) => lane == own,
                Pass::Lead => match decided.iter().find(|(k, _)| k.as_ref() == lane) {
                    Some((_, go)) => *go,
                    None => {
                        let go = c.lanes.cursor(lane).is_none() && self.can_send(lane);
                        if !go {
                            if c.lanes.pass_over(lane, at) {
                                tracing::debug!(
                                    "{}:{line_no}: shard {}{} has no room; reading on, and coming back for it",
                                    c.name,
                                    lane.shard,
                                    lane.domain.map(|d| format!(", domain {d},")).unwrap_or_default()
                                );
                            }
                            seen.passed_over = true;
                            if c.lead_wakers.len() < LEAD_WAKERS && !c.lead_wakers.iter().any(|k| k.as_ref() == lane) {
                                c.lead_wakers.push(lane.to_key());
                            }
                        }
                        decided.push((lane.to_key(), go));
                        go
                    }
                },
            }
        });
        self.decided = decided;
        let chosen = groups;
        if chosen.is_empty() {
            return Ok(seen);
        }
        seen.sent = true;
        let key = |idx: u32| RcptKey {
            file: fid,
            line: line_no,
            idx,
        };
        let body = match &job.body {
            JobBody::Inline(s) => Ok((BodyKey::Inline(s.clone()), None)),
            JobBody::File(s) => match self.batched_message(fid, s.get(map), &chosen) {
                // Every batch this line goes to holds it already (and a
                // template is checked on the way below, which needs it).
                Some(id) if job.personal.is_none() => Ok((BodyKey::File(id), None)),
                _ => self
                    .message(fid, &input.origin, s.get(map))?
                    .map(|m| (BodyKey::File(m.id), Some(m))),
            },
        };
        // A template that does not compile rejects the job (FILE:LINE and why).
        let body = match body {
            Ok((b, m)) if job.personal.is_some() => match self.template_ok(&b, m.as_ref(), map) {
                Ok(()) => Ok((b, m)),
                Err(e) => Err(e),
            },
            other => other,
        };
        let body = match (&job.verp, body) {
            (Some(v), Ok(b)) => crate::template::check(v.get(map))
                .map(|()| b)
                .map_err(|e| format!("\"verp\": template: {e}")),
            (_, other) => other,
        };
        let body = match (&job.list_unsubscribe, body) {
            (Some(v), Ok(b)) => crate::template::check(v.get(map))
                .map(|()| b)
                .map_err(|e| format!("\"list_unsubscribe\": template: {e}")),
            (_, other) => other,
        };
        let (body, message) = match body {
            Ok(b) => b,
            Err(reason) => {
                let reason = format!("{}:{line_no}: {reason}", file.path().display());
                if c.bad_lines.insert(line_no) {
                    self.warn(&reason);
                    self.bad_lines += 1;
                }
                for g in &chosen {
                    for r in &g.rcpts {
                        self.reject(key(r.idx), id, Some(r.addr.get(map)), &reason);
                    }
                }
                return Ok(seen);
            }
        };
        for g in chosen {
            let (shard, n) = (g.shard, g.rcpts.len());
            if let Some(m) = &message
                && !self.batch_messages[shard].iter().any(|b| b.id == m.id)
            {
                self.batch_messages[shard].push(m.clone());
            }
            self.batches[shard].push(WorkItem {
                file: fid,
                line: line_no,
                off: (line.as_ptr() as usize - map.as_ptr() as usize) as u64,
                id: job.id.clone(),
                from: job.from.clone(),
                body: body.clone(),
                rcpts: g.rcpts,
                first_seen: input.first_seen,
                personal: job.personal.as_ref().map(|p| p.vars.clone()),
                verp: job.verp.clone(),
                list_unsubscribe: job.list_unsubscribe.clone(),
            });
            self.sent[shard] += n as u64;
            if self.room(shard) <= 0 && self.starved_since[shard].is_none() {
                self.starved_since[shard] = Some(Instant::now());
            }
            self.in_inbox[shard].push_back((self.sent[shard], g.hash, n as u64));
            *self.unconfirmed[shard].entry(g.hash).or_default() += n as u64;
            self.batch_rcpts[shard] += n;
            if self.batches[shard].len() >= BATCH_ITEMS || self.batch_rcpts[shard] >= BATCH_RCPTS {
                self.send_batch(shard)?;
            }
        }
        if self.recorder.pending_bytes() > 64 * 1024 {
            self.flush_outcomes()?;
        }
        Ok(seen)
    }

    /// Splits a job's pending recipients into transactions: up to
    /// max_rcpts_per_txn recipients of one domain for one shard. On the
    /// lead, recipients are counted and bad or duplicate ones rejected; a
    /// lane reading the line again passes those over silently.
    #[allow(clippy::too_many_arguments)]
    fn group<'m>(
        &mut self,
        input: &SpoolInput,
        name: &str,
        map: &'m [u8],
        line: u32,
        job: &'m spool::Job,
        pending: impl Iterator<Item = (usize, &'m Span)>,
        lead: bool,
        spread_from: &HashMap<Box<str>, usize>,
        line_pos: usize,
    ) -> SmallVec<[Group<'m>; 1]> {
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
        let shards = self.shards.len();
        // A mailbox named twice in one job is sent once: the domain is
        // case-insensitive, the local part is compared as written (RFC 5321 §2.4).
        // (Made only for a job of more than one recipient: a map's hasher
        // seed costs something, and most jobs have one.)
        let mut first_of: Option<HashMap<Mailbox<'_>, usize>> = None;
        // For a long list, the open transaction per (domain, shard) (a scan
        // of the groups would be quadratic).
        let mut groups: SmallVec<[Group<'m>; 1]> = SmallVec::new();
        let mut open: Option<HashMap<(Cow<'m, str>, usize), usize>> = None;
        let indexed = job.to.len() > INDEX_GROUPS_OVER;
        let max = self.limits.max_rcpts_per_txn;
        for (i, rcpt) in pending {
            let addr = rcpt.get(map);
            let domain = match spool::address_domain(addr) {
                Ok(d) => d,
                Err(why) => {
                    if lead {
                        let reason = format!("{}:{line}: bad recipient {addr:?}: {why}", file.path().display());
                        self.warn(&reason);
                        self.recipients += 1;
                        self.reject(key(i), id, Some(addr), &reason);
                    }
                    continue;
                }
            };
            if job.to.len() > 1 {
                match first_of.get_or_insert_with(HashMap::new).entry(Mailbox(addr)) {
                    Entry::Occupied(first) => {
                        if lead {
                            let reason = format!(
                                "{}:{line}: duplicate recipient {addr:?}: the same mailbox as to[{}], which is sent once",
                                file.path().display(),
                                first.get()
                            );
                            self.warn(&reason);
                            self.recipients += 1;
                            self.reject(key(i), id, Some(addr), &reason);
                        }
                        continue;
                    }
                    Entry::Vacant(v) => {
                        v.insert(i);
                    }
                }
            }
            let domain: Cow<'m, str> = if domain.bytes().any(|b| b.is_ascii_uppercase()) {
                Cow::Owned(domain.to_ascii_lowercase())
            } else {
                Cow::Borrowed(domain)
            };
            if lead {
                self.recipients += 1;
                self.spread.observe(&domain);
            }
            let spread = !spread_from.is_empty() && spread_from.get(&*domain).is_some_and(|&from| from <= line_pos);
            // The domain's hash places it (unless it is spread) and keys its counts.
            let hash = domain_hash(&domain);
            let shard = if spread {
                spread::shard_of_rcpt(addr, shards)
            } else {
                shard_of_hash(hash, shards)
            };
            let r = Rcpt::of(job, i);
            // A personalised recipient (or one with its own sender) gets a transaction of its own.
            let alone = job.personal.is_some()
                || job.verp.is_some()
                || job.list_unsubscribe.is_some()
                || self.limits.per_recipient;
            let slot = if alone {
                None
            } else if indexed {
                open.as_ref()
                    .and_then(|o| o.get(&(Cow::Borrowed(&*domain), shard)).copied())
            } else {
                groups
                    .iter()
                    .position(|g| g.shard == shard && g.domain == domain && g.rcpts.len() < max)
            };
            match slot {
                Some(g) if groups[g].rcpts.len() < max => groups[g].rcpts.push(r),
                _ => {
                    if indexed && !alone {
                        open.get_or_insert_with(HashMap::new)
                            .insert((domain.clone(), shard), groups.len());
                    }
                    groups.push(Group {
                        shard,
                        hash,
                        domain,
                        rcpts: smallvec::smallvec![r],
                    });
                }
            }
        }
        groups
    }

    /// Whether a personalised job's message compiles as a template (a
    /// message file's answer is kept while it is mapped).
    fn template_ok(&mut self, body: &BodyKey, message: Option<&Arc<MessageFile>>, map: &[u8]) -> Result<(), String> {
        let check = |src: &[u8]| -> Result<(), String> {
            let text = std::str::from_utf8(src).map_err(|e| format!("the template is not UTF-8 ({e})"))?;
            crate::template::check(text).map_err(|e| format!("template: {e}"))
        };
        match (body, message) {
            (BodyKey::Inline(span), _) => check(span.get(map).as_bytes()),
            (BodyKey::File(id), Some(m)) => {
                if let Some(known) = self.templates.get(id) {
                    return known.clone();
                }
                let answer = check(m.file.bytes());
                if self.templates.len() >= MAX_TEMPLATE_ANSWERS {
                    self.templates.clear();
                }
                self.templates.insert(*id, answer.clone());
                answer
            }
            (BodyKey::File(_), None) => Ok(()),
        }
    }

    /// The id of the message file `name` of spool file `spool` when it is
    /// the last one asked for and each of `groups`' shards' next batch
    /// already carries it (the usual line: the message the lines before
    /// named). Such a batch keeps the file alive, so nothing is counted or
    /// looked up: a line costs no reference count taken and dropped again.
    fn batched_message(&self, spool: u32, name: &str, groups: &[Group<'_>]) -> Option<u32> {
        let (s, n, known) = self.last_message.as_ref()?;
        let id = known.as_ref().ok()?.0;
        (*s == spool
            && **n == *name
            && groups
                .iter()
                .all(|g| self.batch_messages[g.shard].iter().any(|m| m.id == id)))
        .then_some(id)
    }

    /// A message file, mapped on first sight (and again once nothing uses
    /// it any more), within the budget of message files in use.
    fn message(
        &mut self,
        spool: u32,
        origin: &std::path::Path,
        name: &str,
    ) -> Result<Result<Arc<MessageFile>, String>, &'static str> {
        if let Some((s, n, known)) = &self.last_message
            && *s == spool
            && **n == *name
        {
            match known {
                Ok((_, m)) => {
                    if let Some(m) = m.upgrade() {
                        return Ok(Ok(m));
                    }
                }
                Err(e) => return Ok(Err(e.clone())),
            }
        }
        let found = self.message_by_path(spool, origin, name)?;
        self.last_message = Some((
            spool,
            name.into(),
            found.as_ref().map(|m| (m.id, Arc::downgrade(m))).map_err(Clone::clone),
        ));
        Ok(found)
    }

    fn message_by_path(
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

    /// Records a recipient as rejected (the caller has counted it, on the lead).
    fn reject(&mut self, key: RcptKey, id: JobId<'_>, rcpt: Option<&str>, reason: &str) {
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
                rule: None,
                local: None,
                plain: false,
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
