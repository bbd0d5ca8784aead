//! Traffic shaping against `volley sink` throttling like a provider: a
//! configured rate under the receiver's keeps every reply clean; without
//! one the receiver throttles until a rule slows the destination, and every
//! recipient still ends final once.

mod common;

use std::time::Duration;

use common::{dumped_rcpts, finals, read_log, spool};
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

fn run(cfg: Config, spool: std::path::PathBuf) -> volley::collector::Summary {
    send(SendOptions {
        spools: vec![spool],
        config: cfg,
        progress: Progress::Off,
        stop: None,
        watch: None,
    })
    .expect("send completes")
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
    let summary = run(config(&sink, &log, Some(&shaping)), path);
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
    let summary = run(config(&sink, &log, None), path);
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
    let summary = run(cfg, path);
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
