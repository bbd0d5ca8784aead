//! volley ↔ volley sink on loopback: every recipient ends with exactly one
//! final outcome that matches what the sink saw, with and without faults.

mod common;

use std::time::Duration;

use common::{dumped_rcpts, finals, read_log, send_all, spool};
use volley::config::Config;
use volley::outcome::Outcome;
use volley::sink::{Sink, SinkOptions};

fn config(route: &str, log: &std::path::Path) -> Config {
    let mut c = Config {
        shards: Some(2),
        log: Some(log.to_path_buf()),
        ..Config::default()
    };
    c.add_route(route).unwrap();
    c.retry.initial = Duration::from_millis(20);
    c.retry.max_delay = Duration::from_millis(200);
    c.idle_timeout = Duration::from_millis(500);
    c
}

#[test]
fn clean_run_delivers_each_recipient_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    let dump = dir.path().join("dump");
    let sink = Sink::start(SinkOptions {
        listen: "127.0.0.1:0".parse().unwrap(),
        shards: 2,
        dump: Some(dump.clone()),
        ..Default::default()
    })
    .unwrap();
    let (path, all) = spool(dir.path(), "clean", 700, 3, 40);
    let log = dir.path().join("log.jsonl");
    let mut cfg = config(&format!("*={}", sink.addr()), &log);
    cfg.max_connections_per_destination = 4;
    cfg.max_messages_per_connection = 50;
    let summary = send_all(vec![path], cfg);
    let counts = sink.stop();
    assert_eq!(summary.count(Outcome::Delivered), 2100);
    assert_eq!(summary.recipients, 2100);
    let f = finals(&read_log(&log));
    assert_eq!(f.len(), 2100);
    assert!(f.values().all(|r| r["outcome"] == "delivered" && r["code"] == 250));
    assert_eq!(dumped_rcpts(&dump), all, "the sink got every recipient exactly once");
    assert_eq!(counts.recipients, 2100);
    // Recipients of one job and one domain share a transaction.
    assert!(counts.messages < 2100, "{counts}");
    let body = std::fs::read_dir(&dump).unwrap().next().unwrap().unwrap().path();
    let text = std::fs::read_to_string(body).unwrap();
    assert!(
        text.ends_with("Subject: test\r\n\r\n.leading dot\r\nbody\r\n"),
        "{text:?}"
    );
}

#[test]
fn faults_end_in_the_right_outcomes_with_nothing_lost_or_duplicated() {
    let counts = faults_case(false);
    assert_eq!(counts.chunked, 0);
}

/// The same faults with BDAT: eight transactions in flight per connection,
/// refusals and dropped connections in the middle of a window.
#[test]
fn faults_with_bdat_windows_end_the_same_way() {
    let counts = faults_case(true);
    assert!(counts.messages > 0);
    assert_eq!(counts.chunked, counts.messages, "every message came with BDAT");
}

fn faults_case(chunking: bool) -> volley::sink::SinkCounts {
    let dir = tempfile::tempdir().unwrap();
    let dump = dir.path().join("dump");
    let sink = Sink::start(SinkOptions {
        listen: "127.0.0.1:0".parse().unwrap(),
        shards: 2,
        dump: Some(dump.clone()),
        defer_rate: 0.2,
        reject_rate: 0.1,
        disconnect_rate: 0.05,
        seed: 7,
        chunking,
        ..Default::default()
    })
    .unwrap();
    let (path, all) = spool(dir.path(), "faults", 1500, 2, 30);
    let log = dir.path().join("log.jsonl");
    let summary = send_all(vec![path], config(&format!("*={}", sink.addr()), &log));
    let counts = sink.stop();
    let records = read_log(&log);
    let f = finals(&records);
    assert_eq!(f.len(), all.len(), "every recipient has a final outcome");
    let mut delivered: Vec<String> = f
        .values()
        .filter(|r| r["outcome"] == "delivered")
        .map(|r| r["rcpt"].as_str().unwrap().to_string())
        .collect();
    delivered.sort();
    assert_eq!(
        dumped_rcpts(&dump),
        delivered,
        "the sink holds exactly the delivered recipients, once each"
    );
    let bounced: Vec<_> = f.values().filter(|r| r["outcome"] == "bounced").collect();
    assert!(!bounced.is_empty());
    assert!(bounced.iter().all(|r| r["code"] == 550 && r["enhanced"] == "5.1.1"));
    assert!(
        bounced.iter().all(|r| r["category"] == "invalid-recipient"),
        "{bounced:?}"
    );
    assert_eq!(summary.count(Outcome::Bounced) as usize, bounced.len());
    assert_eq!(
        summary.count(Outcome::Delivered) + summary.count(Outcome::Bounced),
        all.len() as u64
    );
    let deferrals: Vec<_> = records.iter().filter(|r| r["outcome"] == "deferred").collect();
    assert!(deferrals.iter().any(|r| r["code"] == 450), "RCPT deferrals are logged");
    assert!(
        deferrals
            .iter()
            .any(|r| r["code"].is_null() && r["reply"].as_str().unwrap().contains("closed the connection")),
        "dropped connections defer what was in flight"
    );
    let odd: Vec<_> = deferrals
        .iter()
        .filter(|r| r["code"].is_null() && r["category"] != "connection-failure")
        .collect();
    assert!(odd.is_empty(), "local deferrals are connection failures: {odd:?}");
    // A deferred recipient is retried with a higher attempt number.
    assert!(f.values().any(|r| r["attempt"].as_u64().unwrap() > 1));
    // The message arrived as it was written, leading dot and all.
    let body = std::fs::read_dir(&dump).unwrap().next().unwrap().unwrap().path();
    let text = std::fs::read_to_string(body).unwrap();
    assert!(
        text.ends_with("Subject: test\r\n\r\n.leading dot\r\nbody\r\n"),
        "{text:?}"
    );
    counts
}

#[test]
fn an_unreachable_destination_is_retried_then_expires_at_max_age() {
    let dir = tempfile::tempdir().unwrap();
    let msg = dir.path().join("m.eml");
    std::fs::write(&msg, "x\n").unwrap();
    let path = dir.path().join("s.jsonl");
    std::fs::write(
        &path,
        r#"{"id":"b","from":"s@x.test","to":["r@down.test"],"message":"m.eml"}"#,
    )
    .unwrap();
    // A port nobody listens on: bind, learn the port, close.
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let log = dir.path().join("log.jsonl");
    let mut cfg = config(&format!("*={dead}"), &log);
    cfg.retry.max_age = Duration::from_millis(400);
    let summary = send_all(vec![path], cfg);
    assert_eq!(summary.count(Outcome::Expired), 1);
    let records = read_log(&log);
    let f = finals(&records);
    let b = &f[&("b".to_string(), "r@down.test".to_string())];
    assert_eq!(b["outcome"], "expired");
    assert!(b["reply"].as_str().unwrap().contains(&dead.to_string()), "{b}");
    assert!(
        records
            .iter()
            .filter(|r| r["id"] == "b" && r["outcome"] == "deferred")
            .count()
            >= 2,
        "retried before expiring"
    );
}

#[test]
fn bad_lines_are_rejected_with_file_and_line_and_the_rest_goes_out() {
    let dir = tempfile::tempdir().unwrap();
    let sink = Sink::start(SinkOptions {
        listen: "127.0.0.1:0".parse().unwrap(),
        ..Default::default()
    })
    .unwrap();
    std::fs::write(dir.path().join("m.eml"), "x\n").unwrap();
    let lines = [
        r#"{"id":"ok1","from":"s@x.test","to":["a@d.test"],"message":"m.eml"}"#,
        r#"this is not json"#,
        r#"{"id":"inj","from":"s@x.test","to":["a@d.test>\r\nRCPT TO:<evil@d.test","b@d.test"],"message":"m.eml"}"#,
        r#"{"id":"nomsg","from":"s@x.test","to":["c@d.test"],"message":"missing.eml"}"#,
        r#"{"id":"escape","from":"s@x.test","to":["c@d.test"],"message":"../m.eml"}"#,
        r#"{"id":"ok2","from":"","to":["d@d.test"],"data":"Subject: inline\r\n\r\nhi\r\n"}"#,
    ];
    let path = dir.path().join("bad.jsonl");
    std::fs::write(&path, lines.join("\n") + "\n").unwrap();
    let log = dir.path().join("log.jsonl");
    let summary = send_all(vec![path], config(&format!("*={}", sink.addr()), &log));
    let counts = sink.stop();
    let f = finals(&read_log(&log));
    let get = |id: &str, rcpt: &str| f[&(id.to_string(), rcpt.to_string())].clone();
    assert_eq!(get("ok1", "a@d.test")["outcome"], "delivered");
    assert_eq!(get("ok2", "d@d.test")["outcome"], "delivered");
    assert_eq!(get("inj", "b@d.test")["outcome"], "delivered");
    let inj = get("inj", "a@d.test>\r\nRCPT TO:<evil@d.test");
    assert_eq!(inj["outcome"], "rejected");
    assert!(
        inj["reply"].as_str().unwrap().contains("bad.jsonl:3: bad recipient"),
        "{inj}"
    );
    let notjson = get("bad.jsonl:2", "");
    assert!(
        notjson["reply"]
            .as_str()
            .unwrap()
            .contains("bad.jsonl:2: not a valid job"),
        "{notjson}"
    );
    assert!(
        get("nomsg", "c@d.test")["reply"]
            .as_str()
            .unwrap()
            .contains("bad.jsonl:4: message \"missing.eml\" cannot be read")
    );
    assert!(
        get("escape", "c@d.test")["reply"]
            .as_str()
            .unwrap()
            .contains("must stay inside the spool folder")
    );
    assert_eq!(summary.count(Outcome::Rejected), 4);
    assert_eq!(summary.bad_lines, 3);
    assert_eq!(summary.count(Outcome::Delivered), 3);
    assert_eq!(counts.recipients, 3, "the injected address never reached the wire");
}

#[test]
fn connections_rotate_over_source_addresses_with_their_ehlo_names() {
    let dir = tempfile::tempdir().unwrap();
    let dump = dir.path().join("dump");
    let sink = Sink::start(SinkOptions {
        listen: "127.0.0.1:0".parse().unwrap(),
        dump: Some(dump.clone()),
        ..Default::default()
    })
    .unwrap();
    let (path, all) = spool(dir.path(), "src", 60, 1, 3);
    let log = dir.path().join("log.jsonl");
    let mut cfg = config(&format!("*={}", sink.addr()), &log);
    cfg.max_messages_per_connection = 5;
    cfg.max_connections_per_destination = 2;
    cfg.source_addresses = toml::from_str::<Config>(
        r#"source_addresses = [{ address = "127.0.0.2", ehlo_name = "mta2.sender.test" }, "127.0.0.3"]"#,
    )
    .unwrap()
    .source_addresses;
    cfg.ehlo_name = Some("default.sender.test".into());
    let summary = send_all(vec![path], cfg);
    sink.stop();
    assert_eq!(summary.count(Outcome::Delivered), all.len() as u64);
    let peers = common::dumped_peers(&dump);
    assert_eq!(peers.len(), all.len());
    let from2 = peers.iter().filter(|(ip, _)| ip == "127.0.0.2").count();
    let from3 = peers.iter().filter(|(ip, _)| ip == "127.0.0.3").count();
    assert_eq!(
        from2 + from3,
        all.len(),
        "every connection came from a source address: {peers:?}"
    );
    assert!(from2 > 0 && from3 > 0, "both addresses were used: {from2} and {from3}");
    for (ip, helo) in &peers {
        let want = if ip == "127.0.0.2" {
            "mta2.sender.test"
        } else {
            "default.sender.test"
        };
        assert_eq!(helo, want, "EHLO name of a connection from {ip}");
    }
}

#[test]
fn a_destination_that_keeps_deferring_is_suspended_by_the_streak_rule() {
    let dir = tempfile::tempdir().unwrap();
    let sink = Sink::start(SinkOptions {
        listen: "127.0.0.1:0".parse().unwrap(),
        defer_rate: 1.0,
        ..Default::default()
    })
    .unwrap();
    let (path, all) = spool(dir.path(), "busy", 30, 1, 1);
    let log = dir.path().join("log.jsonl");
    let mut cfg = config(&format!("*={}", sink.addr()), &log);
    // The built-in rule, after 3 in a row and for 300 ms.
    let shaping = dir.path().join("shaping.toml");
    std::fs::write(
        &shaping,
        "[[default.automation]]\nname = \"deferred-in-a-row\"\nregex = '^4'\ntrigger = { in_a_row = 3 }\naction = \"suspend\"\nduration = \"300ms\"\n",
    )
    .unwrap();
    cfg.shaping = vec![shaping];
    cfg.shards = Some(1);
    cfg.retry.initial = Duration::from_millis(50);
    cfg.retry.max_delay = Duration::from_millis(50);
    cfg.retry.max_age = Duration::from_millis(1500);
    let summary = send_all(vec![path], cfg);
    let counts = sink.stop();
    assert_eq!(summary.count(Outcome::Expired), all.len() as u64);
    let records = read_log(&log);
    let by_rule: Vec<_> = records.iter().filter(|r| r["rule"] == "deferred-in-a-row").collect();
    assert!(
        !by_rule.is_empty(),
        "deferrals that wait for the suspension name its rule"
    );
    assert!(
        by_rule.iter().all(|r| r["code"] == 450 && r["outcome"] == "deferred"),
        "they carry the reply that drew them: {:?}",
        by_rule[0]
    );
    // Expired at the end, each with the reply it last had.
    let last: std::collections::HashMap<_, _> = records.iter().map(|r| (r["rcpt"].as_str().unwrap(), r)).collect();
    assert_eq!(last.len(), all.len());
    assert!(last.values().all(|r| r["outcome"] == "expired"));
    assert_eq!(counts.messages, 0);
}

/// One shard, 600 recipients of a domain whose server defers everything
/// first in the spool, then 1,000 over other domains; the shard holds at most
/// 200 queued or in flight. Returns (delivered, expired) and whether every
/// delivery was logged before the first expiry.
fn throttled_domain_case(max_deferred: usize) -> (u64, u64, bool) {
    let dir = tempfile::tempdir().unwrap();
    let throttling = Sink::start(SinkOptions {
        listen: "127.0.0.1:0".parse().unwrap(),
        defer_rate: 1.0,
        ..Default::default()
    })
    .unwrap();
    let open = Sink::start(SinkOptions {
        listen: "127.0.0.1:0".parse().unwrap(),
        ..Default::default()
    })
    .unwrap();
    std::fs::write(dir.path().join("m.eml"), "Subject: t\n\nbody\n").unwrap();
    let line = |to: String| format!("{{\"from\":\"s@x.test\",\"to\":[\"{to}\"],\"message\":\"m.eml\"}}");
    let mut lines: Vec<String> = (0..600).map(|i| line(format!("u{i}@throttled.test"))).collect();
    lines.extend((0..1000).map(|i| line(format!("u{i}@d{}.test", i % 10))));
    let path = dir.path().join("s.jsonl");
    std::fs::write(&path, lines.join("\n")).unwrap();
    let log = dir.path().join("log.jsonl");
    let mut cfg = config(&format!("*={}", open.addr()), &log);
    cfg.add_route(&format!("throttled.test={}", throttling.addr())).unwrap();
    cfg.shards = Some(1);
    cfg.max_queued_recipients_per_shard = 200;
    cfg.max_deferred_recipients_per_shard = max_deferred;
    cfg.retry.initial = Duration::from_secs(60);
    cfg.retry.max_delay = Duration::from_secs(60);
    cfg.retry.max_age = Duration::from_secs(3);
    let summary = send_all(vec![path], cfg);
    throttling.stop();
    open.stop();
    let outcomes: Vec<String> = read_log(&log)
        .iter()
        .map(|r| r["outcome"].as_str().unwrap().to_string())
        .collect();
    let first_expired = outcomes.iter().position(|o| o == "expired").expect("some expired");
    let last_delivered = outcomes.iter().rposition(|o| o == "delivered").expect("some delivered");
    (
        summary.count(Outcome::Delivered),
        summary.count(Outcome::Expired),
        last_delivered < first_expired,
    )
}

#[test]
fn a_domain_that_defers_everything_does_not_hold_up_the_others() {
    let (delivered, expired, others_first) = throttled_domain_case(1_000_000);
    assert_eq!((delivered, expired), (1000, 600));
    assert!(
        others_first,
        "the other domains are all delivered while the throttled one waits for its retries"
    );
}

#[test]
fn recipients_waiting_for_retries_are_bounded_and_nothing_is_lost_at_the_bound() {
    // At most 100 may wait: at the bound the shard takes no work until the
    // throttled domain's recipients expire, then takes the rest; every
    // recipient still ends with its one outcome.
    let (delivered, expired, _) = throttled_domain_case(100);
    assert_eq!((delivered, expired), (1000, 600));
}

#[test]
fn hostile_input_is_rejected_or_bounced_with_a_reason_and_the_rest_goes_out() {
    let dir = tempfile::tempdir().unwrap();
    let sink = Sink::start(SinkOptions {
        listen: "127.0.0.1:0".parse().unwrap(),
        ..Default::default()
    })
    .unwrap();
    let long_rcpt = format!("{}@d.test", "l".repeat(250));
    let jobs = [
        serde_json::json!({"id": "ok", "from": "s@x.test", "to": ["ok@d.test"], "data": "x\n"}),
        serde_json::json!({"id": "nul", "from": "s@x.test", "to": ["a\u{0}b@d.test"], "data": "x\n"}),
        serde_json::json!({"id": "8bit", "from": "s@x.test", "to": ["caf\u{e9}@d.test"], "data": "x\n"}),
        serde_json::json!({"id": "long", "from": "s@x.test", "to": [long_rcpt], "data": "x\n"}),
        serde_json::json!({"id": "nolocal", "from": "s@x.test", "to": ["@d.test"], "data": "x\n"}),
        serde_json::json!({"id": "space", "from": "s@x.test", "to": ["a b@d.test"], "data": "x\n"}),
        serde_json::json!({"id": "wide", "from": "s@x.test", "to": ["w@d.test"], "data": format!("{}\n", "w".repeat(999))}),
        serde_json::json!({"id": "huge", "from": "s@x.test", "to": ["h@d.test"], "data": "h".repeat(10_000)}),
    ];
    let text: Vec<String> = jobs.iter().map(|j| j.to_string()).collect();
    // No final newline on the last line.
    let path = dir.path().join("hostile.jsonl");
    std::fs::write(&path, text.join("\n")).unwrap();
    let empty = dir.path().join("empty.jsonl");
    std::fs::write(&empty, "").unwrap();
    let log = dir.path().join("log.jsonl");
    let mut cfg = config(&format!("*={}", sink.addr()), &log);
    cfg.max_job_line_bytes = 4096;
    let summary = send_all(vec![path, empty], cfg);
    let counts = sink.stop();
    let f = finals(&read_log(&log));
    let by_id = |id: &str| f.iter().find(|((i, _), _)| i == id).map(|(_, r)| r.clone()).unwrap();
    assert_eq!(by_id("ok")["outcome"], "delivered");
    for (id, why) in [
        ("nul", "control character"),
        ("long", "254"),
        ("nolocal", "empty local part"),
        ("space", "space"),
    ] {
        let r = by_id(id);
        assert_eq!(r["outcome"], "rejected", "{id}: {r}");
        assert!(r["reply"].as_str().unwrap().contains(why), "{id}: {r}");
    }
    let wide = by_id("wide");
    assert_eq!(
        (wide["outcome"].as_str(), wide["enhanced"].as_str()),
        (Some("bounced"), Some("5.6.0")),
        "{wide}"
    );
    assert!(wide["reply"].as_str().unwrap().contains("line of 999 octets"), "{wide}");
    // A UTF-8 address is valid (RFC 6531); this sink does not offer SMTPUTF8.
    let utf8 = by_id("8bit");
    assert_eq!(
        (
            utf8["outcome"].as_str(),
            utf8["enhanced"].as_str(),
            utf8["local"].as_str()
        ),
        (Some("bounced"), Some("5.6.7"), Some("smtputf8")),
        "{utf8}"
    );
    let huge = f
        .get(&("hostile.jsonl:8".to_string(), String::new()))
        .expect("the oversized line is rejected whole");
    assert!(
        huge["reply"]
            .as_str()
            .unwrap()
            .contains("longer than max_job_line_bytes"),
        "{huge}"
    );
    assert_eq!(summary.count(Outcome::Delivered), 1);
    assert_eq!(counts.recipients, 1);
}

#[test]
fn several_files_go_out_side_by_side() {
    let dir = tempfile::tempdir().unwrap();
    let sink = Sink::start(SinkOptions {
        listen: "127.0.0.1:0".parse().unwrap(),
        ..Default::default()
    })
    .unwrap();
    std::fs::write(dir.path().join("m.eml"), "x\n").unwrap();
    let mut spools = Vec::new();
    for name in ["first", "second"] {
        let lines: Vec<String> = (0..3000)
            .map(|i| format!("{{\"from\":\"s@x.test\",\"to\":[\"u{i}@{name}.test\"],\"message\":\"m.eml\"}}"))
            .collect();
        let path = dir.path().join(format!("{name}.jsonl"));
        std::fs::write(&path, lines.join("\n")).unwrap();
        spools.push(path);
    }
    let log = dir.path().join("log.jsonl");
    let mut cfg = config(&format!("*={}", sink.addr()), &log);
    cfg.shards = Some(1);
    cfg.max_queued_recipients_per_shard = 300;
    let summary = send_all(spools, cfg);
    sink.stop();
    assert_eq!(summary.count(Outcome::Delivered), 6000);
    let records = read_log(&log);
    let early: Vec<&str> = records[..1500].iter().map(|r| r["domain"].as_str().unwrap()).collect();
    let second = early.iter().filter(|d| **d == "second.test").count();
    assert!(
        second > 300,
        "the second file does not wait for the first: {second} of the first 1500"
    );
}

/// 10,000 recipients, 40% of them to a domain whose server says nothing
/// until the test opens it; the rest over 100 domains into a sink. Every
/// other recipient must be final while the slow domain has had none (the
/// shards' and the domain's queue bounds are far below the slow domain's
/// share, so ingest must read past it and come back); then the slow domain
/// goes out too, each recipient once.
#[test]
fn a_domain_that_does_not_answer_holds_up_nothing_else() {
    use common::Gate;
    let dir = tempfile::tempdir().unwrap();
    let dump = dir.path().join("dump");
    let sink = Sink::start(SinkOptions {
        listen: "127.0.0.1:0".parse().unwrap(),
        shards: 2,
        dump: Some(dump.clone()),
        ..Default::default()
    })
    .unwrap();
    let gate = Gate::start(sink.addr());
    std::fs::write(dir.path().join("m.eml"), "Subject: t\n\nbody\n").unwrap();
    let rcpts: Vec<String> = (0..10_000)
        .map(|i| {
            if i % 5 < 2 {
                format!("u{i}@slow.test")
            } else {
                format!("u{i}@d{}.test", i % 100)
            }
        })
        .collect();
    let lines: Vec<String> = rcpts
        .iter()
        .map(|rcpt| format!("{{\"from\":\"s@x.test\",\"to\":[\"{rcpt}\"],\"message\":\"m.eml\"}}"))
        .collect();
    let path = dir.path().join("mixed.jsonl");
    std::fs::write(&path, lines.join("\n")).unwrap();
    let log = dir.path().join("log.jsonl");
    let mut cfg = config(&format!("*={}", sink.addr()), &log);
    cfg.add_route(&format!("slow.test={}", gate.addr)).unwrap();
    cfg.max_queued_recipients_per_shard = 1000;
    cfg.max_queued_recipients_per_domain = 300;
    let send = std::thread::spawn(move || send_all(vec![path], cfg));
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    let others_final = loop {
        if !log.exists() {
            std::thread::sleep(Duration::from_millis(50));
            continue;
        }
        let log = common::read_log_prefix(&log);
        let f = finals(&log);
        let slow = f.keys().filter(|(_, r)| r.ends_with("@slow.test")).count();
        assert_eq!(slow, 0, "nothing of the slow domain is final while it says nothing");
        let others = f.len();
        if others == 6000 || std::time::Instant::now() > deadline {
            break others;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(
        others_final, 6000,
        "every other recipient is final while the slow domain waits"
    );
    assert!(
        gate.accepted() >= 1,
        "the slow domain's connection is waiting at the gate"
    );
    gate.open();
    let summary = send.join().unwrap();
    sink.stop();
    assert_eq!(summary.count(Outcome::Delivered), 10_000);
    let mut expected = rcpts;
    expected.sort();
    assert_eq!(dumped_rcpts(&dump), expected, "each recipient once");
    let f = finals(&read_log(&log));
    assert_eq!(f.len(), 10_000);
}

/// UTF-8 addresses (RFC 6531): to a server that offers SMTPUTF8 they go
/// with it on MAIL; to one that does not, they bounce with 5.6.7 and the
/// ASCII recipients of the same job are delivered.
#[test]
fn utf8_addresses_go_with_smtputf8_or_bounce_alone() {
    for offered in [true, false] {
        let dir = tempfile::tempdir().unwrap();
        let dump = dir.path().join("dump");
        let sink = Sink::start(SinkOptions {
            listen: "127.0.0.1:0".parse().unwrap(),
            smtputf8: offered,
            dump: Some(dump.clone()),
            ..Default::default()
        })
        .unwrap();
        let job = serde_json::json!({
            "from": "news@x.test",
            "to": ["j\u{f6}rg@d.test", "plain@d.test", "\u{7528}\u{6237}@\u{4f8b}\u{5b50}.test"],
            "data": "Subject: hi\n\nhallo\n",
        });
        let path = dir.path().join("u.jsonl");
        std::fs::write(&path, format!("{job}\n")).unwrap();
        let log = dir.path().join("log.jsonl");
        let summary = send_all(vec![path], config(&format!("*={}", sink.addr()), &log));
        sink.stop();
        let f = finals(&read_log(&log));
        let outcome = |rcpt: &str| {
            f.iter()
                .find(|((_, r), _)| r == rcpt)
                .map(|(_, r)| {
                    (
                        r["outcome"].as_str().unwrap().to_string(),
                        r["enhanced"].as_str().map(str::to_string),
                    )
                })
                .unwrap()
        };
        assert_eq!(outcome("plain@d.test").0, "delivered", "offered: {offered}");
        for rcpt in ["j\u{f6}rg@d.test", "\u{7528}\u{6237}@\u{4f8b}\u{5b50}.test"] {
            if offered {
                assert_eq!(outcome(rcpt).0, "delivered", "{rcpt}");
            } else {
                assert_eq!(
                    outcome(rcpt),
                    ("bounced".to_string(), Some("5.6.7".to_string())),
                    "{rcpt}"
                );
            }
        }
        let mut at_sink = dumped_rcpts(&dump);
        at_sink.sort();
        let want: Vec<&str> = if offered {
            vec![
                "j\u{f6}rg@d.test",
                "plain@d.test",
                "\u{7528}\u{6237}@\u{4f8b}\u{5b50}.test",
            ]
        } else {
            vec!["plain@d.test"]
        };
        assert_eq!(at_sink, want);
        assert_eq!(summary.count(Outcome::Delivered), want.len() as u64);
    }
}
