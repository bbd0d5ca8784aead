//! Connection budgets that follow the work: a destination's
//! `max_connections_per_destination` is one cap for the whole process,
//! divided among the shards that have work for it in proportion to that
//! work (a one-domain spool spread over every shard can use all of it; a
//! domain on one shard gets the whole cap). The board is the one place the
//! shards share, and they touch it only when a connection opens or closes
//! and, for destinations that more than one shard wants, at a slow periodic
//! rebalance — never per message. The sum of open connections over the
//! shards never exceeds the cap: a connection is counted on the board
//! before it is opened.

use foldhash::{HashMap, HashMapExt};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

/// What the shards share about one destination.
struct Slot {
    /// Per shard: connections open or opening, and the work it has queued (transactions).
    open: Vec<u32>,
    want: Vec<u64>,
    /// A shard was refused while others held connections: they must rebalance.
    contended: bool,
    /// Per shard: the part of the destination's rates it uses, in shares of
    /// the cap; the sum never exceeds the cap (a shard gets only what the
    /// others have let go, so rates are never oversubscribed, not even while
    /// shares move).
    rate: Vec<u32>,
}

impl Slot {
    /// Shard `shard`'s part of the rates, given its share now.
    fn take_rate(&mut self, shard: usize, share: u32, cap: u32) -> u32 {
        let others: u32 = (0..self.rate.len()).filter(|&j| j != shard).map(|j| self.rate[j]).sum();
        self.rate[shard] = share.min(cap.saturating_sub(others));
        self.rate[shard]
    }
}

impl Slot {
    fn idle(&self) -> bool {
        self.open.iter().all(|&o| o == 0) && self.want.iter().all(|&w| w == 0)
    }

    fn wanting(&self) -> usize {
        self.want.iter().filter(|&&w| w > 0).count()
    }
}

pub struct Budgets {
    shards: usize,
    slots: Mutex<HashMap<Box<str>, Slot>>,
    /// Per shard: another shard was refused a destination this one holds
    /// connections to (it looks at the board at its next rebalance).
    attention: Vec<AtomicBool>,
    /// Per shard: automation rules other shards fired on destinations it
    /// may carry too (a spread domain), and whether there are any.
    rule_news: Vec<Mutex<Vec<RuleNews>>>,
    has_rule_news: Vec<AtomicBool>,
    /// Rules marked `fleet` that fired here, for the fleet's exchange (when there is one).
    fleet: Mutex<Option<crossbeam_channel::Sender<crate::fleet::Outgoing>>>,
}

/// A rule one shard fired on a destination, for the others that carry it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleNews {
    /// The destination's name on the board.
    pub key: Box<str>,
    /// From another node of the fleet: the destinations' label and scope it
    /// is for (their keys differ between nodes: each has its own source addresses).
    pub fleet: Option<(Box<str>, Box<str>)>,
    pub rule: String,
    pub until: std::time::Instant,
}

/// The answer to a shard asking for a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Grant {
    /// The connection may be opened (it is counted already).
    pub granted: bool,
    /// The shard's share of the cap now.
    pub share: u32,
    /// Other shards want this destination too: rebalance it periodically.
    pub shared: bool,
    /// The shard's part of the destination's rates, in shares of the cap
    /// (at most `share`; less while other shards still hold theirs).
    pub rate_share: u32,
}

impl Budgets {
    pub fn new(shards: usize) -> Budgets {
        Budgets {
            shards,
            slots: Mutex::new(HashMap::new()),
            attention: (0..shards).map(|_| AtomicBool::new(false)).collect(),
            rule_news: (0..shards).map(|_| Mutex::new(Vec::new())).collect(),
            has_rule_news: (0..shards).map(|_| AtomicBool::new(false)).collect(),
            fleet: Mutex::new(None),
        }
    }

    /// Rules marked `fleet` that fire from now on go to `tx` as well.
    pub fn set_fleet(&self, tx: crossbeam_channel::Sender<crate::fleet::Outgoing>) {
        *self.fleet.lock().unwrap_or_else(|e| e.into_inner()) = Some(tx);
    }

    /// Lets the fleet's exchange go (it ends).
    pub fn leave_fleet(&self) {
        self.fleet.lock().unwrap_or_else(|e| e.into_inner()).take();
    }

    /// A rule marked `fleet` fired here: for the other nodes.
    pub fn share(&self, o: crate::fleet::Outgoing) {
        if let Some(tx) = &*self.fleet.lock().unwrap_or_else(|e| e.into_inner()) {
            let _ = tx.send(o);
        }
    }

    /// A rule another node fired: every shard applies it to its destinations of that label and scope.
    pub fn announce_fleet(&self, news: RuleNews) {
        for shard in 0..self.shards {
            self.rule_news[shard]
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(news.clone());
            self.has_rule_news[shard].store(true, Ordering::Release);
        }
    }

    /// Shard `from` fired `news.rule` on a destination: the other shards
    /// apply it too, at their next look (rare: never per message).
    pub fn announce(&self, from: usize, news: RuleNews) {
        for shard in (0..self.shards).filter(|&s| s != from) {
            self.rule_news[shard]
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(news.clone());
            self.has_rule_news[shard].store(true, Ordering::Release);
        }
    }

    /// What other shards fired since `shard` last looked.
    pub fn rule_news(&self, shard: usize) -> Vec<RuleNews> {
        if !self.has_rule_news[shard].swap(false, Ordering::Acquire) {
            return Vec::new();
        }
        std::mem::take(&mut *self.rule_news[shard].lock().unwrap_or_else(|e| e.into_inner()))
    }

    fn with<T>(&self, key: &str, f: impl FnOnce(&mut Slot) -> T) -> T {
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        if !slots.contains_key(key) {
            slots.insert(
                Box::from(key),
                Slot {
                    open: vec![0; self.shards],
                    want: vec![0; self.shards],
                    contended: false,
                    rate: vec![0; self.shards],
                },
            );
        }
        let slot = slots.get_mut(key).expect("inserted above");
        let out = f(slot);
        if slot.idle() {
            slots.remove(key);
        }
        out
    }

    /// Shard `shard`, with `want` transactions for the destination, asks to
    /// open one more connection under `cap`. Granted while the total is under
    /// the cap and the shard is under its share — or over it, when no other
    /// shard wants what is left (the cap is never left idle).
    pub fn open(&self, key: &str, shard: usize, want: u64, cap: u32) -> Grant {
        self.with(key, |s| {
            s.want[shard] = want.max(1);
            let shares = shares(cap, &s.want);
            let total: u32 = s.open.iter().sum();
            let others_short =
                (0..s.open.len()).any(|j| j != shard && s.open[j] < shares[j] && u64::from(s.open[j]) < s.want[j]);
            let granted = total < cap && (s.open[shard] < shares[shard] || !others_short);
            if granted {
                s.open[shard] += 1;
            } else if s.open[shard] < shares[shard] {
                // Below its share and refused: those holding more must learn of it.
                s.contended = true;
                for (j, &open) in s.open.iter().enumerate() {
                    if j != shard && open > 0 {
                        self.attention[j].store(true, Ordering::Relaxed);
                    }
                }
            }
            Grant {
                granted,
                share: shares[shard],
                shared: s.wanting() > 1,
                rate_share: s.take_rate(shard, shares[shard], cap),
            }
        })
    }

    /// A connection of `shard` to the destination closed (or never opened).
    pub fn closed(&self, key: &str, shard: usize) {
        self.with(key, |s| s.open[shard] = s.open[shard].saturating_sub(1));
    }

    /// The destinations `shard` holds connections to that another shard was
    /// refused since it last asked (it rebalances them from now on).
    pub fn wanted_elsewhere(&self, shard: usize) -> Vec<Box<str>> {
        if !self.attention[shard].swap(false, Ordering::Relaxed) {
            return Vec::new();
        }
        let slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        slots
            .iter()
            .filter(|(_, s)| s.contended && s.open[shard] > 0)
            .map(|(k, _)| k.clone())
            .collect()
    }

    /// The shard's work for the destination now (0: none); returns its share.
    pub fn rebalance(&self, key: &str, shard: usize, want: u64, cap: u32) -> Grant {
        self.with(key, |s| {
            s.want[shard] = want;
            if s.wanting() <= 1 {
                s.contended = false;
            }
            let shares = shares(cap, &s.want);
            Grant {
                granted: false,
                share: shares[shard],
                shared: s.wanting() > 1,
                rate_share: s.take_rate(shard, shares[shard], cap),
            }
        })
    }
}

/// `cap` divided among the shards in proportion to `want` (largest
/// remainders first); every shard that wants some gets at least one while
/// the cap allows, and the shares never add up to more than the cap.
pub fn shares(cap: u32, want: &[u64]) -> Vec<u32> {
    let total: u128 = want.iter().map(|&w| u128::from(w)).sum();
    let mut out = vec![0u32; want.len()];
    if total == 0 || cap == 0 {
        return out;
    }
    let wanting = want.iter().filter(|&&w| w > 0).count() as u32;
    // With more shards wanting than the cap, the ones with most work get one each.
    if wanting >= cap {
        let mut order: Vec<usize> = (0..want.len()).filter(|&i| want[i] > 0).collect();
        order.sort_by_key(|&i| (std::cmp::Reverse(want[i]), i));
        for &i in order.iter().take(cap as usize) {
            out[i] = 1;
        }
        return out;
    }
    // In proportion, largest remainders first; then one for every shard
    // that wants some, taken from the largest shares.
    let mut given = 0u32;
    let mut remainders: Vec<(u128, usize)> = Vec::new();
    for (i, &w) in want.iter().enumerate() {
        if w == 0 {
            continue;
        }
        let exact = u128::from(cap) * u128::from(w);
        out[i] = (exact / total) as u32;
        given += out[i];
        remainders.push((exact % total, i));
    }
    remainders.sort_by_key(|&(r, i)| (std::cmp::Reverse(r), i));
    for &(_, i) in remainders.iter().take((cap - given) as usize) {
        out[i] += 1;
    }
    for i in 0..want.len() {
        if want[i] > 0 && out[i] == 0 {
            let largest = (0..out.len())
                .max_by_key(|&j| (out[j], std::cmp::Reverse(j)))
                .expect("not empty");
            out[largest] -= 1;
            out[i] = 1;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_follow_the_work_and_add_up_to_the_cap() {
        assert_eq!(
            shares(20, &[5000, 0]),
            vec![20, 0],
            "one shard with work gets the whole cap"
        );
        assert_eq!(shares(20, &[5000, 5000]), vec![10, 10]);
        assert_eq!(shares(20, &[9000, 1000]), vec![18, 2]);
        assert_eq!(
            shares(20, &[1_000_000, 1]),
            vec![19, 1],
            "a shard with any work gets one"
        );
        assert_eq!(
            shares(2, &[1, 5, 3]),
            vec![0, 1, 1],
            "more shards than the cap: the busiest"
        );
        assert_eq!(shares(20, &[0, 0]), vec![0, 0]);
        for cap in 1..40u32 {
            for want in [[1u64, 2, 3, 0], [7, 7, 7, 7], [100, 0, 0, 1], [3, 1_000, 10, 10]] {
                let s = shares(cap, &want);
                assert_eq!(s.iter().sum::<u32>(), cap, "{cap} {want:?}");
                assert!(s.iter().zip(want).all(|(&s, w)| w > 0 || s == 0));
            }
        }
    }

    #[test]
    fn the_open_connections_never_pass_the_cap() {
        let b = Budgets::new(3);
        let mut open = [0u32; 3];
        // Shard 0 comes first and takes the whole cap while nobody else wants it.
        while b.open("mx", 0, 1000, 10).granted {
            open[0] += 1;
        }
        assert_eq!(open[0], 10);
        // Shard 1 arrives with as much work: refused until shard 0 gives back.
        assert!(b.wanted_elsewhere(0).is_empty());
        let g = b.open("mx", 1, 1000, 10);
        assert!(!g.granted);
        assert_eq!(g.share, 5);
        assert!(g.shared);
        assert_eq!(
            b.wanted_elsewhere(0),
            vec![Box::<str>::from("mx")],
            "shard 0 learns to give back"
        );
        assert!(b.wanted_elsewhere(0).is_empty(), "told once");
        assert_eq!(b.rebalance("mx", 0, 1000, 10).share, 5);
        for _ in 0..5 {
            b.closed("mx", 0);
            open[0] -= 1;
            assert!(b.open("mx", 1, 1000, 10).granted);
            open[1] += 1;
        }
        assert!(!b.open("mx", 1, 1000, 10).granted, "at its share and the cap");
        assert!(!b.open("mx", 2, 1, 10).granted, "at the cap");
        assert_eq!(open, [5, 5, 0]);
        // Everything closes and nobody wants it: the slot is forgotten.
        for s in 0..2 {
            for _ in 0..5 {
                b.closed("mx", s);
            }
            b.rebalance("mx", s, 0, 10);
        }
        b.rebalance("mx", 2, 0, 10);
        assert!(b.slots.lock().unwrap().is_empty());
    }
}
