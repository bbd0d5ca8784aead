//! Shard snapshots merged into one view, and that view as Prometheus metric
//! families (rendered to text by the `prometheus` crate's encoder).

use prometheus::proto::{
    Bucket, Counter, Gauge, Histogram, LabelPair, Metric, MetricFamily, MetricType, Quantile, Summary,
};

use super::{
    BUCKETS_MICROS, CATEGORIZED, ConnResult, DNS_RESULTS, DomainSnapshot, Latency, OTHER_DOMAIN, Phase, ShardSnapshot,
};
use crate::classify::CATEGORIES;
use crate::outcome::Outcome;

/// Quantiles exported for every latency summary (the median and the tail:
/// with a few summaries per domain, more would make most of the scrape).
pub const QUANTILES: [f64; 2] = [0.5, 0.99];

/// Every shard's snapshot merged: the top domains by volume, the rest in `_other`.
#[derive(Default)]
pub struct Merged {
    pub domains: Vec<DomainSnapshot>,
    pub other: DomainSnapshot,
    pub shards: Vec<ShardSnapshot>,
}

/// What the collector knows of the spool, for the gauges that are not per shard.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct SpoolGauges {
    /// Recipients read from the spool files being worked on (and finished files, in `send`).
    pub read: u64,
    /// Of those, final.
    pub finals: u64,
    /// Deferred at least once and not final yet.
    pub deferred: u64,
    /// Recipients rejected as bad input (never reach a shard; counted under `_other`).
    pub rejected: u64,
    /// Spool files being worked on.
    pub files_active: u64,
    pub files_done: u64,
    pub files_failed: u64,
}

/// Merges shard snapshots, keeping `max_domains` domain labels.
pub fn merge(shards: Vec<ShardSnapshot>, max_domains: usize) -> Merged {
    let mut all: Vec<DomainSnapshot> = Vec::new();
    let mut other = DomainSnapshot {
        name: OTHER_DOMAIN.to_string(),
        ..DomainSnapshot::default()
    };
    let mut kept_shards = Vec::with_capacity(shards.len());
    for mut s in shards {
        all.append(&mut s.domains);
        other.stats.merge(&s.other.stats);
        other.gauges.merge(&s.other.gauges);
        s.other = DomainSnapshot::default();
        kept_shards.push(s);
    }
    // A spread domain has a slot on each shard carrying it: one label.
    all.sort_by(|a, b| a.name.cmp(&b.name));
    all.dedup_by(|later, first| {
        if later.name != first.name {
            return false;
        }
        first.stats.merge(&later.stats);
        first.gauges.merge(&later.gauges);
        true
    });
    // Biggest first; ties by name so that the cut is stable between scrapes.
    all.sort_by(|a, b| b.stats.volume.cmp(&a.stats.volume).then_with(|| a.name.cmp(&b.name)));
    let rest = all.split_off(all.len().min(max_domains));
    for d in rest {
        other.stats.merge(&d.stats);
        other.gauges.merge(&d.gauges);
    }
    all.sort_by(|a, b| a.name.cmp(&b.name));
    Merged {
        domains: all,
        other,
        shards: kept_shards,
    }
}

fn labels(pairs: &[(&str, &str)]) -> Vec<LabelPair> {
    pairs
        .iter()
        .map(|(k, v)| {
            let mut l = LabelPair::default();
            l.set_name(k.to_string());
            l.set_value(v.to_string());
            l
        })
        .collect()
}

/// One metric family under construction.
struct Family {
    name: &'static str,
    help: &'static str,
    kind: MetricType,
    metrics: Vec<Metric>,
}

impl Family {
    fn new(name: &'static str, kind: MetricType, help: &'static str) -> Family {
        Family {
            name,
            help,
            kind,
            metrics: Vec::new(),
        }
    }
    fn counter(&mut self, l: &[(&str, &str)], v: u64) {
        self.counter_f(l, v as f64);
    }
    fn counter_f(&mut self, l: &[(&str, &str)], v: f64) {
        let mut c = Counter::default();
        c.set_value(v);
        let mut m = Metric::default();
        m.set_label(labels(l));
        m.set_counter(c);
        self.metrics.push(m);
    }
    fn gauge(&mut self, l: &[(&str, &str)], v: f64) {
        let mut g = Gauge::default();
        g.set_value(v);
        let mut m = Metric::default();
        m.set_label(labels(l));
        m.set_gauge(g);
        self.metrics.push(m);
    }
    /// A counter that is left out while it is zero (a series that only
    /// ever says 0, such as a result a domain never had, is not sent),
    /// except under `_other`, so that every family is in every scrape.
    fn counter_nz(&mut self, l: &[(&str, &str)], v: u64) {
        if v > 0 || l.first().is_some_and(|&(k, d)| k == "domain" && d == OTHER_DOMAIN) {
            self.counter(l, v);
        }
    }
    fn summary(&mut self, l: &[(&str, &str)], lat: &Latency) {
        let mut s = Summary::default();
        s.set_sample_count(lat.count());
        s.set_sample_sum(lat.sum_seconds());
        let values = lat.quantiles_seconds(QUANTILES);
        s.set_quantile(
            QUANTILES
                .iter()
                .zip(values)
                .map(|(&q, v)| {
                    let mut x = Quantile::default();
                    x.set_quantile(q);
                    x.set_value(v);
                    x
                })
                .collect(),
        );
        let mut m = Metric::default();
        m.set_label(labels(l));
        m.set_summary(s);
        self.metrics.push(m);
    }
    /// A histogram: `_bucket` at each of [`BUCKETS_MICROS`] (the encoder
    /// adds `+Inf`), `_sum` and `_count`, all since the start.
    fn histogram(&mut self, l: &[(&str, &str)], count: u64, sum_seconds: f64, cumulative: &[u64]) {
        let mut h = Histogram::default();
        h.set_sample_count(count);
        h.set_sample_sum(sum_seconds);
        h.set_bucket(
            BUCKETS_MICROS
                .iter()
                .zip(cumulative)
                .map(|(&le, &n)| {
                    let mut b = Bucket::default();
                    b.set_upper_bound(le as f64 / 1e6);
                    b.set_cumulative_count(n);
                    b
                })
                .collect(),
        );
        let mut m = Metric::default();
        m.set_label(labels(l));
        m.set_histogram(h);
        self.metrics.push(m);
    }
    fn done(self, out: &mut Vec<MetricFamily>) {
        if self.metrics.is_empty() {
            return;
        }
        let mut f = MetricFamily::default();
        f.set_name(self.name.to_string());
        f.set_help(self.help.to_string());
        f.set_field_type(self.kind);
        f.set_metric(self.metrics);
        out.push(f);
    }
}

/// The fleet's exchange (`[fleet]`): whether Redis answers, and the rules shared.
pub fn fleet_families(f: &crate::fleet::FleetState) -> Vec<MetricFamily> {
    use std::sync::atomic::Ordering::Relaxed;
    let mut up = Family::new(
        "volley_fleet_redis_up",
        MetricType::GAUGE,
        "1 while the fleet's Redis answers; 0 while this node keeps to its own rules and limits.",
    );
    up.gauge(&[], if f.up.load(Relaxed) { 1.0 } else { 0.0 });
    let mut nodes = Family::new(
        "volley_fleet_nodes",
        MetricType::GAUGE,
        "Nodes of the fleet alive by their heartbeats in Redis (the last count while it does not answer): fleet_message_rate is divided by it.",
    );
    nodes.gauge(&[], f64::from(crate::fleet::nodes_alive()));
    let mut rules = Family::new(
        "volley_fleet_rules_total",
        MetricType::COUNTER,
        "Automation rules marked fleet: published by this node (direction=out), taken in from others (in).",
    );
    rules.counter(&[("direction", "out")], f.published.load(Relaxed));
    rules.counter(&[("direction", "in")], f.received.load(Relaxed));
    let mut errors = Family::new(
        "volley_fleet_redis_errors_total",
        MetricType::COUNTER,
        "Failed connections to the fleet's Redis and failed exchanges with it.",
    );
    errors.counter(&[], f.errors.load(Relaxed));
    let mut out = Vec::new();
    for fam in [up, nodes, rules, errors] {
        fam.done(&mut out);
    }
    out
}

/// The metric families of a merged view and the spool gauges.
pub fn families(m: &Merged, spool: &SpoolGauges) -> Vec<MetricFamily> {
    use MetricType::{COUNTER, GAUGE, HISTOGRAM, SUMMARY};
    let mut deliveries = Family::new(
        "volley_deliveries_total",
        COUNTER,
        "Recipient outcomes by domain (deferred: each deferral; rejected: bad input, under _other).",
    );
    let mut volume = Family::new(
        "volley_recipients_total",
        COUNTER,
        "Recipients handed to each domain (the volume that ranks domains for their own label).",
    );
    let mut replies = Family::new(
        "volley_smtp_replies_total",
        COUNTER,
        "Server replies by domain, command (greeting, ehlo, helo, starttls, auth, mail, rcpt, data, dot, bdat, rset, quit) and code; failing ones (4xx, 5xx) under their domain and with their RFC 3463 enhanced status code where the server gave one, the others and session commands under the domain that first routed to the destination.",
    );
    let mut categories = Family::new(
        "volley_bounce_categories_total",
        COUNTER,
        "Bounces, deferrals and expiries by domain and bounce category.",
    );
    let mut delivery = Family::new(
        "volley_delivery_duration_seconds",
        HISTOGRAM,
        "Per delivered recipient: from its first attempt to the reply to the final dot (retries included); buckets from 5 ms to 10 min, since the start (histogram_quantile over rate(..._bucket) sums across nodes).",
    );
    let mut phases_all = Family::new(
        "volley_smtp_phase_seconds",
        HISTOGRAM,
        "SMTP phases as volley_smtp_phase_duration_seconds times them, all domains together, by phase; buckets from 5 ms to 10 min since the start (for percentiles across nodes).",
    );
    let mut phase_totals = [(0u64, 0f64, [0u64; BUCKETS_MICROS.len()]); Phase::ALL.len()];
    let mut phases = Family::new(
        "volley_smtp_phase_duration_seconds",
        SUMMARY,
        "SMTP phases by domain: connect, banner (connected to greeting), ehlo, starttls (command to handshake done), mail, rcpt, data, dot (end of body to its reply). Each reply is timed from the write that carried its command; pipelined MAIL, RCPT and DATA share one write, so rcpt and data include the replies before them; with BDAT, dot is the reply to BDAT LAST. Quantiles over the last one to two minutes; _sum and _count since the start.",
    );
    let mut conns_open = Family::new(
        "volley_connections_open",
        GAUGE,
        "Open connections, under the domain that first routed to their destination.",
    );
    let mut conns = Family::new(
        "volley_connections_total",
        COUNTER,
        "Connection attempts by result (ok, connect_error, setup_error, tls_error, auth_error).",
    );
    let mut tls = Family::new(
        "volley_tls_handshakes_total",
        COUNTER,
        "TLS handshakes (STARTTLS or implicit) by result.",
    );
    let mut queue = Family::new(
        "volley_queue_recipients",
        GAUGE,
        "Recipients not final yet: queued, in flight or waiting to be retried.",
    );
    let mut oldest = Family::new(
        "volley_queue_oldest_age_seconds",
        GAUGE,
        "Age of the oldest recipient waiting in a queue or for a retry, from when its spool file was first seen.",
    );
    let mut throttled = Family::new(
        "volley_domain_throttled_seconds_total",
        COUNTER,
        "Seconds the domain's destination has spent suspended or under lowered limits by an automation rule (not under _other).",
    );
    for d in m.domains.iter().chain([&m.other]) {
        let dom = d.name.as_str();
        let s = &d.stats;
        for o in Outcome::ALL {
            let mut n = s.outcomes[o.index()];
            if o == Outcome::Rejected && dom == OTHER_DOMAIN {
                n += spool.rejected;
            }
            deliveries.counter_nz(&[("domain", dom), ("outcome", o.name())], n);
        }
        volume.counter(&[("domain", dom)], s.volume);
        let mut rs = s.replies.clone();
        rs.sort_by_key(|&(c, k, e, _)| (c.name(), k, e));
        for (c, code, e, n) in rs {
            let code = code.to_string();
            match e {
                Some(e) => replies.counter(
                    &[
                        ("domain", dom),
                        ("command", c.name()),
                        ("code", &code),
                        ("enhanced", &e.to_string()),
                    ],
                    n,
                ),
                None => replies.counter(&[("domain", dom), ("command", c.name()), ("code", &code)], n),
            }
        }
        for (oi, o) in CATEGORIZED.iter().enumerate() {
            for (ci, c) in CATEGORIES.iter().enumerate() {
                let n = s.categories[oi][ci];
                if n > 0 {
                    categories.counter(&[("domain", dom), ("outcome", o.name()), ("category", c)], n);
                }
            }
        }
        if let Some(l) = &s.delivery {
            delivery.histogram(&[("domain", dom)], l.count(), l.sum_seconds(), &l.cumulative_buckets());
        }
        for p in Phase::ALL {
            if let Some(l) = &s.phases[p as usize] {
                phases.summary(&[("domain", dom), ("phase", p.name())], l);
                let t = &mut phase_totals[p as usize];
                t.0 += l.count();
                t.1 += l.sum_seconds();
                for (a, b) in t.2.iter_mut().zip(l.cumulative_buckets()) {
                    *a += b;
                }
            }
        }
        // A domain with nothing open or waiting has no gauges (they go stale, not 0).
        let idle = d.gauges.connections_open == 0 && d.gauges.queued == 0;
        if !idle || dom == OTHER_DOMAIN {
            // Connections are counted under a destination's first domain: its others say 0.
            if d.gauges.connections_open > 0 || dom == OTHER_DOMAIN {
                conns_open.gauge(&[("domain", dom)], d.gauges.connections_open as f64);
            }
            queue.gauge(&[("domain", dom)], d.gauges.queued as f64);
            oldest.gauge(&[("domain", dom)], (d.gauges.oldest_seconds * 1e3).round() / 1e3);
        }
        for r in ConnResult::ALL {
            conns.counter_nz(&[("domain", dom), ("result", r.name())], s.connections[r as usize]);
        }
        tls.counter_nz(&[("domain", dom), ("result", "ok")], s.tls[0]);
        tls.counter_nz(&[("domain", dom), ("result", "failed")], s.tls[1]);
        if dom != OTHER_DOMAIN && d.gauges.throttled_seconds > 0.0 {
            throttled.counter_f(&[("domain", dom)], d.gauges.throttled_seconds);
        }
    }
    for p in Phase::ALL {
        let (count, sum, buckets) = &phase_totals[p as usize];
        if *count > 0 {
            phases_all.histogram(&[("phase", p.name())], *count, *sum, buckets);
        }
    }
    let mut out = Vec::new();
    for f in [
        deliveries, volume, replies, categories, delivery, phases, phases_all, conns_open, conns, tls, queue, oldest,
        throttled,
    ] {
        f.done(&mut out);
    }

    let mut dns = Family::new(
        "volley_dns_lookups_total",
        COUNTER,
        "MX lookups by answer (mx, null_mx, no_such_domain, temporary_error).",
    );
    let mut hits = Family::new(
        "volley_dns_cache_hits_total",
        COUNTER,
        "Transactions routed from a cached MX answer.",
    );
    let mut held = Family::new(
        "volley_shard_recipients",
        GAUGE,
        "Recipients on each shard not final yet.",
    );
    let mut backlog = Family::new(
        "volley_retry_backlog_recipients",
        GAUGE,
        "Recipients waiting for their next attempt, per shard.",
    );
    let mut dns_sum = [0u64; DNS_RESULTS.len()];
    let mut hit_sum = 0;
    for s in &m.shards {
        for (a, b) in dns_sum.iter_mut().zip(s.dns_lookups) {
            *a += b;
        }
        hit_sum += s.dns_cache_hits;
        let shard = s.shard.to_string();
        held.gauge(&[("shard", &shard)], s.held as f64);
        backlog.gauge(&[("shard", &shard)], s.retry_backlog as f64);
    }
    for (r, n) in DNS_RESULTS.iter().zip(dns_sum) {
        dns.counter(&[("result", r)], n);
    }
    hits.counter(&[], hit_sum);
    let mut spool_rcpts = Family::new(
        "volley_spool_recipients",
        GAUGE,
        "Recipients of the spool files by state: read, final, pending (read, not final), deferred (deferred at least once, not final).",
    );
    spool_rcpts.gauge(&[("state", "read")], spool.read as f64);
    spool_rcpts.gauge(&[("state", "final")], spool.finals as f64);
    spool_rcpts.gauge(&[("state", "pending")], spool.read.saturating_sub(spool.finals) as f64);
    spool_rcpts.gauge(&[("state", "deferred")], spool.deferred as f64);
    let mut files = Family::new(
        "volley_spool_files",
        GAUGE,
        "Spool files by state (active, done, failed).",
    );
    files.gauge(&[("state", "active")], spool.files_active as f64);
    files.gauge(&[("state", "done")], spool.files_done as f64);
    files.gauge(&[("state", "failed")], spool.files_failed as f64);
    let mut firings = Family::new(
        "volley_automation_firings_total",
        COUNTER,
        "Automation rules fired, by shaping scope (default, provider.NAME or a domain), rule and action (suspend, set, bounce).",
    );
    let mut active = Family::new(
        "volley_automation_active",
        GAUGE,
        "Automation rules in force now, by scope, rule and action (destinations, each shard counted).",
    );
    let mut shaped = Family::new(
        "volley_automation_seconds_total",
        COUNTER,
        "Time destinations spent under automation rules, by scope and action (seconds, summed over destinations and shards).",
    );
    let mut limit = Family::new(
        "volley_shaping_limit",
        GAUGE,
        "Shaping limits in force by scope: max_connections, max_deliveries_per_connection, max_message_rate and max_connection_rate (per second); the most restrictive over the scope's destinations, a rule's override included.",
    );
    let mut limits: std::collections::BTreeMap<(String, &str), f64> = Default::default();
    for s in &m.shards {
        for ((scope, l), v) in &s.limits {
            let e = limits.entry((scope.clone(), *l)).or_insert(*v);
            *e = e.min(*v);
        }
    }
    for ((scope, l), v) in &limits {
        limit.gauge(&[("scope", scope), ("limit", l)], *v);
    }
    let mut fired: std::collections::BTreeMap<(String, String, &str), u64> = Default::default();
    let mut in_force: std::collections::BTreeMap<(String, String, &str), u64> = Default::default();
    let mut seconds: std::collections::BTreeMap<(String, &str), f64> = Default::default();
    for s in &m.shards {
        for (k, n) in &s.rule_firings {
            *fired.entry(k.clone()).or_default() += n;
        }
        for r in &s.active_rules {
            *in_force.entry((r.scope.clone(), r.rule.clone(), r.action)).or_default() += 1;
        }
        for (k, secs) in &s.shaped_seconds {
            *seconds.entry(k.clone()).or_default() += secs;
        }
    }
    for ((scope, rule, action), n) in &fired {
        firings.counter(&[("scope", scope), ("rule", rule), ("action", action)], *n);
        let now = in_force
            .get(&(scope.clone(), rule.clone(), *action))
            .copied()
            .unwrap_or(0);
        active.gauge(&[("scope", scope), ("rule", rule), ("action", action)], now as f64);
    }
    for ((scope, action), secs) in &seconds {
        shaped.counter_f(&[("scope", scope), ("action", action)], *secs);
    }
    let mut dkim = Family::new(
        "volley_dkim_signatures_total",
        COUNTER,
        "DKIM signatures made, by signing domain and algorithm: once per message file per shard (a newsletter's jobs share it), once per job for inline messages.",
    );
    let mut dkim_unsigned = Family::new(
        "volley_dkim_unsigned_messages_total",
        COUNTER,
        "Messages prepared without a DKIM signature while DKIM is configured (no key for their From: domain), and messages refused because signing failed.",
    );
    let mut signed: std::collections::BTreeMap<(String, &str), u64> = Default::default();
    let (mut unsigned, mut failed) = (0, 0);
    for s in &m.shards {
        for ((d, a), n) in &s.dkim_signatures {
            *signed.entry((d.clone(), *a)).or_default() += n;
        }
        unsigned += s.dkim_unsigned;
        failed += s.dkim_failed;
    }
    for ((d, a), n) in &signed {
        dkim.counter(&[("domain", d), ("algorithm", a)], *n);
    }
    dkim_unsigned.counter(&[("reason", "no_key")], unsigned);
    dkim_unsigned.counter(&[("reason", "failed")], failed);
    let mut info = Family::new("volley_build_info", GAUGE, "Always 1; the version in a label.");
    info.gauge(&[("version", env!("CARGO_PKG_VERSION"))], 1.0);
    for f in [
        dns,
        hits,
        held,
        backlog,
        spool_rcpts,
        files,
        limit,
        firings,
        active,
        shaped,
        dkim,
        dkim_unsigned,
        info,
    ] {
        f.done(&mut out);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::ActiveRule;

    fn text(m: &Merged) -> String {
        use prometheus::Encoder;
        let mut buf = Vec::new();
        prometheus::TextEncoder::new()
            .encode(&families(m, &SpoolGauges::default()), &mut buf)
            .unwrap();
        String::from_utf8(buf).unwrap()
    }

    #[test]
    fn automation_is_counted_over_the_shards() {
        let shard = |i: usize, active: bool| ShardSnapshot {
            shard: i,
            rule_firings: vec![(("provider.google".into(), "google-rate-limited".into(), "set"), 2)],
            active_rules: if active {
                vec![ActiveRule {
                    destination: "gmail-smtp-in.l.google.com:25".into(),
                    scope: "provider.google".into(),
                    rule: "google-rate-limited".into(),
                    action: "set",
                    ends_in_seconds: 60.0,
                    shard: i,
                }]
            } else {
                Vec::new()
            },
            shaped_seconds: vec![(("provider.google".into(), "set"), 1.5)],
            limits: vec![(
                ("provider.google".into(), "max_connections"),
                if active { 2.0 } else { 20.0 },
            )],
            ..ShardSnapshot::default()
        };
        let m = merge(vec![shard(0, true), shard(1, false)], 10);
        let t = text(&m);
        let labels = r#"{scope="provider.google",rule="google-rate-limited",action="set"}"#;
        assert!(t.contains(&format!("volley_automation_firings_total{labels} 4")), "{t}");
        assert!(t.contains(&format!("volley_automation_active{labels} 1")), "{t}");
        assert!(
            t.contains(r#"volley_automation_seconds_total{scope="provider.google",action="set"} 3"#),
            "{t}"
        );
        assert!(
            t.contains(r#"volley_shaping_limit{scope="provider.google",limit="max_connections"} 2"#),
            "the most restrictive over the shards: {t}"
        );
    }

    #[test]
    fn a_domain_on_two_shards_is_one_label_and_its_throttled_time_is_not_doubled() {
        use crate::metrics::{DomainGauges, DomainSnapshot};
        let shard = |i: usize, queued: u64| {
            let mut d = DomainSnapshot {
                name: "gmail.com".into(),
                gauges: DomainGauges {
                    queued,
                    throttled_seconds: 90.0,
                    ..DomainGauges::default()
                },
                ..DomainSnapshot::default()
            };
            d.stats.volume = 100;
            ShardSnapshot {
                shard: i,
                domains: vec![d],
                ..ShardSnapshot::default()
            }
        };
        let m = merge(vec![shard(0, 5), shard(1, 7)], 10);
        assert_eq!(m.domains.len(), 1);
        let t = text(&m);
        assert!(t.contains(r#"volley_queue_recipients{domain="gmail.com"} 12"#), "{t}");
        assert!(t.contains(r#"volley_recipients_total{domain="gmail.com"} 200"#), "{t}");
        assert!(
            t.contains(r#"volley_domain_throttled_seconds_total{domain="gmail.com"} 90"#),
            "{t}"
        );
        assert!(!t.contains(r#"volley_domain_throttled_seconds_total{domain="_other"}"#));
    }
}

#[cfg(test)]
mod zero_tests {
    use super::*;
    use crate::metrics::{DomainGauges, DomainSnapshot};

    /// Series that only ever say 0 are not sent for a domain (a result it
    /// never had, gauges of a domain with nothing open or waiting), but
    /// `_other` keeps every family in the scrape.
    #[test]
    fn a_domain_s_zero_series_are_left_out_and_other_keeps_every_family() {
        let mut busy = DomainSnapshot {
            name: "busy.test".into(),
            gauges: DomainGauges {
                queued: 3,
                ..DomainGauges::default()
            },
            ..DomainSnapshot::default()
        };
        busy.stats.volume = 10;
        busy.stats.outcomes[Outcome::Delivered.index()] = 7;
        let mut idle = DomainSnapshot {
            name: "idle.test".into(),
            ..DomainSnapshot::default()
        };
        idle.stats.volume = 5;
        idle.stats.outcomes[Outcome::Delivered.index()] = 5;
        let m = merge(
            vec![ShardSnapshot {
                domains: vec![busy, idle],
                ..ShardSnapshot::default()
            }],
            10,
        );
        let mut buf = Vec::new();
        prometheus::Encoder::encode(
            &prometheus::TextEncoder::new(),
            &families(&m, &SpoolGauges::default()),
            &mut buf,
        )
        .unwrap();
        let t = String::from_utf8(buf).unwrap();
        assert!(
            t.contains(r#"volley_deliveries_total{domain="busy.test",outcome="delivered"} 7"#),
            "{t}"
        );
        assert!(
            !t.contains(r#"volley_deliveries_total{domain="busy.test",outcome="bounced"}"#),
            "{t}"
        );
        assert!(t.contains(r#"volley_queue_recipients{domain="busy.test"} 3"#), "{t}");
        assert!(!t.contains(r#"volley_queue_recipients{domain="idle.test"}"#), "{t}");
        assert!(!t.contains(r#"volley_connections_total{domain="idle.test""#), "{t}");
        assert!(
            !t.contains(r#"volley_domain_throttled_seconds_total{domain="idle.test"}"#),
            "{t}"
        );
        assert!(t.contains(r#"volley_recipients_total{domain="idle.test"} 5"#), "{t}");
        for family in [
            "volley_connections_total",
            "volley_tls_handshakes_total",
            "volley_queue_recipients",
        ] {
            assert!(t.contains(&format!("{family}{{domain=\"_other\"")), "{family}: {t}");
        }
        let zero_counter =
            |l: &&str| !l.starts_with('#') && l.contains("_total{domain=\"busy.test\"") && l.ends_with(" 0");
        assert!(!t.lines().any(|l| zero_counter(&l)), "{t}");
    }
}
