//! Routing and the MX cache: a domain's route (a configured one, or its MX
//! answer until the answer's clamped TTL runs out), the transactions that
//! wait for a lookup, and where a transaction goes when it is dispatched.
//! Domains with the same route or MX host set share one destination.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::Instant;

use super::pool::{Candidate, ConnPolicy};
use super::{Action, Core, Dest, Job, Txn};
use crate::config::{Retry, Target};
use crate::dns::{MxAnswer, MxHost};
use crate::local::Local;
use crate::metrics::DomainSlot;
use crate::shard::intake::DomainLoad;
use crate::smtp::Enhanced;

pub struct Domain<J> {
    pub(crate) name: Rc<str>,
    route: RefCell<DomainRoute<J>>,
    /// Its retry schedule (its destination's policy, once it has one).
    retry: RefCell<Rc<Retry>>,
    /// Its handle into the shard's metrics.
    pub(super) slot: Rc<DomainSlot>,
    /// Its recipients on the shard (not final yet, waiting for a retry, full).
    pub(super) load: Cell<DomainLoad>,
}

impl<J> Domain<J> {
    /// The destination it routes to, when that is known (expired or not).
    pub(super) fn dest(&self) -> Option<Rc<Dest<J>>> {
        match &*self.route.borrow() {
            DomainRoute::Fixed(d) | DomainRoute::Known { dest: d, .. } => Some(d.clone()),
            _ => None,
        }
    }

    /// Calls `f` with each transaction waiting for this domain's lookup.
    pub(super) fn each_waiting(&self, mut f: impl FnMut(&Txn<J>)) {
        if let DomainRoute::Resolving(waiting) = &*self.route.borrow() {
            waiting.iter().for_each(&mut f);
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub(super) fn retry(&self) -> Rc<Retry> {
        self.retry.borrow().clone()
    }
}

/// Where a domain's mail goes, as far as the shard knows.
enum DomainRoute<J> {
    /// A configured route: no lookup.
    Fixed(Rc<Dest<J>>),
    /// Not looked up yet, or the last answer expired or failed.
    Unknown,
    /// A lookup is under way; these transactions wait for it.
    Resolving(Vec<Txn<J>>),
    /// The MX host set, until the answer's (clamped) TTL runs out.
    Known { dest: Rc<Dest<J>>, until: Instant },
    /// The domain takes no mail (NXDOMAIN, null MX): bounce until `until`.
    Refused {
        enhanced: Enhanced,
        reason: Rc<str>,
        until: Instant,
    },
}

/// Where `dispatch` found a transaction must go.
enum Way<J> {
    Dest(Rc<Dest<J>>),
    Bounce(Enhanced, Rc<str>),
    Waiting,
    Resolve,
    NoResolver,
}

impl<J: Job> Core<J> {
    /// The shard's entry for a domain (any case), made on first use.
    pub(super) fn domain(&mut self, name: &str) -> Rc<Domain<J>> {
        // Most domains arrive lower-case: look those up without allocating.
        if !name.bytes().any(|b| b.is_ascii_uppercase())
            && let Some(d) = self.domains.get(name)
        {
            return d.clone();
        }
        let lower = name.to_ascii_lowercase();
        if let Some(d) = self.domains.get(lower.as_str()) {
            return d.clone();
        }
        let routes = self.routes.clone();
        let (route, retry) = match routes.lookup(&lower) {
            Some(t) => {
                let policy = self.policy_of(&lower, &[&t.host]);
                let retry = Rc::new(policy.shaping.retry.clone());
                (DomainRoute::Fixed(self.route_dest(t, policy, &lower)), retry)
            }
            None => (
                DomainRoute::Unknown,
                Rc::new(self.policy_of(&lower, &[]).shaping.retry.clone()),
            ),
        };
        let name: Rc<str> = Rc::from(lower.as_str());
        let d = Rc::new(Domain {
            slot: self.metrics.slot_for(&name),
            name,
            route: RefCell::new(route),
            retry: RefCell::new(retry),
            load: Cell::new(DomainLoad::default()),
        });
        self.domains.insert(lower.into_boxed_str(), d.clone());
        self.inserted();
        d
    }

    /// What applies to a domain's destination, its MX hosts (or route host) being `mx`.
    fn policy_of(&self, domain: &str, mx: &[&str]) -> ConnPolicy {
        ConnPolicy {
            shaping: Rc::new(self.shaping.policy(&self.cfg, domain, mx)),
            relay: None,
        }
    }

    fn route_dest(&mut self, target: &Target, mut policy: ConnPolicy, owner: &str) -> Rc<Dest<J>> {
        let hosts = [Candidate {
            name: Rc::from(target.host.as_str()),
            addr: target.addr,
        }];
        if let Some(tls) = target.relay.as_ref().and_then(|r| r.tls) {
            Rc::make_mut(&mut policy.shaping).tls = tls;
        }
        policy.relay = target.relay.clone();
        self.dest(&target.label, policy, hosts.into(), owner)
    }

    /// The destination of an MX host set; the latest answer sets its host order.
    fn mx_dest(&mut self, hosts: &[MxHost], policy: ConnPolicy, owner: &str) -> Rc<Dest<J>> {
        let port = self.cfg.mx_port;
        let mut names: Vec<&str> = hosts.iter().map(|h| h.name.as_str()).collect();
        names.sort_unstable();
        let label = format!("{}:{port}", names.join(","));
        let candidates: Rc<[Candidate]> = hosts
            .iter()
            .flat_map(|h| {
                let name: Rc<str> = Rc::from(h.name.as_str());
                h.addrs.iter().map(move |ip| Candidate {
                    name: name.clone(),
                    addr: SocketAddr::new(*ip, port),
                })
            })
            .collect();
        let dest = self.dest(&label, policy, candidates.clone(), owner);
        *dest.hosts.borrow_mut() = candidates;
        dest
    }

    /// Sends a transaction on its way: onto its destination's queue, into the
    /// wait for its domain's MX lookup, or straight to its outcome when the
    /// domain takes no mail, or its destination is down.
    pub(super) fn dispatch(&mut self, txn: Txn<J>, now: Instant) {
        let domain = txn.domain.clone();
        let way = {
            let route = domain.route.borrow();
            match &*route {
                DomainRoute::Fixed(d) => Way::Dest(d.clone()),
                DomainRoute::Known { dest, until } if now < *until => {
                    self.metrics.dns_cache_hits += 1;
                    Way::Dest(dest.clone())
                }
                DomainRoute::Refused {
                    enhanced,
                    reason,
                    until,
                } if now < *until => Way::Bounce(*enhanced, reason.clone()),
                DomainRoute::Resolving(_) => Way::Waiting,
                _ if self.resolver => Way::Resolve,
                _ => Way::NoResolver,
            }
        };
        let dest = match way {
            Way::Dest(d) => d,
            Way::Bounce(enhanced, reason) => return self.bounce(txn, Local::NoSuchDomain, enhanced, &reason, now),
            Way::Waiting => {
                if let DomainRoute::Resolving(waiting) = &mut *domain.route.borrow_mut() {
                    waiting.push(txn);
                }
                return;
            }
            Way::Resolve => {
                *domain.route.borrow_mut() = DomainRoute::Resolving(vec![txn]);
                self.actions.push_back(Action::Resolve(domain));
                return;
            }
            Way::NoResolver => {
                let reason = format!("no route for {} and no resolver", domain.name);
                return self.defer(txn, Local::NoResolver, &reason, None, now);
            }
        };
        self.enqueue(txn, &dest, now);
    }

    /// Queues a transaction for its destination, unless the destination is
    /// down or a rule makes it bounce.
    fn enqueue(&mut self, mut txn: Txn<J>, dest: &Rc<Dest<J>>, now: Instant) {
        if let Some(rule) = dest.bouncing(now) {
            return self.bounce_by_rule(txn, dest, &rule, now);
        }
        if let Some(until) = dest.down_until.get()
            && now < until
        {
            let reason = format!(
                "delivery to {} temporarily suspended: {}",
                dest.label,
                dest.last_error.borrow()
            );
            return self.defer(txn, Local::DestinationDown, &reason, Some(dest), now);
        }
        // A destination may take fewer recipients per transaction than ingest groups.
        let max = dest.rcpts_per_txn().max(1);
        if dest.suspended(now) {
            txn.held = true;
            self.expiry_timer(dest, txn.first_seen + txn.domain.retry().max_age);
        }
        let mut queue = dest.queue.borrow_mut();
        // The usual transaction: one recipient, or a few with ASCII addresses.
        let n = txn.job.rcpt_count();
        if n <= max && (0..n).all(|i| txn.job.rcpt_is_ascii(i)) {
            queue.push_back(txn);
        } else {
            // Recipients with UTF-8 addresses go apart: a server without
            // SMTPUTF8 refuses them, not the others (RFC 6531 §3.2).
            let utf8: Vec<usize> = (0..n).filter(|&i| !txn.job.rcpt_is_ascii(i)).collect();
            if !utf8.is_empty() && utf8.len() < n {
                let apart = txn.with_job(|j| j.take(&utf8));
                push_split(&mut queue, apart, max);
            }
            push_split(&mut queue, txn, max);
        }
        drop(queue);
        self.kick(dest, now);
    }

    /// Takes an MX answer for a domain and releases the transactions that waited for it.
    pub fn resolved(&mut self, domain: &Domain<J>, answer: MxAnswer, now: Instant) {
        let dns = self.cfg.dns.clone();
        let kind = match &answer {
            MxAnswer::Hosts { .. } => 0,
            MxAnswer::NullMx => 1,
            MxAnswer::NoSuchDomain(_) => 2,
            MxAnswer::Temporary(_) => 3,
        };
        self.metrics.dns_lookups[kind] += 1;
        let mut found = None;
        let (next, temporary) = match answer {
            MxAnswer::Hosts { hosts, ttl } => {
                let names: Vec<&str> = hosts.iter().map(|h| h.name.as_str()).collect();
                let policy = self.policy_of(&domain.name, &names);
                *domain.retry.borrow_mut() = Rc::new(policy.shaping.retry.clone());
                let dest = self.mx_dest(&hosts, policy, &domain.name);
                found = Some(dest.clone());
                (
                    DomainRoute::Known {
                        dest,
                        until: now + dns.keep(ttl),
                    },
                    None,
                )
            }
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
        // They were routed before they waited: the answer is not a cache hit.
        for txn in waiting {
            match (&temporary, &found) {
                (Some(why), _) => self.defer(txn, Local::Dns, why, None, now),
                (None, Some(dest)) => self.enqueue(txn, dest, now),
                (None, None) => self.dispatch(txn, now),
            }
        }
    }
}

/// Queues `txn` in transactions of at most `max` recipients (a destination
/// may take fewer recipients per transaction than ingest groups).
fn push_split<J: Job>(queue: &mut VecDeque<Txn<J>>, mut txn: Txn<J>, max: usize) {
    while txn.job.rcpt_count() > max {
        let rest = txn.with_job(|j| j.split_off(max));
        queue.push_back(txn);
        txn = rest;
    }
    queue.push_back(txn);
}
