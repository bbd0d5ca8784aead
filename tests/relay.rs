//! Smarthost relay: AUTH PLAIN over STARTTLS, refusal of AUTH in plaintext
//! unless allowed, a wrong password (every recipient deferred, destination
//! paused), and implicit TLS as on port 465.

mod common;

use std::time::Duration;

use common::{finals, read_log};
use serde_json::Value;
use volley::collector::Summary;
use volley::config::{Config, RouteSpec};
use volley::outcome::Outcome;
use volley::send::{Progress, SendOptions, send};
use volley::sink::{Sink, SinkCounts, SinkOptions};
use volley::tls::server_config;

fn relay_sink(tls: bool, implicit: bool) -> Sink {
    Sink::start(SinkOptions {
        listen: "127.0.0.1:0".parse().unwrap(),
        tls: (tls || implicit).then(|| server_config(None, "relay.volley.test").unwrap()),
        implicit_tls: implicit,
        auth: Some(("mailer".into(), "right horse battery".into())),
        ..Default::default()
    })
    .unwrap()
}

/// Sends 5 jobs through the relay route `route` (TOML inline table) and returns what happened.
fn through(route: &str, password: &str, tune: impl FnOnce(&mut Config)) -> (Summary, Vec<Value>) {
    let dir = tempfile::tempdir().unwrap();
    let pass = dir.path().join("relay.pass");
    std::fs::write(&pass, format!("{password}\n")).unwrap();
    let route = route.replace("PASSFILE", &pass.display().to_string());
    let routes: Config = toml::from_str(&format!("[routes]\n\"*\" = {route}\n")).unwrap();
    assert!(matches!(routes.routes["*"], RouteSpec::Relay(_)));
    let spool = dir.path().join("s.jsonl");
    let jobs: Vec<String> = (0..5)
        .map(|i| serde_json::json!({"id": format!("r{i}"), "from": "news@sender.test", "to": [format!("u{i}@d{i}.test")], "data": "Subject: relay\n\nhi\n"}).to_string())
        .collect();
    std::fs::write(&spool, jobs.join("\n")).unwrap();
    let log = dir.path().join("log.jsonl");
    let mut cfg = Config {
        shards: Some(1),
        log: Some(log.clone()),
        routes: routes.routes,
        ..Config::default()
    };
    cfg.retry.initial = Duration::from_millis(50);
    cfg.retry.max_delay = Duration::from_millis(300);
    cfg.retry.max_age = Duration::from_millis(700);
    cfg.idle_timeout = Duration::from_millis(200);
    tune(&mut cfg);
    let summary = send(SendOptions {
        spools: vec![spool],
        config: cfg,
        progress: Progress::Off,
        stop: None,
        watch: None,
    })
    .unwrap();
    (summary, read_log(&log))
}

fn stop(s: Sink) -> SinkCounts {
    s.stop()
}

#[test]
fn auth_plain_after_starttls() {
    let s = relay_sink(true, false);
    let route = format!(
        "{{ host = \"{}\", auth = {{ user = \"mailer\", password_file = \"PASSFILE\" }} }}",
        s.addr()
    );
    let (summary, log) = through(&route, "right horse battery", |_| {});
    let counts = stop(s);
    assert_eq!(summary.count(Outcome::Delivered), 5, "{log:?}");
    assert_eq!(counts.messages, 5);
    assert!(counts.tls_sessions >= 1);
    assert!(finals(&log).values().all(|r| r["tls"].as_str().is_some()));
}

#[test]
fn a_wrong_password_defers_everything_and_pauses_the_relay() {
    let s = relay_sink(true, false);
    let route = format!(
        "{{ host = \"{}\", auth = {{ user = \"mailer\", password_file = \"PASSFILE\" }} }}",
        s.addr()
    );
    let (summary, log) = through(&route, "wrong", |_| {});
    let counts = stop(s);
    assert_eq!(summary.count(Outcome::Expired), 5);
    assert_eq!(counts.messages, 0);
    let deferred: Vec<&Value> = log.iter().filter(|r| r["outcome"] == "deferred").collect();
    assert!(!deferred.is_empty());
    assert!(
        deferred.iter().all(|r| r["reply"].as_str().unwrap().contains("535")),
        "every deferral names the refusal: {deferred:?}"
    );
    // Paused for retry.max_delay (300 ms) after each refusal: a handful of sessions, not one per retry.
    assert!(counts.sessions <= 4, "{counts}");
}

#[test]
fn no_auth_in_plaintext_unless_allowed() {
    let s = relay_sink(false, false);
    let route = format!(
        "{{ host = \"{}\", auth = {{ user = \"mailer\", password_file = \"PASSFILE\" }} }}",
        s.addr()
    );
    let (summary, log) = through(&route, "right horse battery", |_| {});
    assert_eq!(summary.count(Outcome::Expired), 5);
    assert!(
        log.iter()
            .any(|r| r["reply"].as_str().unwrap_or("").contains("AUTH needs TLS")),
        "{log:?}"
    );
    let route = format!(
        "{{ host = \"{}\", allow_plaintext_auth = true, auth = {{ user = \"mailer\", password_file = \"PASSFILE\" }} }}",
        s.addr()
    );
    let (summary, _) = through(&route, "right horse battery", |_| {});
    assert_eq!(summary.count(Outcome::Delivered), 5);
    assert_eq!(stop(s).messages, 5);
}

#[test]
fn implicit_tls_like_port_465() {
    let s = relay_sink(true, true);
    let route = format!(
        "{{ host = \"{}\", implicit_tls = true, auth = {{ user = \"mailer\", password_file = \"PASSFILE\" }} }}",
        s.addr()
    );
    let (summary, log) = through(&route, "right horse battery", |_| {});
    let counts = stop(s);
    assert_eq!(summary.count(Outcome::Delivered), 5, "{log:?}");
    assert_eq!(counts.tls_sessions, counts.sessions);
    assert!(
        finals(&log)
            .values()
            .all(|r| r["tls"].as_str().is_some_and(|t| t.starts_with("TLSv1.")))
    );
}
