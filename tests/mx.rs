//! MX resolution against a real DNS server (hickory-server on loopback):
//! preferences, implicit MX, null MX, NXDOMAIN, a dead first MX, failures,
//! and domains that share an MX set sharing connections.

mod common;

use std::net::Ipv4Addr;
use std::time::Duration;

use common::dns::{Rr, a, mx, serve};
use common::{finals, read_log};
use volley::collector::Summary;
use volley::config::Config;
use volley::outcome::Outcome;
use volley::send::{Progress, SendOptions, send};
use volley::sink::{Sink, SinkOptions};

fn ip(last: u8) -> Ipv4Addr {
    Ipv4Addr::new(127, 0, 0, last)
}

fn zone() -> Vec<Rr> {
    vec![
        mx("pref.test", 20, "mx2.pref.test"),
        mx("pref.test", 10, "mx1.pref.test"),
        a("mx1.pref.test", ip(2)),
        a("mx2.pref.test", ip(3)),
        a("implicit.test", ip(4)),
        mx("nullmx.test", 0, "."),
        mx("firstdead.test", 10, "dead.firstdead.test"),
        mx("firstdead.test", 20, "live.firstdead.test"),
        a("dead.firstdead.test", ip(9)),
        a("live.firstdead.test", ip(5)),
        mx("shared1.test", 10, "mx1.pref.test"),
        mx("shared2.test", 10, "mx1.pref.test"),
        // bücher.test, by its A-label (IDNA).
        mx("xn--bcher-kva.test", 10, "mx1.pref.test"),
    ]
}

/// A sink on each of `lasts` (127.0.0.N), all on one port; returns (sinks, port).
fn sinks(lasts: &[u8]) -> (Vec<Sink>, u16) {
    let first = Sink::start(SinkOptions {
        listen: format!("{}:0", ip(lasts[0])).parse().unwrap(),
        ..Default::default()
    })
    .unwrap();
    let port = first.addr().port();
    let mut all = vec![first];
    for &l in &lasts[1..] {
        all.push(
            Sink::start(SinkOptions {
                listen: format!("{}:{port}", ip(l)).parse().unwrap(),
                ..Default::default()
            })
            .unwrap(),
        );
    }
    (all, port)
}

fn send_to(
    dns: std::net::SocketAddr,
    port: u16,
    lines: &[String],
    tune: impl FnOnce(&mut Config),
) -> (Summary, Vec<serde_json::Value>) {
    let dir = tempfile::tempdir().unwrap();
    let spool = dir.path().join("s.jsonl");
    std::fs::write(&spool, lines.join("\n") + "\n").unwrap();
    let log = dir.path().join("log.jsonl");
    let mut cfg = Config {
        shards: Some(1),
        log: Some(log.clone()),
        mx_port: port,
        ..Config::default()
    };
    cfg.dns.servers = vec![dns];
    cfg.dns.timeout = Duration::from_millis(500);
    cfg.retry.initial = Duration::from_millis(50);
    cfg.idle_timeout = Duration::from_millis(300);
    cfg.timeouts.connect = Duration::from_secs(2);
    tune(&mut cfg);
    let summary = send(SendOptions {
        spools: vec![spool],
        config: cfg,
        progress: Progress::Off,
        stop: None,
        watch: None,
    })
    .unwrap();
    (summary, read_log(&log))
}

fn job(id: &str, rcpts: &[&str]) -> String {
    serde_json::json!({"id": id, "from": "news@sender.test", "to": rcpts, "data": "Subject: mx\n\nhi\n"}).to_string()
}

#[test]
fn mx_preference_implicit_mx_and_a_dead_first_mx() {
    let dns = serve(zone());
    let (sinks, port) = sinks(&[2, 3, 4, 5]);
    let (summary, log) = send_to(
        dns,
        port,
        &[
            job("p", &["a@pref.test", "b@PREF.test"]),
            job("i", &["c@implicit.test"]),
            job("d", &["e@firstdead.test"]),
        ],
        |_| {},
    );
    assert_eq!(summary.count(Outcome::Delivered), 4, "{log:?}");
    let counts: Vec<u64> = sinks.into_iter().map(|s| s.stop().recipients).collect();
    assert_eq!(
        counts,
        vec![2, 0, 1, 1],
        "pref 10 wins over 20; the implicit MX is the domain; the live MX after the dead one"
    );
    let f = finals(&log);
    let p = &f[&("p".to_string(), "a@pref.test".to_string())];
    assert_eq!(p["mx"], "mx1.pref.test");
    assert_eq!(p["ip"], "127.0.0.2");
    let d = &f[&("d".to_string(), "e@firstdead.test".to_string())];
    assert_eq!(d["mx"], "live.firstdead.test");
    assert_eq!(d["attempt"], 1, "the dead MX costs no deferral");
}

#[test]
fn null_mx_and_nxdomain_bounce_and_a_refused_lookup_defers() {
    let dns = serve(zone());
    let (summary, log) = send_to(
        dns,
        1,
        &[
            job("n", &["a@nullmx.test"]),
            job("x", &["b@nonexistent.test"]),
            job("s", &["c@outside.example"]),
        ],
        // Long enough for a deferral before the expiry on a loaded machine.
        |c| c.retry.max_age = Duration::from_millis(1500),
    );
    let f = finals(&log);
    let n = &f[&("n".to_string(), "a@nullmx.test".to_string())];
    assert_eq!(
        (n["outcome"].as_str(), n["enhanced"].as_str()),
        (Some("bounced"), Some("5.1.10")),
        "{n}"
    );
    assert!(n["reply"].as_str().unwrap().contains("null MX"));
    assert_eq!(n["category"], "dns-failure");
    let x = &f[&("x".to_string(), "b@nonexistent.test".to_string())];
    assert_eq!(
        (x["outcome"].as_str(), x["enhanced"].as_str()),
        (Some("bounced"), Some("5.1.2")),
        "{x}"
    );
    // Our server is not authoritative for outside.example: it refuses, which is temporary.
    let s = &f[&("s".to_string(), "c@outside.example".to_string())];
    assert_eq!(s["outcome"], "expired", "{s}");
    assert!(
        s["reply"]
            .as_str()
            .unwrap()
            .contains("MX lookup for outside.example failed"),
        "{s}"
    );
    assert!(
        log.iter()
            .filter(|r| r["id"] == "s" && r["outcome"] == "deferred")
            .count()
            >= 1
    );
    assert_eq!(summary.count(Outcome::Bounced), 2);
}

#[test]
fn domains_with_the_same_mx_set_share_a_connection() {
    let dns = serve(zone());
    let (sinks, port) = sinks(&[2]);
    let lines: Vec<String> = (0..40)
        .map(|i| job(&format!("j{i}"), &[&format!("u{i}@shared{}.test", 1 + i % 2)]))
        .collect();
    let (summary, _) = send_to(dns, port, &lines, |c| c.max_connections_per_destination = 1);
    assert_eq!(summary.count(Outcome::Delivered), 40);
    let counts = sinks.into_iter().next().unwrap().stop();
    assert_eq!(
        counts.sessions, 1,
        "shared1.test and shared2.test went over one connection: {counts}"
    );
    assert_eq!(counts.messages, 40);
}

/// A real list has thousands of distinct domains, each needing its own MX
/// lookup at once: none of them may be deferred by volley's own resolver.
/// Each query has a socket of its own, so unbounded lookups ran a process
/// at the common limit of 1,024 open files out of sockets (`no connections
/// available`); they now wait their turn. The nameserver here answers after
/// 20 ms and leaves one query in 50 unanswered. `VOLLEY_MX_DOMAINS` sets the
/// count (5,000), `VOLLEY_MX_DELAY_MS` and `VOLLEY_MX_DROP_EVERY` the
/// nameserver's delay and drops (0: none); the time against the same spool
/// routed is printed.
#[test]
fn thousands_of_domains_are_resolved_without_a_deferral() {
    let domains: usize = std::env::var("VOLLEY_MX_DOMAINS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5000);
    // As a process started with the usual soft limit would be.
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
        lim.rlim_cur = lim.rlim_cur.min(1024);
        libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
    }
    let mut records: Vec<Rr> = (0..domains)
        .map(|i| mx(&format!("d{i}.test"), 10, "mx.hosting.test"))
        .collect();
    records.push(a("mx.hosting.test", ip(2)));
    let env = |name: &str, default: u64| std::env::var(name).ok().and_then(|s| s.parse().ok()).unwrap_or(default);
    let delay = Duration::from_millis(env("VOLLEY_MX_DELAY_MS", 20));
    let dns = common::dns::serve_delayed(records, delay, env("VOLLEY_MX_DROP_EVERY", 50));
    let (sinks, port) = sinks(&[2]);
    let lines: Vec<String> = (0..domains)
        .map(|i| job(&format!("j{i}"), &[&format!("r@d{i}.test")]))
        .collect();
    let tune = |c: &mut Config| {
        c.shards = Some(2);
        c.dns.timeout = Duration::from_secs(1);
    };
    let started = std::time::Instant::now();
    let (summary, log) = send_to(dns, port, &lines, tune);
    let resolved = started.elapsed();
    let deferrals: Vec<&serde_json::Value> = log.iter().filter(|r| r["outcome"] == "deferred").collect();
    assert!(
        deferrals.is_empty(),
        "{} deferrals, the first: {}",
        deferrals.len(),
        deferrals[0]["reply"]
    );
    assert_eq!(summary.count(Outcome::Delivered), domains as u64);
    let started = std::time::Instant::now();
    let (routed, _) = send_to(dns, port, &lines, |c| {
        tune(c);
        c.add_route(&format!("*={}:{port}", ip(2))).unwrap();
    });
    let routed_time = started.elapsed();
    assert_eq!(routed.count(Outcome::Delivered), domains as u64);
    assert_eq!(
        sinks.into_iter().map(|s| s.stop().recipients).sum::<u64>(),
        2 * domains as u64
    );
    eprintln!(
        "{domains} domains: resolved by MX in {:.2}s, routed in {:.2}s ({:.2}x)",
        resolved.as_secs_f64(),
        routed_time.as_secs_f64(),
        resolved.as_secs_f64() / routed_time.as_secs_f64()
    );
}

#[test]
fn a_utf8_domain_is_looked_up_by_its_a_label() {
    let dns = serve(zone());
    let (sinks, port) = sinks(&[2]);
    let (summary, log) = send_to(dns, port, &[job("u", &["leser@b\u{fc}cher.test"])], |_| {});
    assert_eq!(summary.count(Outcome::Delivered), 1, "{log:?}");
    let f = finals(&log);
    assert_eq!(
        f[&("u".to_string(), "leser@b\u{fc}cher.test".to_string())]["mx"],
        "mx1.pref.test"
    );
    assert_eq!(sinks.into_iter().map(|s| s.stop().recipients).sum::<u64>(), 1);
    // An ASCII local part: the domain went as its A-label, no SMTPUTF8 needed.
}
