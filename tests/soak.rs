//! Soak under faults: `volley run` for a while as spool files keep arriving,
//! against a sink that defers, rejects and drops connections, killed with
//! SIGKILL or stopped with SIGTERM at random moments and started again.
//! At the end every recipient of every file has exactly one final journal
//! record and its final line in the delivery log (a second delivered line
//! only where the sink really got it twice), every file is in `done/` with
//! its summary, and the service's memory and open files stayed bounded.
//!
//! `cargo test` runs it for 20 s; `tools/soak MINUTES` runs it longer
//! (`VOLLEY_SOAK_SECS`) and reports memory and descriptors over time.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use volley::journal;
use volley::sink::{Sink, SinkOptions};

/// One sample of the service process.
#[derive(Debug, Clone, Copy)]
struct Sample {
    at: Duration,
    rss_anon_kb: u64,
    fds: usize,
}

fn sample(pid: u32, at: Duration) -> Option<Sample> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let rss_anon_kb = status
        .lines()
        .find_map(|l| l.strip_prefix("RssAnon:"))?
        .trim()
        .trim_end_matches(" kB")
        .trim()
        .parse()
        .ok()?;
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count();
    Some(Sample { at, rss_anon_kb, fds })
}

/// Writes a message file and a spool file of `jobs` jobs into `incoming`
/// as a producer must (a temporary name, then a rename); returns the
/// number of recipients.
fn produce(incoming: &Path, seq: u32, jobs: usize, rng: &mut fastrand::Rng) -> u64 {
    let name = format!("soak-{seq:05}");
    let msg_tmp = incoming.join(format!("{name}.eml.tmp"));
    std::fs::write(
        &msg_tmp,
        format!("Subject: soak {seq}\n\n.first line with a dot\nbody\n"),
    )
    .unwrap();
    std::fs::rename(&msg_tmp, incoming.join(format!("{name}.eml"))).unwrap();
    let mut text = String::new();
    let mut rcpts = 0;
    for j in 0..jobs {
        let n = rng.usize(1..=3);
        let to: Vec<String> = (0..n)
            .map(|k| format!("f{seq}j{j}k{k}@d{}.test", rng.usize(0..40)))
            .collect();
        rcpts += n as u64;
        text +=
            &serde_json::json!({"from": "bounces@soak.test", "to": to, "message": format!("{name}.eml")}).to_string();
        text.push('\n');
    }
    let tmp = incoming.join(format!("{name}.jsonl.tmp"));
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, incoming.join(format!("{name}.jsonl"))).unwrap();
    rcpts
}

struct Service {
    child: Child,
    config: PathBuf,
}

impl Service {
    fn start(config: &Path) -> Service {
        let child = Command::new(env!("CARGO_BIN_EXE_volley"))
            .args(["run", "--config"])
            .arg(config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        Service {
            child,
            config: config.to_path_buf(),
        }
    }

    fn sigterm(&mut self) -> std::process::ExitStatus {
        assert_eq!(unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) }, 0);
        self.child.wait().unwrap()
    }

    fn sigkill(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    fn restart(&mut self) {
        *self = Service::start(&self.config);
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn soak_under_faults_with_kills_and_restarts_loses_nothing() {
    let secs: u64 = std::env::var("VOLLEY_SOAK_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20);
    let long = secs > 60;
    let run_for = Duration::from_secs(secs);
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("spool");
    let incoming = root.join("incoming");
    std::fs::create_dir_all(&incoming).unwrap();
    let dump = dir.path().join("dump");
    let sink = Sink::start(SinkOptions {
        listen: "127.0.0.1:0".parse().unwrap(),
        shards: 1,
        defer_rate: 0.05,
        reject_rate: 0.02,
        disconnect_rate: 0.01,
        dump: Some(dump.clone()),
        seed: 7,
        ..Default::default()
    })
    .unwrap();
    let log = dir.path().join("deliveries.jsonl");
    let config = dir.path().join("volley.toml");
    std::fs::write(
        &config,
        format!(
            "spool_dir = {:?}\nlog = {:?}\nmetrics_listen = \"\"\nidle_timeout = \"2s\"\nshutdown_timeout = \"5s\"\n\
             max_connections_per_destination = 8\n\
             [retry]\ninitial = \"100ms\"\nmax_delay = \"1s\"\nmax_age = \"1h\"\n[routes]\n\"*\" = \"{}\"\n",
            root.display().to_string(),
            log.display().to_string(),
            sink.addr()
        ),
    )
    .unwrap();
    let mut rng = fastrand::Rng::with_seed(secs);
    let mut service = Service::start(&config);
    let started = Instant::now();
    let mut files: Vec<(String, u64)> = Vec::new();
    let mut samples: Vec<Sample> = Vec::new();
    let (mut kills, mut terms) = (0, 0);
    // Restarts come every few seconds in a short run, every half minute or so in a long one.
    let gap = |rng: &mut fastrand::Rng| {
        if long {
            Duration::from_millis(rng.u64(10_000..50_000))
        } else {
            Duration::from_millis(rng.u64(2_000..5_000))
        }
    };
    let mut next_fault = started + gap(&mut rng);
    let mut next_file = started;
    let mut next_sample = started;
    while started.elapsed() < run_for {
        let now = Instant::now();
        if now >= next_file {
            let seq = files.len() as u32;
            let jobs = rng.usize(50..600);
            files.push((format!("soak-{seq:05}.jsonl"), produce(&incoming, seq, jobs, &mut rng)));
            next_file = now + Duration::from_millis(rng.u64(300..1500));
        }
        if now >= next_sample {
            if let Some(s) = sample(service.child.id(), started.elapsed()) {
                samples.push(s);
            }
            next_sample = now + Duration::from_millis(500);
        }
        if now >= next_fault {
            if rng.bool() {
                service.sigkill();
                kills += 1;
            } else {
                let status = service.sigterm();
                assert!(status.success(), "volley run stopped by SIGTERM: {status}");
                terms += 1;
            }
            service.restart();
            next_fault = Instant::now() + gap(&mut rng);
        }
        if let Some(status) = service.child.try_wait().unwrap() {
            panic!("volley run ended by itself: {status}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    // No more faults: every file must reach done/.
    let done = root.join("done");
    let deadline = Instant::now() + Duration::from_secs(120);
    while !files
        .iter()
        .all(|(name, _)| done.join(format!("{name}.summary.json")).exists())
    {
        assert!(Instant::now() < deadline, "not every file reached done/");
        if let Some(s) = sample(service.child.id(), started.elapsed()) {
            samples.push(s);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(service.sigterm().success());
    let sink_counts = sink.stop();

    // Exactly one final journal record per recipient, and the summary agrees.
    let mut expected = 0;
    for (name, rcpts) in &files {
        let records = journal::read_records(&journal::path_for(&done.join(name))).unwrap();
        let mut keys: Vec<(u32, u32)> = records.iter().map(|r| (r.0, r.1)).collect();
        keys.sort_unstable();
        keys.dedup();
        assert_eq!(keys.len(), records.len(), "{name}: a recipient journaled twice");
        assert_eq!(keys.len() as u64, *rcpts, "{name}: every recipient journaled");
        let summary: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(done.join(format!("{name}.summary.json"))).unwrap()).unwrap();
        assert_eq!(summary["recipients"].as_u64(), Some(*rcpts), "{name}: {summary}");
        expected += rcpts;
    }
    let left: Vec<_> = ["incoming", "active"]
        .iter()
        .flat_map(|d| std::fs::read_dir(root.join(d)).unwrap())
        .map(|e| e.unwrap().file_name())
        .filter(|n| n.to_string_lossy().ends_with(".jsonl"))
        .collect();
    assert!(left.is_empty(), "spool files left behind: {left:?}");

    // Every recipient has its final line; a second delivered line only where the sink got it twice.
    let records = common::read_log(&log);
    let mut finals: HashMap<&str, (u32, u32)> = HashMap::new();
    for r in records.iter().filter(|r| r["outcome"] != "deferred") {
        let e = finals.entry(r["rcpt"].as_str().unwrap()).or_default();
        if r["outcome"] == "delivered" {
            e.0 += 1;
        } else {
            e.1 += 1;
        }
    }
    assert_eq!(
        finals.len() as u64,
        expected,
        "every recipient has its final line in the log"
    );
    let mut at_sink: HashMap<String, u32> = HashMap::new();
    for r in common::dumped_rcpts(&dump) {
        *at_sink.entry(r).or_default() += 1;
    }
    let mut logged_twice = 0;
    for (rcpt, (delivered, other)) in &finals {
        let got = at_sink.get(*rcpt).copied().unwrap_or(0);
        assert!(
            *delivered <= got,
            "{rcpt}: {delivered} delivered lines, at the sink {got} times"
        );
        logged_twice += u32::from(delivered + other > 1);
    }
    let duplicates = at_sink.values().map(|n| n - 1).sum::<u32>();

    // Memory and descriptors stay bounded, and do not climb over the run.
    let peak = |s: &[Sample]| {
        (
            s.iter().map(|s| s.rss_anon_kb).max().unwrap_or(0),
            s.iter().map(|s| s.fds).max().unwrap_or(0),
        )
    };
    let half = samples.len() / 2;
    let (first, second) = (peak(&samples[..half]), peak(&samples[half..]));
    eprintln!(
        "soak {secs}s: {} files, {expected} recipients, {kills} SIGKILL + {terms} SIGTERM restarts; lost 0; \
         {duplicates} delivered twice (after kills), {logged_twice} with two final lines; sink: {sink_counts}; \
         peak RssAnon first half {} MiB, second half {} MiB; peak fds {} then {}; {} samples",
        files.len(),
        first.0 / 1024,
        second.0 / 1024,
        first.1,
        second.1,
        samples.len()
    );
    if long {
        for s in samples.iter().step_by((samples.len() / 40).max(1)) {
            eprintln!(
                "  t={:>6.0}s RssAnon {:>4} MiB fds {}",
                s.at.as_secs_f64(),
                s.rss_anon_kb / 1024,
                s.fds
            );
        }
    }
    assert!(kills + terms > 0, "the run had faults");
    let (rss, fds) = peak(&samples);
    assert!(rss < 256 * 1024, "RssAnon peaked at {} MiB", rss / 1024);
    assert!(fds < 256, "{fds} open descriptors");
    assert!(
        second.0 <= first.0 + first.0 / 2 + 16 * 1024 && second.1 <= first.1 + 16,
        "memory or descriptors climbed: {first:?} then {second:?} (RssAnon kB, fds)"
    );
}
