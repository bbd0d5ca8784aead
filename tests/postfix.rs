//! Interop with servers nobody here wrote: Debian's Postfix `smtp-sink`
//! (message bodies compared byte for byte through its dump) and a real
//! Postfix `smtpd` that refuses any pipelining mistake or bare newline.
//! Needs the postfix package and root (`.ci/run` provides both).

mod common;

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::{finals, read_log};
use volley::config::Config;
use volley::outcome::Outcome;
use volley::send::{Progress, SendOptions, send};
use volley::tls::TlsPolicy;

/// Bodies that exercise the wire encoding: dots, bare LF, lone CR, long lines, 8-bit, no final newline.
fn tricky_bodies() -> Vec<String> {
    vec![
        "Subject: dots\n\n.\n..\n.x\n...\nend".to_string(),
        "Subject: crlf mix\r\n\r\nwindows\r\nunix\nold mac\rlast\r\n".to_string(),
        format!("Subject: long\n\n{}\n.{}\n", "L".repeat(998), "M".repeat(997)),
        "Subject: caf\u{e9}\nContent-Type: text/plain; charset=utf-8\nContent-Transfer-Encoding: 8bit\n\nna\u{ef}ve \u{2603}\n".to_string(),
        "Subject: empty body\n\n".to_string(),
    ]
}

/// The body as a server sees it after unstuffing, with LF line ends.
fn expected_lf(body: &str) -> String {
    let mut out = String::new();
    for line in body.replace("\r\n", "\n").replace('\r', "\n").split_inclusive('\n') {
        out.push_str(line.trim_end_matches('\n'));
        out.push('\n');
    }
    out
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn wait_listening(addr: SocketAddr) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(addr).is_err() {
        assert!(Instant::now() < deadline, "nothing listens on {addr}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

struct Kill(Child);
impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn require(bin: &str) {
    assert!(
        Path::new(bin).exists(),
        "{bin} is missing: install Debian's postfix package (see .ci/run)"
    );
}

fn config(route: String, log: &Path) -> Config {
    let mut c = Config {
        shards: Some(2),
        log: Some(log.to_path_buf()),
        ..Config::default()
    };
    c.add_route(&route).unwrap();
    c.retry.initial = Duration::from_millis(50);
    c.idle_timeout = Duration::from_millis(300);
    c
}

#[test]
fn smtp_sink_dump_matches_the_source_bodies_byte_for_byte() {
    require("/usr/sbin/smtp-sink");
    let dir = tempfile::tempdir().unwrap();
    let dump = dir.path().join("dump");
    std::fs::create_dir(&dump).unwrap();
    std::os::unix::fs::chown(&dump, Some(65534), None).unwrap();
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let _sink = Kill(
        Command::new("/usr/sbin/smtp-sink")
            .args(["-u", "nobody", "-d"])
            .arg(format!("{}/", dump.display()))
            .arg(addr.to_string())
            .arg("1024")
            .spawn()
            .unwrap(),
    );
    wait_listening(addr);
    let bodies = tricky_bodies();
    let mut lines = String::new();
    for (i, b) in bodies.iter().enumerate() {
        let job = serde_json::json!({"id": format!("b{i}"), "from": "news@sender.test", "to": [format!("r{i}@a.test"), format!("r{i}@b.test")], "data": b});
        lines += &format!("{job}\n");
    }
    let spool = dir.path().join("s.jsonl");
    std::fs::write(&spool, lines).unwrap();
    let log = dir.path().join("log.jsonl");
    let summary = send(SendOptions {
        spools: vec![spool],
        config: config(format!("*={addr}"), &log),
        progress: Progress::Off,
        stop: None,
        watch: None,
    })
    .unwrap();
    assert_eq!(summary.count(Outcome::Delivered), 2 * bodies.len() as u64);
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut seen = 0;
    loop {
        let files: Vec<_> = std::fs::read_dir(&dump).unwrap().map(|e| e.unwrap().path()).collect();
        if files.len() == 2 * bodies.len() || Instant::now() > deadline {
            for f in &files {
                let text = std::fs::read(f).unwrap();
                let text = String::from_utf8(text).unwrap();
                let rcpt = text
                    .lines()
                    .find_map(|l| l.strip_prefix("X-Rcpt-Args: <r"))
                    .expect("dump names its recipient");
                let i: usize = rcpt[..rcpt.find('@').unwrap()].parse().unwrap();
                // Skip smtp-sink's own headers: X-* lines, then its Received: header and continuation lines.
                let start = text.find("Received: ").expect("smtp-sink adds Received:");
                let after = &text[start..];
                let mut body_at = 0;
                for (n, line) in after.split_inclusive('\n').enumerate() {
                    if n > 0 && !line.starts_with('\t') {
                        break;
                    }
                    body_at += line.len();
                }
                let body = &after[body_at..];
                let want = expected_lf(&bodies[i]);
                assert_eq!(
                    body.strip_suffix('\n'),
                    Some(want.as_str()),
                    "body {i} in {}",
                    f.display()
                );
                seen += 1;
            }
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(seen, 2 * bodies.len());
}

static POSTFIX: Mutex<bool> = Mutex::new(false);

fn strict_postfix() {
    require("/usr/sbin/postfix");
    let mut ready = POSTFIX.lock().unwrap();
    if !*ready {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/postfix/strict-smtpd.sh");
        let status = Command::new("bash").arg(script).status().unwrap();
        assert!(status.success(), "{script} failed (it needs root and postfix)");
        *ready = true;
    }
}

const STRICT_LOG: &str = "/var/log/postfix-strict.log";

fn log_len() -> u64 {
    std::fs::metadata(STRICT_LOG).map(|m| m.len()).unwrap_or(0)
}

/// Sends 360 recipients through the strict smtpd on `port`; `bdat` says
/// whether volley may use CHUNKING (port 10025 offers it with PIPELINING).
fn strict_run(port: u16, name: &str, tls: TlsPolicy, bdat: bool) {
    strict_postfix();
    let dir = tempfile::tempdir().unwrap();
    let bodies = tricky_bodies();
    let mut lines = String::new();
    let mut n = 0;
    for j in 0..120 {
        let to: Vec<String> = (0..3)
            .map(|k| {
                n += 1;
                format!("u{n}@d{}.test", (j + k) % 7)
            })
            .collect();
        let job = serde_json::json!({"id": format!("{name}{j}"), "from": if j % 10 == 0 { "" } else { "news@sender.test" }, "to": to, "data": bodies[j % bodies.len()]});
        lines += &format!("{job}\n");
    }
    let spool = dir.path().join("s.jsonl");
    std::fs::write(&spool, lines).unwrap();
    let log = dir.path().join("log.jsonl");
    let before = log_len();
    let mut cfg = config(format!("*=127.0.0.1:{port}"), &log);
    cfg.max_connections_per_destination = 4;
    cfg.tls = tls;
    cfg.chunking = bdat;
    let summary = send(SendOptions {
        spools: vec![spool],
        config: cfg,
        progress: Progress::Off,
        stop: None,
        watch: None,
    })
    .unwrap();
    let f = finals(&read_log(&log));
    let not_delivered: Vec<_> = f.values().filter(|r| r["outcome"] != "delivered").collect();
    assert!(not_delivered.is_empty(), "{name}: {not_delivered:?}");
    assert_eq!(summary.count(Outcome::Delivered), 360);
    // Postfix says how it took the message: "Ok: N bytes queued as" to BDAT, "Ok: queued as" to DATA.
    let by_bdat = f
        .values()
        .filter(|r| r["reply"].as_str().is_some_and(|t| t.contains(" bytes queued as ")))
        .count();
    let expect_bdat = bdat && port == 10025;
    assert_eq!(
        by_bdat,
        if expect_bdat { 360 } else { 0 },
        "{name}: BDAT used: {expect_bdat}"
    );
    let with_tls = f
        .values()
        .filter(|r| r["tls"].as_str().is_some_and(|t| t.starts_with("TLSv1.")))
        .count();
    assert_eq!(
        with_tls,
        if tls == TlsPolicy::Disabled { 0 } else { 360 },
        "{name}: TLS on every delivery or none"
    );
    assert_eq!(
        summary.count(Outcome::Deferred),
        0,
        "{name}: nothing was refused, not even for a while"
    );
    let text = std::fs::read(STRICT_LOG).unwrap();
    let new = String::from_utf8_lossy(&text[before as usize..]);
    for bad in [
        "improper command pipelining",
        "bare <LF>",
        "bare newline",
        "synchronization",
    ] {
        assert!(!new.contains(bad), "{name}: postfix logged {bad:?}:\n{new}");
    }
}

#[test]
fn strict_postfix_smtpd_accepts_volley_pipelining() {
    strict_run(10025, "pipelined", TlsPolicy::Disabled, false);
}

#[test]
fn strict_postfix_smtpd_accepts_bdat_windows() {
    strict_run(10025, "bdat", TlsPolicy::Disabled, true);
}

#[test]
fn strict_postfix_smtpd_with_starttls_required() {
    strict_run(10025, "starttls", TlsPolicy::Required, true);
}

#[test]
fn strict_postfix_smtpd_without_pipelining_gets_lock_step() {
    // CHUNKING is still offered there: without PIPELINING volley uses DATA.
    strict_run(10026, "lockstep", TlsPolicy::Opportunistic, true);
}

/// 8-bit and UTF-8 mail into the strict smtpd (it offers 8BITMIME and
/// SMTPUTF8): a UTF-8 local part goes with SMTPUTF8, a UTF-8 domain after
/// an ASCII local part as its A-label, an 8-bit body with BODY=8BITMIME;
/// all delivered, over DATA and over BDAT.
#[test]
fn strict_postfix_smtpd_takes_8bit_and_utf8_mail() {
    strict_postfix();
    for (port, bdat) in [(10025, true), (10025, false)] {
        let dir = tempfile::tempdir().unwrap();
        let jobs = [
            serde_json::json!({"id": "u1", "from": "news@sender.test", "to": ["j\u{f6}rg@d1.test", "plain@d1.test"],
                "data": "Subject: =?UTF-8?Q?Gr=C3=BC=C3=9Fe?=\nMIME-Version: 1.0\nContent-Type: text/plain; charset=utf-8\nContent-Transfer-Encoding: 8bit\n\nCaf\u{e9} cr\u{e8}me, \u{fc}ber alles.\n"}),
            serde_json::json!({"id": "u2", "from": "n\u{e9}ws@sender.test", "to": ["leser@b\u{fc}cher.test"], "data": "Subject: hi\n\nplain\n"}),
        ];
        let spool = dir.path().join("u.jsonl");
        std::fs::write(&spool, jobs.iter().map(|j| format!("{j}\n")).collect::<String>()).unwrap();
        let log = dir.path().join("log.jsonl");
        let before = log_len();
        let mut cfg = config(format!("*=127.0.0.1:{port}"), &log);
        cfg.chunking = bdat;
        cfg.tls = TlsPolicy::Disabled;
        let summary = send(SendOptions {
            spools: vec![spool],
            config: cfg,
            progress: Progress::Off,
            stop: None,
            watch: None,
        })
        .unwrap();
        let f = finals(&read_log(&log));
        let not_delivered: Vec<_> = f.values().filter(|r| r["outcome"] != "delivered").collect();
        assert!(not_delivered.is_empty(), "bdat {bdat}: {not_delivered:?}");
        assert_eq!(summary.count(Outcome::Delivered), 3);
        let text = std::fs::read(STRICT_LOG).unwrap();
        let new = String::from_utf8_lossy(&text[before as usize..]);
        for bad in ["reject:", "improper command pipelining", "bare newline", "SMTPUTF8"] {
            assert!(!new.contains(bad), "bdat {bdat}: postfix logged {bad:?}:\n{new}");
        }
    }
}
