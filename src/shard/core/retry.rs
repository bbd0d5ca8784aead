//! Retries: deferred transactions wait in a heap until their attempt's
//! delay (the domain's schedule, never past `max_age` after the recipient
//! was first seen). A destination that defers everything again and again
//! is suspended by an automation rule (`trigger = { in_a_row = N }`, the
//! built-in `deferred-in-a-row`), not here.
//!
//! A waiting transaction is kept small: one [`Due`] per recipient holding
//! the job's parked form ([`Job::park`]: for a spool job, where its line is,
//! not the parsed line) and its times in milliseconds from the heap's epoch.
//! A transaction's recipients are pushed together and come back together
//! ([`Job::unpark`]).

use std::cmp::Ordering;
use std::collections::BinaryHeap;
use std::rc::Rc;
use std::time::{Duration, Instant};

use super::{Core, Domain, Job, Parked, Txn};

/// Bits of a key that hold the push sequence (below the due time in ms):
/// recipients due in the same millisecond come back in the order they were
/// deferred (unless 16 million pushes lie between them).
const SEQ_BITS: u32 = 24;

struct Due<J: Job> {
    /// Due time (ms from the epoch, rounded up) above the push sequence.
    key: u64,
    domain: Rc<Domain<J>>,
    job: J::Parked,
    /// When the transaction first went to a connection, in ms from the
    /// epoch plus one; 0 when it has not.
    first_attempt: u32,
    attempt: u16,
    held: bool,
}

impl<J: Job> PartialEq for Due<J> {
    fn eq(&self, o: &Self) -> bool {
        self.key == o.key
    }
}
impl<J: Job> Eq for Due<J> {}
impl<J: Job> PartialOrd for Due<J> {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}
impl<J: Job> Ord for Due<J> {
    // Reversed: BinaryHeap is a max-heap and the earliest must come first.
    fn cmp(&self, o: &Self) -> Ordering {
        o.key.cmp(&self.key)
    }
}

/// Transactions waiting for their next attempt, earliest first (in the
/// order they were deferred when due together).
pub(super) struct Retries<J: Job> {
    heap: BinaryHeap<Due<J>>,
    seq: u64,
    epoch: Instant,
    /// Heap entries (recipients) past which the heap's room is given back
    /// once it has drained to an eighth of it.
    shrink_at: usize,
}

/// Room the heap keeps however far it drains.
const KEEP: usize = 1024;

impl<J: Job> Retries<J> {
    pub fn new(epoch: Instant) -> Self {
        Retries {
            heap: BinaryHeap::new(),
            seq: 0,
            epoch,
            shrink_at: KEEP,
        }
    }

    fn ms(&self, t: Instant) -> u64 {
        t.saturating_duration_since(self.epoch).as_millis() as u64
    }

    fn ms_up(&self, t: Instant) -> u64 {
        let d = t.saturating_duration_since(self.epoch);
        d.as_millis() as u64 + u64::from(!d.subsec_nanos().is_multiple_of(1_000_000))
    }

    fn at(&self, ms: u64) -> Instant {
        self.epoch + Duration::from_millis(ms)
    }

    fn push(&mut self, at: Instant, txn: Txn<J>) {
        let key_at = self.ms_up(at) << SEQ_BITS;
        let first_attempt = txn
            .first_attempt
            .map_or(0, |t| u32::try_from(self.ms(t) + 1).unwrap_or(u32::MAX));
        let attempt = u16::try_from(txn.attempt).unwrap_or(u16::MAX);
        let (domain, held) = (txn.domain, txn.held);
        let seq = &mut self.seq;
        let heap = &mut self.heap;
        txn.job.park(txn.first_seen, &mut |job| {
            *seq += 1;
            heap.push(Due {
                key: key_at | (*seq & ((1 << SEQ_BITS) - 1)),
                domain: domain.clone(),
                job,
                first_attempt,
                attempt,
                held,
            });
        });
    }

    /// When the next one is due.
    pub fn next(&self) -> Option<Instant> {
        self.heap.peek().map(|d| self.at(d.key >> SEQ_BITS))
    }

    /// The next transaction due by `now`: the recipients pushed with it
    /// that are due too, back in one job.
    pub fn pop_due(&mut self, now: Instant) -> Option<Txn<J>> {
        let now_ms = self.ms(now);
        let due = |d: &Due<J>| d.key >> SEQ_BITS <= now_ms;
        if !self.heap.peek().is_some_and(due) {
            return None;
        }
        let first = self.heap.pop().expect("peeked");
        let first_seen = first.job.first_seen();
        let mut parked = vec![first.job];
        while let Some(next) = self.heap.peek()
            && due(next)
            && Rc::ptr_eq(&next.domain, &first.domain)
            && (next.attempt, next.held, next.first_attempt) == (first.attempt, first.held, first.first_attempt)
            && next.job.same_job(&parked[0])
        {
            parked.push(self.heap.pop().expect("peeked").job);
        }
        let job = J::unpark(parked);
        self.shrink();
        Some(Txn {
            job,
            domain: first.domain,
            attempt: u32::from(first.attempt),
            first_seen,
            first_attempt: first.first_attempt.checked_sub(1).map(|ms| self.at(u64::from(ms))),
            started: now,
            held: first.held,
        })
    }

    /// Gives back the room a burst of deferrals took once it has drained.
    fn shrink(&mut self) {
        let cap = self.heap.capacity();
        if cap > self.shrink_at && self.heap.len() <= cap / 8 {
            self.heap.shrink_to((self.heap.len() * 2).max(KEEP));
            self.shrink_at = self.heap.capacity().max(KEEP);
        }
    }

    /// Each waiting recipient's domain and when it was first seen.
    pub fn each(&self, mut f: impl FnMut(&Rc<str>, Instant)) {
        for d in &self.heap {
            f(&d.domain.name, d.job.first_seen());
        }
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
