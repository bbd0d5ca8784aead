//! Metrics. Each shard counts and times what its domains do in plain
//! shard-local structures (no atomics, no locks on the per-message path).
//! When Prometheus scrapes, the exporter asks every shard for a snapshot,
//! merges them and renders the text format with the `prometheus` crate.
//!
//! The `domain` label is bounded: each shard keeps its own slot for at most
//! `metrics_max_domains` domains, admitted by volume (recipients handed to
//! the domain); everything else counts in the shard's `_other` slot. The
//! exporter keeps the top `metrics_max_domains` of all shards and sums the
//! rest into `domain="_other"`, so a spool of a million domains still makes
//! a scrape of at most that many domains.

pub mod export;
mod render;

use foldhash::{HashMap, HashMapExt};
use std::cell::Cell;
use std::rc::{Rc, Weak};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

use crate::classify::CATEGORIES;
use crate::outcome::Outcome;
use crate::smtp::{Command, Enhanced};

pub use render::{Merged, SpoolGauges, families, merge};

/// Longest latency recorded (longer ones count as this): 7 days, in µs.
const MAX_MICROS: u64 = 7 * 24 * 3600 * 1_000_000;
/// Significant figures of the histograms: quantiles within 1%.
const SIGFIG: u8 = 2;
/// The label of the domains without a slot of their own.
pub const OTHER_DOMAIN: &str = "_other";
/// The slot index of a domain counted in `_other`.
const OTHER: u32 = u32::MAX;

/// The phases of an SMTP session that are timed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// TCP connect.
    Connect,
    /// Connection established to the greeting.
    Banner,
    /// EHLO (or HELO) to its reply.
    Ehlo,
    /// STARTTLS to the end of the TLS handshake.
    StartTls,
    Mail,
    Rcpt,
    Data,
    /// The end of the body to the reply to the final dot.
    Dot,
}

impl Phase {
    pub const ALL: [Phase; 8] = [
        Phase::Connect,
        Phase::Banner,
        Phase::Ehlo,
        Phase::StartTls,
        Phase::Mail,
        Phase::Rcpt,
        Phase::Data,
        Phase::Dot,
    ];
    pub fn name(self) -> &'static str {
        match self {
            Phase::Connect => "connect",
            Phase::Banner => "banner",
            Phase::Ehlo => "ehlo",
            Phase::StartTls => "starttls",
            Phase::Mail => "mail",
            Phase::Rcpt => "rcpt",
            Phase::Data => "data",
            Phase::Dot => "dot",
        }
    }
}

/// How a connection attempt ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnResult {
    /// Through EHLO (and TLS and AUTH where asked for): ready to send.
    Ok,
    /// TCP connect failed or timed out.
    ConnectError,
    /// Greeting or EHLO refused, or the connection lost during set-up.
    SetupError,
    TlsError,
    AuthError,
}

impl ConnResult {
    pub const ALL: [ConnResult; 5] = [
        ConnResult::Ok,
        ConnResult::ConnectError,
        ConnResult::SetupError,
        ConnResult::TlsError,
        ConnResult::AuthError,
    ];
    pub fn name(self) -> &'static str {
        match self {
            ConnResult::Ok => "ok",
            ConnResult::ConnectError => "connect_error",
            ConnResult::SetupError => "setup_error",
            ConnResult::TlsError => "tls_error",
            ConnResult::AuthError => "auth_error",
        }
    }
}

/// Outcomes that have a bounce category, in the order of `DomainStats::categories`.
pub const CATEGORIZED: [Outcome; 3] = [Outcome::Bounced, Outcome::Deferred, Outcome::Expired];

/// How long a quantile window lasts: quantiles cover the observations of
/// the current window and the one before it (one to two minutes), as a
/// Prometheus client's summary does; `_count` and `_sum` cover all time.
pub const QUANTILE_WINDOW: Duration = Duration::from_secs(60);

/// A latency distribution in microseconds: hdrhistograms of the current and
/// the previous window for the quantiles, an exact count and sum for all
/// time (hdrhistogram's mean is approximate; Prometheus wants `_sum` exact).
#[derive(Clone)]
pub struct Latency {
    current: Histogram<u64>,
    previous: Histogram<u64>,
    /// The window `current` belongs to.
    window: u64,
    count: u64,
    sum_micros: u128,
    /// All time, by bucket of [`BUCKETS_MICROS`] (at most its bound), the
    /// last past every bound: Prometheus histogram buckets, which add up
    /// across shards and across the nodes of a fleet.
    buckets: [u64; BUCKETS_MICROS.len() + 1],
}

/// Upper bounds of the exported histogram buckets, in µs (5 ms to 10 min):
/// a few per decade, enough for `histogram_quantile` to tell a fast domain
/// from a slow one, few enough for a line per bucket per domain.
pub const BUCKETS_MICROS: [u64; 10] = [
    5_000,
    10_000,
    25_000,
    50_000,
    100_000,
    250_000,
    1_000_000,
    10_000_000,
    60_000_000,
    600_000_000,
];

impl Default for Latency {
    fn default() -> Self {
        // Auto-resizing: they grow to the largest value recorded, not to MAX_MICROS.
        let h = Histogram::new(SIGFIG).expect("2 significant figures are valid");
        Latency {
            current: h.clone(),
            previous: h,
            window: 0,
            count: 0,
            sum_micros: 0,
            buckets: [0; BUCKETS_MICROS.len() + 1],
        }
    }
}

impl Latency {
    /// Moves on to `window`: the current one becomes the previous, or both empty after a gap.
    fn roll(&mut self, window: u64) {
        if window <= self.window {
            return;
        }
        if window == self.window + 1 {
            std::mem::swap(&mut self.current, &mut self.previous);
        } else {
            self.previous.reset();
        }
        self.current.reset();
        self.window = window;
    }

    pub fn record(&mut self, micros: u64, n: u64, window: u64) {
        self.roll(window);
        let v = micros.min(MAX_MICROS);
        if self.current.record_n(v, n).is_err() {
            // Only if the histogram could not grow (out of memory): clamp rather than lose the count.
            self.current.saturating_record_n(v, n);
        }
        self.count += n;
        self.sum_micros += u128::from(v) * u128::from(n);
        self.buckets[BUCKETS_MICROS.partition_point(|&b| b < v)] += n;
    }
    /// Observations of all time at most each bound of [`BUCKETS_MICROS`]
    /// (cumulative, as Prometheus buckets are).
    pub fn cumulative_buckets(&self) -> [u64; BUCKETS_MICROS.len()] {
        let mut sum = 0;
        std::array::from_fn(|i| {
            sum += self.buckets[i];
            sum
        })
    }
    /// Observations of all time.
    pub fn count(&self) -> u64 {
        self.count
    }
    pub fn sum_seconds(&self) -> f64 {
        self.sum_micros as f64 / 1e6
    }
    /// Observations in the quantile window (as of the last `at`).
    pub fn window_count(&self) -> u64 {
        self.current.len() + self.previous.len()
    }
    /// The values at quantiles `qs` (0..=1) over the window, in seconds; NaN when it saw nothing.
    pub fn quantiles_seconds<const N: usize>(&self, qs: [f64; N]) -> [f64; N] {
        if self.window_count() == 0 {
            return [f64::NAN; N];
        }
        let mut both = self.current.clone();
        both.add(&self.previous).expect("auto-resizing histograms always add");
        qs.map(|q| both.value_at_quantile(q) as f64 / 1e6)
    }

    /// A copy as of `window`.
    pub fn at(&self, window: u64) -> Latency {
        let mut l = self.clone();
        l.roll(window);
        l
    }
    /// Adds another distribution (of the same window or another: both are aligned to the later).
    pub fn merge(&mut self, other: &Latency) {
        self.roll(other.window);
        let o = other.at(self.window);
        self.current
            .add(&o.current)
            .expect("auto-resizing histograms always add");
        self.previous
            .add(&o.previous)
            .expect("auto-resizing histograms always add");
        self.count += o.count;
        self.sum_micros += o.sum_micros;
        for (a, b) in self.buckets.iter_mut().zip(o.buckets) {
            *a += b;
        }
    }
}

/// Everything counted for one domain (or for `_other`) on one shard.
#[derive(Clone, Default)]
pub struct DomainStats {
    /// Recipients handed to the domain.
    pub volume: u64,
    /// Recipient outcomes, by `Outcome::index` (deferred: each deferral).
    pub outcomes: [u64; 5],
    /// Replies by command, code and (failing ones only: a success's says
    /// no more than its code) enhanced status code; a short list, a domain
    /// says few different things.
    pub replies: Vec<(Command, u16, Option<Enhanced>, u64)>,
    /// Bounce categories of the outcomes in `CATEGORIZED`, by `CATEGORIES` index.
    pub categories: [[u64; CATEGORIES.len()]; CATEGORIZED.len()],
    /// By `Phase as usize`; allocated on first use.
    pub phases: [Option<Box<Latency>>; Phase::ALL.len()],
    /// First attempt to the reply to the final dot, per delivered recipient.
    pub delivery: Option<Box<Latency>>,
    /// Connection attempts by `ConnResult as usize`.
    pub connections: [u64; ConnResult::ALL.len()],
    /// The quantile window now (set by the shard before each update).
    window: u64,
    /// TLS handshakes: succeeded, failed.
    pub tls: [u64; 2],
}

impl DomainStats {
    pub fn reply(&mut self, command: Command, code: u16, enhanced: Option<Enhanced>) {
        self.replies_add(command, code, enhanced.filter(|_| code >= 400), 1);
    }
    fn replies_add(&mut self, command: Command, code: u16, enhanced: Option<Enhanced>, n: u64) {
        match self
            .replies
            .iter_mut()
            .find(|(c, k, e, _)| *c == command && *k == code && *e == enhanced)
        {
            Some((_, _, _, m)) => *m += n,
            None => self.replies.push((command, code, enhanced, n)),
        }
    }
    pub fn phase(&mut self, phase: Phase, micros: u64) {
        let w = self.window;
        self.phases[phase as usize].get_or_insert_default().record(micros, 1, w);
    }
    pub fn delivered(&mut self, micros: u64, recipients: u64) {
        let w = self.window;
        self.delivery.get_or_insert_default().record(micros, recipients, w);
    }
    pub fn outcome(&mut self, outcome: Outcome, category: Option<&str>) {
        self.outcomes[outcome.index()] += 1;
        let (Some(cat), Some(o)) = (category, CATEGORIZED.iter().position(|c| *c == outcome)) else {
            return;
        };
        let c = CATEGORIES
            .iter()
            .position(|k| *k == cat)
            .unwrap_or(CATEGORIES.len() - 1);
        self.categories[o][c] += 1;
    }

    /// A copy whose latencies are as of `window`.
    fn at(&self, window: u64) -> DomainStats {
        let mut s = self.clone();
        s.window = window;
        for l in s.phases.iter_mut().chain([&mut s.delivery]).flatten() {
            l.roll(window);
        }
        s
    }

    /// Adds another domain's (or shard's) counts to these.
    pub fn merge(&mut self, o: &DomainStats) {
        self.window = self.window.max(o.window);
        self.volume += o.volume;
        add(&mut self.outcomes, &o.outcomes);
        for &(c, k, e, n) in &o.replies {
            self.replies_add(c, k, e, n);
        }
        for (a, b) in self.categories.iter_mut().zip(&o.categories) {
            add(a, b);
        }
        for (a, b) in self.phases.iter_mut().zip(&o.phases) {
            if let Some(b) = b {
                a.get_or_insert_default().merge(b);
            }
        }
        if let Some(b) = &o.delivery {
            self.delivery.get_or_insert_default().merge(b);
        }
        add(&mut self.connections, &o.connections);
        add(&mut self.tls, &o.tls);
    }
}

fn add<const N: usize>(a: &mut [u64; N], b: &[u64; N]) {
    for (x, y) in a.iter_mut().zip(b) {
        *x += y;
    }
}

/// A domain's handle into its shard's metrics: the slot it counts in, and
/// its volume while it has none.
#[derive(Debug)]
pub struct DomainSlot {
    idx: Cell<u32>,
    volume: Cell<u64>,
}

impl DomainSlot {
    /// Whether the domain has a label of its own on this shard.
    pub fn labeled(&self) -> bool {
        self.idx.get() != OTHER
    }
}

struct Slot {
    name: Rc<str>,
    owner: Weak<DomainSlot>,
    stats: DomainStats,
}

/// DNS lookups by answer, in the order of `DNS_RESULTS`.
pub const DNS_RESULTS: [&str; 4] = ["mx", "null_mx", "no_such_domain", "temporary_error"];

/// One shard's metrics; only that shard touches them.
pub struct ShardMetrics {
    enabled: bool,
    max_domains: usize,
    slots: Vec<Slot>,
    by_name: HashMap<Rc<str>, u32>,
    other: DomainStats,
    /// The smallest volume among full slots (None: to be computed).
    min_volume: Option<u64>,
    /// When the quantile windows started counting, and the window now (set by `tick`).
    origin: Instant,
    window: u64,
    pub dns_lookups: [u64; DNS_RESULTS.len()],
    pub dns_cache_hits: u64,
}

impl ShardMetrics {
    pub fn new(enabled: bool, max_domains: usize) -> ShardMetrics {
        ShardMetrics {
            enabled,
            max_domains,
            slots: Vec::new(),
            by_name: HashMap::new(),
            other: DomainStats::default(),
            min_volume: None,
            origin: Instant::now(),
            window: 0,
            dns_lookups: [0; DNS_RESULTS.len()],
            dns_cache_hits: 0,
        }
    }

    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// Moves the quantile window on; the shard calls it once a turn of its loop,
    /// so updates on the per-message path read no clock.
    pub fn tick(&mut self, now: Instant) {
        self.window = (now.duration_since(self.origin).as_nanos() / QUANTILE_WINDOW.as_nanos()) as u64;
    }

    /// The handle of a domain the shard starts to keep (again): its slot when it has one.
    pub fn slot_for(&mut self, name: &Rc<str>) -> Rc<DomainSlot> {
        if let Some(&idx) = self.by_name.get(name) {
            let slot = &mut self.slots[idx as usize];
            if let Some(live) = slot.owner.upgrade() {
                return live;
            }
            let h = Rc::new(DomainSlot {
                idx: Cell::new(idx),
                volume: Cell::new(0),
            });
            slot.owner = Rc::downgrade(&h);
            return h;
        }
        Rc::new(DomainSlot {
            idx: Cell::new(OTHER),
            volume: Cell::new(0),
        })
    }

    /// Counts `n` recipients handed to a domain; a domain with twice the volume
    /// of the smallest labeled one takes that one's slot (whose counts go to `_other`).
    pub fn add_volume(&mut self, name: &Rc<str>, h: &Rc<DomainSlot>, n: u64) {
        if !self.enabled {
            return;
        }
        if h.labeled() {
            self.slots[h.idx.get() as usize].stats.volume += n;
            return;
        }
        let volume = h.volume.get() + n;
        h.volume.set(volume);
        self.other.volume += n;
        if self.slots.len() < self.max_domains {
            self.slots.push(Slot {
                name: name.clone(),
                owner: Weak::new(),
                stats: DomainStats::default(),
            });
            self.min_volume = None;
            return self.install(self.slots.len() - 1, name, h);
        }
        if self.max_domains == 0 {
            return;
        }
        let min = *self
            .min_volume
            .get_or_insert_with(|| self.slots.iter().map(|s| s.stats.volume).min().unwrap_or(0));
        // Twice the volume, not just more: domains of equal volume must not trade the labels back and forth.
        if volume <= min.saturating_mul(2) {
            return;
        }
        // The cached minimum is a lower bound (labeled volumes only grow): check the real one.
        let (idx, real_min) = self
            .slots
            .iter()
            .enumerate()
            .map(|(i, s)| (i, s.stats.volume))
            .min_by_key(|&(_, v)| v)
            .expect("slots are full");
        self.min_volume = Some(real_min);
        if volume <= real_min.saturating_mul(2) {
            return;
        }
        let old = &mut self.slots[idx];
        self.by_name.remove(&old.name);
        if let Some(o) = old.owner.upgrade() {
            o.idx.set(OTHER);
            o.volume.set(old.stats.volume);
        }
        let stats = std::mem::take(&mut old.stats);
        self.other.merge(&stats);
        self.min_volume = None;
        self.install(idx, name, h);
    }

    fn install(&mut self, idx: usize, name: &Rc<str>, h: &Rc<DomainSlot>) {
        let volume = h.volume.get();
        self.other.volume -= volume;
        let slot = &mut self.slots[idx];
        slot.name = name.clone();
        slot.owner = Rc::downgrade(h);
        slot.stats = DomainStats {
            volume,
            ..DomainStats::default()
        };
        h.idx.set(idx as u32);
        h.volume.set(0);
        self.by_name.insert(name.clone(), idx as u32);
    }

    /// Counts something for a domain, if metrics are on.
    pub fn with(&mut self, h: &DomainSlot, f: impl FnOnce(&mut DomainStats)) {
        if !self.enabled {
            return;
        }
        let window = self.window;
        let stats = match h.idx.get() {
            OTHER => &mut self.other,
            i => &mut self.slots[i as usize].stats,
        };
        stats.window = window;
        f(stats)
    }

    /// Counts something for a domain known by name (connection events, which are rare).
    pub fn with_name(&mut self, name: &str, f: impl FnOnce(&mut DomainStats)) {
        if !self.enabled {
            return;
        }
        let window = self.window;
        let stats = match self.by_name.get(name) {
            Some(&i) => &mut self.slots[i as usize].stats,
            None => &mut self.other,
        };
        stats.window = window;
        f(stats)
    }

    /// The label a domain's gauges go under.
    pub fn label_of<'a>(&self, name: &'a str) -> &'a str {
        if self.by_name.contains_key(name) {
            name
        } else {
            OTHER_DOMAIN
        }
    }

    /// A copy of every slot (name, counts) and of `_other`, with quantile windows as of the last tick.
    pub fn copy(&self) -> (Vec<(String, DomainStats)>, DomainStats) {
        let w = self.window;
        let slots = self.slots.iter().map(|s| (s.name.to_string(), s.stats.at(w))).collect();
        (slots, self.other.at(w))
    }
}

/// A domain's queue and connections at snapshot time.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct DomainGauges {
    /// Recipients not final yet (queued, in flight, or waiting to be retried).
    pub queued: u64,
    /// Age of the oldest recipient waiting in a queue or for a retry, from
    /// when its spool file was first seen.
    pub oldest_seconds: f64,
    pub connections_open: u64,
    /// Seconds its destination has spent suspended or under lowered limits
    /// (every shard carrying it has the same rules in force: merged by the
    /// largest, not summed).
    pub throttled_seconds: f64,
}

impl DomainGauges {
    pub fn merge(&mut self, o: &DomainGauges) {
        self.queued += o.queued;
        self.oldest_seconds = self.oldest_seconds.max(o.oldest_seconds);
        self.connections_open += o.connections_open;
        self.throttled_seconds = self.throttled_seconds.max(o.throttled_seconds);
    }
}

#[derive(Clone, Default)]
pub struct DomainSnapshot {
    pub name: String,
    pub stats: DomainStats,
    pub gauges: DomainGauges,
}

/// An automation rule in force on one destination.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ActiveRule {
    pub destination: String,
    /// The destination's shaping scope (`default`, `provider.NAME`, a domain).
    pub scope: String,
    pub rule: String,
    /// `suspend`, `set` or `bounce`.
    pub action: &'static str,
    pub ends_in_seconds: f64,
    pub shard: usize,
}

/// A destination that has failed, as `/status` shows it.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct DestState {
    pub destination: String,
    pub shard: usize,
    /// `up` (it works again, or is being tried), `backing-off` (after
    /// failed connections, until `until_seconds`) or `suspended` (by a rule).
    pub state: &'static str,
    /// Seconds until it is tried again (backing off or suspended).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub until_seconds: Option<f64>,
    pub last_error: String,
    pub last_error_seconds_ago: f64,
    /// Failed connections in a row.
    pub failures: u32,
    /// Transactions queued for it on the shard.
    pub queued: u64,
    pub connections: u64,
}

/// Failed destinations `/status` lists (per shard, and in all).
pub const MAX_TROUBLED: usize = 50;

/// Orders failed destinations: not up first, then most queued, then the latest failure.
pub fn worst_first(v: &mut [DestState]) {
    v.sort_by(|a, b| {
        (a.state == "up")
            .cmp(&(b.state == "up"))
            .then(b.queued.cmp(&a.queued))
            .then(a.last_error_seconds_ago.total_cmp(&b.last_error_seconds_ago))
            .then(a.destination.cmp(&b.destination))
    });
}

/// What a shard reports when asked.
#[derive(Clone, Default)]
pub struct ShardSnapshot {
    pub shard: usize,
    /// Labeled domains (empty in a light snapshot).
    pub domains: Vec<DomainSnapshot>,
    pub other: DomainSnapshot,
    pub dns_lookups: [u64; DNS_RESULTS.len()],
    pub dns_cache_hits: u64,
    /// Recipients on the shard not final yet.
    pub held: u64,
    /// Recipients waiting for a retry.
    pub retry_backlog: u64,
    pub domains_known: u64,
    pub destinations: u64,
    pub connections_open: u64,
    /// Automation rules in force now.
    pub active_rules: Vec<ActiveRule>,
    /// Destinations that failed (connections, or transactions deferred whole), the worst first.
    pub troubled: Vec<DestState>,
    /// Rules fired since the start: (scope, rule, action) and how often.
    pub rule_firings: Vec<((String, String, &'static str), u64)>,
    /// Seconds destinations spent suspended or under an override, by scope and action.
    pub shaped_seconds: Vec<((String, &'static str), f64)>,
    /// The shaping limits in force, by scope and limit: the most restrictive
    /// over the scope's destinations (a rule's override included).
    pub limits: Vec<((String, &'static str), f64)>,
    /// DKIM signatures made, by signing domain and algorithm (once per
    /// message file per shard; per job for inline messages).
    pub dkim_signatures: Vec<((String, &'static str), u64)>,
    /// Messages prepared without a signature: no key for their From: domain.
    pub dkim_unsigned: u64,
    /// Messages refused because their signature could not be made.
    pub dkim_failed: u64,
}

/// A request to a shard for its snapshot.
pub struct SnapshotRequest {
    /// With every domain's counts and histograms (for /metrics), or only the shard's totals (for /status).
    pub full: bool,
    pub reply: crossbeam_channel::Sender<ShardSnapshot>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn handle(m: &mut ShardMetrics, name: &str) -> (Rc<str>, Rc<DomainSlot>) {
        let n: Rc<str> = Rc::from(name);
        let h = m.slot_for(&n);
        (n, h)
    }

    #[test]
    fn the_biggest_domains_keep_their_labels_and_the_rest_is_other() {
        let mut m = ShardMetrics::new(true, 2);
        let (a, ha) = handle(&mut m, "a.test");
        let (b, hb) = handle(&mut m, "b.test");
        let (c, hc) = handle(&mut m, "c.test");
        m.add_volume(&a, &ha, 5);
        m.add_volume(&b, &hb, 1);
        m.add_volume(&c, &hc, 1);
        assert!(ha.labeled() && hb.labeled() && !hc.labeled());
        m.with(&hb, |s| s.outcome(Outcome::Delivered, None));
        m.with(&hc, |s| s.outcome(Outcome::Delivered, None));
        // c passes b: b's counts move to _other, c starts afresh.
        m.add_volume(&c, &hc, 2);
        assert!(hc.labeled() && !hb.labeled());
        let (slots, other) = m.copy();
        let names: Vec<_> = slots.iter().map(|(n, s)| (n.as_str(), s.volume)).collect();
        assert_eq!(names, [("a.test", 5), ("c.test", 3)]);
        assert_eq!(other.outcomes[Outcome::Delivered.index()], 2);
        assert_eq!(other.volume, 1);
        // A domain that comes back after being forgotten finds its slot.
        drop(hc);
        let (_, hc2) = handle(&mut m, "c.test");
        assert!(hc2.labeled());
    }

    #[test]
    fn domains_of_equal_volume_do_not_trade_labels() {
        let mut m = ShardMetrics::new(true, 10);
        let hs: Vec<_> = (0..30).map(|i| handle(&mut m, &format!("d{i}.test"))).collect();
        for _ in 0..100 {
            for (n, h) in &hs {
                m.add_volume(n, h, 1);
            }
        }
        let labeled: Vec<_> = hs
            .iter()
            .filter(|(_, h)| h.labeled())
            .map(|(n, _)| n.to_string())
            .collect();
        assert_eq!(labeled, (0..10).map(|i| format!("d{i}.test")).collect::<Vec<_>>());
        let (slots, _) = m.copy();
        assert!(slots.iter().all(|(_, s)| s.volume == 100));
    }

    #[test]
    fn a_million_domains_of_one_recipient_keep_the_first_labels() {
        let mut m = ShardMetrics::new(true, 100);
        for i in 0..1_000_000 {
            let (n, h) = handle(&mut m, &format!("d{i}.test"));
            m.add_volume(&n, &h, 1);
            m.with(&h, |s| s.phase(Phase::Mail, 100));
        }
        let (slots, other) = m.copy();
        assert_eq!(slots.len(), 100);
        assert_eq!(other.volume, 1_000_000 - 100);
        assert_eq!(other.phases[Phase::Mail as usize].as_ref().unwrap().count(), 999_900);
    }

    #[test]
    fn latency_sum_is_exact_and_quantiles_within_one_percent() {
        let mut l = Latency::default();
        for v in 1..=10_000u64 {
            l.record(v, 1, 0);
        }
        assert_eq!(l.count(), 10_000);
        assert_eq!(l.sum_seconds(), 50_005_000.0 / 1e6);
        let p99 = l.quantiles_seconds([0.99])[0] * 1e6;
        assert!((p99 - 9_900.0).abs() / 9_900.0 < 0.01, "p99 {p99}");
        let mut m = Latency::default();
        m.record(20_000, 3, 0);
        l.merge(&m);
        assert_eq!(l.count(), 10_003);
        assert!(l.quantiles_seconds([1.0])[0] >= 0.0199);
    }

    #[test]
    fn quantiles_cover_two_windows_and_count_and_sum_all_time() {
        let mut l = Latency::default();
        l.record(1_000, 10, 0);
        l.record(5_000, 10, 1);
        // Window 1: both windows count.
        assert_eq!(l.at(1).window_count(), 20);
        let close = |a: f64, b: f64| (a - b).abs() / b < 0.01;
        assert!(close(l.at(1).quantiles_seconds([0.25])[0], 0.001));
        // Window 2: only what window 1 saw.
        assert_eq!(l.at(2).window_count(), 10);
        assert!(close(l.at(2).quantiles_seconds([0.25])[0], 0.005));
        // Window 3: nothing recent; the totals stay.
        let old = l.at(3);
        assert!(old.quantiles_seconds([0.5])[0].is_nan());
        assert_eq!((old.count(), old.sum_seconds()), (20, 0.06));
        // Merging a newer distribution moves an older one forward first.
        let mut newer = Latency::default();
        newer.record(2_000, 1, 2);
        let mut merged = l.clone();
        merged.merge(&newer);
        assert_eq!(merged.window_count(), 11);
        assert_eq!(merged.count(), 21);
    }

    #[test]
    fn disabled_metrics_count_nothing() {
        let mut m = ShardMetrics::new(false, 10);
        let (n, h) = handle(&mut m, "a.test");
        m.add_volume(&n, &h, 3);
        m.with(&h, |s| s.outcome(Outcome::Delivered, None));
        let (slots, other) = m.copy();
        assert!(slots.is_empty());
        assert_eq!(other.outcomes, [0; 5]);
    }
}
