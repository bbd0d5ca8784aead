//! Retries: deferred transactions wait in a heap until their attempt's
//! delay (the domain's schedule, never past `max_age` after the recipient
//! was first seen). A destination that defers everything again and again
//! is suspended by an automation rule (`trigger = { in_a_row = N }`, the
//! built-in `deferred-in-a-row`), not here.

use std::cmp::Ordering;
use std::collections::BinaryHeap;
use std::time::Instant;

use super::{Core, Job, Txn};

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

impl<J: Job> Core<J> {
    /// Puts a deferred transaction in line for its next attempt.
    pub(super) fn schedule_retry(&mut self, mut txn: Txn<J>, now: Instant) {
        let retry = txn.domain.retry();
        let due = (now + retry.delay(txn.attempt)).min(txn.first_seen + retry.max_age);
        txn.attempt += 1;
        txn.job.release();
        let n = txn.job.rcpt_count() as u64;
        self.intake.wait(n);
        self.domain_load(&txn.domain.clone(), |l, b| l.wait(n, b));
        self.retries.push(due, txn);
    }
}
