//! The shard's core, without I/O: the state of its domains, destinations,
//! retries and intake, and every decision about them (where a transaction
//! goes, when to look a domain up, when to open, wake or let go of a
//! connection, when to retry, back off or give up, what to record). It is
//! driven with `now` passed in and answers with [`Action`]s; it never reads
//! a clock, touches a socket or spawns a task. The glommio layer
//! (`shard/mod.rs`, `shard/conn.rs`) carries the actions out and feeds the
//! events back, so every case here is tested with a fake clock.
//!
//! Its seams, a file each:
//! - `route.rs`: domains, their routes and the MX cache;
//! - `pool.rs`: destinations, their queues and connections (caps, ramp-up,
//!   the process-wide budget, going down and coming back);
//! - `retry.rs`: the retry schedule and `max_age`;
//! - `settle.rs`: turning replies and local failures into outcomes, log
//!   records and metrics;
//! - `../intake.rs`: the intake bounds and ingest's credit, as numbers.

mod automation;
mod pace;
mod pool;
mod retry;
mod route;
mod settle;
#[cfg(test)]
mod tests;

pub(crate) use pool::{Candidate, Dest, SetupFailure};
pub(crate) use route::Domain;

use foldhash::{HashMap, HashMapExt};
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use super::budget::Budgets;
use super::intake::{Bounds, DomainLoad, Fullness, Intake};
use crate::classify::Classifier;
use crate::config::{Config, Routes};
use crate::ingest::Credit;
use crate::metrics::{ActiveRule, DomainGauges, DomainSnapshot, ShardMetrics, ShardSnapshot};
use crate::outcome::{JobId, OutcomeBatch, RcptKey, Recorder};
use crate::shaping::Shaping;
use crate::smtp::{Envelope, WireMessage};

/// How often the shard tells the connection board its work for the
/// destinations it shares with other shards.
pub const REBALANCE_EVERY: Duration = Duration::from_millis(20);
/// Domains added between sweeps of the unused ones.
const SWEEP_EVERY: usize = 4096;
/// Outcome records a shard may have produced that the collector has not
/// written yet; past this it starts no new transaction (what is delivered
/// but not recorded is what a crash sends twice).
pub const MAX_UNRECORDED_PER_SHARD: u64 = 8192;
/// Records of one shard pending at the collector that make it commit
/// before `journal_sync_interval`: a quarter of the bound, so that the
/// records still on their way (the shard's flush, the commit's writes and
/// syncs) find room below it and a fast shard is not held back in steady
/// state.
pub const COMMIT_PENDING_PER_SHARD: u64 = MAX_UNRECORDED_PER_SHARD / 4;

/// What a transaction carries that the core does not look into: its
/// envelope, its message, and its recipients' names in the journal.
pub trait Job {
    fn rcpt_count(&self) -> usize;
    fn rcpt(&self, i: usize) -> &str;
    /// Whether the job's id and recipient `i`'s address need no escaping in
    /// JSON (see `LogRecord::plain`).
    fn plain_text(&self, _i: usize) -> bool {
        false
    }
    /// Whether recipient `i`'s address is ASCII.
    fn rcpt_is_ascii(&self, i: usize) -> bool {
        self.rcpt(i).is_ascii()
    }
    /// The reverse-path without angle brackets; empty for `<>`.
    fn reverse_path(&self) -> &str;
    fn message(&self) -> &WireMessage;
    /// The message in 7 bits for a server without 8BITMIME, or why there is none.
    fn seven_bit(&self) -> Result<&WireMessage, &str> {
        Err("it is not converted")
    }
    /// Recipient `i`'s key in the journal.
    fn key(&self, i: usize) -> RcptKey;
    /// The job's id for the log.
    fn id(&self) -> JobId<'_>;
    /// Keeps only the recipients at `keep` (ascending).
    fn keep(&mut self, keep: &[usize]);
    /// Splits off the recipients from `at` on into a job of their own.
    fn split_off(&mut self, at: usize) -> Self;
    /// Moves the recipients at `which` (ascending) into a job of their own.
    fn take(&mut self, which: &[usize]) -> Self;
    /// Lets go of what was made for one attempt (a rendered copy) while it waits.
    fn release(&mut self) {}

    /// What one recipient of a waiting job keeps: as little as brings the
    /// job back ([`Job::unpark`]).
    type Parked: Parked;
    /// The job as it waits for a retry, one parked recipient at a time
    /// (`first_seen`: its transaction's).
    fn park(self, first_seen: Instant, out: &mut dyn FnMut(Self::Parked));
    /// The job again, of recipients parked together (one at least, all of
    /// one job: [`Parked::same_job`]).
    fn unpark(p: Vec<Self::Parked>) -> Self;
}

/// A recipient of a job waiting for a retry.
pub trait Parked {
    /// When its transaction was first seen (`max_age` runs from then).
    fn first_seen(&self) -> Instant;
    /// Whether `o` is a recipient of the same job, to be sent with this one.
    fn same_job(&self, o: &Self) -> bool;
}

/// One transaction: recipients of one job and one domain.
pub struct Txn<J> {
    pub job: J,
    pub domain: Rc<Domain<J>>,
    pub attempt: u32,
    pub first_seen: Instant,
    /// When it first went to a connection (for the delivery duration).
    pub first_attempt: Option<Instant>,
    /// When its current attempt started.
    pub started: Instant,
    /// It waited in its destination's queue for a suspension to end (then,
    /// past max_age, it expires instead of going out).
    pub held: bool,
}

impl<J> Txn<J> {
    /// A transaction like this one (same attempt, ages, hold) for the job
    /// `split` takes out of this one's.
    pub(super) fn with_job(&mut self, split: impl FnOnce(&mut J) -> J) -> Txn<J> {
        Txn {
            job: split(&mut self.job),
            domain: self.domain.clone(),
            attempt: self.attempt,
            first_seen: self.first_seen,
            first_attempt: self.first_attempt,
            started: self.started,
            held: self.held,
        }
    }
}

impl<J: Job> Envelope for Txn<J> {
    fn reverse_path(&self) -> &str {
        self.job.reverse_path()
    }
    fn recipient_count(&self) -> usize {
        self.job.rcpt_count()
    }
    fn recipient(&self, i: usize) -> &str {
        self.job.rcpt(i)
    }
    fn message(&self) -> &WireMessage {
        self.job.message()
    }
    fn seven_bit(&self) -> Result<&WireMessage, &str> {
        self.job.seven_bit()
    }
}

/// What the core asks the I/O layer to do.
pub enum Action<J> {
    /// Look the domain's MX up and answer with [`Core::resolved`].
    Resolve(Rc<Domain<J>>),
    /// Open a connection to the destination (counted as open already) and
    /// report it with [`Core::connection_ready`] and [`Core::connection_closed`].
    Open(Rc<Dest<J>>),
    /// One connection parked on the destination has work.
    Wake(Rc<Dest<J>>),
    /// Every connection parked on the destination must look again (the shard stops).
    WakeAll(Rc<Dest<J>>),
}

/// What the core is made of; nothing of it does I/O.
pub struct CoreParams {
    pub index: usize,
    pub cfg: Arc<Config>,
    pub routes: Arc<Routes>,
    /// Whether MX lookups can be made (there is a resolver).
    pub resolver: bool,
    pub classifier: Arc<Classifier>,
    pub budgets: Arc<Budgets>,
    pub shaping: Arc<Shaping>,
    pub log: bool,
    pub metrics: bool,
}

pub struct Core<J: Job> {
    index: usize,
    cfg: Arc<Config>,
    routes: Arc<Routes>,
    resolver: bool,
    classifier: Arc<Classifier>,
    budgets: Arc<Budgets>,
    domains: HashMap<Box<str>, Rc<Domain<J>>>,
    dests: HashMap<Rc<str>, Rc<Dest<J>>>,
    /// Destinations other shards want too, rebalanced every REBALANCE_EVERY.
    shared_dests: Vec<Rc<Dest<J>>>,
    last_rebalance: Option<Instant>,
    /// Hosts whose TLS handshake failed under `opportunistic`: plaintext until then.
    no_tls_until: HashMap<SocketAddr, Instant>,
    retries: retry::Retries<J>,
    /// Rules other nodes of the fleet fired that are in force (by label and scope).
    fleet_rules: Vec<crate::shard::budget::RuleNews>,
    /// Destinations waiting for their next pacing slot.
    paced: std::collections::BinaryHeap<pool::Paced<J>>,
    shaping: Arc<Shaping>,
    /// Recipients held and credit granted, and domains gone full or open
    /// since ingest was last told.
    intake: Intake,
    domain_news: Vec<Credit>,
    recorder: Recorder,
    pub(crate) metrics: ShardMetrics,
    stopping: bool,
    /// Outcome records produced, and of those, how many the collector had
    /// written when the shard last looked.
    produced: u64,
    recorded_seen: u64,
    /// The collector's queue had no room for the last batch.
    collector_full: bool,
    /// Turns of the I/O loop so far (the board is asked once a turn at most).
    turn: u64,
    inserts: usize,
    /// A monotonic instant and the wall clock at it: log times are derived
    /// from `now` without reading the clock per record.
    wall: (Instant, SystemTime),
    actions: VecDeque<Action<J>>,
    /// Automation rules fired: (scope, rule, action) → times.
    rule_firings: std::collections::BTreeMap<(String, String, &'static str), u64>,
    /// Seconds destinations spent under rules that ended: (scope, action) → seconds.
    shaped_seconds: std::collections::BTreeMap<(String, &'static str), f64>,
}

impl<J: Job> Core<J> {
    pub fn new(p: CoreParams, now: Instant, wall: SystemTime) -> Core<J> {
        Core {
            index: p.index,
            intake: Intake::new(Bounds::of(&p.cfg)),
            metrics: ShardMetrics::new(p.metrics, p.cfg.metrics_max_domains),
            cfg: p.cfg,
            routes: p.routes,
            resolver: p.resolver,
            classifier: p.classifier,
            budgets: p.budgets,
            domains: HashMap::new(),
            dests: HashMap::new(),
            shared_dests: Vec::new(),
            last_rebalance: None,
            no_tls_until: HashMap::new(),
            retries: retry::Retries::new(now),
            fleet_rules: Vec::new(),
            paced: std::collections::BinaryHeap::new(),
            shaping: p.shaping,
            domain_news: Vec::new(),
            recorder: Recorder::new(p.log),
            stopping: false,
            produced: 0,
            recorded_seen: 0,
            collector_full: false,
            turn: 0,
            inserts: 0,
            wall: (now, wall),
            actions: VecDeque::new(),
            rule_firings: Default::default(),
            shaped_seconds: Default::default(),
        }
    }

    /// The next thing for the I/O layer to do.
    pub fn poll_action(&mut self) -> Option<Action<J>> {
        self.actions.pop_front()
    }

    /// A new turn of the I/O loop, with the wall clock at `now`.
    pub fn turn(&mut self, now: Instant, wall: SystemTime) {
        self.turn += 1;
        self.wall = (now, wall);
    }

    /// The wall-clock time at `now`.
    fn wall_at(&self, now: Instant) -> SystemTime {
        match now.checked_duration_since(self.wall.0) {
            Some(d) => self.wall.1 + d,
            None => self.wall.1 - (self.wall.0 - now),
        }
    }

    /// A new transaction from ingest (its recipients share a domain), sent on its way.
    pub fn accept(&mut self, job: J, first_seen: Instant, now: Instant) {
        let txn = self.admit(job, first_seen, now);
        self.dispatch(txn, now);
    }

    /// A new transaction from ingest that cannot be sent as it is: its
    /// recipients bounce with `reason`.
    /// A transaction a connection took cannot be sent (its copy could not
    /// be rendered): its recipients bounce with the reason.
    pub fn unsendable(&mut self, txn: Txn<J>, reason: &str, now: Instant) {
        let enhanced = crate::smtp::Enhanced {
            class: 5,
            subject: 6,
            detail: 0,
        };
        self.bounce(txn, crate::local::Local::Message, enhanced, reason, now);
    }

    pub fn refuse(&mut self, job: J, first_seen: Instant, enhanced: crate::smtp::Enhanced, reason: &str, now: Instant) {
        let txn = self.admit(job, first_seen, now);
        self.bounce(txn, crate::local::Local::Message, enhanced, reason, now);
    }

    fn admit(&mut self, job: J, first_seen: Instant, now: Instant) -> Txn<J> {
        let domain = self.domain(crate::spool::domain_of(job.rcpt(0)));
        let n = job.rcpt_count() as u64;
        self.intake.received(n);
        self.domain_load(&domain, |l, b| l.received(n, b));
        self.metrics.add_volume(&domain.name, &domain.slot, n);
        Txn {
            job,
            domain,
            attempt: 1,
            first_seen,
            first_attempt: None,
            started: now,
            held: false,
        }
    }

    /// When the core wants [`Core::handle_timeout`] called next.
    pub fn next_timeout(&self) -> Option<Instant> {
        let rebalance = self.last_rebalance.map_or(self.wall.0, |t| t + REBALANCE_EVERY);
        [self.retries.next(), self.next_paced()]
            .into_iter()
            .flatten()
            .chain([rebalance])
            .min()
    }

    /// Retries that are due go out again; shared destinations are rebalanced.
    pub fn handle_timeout(&mut self, now: Instant) {
        while let Some(txn) = self.retries.pop_due(now) {
            let n = txn.job.rcpt_count() as u64;
            self.intake.retry(n);
            self.domain_load(&txn.domain, |l, b| l.retry(n, b));
            self.dispatch(txn, now);
        }
        self.paced_due(now);
        if self.last_rebalance.is_none_or(|t| now >= t + REBALANCE_EVERY) {
            self.apply_rule_news(now);
            self.rebalance(now);
            self.last_rebalance = Some(now);
        }
    }

    /// Every recipient is final: no new connections; parked ones are woken
    /// to say QUIT, busy ones finish what they have in flight.
    pub fn stop(&mut self) {
        self.stopping = true;
        for d in self.dests.values() {
            self.actions.push_back(Action::WakeAll(d.clone()));
        }
    }

    pub fn stopping(&self) -> bool {
        self.stopping
    }

    /// Connections open or opening, over every destination.
    pub fn connections_open(&self) -> usize {
        self.dests.values().map(|d| d.open.get()).sum()
    }

    /// Whether the shard takes more from its inbox (see `Intake::has_room`).
    pub fn has_room(&self) -> bool {
        self.intake.has_room()
    }

    /// What the collector has done: whether its queue refused the last
    /// batch, and how many of this shard's records it has written.
    pub fn collector(&mut self, full: bool, recorded: u64) {
        self.collector_full = full;
        self.recorded_seen = recorded;
    }

    /// No new transaction may start: the collector cannot take this shard's
    /// outcomes, or more than `MAX_UNRECORDED_PER_SHARD` of them are not
    /// written yet.
    pub fn held_back(&self) -> bool {
        self.collector_full || self.produced - self.recorded_seen > MAX_UNRECORDED_PER_SHARD
    }

    /// What to tell ingest: domains gone full or open, and the room the
    /// shard has now (see `Intake::credit`).
    pub fn credits(&mut self, due: bool, out: &mut Vec<Credit>) {
        out.append(&mut self.domain_news);
        let held_back = self.held_back();
        if let Some((allowed, received)) = self.intake.credit(held_back, due) {
            out.push(Credit::Room {
                shard: self.index,
                allowed,
                received,
            });
        }
    }

    /// Log bytes recorded and not taken yet.
    pub fn pending_bytes(&self) -> usize {
        self.recorder.pending_bytes()
    }

    /// The outcomes recorded since the last call.
    pub fn take_outcomes(&mut self) -> Option<OutcomeBatch> {
        self.recorder.take().map(|mut b| {
            b.shard = Some(self.index);
            b
        })
    }

    /// Changes a domain's load; a domain gone full or open is news for ingest.
    fn domain_load(&mut self, domain: &Domain<J>, f: impl FnOnce(&mut DomainLoad, u64) -> Option<Fullness>) {
        let mut load = domain.load.get();
        let news = f(&mut load, self.intake.bounds().domain);
        domain.load.set(load);
        let name = || Box::from(&*domain.name);
        match news {
            Some(Fullness::Full) => self.domain_news.push(Credit::DomainFull {
                shard: self.index,
                domain: name(),
            }),
            Some(Fullness::Open) => self.domain_news.push(Credit::DomainOpen {
                shard: self.index,
                domain: name(),
            }),
            None => {}
        }
    }

    /// Forgets domains no transaction uses any more, every SWEEP_EVERY new ones.
    fn inserted(&mut self) {
        self.inserts += 1;
        if self.inserts.is_multiple_of(SWEEP_EVERY) {
            self.domains.retain(|_, d| Rc::strong_count(d) > 1);
        }
    }

    /// The shard's metrics and gauges; `full` adds every labeled domain's counts.
    pub fn snapshot(&self, full: bool, now: Instant) -> ShardSnapshot {
        let metrics = &self.metrics;
        let mut snap = ShardSnapshot {
            shard: self.index,
            dns_lookups: metrics.dns_lookups,
            dns_cache_hits: metrics.dns_cache_hits,
            held: self.intake.held(),
            retry_backlog: self.intake.waiting(),
            domains_known: self.domains.len() as u64,
            destinations: self.dests.len() as u64,
            connections_open: self.connections_open() as u64,
            ..ShardSnapshot::default()
        };
        snap.troubled = self.dests.values().filter_map(|d| d.state(self.index, now)).collect();
        crate::metrics::worst_first(&mut snap.troubled);
        snap.troubled.truncate(crate::metrics::MAX_TROUBLED);
        let mut shaped = self.shaped_seconds.clone();
        for d in self.dests.values() {
            let a = d.automation.borrow();
            for active in a.in_force_now(now) {
                snap.active_rules.push(ActiveRule {
                    destination: d.label.to_string(),
                    scope: d.policy.scope.clone(),
                    rule: active.rule.name.clone(),
                    action: active.rule.action.name(),
                    ends_in_seconds: (active.until - now).as_secs_f64(),
                    shard: self.index,
                });
                let key = (d.policy.scope.clone(), active.rule.action.name());
                *shaped.entry(key).or_default() += (now - active.since).as_secs_f64();
            }
        }
        let mut limits: std::collections::BTreeMap<(String, &'static str), f64> = Default::default();
        for d in self.dests.values() {
            let mut put = |limit: &'static str, v: f64| {
                let e = limits.entry((d.policy.scope.clone(), limit)).or_insert(v);
                *e = e.min(v);
            };
            put("max_connections", f64::from(d.cap()));
            put("max_deliveries_per_connection", d.deliveries_per_connection() as f64);
            if let Some(r) = d.message_rate() {
                put("max_message_rate", r.per_second());
            }
            if let Some(r) = d.connection_rate() {
                put("max_connection_rate", r.per_second());
            }
        }
        snap.limits = limits.into_iter().collect();
        snap.rule_firings = self.rule_firings.iter().map(|(k, v)| (k.clone(), *v)).collect();
        snap.shaped_seconds = shaped.into_iter().collect();
        if !full || !metrics.enabled() {
            return snap;
        }
        let other_label: Rc<str> = Rc::from(crate::metrics::OTHER_DOMAIN);
        let label = |name: &Rc<str>| {
            if metrics.label_of(name) == name.as_ref() {
                name.clone()
            } else {
                other_label.clone()
            }
        };
        let mut gauges: HashMap<Rc<str>, DomainGauges> = HashMap::new();
        for d in self.domains.values().filter(|d| d.load.get().held > 0) {
            gauges.entry(label(&d.name)).or_default().queued += d.load.get().held;
        }
        let mut oldest = |name: &Rc<str>, first_seen: Instant| {
            let g = gauges.entry(label(name)).or_default();
            g.oldest_seconds = g.oldest_seconds.max(now.duration_since(first_seen).as_secs_f64());
        };
        for d in self.dests.values() {
            for t in d.queue.borrow().iter() {
                oldest(&t.domain.name, t.first_seen);
            }
        }
        self.retries.each(|name, first_seen| oldest(name, first_seen));
        for d in self.domains.values() {
            d.each_waiting(|t| oldest(&d.name, t.first_seen));
        }
        for d in self.dests.values() {
            gauges.entry(label(&d.owner)).or_default().connections_open += d.open.get() as u64;
        }
        // Time throttled: for the domains with labels of their own, their destination's.
        for d in self.domains.values() {
            let Some(dest) = d.dest() else { continue };
            if label(&d.name) != d.name {
                continue;
            }
            let secs = dest.automation.borrow().throttled(now).as_secs_f64();
            if secs > 0.0 {
                gauges.entry(d.name.clone()).or_default().throttled_seconds = secs;
            }
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
}
