//! DKIM signing, checked by an independent verifier: Debian's python3-dkim
//! (dkimpy) reads the messages `volley sink` dumped, with the public keys
//! from `volley dkim-record` instead of DNS.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{dumped_rcpts, send_all};
use volley::config::Config;
use volley::outcome::Outcome;
use volley::sink::{Sink, SinkOptions};

fn data(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/dkim").join(name)
}

/// `SELECTOR._domainkey.DOMAIN=TXT` for the verifier, from `volley dkim-record`.
fn record(key: &str, selector: &str, domain: &str) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_volley"))
        .args(["dkim-record", "--selector", selector, "--domain", domain, "--key-file"])
        .arg(data(key))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let line = String::from_utf8(out.stdout).unwrap();
    let txt: String = line.split('"').skip(1).step_by(2).collect();
    format!("{selector}._domainkey.{domain}={txt}")
}

/// Runs the verifier on every dumped message: (file, results) per message.
fn verify(dump: &Path, records: &[String]) -> Vec<(String, Vec<String>)> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dump).unwrap().map(|e| e.unwrap().path()).collect();
    files.sort();
    let out = Command::new("/usr/bin/python3")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/dkim_verify.py"))
        .args(records)
        .args(&files)
        .output()
        .expect("/usr/bin/python3 with python3-dkim (apt-get install python3-dkim)");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "the verifier failed:\n{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    text.lines()
        .map(|l| {
            let mut w = l.split(' ');
            let f = w.next().unwrap().to_string();
            (f, w.map(str::to_string).collect())
        })
        .collect()
}

/// Whether a dumped message is the one from a domain without keys.
fn from_elsewhere(path: &str) -> bool {
    std::fs::read_to_string(path)
        .unwrap()
        .contains("\r\nFrom: someone@other.test\r\n")
}

fn case(chunking: bool) {
    let dir = tempfile::tempdir().unwrap();
    let dump = dir.path().join("dump");
    let sink = Sink::start(SinkOptions {
        listen: "127.0.0.1:0".parse().unwrap(),
        dump: Some(dump.clone()),
        chunking,
        ..Default::default()
    })
    .unwrap();
    // Bare LF line ends, a line to dot-stuff, a folded From:, trailing blank lines.
    std::fs::write(
        dir.path().join("news.eml"),
        "From: \"The News\"\n <news@news.example.com>\nTo: readers@news.example.com\nSubject: Weekly\nDate: Tue, 1 Dec 2026 10:00:00 +0000\nMessage-ID: <w1@news.example.com>\nMIME-Version: 1.0\nContent-Type: text/plain; charset=us-ascii\n\nHello,\n.this line starts with a dot\n  spaced   out  \n\n\n",
    )
    .unwrap();
    let mut lines = Vec::new();
    for j in 0..20 {
        lines.push(format!(
            "{{\"from\":\"bounces@news.example.com\",\"to\":[\"r{j}a@d{}.test\",\"r{j}b@d{}.test\"],\"message\":\"news.eml\"}}",
            j % 3,
            j % 3
        ));
    }
    // Inline messages: one from a subdomain (signed with the parent's keys), one from elsewhere (unsigned).
    lines.push(
        serde_json::json!({"from": "b@x.test", "to": ["inline@d0.test"], "data": "From: alerts@mail.news.example.com\r\nSubject: inline\r\n\r\n.\r\nend\r\n"})
            .to_string(),
    );
    lines.push(
        serde_json::json!({"from": "b@x.test", "to": ["other@d1.test"], "data": "From: someone@other.test\nSubject: not ours\n\nhi\n"})
            .to_string(),
    );
    let path = dir.path().join("news.jsonl");
    std::fs::write(&path, lines.join("\n")).unwrap();
    let mut cfg: Config = toml::from_str(&format!(
        "[dkim.\"news.example.com\"]\nkeys = [{{ selector = \"rsa1\", key_file = {:?} }}, {{ selector = \"ed1\", key_file = {:?} }}]\n",
        data("rsa2048.pem"),
        data("ed25519.pem")
    ))
    .unwrap();
    cfg.shards = Some(2);
    cfg.add_route(&format!("*={}", sink.addr())).unwrap();
    let summary = send_all(vec![path], cfg);
    let counts = sink.stop();
    assert_eq!(summary.count(Outcome::Delivered), 42);
    assert_eq!(dumped_rcpts(&dump).len(), 42);
    assert_eq!(counts.chunked > 0, chunking);
    let records = [
        record("rsa2048.pem", "rsa1", "news.example.com"),
        record("ed25519.pem", "ed1", "news.example.com"),
    ];
    let results = verify(&dump, &records);
    assert!(results.len() >= 22, "{results:?}");
    assert_eq!(
        results.iter().filter(|(f, _)| from_elsewhere(f)).count(),
        1,
        "{results:?}"
    );
    for (file, r) in &results {
        if from_elsewhere(file) {
            assert_eq!(r, &["unsigned"], "{file}");
        } else {
            assert_eq!(r, &["ok", "ok"], "{file}: RSA and Ed25519 both verify");
        }
    }
    // The verifier does fail a message changed after signing.
    let (signed, _) = results.iter().find(|(f, _)| !from_elsewhere(f)).unwrap();
    let tampered = dir.path().join("tampered");
    std::fs::create_dir(&tampered).unwrap();
    let text = std::fs::read_to_string(signed).unwrap().replace("Hello,", "Hullo,");
    std::fs::write(tampered.join("t.eml"), text).unwrap();
    let out = Command::new("/usr/bin/python3")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/dkim_verify.py"))
        .args(&records)
        .arg(tampered.join("t.eml"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        said.ends_with("fail fail\n"),
        "{said}{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn signed_mail_verifies_with_an_independent_verifier_over_data() {
    case(false);
}

#[test]
fn signed_mail_verifies_with_an_independent_verifier_over_bdat() {
    case(true);
}

#[test]
fn a_bad_key_stops_the_start_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("v.toml");
    std::fs::write(
        &cfg,
        format!(
            "[dkim.\"news.example.com\"]\nselector = \"s1\"\nkey_file = {:?}\n",
            data("ec.pem")
        ),
    )
    .unwrap();
    let spool = dir.path().join("s.jsonl");
    std::fs::write(
        &spool,
        "{\"from\":\"a@x.test\",\"to\":[\"b@d.test\"],\"data\":\"x\\n\"}\n",
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_volley"))
        .args(["send", "--no-journal", "--route", "*=127.0.0.1:9", "--config"])
        .arg(&cfg)
        .arg(&spool)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("dkim.\"news.example.com\".key_file = ") && err.contains("ec.pem") && err.contains("EC (SEC1)"),
        "{err}"
    );
}
