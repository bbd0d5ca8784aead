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
