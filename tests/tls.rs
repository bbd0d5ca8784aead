//! STARTTLS policies against `volley sink` on loopback: with and without TLS
//! offered, a certificate chain that verifies, one for the wrong name, and a
//! server that offers STARTTLS and then fails the handshake.

mod common;

use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use common::dns::{a, mx, serve};
use common::{finals, read_log};
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use serde_json::Value;
use volley::config::Config;
use volley::send::{Progress, SendOptions, send};
use volley::sink::{Sink, SinkCounts, SinkOptions};
use volley::tls::{TlsPolicy, server_config};

fn sink(listen: &str, tls: bool, fault: bool, cert: Option<(&Path, &Path)>) -> Sink {
    Sink::start(SinkOptions {
        listen: listen.parse().unwrap(),
        tls: tls.then(|| server_config(cert, "sink.volley.test").unwrap()),
        tls_fault: fault,
        ..Default::default()
    })
    .unwrap()
}

/// Sends one job to `rcpt` under `policy`; returns its final log record and every record.
fn deliver(rcpt: &str, policy: TlsPolicy, tune: impl FnOnce(&mut Config)) -> (Value, Vec<Value>) {
    let dir = tempfile::tempdir().unwrap();
    let spool = dir.path().join("s.jsonl");
    let jobs: Vec<String> = (0..3)
        .map(|i| serde_json::json!({"id": format!("t{i}"), "from": "news@sender.test", "to": [rcpt.replace('@', &format!("{i}@"))], "data": "Subject: tls\n\nhi\n"}).to_string())
        .collect();
    std::fs::write(&spool, jobs.join("\n")).unwrap();
    let log = dir.path().join("log.jsonl");
    let mut cfg = Config {
        shards: Some(1),
        log: Some(log.clone()),
        tls: policy,
        ..Config::default()
    };
    cfg.retry.initial = Duration::from_millis(50);
    cfg.retry.max_age = Duration::from_millis(500);
    cfg.idle_timeout = Duration::from_millis(200);
    cfg.max_connections_per_destination = 1;
    tune(&mut cfg);
    send(SendOptions {
        spools: vec![spool],
        config: cfg,
        progress: Progress::Off,
        stop: None,
        watch: None,
    })
    .unwrap();
    let records = read_log(&log);
    let f = finals(&records);
    assert_eq!(f.len(), 3, "{records:?}");
    let first = f[&("t0".to_string(), rcpt.replace('@', "0@"))].clone();
    for r in f.values() {
        assert_eq!(r["outcome"], first["outcome"], "all three jobs end alike: {records:?}");
    }
    (first, records)
}

fn routed(addr: SocketAddr) -> impl FnOnce(&mut Config) {
    move |c: &mut Config| c.add_route(&format!("*={addr}")).unwrap()
}

fn stop(s: Sink) -> SinkCounts {
    s.stop()
}

#[test]
fn policies_against_a_sink_that_offers_starttls() {
    for (policy, tls_expected) in [
        (TlsPolicy::Opportunistic, true),
        (TlsPolicy::Required, true),
        (TlsPolicy::Disabled, false),
    ] {
        let s = sink("127.0.0.1:0", true, false, None);
        let (r, _) = deliver("u@tls.test", policy, routed(s.addr()));
        let counts = stop(s);
        assert_eq!(r["outcome"], "delivered", "{policy}: {r}");
        if tls_expected {
            assert!(r["tls"].as_str().unwrap().starts_with("TLSv1."), "{policy}: {r}");
            assert!(counts.tls_sessions >= 1, "{policy}: {counts}");
        } else {
            assert!(r["tls"].is_null(), "{policy}: {r}");
            assert_eq!(counts.tls_sessions, 0, "{policy}");
        }
    }
    // verify: the sink's self-signed certificate is trusted by nobody.
    let s = sink("127.0.0.1:0", true, false, None);
    let (r, _) = deliver("u@tls.test", TlsPolicy::Verify, routed(s.addr()));
    stop(s);
    assert_eq!(r["outcome"], "expired", "{r}");
    assert!(r["reply"].as_str().unwrap().contains("TLS handshake failed"), "{r}");
}

#[test]
fn a_plain_sink_gets_plaintext_or_nothing() {
    let s = sink("127.0.0.1:0", false, false, None);
    let (r, _) = deliver("u@plain.test", TlsPolicy::Opportunistic, routed(s.addr()));
    assert_eq!(r["outcome"], "delivered");
    assert!(r["tls"].is_null());
    let (r, records) = deliver("u@plain.test", TlsPolicy::Required, routed(s.addr()));
    let counts = stop(s);
    assert_eq!(r["outcome"], "expired", "{r}");
    assert!(r["reply"].as_str().unwrap().contains("does not offer STARTTLS"), "{r}");
    assert!(records.iter().any(|r| r["outcome"] == "deferred"));
    assert_eq!(counts.messages, 3, "only the opportunistic run delivered");
}

#[test]
fn a_failed_handshake_falls_back_to_plaintext_only_when_opportunistic() {
    let s = sink("127.0.0.1:0", false, true, None);
    let (r, _) = deliver("u@broken.test", TlsPolicy::Opportunistic, |c| {
        routed(s.addr())(c);
        // Sessions end after each message, so the plaintext memory is what keeps later ones off TLS.
        c.max_messages_per_connection = 1;
    });
    let counts = stop(s);
    assert_eq!(r["outcome"], "delivered", "{r}");
    assert!(r["tls"].is_null());
    assert_eq!(r["attempt"], 1, "the retry in plaintext is not a deferral");
    assert_eq!(counts.messages, 3);
    assert_eq!(
        counts.sessions, 4,
        "one failed handshake, then three plaintext sessions: {counts}"
    );

    let s = sink("127.0.0.1:0", false, true, None);
    let (r, _) = deliver("u@broken.test", TlsPolicy::Required, routed(s.addr()));
    let counts = stop(s);
    assert_eq!(r["outcome"], "expired", "{r}");
    assert_eq!(counts.messages, 0);
}

/// A CA, and a server certificate for `name` signed by it, as PEM files in `dir`.
fn ca_and_leaf(dir: &Path, name: &str) -> (std::path::PathBuf, std::path::PathBuf, std::path::PathBuf) {
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
    let leaf_key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::new(vec![name.to_string()])
        .unwrap()
        .signed_by(&leaf_key, &ca)
        .unwrap();
    let (ca_pem, cert, key) = (dir.join("ca.pem"), dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&ca_pem, ca.pem()).unwrap();
    std::fs::write(&cert, leaf.pem()).unwrap();
    std::fs::write(&key, leaf_key.serialize_pem()).unwrap();
    (ca_pem, cert, key)
}

#[test]
fn verify_checks_the_chain_and_the_mx_host_name() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, cert, key) = ca_and_leaf(dir.path(), "mx.good.test");
    let dns = serve(vec![
        mx("good.test", 10, "mx.good.test"),
        a("mx.good.test", Ipv4Addr::new(127, 0, 0, 7)),
        mx("bad.test", 10, "mx.bad.test"),
        a("mx.bad.test", Ipv4Addr::new(127, 0, 0, 8)),
    ]);
    // Both serve the certificate for mx.good.test; only one is mx.good.test.
    let good = sink("127.0.0.7:0", true, false, Some((&cert, &key)));
    let port = good.addr().port();
    let bad = sink(&format!("127.0.0.8:{port}"), true, false, Some((&cert, &key)));
    let tune = |c: &mut Config| {
        c.dns.servers = vec![dns];
        c.mx_port = port;
        c.ca_file = Some(ca.clone());
    };
    let (r, _) = deliver("u@good.test", TlsPolicy::Verify, tune);
    assert_eq!(r["outcome"], "delivered", "{r}");
    assert!(r["tls"].as_str().unwrap().starts_with("TLSv1."));
    let (r, _) = deliver("u@bad.test", TlsPolicy::Verify, tune);
    assert_eq!(r["outcome"], "expired", "{r}");
    assert!(r["reply"].as_str().unwrap().contains("mx.bad.test"), "{r}");
    // Per-domain policy: bad.test accepts any certificate, so it goes out.
    let (r, _) = deliver("u@bad.test", TlsPolicy::Verify, |c| {
        tune(c);
        c.tls_policy.insert("bad.test".into(), TlsPolicy::Required);
    });
    assert_eq!(r["outcome"], "delivered", "{r}");
    stop(good);
    stop(bad);
}
