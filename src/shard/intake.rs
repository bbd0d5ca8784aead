//! A shard's intake as plain numbers: the recipients it holds (queued, in
//! flight, or waiting for a retry), the credit it has granted ingest, and per
//! domain the queue bound past which ingest passes the domain over. No
//! clock, no channel: the shard tells it what happened and sends on what it
//! answers, so the bounds and the credit are tested without a shard.

use crate::config::Config;

/// The bounds, from the configuration.
#[derive(Debug, Clone, Copy)]
pub struct Bounds {
    /// `max_queued_recipients_per_shard`: queued or in flight.
    pub queued: u64,
    /// `max_deferred_recipients_per_shard`: waiting for a retry.
    pub deferred: u64,
    /// One domain's queued or in flight (`Config::domain_queue_bound`).
    pub domain: u64,
}

impl Bounds {
    pub fn of(cfg: &Config) -> Bounds {
        Bounds {
            queued: cfg.max_queued_recipients_per_shard as u64,
            deferred: cfg.max_deferred_recipients_per_shard as u64,
            domain: cfg.domain_queue_bound(),
        }
    }
}

/// Credit granted to ingest in steps of this many recipients (or all there
/// is when the shard says it is due).
pub const CREDIT_STEP: u64 = 256;

/// The shard's recipients and credit.
#[derive(Debug)]
pub struct Intake {
    bounds: Bounds,
    /// Recipients not final yet, and of those, waiting for a retry.
    held: u64,
    waiting: u64,
    /// Recipients taken from the inbox in all, the credit granted (a running
    /// total of recipients ingest may have sent), and `received` as last told.
    received: u64,
    granted: u64,
    received_told: u64,
}

impl Intake {
    /// Ingest starts with the shard's whole queue bound as credit.
    pub fn new(bounds: Bounds) -> Intake {
        Intake {
            bounds,
            held: 0,
            waiting: 0,
            received: 0,
            granted: bounds.queued,
            received_told: 0,
        }
    }

    pub fn bounds(&self) -> Bounds {
        self.bounds
    }

    pub fn held(&self) -> u64 {
        self.held
    }

    pub fn waiting(&self) -> u64 {
        self.waiting
    }

    /// `n` recipients taken from the inbox.
    pub fn received(&mut self, n: u64) {
        self.held += n;
        self.received += n;
    }

    /// `n` recipients final.
    pub fn finished(&mut self, n: u64) {
        debug_assert!(n <= self.held);
        self.held -= n;
    }

    /// `n` recipients went to wait for a retry.
    pub fn wait(&mut self, n: u64) {
        self.waiting += n;
    }

    /// `n` recipients' retry is due: they are queued again.
    pub fn retry(&mut self, n: u64) {
        debug_assert!(n <= self.waiting);
        self.waiting -= n;
    }

    /// Whether the shard takes more from its inbox: recipients queued or in
    /// flight and recipients waiting for a retry have bounds of their own,
    /// so a domain that defers everything fills only the second.
    pub fn has_room(&self) -> bool {
        self.held.saturating_sub(self.waiting) < self.bounds.queued && self.waiting < self.bounds.deferred
    }

    /// Room for more recipients now: none while `held_back` (the collector is
    /// behind) or at the retry bound.
    pub fn room(&self, held_back: bool) -> u64 {
        if held_back || self.waiting >= self.bounds.deferred {
            return 0;
        }
        self.bounds.queued.saturating_sub(self.held - self.waiting)
    }

    /// What to tell ingest now, if anything: (credit allowed in all,
    /// recipients received). In steps of CREDIT_STEP, or whatever changed
    /// when `due`; also when only `received` moved (ingest counts what the
    /// shard has not taken yet).
    pub fn credit(&mut self, held_back: bool, due: bool) -> Option<(u64, u64)> {
        let allowed = self.received + self.room(held_back);
        let news = allowed > self.granted || self.received > self.received_told;
        if !news || !(due || allowed >= self.granted + CREDIT_STEP) {
            return None;
        }
        self.granted = self.granted.max(allowed);
        self.received_told = self.received;
        Some((allowed, self.received))
    }
}

/// A domain gone full or open on the shard, for ingest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fullness {
    /// It holds its bound queued: ingest passes it over.
    Full,
    /// Down to half: ingest may send it again.
    Open,
}

/// One domain's recipients on the shard.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DomainLoad {
    /// Not final yet, and of those, waiting for a retry.
    pub held: u64,
    pub waiting: u64,
    /// Ingest was told it is full.
    pub full: bool,
}

impl DomainLoad {
    pub fn queued(&self) -> u64 {
        self.held - self.waiting
    }

    pub fn received(&mut self, n: u64, bound: u64) -> Option<Fullness> {
        self.held += n;
        self.check(bound)
    }

    pub fn finished(&mut self, n: u64, bound: u64) -> Option<Fullness> {
        self.held -= n;
        self.check(bound)
    }

    pub fn wait(&mut self, n: u64, bound: u64) -> Option<Fullness> {
        self.waiting += n;
        self.check(bound)
    }

    pub fn retry(&mut self, n: u64, bound: u64) -> Option<Fullness> {
        self.waiting -= n;
        self.check(bound)
    }

    /// Full at the bound, open again at half of it (not at every recipient).
    fn check(&mut self, bound: u64) -> Option<Fullness> {
        let queued = self.queued();
        if !self.full && queued >= bound {
            self.full = true;
            return Some(Fullness::Full);
        }
        if self.full && queued * 2 <= bound {
            self.full = false;
            return Some(Fullness::Open);
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bounds(queued: u64, deferred: u64) -> Bounds {
        Bounds {
            queued,
            deferred,
            domain: queued / 4,
        }
    }

    #[test]
    fn recipients_waiting_for_a_retry_have_their_own_bound() {
        let mut i = Intake::new(bounds(100, 1000));
        assert!(i.has_room());
        i.received(99);
        assert!(i.has_room());
        i.received(1);
        assert!(!i.has_room(), "100 queued or in flight fill the shard");
        i.wait(90);
        i.received(800);
        i.wait(810);
        assert_eq!((i.held(), i.waiting()), (900, 900));
        assert!(i.has_room(), "900 waiting for a retry leave room for new work");
        i.received(100);
        i.wait(100);
        assert!(!i.has_room(), "1,000 waiting close it");
        i.retry(1);
        assert!(i.has_room());
        i.received(99);
        assert!(!i.has_room(), "100 in flight beside 999 waiting close it");
    }

    #[test]
    fn credit_follows_the_room_in_steps_and_stops_while_held_back() {
        let mut i = Intake::new(bounds(1000, 10_000));
        assert_eq!(i.credit(false, true), None, "the first grant is the whole bound");
        i.received(1000);
        assert_eq!(
            i.credit(false, true),
            Some((1000, 1000)),
            "nothing more, but what was taken"
        );
        i.finished(100);
        assert_eq!(i.credit(false, false), None, "under a step and not due");
        assert_eq!(i.credit(false, true), Some((1100, 1000)));
        i.finished(300);
        assert_eq!(i.credit(true, true), None, "held back: no credit");
        assert_eq!(i.credit(false, false), Some((1400, 1000)), "a whole step goes at once");
        // Deferred recipients leave the queue (room for others) until the retry bound.
        i.wait(600);
        assert_eq!(i.room(false), 1000);
        let mut full = Intake::new(bounds(1000, 600));
        full.received(600);
        full.wait(600);
        assert_eq!(full.room(false), 0, "at the retry bound: no room");
    }

    #[test]
    fn a_domain_is_full_at_its_bound_and_open_again_at_half() {
        let bound = 100;
        let mut d = DomainLoad::default();
        assert_eq!(d.received(99, bound), None);
        assert_eq!(d.received(1, bound), Some(Fullness::Full));
        assert_eq!(d.received(50, bound), None, "told once");
        assert_eq!(d.finished(99, bound), None, "51 queued: still full");
        assert_eq!(d.finished(1, bound), Some(Fullness::Open));
        assert_eq!(d.received(50, bound), Some(Fullness::Full));
        assert_eq!(
            d.wait(60, bound),
            Some(Fullness::Open),
            "waiting for a retry is not queued"
        );
        assert_eq!(d.retry(60, bound), Some(Fullness::Full), "due again: queued again");
        assert_eq!(
            d,
            DomainLoad {
                held: 100,
                waiting: 0,
                full: true
            }
        );
    }
}
