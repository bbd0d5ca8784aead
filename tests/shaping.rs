//! Traffic shaping against `volley sink` throttling like a provider: a
//! configured rate under the receiver's keeps every reply clean; without
//! one the receiver throttles until a rule slows the destination, and every
//! recipient still ends final once.

mod common;

use std::time::Duration;

use common::{dumped_rcpts, finals, read_log, send_all, spool};
use volley::config::Config;
use volley::outcome::Outcome;
use volley::send::{Progress, SendOptions, send};
use volley::shaping::Rate;
use volley::sink::{Sink, SinkOptions};

fn throttling_sink(dump: &std::path::Path, rate: &str) -> Sink {
    Sink::start(SinkOptions {
        listen: "127.0.0.1:0".parse().unwrap(),
        shards: 1,
        dump: Some(dump.to_path_buf()),
        rate_limit: Some(rate.parse::<Rate>().unwrap()),
        ..Default::default()
    })
    .unwrap()
}

fn config(sink: &Sink, log: &std::path::Path, shaping: Option<&std::path::Path>) -> Config {
    let mut c = Config {
        shards: Some(2),
        log: Some(log.to_path_buf()),
        shaping: shaping.into_iter().map(|p| p.to_path_buf()).collect(),
        ..Config::default()
    };
    c.add_route(&format!("*={}", sink.addr())).unwrap();
    c.retry.initial = Duration::from_millis(50);
    c.retry.max_delay = Duration::from_millis(200);
    c
}

#[test]
fn a_configured_rate_under_the_receivers_draws_no_throttle_reply() {
    let dir = tempfile::tempdir().unwrap();
    let dump = dir.path().join("dump");
    let sink = throttling_sink(&dump, "200/s");
    let (path, all) = spool(dir.path(), "paced", 300, 1, 1);
    let shaping = dir.path().join("shaping.toml");
    std::fs::write(&shaping, "[\"d0.test\"]\nmax_message_rate = \"150/s\"\n").unwrap();
    let log = dir.path().join("log.jsonl");
    let summary = send_all(vec![path], config(&sink, &log, Some(&shaping)));
    let counts = sink.stop();
    assert_eq!(counts.throttled, 0, "{counts}");
    assert_eq!(summary.count(Outcome::Delivered), 300);
    let records = read_log(&log);
    assert!(
        records.iter().all(|r| r["outcome"] == "delivered"),
        "no deferral at all"
    );
    assert_eq!(dumped_rcpts(&dump), all);
}

#[test]
fn without_a_limit_the_receiver_throttles_and_every_recipient_still_ends_once() {
    let dir = tempfile::tempdir().unwrap();
    let dump = dir.path().join("dump");
    let sink = throttling_sink(&dump, "200/s");
    let (path, all) = spool(dir.path(), "unpaced", 150, 1, 1);
    let log = dir.path().join("log.jsonl");
    let summary = send_all(vec![path], config(&sink, &log, None));
    let counts = sink.stop();
    assert!(counts.throttled > 0, "unshaped, the sink throttles: {counts}");
    let records = read_log(&log);
    assert!(
        records
            .iter()
            .any(|r| r["outcome"] == "deferred" && r["code"] == 421 && r["enhanced"] == "4.7.28"),
        "the throttle replies are logged as deferrals"
    );
    assert_eq!(finals(&records).len(), 150);
    assert_eq!(summary.count(Outcome::Delivered), 150);
    assert_eq!(dumped_rcpts(&dump), all, "each recipient delivered exactly once");
}

#[test]
fn a_bad_shaping_file_is_refused_naming_file_table_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let dump = dir.path().join("dump");
    let sink = throttling_sink(&dump, "200/s");
    let (path, _) = spool(dir.path(), "bad", 10, 1, 1);
    let shaping = dir.path().join("mine.toml");
    std::fs::write(&shaping, "[provider.google]\nmax_conections = 3\n").unwrap();
    let err = send(SendOptions {
        spools: vec![path],
        config: config(&sink, &dir.path().join("log.jsonl"), Some(&shaping)),
        progress: Progress::Off,
        stop: None,
        watch: None,
    })
    .expect_err("refused");
    let text = format!("{err:#}");
    assert!(
        text.contains(&format!(
            "{}: [provider.google]: unknown field `max_conections`",
            shaping.display()
        )),
        "{text}"
    );
    assert_eq!(sink.stop().messages, 0, "nothing was sent");
}

#[test]
fn a_rule_slows_a_throttling_destination_and_the_throttle_replies_stop() {
    let dir = tempfile::tempdir().unwrap();
    let dump = dir.path().join("dump");
    let sink = throttling_sink(&dump, "200/s");
    let (path, all) = spool(dir.path(), "ruled", 400, 1, 1);
    let shaping = dir.path().join("shaping.toml");
    std::fs::write(
        &shaping,
        "[[\"d0.test\".automation]]\nregex = '4\\.7\\.28'\naction = { set = { max_message_rate = \"150/s\" } }\nduration = \"10m\"\n",
    )
    .unwrap();
    let log = dir.path().join("log.jsonl");
    let cfg = config(&sink, &log, Some(&shaping));
    let most = cfg.max_connections_per_destination as u64;
    let summary = send_all(vec![path], cfg);
    let counts = sink.stop();
    // The first throttle reply fires the rule; a 421 closes its session, so
    // at most one more per connection open at that moment.
    assert!(
        (1..=most).contains(&counts.throttled),
        "throttled {} times: the replies stopped once the rule slowed the destination",
        counts.throttled
    );
    assert_eq!(summary.count(Outcome::Delivered), 400);
    assert_eq!(finals(&read_log(&log)).len(), 400);
    assert_eq!(dumped_rcpts(&dump), all, "each recipient delivered exactly once");
}

#[test]
fn a_suspended_destination_holds_up_no_other_domain() {
    let dir = tempfile::tempdir().unwrap();
    let dump = dir.path().join("dump");
    // One message an hour, then Yahoo's words; every other domain goes to a plain sink.
    let throttled = Sink::start(SinkOptions {
        listen: "127.0.0.1:0".parse().unwrap(),
        shards: 1,
        rate_limit: Some("1/h".parse().unwrap()),
        throttle_reply:
            "421 4.7.0 [TSS04] Messages from 127.0.0.1 temporarily deferred due to unexpected volume or user complaints"
                .into(),
        ..Default::default()
    })
    .unwrap();
    let plain = Sink::start(SinkOptions {
        listen: "127.0.0.1:0".parse().unwrap(),
        shards: 1,
        dump: Some(dump.clone()),
        ..Default::default()
    })
    .unwrap();
    let msg = dir.path().join("m.eml");
    std::fs::write(&msg, "Subject: s\n\nhello\n").unwrap();
    let mut lines = String::new();
    for i in 0..30 {
        lines += &format!("{{\"from\":\"n@s.test\",\"to\":[\"u{i}@slow.test\"],\"message\":\"m.eml\"}}\n");
    }
    let mut others = Vec::new();
    for i in 0..300 {
        let r = format!("v{i}@d{}.test", i % 20);
        lines += &format!("{{\"from\":\"n@s.test\",\"to\":[\"{r}\"],\"message\":\"m.eml\"}}\n");
        others.push(r);
    }
    others.sort();
    let path = dir.path().join("mixed.jsonl");
    std::fs::write(&path, lines).unwrap();
    let shaping = dir.path().join("shaping.toml");
    std::fs::write(
        &shaping,
        "[[\"slow.test\".automation]]\nname = \"tss04\"\nregex = '\\[TSS04\\]'\naction = \"suspend\"\nduration = \"2s\"\n",
    )
    .unwrap();
    let log = dir.path().join("log.jsonl");
    let mut cfg = Config {
        shards: Some(2),
        log: Some(log.clone()),
        shaping: vec![shaping],
        ..Config::default()
    };
    cfg.add_route(&format!("slow.test={}", throttled.addr())).unwrap();
    cfg.add_route(&format!("*={}", plain.addr())).unwrap();
    cfg.retry_domain.insert(
        "slow.test".into(),
        volley::config::Retry {
            max_age: Duration::from_secs(1),
            ..Default::default()
        },
    );
    let summary = send_all(vec![path], cfg);
    throttled.stop();
    plain.stop();
    let records = read_log(&log);
    let slow: Vec<_> = records.iter().filter(|r| r["domain"] == "slow.test").collect();
    assert!(
        slow.iter()
            .any(|r| r["outcome"] == "deferred" && r["rule"] == "tss04" && r["enhanced"] == "4.7.0"),
        "the deferral that drew the suspension names its rule"
    );
    let expired: Vec<_> = slow.iter().filter(|r| r["outcome"] == "expired").collect();
    let delivered = slow.iter().filter(|r| r["outcome"] == "delivered").count();
    assert_eq!(expired.len() + delivered, 30, "every slow.test recipient ends once");
    assert!(!expired.is_empty());
    assert!(
        slow.iter().filter(|r| r["outcome"] == "deferred").count() <= 20,
        "suspended recipients wait without further attempts"
    );
    // Every other domain was done while slow.test's recipients still waited.
    let first_expiry = expired.iter().map(|r| r["ts"].as_str().unwrap()).min().unwrap();
    let last_other = records
        .iter()
        .filter(|r| r["domain"] != "slow.test")
        .map(|r| r["ts"].as_str().unwrap())
        .max()
        .unwrap();
    assert!(last_other < first_expiry, "{last_other} vs {first_expiry}");
    assert_eq!(summary.count(Outcome::Delivered) as usize, 300 + delivered);
    assert_eq!(dumped_rcpts(&dump), others);
}
