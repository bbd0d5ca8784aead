//! A full or failing disk fails safe: when the delivery log or a journal
//! cannot be written (a full filesystem, a read-only remount), `volley send`
//! and `volley run` stop with exit status 74, name the file and the reason,
//! count nothing they could not record, and once space is back a rerun
//! finishes with nothing lost: every recipient has exactly one final journal
//! record and its final line in the log (a second line only for a recipient
//! the sink really got twice).
//!
//! Each test mounts a small tmpfs of its own, so it needs root (`.ci/run`
//! runs as root).

mod common;

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use volley::journal;
use volley::sink::{Sink, SinkOptions};

const EXIT_STORAGE: i32 = 74;

/// A tmpfs mounted for one test, unmounted when dropped.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: &Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(at).unwrap();
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(at)
            .status()
            .unwrap();
        assert!(
            status.success(),
            "mount tmpfs on {} (this test needs root)",
            at.display()
        );
        Tmpfs(at.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// An ext4 filesystem on a loop device, mounted with `errors=remount-ro`:
/// an error makes the kernel remount it read-only under open files, as it
/// does when a disk fails.
struct Ext4 {
    at: PathBuf,
    image: PathBuf,
}

impl Ext4 {
    fn mount(at: &Path, image: &Path) -> Ext4 {
        std::fs::create_dir_all(at).unwrap();
        std::fs::File::create(image).unwrap().set_len(64 << 20).unwrap();
        let ok = Command::new("mkfs.ext4")
            .args(["-q", "-F"])
            .arg(image)
            .status()
            .unwrap();
        assert!(ok.success(), "mkfs.ext4");
        let fs = Ext4 {
            at: at.to_path_buf(),
            image: image.to_path_buf(),
        };
        fs.mount_again();
        fs
    }

    fn mount_again(&self) {
        let ok = Command::new("mount")
            .args(["-o", "loop,errors=remount-ro"])
            .arg(&self.image)
            .arg(&self.at)
            .status()
            .unwrap();
        assert!(
            ok.success(),
            "mount {} on a loop device (this test needs root)",
            self.image.display()
        );
    }

    /// Makes ext4 record an error: it goes read-only at once.
    fn fail(&self) {
        let out = Command::new("findmnt")
            .args(["-n", "-o", "SOURCE"])
            .arg(&self.at)
            .output()
            .unwrap();
        let dev = text(&out.stdout).trim().trim_start_matches("/dev/").to_string();
        std::fs::write(format!("/sys/fs/ext4/{dev}/trigger_fs_error"), "1").unwrap();
    }

    /// Unmounts, repairs and mounts it again read-write.
    fn repair(&self) {
        assert!(Command::new("umount").arg(&self.at).status().unwrap().success());
        let fsck = Command::new("e2fsck")
            .args(["-f", "-y"])
            .arg(&self.image)
            .output()
            .unwrap();
        assert!(
            fsck.status.code().is_some_and(|c| c <= 1),
            "e2fsck: {}",
            text(&fsck.stdout)
        );
        self.mount_again();
    }
}

impl Drop for Ext4 {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.at).status();
    }
}

/// Fills a filesystem up with `path`, then frees `leave` bytes of it.
fn fill(path: &Path, leave: u64) {
    let mut f = std::fs::File::create(path).unwrap();
    let chunk = vec![0u8; 4096];
    let mut len = 0u64;
    loop {
        match f.write(&chunk) {
            Ok(n) => len += n as u64,
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
            Err(e) => panic!("filling {}: {e}", path.display()),
        }
    }
    f.set_len(len.saturating_sub(leave)).unwrap();
}

/// Kills the child when dropped, so a failing test leaves no volley behind.
struct Reaper(Option<std::process::Child>);

impl Reaper {
    fn spawn(cmd: &mut Command) -> Reaper {
        Reaper(Some(cmd.spawn().unwrap()))
    }

    fn child(&mut self) -> &mut std::process::Child {
        self.0.as_mut().expect("not waited for yet")
    }

    fn output(mut self) -> Output {
        self.0.take().expect("not waited for yet").wait_with_output().unwrap()
    }
}

impl Drop for Reaper {
    fn drop(&mut self) {
        if let Some(c) = &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn volley() -> Command {
    Command::new(env!("CARGO_BIN_EXE_volley"))
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn generate(spool: &Path, jobs: u64) {
    let out = volley()
        .args([
            "gen",
            "--jobs",
            &jobs.to_string(),
            "--domains",
            "20",
            "--size",
            "300",
            "--out",
        ])
        .arg(spool)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
}

fn send(spool: &Path, log: &Path, sink: &Sink) -> Output {
    volley()
        .args(["send", "--quiet", "--shards", "2", "--connections", "4"])
        .args(["--route", &format!("*={}", sink.addr())])
        .arg("--log")
        .arg(log)
        .arg(spool)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

fn dump_sink(dump: &Path) -> Sink {
    Sink::start(SinkOptions {
        listen: "127.0.0.1:0".parse().unwrap(),
        shards: 1,
        dump: Some(dump.to_path_buf()),
        ..Default::default()
    })
    .unwrap()
}

/// Nothing lost: one journal record per recipient, a final log line for
/// each, and a second line only where the sink got the recipient twice.
/// Returns the recipients the sink got more than once.
fn check_nothing_lost(jobs: u64, journal_path: &Path, logs: &[&Path], dump: &Path) -> u64 {
    let records = journal::read_records(journal_path).unwrap();
    let mut per_rcpt: HashMap<(u32, u32), usize> = HashMap::new();
    for (line, idx, _) in &records {
        *per_rcpt.entry((*line, *idx)).or_default() += 1;
    }
    assert_eq!(per_rcpt.len() as u64, jobs, "every recipient is journaled");
    assert!(per_rcpt.values().all(|&n| n == 1), "no recipient is journaled twice");
    let mut lines: HashMap<String, usize> = HashMap::new();
    for log in logs {
        for (rcpt, n) in common::final_lines(&common::read_log(log)) {
            *lines.entry(rcpt).or_default() += n;
        }
    }
    assert_eq!(
        lines.len() as u64,
        jobs,
        "every recipient has its final line in the log"
    );
    let mut at_sink: HashMap<String, usize> = HashMap::new();
    for r in common::dumped_rcpts(dump) {
        *at_sink.entry(r).or_default() += 1;
    }
    assert_eq!(at_sink.len() as u64, jobs, "the sink got every recipient");
    for (rcpt, n) in &lines {
        let got = at_sink.get(rcpt).copied().unwrap_or(0);
        assert!(*n <= got, "{rcpt}: {n} final lines, delivered {got} times");
    }
    at_sink.values().filter(|&&n| n > 1).count() as u64
}

#[test]
fn a_full_disk_under_the_delivery_log_stops_send_and_a_rerun_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let fs = Tmpfs::mount(&dir.path().join("small"), "2m");
    let spool = dir.path().join("news.jsonl");
    generate(&spool, 6000);
    let dump = dir.path().join("dump");
    let sink = dump_sink(&dump);
    let log = fs.0.join("log.jsonl");
    // Room for a few hundred log lines, not for 6,000.
    fill(&fs.0.join("filler"), 96 * 1024);
    let out = send(&spool, &log, &sink);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(EXIT_STORAGE), "{err}");
    assert!(
        err.contains(&format!(
            "cannot write the delivery log {}: No space left on device",
            log.display()
        )),
        "{err}"
    );
    assert!(err.contains("final outcomes could not be recorded"), "{err}");
    let journaled = journal::read_records(&journal::path_for(&spool)).unwrap().len();
    assert!(journaled > 0 && journaled < 6000, "stopped part way: {journaled}");
    // Every journaled recipient is in the log already.
    assert!(common::final_lines(&common::read_log_prefix(&log)).len() >= journaled);

    std::fs::remove_file(fs.0.join("filler")).unwrap();
    let out = send(&spool, &log, &sink);
    assert!(out.status.success(), "{}{}", text(&out.stdout), text(&out.stderr));
    assert!(
        text(&out.stdout).contains(&format!("{journaled} more were already final")),
        "{}",
        text(&out.stdout)
    );
    sink.stop();
    let twice = check_nothing_lost(6000, &journal::path_for(&spool), &[&log], &dump);
    eprintln!("log full: {journaled} journaled before the stop, {twice} delivered twice");
}

#[test]
fn a_full_disk_under_the_journal_stops_send_and_a_rerun_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let fs = Tmpfs::mount(&dir.path().join("small"), "4m");
    let spool = fs.0.join("news.jsonl");
    generate(&spool, 6000);
    let dump = dir.path().join("dump");
    let sink = dump_sink(&dump);
    let log = dir.path().join("log.jsonl");
    // Room for the journal's header and a few thousand records, not 6,000.
    fill(&fs.0.join("filler"), 24 * 1024);
    let out = send(&spool, &log, &sink);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(EXIT_STORAGE), "{err}");
    let jpath = journal::path_for(&spool);
    assert!(
        err.contains(&format!(
            "cannot write the journal {}: No space left on device",
            jpath.display()
        )),
        "{err}"
    );
    std::fs::remove_file(fs.0.join("filler")).unwrap();
    let out = send(&spool, &log, &sink);
    assert!(out.status.success(), "{}{}", text(&out.stdout), text(&out.stderr));
    sink.stop();
    check_nothing_lost(6000, &jpath, &[&log], &dump);
}

#[test]
fn a_disk_gone_read_only_stops_send_and_a_rerun_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let fs = Ext4::mount(&dir.path().join("disk"), &dir.path().join("disk.img"));
    let spool = fs.at.join("news.jsonl");
    generate(&spool, 4000);
    // On the disk, not only in the page cache: an ext4 error drops what was not written back.
    assert!(Command::new("sync").status().unwrap().success());
    let dump = dir.path().join("dump");
    let sink = Sink::start(SinkOptions {
        listen: "127.0.0.1:0".parse().unwrap(),
        shards: 1,
        dump: Some(dump.clone()),
        latency: Duration::from_millis(5),
        ..Default::default()
    })
    .unwrap();
    let log = fs.at.join("log.jsonl");
    let child = Reaper::spawn(
        volley()
            .args(["send", "--quiet", "--connections", "2"])
            .args(["--route", &format!("*={}", sink.addr())])
            .arg("--log")
            .arg(&log)
            .arg(&spool)
            .stdout(Stdio::null())
            .stderr(Stdio::piped()),
    );
    let jpath = journal::path_for(&spool);
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::fs::metadata(&jpath).map_or(0, |m| m.len()) < 32 + 9 * 200 {
        assert!(Instant::now() < deadline, "no progress");
        std::thread::sleep(Duration::from_millis(5));
    }
    fs.fail();
    let out = child.output();
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(EXIT_STORAGE), "{err}");
    // The write that meets the error gets EIO (fdatasync) or EROFS (write).
    assert!(
        err.contains("Input/output error") || err.contains("Read-only file system"),
        "{err}"
    );
    assert!(
        err.contains(&log.display().to_string()) || err.contains(&jpath.display().to_string()),
        "{err}"
    );
    fs.repair();
    let out = send(&spool, &log, &sink);
    assert!(out.status.success(), "{}{}", text(&out.stdout), text(&out.stderr));
    sink.stop();
    check_nothing_lost(4000, &jpath, &[&log], &dump);
}

/// `volley run` on a spool directory whose filesystem fills up: it stops
/// with 74 naming the file; once space is freed, a restart finishes every
/// file into done/ with nothing lost.
#[test]
fn a_full_spool_directory_stops_the_service_and_a_restart_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let fs = Tmpfs::mount(&dir.path().join("small"), "8m");
    let root = fs.0.join("spool");
    let incoming = root.join("incoming");
    std::fs::create_dir_all(&incoming).unwrap();
    // Dropped before the service starts, as a producer would while it was down.
    for name in ["a", "b", "c"] {
        let tmp = dir.path().join(format!("{name}.jsonl"));
        generate(&tmp, 3000);
        let body = std::fs::read(dir.path().join(format!("{name}.eml"))).unwrap();
        std::fs::write(incoming.join(format!("{name}.eml")), body).unwrap();
        // Recipients of their own in each file.
        let text = std::fs::read_to_string(&tmp)
            .unwrap()
            .replace("\"u", &format!("\"{name}u"));
        std::fs::write(incoming.join(format!("{name}.jsonl.tmp")), text).unwrap();
        std::fs::rename(
            incoming.join(format!("{name}.jsonl.tmp")),
            incoming.join(format!("{name}.jsonl")),
        )
        .unwrap();
    }
    let dump = dir.path().join("dump");
    let sink = dump_sink(&dump);
    let log = root.join("log.jsonl");
    let config = dir.path().join("volley.toml");
    std::fs::write(
        &config,
        format!(
            "spool_dir = {:?}\nlog = {:?}\nmetrics_listen = \"\"\nidle_timeout = \"300ms\"\n[routes]\n\"*\" = \"{}\"\n",
            root.display().to_string(),
            log.display().to_string(),
            sink.addr()
        ),
    )
    .unwrap();
    fill(&fs.0.join("filler"), 128 * 1024);
    let out = volley()
        .args(["run", "--config"])
        .arg(&config)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(EXIT_STORAGE), "{err}");
    assert!(err.contains("No space left on device"), "{err}");
    assert!(err.contains(&root.display().to_string()), "names the file: {err}");
    std::fs::remove_file(fs.0.join("filler")).unwrap();
    let mut child = Reaper::spawn(
        volley()
            .args(["run", "--config"])
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit()),
    );
    let done = root.join("done");
    let deadline = Instant::now() + Duration::from_secs(60);
    while !["a", "b", "c"]
        .iter()
        .all(|n| done.join(format!("{n}.jsonl.summary.json")).exists())
    {
        assert!(Instant::now() < deadline, "not every file reached done/");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(unsafe { libc::kill(child.child().id() as i32, libc::SIGTERM) }, 0);
    assert!(child.child().wait().unwrap().success());
    sink.stop();
    let records: usize = ["a", "b", "c"]
        .iter()
        .map(|n| {
            journal::read_records(&journal::path_for(&done.join(format!("{n}.jsonl"))))
                .unwrap()
                .len()
        })
        .sum();
    assert_eq!(records, 9000, "one journal record per recipient");
    let lines = common::final_lines(&common::read_log(&log));
    assert_eq!(lines.len(), 9000, "every recipient has its final line");
    let mut at_sink: HashMap<String, usize> = HashMap::new();
    for r in common::dumped_rcpts(&dump) {
        *at_sink.entry(r).or_default() += 1;
    }
    for (rcpt, n) in &lines {
        assert!(*n <= at_sink.get(rcpt).copied().unwrap_or(0), "{rcpt} logged {n} times");
    }
    for n in ["a", "b", "c"] {
        let s: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(done.join(format!("{n}.jsonl.summary.json"))).unwrap())
                .unwrap();
        assert_eq!(
            (s["recipients"].as_u64(), s["delivered"].as_u64()),
            (Some(3000), Some(3000)),
            "{s}"
        );
    }
}

/// A delivery log that stops taking more (here a FIFO whose reader stops
/// reading, as a disk that stalls) holds the sending back: the shards start
/// no new transaction while the collector cannot record what they finish,
/// so what a crash would send twice stays small even with a shard's queue
/// full. Once the log moves again, everything goes out and is logged.
#[test]
fn a_stalled_delivery_log_holds_the_sending_back() {
    const JOBS: u64 = 200_000;
    const READ_FIRST: usize = 30_000;
    let dir = tempfile::tempdir().unwrap();
    let spool = dir.path().join("news.jsonl");
    generate(&spool, JOBS);
    let fifo = dir.path().join("log.fifo");
    let c_path = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
    assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) }, 0);
    let sink = Sink::start(SinkOptions {
        listen: "127.0.0.1:0".parse().unwrap(),
        shards: 1,
        chunking: true,
        ..Default::default()
    })
    .unwrap();
    let mut cfg = volley::config::Config {
        shards: Some(1),
        log: Some(fifo.clone()),
        // A FIFO cannot be fdatasynced.
        journal_fsync: false,
        ..Default::default()
    };
    cfg.add_route(&format!("*={}", sink.addr())).unwrap();
    // The reader takes the first lines, then stops until told to go on.
    let (go_on, resume) = std::sync::mpsc::channel::<()>();
    let reader = std::thread::spawn(move || {
        use std::io::Read;
        let mut f = std::fs::File::open(&fifo).unwrap();
        let (mut lines, mut buf, mut chunk) = (0, Vec::new(), vec![0u8; 1 << 16]);
        while lines < READ_FIRST {
            let n = f.read(&mut chunk).unwrap();
            assert!(n > 0, "the log ended early");
            lines += chunk[..n].iter().filter(|&&b| b == b'\n').count();
            buf.extend_from_slice(&chunk[..n]);
        }
        resume.recv().unwrap();
        f.read_to_end(&mut buf).unwrap();
        (lines, buf)
    });
    let sending = std::thread::spawn(move || {
        volley::send::send(volley::send::SendOptions {
            spools: vec![spool],
            config: cfg,
            progress: volley::send::Progress::Off,
            stop: None,
            watch: None,
        })
    });
    // Wait until the sink's count stands still: the collector is stuck on the log.
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut last = u64::MAX;
    loop {
        std::thread::sleep(Duration::from_millis(300));
        let now = sink.counts().messages;
        if now == last && now as usize > READ_FIRST {
            break;
        }
        assert!(Instant::now() < deadline, "the sink never stood still ({now})");
        last = now;
    }
    // What the shard may have unrecorded, what its connections have in flight
    // (20 connections, 8 transactions each), and the lines in the pipe and
    // in the reader's last read (64 KiB each, about 200 lines), with room to spare.
    let unrecorded = last as usize - READ_FIRST;
    let bound = volley::shard::MAX_UNRECORDED_PER_SHARD as usize + 20 * 8 + 2 * 200 + 500;
    assert!(
        unrecorded < bound,
        "{unrecorded} went out past the {READ_FIRST} recorded while nothing more could be (bound {bound})"
    );
    go_on.send(()).unwrap();
    let summary = sending.join().unwrap().expect("the send finishes once the log moves");
    let (_, log) = reader.join().unwrap();
    assert_eq!(summary.count(volley::outcome::Outcome::Delivered), JOBS);
    assert_eq!(log.iter().filter(|&&b| b == b'\n').count() as u64, JOBS);
    assert_eq!(sink.stop().messages, JOBS);
    eprintln!("stalled log: {unrecorded} went out past the {READ_FIRST} read before the sending stood still");
}
