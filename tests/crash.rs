//! Crash test: `volley send` of 50,000 recipients is killed with SIGKILL at
//! several points and restarted until it finishes. Every recipient must end
//! with exactly one final outcome in the journal and its final line in the
//! delivery log (a second line only if the sink really got it twice), the
//! sink must have every recipient, and the duplicates must stay within what
//! was in flight.

mod common;

use std::collections::HashMap;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use volley::journal;
use volley::sink::{Sink, SinkOptions};

const RECIPIENTS: u64 = 50_000;
const CONNECTIONS: u64 = 20;
/// Records journaled when each kill happens.
const KILL_AT: [u64; 3] = [4_000, 15_000, 30_000];

fn journal_records(path: &std::path::Path) -> u64 {
    std::fs::metadata(path).map_or(0, |m| m.len().saturating_sub(32) / journal::RECORD_BYTES as u64)
}

#[test]
fn killed_sends_resume_without_loss_and_with_few_duplicates() {
    crash_case(false, false);
}

/// The same with BDAT: up to eight transactions in flight per connection.
#[test]
fn killed_bdat_sends_resume_without_loss_and_with_few_duplicates() {
    crash_case(true, false);
}

/// The same while ingest passes lines over and reads them again: a fifth
/// of the recipients go to a slower server and their domain may hold only
/// 100 queued per shard, so the lead reads past them all the time.
#[test]
fn killed_sends_that_read_lines_again_resume_without_loss() {
    crash_case(false, true);
}

/// The spool of the skewed case: every fifth recipient to slow.test.
fn skewed_spool(path: &std::path::Path) {
    std::fs::write(
        path.with_extension("eml"),
        format!("Subject: crash\n\n{}\n", "x".repeat(560)),
    )
    .unwrap();
    let lines: Vec<String> = (0..RECIPIENTS)
        .map(|i| {
            let domain = if i % 5 == 0 {
                "slow.test".to_string()
            } else {
                format!("d{}.test", i % 100)
            };
            format!("{{\"from\":\"s@x.test\",\"to\":[\"u{i}@{domain}\"],\"message\":\"crash.eml\"}}")
        })
        .collect();
    std::fs::write(path, lines.join("\n") + "\n").unwrap();
}

fn crash_case(chunking: bool, skewed: bool) {
    let dir = tempfile::tempdir().unwrap();
    let dump = dir.path().join("dump");
    let sink = Sink::start(SinkOptions {
        listen: "127.0.0.1:0".parse().unwrap(),
        shards: 1,
        dump: Some(dump.clone()),
        chunking,
        ..Default::default()
    })
    .unwrap();
    let slow_dump = dir.path().join("slow-dump");
    let slow = Sink::start(SinkOptions {
        listen: "127.0.0.1:0".parse().unwrap(),
        shards: 1,
        dump: Some(slow_dump.clone()),
        chunking,
        latency: Duration::from_millis(5),
        ..Default::default()
    })
    .unwrap();
    let config = dir.path().join("volley.toml");
    let passed_over = dir.path().join("stderr.txt");
    std::fs::write(
        &config,
        "max_queued_recipients_per_shard = 2000\nmax_queued_recipients_per_domain = 100\n",
    )
    .unwrap();
    let spool = dir.path().join("crash.jsonl");
    if skewed {
        skewed_spool(&spool);
    } else {
        let generated = Command::new(env!("CARGO_BIN_EXE_volley"))
            .args([
                "gen",
                "--jobs",
                &RECIPIENTS.to_string(),
                "--domains",
                "100",
                "--size",
                "600",
                "--out",
            ])
            .arg(&spool)
            .status()
            .unwrap();
        assert!(generated.success());
    }
    let at_sinks = || {
        let mut all = common::dumped_rcpts(&dump);
        all.extend(common::dumped_rcpts(&slow_dump));
        all.sort();
        all
    };
    let jpath = journal::path_for(&spool);
    let log = dir.path().join("log.jsonl");
    let command = || {
        let mut c = Command::new(env!("CARGO_BIN_EXE_volley"));
        c.args([
            "send",
            "--quiet",
            "--shards",
            "2",
            "--connections",
            &CONNECTIONS.to_string(),
        ])
        .args(["--route", &format!("*={}", sink.addr())])
        .arg("--log")
        .arg(&log)
        .stderr(Stdio::inherit());
        if skewed {
            c.args(["--route", &format!("slow.test={}", slow.addr())])
                .arg("--config")
                .arg(&config);
            // Each run says when ingest passes lines over (at debug level).
            c.env("RUST_LOG", "volley=debug");
            let err = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&passed_over)
                .unwrap();
            c.stderr(err);
        }
        c.arg(&spool);
        c
    };
    let run = || command().stdout(Stdio::null()).spawn().map(common::Reaper).unwrap();
    let mut kills = Vec::new();
    'kills: for at in KILL_AT {
        let mut child = run();
        let deadline = Instant::now() + Duration::from_secs(60);
        while journal_records(&jpath) < at {
            if let Some(status) = child.0.try_wait().unwrap() {
                // Finished before this test looked again (a stalled test thread): fewer kills, same checks.
                assert!(status.success(), "volley ended ({status}) before the kill at {at}");
                eprintln!("crash: volley finished before the kill at {at}");
                break 'kills;
            }
            assert!(Instant::now() < deadline, "no progress to {at}");
            std::thread::sleep(Duration::from_millis(1));
        }
        child.0.kill().unwrap(); // SIGKILL
        child.0.wait().unwrap();
        // Delivered but not journaled: these are what the next run sends again.
        std::thread::sleep(Duration::from_millis(100));
        let mut at_sink = at_sinks();
        at_sink.dedup();
        kills.push((at_sink.len() as u64).saturating_sub(journal_records(&jpath)));
    }
    let mut finished = false;
    for _ in 0..5 {
        if command().stdout(Stdio::null()).status().unwrap().success() {
            finished = true;
            break;
        }
    }
    assert!(finished, "volley send finished after the kills");
    sink.stop();
    slow.stop();
    if skewed {
        let said = std::fs::read_to_string(&passed_over).unwrap();
        let times = said.matches("coming back for it").count();
        assert!(times > 0, "ingest passed lines over: {said}");
        eprintln!("crash (read again): ingest passed a lane over {times} times in all runs");
    }

    // Exactly one final outcome per recipient in the journal.
    let records = journal::read_records(&jpath).unwrap();
    let mut per_rcpt: HashMap<(u32, u32), usize> = HashMap::new();
    for (line, idx, outcome) in &records {
        assert_eq!(*outcome, volley::outcome::Outcome::Delivered);
        *per_rcpt.entry((*line, *idx)).or_default() += 1;
    }
    assert_eq!(per_rcpt.len() as u64, RECIPIENTS, "every recipient is journaled");
    assert!(per_rcpt.values().all(|&n| n == 1), "no recipient is journaled twice");
    // The sink has everyone at least once; duplicates come only from kills.
    let got = at_sinks();
    let mut at_sink: HashMap<&str, usize> = HashMap::new();
    for r in &got {
        *at_sink.entry(r).or_default() += 1;
    }
    assert_eq!(at_sink.len() as u64, RECIPIENTS, "the sink received every recipient");
    let duplicates = got.len() as u64 - RECIPIENTS;

    // The log (appended to by every run) has a final line for every
    // recipient, and a second one only for a recipient really delivered twice.
    let lines = common::final_lines(&common::read_log(&log));
    assert_eq!(
        lines.len() as u64,
        RECIPIENTS,
        "every recipient has its final line in the log"
    );
    let mut logged_twice = 0;
    for (rcpt, n) in &lines {
        let delivered = at_sink.get(rcpt.as_str()).copied().unwrap_or(0);
        assert!(
            *n <= delivered,
            "{rcpt} has {n} final lines in the log but was delivered {delivered} times"
        );
        logged_twice += u64::from(*n > 1);
    }
    // In flight at a kill: two transactions per connection (with BDAT the
    // window, which grows to pipeline_window_max), plus outcomes not yet
    // journaled (the shard flush and the group-commit interval, a few ms of traffic).
    let per_connection = if chunking {
        volley::config::PIPELINE_WINDOW_MAX as u64
    } else {
        2
    };
    let bound = KILL_AT.len() as u64 * (per_connection * CONNECTIONS + 500);
    eprintln!(
        "crash (bdat: {chunking}, read again: {skewed}): lost 0, duplicates {duplicates} in all (bound {bound}), {logged_twice} of them logged twice, delivered but not journaled at each kill {kills:?}"
    );
    assert!(
        duplicates <= bound,
        "{duplicates} duplicates after {} kills",
        KILL_AT.len()
    );
}
