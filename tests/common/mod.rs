//! Helpers shared by the integration tests: spools, delivery logs, sink dumps.
#![allow(dead_code)]

pub mod dns;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde_json::Value;

/// A child process killed when dropped, so a failing test leaves no volley behind.
pub struct Reaper(pub std::process::Child);

impl Drop for Reaper {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Reads a delivery log into its records.
pub fn read_log(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad log line {l:?}: {e}")))
        .collect()
}

/// Reads a delivery log that a failed write may have left with a torn last
/// line (the next run cuts it off), into its whole records.
pub fn read_log_prefix(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    let whole = text.rfind('\n').map_or("", |i| &text[..i]);
    whole
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad log line {l:?}: {e}")))
        .collect()
}

/// Final outcomes per (job id, recipient), asserting each has exactly one.
pub fn finals(log: &[Value]) -> HashMap<(String, String), Value> {
    let mut out = HashMap::new();
    for r in log {
        if r["outcome"] == "deferred" {
            continue;
        }
        let key = (
            r["id"].as_str().unwrap().to_string(),
            r["rcpt"].as_str().unwrap_or("").to_string(),
        );
        if let Some(prev) = out.insert(key.clone(), r.clone()) {
            panic!("two final outcomes for {key:?}: {prev} and {r}");
        }
    }
    out
}

/// Final log lines per recipient address (deferrals left out); a recipient
/// that a crash made go out twice may have two.
pub fn final_lines(log: &[Value]) -> HashMap<String, usize> {
    let mut out: HashMap<String, usize> = HashMap::new();
    for r in log.iter().filter(|r| r["outcome"] != "deferred") {
        *out.entry(r["rcpt"].as_str().unwrap_or("").to_string()).or_default() += 1;
    }
    out
}

/// Recipients per message the sink dumped, from the X-Rcpt-To lines it writes first.
pub fn dumped_rcpts(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let text = std::fs::read_to_string(e.unwrap().path()).unwrap();
        for l in text.lines() {
            match l.strip_prefix("X-Rcpt-To: <") {
                Some(r) => out.push(r.trim_end_matches(['\r', '>']).to_string()),
                None if l.starts_with("X-Mail-From:") || l.starts_with("X-Peer:") || l.starts_with("X-Helo:") => {}
                None => break,
            }
        }
    }
    out.sort();
    out
}

/// Writes a spool of `jobs` jobs with `per_job` recipients over `domains`
/// domains, sharing one message file; returns (spool path, all recipients).
pub fn spool(dir: &Path, name: &str, jobs: usize, per_job: usize, domains: usize) -> (PathBuf, Vec<String>) {
    let msg = dir.join(format!("{name}.eml"));
    std::fs::write(&msg, "Subject: test\n\n.leading dot\nbody\n").unwrap();
    let mut text = String::new();
    let mut all = Vec::new();
    let mut g = 0;
    for j in 0..jobs {
        let rcpts: Vec<String> = (0..per_job)
            .map(|_| {
                g += 1;
                // Consecutive pairs share a domain, so some jobs have two recipients in one.
                format!("u{g}@d{}.test", (g / 2) % domains)
            })
            .collect();
        all.extend(rcpts.iter().cloned());
        text += &serde_json::json!({"id": format!("j{j}"), "from": "news@sender.test", "to": rcpts, "message": format!("{name}.eml")}).to_string();
        text.push('\n');
    }
    let path = dir.join(format!("{name}.jsonl"));
    std::fs::write(&path, text).unwrap();
    all.sort();
    (path, all)
}

/// (peer address, EHLO name) of every message the sink dumped.
pub fn dumped_peers(dir: &Path) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let text = std::fs::read_to_string(e.unwrap().path()).unwrap();
        let field = |name: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(name))
                .map(|v| v.trim_end_matches('\r').to_string())
                .unwrap_or_default()
        };
        out.push((field("X-Peer: "), field("X-Helo: ")));
    }
    out
}

/// A server that holds every connection it accepts, saying nothing, until
/// it is opened; then (and from then on) it pipes each connection to `to`.
/// A destination that answers only when the test says so: no timing in the test.
pub struct Gate {
    pub addr: std::net::SocketAddr,
    open: std::sync::Arc<(std::sync::Mutex<bool>, std::sync::Condvar)>,
    accepted: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl Gate {
    pub fn start(to: std::net::SocketAddr) -> Gate {
        use std::sync::atomic::Ordering;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let open = std::sync::Arc::new((std::sync::Mutex::new(false), std::sync::Condvar::new()));
        let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (o, a) = (open.clone(), accepted.clone());
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { break };
                a.fetch_add(1, Ordering::SeqCst);
                let o = o.clone();
                std::thread::spawn(move || {
                    let (lock, cv) = &*o;
                    let mut opened = lock.lock().unwrap();
                    while !*opened {
                        opened = cv.wait(opened).unwrap();
                    }
                    drop(opened);
                    let Ok(server) = std::net::TcpStream::connect(to) else {
                        return;
                    };
                    let (mut c2, mut s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
                    let up = std::thread::spawn(move || {
                        let _ = std::io::copy(&mut c2, &mut s2);
                        let _ = s2.shutdown(std::net::Shutdown::Write);
                    });
                    let (mut s, mut c) = (server, client);
                    let _ = std::io::copy(&mut s, &mut c);
                    let _ = c.shutdown(std::net::Shutdown::Both);
                    let _ = up.join();
                });
            }
        });
        Gate { addr, open, accepted }
    }

    /// Connections taken so far.
    pub fn accepted(&self) -> usize {
        self.accepted.load(std::sync::atomic::Ordering::SeqCst)
    }

    pub fn open(&self) {
        let (lock, cv) = &*self.open;
        *lock.lock().unwrap() = true;
        cv.notify_all();
    }
}

/// Sends `spools` with `config` in this process, without a progress bar, to the end.
pub fn send_all(spools: Vec<PathBuf>, config: volley::config::Config) -> volley::collector::Summary {
    volley::send::send(volley::send::SendOptions {
        spools,
        config,
        progress: volley::send::Progress::Off,
        stop: None,
        watch: None,
    })
    .expect("send completes")
}

/// `SELECTOR._domainkey.DOMAIN=TXT` for `tests/dkim_verify.py`, from `volley dkim-record`.
pub fn dkim_record(key: &Path, selector: &str, domain: &str) -> String {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_volley"))
        .args(["dkim-record", "--selector", selector, "--domain", domain, "--key-file"])
        .arg(key)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let line = String::from_utf8(out.stdout).unwrap();
    let txt: String = line.split('"').skip(1).step_by(2).collect();
    format!("{selector}._domainkey.{domain}={txt}")
}

/// Runs the independent DKIM verifier (Debian's python3-dkim) on `files`
/// with the public keys `records`: its output, a line per file.
pub fn dkim_verify(records: &[String], files: &[PathBuf]) -> std::process::Output {
    std::process::Command::new("/usr/bin/python3")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/dkim_verify.py"))
        .args(records)
        .args(files)
        .output()
        .expect("/usr/bin/python3 with python3-dkim (apt-get install python3-dkim)")
}
