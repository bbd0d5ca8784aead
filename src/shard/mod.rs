//! A shard: one glommio executor pinned to a core. It owns the domains that
//! hash to it and its part of the spread ones (their queues, destinations,
//! connections and retry timers) and touches nothing else. It talks to other
//! threads only through its inbox (batches of work in), credit back to
//! ingest, its control channel, outcome batches out, and the connection
//! board (`budget.rs`, at connection open and close, never per message), so
//! nothing on the per-message path is locked or shared between cores.
//! Intake and credit are plain numbers in `intake.rs`.

mod budget;
mod conn;
mod intake;

pub use budget::Budgets;

use std::cell::{Cell, RefCell};
use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::rc::{Rc, Weak};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering as AtomicOrdering};
use std::time::{Duration, Instant, SystemTime};

use crossbeam_channel::{Receiver, Sender, TryRecvError, TrySendError};
use event_listener::Event;
use glommio::ExecutorJoinHandle;

use crate::classify::Classifier;
use crate::collector::Report;
use crate::config::{Config, Relay, Retry, Routes, SourceAddress, Target};
use crate::dns::{MxAnswer, MxHost, Net};
use crate::ingest::{BodyKey, Credit, Rcpt, ToShard, WorkItem};
use crate::messages::MessageFile;
use crate::metrics::Phase;
use crate::metrics::export::ShardLink;
use crate::metrics::{DomainGauges, DomainSlot, DomainSnapshot, ShardMetrics, ShardSnapshot};
use crate::outcome::{JobId, LogRecord, Outcome, OutcomeBatch, RcptKey, Recorder};
use crate::smtp::{Command, Decider, Enhanced, Envelope, Status, TxnReport, WireMessage};
use crate::spool::{self, MappedFile, Span};
use crate::tls::{TlsClient, TlsPolicy};
use intake::{Bounds, DomainLoad, Fullness, Intake};

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
/// How often a shard tells the connection board its work for the
/// destinations it shares with other shards.
const REBALANCE_EVERY: Duration = Duration::from_millis(20);
/// Cache entries added between sweeps of unused domains and messages.
const SWEEP_EVERY: usize = 4096;
/// Outcome records a shard may have produced that the collector has not
/// written yet; past this it starts no new transaction (what is delivered
/// but not recorded is what a crash sends twice).
pub const MAX_UNRECORDED_PER_SHARD: u64 = 4096;

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
}

pub fn spawn(p: ShardParams) -> std::io::Result<ExecutorJoinHandle<()>> {
    crate::runtime::spawn_pinned("volley-shard", p.index, move || run(p))
}

struct LocalFile {
    id: u32,
    file: Arc<MappedFile>,
    name: String,
}

pub(crate) struct Domain {
    name: Rc<str>,
    route: RefCell<DomainRoute>,
    retry: Retry,
    /// Transactions in a row deferred whole; past `domain_backoff_after` the domain is backed off.
    deferred_in_a_row: Cell<u32>,
    backoff: RefCell<Option<Backoff>>,
    /// Its handle into the shard's metrics.
    slot: Rc<DomainSlot>,
    /// Its recipients on the shard (not final yet, waiting for a retry, full).
    load: Cell<DomainLoad>,
}

/// Where a domain's mail goes, as far as the shard knows.
enum DomainRoute {
    /// A configured route: no lookup.
    Fixed(Rc<Dest>),
    /// Not looked up yet, or the last answer expired or failed.
    Unknown,
    /// A lookup is under way; these transactions wait for it.
    Resolving(Vec<Txn>),
    /// The MX host set, until the answer's (clamped) TTL runs out.
    Known { dest: Rc<Dest>, until: Instant },
    /// The domain takes no mail (NXDOMAIN, null MX): bounce until `until`.
    Refused {
        enhanced: Enhanced,
        reason: Rc<str>,
        until: Instant,
    },
}

/// A host to connect to: its name (for the log and TLS) and one of its addresses.
#[derive(Debug, Clone)]
pub(crate) struct Candidate {
    name: Rc<str>,
    addr: SocketAddr,
}

/// Where mail goes: a route's HOST:PORT or a domain's MX host set, and the
/// connections to it. Domains with the same route or MX set share one.
pub(crate) struct Dest {
    label: Rc<str>,
    /// Its name on the connection budget board (the same on every shard).
    key: Rc<str>,
    /// This shard's share of the destination's connections, and whether
    /// other shards want it too (then it is rebalanced periodically).
    share: Cell<u32>,
    shared: Cell<bool>,
    /// Connections leaving to give their slot to another shard.
    leaving: Cell<u32>,
    /// The shard turn in which the board last refused a connection (not asked again that turn).
    refused_turn: Cell<u64>,
    /// The domain that first routed here: connection metrics count under it.
    owner: Rc<str>,
    tls: TlsPolicy,
    /// Local addresses its connections are bound to, in rotation (empty: any).
    sources: Rc<[SourceAddress]>,
    /// Set when the destination is a relay (AUTH, implicit TLS).
    relay: Option<Arc<Relay>>,
    next_source: Cell<usize>,
    /// In the order to try (MX preference, then each host's addresses).
    hosts: RefCell<Rc<[Candidate]>>,
    queue: RefCell<VecDeque<Txn>>,
    /// Connections open or opening.
    open: Cell<usize>,
    /// Connections that finished EHLO and are alive.
    ready: Cell<usize>,
    /// Connections parked, waiting for work.
    parked: Cell<usize>,
    wake: Event,
    down_until: Cell<Option<Instant>>,
    failures: Cell<u32>,
    last_error: RefCell<String>,
}

/// One transaction: recipients of one job and one domain.
pub(crate) struct Txn {
    file: Rc<LocalFile>,
    line: u32,
    id: Option<Span>,
    from: Span,
    body: Rc<Body>,
    domain: Rc<Domain>,
    rcpts: Vec<Rcpt>,
    attempt: u32,
    first_seen: Instant,
    /// When it first went to a connection (for the delivery duration).
    first_attempt: Option<Instant>,
    started: Instant,
}

impl Envelope for Txn {
    fn reverse_path(&self) -> &str {
        self.from.get(self.file.file.bytes())
    }
    fn recipient_count(&self) -> usize {
        self.rcpts.len()
    }
    fn recipient(&self, i: usize) -> &str {
        self.rcpts[i].addr.get(self.file.file.bytes())
    }
    fn message(&self) -> &WireMessage {
        &self.body.wire
    }
}

/// A message prepared for the wire, and the message file it came from
/// (kept mapped, and counted in the budget, while the copy is in use).
pub(crate) struct Body {
    wire: WireMessage,
    _file: Option<Arc<MessageFile>>,
}

struct Due {
    at: Instant,
    seq: u64,
    txn: Txn,
}

impl PartialEq for Due {
    fn eq(&self, o: &Self) -> bool {
        (self.at, self.seq) == (o.at, o.seq)
    }
}
impl Eq for Due {}
impl PartialOrd for Due {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Due {
    // Reversed: BinaryHeap is a max-heap and the earliest must come first.
    fn cmp(&self, o: &Self) -> Ordering {
        (o.at, o.seq).cmp(&(self.at, self.seq))
    }
}

/// A domain backed off as a whole: until when, the reason its deferrals
/// are logged with, and the bounce category of the reply that ended the
/// streak (they are classified by it). Made once per streak, shared by
/// every transaction deferred while it lasts.
struct Backoff {
    until: Instant,
    reason: Rc<str>,
    category: Rc<str>,
}

/// What a recipient's attempt ended with, for the log.
struct Said<'a> {
    code: Option<u16>,
    enhanced: Option<crate::smtp::Enhanced>,
    text: &'a str,
    /// A category decided beforehand instead of classifying this.
    category: Option<&'a str>,
}

impl<'a> From<Decider<'a>> for Said<'a> {
    fn from(d: Decider<'a>) -> Self {
        match d {
            Decider::Reply(r) => Said {
                code: Some(r.code),
                enhanced: r.enhanced,
                text: &r.text,
                category: None,
            },
            Decider::Failure(s) => Said {
                code: None,
                enhanced: None,
                text: s,
                category: None,
            },
        }
    }
}

/// What connections to a destination must be like.
struct ConnPolicy {
    tls: TlsPolicy,
    sources: Rc<[SourceAddress]>,
    relay: Option<Arc<Relay>>,
}

/// Where and how an attempt went, for the log.
#[derive(Default)]
struct At<'a> {
    mx: Option<&'a str>,
    ip: Option<IpAddr>,
    latency_ms: Option<u64>,
    tls: Option<&'a str>,
}

pub(crate) struct Shard {
    /// This shard's number (0-based).
    index: usize,
    cfg: Arc<Config>,
    routes: Arc<Routes>,
    net: Option<Net>,
    tls: TlsClient,
    classifier: Arc<Classifier>,
    ehlo_name: String,
    /// Connections per destination for the whole process.
    conn_cap: u32,
    budgets: Arc<Budgets>,
    /// Destinations other shards want too, rebalanced every REBALANCE_EVERY.
    shared_dests: RefCell<Vec<Rc<Dest>>>,
    /// Main loop turns so far.
    turn: Cell<u64>,
    /// Hosts whose TLS handshake failed under `opportunistic`: plaintext until then.
    no_tls_until: RefCell<HashMap<SocketAddr, Instant>>,
    files: RefCell<HashMap<u32, Rc<LocalFile>>>,
    prepared: RefCell<HashMap<u32, Weak<Body>>>,
    domains: RefCell<HashMap<Box<str>, Rc<Domain>>>,
    dests: RefCell<HashMap<Rc<str>, Rc<Dest>>>,
    retries: RefCell<BinaryHeap<Due>>,
    retry_seq: Cell<u64>,
    recorder: RefCell<Recorder>,
    /// Recipients held and credit granted (`intake.rs`), and domains gone
    /// full or open since ingest was last told.
    intake: RefCell<Intake>,
    domain_news: RefCell<Vec<Credit>>,
    stopping: Cell<bool>,
    /// Outcome records this shard has produced, and of those, how many the
    /// collector had written when the shard last looked (once a turn).
    produced: Cell<u64>,
    recorded_seen: Cell<u64>,
    /// The collector's queue had no room for the last batch.
    collector_full: Cell<bool>,
    /// Idle connections waiting for `held_back()` to clear, and what wakes them.
    held_waiters: Cell<usize>,
    caught_up: Event,
    inserts: Cell<usize>,
    metrics: RefCell<ShardMetrics>,
}

thread_local! {
    /// The shard's end of the liveness channel. Held by the thread, not by the
    /// executor's tasks: a panic unwinds the thread without dropping the tasks
    /// that glommio still holds, and the collector must see the shard gone.
    static ALIVE: RefCell<Option<Sender<()>>> = const { RefCell::new(None) };
}

async fn run(p: ShardParams) {
    ALIVE.with(|a| *a.borrow_mut() = Some(p.alive));
    let shard = Rc::new(Shard {
        index: p.index,
        conn_cap: p.cfg.max_connections_per_destination.min(u32::MAX as usize) as u32,
        budgets: p.budgets.clone(),
        shared_dests: RefCell::default(),
        turn: Cell::new(0),
        cfg: p.cfg.clone(),
        routes: p.routes.clone(),
        net: p.net.clone(),
        tls: p.tls.clone(),
        classifier: p.classifier.clone(),
        no_tls_until: RefCell::default(),
        ehlo_name: p.ehlo_name.clone(),
        files: RefCell::default(),
        prepared: RefCell::default(),
        domains: RefCell::default(),
        dests: RefCell::default(),
        retries: RefCell::default(),
        retry_seq: Cell::new(0),
        recorder: RefCell::new(Recorder::new(p.log)),
        intake: RefCell::new(Intake::new(Bounds::of(&p.cfg))),
        domain_news: RefCell::default(),
        stopping: Cell::new(false),
        produced: Cell::new(0),
        recorded_seen: Cell::new(0),
        collector_full: Cell::new(false),
        held_waiters: Cell::new(0),
        caught_up: Event::new(),
        inserts: Cell::new(0),
        metrics: RefCell::new(ShardMetrics::new(p.metrics.is_some(), p.cfg.metrics_max_domains)),
    });
    let retry_task = glommio::spawn_local(retry_loop(shard.clone()));
    let mut unsent: Option<OutcomeBatch> = None;
    let mut last_flush = Instant::now();
    let mut last_rebalance = Instant::now();
    let mut idle_rounds = 0u32;
    loop {
        match p.control.try_recv() {
            Ok(Control::Stop) | Err(TryRecvError::Disconnected) => break,
            Err(TryRecvError::Empty) => {}
        }
        let mut taken = 0;
        // While the collector is behind, no new work either: the shard goes
        // at the pace its outcomes can be recorded.
        while taken < INBOX_CHUNK && shard.has_room() && !shard.held_back() {
            match p.inbox.try_recv() {
                Ok(msg) => {
                    shard.accept(msg);
                    taken += 1;
                }
                Err(_) => break,
            }
        }
        if let Some(link) = &p.metrics {
            shard.metrics.borrow_mut().tick(Instant::now());
            while let Ok(req) = link.requests.try_recv() {
                let _ = req.reply.send(shard.snapshot(req.full));
            }
        }
        let flush_due = last_flush.elapsed() >= FLUSH_INTERVAL;
        if flush_due || shard.recorder.borrow().pending_bytes() > FLUSH_BYTES {
            shard.flush(&p.reports, &mut unsent);
            last_flush = Instant::now();
            shard.collector_full.set(unsent.is_some());
        }
        shard.recorded_seen.set(p.recorded.load(AtomicOrdering::Relaxed));
        shard.grant(&p.credits, flush_due);
        shard.turn.set(shard.turn.get() + 1);
        if last_rebalance.elapsed() >= REBALANCE_EVERY {
            shard.rebalance();
            last_rebalance = Instant::now();
        }
        if shard.held_waiters.get() > 0 && !shard.held_back() {
            shard.caught_up.notify(usize::MAX);
        }
        if taken == 0 {
            // Poll the inbox every millisecond while work flows, every 20 once idle for a while.
            idle_rounds += 1;
            let nap = if idle_rounds > 1000 { IDLE_POLL } else { BUSY_POLL };
            glommio::timer::sleep(nap).await;
        } else {
            idle_rounds = 0;
            futures_lite::future::yield_now().await;
        }
    }
    shard.stopping.set(true);
    shard.caught_up.notify(usize::MAX);
    let dests: Vec<Rc<Dest>> = shard.dests.borrow().values().cloned().collect();
    for d in &dests {
        d.wake.notify(usize::MAX);
    }
    // Transactions in flight finish and connections say QUIT, within shutdown_timeout.
    let deadline = Instant::now() + shard.cfg.shutdown_timeout;
    while dests.iter().any(|d| d.open.get() > 0) && Instant::now() < deadline {
        glommio::timer::sleep(Duration::from_millis(5)).await;
    }
    retry_task.cancel().await;
    if let Some(link) = &p.metrics {
        // Counters must not go back when the shard is gone: leave the last snapshot behind.
        *link.last.lock().unwrap_or_else(|e| e.into_inner()) = Some(shard.snapshot(true));
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

async fn retry_loop(shard: Rc<Shard>) {
    loop {
        let now = Instant::now();
        let next = shard.retries.borrow().peek().map(|d| d.at);
        let wait = next.map_or(Duration::from_millis(50), |at| {
            at.saturating_duration_since(now).min(Duration::from_millis(50))
        });
        if !wait.is_zero() {
            glommio::timer::sleep(wait).await;
            continue;
        }
        loop {
            let due = {
                let mut heap = shard.retries.borrow_mut();
                match heap.peek() {
                    Some(d) if d.at <= Instant::now() => heap.pop(),
                    _ => None,
                }
            };
            match due {
                Some(d) => {
                    let n = d.txn.rcpts.len() as u64;
                    shard.intake.borrow_mut().retry(n);
                    shard.domain_load(&d.txn.domain, |l, b| l.retry(n, b));
                    shard.dispatch(d.txn)
                }
                None => break,
            }
        }
    }
}

async fn resolve(shard: Rc<Shard>, net: Net, domain: Rc<Domain>) {
    let answer = net.resolve_mx(&domain.name).await;
    shard.resolved(&domain, answer);
}

impl Shard {
    /// Whether the shard takes more work from ingest: recipients queued or in
    /// flight and recipients waiting for a retry have bounds of their own, so a
    /// domain that defers everything fills only the second and the shard's other
    /// domains keep flowing.
    fn has_room(&self) -> bool {
        self.intake.borrow().has_room()
    }

    /// Tells ingest of domains gone full or open, and grants it the room the
    /// shard has now (see `Intake::credit`).
    fn grant(&self, credits: &Sender<Credit>, due: bool) {
        for news in self.domain_news.borrow_mut().drain(..) {
            let _ = credits.send(news);
        }
        let credit = self.intake.borrow_mut().credit(self.held_back(), due);
        if let Some((allowed, received)) = credit {
            let _ = credits.send(Credit::Room {
                shard: self.index,
                allowed,
                received,
            });
        }
    }

    /// Changes a domain's load; a domain gone full or open is news for ingest.
    fn domain_load(&self, domain: &Domain, f: impl FnOnce(&mut DomainLoad, u64) -> Option<Fullness>) {
        let mut load = domain.load.get();
        let news = f(&mut load, self.intake.borrow().bounds().domain);
        domain.load.set(load);
        let name = || Box::from(&*domain.name);
        match news {
            Some(Fullness::Full) => self.domain_news.borrow_mut().push(Credit::DomainFull {
                shard: self.index,
                domain: name(),
            }),
            Some(Fullness::Open) => self.domain_news.borrow_mut().push(Credit::DomainOpen {
                shard: self.index,
                domain: name(),
            }),
            None => {}
        }
    }

    fn accept(self: &Rc<Self>, msg: ToShard) {
        match msg {
            ToShard::File { id, file } => {
                let name = file.path().file_name().map_or_else(
                    || file.path().display().to_string(),
                    |n| n.to_string_lossy().into_owned(),
                );
                self.files
                    .borrow_mut()
                    .insert(id, Rc::new(LocalFile { id, file, name }));
            }
            ToShard::Forget { file } => {
                // Its recipients are all final: no transaction holds it any more.
                self.files.borrow_mut().remove(&file);
            }
            ToShard::Work { items, messages } => {
                for item in items {
                    self.accept_item(item, &messages);
                }
            }
        }
    }

    fn accept_item(self: &Rc<Self>, item: WorkItem, messages: &[Arc<MessageFile>]) {
        let file = self.files.borrow()[&item.file].clone();
        let body = match &item.body {
            BodyKey::File(id) => self.prepared(*id, messages),
            BodyKey::Inline(span) => Rc::new(Body {
                wire: WireMessage::prepare(span.get(file.file.bytes()).as_bytes()),
                _file: None,
            }),
        };
        let domain = self.domain(spool::domain_of(item.rcpts[0].addr.get(file.file.bytes())));
        let too_long = body.wire.longest_line > MAX_LINE_OCTETS;
        let n = item.rcpts.len() as u64;
        self.intake.borrow_mut().received(n);
        self.domain_load(&domain, |l, b| l.received(n, b));
        self.metrics.borrow_mut().add_volume(&domain.name, &domain.slot, n);
        let txn = Txn {
            file,
            line: item.line,
            id: item.id,
            from: item.from,
            body,
            domain,
            rcpts: item.rcpts,
            attempt: 1,
            first_seen: item.first_seen,
            first_attempt: None,
            started: Instant::now(),
        };
        if too_long {
            let reason = format!(
                "the message has a line of {} octets; SMTP allows {MAX_LINE_OCTETS} (RFC 5321 §4.5.3.1.6)",
                txn.body.wire.longest_line
            );
            let enhanced = Enhanced {
                class: 5,
                subject: 6,
                detail: 0,
            };
            return self.bounce(txn, enhanced, &reason);
        }
        self.dispatch(txn);
    }

    /// The wire form of a message file, prepared once and shared while any
    /// transaction uses it (and holding the file's map until then).
    fn prepared(&self, id: u32, messages: &[Arc<MessageFile>]) -> Rc<Body> {
        if let Some(m) = self.prepared.borrow().get(&id).and_then(Weak::upgrade) {
            return m;
        }
        let raw = messages
            .iter()
            .find(|m| m.id == id)
            .expect("a batch carries the message files its items use")
            .clone();
        let m = Rc::new(Body {
            wire: WireMessage::prepare(raw.file.bytes()),
            _file: Some(raw),
        });
        self.prepared.borrow_mut().insert(id, Rc::downgrade(&m));
        self.inserted();
        m
    }

    fn domain(&self, name: &str) -> Rc<Domain> {
        // Most domains arrive lower-case: look those up without allocating.
        if !name.bytes().any(|b| b.is_ascii_uppercase())
            && let Some(d) = self.domains.borrow().get(name)
        {
            return d.clone();
        }
        let lower = name.to_ascii_lowercase();
        if let Some(d) = self.domains.borrow().get(lower.as_str()) {
            return d.clone();
        }
        let route = match self.routes.lookup(&lower) {
            Some(t) => DomainRoute::Fixed(self.route_dest(t, self.policy_of(&lower), &lower)),
            None => DomainRoute::Unknown,
        };
        let name: Rc<str> = Rc::from(lower.as_str());
        let d = Rc::new(Domain {
            slot: self.metrics.borrow_mut().slot_for(&name),
            name,
            route: RefCell::new(route),
            retry: self.cfg.retry_of(&lower).clone(),
            deferred_in_a_row: Cell::new(0),
            backoff: RefCell::new(None),
            load: Cell::new(DomainLoad::default()),
        });
        self.domains.borrow_mut().insert(lower.into_boxed_str(), d.clone());
        self.inserted();
        d
    }

    /// What a domain's connections must be like: its TLS policy and source addresses.
    fn policy_of(&self, domain: &str) -> ConnPolicy {
        ConnPolicy {
            tls: self.cfg.tls_policy_of(domain),
            sources: self.cfg.sources_of(domain).into(),
            relay: None,
        }
    }

    fn route_dest(&self, target: &Target, mut policy: ConnPolicy, owner: &str) -> Rc<Dest> {
        let hosts = [Candidate {
            name: Rc::from(target.host.as_str()),
            addr: target.addr,
        }];
        if let Some(tls) = target.relay.as_ref().and_then(|r| r.tls) {
            policy.tls = tls;
        }
        policy.relay = target.relay.clone();
        self.dest(&target.label, policy, hosts.into(), owner)
    }

    /// The destination of an MX host set; the latest answer sets its host order.
    fn mx_dest(&self, hosts: &[MxHost], policy: ConnPolicy, owner: &str) -> Rc<Dest> {
        let mut names: Vec<&str> = hosts.iter().map(|h| h.name.as_str()).collect();
        names.sort_unstable();
        let label = format!("{}:{}", names.join(","), self.cfg.mx_port);
        let candidates: Rc<[Candidate]> = hosts
            .iter()
            .flat_map(|h| {
                let name: Rc<str> = Rc::from(h.name.as_str());
                h.addrs.iter().map(move |ip| Candidate {
                    name: name.clone(),
                    addr: SocketAddr::new(*ip, self.cfg.mx_port),
                })
            })
            .collect();
        let dest = self.dest(&label, policy, candidates.clone(), owner);
        *dest.hosts.borrow_mut() = candidates;
        dest
    }

    /// The destination `label` under `policy` (domains with different TLS
    /// policies or source addresses never share a connection).
    fn dest(&self, label: &str, policy: ConnPolicy, hosts: Rc<[Candidate]>, owner: &str) -> Rc<Dest> {
        let sources: Vec<String> = policy.sources.iter().map(|s| s.address.to_string()).collect();
        let key = format!("{label} tls={} from={}", policy.tls, sources.join(","));
        if let Some(d) = self.dests.borrow().get(key.as_str()) {
            return d.clone();
        }
        let d = Rc::new(Dest {
            label: Rc::from(label),
            key: Rc::from(key.as_str()),
            share: Cell::new(self.conn_cap),
            shared: Cell::new(false),
            leaving: Cell::new(0),
            refused_turn: Cell::new(u64::MAX),
            owner: Rc::from(owner),
            tls: policy.tls,
            sources: policy.sources,
            relay: policy.relay,
            next_source: Cell::new(self.index),
            hosts: RefCell::new(hosts),
            queue: RefCell::default(),
            open: Cell::new(0),
            ready: Cell::new(0),
            parked: Cell::new(0),
            wake: Event::new(),
            down_until: Cell::new(None),
            failures: Cell::new(0),
            last_error: RefCell::default(),
        });
        self.dests.borrow_mut().insert(Rc::from(key), d.clone());
        d
    }

    /// Forgets domains and prepared messages that no transaction uses any more.
    fn inserted(&self) {
        let n = self.inserts.get() + 1;
        self.inserts.set(n);
        if n.is_multiple_of(SWEEP_EVERY) {
            self.domains.borrow_mut().retain(|_, d| Rc::strong_count(d) > 1);
            self.prepared.borrow_mut().retain(|_, m| m.strong_count() > 0);
        }
    }

    /// Sends a transaction on its way: onto its destination's queue, into the
    /// wait for its domain's MX lookup, or straight to its outcome when the
    /// domain takes no mail or its destination is backed off.
    fn dispatch(self: &Rc<Self>, txn: Txn) {
        let domain = txn.domain.clone();
        let now = Instant::now();
        let backed_off = match &*domain.backoff.borrow() {
            Some(b) if now < b.until => Some((b.reason.clone(), b.category.clone())),
            _ => None,
        };
        if let Some((reason, category)) = backed_off {
            return self.defer_as(txn, &reason, None, Some(&category));
        }
        let mut route = domain.route.borrow_mut();
        let dest = match &mut *route {
            DomainRoute::Fixed(d) => d.clone(),
            DomainRoute::Known { dest, until } if now < *until => {
                self.metrics.borrow_mut().dns_cache_hits += 1;
                dest.clone()
            }
            DomainRoute::Refused {
                enhanced,
                reason,
                until,
            } if now < *until => {
                let (enhanced, reason) = (*enhanced, reason.clone());
                drop(route);
                return self.bounce(txn, enhanced, &reason);
            }
            DomainRoute::Resolving(waiting) => {
                waiting.push(txn);
                return;
            }
            _ => {
                let Some(net) = self.net.clone() else {
                    drop(route);
                    let reason = format!("no route for {} and no resolver", domain.name);
                    return self.defer(txn, &reason, None);
                };
                *route = DomainRoute::Resolving(vec![txn]);
                drop(route);
                glommio::spawn_local(resolve(self.clone(), net, domain)).detach();
                return;
            }
        };
        drop(route);
        if let Some(until) = dest.down_until.get()
            && now < until
        {
            let reason = format!(
                "delivery to {} temporarily suspended: {}",
                dest.label,
                dest.last_error.borrow()
            );
            return self.defer(txn, &reason, Some(&dest));
        }
        dest.queue.borrow_mut().push_back(txn);
        self.kick(&dest);
    }

    /// Takes an MX answer for a domain and releases the transactions that waited for it.
    fn resolved(self: &Rc<Self>, domain: &Domain, answer: MxAnswer) {
        let now = Instant::now();
        let dns = &self.cfg.dns;
        let kind = match &answer {
            MxAnswer::Hosts { .. } => 0,
            MxAnswer::NullMx => 1,
            MxAnswer::NoSuchDomain(_) => 2,
            MxAnswer::Temporary(_) => 3,
        };
        self.metrics.borrow_mut().dns_lookups[kind] += 1;
        let (next, temporary) = match answer {
            MxAnswer::Hosts { hosts, ttl } => (
                DomainRoute::Known {
                    dest: self.mx_dest(&hosts, self.policy_of(&domain.name), &domain.name),
                    until: now + dns.keep(ttl),
                },
                None,
            ),
            MxAnswer::NullMx => (
                DomainRoute::Refused {
                    enhanced: Enhanced {
                        class: 5,
                        subject: 1,
                        detail: 10,
                    },
                    reason: Rc::from(format!(
                        "{}: the domain accepts no mail (null MX, RFC 7505)",
                        domain.name
                    )),
                    until: now + dns.negative_ttl,
                },
                None,
            ),
            MxAnswer::NoSuchDomain(why) => (
                DomainRoute::Refused {
                    enhanced: Enhanced {
                        class: 5,
                        subject: 1,
                        detail: 2,
                    },
                    reason: Rc::from(why),
                    until: now + dns.negative_ttl,
                },
                None,
            ),
            MxAnswer::Temporary(why) => (DomainRoute::Unknown, Some(why)),
        };
        let waiting = match std::mem::replace(&mut *domain.route.borrow_mut(), next) {
            DomainRoute::Resolving(w) => w,
            _ => Vec::new(),
        };
        for txn in waiting {
            match &temporary {
                Some(why) => self.defer(txn, why, None),
                None => self.dispatch(txn),
            }
        }
    }

    /// Bounces every recipient of a transaction for a local, permanent reason.
    fn bounce(&self, txn: Txn, enhanced: Enhanced, reason: &str) {
        for i in 0..txn.rcpts.len() {
            let said = Said {
                code: None,
                enhanced: Some(enhanced),
                text: reason,
                category: None,
            };
            self.record(&txn, i, Outcome::Bounced, said, At::default());
        }
    }

    /// Wakes a parked connection, or opens another while the queue outgrows the parked ones.
    fn kick(self: &Rc<Self>, dest: &Rc<Dest>) {
        if dest.parked.get() > 0 {
            dest.wake.notify_additional(1);
        }
        let queued = dest.queue.borrow().len();
        // Until one connection has got through EHLO, one attempt at a time:
        // a dead or refusing destination costs one failure, not a burst.
        let probing = dest.ready.get() == 0 && dest.open.get() > 0;
        if !self.stopping.get()
            && !probing
            && (dest.open.get() as u32) < self.conn_cap
            && queued > dest.parked.get()
            && self.budget_allows(dest)
        {
            dest.open.set(dest.open.get() + 1);
            glommio::spawn_local(conn::run(self.clone(), dest.clone())).detach();
        }
    }

    /// Asks the board for one more connection to `dest` (at most once a turn
    /// when refused).
    fn budget_allows(&self, dest: &Rc<Dest>) -> bool {
        let turn = self.turn.get();
        if dest.refused_turn.get() == turn {
            return false;
        }
        let want = (dest.queue.borrow().len() + dest.open.get()) as u64;
        let g = self.budgets.open(&dest.key, self.index, want, self.conn_cap);
        dest.share.set(g.share);
        if g.shared && !dest.shared.replace(true) {
            self.shared_dests.borrow_mut().push(dest.clone());
        }
        if !g.granted {
            dest.refused_turn.set(turn);
        }
        g.granted
    }

    /// A connection to `dest` ended: its slot goes back to the board.
    fn connection_closed(&self, dest: &Dest) {
        dest.open.set(dest.open.get() - 1);
        self.budgets.closed(&dest.key, self.index);
    }

    /// Whether a connection to `dest` should leave after its transactions
    /// in flight, giving its slot to a shard below its share (counts it as leaving).
    fn should_leave(&self, dest: &Dest) -> bool {
        let staying = dest.open.get() as u32 - dest.leaving.get();
        if dest.shared.get() && staying > dest.share.get().max(1) {
            dest.leaving.set(dest.leaving.get() + 1);
            return true;
        }
        false
    }

    /// Tells the board this shard's work for the destinations other shards
    /// want too, and takes its new shares: a shard over its share lets
    /// connections go, one under it opens more.
    fn rebalance(self: &Rc<Self>) {
        // Destinations this shard took whole before another shard wanted them.
        for key in self.budgets.wanted_elsewhere(self.index) {
            if let Some(d) = self.dests.borrow().get(&*key)
                && !d.shared.replace(true)
            {
                self.shared_dests.borrow_mut().push(d.clone());
            }
        }
        let dests: Vec<Rc<Dest>> = self.shared_dests.borrow().clone();
        let mut keep = Vec::with_capacity(dests.len());
        for d in dests {
            let want = (d.queue.borrow().len() + d.open.get()) as u64;
            let g = self.budgets.rebalance(&d.key, self.index, want, self.conn_cap);
            d.share.set(g.share);
            if !g.shared && want == 0 {
                d.shared.set(false);
                continue;
            }
            if (d.open.get() as u32) < g.share {
                self.kick(&d);
            }
            keep.push(d);
        }
        *self.shared_dests.borrow_mut() = keep;
    }

    /// A connection could not be set up. With no other live connection the
    /// destination is backed off and everything queued for it is deferred;
    /// `pause` backs it off for at least that long (a relay refusing our credentials).
    fn destination_failed(self: &Rc<Self>, dest: &Rc<Dest>, reason: &str, pause: Option<Duration>) {
        if dest.ready.get() > 0 && pause.is_none() {
            return;
        }
        let failures = dest.failures.get() + 1;
        dest.failures.set(failures);
        let backoff = self.cfg.retry.delay(failures).max(pause.unwrap_or_default());
        dest.down_until.set(Some(Instant::now() + backoff));
        *dest.last_error.borrow_mut() = reason.to_string();
        let queued: Vec<Txn> = dest.queue.borrow_mut().drain(..).collect();
        for txn in queued {
            self.defer(txn, reason, Some(dest));
        }
    }

    /// Whether `addr` recently failed a TLS handshake (opportunistic policy).
    fn tls_broken(&self, addr: SocketAddr) -> bool {
        let mut map = self.no_tls_until.borrow_mut();
        match map.get(&addr) {
            Some(until) if Instant::now() < *until => true,
            Some(_) => {
                map.remove(&addr);
                false
            }
            None => false,
        }
    }

    fn remember_tls_broken(&self, addr: SocketAddr) {
        self.no_tls_until
            .borrow_mut()
            .insert(addr, Instant::now() + self.cfg.tls_fallback);
    }

    fn destination_up(&self, dest: &Dest) {
        dest.failures.set(0);
        dest.down_until.set(None);
    }

    /// Settles every recipient of a finished transaction.
    fn complete(self: &Rc<Self>, report: TxnReport<Txn>, host: &Candidate, tls: Option<&str>) {
        let now = Instant::now();
        let txn = &report.txn;
        let latency_ms = Some(now.duration_since(txn.started).as_millis() as u64);
        let expired = now >= txn.first_seen + txn.domain.retry.max_age;
        let mut deferred = Vec::new();
        let mut delivered = 0u64;
        for i in 0..txn.rcpts.len() {
            let (status, decider) = report.verdict(i);
            let outcome = match status {
                Status::Delivered => {
                    delivered += 1;
                    Outcome::Delivered
                }
                Status::Bounced => Outcome::Bounced,
                Status::Deferred if expired => Outcome::Expired,
                Status::Deferred => {
                    deferred.push(i);
                    Outcome::Deferred
                }
            };
            let at = At {
                mx: Some(&host.name),
                ip: Some(host.addr.ip()),
                latency_ms,
                tls,
            };
            self.record(txn, i, outcome, decider.into(), at);
        }
        self.count_replies(&report, now, delivered);
        if delivered > 0 {
            self.recorder.borrow_mut().message_delivered();
        }
        self.domain_streak(&txn.domain, deferred.len() == txn.rcpts.len(), || {
            let decider = report.verdict(0).1;
            let text = match decider {
                Decider::Reply(r) => r.to_string(),
                Decider::Failure(f) => f.to_string(),
            };
            let said = Said::from(decider);
            (text, self.classifier.classify(said.code, said.enhanced, said.text))
        });
        if deferred.is_empty() {
            return;
        }
        let TxnReport { mut txn, .. } = report;
        if deferred.len() < txn.rcpts.len() {
            txn.rcpts = deferred.into_iter().map(|i| txn.rcpts[i].clone()).collect();
        }
        self.schedule_retry(txn);
    }

    /// Defers (or expires) every recipient of a transaction for a local reason.
    fn defer(self: &Rc<Self>, txn: Txn, reason: &str, dest: Option<&Dest>) {
        self.defer_as(txn, reason, dest, None)
    }

    /// `defer`, with the category given instead of classified from the reason.
    fn defer_as(self: &Rc<Self>, txn: Txn, reason: &str, dest: Option<&Dest>, category: Option<&str>) {
        let expired = Instant::now() >= txn.first_seen + txn.domain.retry.max_age;
        let outcome = if expired { Outcome::Expired } else { Outcome::Deferred };
        let said = || Said {
            code: None,
            enhanced: None,
            text: reason,
            category,
        };
        for i in 0..txn.rcpts.len() {
            let at = At {
                mx: dest.map(|d| &*d.label),
                ..At::default()
            };
            self.record(&txn, i, outcome, said(), at);
        }
        if !expired {
            self.schedule_retry(txn);
        }
    }

    /// Counts transactions of a domain deferred whole in a row; after
    /// `domain_backoff_after` of them the domain is backed off as a whole
    /// instead of being retried recipient by recipient.
    fn domain_streak<'a>(&'a self, domain: &Domain, all_deferred: bool, last: impl FnOnce() -> (String, &'a str)) {
        if !all_deferred {
            domain.deferred_in_a_row.set(0);
            *domain.backoff.borrow_mut() = None;
            return;
        }
        let n = domain.deferred_in_a_row.get() + 1;
        domain.deferred_in_a_row.set(n);
        let after = self.cfg.domain_backoff_after.max(1);
        if n >= after {
            let until = Instant::now() + domain.retry.delay(n - after + 1);
            let (text, category) = last();
            let reason = format!(
                "{} is backed off as a whole: {n} transactions in a row deferred, the last with: {text}",
                domain.name
            );
            *domain.backoff.borrow_mut() = Some(Backoff {
                until,
                reason: Rc::from(reason),
                category: Rc::from(category),
            });
        }
    }

    fn schedule_retry(&self, mut txn: Txn) {
        let now = Instant::now();
        let retry = &txn.domain.retry;
        let due = (now + retry.delay(txn.attempt)).min(txn.first_seen + retry.max_age);
        txn.attempt += 1;
        let seq = self.retry_seq.get();
        self.retry_seq.set(seq + 1);
        let n = txn.rcpts.len() as u64;
        self.intake.borrow_mut().wait(n);
        self.domain_load(&txn.domain, |l, b| l.wait(n, b));
        self.retries.borrow_mut().push(Due { at: due, seq, txn });
    }

    fn record(&self, txn: &Txn, i: usize, outcome: Outcome, said: Said<'_>, at: At<'_>) {
        let map = txn.file.file.bytes();
        if outcome.is_final() {
            self.intake.borrow_mut().finished(1);
            self.domain_load(&txn.domain, |l, b| l.finished(1, b));
        }
        let category = match outcome {
            Outcome::Bounced | Outcome::Deferred | Outcome::Expired => Some(
                said.category
                    .unwrap_or_else(|| self.classifier.classify(said.code, said.enhanced, said.text)),
            ),
            Outcome::Delivered | Outcome::Rejected => None,
        };
        self.metrics
            .borrow_mut()
            .with(&txn.domain.slot, |m| m.outcome(outcome, category));
        let key = RcptKey {
            file: txn.file.id,
            line: txn.line,
            idx: txn.rcpts[i].idx,
        };
        self.produced.set(self.produced.get() + 1);
        self.recorder.borrow_mut().record(
            key,
            &LogRecord {
                ts: SystemTime::now(),
                id: match &txn.id {
                    Some(s) => JobId::Given(s.get(map)),
                    None => JobId::Line(&txn.file.name, txn.line),
                },
                rcpt: Some(txn.rcpts[i].addr.get(map)),
                domain: Some(&txn.domain.name),
                outcome,
                code: said.code,
                enhanced: said.enhanced,
                reply: Some(said.text),
                mx: at.mx,
                ip: at.ip,
                attempt: txn.attempt,
                latency_ms: at.latency_ms,
                tls: at.tls,
                category,
            },
        );
    }

    /// Counts a finished transaction's replies, times its phases, and the
    /// delivery duration of its delivered recipients.
    fn count_replies(&self, report: &TxnReport<Txn>, now: Instant, delivered: u64) {
        let mut metrics = self.metrics.borrow_mut();
        if !metrics.enabled() {
            return;
        }
        metrics.with(&report.txn.domain.slot, |m| {
            let replies = [
                (Command::Mail, &report.mail),
                (Command::Data, &report.data),
                (if report.chunked { Command::Bdat } else { Command::Dot }, &report.dot),
            ];
            for (c, r) in replies {
                if let Some(r) = r {
                    m.reply(c, r.code, r.enhanced);
                }
            }
            for r in report.rcpts.iter().flatten() {
                m.reply(Command::Rcpt, r.code, r.enhanced);
            }
            let t = &report.timing;
            let phases = [
                (Phase::Mail, t.mail),
                (Phase::Rcpt, t.rcpt),
                (Phase::Data, t.data),
                (Phase::Dot, t.dot),
            ];
            for (p, us) in phases {
                if let Some(us) = us {
                    m.phase(p, us);
                }
            }
            if delivered > 0 {
                let first = report.txn.first_attempt.unwrap_or(report.txn.started);
                m.delivered(now.duration_since(first).as_micros() as u64, delivered);
            }
        });
    }

    /// The shard's metrics and gauges; `full` adds every labeled domain's counts.
    fn snapshot(&self, full: bool) -> ShardSnapshot {
        let metrics = self.metrics.borrow();
        let now = Instant::now();
        let mut snap = ShardSnapshot {
            shard: self.index,
            dns_lookups: metrics.dns_lookups,
            dns_cache_hits: metrics.dns_cache_hits,
            held: self.intake.borrow().held(),
            retry_backlog: self.intake.borrow().waiting(),
            domains_known: self.domains.borrow().len() as u64,
            destinations: self.dests.borrow().len() as u64,
            connections_open: self.dests.borrow().values().map(|d| d.open.get() as u64).sum(),
            ..ShardSnapshot::default()
        };
        if !full || !metrics.enabled() {
            return snap;
        }
        let domains = self.domains.borrow();
        let other_label: Rc<str> = Rc::from(crate::metrics::OTHER_DOMAIN);
        let label = |name: &Rc<str>| {
            if metrics.label_of(name) == name.as_ref() {
                name.clone()
            } else {
                other_label.clone()
            }
        };
        let mut gauges: HashMap<Rc<str>, DomainGauges> = HashMap::new();
        for d in domains.values().filter(|d| d.load.get().held > 0) {
            gauges.entry(label(&d.name)).or_default().queued += d.load.get().held;
        }
        let mut oldest = |name: &Rc<str>, first_seen: Instant| {
            let g = gauges.entry(label(name)).or_default();
            g.oldest_seconds = g.oldest_seconds.max(now.duration_since(first_seen).as_secs_f64());
        };
        let dests = self.dests.borrow();
        for d in dests.values() {
            for t in d.queue.borrow().iter() {
                oldest(&t.domain.name, t.first_seen);
            }
        }
        for due in self.retries.borrow().iter() {
            oldest(&due.txn.domain.name, due.txn.first_seen);
        }
        for d in domains.values() {
            if let DomainRoute::Resolving(waiting) = &*d.route.borrow() {
                for t in waiting {
                    oldest(&d.name, t.first_seen);
                }
            }
        }
        for d in dests.values() {
            gauges.entry(label(&d.owner)).or_default().connections_open += d.open.get() as u64;
        }
        let (slots, other) = metrics.copy();
        snap.domains = slots
            .into_iter()
            .map(|(name, stats)| DomainSnapshot {
                gauges: gauges.get(name.as_str()).copied().unwrap_or_default(),
                name,
                stats,
            })
            .collect();
        snap.other = DomainSnapshot {
            name: crate::metrics::OTHER_DOMAIN.to_string(),
            stats: other,
            gauges: gauges.get(crate::metrics::OTHER_DOMAIN).copied().unwrap_or_default(),
        };
        snap
    }

    /// No new transaction may start: the collector cannot take this shard's
    /// outcomes, or more than `MAX_UNRECORDED_PER_SHARD` of them are not
    /// written yet.
    pub(crate) fn held_back(&self) -> bool {
        self.collector_full.get() || self.produced.get() - self.recorded_seen.get() > MAX_UNRECORDED_PER_SHARD
    }

    fn flush(&self, reports: &Sender<Report>, unsent: &mut Option<OutcomeBatch>) {
        let fresh = self.recorder.borrow_mut().take().map(|mut b| {
            b.shard = Some(self.index);
            b
        });
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
