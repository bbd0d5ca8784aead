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

fn record(key: &str, selector: &str, domain: &str) -> String {
    common::dkim_record(&data(key), selector, domain)
}

/// Runs the verifier on every dumped message: (file, results) per message.
fn verify(dump: &Path, records: &[String]) -> Vec<(String, Vec<String>)> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dump).unwrap().map(|e| e.unwrap().path()).collect();
    files.sort();
    let out = common::dkim_verify(records, &files);
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
    let out = common::dkim_verify(&records, &[tampered.join("t.eml")]);
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

/// A server without 8BITMIME gets the 8-bit parts in quoted-printable, and
/// the 7-bit form is signed on its own: the verifier passes it. A message
/// whose headers are 8-bit cannot be converted and bounces saying why.
#[test]
fn an_8bit_message_to_a_server_without_8bitmime_goes_in_quoted_printable_signed_after() {
    let dir = tempfile::tempdir().unwrap();
    let dump = dir.path().join("dump");
    let sink = Sink::start(SinkOptions {
        listen: "127.0.0.1:0".parse().unwrap(),
        dump: Some(dump.clone()),
        no_8bitmime: true,
        ..Default::default()
    })
    .unwrap();
    let body =
        "Caf\u{e9} cr\u{e8}me and \u{fc}ber, on a line long enough to be folded by the encoder at seventy-six octets\n";
    std::fs::write(
        dir.path().join("n.eml"),
        format!("From: news@news.example.com\nSubject: 8-bit\nMIME-Version: 1.0\nContent-Type: text/plain; charset=utf-8\nContent-Transfer-Encoding: 8bit\n\n{body}"),
    )
    .unwrap();
    let lines = [
        serde_json::json!({"id": "qp", "from": "b@news.example.com", "to": ["a@d0.test", "b@d1.test"], "message": "n.eml"}),
        serde_json::json!({"id": "hdr", "from": "b@news.example.com", "to": ["c@d0.test"], "data": "From: news@news.example.com\nSubject: Gr\u{fc}\u{df}e\n\nhi\n"}),
    ];
    let path = dir.path().join("e.jsonl");
    std::fs::write(&path, lines.iter().map(|l| format!("{l}\n")).collect::<String>()).unwrap();
    let log = dir.path().join("log.jsonl");
    let mut cfg: Config = toml::from_str(&format!(
        "[dkim.\"news.example.com\"]\nselector = \"rsa1\"\nkey_file = {:?}\n",
        data("rsa2048.pem")
    ))
    .unwrap();
    cfg.log = Some(log.clone());
    cfg.add_route(&format!("*={}", sink.addr())).unwrap();
    let summary = send_all(vec![path], cfg);
    sink.stop();
    assert_eq!(summary.count(Outcome::Delivered), 2);
    let f = common::finals(&common::read_log(&log));
    let hdr = &f[&("hdr".to_string(), "c@d0.test".to_string())];
    assert_eq!(hdr["outcome"], "bounced", "{hdr}");
    assert!(
        hdr["reply"]
            .as_str()
            .unwrap()
            .contains("cannot go in 7 bits: the message's headers have 8-bit octets"),
        "{hdr}"
    );
    let results = verify(&dump, &[record("rsa2048.pem", "rsa1", "news.example.com")]);
    assert_eq!(results.len(), 2);
    for (file, r) in &results {
        assert_eq!(r, &["ok"], "{file}");
        let text = std::fs::read(file).unwrap();
        assert!(text.is_ascii(), "{file}");
        let text = String::from_utf8(text).unwrap();
        assert!(
            text.contains("Content-Transfer-Encoding: quoted-printable\r\n"),
            "{text}"
        );
        assert!(text.contains("Caf=C3=A9 cr=C3=A8me"), "{text}");
    }
}
