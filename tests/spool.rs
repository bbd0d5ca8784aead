//! Hostile spools: each odd input has a clear outcome, and nothing else of
//! the spool is lost because of it. (`tools/hostile-spools` runs the big
//! versions — 1,000,000 recipients on a line, a 200 MB message, 100,000
//! message files — and reports their peak memory.)

mod common;

use std::collections::HashMap;
use std::path::Path;

use common::{dumped_rcpts, final_lines, read_log};
use volley::collector::Summary;
use volley::config::Config;
use volley::outcome::Outcome;
use volley::send::{Progress, SendOptions, send};
use volley::sink::{Sink, SinkOptions};

fn dump_sink(dump: &Path) -> Sink {
    Sink::start(SinkOptions {
        listen: "127.0.0.1:0".parse().unwrap(),
        shards: 2,
        dump: Some(dump.to_path_buf()),
        ..Default::default()
    })
    .unwrap()
}

fn send_to(sink: &Sink, spool: &Path, log: &Path, tune: impl FnOnce(&mut Config)) -> Summary {
    let mut cfg = Config {
        shards: Some(2),
        log: Some(log.to_path_buf()),
        ..Config::default()
    };
    cfg.add_route(&format!("*={}", sink.addr())).unwrap();
    tune(&mut cfg);
    send(SendOptions {
        spools: vec![spool.to_path_buf()],
        config: cfg,
        progress: Progress::Off,
        stop: None,
        watch: None,
    })
    .expect("send completes")
}

fn outcomes_by_rcpt(log: &Path) -> HashMap<String, Vec<(String, String)>> {
    let mut out: HashMap<String, Vec<(String, String)>> = HashMap::new();
    for r in read_log(log) {
        out.entry(r["rcpt"].as_str().unwrap_or("").to_string())
            .or_default()
            .push((
                r["outcome"].as_str().unwrap().to_string(),
                r["reply"].as_str().unwrap_or("").to_string(),
            ));
    }
    out
}

#[test]
fn one_job_with_200000_recipients_goes_out_whole() {
    let dir = tempfile::tempdir().unwrap();
    let to: Vec<String> = (0..200_000).map(|i| format!("u{i}@d{}.test", i % 500)).collect();
    let spool = dir.path().join("wide.jsonl");
    let job = serde_json::json!({"from": "news@s.test", "to": to, "data": "Subject: wide\r\n\r\nhi\r\n"});
    std::fs::write(&spool, format!("{job}\n")).unwrap();
    let sink = Sink::start(SinkOptions {
        listen: "127.0.0.1:0".parse().unwrap(),
        shards: 2,
        ..Default::default()
    })
    .unwrap();
    let log = dir.path().join("log.jsonl");
    let summary = send_to(&sink, &spool, &log, |_| {});
    let counts = sink.stop();
    assert_eq!(summary.count(Outcome::Delivered), 200_000);
    assert_eq!(counts.recipients, 200_000);
    // 400 recipients per domain in transactions of at most 100.
    assert_eq!(counts.messages, 2_000);
    assert_eq!(final_lines(&read_log(&log)).len(), 200_000);
}

#[test]
fn a_message_over_max_message_bytes_rejects_its_jobs_only() {
    let dir = tempfile::tempdir().unwrap();
    let mut big = b"Subject: big\n\n".to_vec();
    big.resize(3 << 20, b'x');
    big.iter_mut().skip(20).step_by(70).for_each(|b| *b = b'\n');
    std::fs::write(dir.path().join("big.eml"), &big).unwrap();
    std::fs::write(dir.path().join("small.eml"), "Subject: small\n\nhi\n").unwrap();
    let spool = dir.path().join("m.jsonl");
    std::fs::write(
        &spool,
        "{\"from\":\"s@x.test\",\"to\":[\"a@d.test\",\"b@e.test\"],\"message\":\"big.eml\"}\n\
         {\"from\":\"s@x.test\",\"to\":[\"c@d.test\"],\"message\":\"small.eml\"}\n",
    )
    .unwrap();
    let dump = dir.path().join("dump");
    let sink = dump_sink(&dump);
    let log = dir.path().join("log.jsonl");
    let summary = send_to(&sink, &spool, &log, |c| c.max_message_bytes = 1 << 20);
    sink.stop();
    assert_eq!(
        (summary.count(Outcome::Rejected), summary.count(Outcome::Delivered)),
        (2, 1)
    );
    let o = outcomes_by_rcpt(&log);
    let (outcome, reply) = &o["a@d.test"][0];
    assert_eq!(outcome, "rejected");
    assert!(
        reply.contains("m.jsonl:1: message \"big.eml\" is 3145728 bytes, more than max_message_bytes (1048576)"),
        "{reply}"
    );
    assert_eq!(o["c@d.test"][0].0, "delivered");
    assert_eq!(dumped_rcpts(&dump), ["c@d.test"]);
}

/// 3,000 jobs each naming a message file of its own, with room for only 50
/// in use at once: every message goes out with its own content, and the
/// files are let go as their transactions finish.
#[test]
fn thousands_of_message_files_go_out_within_the_budget() {
    let dir = tempfile::tempdir().unwrap();
    let mut lines = String::new();
    for i in 0..3000 {
        std::fs::write(
            dir.path().join(format!("m{i}.eml")),
            format!("Subject: m{i}\n\nbody {i}\n"),
        )
        .unwrap();
        lines += &format!(
            "{{\"from\":\"s@x.test\",\"to\":[\"r{i}@d{}.test\"],\"message\":\"m{i}.eml\"}}\n",
            i % 30
        );
    }
    let spool = dir.path().join("many.jsonl");
    std::fs::write(&spool, lines).unwrap();
    let dump = dir.path().join("dump");
    let sink = dump_sink(&dump);
    let log = dir.path().join("log.jsonl");
    // Count this process's mappings of the message files while it sends.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let stop = stop.clone();
        let prefix = format!("{}/m", dir.path().display());
        std::thread::spawn(move || {
            let mut peak = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
                peak = peak.max(
                    maps.lines()
                        .filter(|l| l.contains(&prefix) && l.ends_with(".eml"))
                        .count(),
                );
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            peak
        })
    };
    let summary = send_to(&sink, &spool, &log, |c| c.max_message_files_in_use = 50);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let peak = sampler.join().unwrap();
    sink.stop();
    assert_eq!(summary.count(Outcome::Delivered), 3000);
    // /proc/self/maps is not read atomically: a sample taken while the shards
    // unmap files and ingest maps others can count a few that are already
    // gone (seen once in a loaded run: 51). Without the budget it is thousands.
    assert!((1..=55).contains(&peak), "{peak} message files mapped at once");
    let mut seen = 0;
    for e in std::fs::read_dir(&dump).unwrap() {
        let text = std::fs::read_to_string(e.unwrap().path()).unwrap();
        let rcpt = text.lines().find_map(|l| l.strip_prefix("X-Rcpt-To: <r")).unwrap();
        let n = rcpt.split('@').next().unwrap();
        assert!(text.contains(&format!("Subject: m{n}\r\n")), "r{n} got its own message");
        seen += 1;
    }
    assert_eq!(seen, 3000);
}

#[test]
fn blank_lines_a_byte_order_mark_and_crlf_line_ends() {
    let dir = tempfile::tempdir().unwrap();
    let dump = dir.path().join("dump");
    let sink = dump_sink(&dump);
    let blank = dir.path().join("blank.jsonl");
    std::fs::write(&blank, "\n\n   \n\r\n\t\n").unwrap();
    let summary = send_to(&sink, &blank, &dir.path().join("blank.log"), |_| {});
    assert_eq!((summary.recipients, summary.bad_lines), (0, 0));

    let bom = dir.path().join("bom.jsonl");
    let mut text = b"\xef\xbb\xbf".to_vec();
    for i in 0..3 {
        text.extend_from_slice(
            format!("{{\"from\":\"s@x.test\",\"to\":[\"b{i}@d.test\"],\"data\":\"Subject: {i}\\r\\n\\r\\nx\"}}\r\n")
                .as_bytes(),
        );
    }
    std::fs::write(&bom, text).unwrap();
    let log = dir.path().join("bom.log");
    let summary = send_to(&sink, &bom, &log, |_| {});
    sink.stop();
    assert_eq!((summary.count(Outcome::Delivered), summary.bad_lines), (3, 0));
    assert_eq!(dumped_rcpts(&dump), ["b0@d.test", "b1@d.test", "b2@d.test"]);
}

#[test]
fn a_mailbox_named_twice_in_a_job_is_sent_once() {
    let dir = tempfile::tempdir().unwrap();
    let spool = dir.path().join("dup.jsonl");
    std::fs::write(
        &spool,
        "{\"from\":\"s@x.test\",\"to\":[\"a@d.test\",\"A@d.test\",\"a@D.TEST\",\"a@d.test\",\"b@e.test\"],\"data\":\"x\"}\n\
         {\"from\":\"s@x.test\",\"to\":[\"a@d.test\"],\"data\":\"another job\"}\n",
    )
    .unwrap();
    let dump = dir.path().join("dump");
    let sink = dump_sink(&dump);
    let log = dir.path().join("log.jsonl");
    let summary = send_to(&sink, &spool, &log, |_| {});
    sink.stop();
    // The local part is case-sensitive (RFC 5321 §2.4): A@d.test is another mailbox.
    assert_eq!(
        dumped_rcpts(&dump),
        ["A@d.test", "a@d.test", "a@d.test", "b@e.test"],
        "once per job"
    );
    assert_eq!(
        (summary.count(Outcome::Delivered), summary.count(Outcome::Rejected)),
        (4, 2)
    );
    let o = outcomes_by_rcpt(&log);
    let dup = &o["a@D.TEST"][0];
    assert_eq!(dup.0, "rejected");
    assert!(
        dup.1
            .ends_with("dup.jsonl:1: duplicate recipient \"a@D.TEST\": the same mailbox as to[0], which is sent once"),
        "{}",
        dup.1
    );
}

#[test]
fn ids_and_recipients_that_need_escaping_stay_valid_json_in_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let spool = dir.path().join("q.jsonl");
    // A quote and a backslash come escaped in the line: the log must escape
    // them again. The line beside it holds the same kind of text plainly.
    std::fs::write(
        &spool,
        "{\"id\":\"q\\\"b\\\\s\",\"from\":\"s@x.test\",\"to\":[\"\\\"j\\\\d\\\"@d.test\"],\"data\":\"x\"}\n\
         {\"id\":\"plain-1\",\"from\":\"s@x.test\",\"to\":[\"p@d.test\"],\"data\":\"x\"}\n",
    )
    .unwrap();
    let dump = dir.path().join("dump");
    let sink = dump_sink(&dump);
    let log = dir.path().join("log.jsonl");
    let summary = send_to(&sink, &spool, &log, |_| {});
    sink.stop();
    assert_eq!(summary.count(Outcome::Delivered), 2);
    // read_log parses every line as JSON.
    let mut got: Vec<(String, String, String)> = read_log(&log)
        .iter()
        .map(|r| {
            let s = |k: &str| r[k].as_str().unwrap().to_string();
            (s("id"), s("rcpt"), s("domain"))
        })
        .collect();
    got.sort();
    assert_eq!(
        got,
        [
            ("plain-1".into(), "p@d.test".into(), "d.test".into()),
            ("q\"b\\s".into(), "\"j\\d\"@d.test".into(), "d.test".into()),
        ]
    );
}
