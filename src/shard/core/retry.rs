//! Retries: deferred transactions wait in a heap until their attempt's
//! delay (the domain's schedule, never past `max_age` after the recipient
//! was first seen), and a domain whose transactions are deferred whole
//! `domain_backoff_after` times in a row is backed off as a whole: until
//! its streak ends, its new transactions are deferred without a connection.

use std::cmp::Ordering;
use std::collections::BinaryHeap;
use std::rc::Rc;
use std::time::Instant;

use super::{Core, Domain, Job, Txn};

struct Due<J> {
    at: Instant,
    seq: u64,
    txn: Txn<J>,
}

impl<J> PartialEq for Due<J> {
    fn eq(&self, o: &Self) -> bool {
        (self.at, self.seq) == (o.at, o.seq)
    }
}
impl<J> Eq for Due<J> {}
impl<J> PartialOrd for Due<J> {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}
impl<J> Ord for Due<J> {
    // Reversed: BinaryHeap is a max-heap and the earliest must come first.
    fn cmp(&self, o: &Self) -> Ordering {
        (o.at, o.seq).cmp(&(self.at, self.seq))
    }
}

/// Transactions waiting for their next attempt, earliest first (in the
/// order they were deferred when due together).
pub(super) struct Retries<J> {
    heap: BinaryHeap<Due<J>>,
    seq: u64,
}

impl<J> Default for Retries<J> {
    fn default() -> Self {
        Retries {
            heap: BinaryHeap::new(),
            seq: 0,
        }
    }
}

impl<J> Retries<J> {
    fn push(&mut self, at: Instant, txn: Txn<J>) {
        self.seq += 1;
        self.heap.push(Due { at, seq: self.seq, txn });
    }

    /// When the next one is due.
    pub fn next(&self) -> Option<Instant> {
        self.heap.peek().map(|d| d.at)
    }

    pub fn pop_due(&mut self, now: Instant) -> Option<Txn<J>> {
        match self.heap.peek() {
            Some(d) if d.at <= now => self.heap.pop().map(|d| d.txn),
            _ => None,
        }
    }

    pub fn iter(&self) -> impl Iterator<Item = &Txn<J>> {
        self.heap.iter().map(|d| &d.txn)
    }
}

/// A domain backed off as a whole: until when, the reason its deferrals
/// are logged with, and the bounce category of the reply that ended the
/// streak (they are classified by it). Made once per streak, shared by
/// every transaction deferred while it lasts.
pub(crate) struct Backoff {
    pub until: Instant,
    pub reason: Rc<str>,
    pub category: Rc<str>,
}

impl<J: Job> Core<J> {
    /// Puts a deferred transaction in line for its next attempt.
    pub(super) fn schedule_retry(&mut self, mut txn: Txn<J>, now: Instant) {
        let retry = txn.domain.retry();
        let due = (now + retry.delay(txn.attempt)).min(txn.first_seen + retry.max_age);
        txn.attempt += 1;
        let n = txn.job.rcpt_count() as u64;
        self.intake.wait(n);
        self.domain_load(&txn.domain.clone(), |l, b| l.wait(n, b));
        self.retries.push(due, txn);
    }

    /// Counts transactions of a domain deferred whole in a row; after
    /// `domain_backoff_after` of them the domain is backed off as a whole
    /// instead of being retried recipient by recipient. `last` gives the
    /// last reply's text and category, asked only when the streak trips.
    pub(super) fn domain_streak<'a>(
        &self,
        domain: &Domain<J>,
        all_deferred: bool,
        now: Instant,
        last: impl FnOnce() -> (String, &'a str),
    ) {
        if !all_deferred {
            domain.deferred_in_a_row.set(0);
            *domain.backoff.borrow_mut() = None;
            return;
        }
        let n = domain.deferred_in_a_row.get() + 1;
        domain.deferred_in_a_row.set(n);
        let after = self.cfg.domain_backoff_after.max(1);
        if n >= after {
            let until = now + domain.retry().delay(n - after + 1);
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
}
