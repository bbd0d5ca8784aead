//! Destinations and their connections: each destination's queue, how many
//! connections it has open, ready and parked, when to open another (one at
//! a time until one gets through EHLO, then while the queue outgrows the
//! parked ones, within this shard's share of the process-wide cap on the
//! connection board), when one must leave to give its slot to another
//! shard, and a destination going down (every connection attempt failed:
//! backed off, its queue deferred) and coming back.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use event_listener::Event;

use super::automation::Automation;
use super::pace::Pacer;
use super::{Action, Core, Job, Txn};
use crate::config::{Relay, SourceAddress};
use crate::local::Local;
use crate::shaping::{Policy, Rate};
use crate::tls::TlsPolicy;

/// Why a connection never got ready with any host.
pub(crate) struct SetupFailure<'a> {
    pub reason: &'a str,
    /// The relay refused our credentials: the destination pauses.
    pub auth: bool,
    /// The server's reply that refused us, if one did.
    pub reply: Option<&'a str>,
    /// What went wrong, when no reply says it.
    pub kind: Local,
}

/// A host to connect to: its name (for the log and TLS) and one of its addresses.
#[derive(Debug, Clone)]
pub(crate) struct Candidate {
    pub name: Rc<str>,
    pub addr: SocketAddr,
}

/// What applies to a destination: its shaping policy, and its relay if it is one.
pub(super) struct ConnPolicy {
    pub shaping: Rc<Policy>,
    pub relay: Option<Arc<Relay>>,
}

/// Where mail goes: a route's HOST:PORT or a domain's MX host set, and the
/// connections to it. Domains with the same route or MX set share one.
pub(crate) struct Dest<J> {
    pub label: Rc<str>,
    /// Its name on the connection budget board (the same on every shard).
    pub(super) key: Rc<str>,
    /// This shard's share of the destination's connections, and whether
    /// other shards want it too (then it is rebalanced periodically).
    share: Cell<u32>,
    /// Its part of the destination's rates, from the board (see `Grant::rate_share`).
    rate_share: Cell<u32>,
    pub(super) shared: Cell<bool>,
    /// Connections leaving to give their slot to another shard.
    leaving: Cell<u32>,
    /// The shard turn in which the board last refused a connection (not asked again that turn).
    refused_turn: Cell<u64>,
    /// The domain that first routed here: connection metrics count under it.
    pub owner: Rc<str>,
    /// That domain, once one of its transactions has finished here: its
    /// metrics slot, so that a transaction's counts under the owner need
    /// no lookup by name.
    pub(super) owner_domain: RefCell<std::rc::Weak<super::Domain<J>>>,
    /// Its limits (`shaping.rs`); domains of different scopes never share a destination.
    pub policy: Rc<Policy>,
    /// Slots for its transactions (`max_message_rate`) and connections (`max_connection_rate`).
    message_pace: Cell<Pacer>,
    connection_pace: Cell<Pacer>,
    /// A timer is set for its next slot (see `Core::handle_timeout`).
    pace_wake: Cell<Option<Instant>>,
    /// Its automation rules' hits and what they put in force.
    pub(super) automation: RefCell<Automation>,
    pub tls: TlsPolicy,
    /// Local addresses its connections are bound to, in rotation (empty: any).
    sources: Rc<[SourceAddress]>,
    /// Set when the destination is a relay (AUTH, implicit TLS).
    pub relay: Option<Arc<Relay>>,
    next_source: Cell<usize>,
    /// In the order to try (MX preference, then each host's addresses).
    pub hosts: RefCell<Rc<[Candidate]>>,
    pub(super) queue: RefCell<VecDeque<Txn<J>>>,
    /// Connections open or opening.
    pub(super) open: Cell<usize>,
    /// Connections that finished EHLO and are alive.
    ready: Cell<usize>,
    /// Connections parked, waiting for work (the I/O layer counts them).
    pub parked: Cell<usize>,
    /// What wakes them (notified by the I/O layer on `Action::Wake`).
    pub wake: Event,
    pub(super) down_until: Cell<Option<Instant>>,
    failures: Cell<u32>,
    pub(super) last_error: RefCell<String>,
    /// When it last failed (a connection, or a transaction deferred whole).
    pub(super) last_error_at: Cell<Option<Instant>>,
}

impl<J> Dest<J> {
    /// Its connection cap for the whole process (a rule's override first).
    pub fn cap(&self) -> u32 {
        self.overridden(|k| k.max_connections)
            .unwrap_or(self.policy.max_connections)
    }

    /// Its `max_message_rate` (a rule's override first).
    /// Its `max_message_rate` (a rule's override first), and its part of
    /// `fleet_message_rate` among the fleet's nodes alive, whichever is slower.
    pub fn message_rate(&self) -> Option<Rate> {
        let own = self.overridden(|k| k.max_message_rate).or(self.policy.max_message_rate);
        let fleet = self
            .policy
            .fleet_message_rate
            .map(|r| r.part(crate::fleet::nodes_alive()));
        match (own, fleet) {
            (Some(a), Some(b)) => Some(a.slower(b)),
            (a, b) => a.or(b),
        }
    }

    /// Its `max_connection_rate` (a rule's override first).
    pub fn connection_rate(&self) -> Option<Rate> {
        self.overridden(|k| k.max_connection_rate)
            .or(self.policy.max_connection_rate)
    }

    /// Transactions a connection may carry (a rule's override first).
    pub fn deliveries_per_connection(&self) -> usize {
        self.overridden(|k| k.max_deliveries_per_connection)
            .unwrap_or(self.policy.max_deliveries_per_connection)
    }

    /// Recipients per transaction (a rule's override first).
    pub fn rcpts_per_txn(&self) -> usize {
        self.overridden(|k| k.max_rcpts_per_txn)
            .unwrap_or(self.policy.max_rcpts_per_txn)
    }

    /// Transactions in flight on a connection opened now (a rule's override first).
    pub fn pipeline_window(&self) -> usize {
        self.overridden(|k| k.pipeline_window)
            .unwrap_or(self.policy.pipeline_window)
    }

    /// What that window may grow to: a rule's `pipeline_window` holds it
    /// there unless the rule sets `pipeline_window_max` too.
    pub fn pipeline_window_max(&self) -> usize {
        let max = match (
            self.overridden(|k| k.pipeline_window),
            self.overridden(|k| k.pipeline_window_max),
        ) {
            (_, Some(m)) => m,
            (Some(w), None) => w,
            (None, None) => self.policy.pipeline_window_max,
        };
        max.max(self.pipeline_window())
    }

    fn overridden<T>(&self, f: impl FnOnce(&crate::shaping::Knobs) -> Option<T>) -> Option<T> {
        self.automation.borrow().overridden.as_ref().and_then(|(_, k)| f(k))
    }

    /// Remembers why it last failed, for `/status`.
    pub(super) fn failed_with(&self, reason: &str, now: Instant) {
        let mut e = self.last_error.borrow_mut();
        e.clear();
        e.push_str(reason);
        self.last_error_at.set(Some(now));
    }

    /// How it is, for `/status`, if it has failed.
    pub(super) fn state(&self, shard: usize, now: Instant) -> Option<crate::metrics::DestState> {
        let at = self.last_error_at.get()?;
        let suspended = self
            .automation
            .borrow()
            .suspended
            .as_ref()
            .filter(|a| now < a.until)
            .map(|a| a.until);
        let down = self.down_until.get().filter(|&t| now < t);
        let (state, until) = match (suspended, down) {
            (Some(t), _) => ("suspended", Some(t)),
            (None, Some(t)) => ("backing-off", Some(t)),
            (None, None) => ("up", None),
        };
        Some(crate::metrics::DestState {
            destination: self.label.to_string(),
            shard,
            state,
            until_seconds: until.map(|t| (t - now).as_secs_f64()),
            last_error: self.last_error.borrow().clone(),
            last_error_seconds_ago: now.saturating_duration_since(at).as_secs_f64(),
            failures: self.failures.get(),
            queued: self.queue.borrow().len() as u64,
            connections: self.open.get() as u64,
        })
    }

    /// A rule suspended it, until after `now`.
    pub fn suspended(&self, now: Instant) -> bool {
        self.suspension(now).is_some()
    }

    /// The name of the rule that suspended it, until after `now`.
    pub(super) fn suspension(&self, now: Instant) -> Option<String> {
        let a = self.automation.borrow();
        a.suspended
            .as_ref()
            .filter(|a| now < a.until)
            .map(|a| a.rule.name.clone())
    }

    /// A rule makes its recipients bounce, until after `now`: the rule and why.
    pub(super) fn bouncing(&self, now: Instant) -> Option<Arc<crate::shaping::Rule>> {
        let a = self.automation.borrow();
        a.bouncing.as_ref().filter(|a| now < a.until).map(|a| a.rule.clone())
    }

    /// Whether a transaction is queued for it.
    pub fn has_work(&self) -> bool {
        !self.queue.borrow().is_empty()
    }

    /// The next source address of the rotation, if it has any.
    pub fn pick_source(&self) -> Option<SourceAddress> {
        if self.sources.is_empty() {
            return None;
        }
        let n = self.next_source.get();
        self.next_source.set(n.wrapping_add(1));
        Some(self.sources[n % self.sources.len()].clone())
    }
}

/// Queue slots a destination keeps however empty its queue gets.
const QUEUE_KEEP: usize = 1024;

impl<J: Job> Core<J> {
    /// The destination `label` under `policy` (domains with different TLS
    /// policies or source addresses never share a connection).
    pub(super) fn dest(&mut self, label: &str, policy: ConnPolicy, hosts: Rc<[Candidate]>, owner: &str) -> Rc<Dest<J>> {
        let shaping = policy.shaping;
        let sources: Vec<String> = shaping.sources.iter().map(|s| s.address.to_string()).collect();
        let key = format!(
            "{label} tls={} from={} scope={}",
            shaping.tls,
            sources.join(","),
            shaping.scope
        );
        if let Some(d) = self.dests.get(key.as_str()) {
            return d.clone();
        }
        let d = Rc::new(Dest {
            label: Rc::from(label),
            key: Rc::from(key.as_str()),
            share: Cell::new(shaping.max_connections),
            // Until the board first answers (at the first connection's opening).
            rate_share: Cell::new(shaping.max_connections),
            shared: Cell::new(false),
            leaving: Cell::new(0),
            refused_turn: Cell::new(u64::MAX),
            owner: Rc::from(owner),
            owner_domain: RefCell::new(std::rc::Weak::new()),
            message_pace: Cell::default(),
            connection_pace: Cell::default(),
            pace_wake: Cell::new(None),
            automation: RefCell::default(),
            tls: shaping.tls,
            sources: shaping.sources.clone().into(),
            policy: shaping,
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
            last_error_at: Cell::new(None),
        });
        self.dests.insert(Rc::from(key), d.clone());
        self.fleet_rules_for(&d);
        d
    }

    /// Wakes a parked connection, or opens another while the queue outgrows the parked ones.
    pub(super) fn kick(&mut self, dest: &Rc<Dest<J>>, now: Instant) {
        if dest.suspended(now) {
            return;
        }
        if dest.parked.get() > 0 {
            self.actions.push_back(Action::Wake(dest.clone()));
        }
        let queued = dest.queue.borrow().len();
        // Until one connection has got through EHLO, one attempt at a time:
        // a dead or refusing destination costs one failure, not a burst.
        let probing = dest.ready.get() == 0 && dest.open.get() > 0;
        // A paced destination's parked connections wait for slots: another
        // one helps only when none is free.
        let wanted = match dest.message_rate() {
            Some(_) => queued > 0 && dest.parked.get() == 0,
            None => queued > dest.parked.get(),
        };
        if !self.stopping
            && !probing
            && (dest.open.get() as u32) < dest.cap()
            && wanted
            && self.connection_slot_due(dest, now)
            && self.budget_allows(dest)
        {
            if let Some(rate) = dest.connection_rate() {
                let _ = self.take_slot(dest, &dest.connection_pace, rate, now);
            }
            dest.open.set(dest.open.get() + 1);
            self.actions.push_back(Action::Open(dest.clone()));
        }
    }

    /// Whether `max_connection_rate` lets a connection open now (if not, a
    /// timer brings the destination back at its next slot).
    fn connection_slot_due(&mut self, dest: &Rc<Dest<J>>, now: Instant) -> bool {
        let Some(rate) = dest.connection_rate() else {
            return true;
        };
        // Only asked here (a copy); the slot is taken when the connection opens.
        let copy = Cell::new(dest.connection_pace.get());
        match self.take_slot(dest, &copy, rate, now) {
            Ok(()) => true,
            Err(at) => {
                self.pace_timer(dest, at);
                false
            }
        }
    }

    /// The time between two of this shard's events for `dest` at `rate`: the
    /// destination's rate for the whole process, divided among the shards
    /// that carry it as its connections are. None while the shard has no
    /// part of it (another shard has not let go of its part yet).
    fn pace_interval(&self, dest: &Dest<J>, rate: Rate) -> Option<Duration> {
        let (cap, share) = (dest.cap().max(1), dest.rate_share.get().min(dest.cap().max(1)));
        (share > 0).then(|| rate.interval() * cap / share)
    }

    /// Takes one of `pace`'s slots for `dest` at `rate`, or answers when to look again.
    fn take_slot(&self, dest: &Dest<J>, pace: &Cell<Pacer>, rate: Rate, now: Instant) -> Result<(), Instant> {
        let Some(interval) = self.pace_interval(dest, rate) else {
            return Err(now + super::REBALANCE_EVERY);
        };
        let mut p = pace.get();
        let slot = p.take(now, interval);
        pace.set(p);
        slot
    }

    /// Brings `dest` back (`kick`) at `at`, its next pacing slot.
    pub(super) fn pace_timer(&mut self, dest: &Rc<Dest<J>>, at: Instant) {
        if dest.pace_wake.get().is_some_and(|t| t <= at) {
            return;
        }
        dest.pace_wake.set(Some(at));
        self.paced.push(Paced { at, dest: dest.clone() });
    }

    /// Destinations whose pacing slot has come: their connections look again.
    pub(super) fn paced_due(&mut self, now: Instant) {
        while self.paced.peek().is_some_and(|p| p.at <= now) {
            let p = self.paced.pop().expect("peeked");
            if p.dest.pace_wake.get() == Some(p.at) {
                p.dest.pace_wake.set(None);
                self.lift_due(&p.dest, now);
                self.kick(&p.dest, now);
            }
        }
    }

    /// When the next pacing slot is.
    pub(super) fn next_paced(&self) -> Option<Instant> {
        self.paced.peek().map(|p| p.at)
    }

    /// Asks the board for one more connection to `dest` (at most once a turn
    /// when refused).
    fn budget_allows(&mut self, dest: &Rc<Dest<J>>) -> bool {
        if dest.refused_turn.get() == self.turn {
            return false;
        }
        let want = (dest.queue.borrow().len() + dest.open.get()) as u64;
        let g = self.budgets.open(&dest.key, self.index, want, dest.cap());
        dest.share.set(g.share);
        dest.rate_share.set(g.rate_share);
        if g.shared && !dest.shared.replace(true) {
            self.shared_dests.push(dest.clone());
        }
        if !g.granted {
            dest.refused_turn.set(self.turn);
        }
        g.granted
    }

    /// A connection to `dest` got through EHLO: the destination works, and
    /// more connections open if its queue wants them.
    pub fn connection_ready(&mut self, dest: &Rc<Dest<J>>, now: Instant) {
        dest.ready.set(dest.ready.get() + 1);
        dest.failures.set(0);
        dest.down_until.set(None);
        self.kick(dest, now);
    }

    /// A session with one of `dest`'s hosts ended; `was_ready` when it had
    /// got through EHLO, `leaving` when it left to give its slot away.
    pub fn session_ended(&mut self, dest: &Dest<J>, was_ready: bool, leaving: bool) {
        if was_ready {
            dest.ready.set(dest.ready.get() - 1);
        }
        if leaving {
            dest.leaving.set(dest.leaving.get() - 1);
        }
    }

    /// A connection to `dest` ended (every host it tried). `failed`: it never
    /// got ready with any of them. Its slot goes back to the board; the
    /// failure counts against the destination's rules (a reply as a reply,
    /// volley's own failure as local), and unless a rule suspends it, the
    /// destination is backed off.
    pub fn connection_closed(&mut self, dest: &Rc<Dest<J>>, failed: Option<SetupFailure<'_>>, now: Instant) {
        dest.open.set(dest.open.get() - 1);
        self.budgets.closed(&dest.key, self.index);
        if let Some(f) = failed {
            match f.reply {
                Some(reply) => self.automation_hit(dest, reply, None, false, now),
                None => self.automation_hit(dest, f.reason, Some(f.kind), false, now),
            }
            if !dest.suspended(now) {
                let pause = f.auth.then_some(self.cfg.retry.max_delay);
                self.destination_failed(dest, f.kind, f.reason, pause, now);
            }
        }
        if dest.has_work() {
            self.kick(dest, now);
        }
    }

    /// A connection could not be set up. With no other live connection the
    /// destination is backed off and everything queued for it is deferred;
    /// `pause` backs it off for at least that long (a relay refusing our credentials).
    fn destination_failed(
        &mut self,
        dest: &Rc<Dest<J>>,
        kind: Local,
        reason: &str,
        pause: Option<Duration>,
        now: Instant,
    ) {
        if dest.ready.get() > 0 && pause.is_none() {
            return;
        }
        let failures = dest.failures.get() + 1;
        dest.failures.set(failures);
        let backoff = self.cfg.retry.delay(failures).max(pause.unwrap_or_default());
        dest.down_until.set(Some(now + backoff));
        dest.failed_with(reason, now);
        let queued: Vec<Txn<J>> = dest.queue.borrow_mut().drain(..).collect();
        for txn in queued {
            self.defer(txn, kind, reason, Some(dest), now);
        }
    }

    /// The next transaction for a connection to `dest`, started at `now`;
    /// none while the shard is held back by the collector, or before the
    /// destination's next `max_message_rate` slot (a timer then brings it back).
    pub fn next_txn(&mut self, dest: &Rc<Dest<J>>, now: Instant) -> Option<Txn<J>> {
        if self.held_back() || !dest.has_work() || dest.suspended(now) {
            return None;
        }
        if let Some(rate) = dest.message_rate()
            && let Err(at) = self.take_slot(dest, &dest.message_pace, rate, now)
        {
            self.pace_timer(dest, at);
            return None;
        }
        loop {
            let mut txn = {
                let mut q = dest.queue.borrow_mut();
                let txn = q.pop_front()?;
                // A burst's room goes back once the queue has drained to an
                // eighth of it (a destination that once held 100,000 would
                // otherwise keep ~20 MB while its recipients wait for retries).
                if q.capacity() > QUEUE_KEEP && q.len() < q.capacity() / 8 {
                    let keep = (q.len() * 2).max(QUEUE_KEEP);
                    q.shrink_to(keep);
                }
                txn
            };
            if txn.held && now >= txn.first_seen + txn.domain.retry().max_age {
                // Waited for a suspension to end past max_age.
                let reason = format!("not sent within max_age: {} was suspended", dest.label);
                self.defer(txn, Local::Suspended, &reason, Some(dest), now);
                continue;
            }
            txn.started = now;
            txn.first_attempt.get_or_insert(now);
            return Some(txn);
        }
    }

    /// A transaction a connection took but never sent (it ended first): first in line again.
    pub fn unsent(&mut self, dest: &Dest<J>, txn: Txn<J>) {
        dest.queue.borrow_mut().push_front(txn);
    }

    /// Whether a connection to `dest` has something to send now: queued,
    /// and its next `max_message_rate` slot has come (if not, a timer brings
    /// the destination back then).
    pub fn work_now(&mut self, dest: &Rc<Dest<J>>, now: Instant) -> bool {
        if !dest.has_work() || dest.suspended(now) {
            return false;
        }
        let Some(rate) = dest.message_rate() else {
            return true;
        };
        // As `next_txn` would take it (a copy): a connection told there is
        // work must find it there, or it would spin.
        let copy = Cell::new(dest.message_pace.get());
        match self.take_slot(dest, &copy, rate, now) {
            Ok(()) => true,
            Err(at) => {
                self.pace_timer(dest, at);
                false
            }
        }
    }

    /// Whether a connection to `dest` should leave after its transactions
    /// in flight, giving its slot to a shard below its share (counts it as leaving).
    pub fn should_leave(&mut self, dest: &Dest<J>) -> bool {
        let staying = dest.open.get() as u32 - dest.leaving.get();
        let over_share = dest.shared.get() && staying > dest.share.get().max(1);
        if over_share || staying > dest.cap() {
            dest.leaving.set(dest.leaving.get() + 1);
            return true;
        }
        false
    }

    /// Tells the board this shard's work for the destinations other shards
    /// want too, and takes its new shares: a shard over its share lets
    /// connections go, one under it opens more.
    pub(super) fn rebalance(&mut self, now: Instant) {
        // Destinations this shard took whole before another shard wanted them.
        for key in self.budgets.wanted_elsewhere(self.index) {
            if let Some(d) = self.dests.get(&*key)
                && !d.shared.replace(true)
            {
                self.shared_dests.push(d.clone());
            }
        }
        let dests = std::mem::take(&mut self.shared_dests);
        let mut keep = Vec::with_capacity(dests.len());
        for d in dests {
            let want = (d.queue.borrow().len() + d.open.get()) as u64;
            let g = self.budgets.rebalance(&d.key, self.index, want, d.cap());
            d.share.set(g.share);
            d.rate_share.set(g.rate_share);
            if !g.shared && want == 0 {
                d.shared.set(false);
                continue;
            }
            if (d.open.get() as u32) < g.share {
                self.kick(&d, now);
            }
            keep.push(d);
        }
        keep.append(&mut self.shared_dests);
        self.shared_dests = keep;
    }

    /// Whether `addr` recently failed a TLS handshake (opportunistic policy).
    pub fn tls_broken(&mut self, addr: SocketAddr, now: Instant) -> bool {
        match self.no_tls_until.get(&addr) {
            Some(until) if now < *until => true,
            Some(_) => {
                self.no_tls_until.remove(&addr);
                false
            }
            None => false,
        }
    }

    /// `addr` failed a TLS handshake: plaintext to it for `tls_fallback`.
    pub fn remember_tls_broken(&mut self, addr: SocketAddr, now: Instant) {
        self.no_tls_until.insert(addr, now + self.cfg.tls_fallback);
    }
}

/// A destination waiting for its next pacing slot.
pub(super) struct Paced<J> {
    at: Instant,
    dest: Rc<Dest<J>>,
}

impl<J> PartialEq for Paced<J> {
    fn eq(&self, o: &Self) -> bool {
        self.at == o.at
    }
}
impl<J> Eq for Paced<J> {}
impl<J> PartialOrd for Paced<J> {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl<J> Ord for Paced<J> {
    // Reversed: the earliest first out of a max-heap.
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        o.at.cmp(&self.at)
    }
}
