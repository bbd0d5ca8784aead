//! Merge fields (spool v2): a personalised job's message is rendered per
//! recipient, each in a transaction of its own, DKIM-signed per copy; a
//! template that does not compile rejects its job at ingest, a missing
//! variable bounces only its recipient; v1 jobs beside them are untouched.

mod common;

use std::path::Path;

use common::{finals, read_log, send_all};
use volley::config::Config;
use volley::outcome::Outcome;
use volley::sink::{Sink, SinkOptions};

fn data(name: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/dkim").join(name)
}

#[test]
fn a_template_is_rendered_per_recipient_and_errors_stay_with_their_job_or_recipient() {
    let dir = tempfile::tempdir().unwrap();
    let dump = dir.path().join("dump");
    let sink = Sink::start(SinkOptions {
        listen: "127.0.0.1:0".parse().unwrap(),
        dump: Some(dump.clone()),
        ..Default::default()
    })
    .unwrap();
    std::fs::write(
        dir.path().join("t.eml"),
        "From: news@news.example.com\nTo: {{ rcpt }}\nSubject: Hello {{ name }}\n\nDear {{ name }},\nyour code is {{ code }} ({{ rcpt_local }} at {{ rcpt_domain }}).\n",
    )
    .unwrap();
    std::fs::write(dir.path().join("bad.eml"), "Subject: x\n\n{% if %}\n").unwrap();
    std::fs::write(dir.path().join("plain.eml"), "Subject: plain {{ not a field }}\n\nv1\n").unwrap();
    let lines = [
        serde_json::json!({"id": "news", "from": "b@news.example.com", "message": "t.eml", "vars": {"code": "X7", "name": "reader"},
            "to": [{"rcpt": "ann@d0.test", "vars": {"name": "Ann"}}, {"rcpt": "bob@d0.test", "vars": {"name": "Bob"}}, "cy@d1.test"]}),
        serde_json::json!({"id": "missing", "from": "b@news.example.com", "message": "t.eml",
            "to": [{"rcpt": "dan@d0.test", "vars": {"name": "Dan", "code": "D1"}}, {"rcpt": "eve@d0.test", "vars": {"name": "Eve"}}]}),
        serde_json::json!({"id": "syntax", "from": "b@news.example.com", "message": "bad.eml", "template": true, "to": ["fay@d0.test"]}),
        serde_json::json!({"id": "inline", "from": "b@news.example.com", "data": "From: news@news.example.com\nSubject: {{ id }}\n\nfor {{ rcpt }}\n", "template": true, "to": ["gus@d1.test"]}),
        serde_json::json!({"id": "v1", "from": "b@news.example.com", "message": "plain.eml", "to": ["hal@d0.test", "ivy@d0.test"]}),
    ];
    let path = dir.path().join("p.jsonl");
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
    let counts = sink.stop();
    let f = finals(&read_log(&log));
    let outcome = |id: &str, rcpt: &str| f[&(id.to_string(), rcpt.to_string())].clone();
    for (id, rcpt) in [
        ("news", "ann@d0.test"),
        ("news", "bob@d0.test"),
        ("news", "cy@d1.test"),
        ("missing", "dan@d0.test"),
        ("inline", "gus@d1.test"),
        ("v1", "hal@d0.test"),
        ("v1", "ivy@d0.test"),
    ] {
        assert_eq!(outcome(id, rcpt)["outcome"], "delivered", "{id} {rcpt}");
    }
    let eve = outcome("missing", "eve@d0.test");
    assert_eq!(
        (eve["outcome"].as_str(), eve["enhanced"].as_str()),
        (Some("bounced"), Some("5.6.0")),
        "{eve}"
    );
    let why = eve["reply"].as_str().unwrap();
    assert!(
        why.starts_with("p.jsonl:2: template: ") && why.contains("undefined"),
        "{why}"
    );
    let fay = outcome("syntax", "fay@d0.test");
    assert_eq!(fay["outcome"], "rejected", "{fay}");
    let why = fay["reply"].as_str().unwrap();
    assert!(
        why.contains("p.jsonl:3: template: ") && why.contains("syntax error"),
        "{why}"
    );
    assert_eq!(summary.count(Outcome::Delivered), 7);
    // One message per personalised recipient; the v1 job's two share one.
    assert_eq!(counts.messages, 6);
    let mut texts: Vec<String> = std::fs::read_dir(&dump)
        .unwrap()
        .map(|e| std::fs::read_to_string(e.unwrap().path()).unwrap())
        .collect();
    texts.sort();
    let of = |rcpt: &str| {
        texts
            .iter()
            .find(|t| t.contains(&format!("X-Rcpt-To: <{rcpt}>")))
            .unwrap()
    };
    assert!(of("ann@d0.test").contains("Subject: Hello Ann\r\n"));
    assert!(of("ann@d0.test").contains("\r\nDear Ann,\r\nyour code is X7 (ann at d0.test).\r\n"));
    assert!(of("bob@d0.test").contains("\r\nTo: bob@d0.test\r\n"));
    assert!(of("cy@d1.test").contains("Dear reader,"), "the job's vars");
    assert!(
        of("dan@d0.test").contains("your code is D1"),
        "the recipient's over the job's"
    );
    assert!(of("gus@d1.test").contains("Subject: inline\r\n\r\nfor gus@d1.test\r\n"));
    let v1 = of("hal@d0.test");
    assert!(
        v1.contains("X-Rcpt-To: <ivy@d0.test>") && v1.contains("Subject: plain {{ not a field }}"),
        "{v1}"
    );
    // Every personalised copy has its own signature, and it verifies.
    let rec = common::dkim_record(&data("rsa2048.pem"), "rsa1", "news.example.com");
    let files: Vec<_> = std::fs::read_dir(&dump).unwrap().map(|e| e.unwrap().path()).collect();
    let out = common::dkim_verify(&[rec], &files);
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{said}{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(said.lines().filter(|l| l.ends_with(" ok")).count(), 5, "{said}");
    assert_eq!(
        said.lines().filter(|l| l.ends_with(" unsigned")).count(),
        1,
        "the v1 message has no From: {said}"
    );
}

/// VERP: each recipient's envelope sender from a template, in a
/// transaction of its own; a template that makes no address bounces its
/// recipient saying so.
#[test]
fn verp_gives_each_recipient_its_own_envelope_sender() {
    let dir = tempfile::tempdir().unwrap();
    let dump = dir.path().join("dump");
    let sink = Sink::start(SinkOptions {
        listen: "127.0.0.1:0".parse().unwrap(),
        dump: Some(dump.clone()),
        ..Default::default()
    })
    .unwrap();
    std::fs::write(dir.path().join("m.eml"), "Subject: v\n\nbody {{ untouched }}\n").unwrap();
    let lines = [
        serde_json::json!({"id": "verp", "from": "bounces@news.example.com", "message": "m.eml",
            "verp": "bounces+{{ rcpt_local }}={{ rcpt_domain }}@news.example.com", "to": ["jo@d0.test", "kim@d1.test", "lee@d0.test"]}),
        serde_json::json!({"id": "bad", "from": "bounces@news.example.com", "message": "m.eml",
            "verp": "{{ rcpt_local }} at news", "to": ["max@d0.test"]}),
    ];
    let path = dir.path().join("v.jsonl");
    std::fs::write(&path, lines.iter().map(|l| format!("{l}\n")).collect::<String>()).unwrap();
    let log = dir.path().join("log.jsonl");
    let mut cfg = Config {
        log: Some(log.clone()),
        ..Config::default()
    };
    cfg.add_route(&format!("*={}", sink.addr())).unwrap();
    let summary = send_all(vec![path], cfg);
    let counts = sink.stop();
    assert_eq!(summary.count(Outcome::Delivered), 3);
    assert_eq!(counts.messages, 3, "one transaction per recipient");
    let mut froms: Vec<String> = std::fs::read_dir(&dump)
        .unwrap()
        .map(|e| {
            let t = std::fs::read_to_string(e.unwrap().path()).unwrap();
            assert!(t.contains("body {{ untouched }}"), "the message is not a template: {t}");
            let from = t.lines().find(|l| l.starts_with("X-Mail-From:")).unwrap().to_string();
            let to = t.lines().find(|l| l.starts_with("X-Rcpt-To:")).unwrap().to_string();
            format!("{from} {to}")
        })
        .collect();
    froms.sort();
    assert_eq!(
        froms,
        [
            "X-Mail-From: <bounces+jo=d0.test@news.example.com> X-Rcpt-To: <jo@d0.test>",
            "X-Mail-From: <bounces+kim=d1.test@news.example.com> X-Rcpt-To: <kim@d1.test>",
            "X-Mail-From: <bounces+lee=d0.test@news.example.com> X-Rcpt-To: <lee@d0.test>",
        ]
    );
    let f = finals(&read_log(&log));
    let max = &f[&("bad".to_string(), "max@d0.test".to_string())];
    assert_eq!(max["outcome"], "bounced", "{max}");
    assert!(
        max["reply"]
            .as_str()
            .unwrap()
            .starts_with("v.jsonl:2: \"verp\" made the sender \"max at news\""),
        "{max}"
    );
}

/// `verp` in the configuration: every job without its own gets it; a
/// job's own wins; a template without fields is refused by its key.
#[test]
fn the_configuration_s_verp_is_every_job_s_unless_it_has_its_own() {
    let dir = tempfile::tempdir().unwrap();
    let dump = dir.path().join("dump");
    let sink = Sink::start(SinkOptions {
        listen: "127.0.0.1:0".parse().unwrap(),
        dump: Some(dump.clone()),
        ..Default::default()
    })
    .unwrap();
    std::fs::write(dir.path().join("m.eml"), "Subject: v\n\nbody\n").unwrap();
    let lines = [
        serde_json::json!({"id": "a", "from": "news@lists.example.com", "message": "m.eml", "to": ["jo@d0.test", "kim@d0.test"]}),
        serde_json::json!({"id": "b", "from": "bounces@news.example.com", "message": "m.eml",
            "verp": "own+{{ rcpt_local }}@news.example.com", "to": ["lee@d1.test"]}),
    ];
    let path = dir.path().join("v.jsonl");
    std::fs::write(&path, lines.iter().map(|l| format!("{l}\n")).collect::<String>()).unwrap();
    let mut cfg: Config =
        toml::from_str("verp = \"{{ from_local }}+{{ rcpt_local }}={{ rcpt_domain }}@{{ from_domain }}\"\n").unwrap();
    cfg.validate().unwrap();
    cfg.add_route(&format!("*={}", sink.addr())).unwrap();
    let summary = send_all(vec![path], cfg);
    let counts = sink.stop();
    assert_eq!(summary.count(Outcome::Delivered), 3);
    assert_eq!(counts.messages, 3, "a transaction per recipient");
    let mut froms: Vec<String> = dumped(&dump)
        .iter()
        .map(|t| {
            let from = t.lines().find(|l| l.starts_with("X-Mail-From:")).unwrap();
            let to = t.lines().find(|l| l.starts_with("X-Rcpt-To:")).unwrap();
            format!("{from} {to}")
        })
        .collect();
    froms.sort();
    assert_eq!(
        froms,
        [
            "X-Mail-From: <news+jo=d0.test@lists.example.com> X-Rcpt-To: <jo@d0.test>",
            "X-Mail-From: <news+kim=d0.test@lists.example.com> X-Rcpt-To: <kim@d0.test>",
            "X-Mail-From: <own+lee@news.example.com> X-Rcpt-To: <lee@d1.test>",
        ]
    );
    for (text, want) in [
        ("verp = \"bounces@news.example.com\"\n", "has no fields"),
        ("verp = \"{{ rcpt_local \"\n", "verp: template: "),
    ] {
        let cfg: Config = toml::from_str(text).unwrap();
        let err = format!("{:#}", cfg.validate().unwrap_err());
        assert!(err.contains(want), "{text}: {err}");
    }
}

fn dumped(dump: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dump)
        .unwrap()
        .map(|e| std::fs::read_to_string(e.unwrap().path()).unwrap())
        .collect();
    v.sort();
    v
}

fn header<'a>(msg: &'a str, name: &str) -> Option<&'a str> {
    msg.lines()
        .take_while(|l| !l.is_empty())
        .find_map(|l| l.strip_prefix(&format!("{name}: ")))
}

/// `[headers]`: Message-ID and Date where missing, List-Unsubscribe per
/// recipient with the one-click header, all inside the DKIM signature.
#[test]
fn headers_are_added_on_request_per_recipient_and_signed() {
    let dir = tempfile::tempdir().unwrap();
    let dump = dir.path().join("dump");
    let sink = Sink::start(SinkOptions {
        listen: "127.0.0.1:0".parse().unwrap(),
        dump: Some(dump.clone()),
        ..Default::default()
    })
    .unwrap();
    std::fs::write(
        dir.path().join("n.eml"),
        "From: news@news.example.com\nSubject: n\n\nbody\n",
    )
    .unwrap();
    std::fs::write(
        dir.path().join("own.eml"),
        "From: news@news.example.com\nMessage-ID: <mine@news.example.com>\nSubject: own\n\nbody\n",
    )
    .unwrap();
    let lines = [
        serde_json::json!({"id": "a", "from": "b@news.example.com", "message": "n.eml", "to": ["ann@d0.test", "bob@d0.test"]}),
        serde_json::json!({"id": "b", "from": "b@news.example.com", "message": "own.eml", "to": ["cy@d0.test"],
            "list_unsubscribe": "<mailto:stop@news.example.com>"}),
    ];
    let path = dir.path().join("h.jsonl");
    std::fs::write(&path, lines.iter().map(|l| format!("{l}\n")).collect::<String>()).unwrap();
    let mut cfg: Config = toml::from_str(&format!(
        "[dkim.\"news.example.com\"]\nkeys = [{{ selector = \"rsa1\", key_file = {:?} }}, {{ selector = \"ed1\", key_file = {:?} }}]\n[headers]\nmessage_id = true\ndate = true\nlist_unsubscribe = \"<https://news.example.com/u?r={{{{ rcpt }}}}>, <mailto:u+{{{{ rcpt_local }}}}={{{{ rcpt_domain }}}}@news.example.com>\"\n",
        data("rsa2048.pem"),
        data("ed25519.pem")
    ))
    .unwrap();
    cfg.validate().unwrap();
    cfg.add_route(&format!("*={}", sink.addr())).unwrap();
    let summary = send_all(vec![path], cfg);
    let counts = sink.stop();
    assert_eq!(summary.count(Outcome::Delivered), 3);
    assert_eq!(counts.messages, 3, "a List-Unsubscribe per recipient: a copy each");
    let msgs = dumped(&dump);
    let of = |rcpt: &str| {
        msgs.iter()
            .find(|m| m.contains(&format!("X-Rcpt-To: <{rcpt}>")))
            .unwrap()
    };
    let ann = of("ann@d0.test");
    assert_eq!(
        header(ann, "List-Unsubscribe"),
        Some("<https://news.example.com/u?r=ann@d0.test>, <mailto:u+ann=d0.test@news.example.com>")
    );
    assert_eq!(header(ann, "List-Unsubscribe-Post"), Some("List-Unsubscribe=One-Click"));
    assert!(header(ann, "Date").is_some_and(|d| d.ends_with("+0000")), "{ann}");
    let ann_id = header(ann, "Message-ID").unwrap();
    assert!(ann_id.ends_with(".volley@news.example.com>"), "{ann}");
    assert_ne!(
        Some(ann_id),
        header(of("bob@d0.test"), "Message-ID"),
        "a copy each, an id each"
    );
    let cy = of("cy@d0.test");
    assert_eq!(
        header(cy, "Message-ID"),
        Some("<mine@news.example.com>"),
        "the message's own kept"
    );
    assert_eq!(
        header(cy, "List-Unsubscribe"),
        Some("<mailto:stop@news.example.com>"),
        "the job's over the configuration's"
    );
    // Inside the signature: h= names them, and it verifies.
    let sig: String = ann
        .lines()
        .skip_while(|l| !l.starts_with("DKIM-Signature:"))
        .take_while(|l| l.starts_with("DKIM-Signature:") || l.starts_with([' ', '\t']))
        .collect();
    assert!(
        sig.contains("List-Unsubscribe:") || sig.contains("List-Unsubscribe-Post"),
        "{sig}"
    );
    // The copies differ only in headers: the body hash computed for the
    // first is the one the others carry, and every signature (RSA and
    // Ed25519) verifies.
    let bh = |m: &str| {
        let sig: String = m
            .lines()
            .skip_while(|l| !l.starts_with("DKIM-Signature:"))
            .take(12)
            .collect();
        sig.split("bh=")
            .nth(1)
            .and_then(|t| t.split(';').next())
            .map(|t| t.replace([' ', '\t'], ""))
    };
    assert!(bh(ann).is_some());
    assert_eq!(bh(ann), bh(of("bob@d0.test")));
    let recs = [
        common::dkim_record(&data("rsa2048.pem"), "rsa1", "news.example.com"),
        common::dkim_record(&data("ed25519.pem"), "ed1", "news.example.com"),
    ];
    let files: Vec<_> = std::fs::read_dir(&dump).unwrap().map(|e| e.unwrap().path()).collect();
    let out = common::dkim_verify(&recs, &files);
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{said}{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(said.lines().filter(|l| l.ends_with(" ok ok")).count(), 3, "{said}");
}

/// A List-Unsubscribe without fields keeps the shared copy: one message
/// for the job's recipients of a domain, the same Message-ID on every shard.
#[test]
fn static_headers_keep_the_shared_copy() {
    let dir = tempfile::tempdir().unwrap();
    let dump = dir.path().join("dump");
    let sink = Sink::start(SinkOptions {
        listen: "127.0.0.1:0".parse().unwrap(),
        dump: Some(dump.clone()),
        ..Default::default()
    })
    .unwrap();
    std::fs::write(
        dir.path().join("n.eml"),
        "From: news@news.example.com\nSubject: n\n\nbody\n",
    )
    .unwrap();
    let line = serde_json::json!({"id": "a", "from": "b@news.example.com", "message": "n.eml", "to": ["ann@d0.test", "bob@d0.test"]});
    let path = dir.path().join("s.jsonl");
    std::fs::write(&path, format!("{line}\n")).unwrap();
    let mut cfg: Config =
        toml::from_str("[headers]\nmessage_id = true\nlist_unsubscribe = \"<https://news.example.com/u>\"\n").unwrap();
    cfg.add_route(&format!("*={}", sink.addr())).unwrap();
    let summary = send_all(vec![path], cfg);
    let counts = sink.stop();
    assert_eq!(summary.count(Outcome::Delivered), 2);
    assert_eq!(counts.messages, 1, "one transaction for both");
    let msgs = dumped(&dump);
    assert_eq!(
        header(&msgs[0], "List-Unsubscribe"),
        Some("<https://news.example.com/u>")
    );
    assert!(header(&msgs[0], "Message-ID").is_some());
    assert!(header(&msgs[0], "Date").is_none(), "not asked for");
}

/// Recipients that wait for a retry keep only where their job's line is:
/// when they are due the line is read again, and each comes back with its
/// own copy, its own envelope sender and strings that held JSON escapes.
#[test]
fn recipients_back_from_a_retry_get_their_own_copy_sender_and_escaped_strings() {
    let dir = tempfile::tempdir().unwrap();
    let dump = dir.path().join("dump");
    let sink = Sink::start(SinkOptions {
        listen: "127.0.0.1:0".parse().unwrap(),
        dump: Some(dump.clone()),
        defer_rate: 0.5,
        seed: 11,
        ..Default::default()
    })
    .unwrap();
    std::fs::write(
        dir.path().join("t.eml"),
        "Subject: Hello {{ name }}\n\nfor {{ rcpt }}\n",
    )
    .unwrap();
    std::fs::write(dir.path().join("m.eml"), "Subject: plain\n\nbody\n").unwrap();
    let names = ["ann", "bob", "cy", "dan", "eve", "fay", "gus", "hal"];
    let personal: Vec<_> = names
        .iter()
        .enumerate()
        .map(|(i, n)| serde_json::json!({"rcpt": format!("{n}@d{}.test", i % 2), "vars": {"name": n.to_uppercase()}}))
        .collect();
    let plain: Vec<String> = (0..12).map(|i| format!("r{i}@d{}.test", i % 3)).collect();
    // Escapes make the parser own these strings rather than point into the file.
    let escaped = plain
        .iter()
        .map(|r| format!("\"{}\"", r.replacen('r', "\\u0072", 1)))
        .collect::<Vec<_>>()
        .join(",");
    let text = format!(
        "{}\n{{\"id\":\"esc\\u0061ped\",\"from\":\"b\\u0040news.example.com\",\"message\":\"m.eml\",\"to\":[{escaped}]}}\n",
        serde_json::json!({"id": "news", "from": "b@news.example.com", "message": "t.eml",
            "verp": "b+{{ rcpt_local }}@news.example.com", "to": personal}),
    );
    let path = dir.path().join("r.jsonl");
    std::fs::write(&path, text).unwrap();
    let log = dir.path().join("log.jsonl");
    let mut cfg = Config {
        log: Some(log.clone()),
        shards: Some(2),
        ..Config::default()
    };
    cfg.retry.initial = std::time::Duration::from_millis(20);
    cfg.retry.max_delay = std::time::Duration::from_millis(100);
    cfg.add_route(&format!("*={}", sink.addr())).unwrap();
    let summary = send_all(vec![path], cfg);
    sink.stop();
    assert_eq!(summary.count(Outcome::Delivered), 20);
    let f = finals(&read_log(&log));
    assert_eq!(f.len(), 20);
    let retried = |id: &str| {
        f.iter()
            .filter(|((i, _), r)| i == id && r["attempt"].as_u64() > Some(1))
            .count()
    };
    assert!(retried("news") > 0 && retried("escaped") > 0, "{f:?}");
    let mut got: Vec<String> = dumped(&dump)
        .iter()
        .map(|t| {
            let from = t.lines().find(|l| l.starts_with("X-Mail-From:")).unwrap();
            let mut to: Vec<&str> = t.lines().filter(|l| l.starts_with("X-Rcpt-To:")).collect();
            to.sort();
            let subject = header(t, "Subject").unwrap();
            format!("{from} {} {subject}", to.join(" "))
        })
        .collect();
    got.sort();
    let rcpts: Vec<String> = got
        .iter()
        .flat_map(|l| {
            l.split(' ')
                .filter(|w| w.starts_with('<') && !w.contains("news.example.com"))
        })
        .map(String::from)
        .collect();
    let mut want_rcpts: Vec<String> = personal
        .iter()
        .map(|p| format!("<{}>", p["rcpt"].as_str().unwrap()))
        .chain(plain.iter().map(|r| format!("<{r}>")))
        .collect();
    want_rcpts.sort();
    let mut rcpts_sorted = rcpts.clone();
    rcpts_sorted.sort();
    assert_eq!(rcpts_sorted, want_rcpts, "each recipient once: {got:#?}");
    for (i, n) in names.iter().enumerate() {
        let line = format!(
            "X-Mail-From: <b+{n}@news.example.com> X-Rcpt-To: <{n}@d{}.test> Hello {}",
            i % 2,
            n.to_uppercase()
        );
        assert!(got.contains(&line), "{line} in {got:#?}");
    }
    assert!(
        got.iter()
            .filter(|l| l.ends_with(" plain"))
            .all(|l| l.starts_with("X-Mail-From: <b@news.example.com> ")),
        "{got:#?}"
    );
}
