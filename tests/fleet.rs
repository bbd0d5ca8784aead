//! A fleet's partition: `volley split` gives every recipient to exactly one
//! node, spreads a big domain over every node and keeps a small one on one,
//! and the nodes' sends together deliver each recipient once.

mod common;

use std::collections::{HashMap, HashSet};
use std::path::Path;

use common::{dumped_rcpts, finals, read_log, send_all};
use volley::config::Config;
use volley::outcome::Outcome;
use volley::sink::{Sink, SinkOptions};
use volley::split::{SplitOptions, node_dir, split};

/// (id, rcpt, vars) of every recipient in a spool file.
fn recipients(path: &Path) -> Vec<(String, String, Option<serde_json::Value>)> {
    let mut out = Vec::new();
    for line in std::fs::read_to_string(path).unwrap().lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let id = v["id"].as_str().unwrap_or("").to_string();
        for r in v["to"].as_array().into_iter().flatten() {
            match r {
                serde_json::Value::String(s) => out.push((id.clone(), s.clone(), None)),
                o => out.push((
                    id.clone(),
                    o["rcpt"].as_str().unwrap().to_string(),
                    Some(o["vars"].clone()),
                )),
            }
        }
    }
    out
}

#[test]
fn split_gives_each_recipient_to_one_node_and_the_nodes_deliver_each_once() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("msgs")).unwrap();
    std::fs::write(dir.path().join("msgs/m.eml"), "Subject: s\n\nbody\n").unwrap();
    std::fs::write(dir.path().join("t.eml"), "Subject: hi {{ name }}\n\nfor {{ rcpt }}\n").unwrap();
    // big.test holds half the recipients; 40 small domains hold the rest.
    let mut text = String::new();
    let mut want = Vec::new();
    for j in 0..300 {
        let to: Vec<String> = (0..4)
            .map(|i| {
                if i % 2 == 0 {
                    format!("u{j}x{i}@big.test")
                } else {
                    format!("u{j}x{i}@s{}.test", (j * 4 + i) % 40)
                }
            })
            .collect();
        want.extend(to.iter().cloned());
        let line = if j % 3 == 0 {
            // No id: the split names the original line.
            serde_json::json!({"from": "news@sender.test", "message": "msgs/m.eml", "to": to})
        } else {
            serde_json::json!({"id": format!("j{j}"), "from": "news@sender.test", "message": "msgs/m.eml", "to": to})
        };
        text += &format!("{line}\n");
    }
    let personal: Vec<_> = (0..10)
        .map(|i| serde_json::json!({"rcpt": format!("p{i}@big.test"), "vars": {"name": format!("P{i}")}}))
        .collect();
    want.extend((0..10).map(|i| format!("p{i}@big.test")));
    text += &format!(
        "{}\n",
        serde_json::json!({"id": "pers", "from": "news@sender.test", "message": "t.eml", "to": personal})
    );
    text += "{\"to\": oops}\n";
    let spool = dir.path().join("list.jsonl");
    std::fs::write(&spool, text).unwrap();
    let out = dir.path().join("fleet");
    let nodes = 3;
    let report = split(&SplitOptions {
        nodes,
        out: out.clone(),
        spools: vec![spool],
        spread_domains: Vec::new(),
    })
    .unwrap();
    assert_eq!(
        report.spread.iter().map(|(d, _)| d.as_str()).collect::<Vec<_>>(),
        ["big.test"]
    );
    assert_eq!(report.bad_lines.len(), 1);
    assert!(
        report.bad_lines[0].starts_with("list.jsonl:302: "),
        "{:?}",
        report.bad_lines
    );

    let parts: Vec<_> = (0..nodes)
        .map(|k| recipients(&node_dir(&out, k).join("list.jsonl")))
        .collect();
    let mut got: Vec<String> = parts.iter().flatten().map(|(_, r, _)| r.clone()).collect();
    got.sort();
    want.sort();
    assert_eq!(got, want, "every recipient in exactly one node's file");
    let mut small_nodes: HashMap<String, HashSet<usize>> = HashMap::new();
    for (k, part) in parts.iter().enumerate() {
        let big = part.iter().filter(|(_, r, _)| r.ends_with("@big.test")).count();
        assert!(big > 40, "node {k} sends its part of the big domain: {big}");
        for (id, r, vars) in part {
            small_nodes
                .entry(r.split('@').nth(1).unwrap().to_string())
                .or_default()
                .insert(k);
            assert!(!id.is_empty(), "{r} has an id");
            if let Some(n) = r.strip_prefix('p').and_then(|r| r.strip_suffix("@big.test")) {
                assert_eq!(
                    (id.as_str(), vars.clone()),
                    ("pers", Some(serde_json::json!({"name": format!("P{n}")})))
                );
            }
        }
        assert!(node_dir(&out, k).join("msgs/m.eml").exists());
    }
    for (d, on) in &small_nodes {
        if d != "big.test" {
            assert_eq!(on.len(), 1, "{d} lives on one node: {on:?}");
        }
    }
    let unnamed: Vec<_> = parts
        .iter()
        .flatten()
        .filter(|(id, _, _)| id == "list.jsonl:1")
        .collect();
    assert_eq!(
        unnamed.len(),
        4,
        "a job without an id is named by its line: {unnamed:?}"
    );
    let bad = std::fs::read_to_string(node_dir(&out, 0).join("list.jsonl")).unwrap();
    assert!(
        bad.contains("{\"to\": oops}\n"),
        "the bad line goes to node 0 as it was"
    );

    // Each node sends its own files; together every recipient arrives once.
    let dump = dir.path().join("dump");
    let sink = Sink::start(SinkOptions {
        listen: "127.0.0.1:0".parse().unwrap(),
        dump: Some(dump.clone()),
        ..Default::default()
    })
    .unwrap();
    let mut delivered = 0;
    for k in 0..nodes {
        let log = dir.path().join(format!("log{k}.jsonl"));
        let mut cfg = Config {
            log: Some(log.clone()),
            shards: Some(2),
            ..Config::default()
        };
        cfg.add_route(&format!("*={}", sink.addr())).unwrap();
        let summary = send_all(vec![node_dir(&out, k).join("list.jsonl")], cfg);
        delivered += summary.count(Outcome::Delivered);
        assert_eq!(summary.count(Outcome::Rejected), u64::from(k == 0), "node {k}");
        let f = finals(&read_log(&log));
        assert_eq!(
            f.len() as u64,
            summary.recipients,
            "node {k} logs each of its recipients"
        );
    }
    sink.stop();
    assert_eq!(delivered, want.len() as u64);
    assert_eq!(
        dumped_rcpts(&dump),
        want,
        "each recipient delivered once across the nodes"
    );
    let pers: Vec<String> = std::fs::read_dir(&dump)
        .unwrap()
        .map(|e| std::fs::read_to_string(e.unwrap().path()).unwrap())
        .filter(|t| t.contains("Subject: hi "))
        .collect();
    assert_eq!(pers.len(), 10, "each personalised recipient has its own copy");
}

/// The files of a block scalar (`KEY: |`) in a ConfigMap, by key.
fn configmap_files(yaml: &str) -> HashMap<String, String> {
    let mut out = HashMap::new();
    let mut cur: Option<(String, String)> = None;
    for line in yaml.lines() {
        if let Some((_, text)) = cur.as_mut()
            && (line.starts_with("    ") || line.is_empty())
        {
            text.push_str(line.strip_prefix("    ").unwrap_or(""));
            text.push('\n');
            continue;
        }
        if let Some((k, t)) = cur.take() {
            out.insert(k, t);
        }
        if let Some(key) = line.strip_prefix("  ").and_then(|l| l.strip_suffix(": |")) {
            cur = Some((key.to_string(), String::new()));
        }
    }
    out.extend(cur);
    out
}

/// The Kubernetes ConfigMap's configuration and shaping file are valid for
/// volley, and agree with the StatefulSet (its CPU request is `shards`, the
/// grace period outlasts `shutdown_timeout`, the metrics port is the probe's).
#[test]
fn the_kubernetes_configuration_loads_and_matches_the_statefulset() {
    let k8s = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/k8s");
    let files = configmap_files(&std::fs::read_to_string(k8s.join("configmap.yaml")).unwrap());
    let dir = tempfile::tempdir().unwrap();
    let shaping = dir.path().join("shaping.toml");
    std::fs::write(&shaping, &files["shaping.toml"]).unwrap();
    volley::shaping::Shaping::load(std::slice::from_ref(&shaping)).expect("the ConfigMap's shaping.toml loads");
    let conf = dir.path().join("volley.toml");
    std::fs::write(
        &conf,
        files["volley.toml"].replace("/etc/volley/shaping.toml", shaping.to_str().unwrap()),
    )
    .unwrap();
    let cfg = Config::load_for_run(&conf).expect("the ConfigMap's volley.toml loads");
    cfg.validate().unwrap();
    let sts = std::fs::read_to_string(k8s.join("statefulset.yaml")).unwrap();
    let value = |key: &str| -> String {
        let line = sts
            .lines()
            .find(|l| l.trim_start().starts_with(key))
            .unwrap_or_else(|| panic!("{key}"));
        line.split_once(':').unwrap().1.trim().trim_matches('"').to_string()
    };
    assert_eq!(value("cpu:"), cfg.shards.unwrap().to_string(), "one core per shard");
    let grace: u64 = value("terminationGracePeriodSeconds:").parse().unwrap();
    assert!(
        grace > cfg.shutdown_timeout.as_secs() + 10,
        "the drain fits in the grace period"
    );
    assert_eq!(cfg.metrics_listen.as_deref(), Some("0.0.0.0:9464"));
    assert_eq!(value("containerPort:"), "9464");
    assert_eq!(cfg.spool_dir.as_deref(), Some(Path::new("/var/spool/volley")));
    assert!(
        sts.contains("mountPath: /var/spool/volley"),
        "the spool is on the pod's volume"
    );
}

/// A Redis server on a free loopback port, stopped when dropped.
struct Redis {
    child: std::process::Child,
    port: u16,
}

impl Redis {
    fn start(dir: &Path) -> Redis {
        let server = "/usr/bin/redis-server";
        assert!(
            Path::new(server).exists(),
            "{server} is missing: install Debian's redis-server package (.ci/run does)"
        );
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = std::process::Command::new(server)
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .arg("--dir")
            .arg(dir)
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(std::time::Instant::now() < deadline, "redis-server did not start");
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        Redis { child, port }
    }
    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Two nodes with their own source addresses and one Redis: a rule marked
/// `fleet` that fires on the first suspends the destination on the second,
/// which then sends nothing there while it holds; and a node whose Redis is
/// unreachable sends on by itself.
#[test]
fn a_suspension_one_node_learns_holds_on_the_others_and_a_node_without_redis_sends_alone() {
    let dir = tempfile::tempdir().unwrap();
    let redis = Redis::start(dir.path());
    let refusing = Sink::start(SinkOptions {
        listen: "127.0.0.1:0".parse().unwrap(),
        reject_rate: 1.0,
        ..Default::default()
    })
    .unwrap();
    let shaping = dir.path().join("shaping.toml");
    std::fs::write(
        &shaping,
        "[[default.automation]]\nname = \"domain-reputation\"\nregex = '^550 5\\.1\\.1'\naction = \"suspend\"\nduration = \"1m\"\nfleet = true\n",
    )
    .unwrap();
    let node = |k: u32, redis_url: &str, route: std::net::SocketAddr, log: &Path| -> Config {
        let mut cfg: Config = toml::from_str(&format!(
            "shards = 2\nsource_addresses = [\"127.0.0.{}\"]\nshaping = [{:?}]\n[fleet]\nredis = \"{redis_url}\"\nnode = \"node-{k}\"\n[retry]\ninitial = \"100ms\"\nmax_age = \"2s\"\n",
            k + 2,
            shaping.display().to_string()
        ))
        .unwrap();
        cfg.log = Some(log.to_path_buf());
        cfg.add_route(&format!("*={route}")).unwrap();
        cfg.validate().unwrap();
        cfg
    };
    let write = |name: &str, rcpts: &[&str]| {
        let p = dir.path().join(name);
        let lines: String = rcpts
            .iter()
            .map(|r| {
                format!(
                    "{}\n",
                    serde_json::json!({"from": "news@sender.test", "data": "Subject: x\n\nx\n", "to": [r]})
                )
            })
            .collect();
        std::fs::write(&p, lines).unwrap();
        p
    };
    // Node 0: its one recipient is refused, the rule fires and goes to Redis.
    let log0 = dir.path().join("log0.jsonl");
    let s0 = send_all(
        vec![write("a.jsonl", &["a@d0.test"])],
        node(0, &redis.url(), refusing.addr(), &log0),
    );
    assert_eq!(s0.count(Outcome::Bounced), 1);
    let rules = || -> Vec<serde_json::Value> {
        let client = redis::Client::open(redis.url()).unwrap();
        let mut con = client.get_connection().unwrap();
        let members: Vec<String> = redis::cmd("ZRANGE")
            .arg("volley:rules")
            .arg(0)
            .arg(-1)
            .query(&mut con)
            .unwrap();
        members.iter().map(|m| serde_json::from_str(m).unwrap()).collect()
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while rules().is_empty() {
        assert!(std::time::Instant::now() < deadline, "node 0 published its rule");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let shared = rules();
    assert_eq!(shared.len(), 1, "{shared:?}");
    assert_eq!(
        (shared[0]["node"].as_str(), shared[0]["rule"].as_str()),
        (Some("node-0"), Some("domain-reputation"))
    );
    let sessions_before = refusing.counts().sessions;

    // Node 1, another source address: it opens no connection while the rule holds.
    let log1 = dir.path().join("log1.jsonl");
    let s1 = send_all(
        vec![write("b.jsonl", &["b1@d1.test", "b2@d2.test", "b3@d3.test"])],
        node(1, &redis.url(), refusing.addr(), &log1),
    );
    assert_eq!(
        refusing.counts().sessions,
        sessions_before,
        "node 1 held off the suspended destination"
    );
    assert_eq!(
        s1.count(Outcome::Expired),
        3,
        "they waited for the rule to end, past max_age"
    );
    let f = finals(&read_log(&log1));
    assert!(f.values().all(|r| r["outcome"] == "expired"), "{f:?}");

    // Node 2 with an unreachable Redis sends on its own (to a server that takes mail).
    let taking = Sink::start(SinkOptions {
        listen: "127.0.0.1:0".parse().unwrap(),
        ..Default::default()
    })
    .unwrap();
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let log2 = dir.path().join("log2.jsonl");
    let s2 = send_all(
        vec![write("c.jsonl", &["c1@d1.test", "c2@d2.test"])],
        node(2, &format!("redis://127.0.0.1:{closed}/"), taking.addr(), &log2),
    );
    assert_eq!(s2.count(Outcome::Delivered), 2);
    let state = volley::fleet::state().expect("a fleet member keeps its state");
    assert!(state.errors.load(std::sync::atomic::Ordering::Relaxed) > 0);
    taking.stop();
    refusing.stop();
}
