//! Hostile servers: each one misbehaves in its own way, and every recipient
//! must still end deferred (then expired) with a reason, without volley
//! hanging or growing without bound.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::Duration;

use common::{finals, read_log};
use volley::config::Config;
use volley::outcome::Outcome;
use volley::send::{Progress, SendOptions, send};

/// Serves every connection with `script` on a thread; returns the address.
fn server(script: fn(TcpStream)) -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            std::thread::spawn(move || script(conn));
        }
    });
    addr
}

/// Reads one command line from the client.
fn line(r: &mut BufReader<TcpStream>) -> String {
    let mut s = String::new();
    let _ = r.read_line(&mut s);
    s
}

/// Greets, answers EHLO with PIPELINING, and returns the reader for more.
fn greet(conn: TcpStream) -> (BufReader<TcpStream>, TcpStream) {
    let mut w = conn.try_clone().unwrap();
    let mut r = BufReader::new(conn);
    let _ = w.write_all(b"220 hostile.test ESMTP\r\n");
    line(&mut r);
    let _ = w.write_all(b"250-hostile.test\r\n250 PIPELINING\r\n");
    (r, w)
}

/// Runs a send of one recipient to `addr` with short timeouts; returns its final record.
fn deliver(addr: std::net::SocketAddr, body: &str) -> serde_json::Value {
    let dir = tempfile::tempdir().unwrap();
    let spool = dir.path().join("s.jsonl");
    let job = serde_json::json!({"id": "h", "from": "a@sender.test", "to": ["r@victim.test"], "data": body});
    std::fs::write(&spool, format!("{job}\n")).unwrap();
    let log = dir.path().join("log.jsonl");
    let mut cfg = Config {
        shards: Some(1),
        log: Some(log.clone()),
        ..Config::default()
    };
    cfg.add_route(&format!("*={addr}")).unwrap();
    let t = Duration::from_millis(400);
    cfg.timeouts.greeting = t;
    cfg.timeouts.ehlo = t;
    cfg.timeouts.mail = t;
    cfg.timeouts.rcpt = t;
    cfg.timeouts.data_init = t;
    cfg.timeouts.data_block = t;
    cfg.timeouts.data_term = t;
    cfg.timeouts.quit = t;
    cfg.retry.initial = Duration::from_millis(50);
    // Long enough that a first attempt on a loaded machine (a 36 MB body in a
    // debug build) still ends deferred, not expired.
    cfg.retry.max_age = Duration::from_millis(4000);
    let summary = send(SendOptions {
        spools: vec![spool],
        config: cfg,
        progress: Progress::Off,
        stop: None,
        watch: None,
    })
    .unwrap();
    assert_eq!(
        summary.count(Outcome::Expired),
        1,
        "{}",
        std::fs::read_to_string(&log).unwrap()
    );
    let records = read_log(&log);
    assert!(records.iter().any(|r| r["outcome"] == "deferred"), "{records:?}");
    finals(&records).into_values().next().unwrap()
}

fn reason(r: &serde_json::Value) -> String {
    r["reply"].as_str().unwrap_or_default().to_string()
}

#[test]
fn a_reply_line_of_a_megabyte() {
    let addr = server(|conn| {
        let mut w = conn.try_clone().unwrap();
        let mut r = BufReader::new(conn);
        let _ = w.write_all(b"220 hostile.test\r\n");
        line(&mut r);
        let _ = w.write_all(b"250 ");
        let _ = w.write_all(&vec![b'x'; 1 << 20]);
        let _ = w.write_all(b"\r\n");
    });
    let r = deliver(addr, "x\n");
    assert!(reason(&r).contains("reply line longer than"), "{r}");
}

#[test]
fn a_multi_line_reply_that_never_ends() {
    let addr = server(|conn| {
        let mut w = conn.try_clone().unwrap();
        let mut r = BufReader::new(conn);
        let _ = w.write_all(b"220 hostile.test\r\n");
        line(&mut r);
        for _ in 0..100_000 {
            if w.write_all(b"250-more and more\r\n").is_err() {
                return;
            }
        }
    });
    let r = deliver(addr, "x\n");
    assert!(reason(&r).contains("reply of more than"), "{r}");
}

#[test]
fn bytes_that_are_not_a_reply() {
    let addr = server(|mut conn| {
        let _ = conn.write_all(b"\x00\xff\xfe this is not SMTP\r\n");
        let _ = conn.read(&mut [0; 64]);
    });
    let r = deliver(addr, "x\n");
    assert!(reason(&r).contains("malformed reply line"), "{r}");
}

#[test]
fn a_greeting_that_never_comes() {
    let addr = server(|mut conn| {
        let _ = conn.read(&mut [0; 64]);
        std::thread::sleep(Duration::from_secs(3));
    });
    let r = deliver(addr, "x\n");
    assert!(
        reason(&r).contains("timed out") && reason(&r).contains("Greeting"),
        "{r}"
    );
}

#[test]
fn a_server_that_stops_reading_makes_the_write_time_out() {
    let addr = server(|conn| {
        let (mut r, mut w) = greet(conn);
        for _ in 0..3 {
            line(&mut r); // MAIL, RCPT, DATA
        }
        let _ = w.write_all(b"250 ok\r\n250 ok\r\n354 go\r\n");
        // Never read again: the client's body fills every buffer.
        std::thread::sleep(Duration::from_secs(5));
        drop(r);
    });
    let big = "y".repeat(900) + "\n";
    let body = big.repeat(40_000); // 36 MB: more than the socket buffers hold
    let r = deliver(addr, &body);
    assert!(
        reason(&r).contains("write to") || reason(&r).contains("timed out"),
        "{r}"
    );
}

#[test]
fn a_354_then_a_disconnect() {
    let addr = server(|conn| {
        let (mut r, mut w) = greet(conn);
        for _ in 0..3 {
            line(&mut r);
        }
        let _ = w.write_all(b"250 ok\r\n250 ok\r\n354 go\r\n");
        drop(w);
        drop(r);
    });
    let r = deliver(addr, "x\n");
    assert!(r["code"].is_null() && !reason(&r).is_empty(), "{r}");
}

#[test]
fn a_250_to_data_instead_of_354() {
    let addr = server(|conn| {
        let (mut r, mut w) = greet(conn);
        for _ in 0..3 {
            line(&mut r);
        }
        let _ = w.write_all(b"250 ok\r\n250 ok\r\n250 ok\r\n");
        loop {
            let l = line(&mut r);
            if l.is_empty() {
                return;
            }
            let _ = w.write_all(if l.starts_with("QUIT") {
                b"221 bye\r\n"
            } else {
                b"250 ok\r\n"
            });
        }
    });
    let r = deliver(addr, "x\n");
    assert_eq!(r["code"], 250, "{r}");
    assert_eq!(r["outcome"], "expired");
}
