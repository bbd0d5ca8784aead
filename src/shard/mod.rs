//! A shard: one glommio executor pinned to a core. It owns the domains that
//! hash to it and its part of the spread ones (their queues, destinations,
//! connections and retry timers) and touches nothing else. It talks to other
//! threads only through its inbox (batches of work in), credit back to
//! ingest, its control channel, outcome batches out, and the connection
//! board (`budget.rs`, at connection open and close, never per message), so
//! nothing on the per-message path is locked or shared between cores.
//!
//! Every decision is the core's (`core/`, no I/O, `now` passed in); this
//! file and `conn.rs` are the glommio layer that carries its actions out:
//! they take work from the inbox, look domains up, open and drive
//! connections, keep the time and hand outcomes to the collector.

pub mod budget;
mod conn;
mod core;
mod intake;

pub use self::core::{COMMIT_PENDING_PER_SHARD, MAX_UNRECORDED_PER_SHARD};
pub use budget::Budgets;

use foldhash::HashMap;
use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::rc::{Rc, Weak};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering as AtomicOrdering};
use std::time::{Duration, Instant, SystemTime};

use crossbeam_channel::{Receiver, Sender, TryRecvError, TrySendError};
use event_listener::Event;
use glommio::ExecutorJoinHandle;

use self::core::{Action, Core, CoreParams, Job};
use crate::classify::Classifier;
use crate::collector::Report;
use crate::config::{Config, Routes};
use crate::dns::Net;
use crate::ingest::{BodyKey, Credit, Rcpt, Rcpts, ToShard, WorkItem};
use crate::messages::MessageFile;
use crate::metrics::export::ShardLink;
use crate::outcome::{JobId, OutcomeBatch, RcptKey};
use crate::smtp::{Enhanced, WireMessage};
use crate::spool::{MappedFile, Span};
use crate::tls::TlsClient;

/// How often a shard hands its outcomes to the collector (short: an outcome
/// not yet journaled is a possible duplicate after a crash).
const FLUSH_INTERVAL: Duration = Duration::from_millis(2);
/// Log bytes after which a shard flushes early.
const FLUSH_BYTES: usize = 256 * 1024;
/// Inbox messages taken before the shard lets its connections run.
const INBOX_CHUNK: usize = 16;
/// Longest line SMTP allows, CRLF excluded.
const MAX_LINE_OCTETS: usize = 998;
/// Inbox polling period while work arrives, and once the shard has been idle a while.
const BUSY_POLL: Duration = Duration::from_millis(1);
const IDLE_POLL: Duration = Duration::from_millis(20);
/// How often a shard held back by the collector looks again.
const HELD_POLL: Duration = Duration::from_micros(100);
/// How often a stopping shard looks whether its connections have closed.
const STOP_POLL: Duration = Duration::from_millis(1);
/// Prepared messages added between sweeps of the unused ones.
const SWEEP_EVERY: usize = 4096;
/// Compiled templates a shard keeps (then it forgets them all and compiles again).
const MAX_COMPILED_TEMPLATES: usize = 1024;

pub enum Control {
    /// Every recipient is final: close connections with QUIT and return.
    Stop,
}

pub struct ShardParams {
    pub index: usize,
    pub shards: usize,
    pub cfg: Arc<Config>,
    pub routes: Arc<Routes>,
    /// The resolver; `None` when every domain has a route.
    pub net: Option<Net>,
    pub tls: TlsClient,
    pub classifier: Arc<Classifier>,
    pub ehlo_name: String,
    pub log: bool,
    pub inbox: Receiver<ToShard>,
    /// Credit back to ingest (room for more recipients, full domains).
    pub credits: Sender<Credit>,
    pub control: Receiver<Control>,
    pub reports: Sender<Report>,
    /// Dropped when the shard ends, however it ends.
    pub alive: Sender<()>,
    /// The link to the metrics exporter; without one the shard counts nothing.
    pub metrics: Option<ShardLink>,
    /// Outcome records of this shard the collector has written (it adds to it).
    pub recorded: Arc<AtomicU64>,
    /// Connection budgets, shared by the shards.
    pub budgets: Arc<Budgets>,
    /// Traffic shaping: the policies destinations get.
    pub shaping: Arc<crate::shaping::Shaping>,
    /// DKIM keys.
    pub signers: Arc<crate::dkim::Signers>,
}

pub fn spawn(p: ShardParams) -> std::io::Result<ExecutorJoinHandle<()>> {
    crate::runtime::spawn_pinned("volley-shard", p.index, move || run(p))
}

struct LocalFile {
    id: u32,
    file: Arc<MappedFile>,
    name: String,
    first_seen: Instant,
}

/// A job's recipients of one domain, as the spool gave them: spans into
/// the mapped spool file, and its message prepared for the wire.
pub(crate) struct SpoolJobData {
    file: Rc<LocalFile>,
    line: u32,
    /// Where its line starts in the spool file.
    off: u64,
    id: Option<Span>,
    from: Span,
    body: Rc<Body>,
    rcpts: Rcpts,
    /// Spool v2: the message is a template, rendered per recipient.
    personal: Option<Rc<Personal>>,
    /// The copy rendered for this attempt (dropped when it waits for a retry).
    rendered: Option<Rc<Body>>,
    /// The template of the recipient's envelope sender (VERP), and what it rendered.
    verp: Option<Rc<Span>>,
    reverse: Option<Box<str>>,
}

/// A spool job, boxed: a transaction moves by value a dozen times between
/// ingest's batch, its destination's queue, a connection and its report,
/// and a pointer moves cheaper than the job's fields.
pub(crate) struct SpoolJob(Box<SpoolJobData>);

impl SpoolJob {
    fn new(data: SpoolJobData) -> SpoolJob {
        SpoolJob(Box::new(data))
    }
}

impl std::ops::Deref for SpoolJob {
    type Target = SpoolJobData;
    fn deref(&self) -> &SpoolJobData {
        &self.0
    }
}

impl std::ops::DerefMut for SpoolJob {
    fn deref_mut(&mut self) -> &mut SpoolJobData {
        &mut self.0
    }
}

/// A job whose every recipient gets a copy of its own: a template with its
/// variables (spool v2), or a List-Unsubscribe per recipient.
pub(crate) struct Personal {
    /// The message is a template.
    template: bool,
    /// The job's variables (JSON object text in the spool file).
    vars: Option<Span>,
    /// An inline message (`data`), in the spool file; else the message file's text.
    inline: Option<Span>,
    /// The job's own List-Unsubscribe (a template), over the configuration's.
    list_unsubscribe: Option<Span>,
}

impl Job for SpoolJob {
    fn rcpt_count(&self) -> usize {
        self.rcpts.len()
    }
    fn rcpt(&self, i: usize) -> &str {
        self.rcpts[i].addr.get(self.file.file.bytes())
    }
    fn plain_text(&self, i: usize) -> bool {
        // Borrowed from the line: neither escaped nor rendered.
        let in_line = |s: &Span| matches!(s, Span::Map { .. });
        self.id.as_ref().is_none_or(in_line) && in_line(&self.rcpts[i].addr)
    }
    fn rcpt_is_ascii(&self, i: usize) -> bool {
        self.rcpts[i].addr.is_ascii(self.file.file.bytes())
    }
    fn reverse_path(&self) -> &str {
        match &self.reverse {
            Some(r) => r,
            None => self.from.get(self.file.file.bytes()),
        }
    }
    fn message(&self) -> &WireMessage {
        &self.rendered.as_ref().unwrap_or(&self.body).wire
    }
    fn seven_bit(&self) -> Result<&WireMessage, &str> {
        match &self.rendered.as_ref().unwrap_or(&self.body).seven_bit {
            Some(Ok(w)) => Ok(w),
            Some(Err(why)) => Err(why),
            None if self.message().eight_bit => Err("no 7-bit form was made for it"),
            None => Err("it is 7-bit already"),
        }
    }
    fn key(&self, i: usize) -> RcptKey {
        RcptKey {
            file: self.file.id,
            line: self.line,
            idx: self.rcpts[i].idx,
        }
    }
    fn id(&self) -> JobId<'_> {
        match &self.id {
            Some(s) => JobId::Given(s.get(self.file.file.bytes())),
            None => JobId::Line(&self.file.name, self.line),
        }
    }
    fn keep(&mut self, keep: &[usize]) {
        self.rcpts = keep.iter().map(|&i| self.rcpts[i].clone()).collect();
    }
    fn split_off(&mut self, at: usize) -> SpoolJob {
        SpoolJob::new(SpoolJobData {
            file: self.file.clone(),
            line: self.line,
            off: self.off,
            id: self.id.clone(),
            from: self.from.clone(),
            body: self.body.clone(),
            rcpts: self.rcpts.drain(at..).collect(),
            personal: self.personal.clone(),
            rendered: None,
            verp: self.verp.clone(),
            reverse: None,
        })
    }
    fn take(&mut self, which: &[usize]) -> SpoolJob {
        let all = std::mem::take(&mut self.rcpts);
        let (taken, kept): (Vec<_>, Vec<_>) = all.into_iter().enumerate().partition(|(i, _)| which.contains(i));
        self.rcpts = kept.into_iter().map(|(_, r)| r).collect();
        SpoolJob::new(SpoolJobData {
            file: self.file.clone(),
            line: self.line,
            off: self.off,
            id: self.id.clone(),
            from: self.from.clone(),
            body: self.body.clone(),
            rcpts: taken.into_iter().map(|(_, r)| r).collect(),
            personal: self.personal.clone(),
            rendered: None,
            verp: self.verp.clone(),
            reverse: None,
        })
    }
    fn release(&mut self) {
        self.rendered = None;
    }

    type Parked = ParkedRcpt;

    fn park(self, first_seen: Instant, out: &mut dyn FnMut(ParkedRcpt)) {
        debug_assert_eq!(
            first_seen, self.file.first_seen,
            "a spool job's first_seen is its file's"
        );
        let off = self.off | if self.personal.is_some() { PER_RCPT } else { 0 };
        for r in &self.rcpts {
            out(ParkedRcpt {
                file: self.file.clone(),
                body: self.body.clone(),
                off,
                line: self.line,
                idx: r.idx,
            });
        }
    }

    fn unpark(parked: Vec<ParkedRcpt>) -> SpoolJob {
        let p = &parked[0];
        let map = p.file.file.bytes();
        let off = p.off & !PER_RCPT;
        let line = crate::spool::LineCursor::line_at(map, off as usize);
        // The line parsed when it was read; the spool file is not changed under a sender.
        let job = crate::spool::parse_job(map, line).expect("a waiting job's line parses as it did");
        let rcpts = parked.iter().map(|r| Rcpt::of(&job, r.idx as usize)).collect();
        let personal = (p.off & PER_RCPT != 0).then(|| {
            Rc::new(Personal {
                template: job.personal.is_some(),
                vars: job.personal.as_ref().and_then(|v| v.vars.clone()),
                inline: match &job.body {
                    crate::spool::JobBody::Inline(span) => Some(span.clone()),
                    crate::spool::JobBody::File(_) => None,
                },
                list_unsubscribe: job.list_unsubscribe.clone(),
            })
        });
        let (line_no, body) = (p.line, p.body.clone());
        let file = parked.into_iter().next().expect("one parked recipient at least").file;
        SpoolJob::new(SpoolJobData {
            file,
            line: line_no,
            off,
            id: job.id,
            from: job.from,
            body,
            rcpts,
            personal,
            rendered: None,
            verp: job.verp.map(Rc::new),
            reverse: None,
        })
    }
}

/// The top bit of a parked recipient's line offset: its job is sent a copy
/// per recipient (a template, or a List-Unsubscribe of its own).
const PER_RCPT: u64 = 1 << 63;

/// One recipient of a spool job waiting for a retry: where its line is
/// (parsed again when it is due) and the message prepared for it.
pub(crate) struct ParkedRcpt {
    file: Rc<LocalFile>,
    body: Rc<Body>,
    off: u64,
    line: u32,
    idx: u32,
}

impl self::core::Parked for ParkedRcpt {
    fn first_seen(&self) -> Instant {
        self.file.first_seen
    }
    fn same_job(&self, o: &Self) -> bool {
        Rc::ptr_eq(&self.file, &o.file) && self.line == o.line && Rc::ptr_eq(&self.body, &o.body)
    }
}

/// A VERP job's envelope sender for its one recipient, rendered and
/// checked: from the job's `verp`, else the configuration's.
fn verp_of(job: &SpoolJob, configured: Option<&str>) -> Result<Option<String>, String> {
    let map = job.file.file.bytes();
    let (template, what) = match (&job.verp, configured) {
        (Some(span), _) => (span.get(map), "\"verp\""),
        (None, Some(t)) => (t, "verp (the configuration's)"),
        (None, None) => return Ok(None),
    };
    let at = format!("{}:{}", job.file.name, job.line);
    let id = match &job.id {
        Some(s) => s.get(map).to_string(),
        None => at.clone(),
    };
    let ctx = crate::template::Context {
        rcpt: job.rcpts[0].addr.get(map),
        from: job.from.get(map),
        id: &id,
        job_vars: job.personal.as_ref().and_then(|p| p.vars.as_ref()).map(|s| s.get(map)),
        rcpt_vars: job.rcpts[0].vars.as_ref().map(|s| s.get(map)),
    };
    let from = crate::template::render(template, &ctx).map_err(|e| format!("{at}: {what}: template: {e}"))?;
    let from = from.trim().to_string();
    crate::spool::validate_address(&from)
        .map_err(|why| format!("{at}: {what} made the sender {from:?}, which {why}"))?;
    Ok(Some(from))
}

pub(crate) type Txn = self::core::Txn<SpoolJob>;
pub(crate) type Dest = self::core::Dest<SpoolJob>;
type Domain = self::core::Domain<SpoolJob>;

/// A message prepared for the wire, and the message file it came from
/// (kept mapped, and counted in the budget, while the copy is in use).
pub(crate) struct Body {
    wire: WireMessage,
    /// For an 8-bit message: its 7-bit form (signed too), or why it has none.
    seven_bit: Option<Result<WireMessage, String>>,
    /// Why it cannot be sent (a DKIM signature that could not be made).
    refused: Option<String>,
    _file: Option<Arc<MessageFile>>,
}

/// DKIM signatures a shard made, for the metrics.
#[derive(Default)]
struct DkimCounts {
    /// By signing domain and algorithm.
    signed: BTreeMap<(String, &'static str), u64>,
    /// Messages prepared with no key for their From: domain (while some domain has keys).
    unsigned: u64,
    /// Messages whose signature could not be made (refused).
    failed: u64,
}

impl Body {
    /// A template's stand-in: nothing to send until a recipient's copy is rendered.
    fn template(file: Option<Arc<MessageFile>>) -> Body {
        Body {
            wire: WireMessage::prepare(b""),
            seven_bit: None,
            refused: None,
            _file: file,
        }
    }

    /// `src` prepared for the wire, and DKIM-signed when its From: domain has keys.
    fn new(
        src: &[u8],
        signers: &crate::dkim::Signers,
        counts: &RefCell<DkimCounts>,
        adding: &crate::headers::Adding<'_>,
        file: Option<Arc<MessageFile>>,
        seven_bit_wanted: bool,
        memo: Option<&mut crate::dkim::Memo>,
    ) -> Body {
        let added = crate::headers::add(src, adding);
        let wire = WireMessage::prepare(added.as_deref().unwrap_or(src));
        let seven_bit = (wire.eight_bit && seven_bit_wanted).then(|| {
            let mut plain = Vec::with_capacity(wire.chunk_len());
            wire.write_chunk(&mut plain);
            crate::downgrade::to_7bit(&plain).map(|m| WireMessage::prepare(&m))
        });
        if signers.is_empty() {
            return Body {
                wire,
                seven_bit,
                refused: None,
                _file: file,
            };
        }
        let mut c = counts.borrow_mut();
        // Signed after the conversion: the 7-bit form has its own signature.
        let seven_bit = seven_bit.map(|r| {
            r.and_then(|w| match signers.sign(&w, None) {
                Ok(crate::dkim::Signed::Signed {
                    wire,
                    domain,
                    algorithms,
                }) => {
                    for a in algorithms {
                        *c.signed.entry((domain.clone(), a)).or_default() += 1;
                    }
                    Ok(wire)
                }
                Ok(crate::dkim::Signed::Unsigned) => Ok(w),
                Err(e) => Err(e),
            })
        });
        let (wire, refused) = match signers.sign(&wire, memo) {
            Ok(crate::dkim::Signed::Signed {
                wire: signed,
                domain,
                algorithms,
            }) => {
                for a in algorithms {
                    *c.signed.entry((domain.clone(), a)).or_default() += 1;
                }
                (signed, None)
            }
            Ok(crate::dkim::Signed::Unsigned) => {
                c.unsigned += 1;
                (wire, None)
            }
            Err(e) => {
                c.failed += 1;
                (wire, Some(e))
            }
        };
        Body {
            wire,
            seven_bit,
            refused,
            _file: file,
        }
    }
}

/// The glommio layer around the core.
pub(crate) struct Shard {
    core: RefCell<Core<SpoolJob>>,
    cfg: Arc<Config>,
    signers: Arc<crate::dkim::Signers>,
    dkim: RefCell<DkimCounts>,
    /// Message files' templates, compiled once, by message id.
    templates: RefCell<HashMap<u32, Rc<crate::template::Compiled>>>,
    /// What signing the copies of a personalised message file keeps from one to the next.
    memos: RefCell<HashMap<u32, crate::dkim::Memo>>,
    net: Option<Net>,
    tls: TlsClient,
    ehlo_name: String,
    files: RefCell<HashMap<u32, Rc<LocalFile>>>,
    prepared: RefCell<HashMap<u32, Weak<Body>>>,
    prepared_inserts: Cell<usize>,
    /// Idle connections waiting for `held_back()` to clear, and what wakes them.
    held_waiters: Cell<usize>,
    caught_up: Event,
    /// When the timer task wakes next, and what wakes it earlier (the core's
    /// next timeout moved before it).
    timer_at: Cell<Instant>,
    timer_moved: Event,
}

/// The spool file and prepared message the last item of a batch used: the
/// items of a batch mostly share both, found then without a lookup.
#[derive(Default)]
struct LastUsed {
    file: Option<Rc<LocalFile>>,
    body: Option<(u32, Rc<Body>)>,
}

thread_local! {
    /// The shard's end of the liveness channel. Held by the thread, not by the
    /// executor's tasks: a panic unwinds the thread without dropping the tasks
    /// that glommio still holds, and the collector must see the shard gone.
    static ALIVE: RefCell<Option<Sender<()>>> = const { RefCell::new(None) };
}

async fn run(p: ShardParams) {
    ALIVE.with(|a| *a.borrow_mut() = Some(p.alive));
    let core = Core::new(
        CoreParams {
            index: p.index,
            cfg: p.cfg.clone(),
            routes: p.routes.clone(),
            resolver: p.net.is_some(),
            classifier: p.classifier.clone(),
            budgets: p.budgets.clone(),
            shaping: p.shaping.clone(),
            log: p.log,
            metrics: p.metrics.is_some(),
        },
        Instant::now(),
        SystemTime::now(),
    );
    let shard = Rc::new(Shard {
        core: RefCell::new(core),
        cfg: p.cfg.clone(),
        signers: p.signers.clone(),
        dkim: RefCell::default(),
        templates: RefCell::default(),
        memos: RefCell::default(),
        net: p.net.clone(),
        tls: p.tls.clone(),
        ehlo_name: p.ehlo_name.clone(),
        files: RefCell::default(),
        prepared: RefCell::default(),
        prepared_inserts: Cell::new(0),
        held_waiters: Cell::new(0),
        caught_up: Event::new(),
        timer_at: Cell::new(Instant::now()),
        timer_moved: Event::new(),
    });
    let timer_task = glommio::spawn_local(timers(shard.clone()));
    let mut unsent: Option<OutcomeBatch> = None;
    let mut credits = Vec::new();
    let mut last_flush = Instant::now();
    let mut idle_rounds = 0u32;
    loop {
        match p.control.try_recv() {
            Ok(Control::Stop) | Err(TryRecvError::Disconnected) => break,
            Err(TryRecvError::Empty) => {}
        }
        let now = Instant::now();
        shard.with(|c| c.turn(now, SystemTime::now()));
        let mut taken = 0;
        // While the collector is behind, no new work either: the shard goes
        // at the pace its outcomes can be recorded.
        while taken < INBOX_CHUNK && shard.core.borrow().has_room() && !shard.held_back() {
            match p.inbox.try_recv() {
                Ok(msg) => {
                    shard.accept(msg);
                    taken += 1;
                }
                Err(_) => break,
            }
        }
        let now = Instant::now();
        if let Some(link) = &p.metrics {
            shard.core.borrow_mut().metrics.tick(now);
            while let Ok(req) = link.requests.try_recv() {
                let mut snap = shard.core.borrow().snapshot(req.full, now);
                let d = shard.dkim.borrow();
                snap.dkim_signatures = d.signed.iter().map(|(k, n)| (k.clone(), *n)).collect();
                snap.dkim_unsigned = d.unsigned;
                snap.dkim_failed = d.failed;
                let _ = req.reply.send(snap);
            }
        }
        let flush_due = now.duration_since(last_flush) >= FLUSH_INTERVAL;
        if flush_due || shard.core.borrow().pending_bytes() > FLUSH_BYTES {
            shard.flush(&p.reports, &mut unsent);
            last_flush = now;
        }
        let recorded = p.recorded.load(AtomicOrdering::Relaxed);
        shard.with(|c| {
            c.collector(unsent.is_some(), recorded);
            c.credits(flush_due, &mut credits);
        });
        for credit in credits.drain(..) {
            let _ = p.credits.send(credit);
        }
        if shard.held_waiters.get() > 0 && !shard.core.borrow().held_back() {
            shard.caught_up.notify(usize::MAX);
        }
        if taken == 0 {
            // Poll the inbox every millisecond while work flows, every 20 once
            // idle for a while; held back, look for the collector's credit
            // sooner (the connections may have nothing left to send).
            idle_rounds += 1;
            let nap = if shard.held_back() {
                HELD_POLL
            } else if idle_rounds > 1000 {
                IDLE_POLL
            } else {
                BUSY_POLL
            };
            glommio::timer::sleep(nap).await;
        } else {
            idle_rounds = 0;
            futures_lite::future::yield_now().await;
        }
    }
    shard.caught_up.notify(usize::MAX);
    shard.with(|c| c.stop());
    // Transactions in flight finish and connections say QUIT, within shutdown_timeout.
    let deadline = Instant::now() + shard.cfg.shutdown_timeout;
    while shard.core.borrow().connections_open() > 0 && Instant::now() < deadline {
        // A QUIT is answered within a round trip: look again soon.
        glommio::timer::sleep(STOP_POLL).await;
    }
    timer_task.cancel().await;
    if let Some(link) = &p.metrics {
        // Counters must not go back when the shard is gone: leave the last snapshot behind.
        let last = shard.core.borrow().snapshot(true, Instant::now());
        *link.last.lock().unwrap_or_else(|e| e.into_inner()) = Some(last);
    }
    shard.flush(&p.reports, &mut unsent);
    while let Some(batch) = unsent.take() {
        match p.reports.try_send(Report::Outcomes(batch)) {
            Ok(()) => {}
            Err(TrySendError::Full(Report::Outcomes(b))) => {
                unsent = Some(b);
                glommio::timer::sleep(Duration::from_millis(1)).await;
            }
            Err(_) => break,
        }
    }
}

/// The core's timers (retries, pacing slots, rebalancing): sleeps until its
/// next timeout, or until `with` sees that timeout move earlier.
async fn timers(shard: Rc<Shard>) {
    loop {
        let now = Instant::now();
        let next = shard.core.borrow().next_timeout();
        if next.is_some_and(|t| t <= now) {
            shard.with(|c| c.handle_timeout(now));
            // Let the connections run before looking again.
            futures_lite::future::yield_now().await;
            continue;
        }
        let wait = next.map_or(IDLE_POLL, |t| t - now).min(IDLE_POLL);
        shard.timer_at.set(now + wait);
        let moved = shard.timer_moved.listen();
        let _ = glommio::timer::timeout(wait, async {
            moved.await;
            Ok(())
        })
        .await;
    }
}

async fn resolve(shard: Rc<Shard>, net: Net, domain: Rc<Domain>) {
    let answer = net.resolve_mx(domain.name()).await;
    shard.with(|c| c.resolved(&domain, answer, Instant::now()));
}

impl Shard {
    /// Calls the core, then carries out what it asks for.
    fn with<T>(self: &Rc<Self>, f: impl FnOnce(&mut Core<SpoolJob>) -> T) -> T {
        let out = f(&mut self.core.borrow_mut());
        if self
            .core
            .borrow()
            .next_timeout()
            .is_some_and(|t| t < self.timer_at.get())
        {
            // Wake the timer task for the earlier timeout (once).
            self.timer_at.set(Instant::now());
            self.timer_moved.notify(1);
        }
        loop {
            let Some(action) = self.core.borrow_mut().poll_action() else {
                return out;
            };
            match action {
                Action::Resolve(domain) => {
                    let net = self.net.clone().expect("the core resolves only with a resolver");
                    glommio::spawn_local(resolve(self.clone(), net, domain)).detach();
                }
                Action::Open(dest) => {
                    glommio::spawn_local(conn::run(self.clone(), dest)).detach();
                }
                Action::Wake(dest) => {
                    dest.wake.notify_additional(1);
                }
                Action::WakeAll(dest) => {
                    dest.wake.notify(usize::MAX);
                }
            }
        }
    }

    fn accept(self: &Rc<Self>, msg: ToShard) {
        match msg {
            ToShard::File { id, file, first_seen } => {
                let name = file.path().file_name().map_or_else(
                    || file.path().display().to_string(),
                    |n| n.to_string_lossy().into_owned(),
                );
                self.files.borrow_mut().insert(
                    id,
                    Rc::new(LocalFile {
                        id,
                        file,
                        name,
                        first_seen,
                    }),
                );
            }
            ToShard::Forget { file } => {
                // Its recipients are all final: no transaction holds it any more.
                self.files.borrow_mut().remove(&file);
            }
            ToShard::Work { items, messages } => {
                let now = Instant::now();
                let mut last = LastUsed::default();
                let mut accepted = Vec::with_capacity(items.len());
                for item in items {
                    self.accept_item(item, &messages, &mut last, &mut accepted, now);
                }
                self.hand_over(&mut accepted, now);
            }
        }
    }

    /// Gives the core the jobs of a batch taken so far, all in one turn of
    /// its cell (and its actions carried out once, after them).
    fn hand_over(self: &Rc<Self>, accepted: &mut Vec<(SpoolJob, Instant)>, now: Instant) {
        if !accepted.is_empty() {
            self.with(|c| {
                for (job, first_seen) in accepted.drain(..) {
                    c.accept(job, first_seen, now);
                }
            });
        }
    }

    /// Makes a batch's item a job: into `accepted` when it can be sent, else
    /// refused at once (after the jobs before it, kept in order).
    fn accept_item(
        self: &Rc<Self>,
        item: WorkItem,
        messages: &[Arc<MessageFile>],
        last: &mut LastUsed,
        accepted: &mut Vec<(SpoolJob, Instant)>,
        now: Instant,
    ) {
        let file = match &last.file {
            Some(f) if f.id == item.file => f.clone(),
            _ => last.file.insert(self.files.borrow()[&item.file].clone()).clone(),
        };
        let per_recipient =
            item.personal.is_some() || item.list_unsubscribe.is_some() || self.cfg.headers.per_recipient();
        let personal = per_recipient.then(|| {
            Rc::new(Personal {
                template: item.personal.is_some(),
                vars: item.personal.clone().flatten(),
                inline: match &item.body {
                    BodyKey::Inline(span) => Some(span.clone()),
                    BodyKey::File(_) => None,
                },
                list_unsubscribe: item.list_unsubscribe.clone(),
            })
        });
        let body = match (&item.body, &personal) {
            // A template is not sent as it is: only its file is kept, for rendering.
            (BodyKey::File(id), Some(_)) => Rc::new(Body::template(messages.iter().find(|m| m.id == *id).cloned())),
            (BodyKey::Inline(_), Some(_)) => Rc::new(Body::template(None)),
            (BodyKey::File(id), None) => match &last.body {
                Some((used, body)) if used == id => body.clone(),
                _ => last.body.insert((*id, self.prepared(*id, messages))).1.clone(),
            },
            (BodyKey::Inline(span), None) => {
                let src = span.get(file.file.bytes()).as_bytes();
                let id_domain = self.id_domain(src);
                Rc::new(Body::new(
                    src,
                    &self.signers,
                    &self.dkim,
                    &self.shared_headers(&id_domain),
                    None,
                    true,
                    None,
                ))
            }
        };
        let longest = body.wire.longest_line;
        let job = SpoolJob::new(SpoolJobData {
            file: file.clone(),
            line: item.line,
            off: item.off,
            id: item.id,
            from: item.from,
            body,
            rcpts: item.rcpts,
            personal,
            rendered: None,
            verp: item.verp.map(Rc::new),
            reverse: None,
        });
        if let Some(reason) = job.body.refused.clone() {
            let enhanced = Enhanced {
                class: 5,
                subject: 3,
                detail: 0,
            };
            self.hand_over(accepted, now);
            return self.with(|c| c.refuse(job, item.first_seen, enhanced, &reason, now));
        }
        if longest > MAX_LINE_OCTETS {
            let reason = format!(
                "the message has a line of {longest} octets; SMTP allows {MAX_LINE_OCTETS} (RFC 5321 §4.5.3.1.6)"
            );
            let enhanced = Enhanced {
                class: 5,
                subject: 6,
                detail: 0,
            };
            self.hand_over(accepted, now);
            return self.with(|c| c.refuse(job, item.first_seen, enhanced, &reason, now));
        }
        accepted.push((job, item.first_seen));
    }

    /// The wire form of a message file, prepared (and DKIM-signed) once and
    /// shared while any transaction uses it (and holding the file's map until then).
    fn prepared(&self, id: u32, messages: &[Arc<MessageFile>]) -> Rc<Body> {
        if let Some(m) = self.prepared.borrow().get(&id).and_then(Weak::upgrade) {
            return m;
        }
        let raw = messages
            .iter()
            .find(|m| m.id == id)
            .expect("a batch carries the message files its items use")
            .clone();
        let src = raw.file.bytes();
        let id_domain = self.id_domain(src);
        let m = Rc::new(Body::new(
            src,
            &self.signers,
            &self.dkim,
            &self.shared_headers(&id_domain),
            Some(raw.clone()),
            true,
            None,
        ));
        let mut prepared = self.prepared.borrow_mut();
        prepared.insert(id, Rc::downgrade(&m));
        let n = self.prepared_inserts.get() + 1;
        self.prepared_inserts.set(n);
        if n.is_multiple_of(SWEEP_EVERY) {
            prepared.retain(|_, m| m.strong_count() > 0);
        }
        m
    }

    /// Renders a personalised transaction's copy (one recipient), prepared
    /// and signed like any message; an error says FILE:LINE and why.
    /// `seven_bit`: the connection's server takes no 8-bit data (only then
    /// is a 7-bit form of an 8-bit copy made).
    pub(crate) fn render(&self, txn: &mut Txn, seven_bit: bool) -> Result<(), String> {
        let job = &mut txn.job;
        if job.reverse.is_none()
            && let Some(from) = verp_of(job, self.cfg.verp.as_deref())?
        {
            job.reverse = Some(from.into_boxed_str());
        }
        let Some(p) = job.personal.clone() else {
            return Ok(());
        };
        // A copy made for a connection that took 8-bit has no 7-bit form: made again.
        if job
            .rendered
            .as_ref()
            .is_some_and(|b| !(seven_bit && b.wire.eight_bit && b.seven_bit.is_none()))
        {
            return Ok(());
        }
        let map = job.file.file.bytes();
        let at = || format!("{}:{}", job.file.name, job.line);
        let source: &[u8] = match (&p.inline, &job.body._file) {
            (Some(span), _) => span.get(map).as_bytes(),
            (None, Some(f)) => f.file.bytes(),
            (None, None) => return Err(format!("{}: the message file is gone", at())),
        };
        let id = match &job.id {
            Some(s) => s.get(map).to_string(),
            None => format!("{}:{}", job.file.name, job.line),
        };
        let rcpt = &job.rcpts[0];
        let ctx = crate::template::Context {
            rcpt: rcpt.addr.get(map),
            from: job.from.get(map),
            id: &id,
            job_vars: p.vars.as_ref().map(|s| s.get(map)),
            rcpt_vars: rcpt.vars.as_ref().map(|s| s.get(map)),
        };
        let text: std::borrow::Cow<'_, [u8]> = if p.template {
            let source =
                std::str::from_utf8(source).map_err(|e| format!("{}: the template is not UTF-8 ({e})", at()))?;
            let text = match (&p.inline, &job.body._file) {
                (None, Some(f)) => self.compiled(f.id, source)?.render(&ctx),
                _ => crate::template::render(source, &ctx),
            }
            .map_err(|e| format!("{}: template: {e}", at()))?;
            text.into_bytes().into()
        } else {
            source.into()
        };
        let headers = &self.cfg.headers;
        let list_unsubscribe = match (&p.list_unsubscribe, &headers.list_unsubscribe) {
            (Some(span), _) => Some(span.get(map)),
            (None, Some(t)) => Some(t.as_str()),
            (None, None) => None,
        };
        let list_unsubscribe = match list_unsubscribe {
            Some(t) if crate::headers::is_template(t) => Some(
                crate::template::render(t, &ctx).map_err(|e| format!("{}: list_unsubscribe: template: {e}", at()))?,
            ),
            Some(t) => Some(t.to_string()),
            None => None,
        };
        let id_domain = self.id_domain(&text);
        let adding = crate::headers::Adding {
            message_id: headers.message_id,
            date: headers.date,
            list_unsubscribe: list_unsubscribe.as_deref(),
            one_click: headers.one_click,
            id_domain: &id_domain,
            salt: ctx.rcpt,
        };
        let mut memos = self.memos.borrow_mut();
        let memo = match &job.body._file {
            Some(f) if p.inline.is_none() => {
                if memos.len() >= MAX_COMPILED_TEMPLATES && !memos.contains_key(&f.id) {
                    memos.clear();
                }
                Some(memos.entry(f.id).or_default())
            }
            _ => None,
        };
        let body = Body::new(&text, &self.signers, &self.dkim, &adding, None, seven_bit, memo);
        drop(memos);
        if let Some(reason) = &body.refused {
            return Err(format!("{}: {reason}", at()));
        }
        if body.wire.longest_line > MAX_LINE_OCTETS {
            return Err(format!(
                "{}: the rendered message has a line of {} octets; SMTP allows {MAX_LINE_OCTETS} (RFC 5321 §4.5.3.1.6)",
                at(),
                body.wire.longest_line
            ));
        }
        job.rendered = Some(Rc::new(body));
        Ok(())
    }

    /// A message file's template, compiled once while the shard keeps it.
    fn compiled(&self, id: u32, source: &str) -> Result<Rc<crate::template::Compiled>, String> {
        if let Some(c) = self.templates.borrow().get(&id) {
            return Ok(c.clone());
        }
        let c = Rc::new(crate::template::Compiled::new(source)?);
        let mut t = self.templates.borrow_mut();
        if t.len() >= MAX_COMPILED_TEMPLATES {
            t.clear();
        }
        t.insert(id, c.clone());
        Ok(c)
    }

    /// The headers a shared copy (the same for every recipient) gets.
    fn shared_headers<'a>(&'a self, id_domain: &'a str) -> crate::headers::Adding<'a> {
        let h = &self.cfg.headers;
        crate::headers::Adding {
            message_id: h.message_id,
            date: h.date,
            // A List-Unsubscribe per recipient makes every copy its own (`render`).
            list_unsubscribe: h
                .list_unsubscribe
                .as_deref()
                .filter(|t| !crate::headers::is_template(t)),
            one_click: h.one_click,
            id_domain,
            salt: "",
        }
    }

    /// The right-hand side of a Message-ID volley would make for `msg`: its
    /// From: domain, or the EHLO name (nothing when it makes none).
    fn id_domain(&self, msg: &[u8]) -> String {
        if !self.cfg.headers.message_id {
            return String::new();
        }
        crate::dkim::from_domain(msg).unwrap_or_else(|| self.ehlo_name.clone())
    }

    /// Whether no new transaction may start (see `Core::held_back`).
    fn held_back(&self) -> bool {
        self.core.borrow().held_back()
    }

    fn flush(&self, reports: &Sender<Report>, unsent: &mut Option<OutcomeBatch>) {
        let fresh = self.core.borrow_mut().take_outcomes();
        let batch = match (unsent.take(), fresh) {
            (Some(mut old), Some(new)) => {
                old.merge(new);
                old
            }
            (Some(b), None) | (None, Some(b)) => b,
            (None, None) => return,
        };
        if let Err(TrySendError::Full(Report::Outcomes(b))) = reports.try_send(Report::Outcomes(batch)) {
            *unsent = Some(b);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_8bit_message_s_7bit_form_is_signed_and_counted_too() {
        let signers = crate::dkim::tests::two_keys();
        let counts = RefCell::new(DkimCounts::default());
        let adding = crate::headers::Adding {
            message_id: false,
            date: false,
            list_unsubscribe: None,
            one_click: false,
            id_domain: "",
            salt: "",
        };
        let src = "From: n@news.example.com\nSubject: s\nContent-Type: text/plain; charset=utf-8\n\ncaf\u{e9}\n";
        let body = Body::new(src.as_bytes(), &signers, &counts, &adding, None, true, None);
        let seven = body.seven_bit.as_ref().unwrap().as_ref().unwrap();
        assert!(!seven.eight_bit);
        for w in [&body.wire, seven] {
            let text = String::from_utf8_lossy(&w.bytes);
            assert_eq!(text.matches("DKIM-Signature:").count(), 2, "{text}");
        }
        let c = counts.borrow();
        assert_eq!(c.signed[&("news.example.com".to_string(), "rsa-sha256")], 2);
        assert_eq!(c.signed[&("news.example.com".to_string(), "ed25519-sha256")], 2);
        // A 7-bit message has no second form and one signature per key.
        drop(c);
        let plain = Body::new(
            b"From: n@news.example.com\n\nplain\n",
            &signers,
            &counts,
            &adding,
            None,
            true,
            None,
        );
        assert!(plain.seven_bit.is_none());
        assert_eq!(
            counts.borrow().signed[&("news.example.com".to_string(), "rsa-sha256")],
            3
        );
    }
}
