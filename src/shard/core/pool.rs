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

use super::{Action, Core, Job, Txn};
use crate::config::{Relay, SourceAddress};
use crate::tls::TlsPolicy;

/// A host to connect to: its name (for the log and TLS) and one of its addresses.
#[derive(Debug, Clone)]
pub(crate) struct Candidate {
    pub name: Rc<str>,
    pub addr: SocketAddr,
}

/// What connections to a destination must be like.
pub(super) struct ConnPolicy {
    pub tls: TlsPolicy,
    pub sources: Rc<[SourceAddress]>,
    pub relay: Option<Arc<Relay>>,
}

/// Where mail goes: a route's HOST:PORT or a domain's MX host set, and the
/// connections to it. Domains with the same route or MX set share one.
pub(crate) struct Dest<J> {
    pub label: Rc<str>,
    /// Its name on the connection budget board (the same on every shard).
    key: Rc<str>,
    /// This shard's share of the destination's connections, and whether
    /// other shards want it too (then it is rebalanced periodically).
    share: Cell<u32>,
    pub(super) shared: Cell<bool>,
    /// Connections leaving to give their slot to another shard.
    leaving: Cell<u32>,
    /// The shard turn in which the board last refused a connection (not asked again that turn).
    refused_turn: Cell<u64>,
    /// The domain that first routed here: connection metrics count under it.
    pub owner: Rc<str>,
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
}

impl<J> Dest<J> {
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

impl<J: Job> Core<J> {
    /// The destination `label` under `policy` (domains with different TLS
    /// policies or source addresses never share a connection).
    pub(super) fn dest(&mut self, label: &str, policy: ConnPolicy, hosts: Rc<[Candidate]>, owner: &str) -> Rc<Dest<J>> {
        let sources: Vec<String> = policy.sources.iter().map(|s| s.address.to_string()).collect();
        let key = format!("{label} tls={} from={}", policy.tls, sources.join(","));
        if let Some(d) = self.dests.get(key.as_str()) {
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
        self.dests.insert(Rc::from(key), d.clone());
        d
    }

    /// Wakes a parked connection, or opens another while the queue outgrows the parked ones.
    pub(super) fn kick(&mut self, dest: &Rc<Dest<J>>) {
        if dest.parked.get() > 0 {
            self.actions.push_back(Action::Wake(dest.clone()));
        }
        let queued = dest.queue.borrow().len();
        // Until one connection has got through EHLO, one attempt at a time:
        // a dead or refusing destination costs one failure, not a burst.
        let probing = dest.ready.get() == 0 && dest.open.get() > 0;
        if !self.stopping
            && !probing
            && (dest.open.get() as u32) < self.conn_cap
            && queued > dest.parked.get()
            && self.budget_allows(dest)
        {
            dest.open.set(dest.open.get() + 1);
            self.actions.push_back(Action::Open(dest.clone()));
        }
    }

    /// Asks the board for one more connection to `dest` (at most once a turn
    /// when refused).
    fn budget_allows(&mut self, dest: &Rc<Dest<J>>) -> bool {
        if dest.refused_turn.get() == self.turn {
            return false;
        }
        let want = (dest.queue.borrow().len() + dest.open.get()) as u64;
        let g = self.budgets.open(&dest.key, self.index, want, self.conn_cap);
        dest.share.set(g.share);
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
    pub fn connection_ready(&mut self, dest: &Rc<Dest<J>>) {
        dest.ready.set(dest.ready.get() + 1);
        dest.failures.set(0);
        dest.down_until.set(None);
        self.kick(dest);
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
    /// got ready with any of them (the reason, and whether the relay refused
    /// our credentials). Its slot goes back to the board.
    pub fn connection_closed(&mut self, dest: &Rc<Dest<J>>, failed: Option<(&str, bool)>, now: Instant) {
        dest.open.set(dest.open.get() - 1);
        self.budgets.closed(&dest.key, self.index);
        if let Some((reason, auth)) = failed {
            let pause = auth.then_some(self.cfg.retry.max_delay);
            self.destination_failed(dest, reason, pause, now);
        }
        if dest.has_work() {
            self.kick(dest);
        }
    }

    /// A connection could not be set up. With no other live connection the
    /// destination is backed off and everything queued for it is deferred;
    /// `pause` backs it off for at least that long (a relay refusing our credentials).
    fn destination_failed(&mut self, dest: &Rc<Dest<J>>, reason: &str, pause: Option<Duration>, now: Instant) {
        if dest.ready.get() > 0 && pause.is_none() {
            return;
        }
        let failures = dest.failures.get() + 1;
        dest.failures.set(failures);
        let backoff = self.cfg.retry.delay(failures).max(pause.unwrap_or_default());
        dest.down_until.set(Some(now + backoff));
        *dest.last_error.borrow_mut() = reason.to_string();
        let queued: Vec<Txn<J>> = dest.queue.borrow_mut().drain(..).collect();
        for txn in queued {
            self.defer(txn, reason, Some(dest), now);
        }
    }

    /// The next transaction for a connection to `dest`, started at `now`;
    /// none while the shard is held back by the collector.
    pub fn next_txn(&mut self, dest: &Dest<J>, now: Instant) -> Option<Txn<J>> {
        if self.held_back() {
            return None;
        }
        let mut txn = dest.queue.borrow_mut().pop_front()?;
        txn.started = now;
        txn.first_attempt.get_or_insert(now);
        Some(txn)
    }

    /// A transaction a connection took but never sent (it ended first): first in line again.
    pub fn unsent(&mut self, dest: &Dest<J>, txn: Txn<J>) {
        dest.queue.borrow_mut().push_front(txn);
    }

    /// Whether a connection to `dest` should leave after its transactions
    /// in flight, giving its slot to a shard below its share (counts it as leaving).
    pub fn should_leave(&mut self, dest: &Dest<J>) -> bool {
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
    pub(super) fn rebalance(&mut self) {
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
