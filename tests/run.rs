//! `volley run`, the spool-directory service: files renamed into incoming/
//! are taken into active/, sent beside each other, and moved to done/ with
//! their journal and a summary; an unreadable one goes to failed/ with a
//! reason; SIGTERM stops it with exit status 0.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use volley::sink::{Sink, SinkOptions};

fn drop_spool(incoming: &Path, name: &str, jobs: usize) {
    std::fs::write(incoming.join("news.eml"), "Subject: run\n\nhello\n").unwrap();
    let lines: Vec<String> = (0..jobs)
        .map(|i| {
            format!(
                "{{\"from\":\"s@x.test\",\"to\":[\"{name}{i}@d{}.test\"],\"message\":\"news.eml\"}}",
                i % 7
            )
        })
        .collect();
    let tmp = incoming.join(format!("{name}.jsonl.tmp"));
    std::fs::write(&tmp, lines.join("\n") + "\n").unwrap();
    std::fs::rename(&tmp, incoming.join(format!("{name}.jsonl"))).unwrap();
}

fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A service configuration in `dir`: spool_dir `dir/spool`, everything to `sink`, plus `extra` lines.
fn service_config(dir: &Path, sink: std::net::SocketAddr, extra: &str) -> std::path::PathBuf {
    let config = dir.join("volley.toml");
    let root = dir.join("spool").display().to_string();
    std::fs::write(
        &config,
        format!(
            "spool_dir = {root:?}\nidle_timeout = \"300ms\"\nmetrics_listen = \"127.0.0.1:0\"\n{extra}\n[routes]\n\"*\" = \"{sink}\"\n"
        ),
    )
    .unwrap();
    config
}

/// The service child; killed if a test fails before it stops it.
struct Service(std::process::Child);

impl Service {
    fn start(config: &Path, stdout: Stdio) -> Service {
        Service(
            Command::new(env!("CARGO_BIN_EXE_volley"))
                .args(["run", "--config"])
                .arg(config)
                .stdout(stdout)
                .stderr(Stdio::inherit())
                .spawn()
                .unwrap(),
        )
    }

    /// SIGTERM, and the exit status.
    fn stop(&mut self) -> std::process::ExitStatus {
        assert_eq!(unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) }, 0);
        self.0.wait().unwrap()
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

#[test]
fn the_service_takes_files_as_they_come_and_files_them_away() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("spool");
    let sink = Sink::start(SinkOptions {
        listen: "127.0.0.1:0".parse().unwrap(),
        ..Default::default()
    })
    .unwrap();
    let log = format!("log = {:?}", dir.path().join("log.jsonl").display().to_string());
    let config = service_config(dir.path(), sink.addr(), &log);
    let mut child = Service::start(&config, Stdio::piped());
    let incoming = root.join("incoming");
    wait_for("incoming/", || incoming.is_dir());
    drop_spool(&incoming, "first", 400);
    // A half-written file is never taken; a file that cannot be read goes to failed/.
    std::fs::write(incoming.join("partial.jsonl.tmp"), "{\"from\":").unwrap();
    std::fs::create_dir(incoming.join("broken.jsonl")).unwrap();
    let done = root.join("done");
    wait_for("first in done/", || done.join("first.jsonl.summary.json").exists());
    drop_spool(&incoming, "second", 300);
    wait_for("second in done/", || done.join("second.jsonl.summary.json").exists());
    assert!(done.join("first.jsonl").exists() && done.join("first.jsonl.journal").exists());
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(done.join("second.jsonl.summary.json")).unwrap()).unwrap();
    assert_eq!(
        (summary["recipients"].as_u64(), summary["delivered"].as_u64()),
        (Some(300), Some(300)),
        "{summary}"
    );
    let failed = root.join("failed");
    assert!(failed.join("broken.jsonl").exists());
    let reason = std::fs::read_to_string(failed.join("broken.jsonl.reason")).unwrap();
    assert!(reason.contains("not a regular file"), "{reason}");
    assert!(incoming.join("partial.jsonl.tmp").exists(), "a .tmp file is left alone");
    assert!(
        std::fs::read_dir(root.join("active")).unwrap().next().is_none(),
        "nothing left in active/"
    );
    let status = child.stop();
    assert!(status.success(), "{status}");
    let mut out = String::new();
    std::io::Read::read_to_string(child.0.stdout.as_mut().unwrap(), &mut out).unwrap();
    let counts = sink.stop();
    assert_eq!(counts.recipients, 700, "{out}");
    let f = common::finals(&common::read_log(&dir.path().join("log.jsonl")));
    assert_eq!(f.len(), 700);
}

/// A message file of the same name dropped again later, with other content,
/// goes out as it is now: message files are mapped per spool file, not
/// cached by name for the life of the service; finished files are unmapped.
#[test]
fn a_message_file_replaced_between_spools_goes_out_new() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("spool");
    let dump = dir.path().join("dump");
    let sink = Sink::start(SinkOptions {
        listen: "127.0.0.1:0".parse().unwrap(),
        dump: Some(dump.clone()),
        ..Default::default()
    })
    .unwrap();
    let config = service_config(dir.path(), sink.addr(), "");
    let mut child = Service::start(&config, Stdio::null());
    let incoming = root.join("incoming");
    wait_for("incoming/", || incoming.is_dir());
    let done = root.join("done");
    for (name, text) in [("first", "edition one"), ("second", "edition two")] {
        // The producer writes the message through a temporary name and renames it over the old one.
        let tmp = incoming.join("news.eml.tmp");
        std::fs::write(&tmp, format!("Subject: {text}\n\n{text}\n")).unwrap();
        std::fs::rename(&tmp, incoming.join("news.eml")).unwrap();
        let spool_tmp = incoming.join(format!("{name}.jsonl.tmp"));
        std::fs::write(
            &spool_tmp,
            format!("{{\"from\":\"s@x.test\",\"to\":[\"{name}@d.test\"],\"message\":\"news.eml\"}}\n"),
        )
        .unwrap();
        std::fs::rename(&spool_tmp, incoming.join(format!("{name}.jsonl"))).unwrap();
        wait_for(&format!("{name} done"), || {
            done.join(format!("{name}.jsonl.summary.json")).exists()
        });
    }
    // Finished spool files and their message files are unmapped: the service does not pile them up.
    let maps = format!("/proc/{}/maps", child.0.id());
    wait_for("the finished files unmapped", || {
        let m = std::fs::read_to_string(&maps).unwrap();
        !m.contains(".jsonl") && !m.contains("news.eml")
    });
    assert!(child.stop().success());
    sink.stop();
    let mut bodies: Vec<(String, String)> = std::fs::read_dir(&dump)
        .unwrap()
        .map(|e| {
            let text = std::fs::read_to_string(e.unwrap().path()).unwrap();
            let rcpt = text
                .lines()
                .find_map(|l| l.strip_prefix("X-Rcpt-To: "))
                .unwrap()
                .to_string();
            let subject = text
                .lines()
                .find_map(|l| l.strip_prefix("Subject: "))
                .unwrap()
                .to_string();
            (rcpt, subject)
        })
        .collect();
    bodies.sort();
    assert_eq!(
        bodies,
        [
            ("<first@d.test>".to_string(), "edition one".to_string()),
            ("<second@d.test>".to_string(), "edition two".to_string())
        ]
    );
}

/// One spool directory, one service: a second `volley run` on it is refused
/// with the first one's pid before it touches anything, and the lock of a
/// service killed with SIGKILL does not block the next one, which resumes
/// the file and finishes it with nothing lost.
#[test]
fn a_second_service_is_refused_and_a_killed_ones_lock_does_not_block() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("spool");
    let sink = Sink::start(SinkOptions {
        listen: "127.0.0.1:0".parse().unwrap(),
        shards: 1,
        latency: Duration::from_millis(5),
        ..Default::default()
    })
    .unwrap();
    let log = dir.path().join("log.jsonl");
    let config = service_config(
        dir.path(),
        sink.addr(),
        &format!(
            "log = {:?}\nmax_connections_per_destination = 2",
            log.display().to_string()
        ),
    );
    let mut first = Service::start(&config, Stdio::null());
    let incoming = root.join("incoming");
    wait_for("incoming/", || incoming.is_dir());
    drop_spool(&incoming, "big", 3000);
    let journal = root.join("active/big.jsonl.journal");
    wait_for("progress", || {
        std::fs::metadata(&journal).is_ok_and(|m| m.len() > 32 + 9 * 100)
    });
    let second = Command::new(env!("CARGO_BIN_EXE_volley"))
        .args(["run", "--metrics", "", "--config"])
        .arg(&config)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&second.stderr);
    assert_eq!(second.status.code(), Some(1), "{err}");
    assert!(
        err.contains(&format!(
            "spool directory {} is in use by another volley process (pid {})",
            root.display(),
            first.0.id()
        )),
        "{err}"
    );
    assert!(matches!(first.0.try_wait(), Ok(None)), "the first service goes on");
    first.0.kill().unwrap();
    first.0.wait().unwrap();
    let mut third = Service::start(&config, Stdio::null());
    let done = root.join("done");
    wait_for("big in done/", || done.join("big.jsonl.summary.json").exists());
    assert!(third.stop().success());
    let counts = sink.stop();
    let lines = common::final_lines(&common::read_log(&log));
    assert_eq!(lines.len(), 3000, "every recipient has its final line");
    // Duplicates come only from the kill (delivered, not yet journaled), never from two senders.
    assert!(counts.recipients >= 3000 && counts.recipients < 3000 + 100, "{counts}");
}

/// A big file whose recipients all go to a server that does not answer
/// yet, then a small file for other domains: the small one is read, sent
/// and filed in done/ while the big one waits (ingest reads past the full
/// shard, and files take turns); then the big one finishes too.
#[test]
fn a_small_file_dropped_after_a_big_one_is_not_buried_behind_it() {
    let dir = tempfile::tempdir().unwrap();
    let sink = Sink::start(SinkOptions {
        listen: "127.0.0.1:0".parse().unwrap(),
        ..Default::default()
    })
    .unwrap();
    let gate = common::Gate::start(sink.addr());
    let config = dir.path().join("volley.toml");
    let root = dir.path().join("spool");
    std::fs::write(
        &config,
        format!(
            "spool_dir = {:?}\nidle_timeout = \"300ms\"\nmetrics_listen = \"\"\nshards = 2\nmax_queued_recipients_per_shard = 500\n[routes]\n\"*\" = \"{}\"\n\"slow.test\" = \"{}\"\n",
            root.display().to_string(),
            sink.addr(),
            gate.addr
        ),
    )
    .unwrap();
    let mut svc = Service::start(&config, Stdio::null());
    let incoming = root.join("incoming");
    let done = root.join("done");
    wait_for("incoming/", || incoming.is_dir());
    std::fs::write(incoming.join("news.eml"), "Subject: run\n\nhello\n").unwrap();
    let write = |name: &str, rcpts: Vec<String>| {
        let lines: Vec<String> = rcpts
            .iter()
            .map(|r| format!("{{\"from\":\"s@x.test\",\"to\":[\"{r}\"],\"message\":\"news.eml\"}}"))
            .collect();
        let tmp = incoming.join(format!("{name}.jsonl.tmp"));
        std::fs::write(&tmp, lines.join("\n") + "\n").unwrap();
        std::fs::rename(&tmp, incoming.join(format!("{name}.jsonl"))).unwrap();
    };
    write("big", (0..5000).map(|i| format!("b{i}@slow.test")).collect());
    wait_for("the big file's first connection at the gate", || gate.accepted() > 0);
    write("small", (0..50).map(|i| format!("s{i}@d{}.test", i % 5)).collect());
    wait_for("the small file in done/", || {
        done.join("small.jsonl.summary.json").exists()
    });
    assert!(
        !done.join("big.jsonl.summary.json").exists(),
        "the big file is still waiting for its server"
    );
    let small: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(done.join("small.jsonl.summary.json")).unwrap()).unwrap();
    assert_eq!(small["delivered"], 50, "{small}");
    gate.open();
    wait_for("the big file in done/", || done.join("big.jsonl.summary.json").exists());
    let big: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(done.join("big.jsonl.summary.json")).unwrap()).unwrap();
    assert_eq!(big["delivered"], 5000, "{big}");
    assert!(svc.stop().success());
}

/// `volley run` says by default (no RUST_LOG) which files it takes and
/// finishes, with their counts, in plain text when stderr is not a
/// terminal (no colour codes for journald), and as JSON objects with
/// `--log-format json`.
#[test]
fn the_service_logs_files_taken_and_done_in_plain_text_or_json() {
    let sink = Sink::start(SinkOptions {
        listen: "127.0.0.1:0".parse().unwrap(),
        ..Default::default()
    })
    .unwrap();
    for json in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("spool");
        let config = service_config(dir.path(), sink.addr(), "");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_volley"));
        cmd.env_remove("RUST_LOG").args(["run", "--config"]).arg(&config);
        if json {
            cmd.args(["--log-format", "json"]);
        }
        let mut child = Service(cmd.stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap());
        let incoming = root.join("incoming");
        wait_for("incoming/", || incoming.is_dir());
        drop_spool(&incoming, "logged", 30);
        wait_for("logged in done/", || {
            root.join("done/logged.jsonl.summary.json").exists()
        });
        assert!(child.stop().success());
        let mut err = String::new();
        std::io::Read::read_to_string(child.0.stderr.as_mut().unwrap(), &mut err).unwrap();
        assert!(
            !err.contains('\x1b'),
            "colour codes in a log that is not a terminal: {err:?}"
        );
        let done = "logged.jsonl is done: 30 recipients, 30 delivered, 0 bounced, 0 expired, 0 rejected";
        if json {
            let events: Vec<serde_json::Value> = err
                .lines()
                .filter(|l| l.starts_with('{'))
                .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}")))
                .collect();
            let said = |what: &str| {
                events
                    .iter()
                    .any(|e| e["level"] == "INFO" && e["message"].as_str().is_some_and(|m| m.contains(what)))
            };
            assert!(said("taking logged.jsonl") && said(done), "{err}");
        } else {
            assert!(err.contains("INFO") && err.contains("taking logged.jsonl"), "{err}");
            assert!(err.contains(done), "{err}");
        }
    }
    sink.stop();
}

/// A file finished over two runs of the service (stopped halfway, started
/// again): its summary counts every outcome of both runs, and `/status`
/// lists it among the finished files with those counts.
#[test]
fn a_file_finished_over_a_restart_keeps_every_run_s_counts() {
    let sink = Sink::start(SinkOptions {
        listen: "127.0.0.1:0".parse().unwrap(),
        reject_rate: 0.1,
        latency: Duration::from_millis(20),
        ..Default::default()
    })
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("spool");
    let config = service_config(dir.path(), sink.addr(), "max_connections_per_destination = 2");
    let mut first = Service::start(&config, Stdio::null());
    let incoming = root.join("incoming");
    wait_for("incoming/", || incoming.is_dir());
    drop_spool(&incoming, "half", 400);
    let journal = root.join("active/half.jsonl.journal");
    wait_for("some outcomes journaled", || {
        std::fs::metadata(&journal).is_ok_and(|m| m.len() > 32 + 9 * 50)
    });
    assert!(first.stop().success());
    assert!(root.join("active/half.jsonl").exists(), "stopped before it was done");
    let mut second = Service::start(&config, Stdio::null());
    let done = root.join("done/half.jsonl.summary.json");
    wait_for("half in done/", || done.exists());
    let s: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&done).unwrap()).unwrap();
    let earlier = s["final_in_earlier_runs"].as_u64().unwrap();
    let (delivered, bounced) = (s["delivered"].as_u64().unwrap(), s["bounced"].as_u64().unwrap());
    assert!(earlier >= 50, "{s}");
    assert_eq!(s["recipients"], 400, "{s}");
    assert_eq!(delivered + bounced, 400, "both runs' outcomes: {s}");
    assert!(bounced > 0, "{s}");
    assert!(second.stop().success());
    sink.stop();
}
