//! The `volley` binary as a user runs it: exit codes, summaries, errors.

mod common;

use std::net::TcpListener;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

fn volley() -> Command {
    Command::new(env!("CARGO_BIN_EXE_volley"))
}

fn run(cmd: &mut Command) -> Output {
    cmd.stdin(Stdio::null()).output().expect("volley runs")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Waits (up to 10 s) until a sink listens on 127.0.0.1:`port`.
fn wait_listening(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "sink did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A `volley sink` process on a free port that waits `latency_ms` before each
/// batch of replies, killed when dropped; and its port.
struct SlowSink(std::process::Child, u16);

impl SlowSink {
    fn start(latency_ms: u32) -> SlowSink {
        let port = free_port();
        let child = volley()
            .args(["sink", "--shards", "1", "--latency-ms", &latency_ms.to_string()])
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        wait_listening(port);
        SlowSink(child, port)
    }

    fn route(&self) -> String {
        format!("*=127.0.0.1:{}", self.1)
    }
}

impl Drop for SlowSink {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `volley gen` of `jobs` jobs over 10 domains into `dir/NAME.jsonl`.
fn gen_spool(dir: &std::path::Path, name: &str, jobs: usize) -> std::path::PathBuf {
    let spool = dir.join(format!("{name}.jsonl"));
    let out = run(volley()
        .args(["gen", "--jobs", &jobs.to_string(), "--domains", "10", "--out"])
        .arg(&spool));
    assert!(out.status.success());
    spool
}

/// Waits (20 s at most) until the journal holds `n` records.
fn wait_journaled(journal: &std::path::Path, n: u64) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while journaled(journal) < n {
        assert!(Instant::now() < deadline, "no progress");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Journal records written so far.
fn journaled(journal: &std::path::Path) -> u64 {
    std::fs::metadata(journal).map_or(0, |m| m.len().saturating_sub(32) / 9)
}

#[test]
fn demo_delivers_everything_and_says_so() {
    let out = run(volley().args(["demo", "--recipients", "3000", "--domains", "50"]));
    assert!(out.status.success(), "{}{}", text(&out.stdout), text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(stdout.contains("3000 recipients in"), "{stdout}");
    assert!(stdout.contains("demo ok: all 3000 recipients delivered"), "{stdout}");
    assert!(stdout.contains("sink: sessions"), "{stdout}");
}

#[test]
fn gen_sink_send_as_separate_processes() {
    let dir = tempfile::tempdir().unwrap();
    let spool = dir.path().join("g.jsonl");
    let out = run(volley()
        .args([
            "gen",
            "--jobs",
            "400",
            "--domains",
            "20",
            "--rcpts-per-job",
            "2",
            "--out",
        ])
        .arg(&spool));
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(dir.path().join("g.eml").exists());
    assert!(!dir.path().join("g.jsonl.tmp").exists());
    let port = free_port();
    let sink = volley()
        .args([
            "sink",
            "--shards",
            "1",
            "--max-messages",
            "800",
            "--listen",
            &format!("127.0.0.1:{port}"),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_listening(port);
    let log = dir.path().join("log.jsonl");
    let out = run(volley()
        .args([
            "send",
            "--quiet",
            "--shards",
            "2",
            "--route",
            &format!("*=127.0.0.1:{port}"),
            "--log",
        ])
        .arg(&log)
        .arg(&spool));
    assert!(out.status.success(), "{}{}", text(&out.stdout), text(&out.stderr));
    let summary = text(&out.stdout);
    assert!(summary.starts_with("800 recipients in"), "{summary}");
    assert!(
        summary.contains("800 delivered, 0 bounced, 0 expired, 0 rejected"),
        "{summary}"
    );
    assert!(summary.contains("top reply codes: 250 ×800"), "{summary}");
    assert_eq!(std::fs::read_to_string(&log).unwrap().lines().count(), 800);
    // Each job's two recipients are in different domains: 800 messages, and the sink exits after them.
    let sink = sink.wait_with_output().unwrap();
    assert!(sink.status.success());
    assert!(
        text(&sink.stdout).contains("messages 800 recipients 800"),
        "{}",
        text(&sink.stdout)
    );
}

#[test]
fn expired_recipients_make_send_exit_3() {
    let dir = tempfile::tempdir().unwrap();
    let spool = dir.path().join("x.jsonl");
    std::fs::write(
        &spool,
        "{\"from\":\"a@b.test\",\"to\":[\"c@nowhere.test\"],\"data\":\"x\"}\n",
    )
    .unwrap();
    let dead = format!("nowhere.test=127.0.0.1:{}", free_port());
    let out = run(volley()
        .args([
            "send",
            "--quiet",
            "--max-age",
            "300ms",
            "--retry-initial",
            "50ms",
            "--route",
            &dead,
        ])
        .arg(&spool));
    assert_eq!(out.status.code(), Some(3), "{}{}", text(&out.stdout), text(&out.stderr));
    assert!(text(&out.stdout).contains("1 expired"));
}

#[test]
fn errors_name_what_and_where() {
    let out = run(volley().args(["send", "/nonexistent/spool.jsonl"]));
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("cannot read spool file /nonexistent/spool.jsonl"),
        "{}",
        text(&out.stderr)
    );

    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("v.toml");
    std::fs::write(&cfg, "max_conections = 3\n").unwrap();
    let spool = dir.path().join("s.jsonl");
    std::fs::write(&spool, "").unwrap();
    let out = run(volley().args(["send", "--config"]).arg(&cfg).arg(&spool));
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(err.contains("v.toml") && err.contains("max_conections"), "{err}");

    let out = run(volley().args(["send", "--quiet"]).arg(&spool).arg(&spool));
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("is given more than once"),
        "{}",
        text(&out.stderr)
    );

    let out = run(volley().args(["send", "--route", "example.com"]).arg(&spool));
    assert_eq!(out.status.code(), Some(2), "a usage error");
    assert!(
        text(&out.stderr).contains("--route needs DOMAIN=HOST:PORT"),
        "{}",
        text(&out.stderr)
    );

    let out = run(volley().args(["send", "--route", "*=127.0.0.1:0"]).arg(&spool));
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("port 0"), "{}", text(&out.stderr));

    let out = run(volley().args(["sink", "--reject-rate", "1.5"]));
    assert!(text(&out.stderr).contains("--reject-rate must be between 0 and 1"));
}

#[test]
fn bad_lines_are_reported_on_stderr_with_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let spool = dir.path().join("bad.jsonl");
    std::fs::write(
        &spool,
        "{\"from\":\"a@b.test\",\"to\":[\"no-at-sign\"],\"data\":\"x\"}\nnot json\n{\"id\":\"ok-3\",\"to\":[\"c@d.test\"],\"data\":\"x\"}\n",
    )
    .unwrap();
    let log = dir.path().join("log.jsonl");
    let out = run(volley().args(["send", "--quiet", "--log"]).arg(&log).arg(&spool));
    assert!(out.status.success(), "{}", text(&out.stderr));
    let err = text(&out.stderr);
    assert!(err.contains("bad.jsonl:2: not a valid job"), "{err}");
    assert!(
        err.contains("bad.jsonl:1: bad recipient \"no-at-sign\": has no @"),
        "{err}"
    );
    assert!(
        text(&out.stdout).contains("3 rejected (2 bad lines)"),
        "{}",
        text(&out.stdout)
    );
    // A line rejected whole keeps the id it has; one with none is FILE:LINE.
    let ids: Vec<String> = std::fs::read_to_string(&log)
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["id"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert!(
        ids.contains(&"ok-3".to_string()) && ids.contains(&"bad.jsonl:2".to_string()),
        "{ids:?}"
    );
}

#[test]
fn sigterm_stops_gracefully_and_a_rerun_finishes_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let spool = gen_spool(dir.path(), "slow", 3000);
    // A slow sink: every batch of replies waits 20 ms.
    let sink = SlowSink::start(20);
    let route = sink.route();
    let journal = dir.path().join("slow.jsonl.journal");
    let records = || journaled(&journal);
    let child = volley()
        .args(["send", "--quiet", "--connections", "2", "--route", &route])
        .arg(&spool)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    wait_journaled(&journal, 100);
    // SIGTERM
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(4), "{}", text(&out.stdout));
    assert!(text(&out.stdout).contains("interrupted:"), "{}", text(&out.stdout));
    let after_stop = records();
    assert!(after_stop < 3000, "stopped early: {after_stop}");
    let out = run(volley().args(["send", "--quiet", "--route", &route]).arg(&spool));
    assert!(out.status.success(), "{}", text(&out.stdout));
    assert!(
        text(&out.stdout).contains(&format!("{after_stop} more were already final")),
        "{}",
        text(&out.stdout)
    );
    drop(sink);
    let all = volley::journal::read_records(&journal).unwrap();
    let mut keys: Vec<(u32, u32)> = all.iter().map(|(l, i, _)| (*l, *i)).collect();
    keys.sort_unstable();
    keys.dedup();
    assert_eq!((keys.len(), all.len()), (3000, 3000), "each recipient journaled once");
}

#[test]
fn a_spool_truncated_while_sending_is_a_clear_error_and_a_rerun_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let spool = gen_spool(dir.path(), "shrinking", 20000);
    let original = std::fs::read(&spool).unwrap();
    let sink = SlowSink::start(5);
    let route = sink.route();
    let journal = dir.path().join("shrinking.jsonl.journal");
    let child = volley()
        .args(["send", "--quiet", "--connections", "2", "--route", &route])
        .arg(&spool)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_journaled(&journal, 200);
    // The producer breaks the contract: the file shrinks under volley.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&spool)
        .unwrap()
        .set_len(0)
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(75), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("truncated while volley had it mapped"),
        "{}",
        text(&out.stderr)
    );
    // Restored, the file is finished by a rerun.
    std::fs::write(&spool, &original).unwrap();
    let out = run(volley().args(["send", "--quiet", "--route", &route]).arg(&spool));
    drop(sink);
    assert!(out.status.success(), "{}{}", text(&out.stdout), text(&out.stderr));
    assert!(
        text(&out.stdout).contains("more were already final"),
        "{}",
        text(&out.stdout)
    );
}

/// One spool file, one sender: a second `volley send` of a file another
/// one is sending is refused, naming the first one's pid, before it touches
/// the journal; once the first is killed (SIGKILL), its lock is gone and a
/// new send finishes the file.
#[test]
fn a_second_send_of_a_spool_being_sent_is_refused_and_a_killed_ones_lock_does_not_block() {
    let dir = tempfile::tempdir().unwrap();
    let spool = gen_spool(dir.path(), "one", 3000);
    let sink = SlowSink::start(20);
    let route = sink.route();
    let journal = dir.path().join("one.jsonl.journal");
    let mut first = common::Reaper(
        volley()
            .args(["send", "--quiet", "--connections", "2", "--route", &route])
            .arg(&spool)
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_journaled(&journal, 50);
    let out = run(volley().args(["send", "--quiet", "--route", &route]).arg(&spool));
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains(&format!(
            "spool file {} is in use by another volley process (pid {})",
            spool.display(),
            first.0.id()
        )),
        "{err}"
    );
    assert!(!dir.path().join("one.jsonl.journal.stale").exists());
    first.0.kill().unwrap();
    first.0.wait().unwrap();
    let at_kill = journaled(&journal);
    let out = run(volley().args(["send", "--quiet", "--route", &route]).arg(&spool));
    assert!(out.status.success(), "{}{}", text(&out.stdout), text(&out.stderr));
    assert!(
        text(&out.stdout).contains(&format!("{at_kill} more were already final")),
        "{}",
        text(&out.stdout)
    );
}

/// SIGTERM while ingest has read past a full shard (it waits for credit, not
/// on a send): the shards stop, ingest sees them gone, and the process ends.
#[test]
fn sigterm_ends_the_send_while_ingest_waits_for_credit() {
    let dir = tempfile::tempdir().unwrap();
    let spool = gen_spool(dir.path(), "slow", 3000);
    let config = dir.path().join("volley.toml");
    std::fs::write(&config, "max_queued_recipients_per_shard = 100\n").unwrap();
    let sink = SlowSink::start(20);
    let journal = dir.path().join("slow.jsonl.journal");
    let mut child = volley()
        .args([
            "send",
            "--quiet",
            "--connections",
            "2",
            "--route",
            &sink.route(),
            "--config",
        ])
        .arg(&config)
        .arg(&spool)
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    wait_journaled(&journal, 100);
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("volley send did not end after SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(status.code(), Some(4));
}

/// glommio's executors need 512 KiB of locked memory: a lower soft limit
/// is raised by volley itself; a hard limit it may not pass is a clear
/// error saying what is needed and how to raise it, not a shard that dies.
#[test]
fn a_low_memlock_limit_is_raised_or_explained() {
    let bin = env!("CARGO_BIN_EXE_volley");
    let demo = "demo --recipients 20 --domains 2 --shards 1";
    let out = run(Command::new("bash").args(["-c", &format!("ulimit -S -l 64 && exec {bin} {demo}")]));
    assert!(out.status.success(), "{}{}", text(&out.stdout), text(&out.stderr));
    assert!(text(&out.stdout).contains("demo ok"), "{}", text(&out.stdout));
    // Without CAP_SYS_RESOURCE (dropped from the bounding set) a hard limit of 64 KiB stays.
    let dropped = run(Command::new("setpriv").args(["--bounding-set", "-sys_resource", "true"]))
        .status
        .success();
    let prefix = if dropped {
        "setpriv --bounding-set -sys_resource "
    } else {
        ""
    };
    let out = run(Command::new("bash").args(["-c", &format!("ulimit -l 64 && exec {prefix}{bin} {demo}")]));
    let err = text(&out.stderr);
    if !dropped && out.status.success() {
        return; // it could raise the hard limit (CAP_SYS_RESOURCE), and the capability could not be dropped
    }
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("locked-memory limit (RLIMIT_MEMLOCK) is 64 KiB")
            && err.contains("at least 512 KiB")
            && err.contains("ulimit -l")
            && err.contains("LimitMEMLOCK"),
        "{err}"
    );
}

/// A send to a port where nothing listens says why nothing is delivered:
/// the progress lines (stderr, not a terminal) and the summary name the
/// most frequent reasons with their counts and domains.
#[test]
fn a_send_that_cannot_deliver_says_why() {
    let dir = tempfile::tempdir().unwrap();
    let spool = gen_spool(dir.path(), "w", 20);
    let out = run(volley()
        .args([
            "send",
            "--no-journal",
            "--route",
            &format!("*=127.0.0.1:{}", free_port()),
        ])
        .args(["--max-age", "6s", "--retry-initial", "1s"])
        .arg(&spool));
    let (said, err) = (text(&out.stdout), text(&out.stderr));
    assert_eq!(out.status.code(), Some(3), "expired: {said}{err}");
    assert!(said.contains("top deferral reasons:\n"), "{said}");
    assert!(said.contains("top expiry reasons:\n"), "{said}");
    let line = said
        .lines()
        .find(|l| l.contains(" × ") && l.contains("Connection refused"))
        .unwrap_or_else(|| panic!("{said}"));
    assert!(line.contains("(10 domains: d0.test, …)"), "{line}");
    assert!(
        err.contains("recipients final after 5s") && err.contains("top deferral: "),
        "{err}"
    );
}

/// A nameserver that never answers: each lookup is deferred after the
/// configured attempts × timeout, saying so, and the recipients expire at
/// max_age with that reason.
#[test]
fn a_silent_nameserver_defers_after_the_configured_attempts() {
    let dir = tempfile::tempdir().unwrap();
    let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let port = udp.local_addr().unwrap().port();
    let _tcp = TcpListener::bind(("127.0.0.1", port)).unwrap();
    let cfg = dir.path().join("v.toml");
    std::fs::write(
        &cfg,
        format!(
            "[dns]\nservers = [\"127.0.0.1:{port}\"]\ntimeout = \"300ms\"\nattempts = 2\n[retry]\nmax_age = \"3s\"\n"
        ),
    )
    .unwrap();
    let spool = gen_spool(dir.path(), "s", 3);
    let out = run(volley()
        .args(["send", "--quiet", "--no-journal", "--config"])
        .arg(&cfg)
        .arg(&spool));
    let said = text(&out.stdout);
    assert_eq!(out.status.code(), Some(3), "{said}{}", text(&out.stderr));
    assert!(said.contains("no answer within 600ms (2 attempts of 300ms)"), "{said}");
}

/// Recipients an earlier run finished badly (here: expired against a port
/// where nothing listens) are not sent by a plain rerun (the journal), but
/// are by `--resend expired`; the delivered ones are never sent again.
#[test]
fn resend_sends_again_what_an_earlier_run_finished_as_asked() {
    let dir = tempfile::tempdir().unwrap();
    let spool = gen_spool(dir.path(), "r", 20);
    let closed = format!("*=127.0.0.1:{}", free_port());
    let out = run(volley()
        .args(["send", "--quiet", "--route", &closed, "--max-age", "2s"])
        .arg(&spool));
    assert_eq!(out.status.code(), Some(3), "{}", text(&out.stdout));
    assert!(text(&out.stdout).contains("20 expired"), "{}", text(&out.stdout));
    let sink = SlowSink::start(0);
    let again = run(volley().args(["send", "--quiet", "--route", &sink.route()]).arg(&spool));
    assert!(again.status.success());
    assert!(
        text(&again.stdout).contains("0 delivered") && text(&again.stdout).contains("20 more were already final"),
        "{}",
        text(&again.stdout)
    );
    let resent = run(volley()
        .args([
            "send",
            "--quiet",
            "--resend",
            "bounced,expired",
            "--route",
            &sink.route(),
        ])
        .arg(&spool));
    assert!(resent.status.success(), "{}", text(&resent.stderr));
    assert!(
        text(&resent.stdout).contains("20 delivered"),
        "{}",
        text(&resent.stdout)
    );
    // Delivered now: a further --resend expired has nothing to send.
    let none = run(volley()
        .args(["send", "--quiet", "--resend", "expired", "--route", &sink.route()])
        .arg(&spool));
    assert!(text(&none.stdout).contains("0 delivered"), "{}", text(&none.stdout));
    let bad = run(volley()
        .args(["send", "--no-journal", "--resend", "expired"])
        .arg(&spool));
    assert_eq!(bad.status.code(), Some(2), "{}", text(&bad.stderr));
    assert!(text(&bad.stderr).contains("--no-journal"), "{}", text(&bad.stderr));
    let bad = run(volley().args(["send", "--resend", "delivered"]).arg(&spool));
    assert_eq!(bad.status.code(), Some(2), "clap refuses it: {}", text(&bad.stderr));
}

/// Executors are pinned within the CPUs the process was given (`taskset`, a
/// cpuset), not to the machine's first ones.
#[test]
fn executors_stay_within_the_cpus_the_process_was_given() {
    use std::os::unix::process::CommandExt;
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    if cpus < 2 {
        eprintln!("one CPU: nothing to keep an executor off");
        return;
    }
    // SAFETY: a zeroed cpu_set_t is valid; sched_getaffinity fills it.
    let mut mine: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    assert_eq!(
        unsafe { libc::sched_getaffinity(0, std::mem::size_of_val(&mine), &mut mine) },
        0
    );
    let last = (0..libc::CPU_SETSIZE as usize)
        .rev()
        .find(|&c| unsafe { libc::CPU_ISSET(c, &mine) })
        .unwrap();
    let port = free_port();
    let mut cmd = volley();
    cmd.args(["sink", "--shards", "1", "--listen", &format!("127.0.0.1:{port}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    // SAFETY: only sched_setaffinity, async-signal-safe, between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            libc::CPU_SET(last, &mut set);
            if libc::sched_setaffinity(0, std::mem::size_of_val(&set), &set) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().unwrap();
    wait_listening(port);
    let tasks = std::fs::read_dir(format!("/proc/{}/task", child.id())).unwrap();
    let executor = tasks
        .filter_map(|t| {
            let t = t.ok()?.path();
            let comm = std::fs::read_to_string(t.join("comm")).ok()?;
            comm.starts_with("volley-sink-0")
                .then(|| std::fs::read_to_string(t.join("status")).unwrap())
        })
        .next();
    let _ = child.kill();
    let _ = child.wait();
    let status = executor.expect("the sink's executor thread volley-sink-0");
    let allowed = status
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
        .unwrap()
        .trim();
    assert_eq!(
        allowed,
        last.to_string(),
        "given CPU {last} only, the executor is pinned to it"
    );
}
