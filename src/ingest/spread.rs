//! Which domains are spread over every shard by a hash of the recipient
//! instead of living on one shard: those named in `spread_domains`, and
//! those whose share of the recipients read so far reaches 1/(2 × shards)
//! (estimated from one recipient in eight, with a Misra–Gries summary: a few
//! dozen counters, whatever the number of domains). A domain spreads from a point in each file: lines
//! before it keep the domain's shard, lines after go by recipient, so a line
//! read again is routed as it was the first time. Nothing persistent depends
//! on the shard, so a restart may spread differently without harm.

use foldhash::{HashMap, HashMapExt};

/// Recipients read before a domain may spread on its share alone.
pub const MIN_RECIPIENTS: u64 = 2_000;
/// One recipient in this many is counted (shares are estimated from a sample).
const SAMPLE_EVERY: u64 = 8;

/// The shard of a recipient of a spread domain: FNV-1a of the address, lower-cased.
pub fn shard_of_rcpt(addr: &str, shards: usize) -> usize {
    super::shard_of(addr, shards)
}

pub struct Spread {
    shards: usize,
    /// Spread domains (lower-cased), named or found.
    spread: Vec<Box<str>>,
    /// Misra–Gries counters: any domain with more than n/(k+1) of the n
    /// recipients seen is among them, counted at most n/(k+1) short.
    counters: HashMap<Box<str>, u64>,
    capacity: usize,
    /// Recipients read, and of those counted (one in SAMPLE_EVERY).
    read: u64,
    seen: u64,
    /// Spread since the files last took note.
    fresh: Vec<Box<str>>,
}

impl Spread {
    pub fn new(shards: usize, named: &[String]) -> Spread {
        let mut spread: Vec<Box<str>> = Vec::new();
        if shards > 1 {
            for d in named {
                let d: Box<str> = d.to_ascii_lowercase().into();
                if !spread.contains(&d) {
                    spread.push(d);
                }
            }
        }
        Spread {
            shards,
            spread,
            counters: HashMap::new(),
            capacity: 4 * shards + 4,
            read: 0,
            seen: 0,
            fresh: Vec::new(),
        }
    }

    /// Every spread domain, for a file opened now (spread from its start).
    pub fn all(&self) -> &[Box<str>] {
        &self.spread
    }

    /// Counts one recipient of `domain` (lower-cased) read at the lead.
    pub fn observe(&mut self, domain: &str) {
        if self.shards < 2 {
            return;
        }
        self.read += 1;
        if !self.read.is_multiple_of(SAMPLE_EVERY) {
            return;
        }
        self.seen += 1;
        if let Some(n) = self.counters.get_mut(domain) {
            *n += 1;
            let n = *n;
            if self.read >= MIN_RECIPIENTS && n * 2 * self.shards as u64 >= self.seen {
                self.found(domain);
            }
            return;
        }
        if self.counters.len() < self.capacity {
            self.counters.insert(Box::from(domain), 1);
            return;
        }
        // No free counter: every count goes down by one, and those at zero free theirs.
        self.counters.retain(|_, n| {
            *n -= 1;
            *n > 0
        });
    }

    fn found(&mut self, domain: &str) {
        if self.spread.iter().any(|d| &**d == domain) {
            return;
        }
        tracing::info!(
            "{domain} carries more than 1/{} of the recipients read: spread over every shard",
            2 * self.shards
        );
        self.spread.push(Box::from(domain));
        self.fresh.push(Box::from(domain));
    }

    /// Domains spread since the last call (each open file notes where it is).
    pub fn take_fresh(&mut self) -> Vec<Box<str>> {
        std::mem::take(&mut self.fresh)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_domain_with_a_large_share_spreads_and_the_rest_do_not() {
        let mut s = Spread::new(2, &[]);
        for i in 0..10_000u64 {
            // 40% big.test, the rest over 3,000 domains.
            if i % 5 < 2 {
                s.observe("big.test");
            } else {
                s.observe(&format!("d{}.test", i % 3000));
            }
        }
        assert_eq!(s.take_fresh(), vec![Box::<str>::from("big.test")]);
        assert_eq!(s.all(), &[Box::<str>::from("big.test")]);
        assert!(s.take_fresh().is_empty(), "told once");
    }

    #[test]
    fn nothing_spreads_before_enough_is_read_or_on_one_shard() {
        let mut s = Spread::new(4, &[]);
        for _ in 0..MIN_RECIPIENTS - SAMPLE_EVERY {
            s.observe("only.test");
        }
        assert!(s.all().is_empty());
        for _ in 0..SAMPLE_EVERY {
            s.observe("only.test");
        }
        assert_eq!(s.all().len(), 1);
        let mut one = Spread::new(1, &["named.test".into()]);
        for _ in 0..10_000 {
            one.observe("only.test");
        }
        assert!(one.all().is_empty(), "one shard: nothing to spread over");
    }

    #[test]
    fn named_domains_spread_from_the_start() {
        let s = Spread::new(3, &["Gmail.com".into(), "gmail.com".into()]);
        assert_eq!(s.all(), &[Box::<str>::from("gmail.com")]);
    }
}
