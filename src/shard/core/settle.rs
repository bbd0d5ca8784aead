//! Settling outcomes: a finished transaction's replies, or a local reason
//! (a lookup that failed, a destination down, a domain backed off), become
//! one outcome per recipient — delivered, bounced, deferred (and retried)
//! or expired past `max_age` — each recorded for the log and the journal
//! and counted in the metrics.

use std::net::IpAddr;
use std::rc::Rc;
use std::time::Instant;

use super::{Candidate, Core, Dest, Job, Txn};
use crate::local::Local;
use crate::metrics::Phase;
use crate::outcome::{LogRecord, Outcome};
use crate::smtp::{Command, Decider, Enhanced, Status, TxnReport};

/// What a recipient's attempt ended with, for the log.
struct Said<'a> {
    code: Option<u16>,
    enhanced: Option<Enhanced>,
    text: &'a str,
    /// volley's own failure, when no reply decided.
    local: Option<Local>,
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
                local: None,
                category: None,
            },
            Decider::Failure(kind, s) => Said {
                code: None,
                enhanced: kind.enhanced(),
                text: s,
                local: Some(kind),
                category: None,
            },
        }
    }
}

/// Where and how an attempt went, for the log.
#[derive(Default)]
struct At<'a> {
    mx: Option<&'a str>,
    ip: Option<IpAddr>,
    latency_ms: Option<u64>,
    tls: Option<&'a str>,
    /// The rule in force on the destination (a suspension's deferral).
    rule: Option<&'a str>,
}

impl<J: Job> Core<J> {
    /// Settles every recipient of a transaction that went to `host` and
    /// ended at `now` (`tls`: the connection's TLS, described).
    pub fn complete(
        &mut self,
        report: Box<TxnReport<Txn<J>>>,
        dest: &Rc<Dest<J>>,
        host: &Candidate,
        tls: Option<&str>,
        now: Instant,
    ) {
        let txn = &report.txn;
        // The first reply that did not deliver counts against the
        // destination's rules (before the outcomes: a rule it fires decides
        // where the deferred recipients wait); a transaction that delivered
        // or bounced anyone ends the streaks of deferrals in a row.
        let refusal = (0..txn.job.rcpt_count()).find_map(|i| match report.verdict(i) {
            (Status::Delivered, _) => None,
            (_, Decider::Reply(r)) => Some((r.to_string(), None)),
            (_, Decider::Failure(kind, f)) => Some((f.to_string(), Some(kind))),
        });
        let whole = (0..txn.job.rcpt_count()).all(|i| report.verdict(i).0 == Status::Deferred);
        if let Some((text, local)) = refusal {
            if whole {
                dest.failed_with(&text, now);
            }
            self.automation_hit(dest, &text, local, whole, now);
        }
        if !whole {
            dest.automation.borrow_mut().progress();
        }
        let suspension = dest.suspension(now);
        let latency_ms = Some(now.duration_since(txn.started).as_millis() as u64);
        let expired = now >= txn.first_seen + txn.domain.retry().max_age;
        let mut deferred = Vec::new();
        let mut delivered = 0u64;
        for i in 0..txn.job.rcpt_count() {
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
                rule: suspension.as_deref().filter(|_| outcome == Outcome::Deferred),
            };
            self.record(txn, i, outcome, decider.into(), at, now);
        }
        self.count_replies(&report, dest, now, delivered);
        if delivered > 0 {
            self.recorder.message_delivered();
        }
        if deferred.is_empty() {
            return;
        }
        let TxnReport { mut txn, .. } = *report;
        if deferred.len() < txn.job.rcpt_count() {
            txn.job.keep(&deferred);
        }
        if suspension.is_some() {
            // Back in line, to go out when the suspension ends.
            txn.attempt += 1;
            txn.held = true;
            self.expiry_timer(dest, txn.first_seen + txn.domain.retry().max_age);
            dest.queue.borrow_mut().push_front(txn);
            return;
        }
        if let Some(rule) = dest.bouncing(now) {
            return self.bounce_by_rule(txn, dest, &rule, now);
        }
        self.schedule_retry(txn, now);
    }

    /// Defers (or expires) every recipient of a transaction for a local reason.
    pub(super) fn defer(&mut self, txn: Txn<J>, kind: Local, reason: &str, dest: Option<&Dest<J>>, now: Instant) {
        self.defer_as(txn, kind, reason, dest, None, now)
    }

    /// `defer`, with the category given instead of classified from the reason.
    pub(super) fn defer_as(
        &mut self,
        txn: Txn<J>,
        kind: Local,
        reason: &str,
        dest: Option<&Dest<J>>,
        category: Option<&str>,
        now: Instant,
    ) {
        let expired = now >= txn.first_seen + txn.domain.retry().max_age;
        let outcome = if expired { Outcome::Expired } else { Outcome::Deferred };
        for i in 0..txn.job.rcpt_count() {
            let said = Said {
                code: None,
                enhanced: None,
                text: reason,
                local: Some(kind),
                category,
            };
            let at = At {
                mx: dest.map(|d| &*d.label),
                ..At::default()
            };
            self.record(&txn, i, outcome, said, at, now);
        }
        if !expired {
            self.schedule_retry(txn, now);
        }
    }

    /// Bounces a transaction for `dest` while `rule` makes its recipients bounce.
    pub(super) fn bounce_by_rule(&mut self, txn: Txn<J>, dest: &Dest<J>, rule: &crate::shaping::Rule, now: Instant) {
        let reason = format!("bounced by rule {} while it is in force on {}", rule.name, dest.label);
        let enhanced = Enhanced {
            class: 5,
            subject: 7,
            detail: 1,
        };
        self.bounce(txn, Local::RuleBounce, enhanced, &reason, now);
    }

    /// Bounces every recipient of a transaction for a local, permanent reason.
    pub(super) fn bounce(&mut self, txn: Txn<J>, kind: Local, enhanced: Enhanced, reason: &str, now: Instant) {
        for i in 0..txn.job.rcpt_count() {
            let said = Said {
                code: None,
                enhanced: Some(enhanced),
                text: reason,
                local: Some(kind),
                category: None,
            };
            self.record(&txn, i, Outcome::Bounced, said, At::default(), now);
        }
    }

    fn record(&mut self, txn: &Txn<J>, i: usize, outcome: Outcome, said: Said<'_>, at: At<'_>, now: Instant) {
        if outcome.is_final() {
            self.intake.finished(1);
            self.domain_load(&txn.domain, |l, b| l.finished(1, b));
        }
        let category = match outcome {
            Outcome::Bounced | Outcome::Deferred | Outcome::Expired => Some(said.category.unwrap_or_else(|| {
                self.classifier
                    .classify(said.code, said.enhanced, said.text, said.local)
            })),
            Outcome::Delivered | Outcome::Rejected => None,
        };
        self.metrics.with(&txn.domain.slot, |m| m.outcome(outcome, category));
        self.produced += 1;
        let ts = self.wall_at(now);
        self.recorder.record(
            txn.job.key(i),
            &LogRecord {
                ts,
                id: txn.job.id(),
                rcpt: Some(txn.job.rcpt(i)),
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
                rule: at.rule,
                local: said.local.map(Local::name),
                plain: txn.job.plain_text(i),
            },
        );
    }

    /// Counts a finished transaction's replies, times its phases, and the
    /// delivery duration of its delivered recipients.
    fn count_replies(&mut self, report: &TxnReport<Txn<J>>, dest: &Dest<J>, now: Instant, delivered: u64) {
        if !self.metrics.enabled() {
            return;
        }
        let slot: Rc<_> = report.txn.domain.slot.clone();
        let dot = if report.chunked { Command::Bdat } else { Command::Dot };
        let replies = || {
            [
                (Command::Mail, &report.mail),
                (Command::Data, &report.data),
                (dot, &report.dot),
            ]
            .into_iter()
            .filter_map(|(c, r)| r.as_ref().map(|r| (c, r)))
            .chain(report.rcpts.iter().flatten().map(|r| (Command::Rcpt, r)))
        };
        // A failing reply is the domain's; a success (2xx, 3xx) says how
        // the servers answer, and is counted under the destination's first
        // domain, like its phases (the sums over domains stay the same). So
        // is the refusal of DATA (or BDAT) after every RCPT was refused
        // (RFC 2920's "554 no valid recipients"): it follows from those.
        let none_accepted = !report.rcpts.iter().flatten().any(|r| r.code < 400);
        let domain_s =
            |c: Command, code: u16| code >= 400 && !(none_accepted && c != Command::Mail && c != Command::Rcpt);
        self.metrics.with(&slot, |m| {
            for (c, r) in replies().filter(|&(c, r)| domain_s(c, r.code)) {
                m.reply(c, r.code, r.enhanced);
            }
            if delivered > 0 {
                let first = report.txn.first_attempt.unwrap_or(report.txn.started);
                m.delivered(now.duration_since(first).as_micros() as u64, delivered);
            }
        });
        // The phases time the servers, which the destination's domains
        // share: they are counted under the domain that first routed to it,
        // like the connection phases (one series per destination, not per domain).
        let t = &report.timing;
        let mut owner = dest.owner_domain.borrow().upgrade();
        if owner.is_none() && *report.txn.domain.name == *dest.owner {
            *dest.owner_domain.borrow_mut() = Rc::downgrade(&report.txn.domain);
            owner = Some(report.txn.domain.clone());
        }
        let count = |m: &mut crate::metrics::DomainStats| {
            for (c, r) in replies().filter(|&(c, r)| !domain_s(c, r.code)) {
                m.reply(c, r.code, r.enhanced);
            }
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
        };
        match owner {
            Some(d) => self.metrics.with(&d.slot, count),
            None => self.metrics.with_name(&dest.owner, count),
        }
    }
}
