//! The metrics exporter of `volley run`: the scrape passes `promtool check
//! metrics`, counts what was sent, keeps the domain label bounded, and a real
//! Prometheus (Debian's `prometheus` package) scrapes it.

use std::collections::{BTreeSet, HashMap};
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use volley::sink::{Sink, SinkOptions};

/// A `volley run` child with its metrics address; stopped with SIGTERM on drop.
struct Service {
    child: Child,
    metrics: SocketAddr,
    incoming: PathBuf,
    done: PathBuf,
}

impl Service {
    fn start(dir: &Path, sink: SocketAddr, extra: &str) -> Service {
        Service::start_with(dir, sink, extra, "")
    }

    /// `routes`: more lines of `[routes]` beside `"*"`.
    fn start_with(dir: &Path, sink: SocketAddr, extra: &str, routes: &str) -> Service {
        let root = dir.join("spool");
        let config = dir.join("volley.toml");
        std::fs::write(
            &config,
            format!(
                "spool_dir = {:?}\nmetrics_listen = \"127.0.0.1:0\"\nidle_timeout = \"300ms\"\n{extra}\n[retry]\nmax_age = \"1s\"\n[routes]\n\"*\" = \"{sink}\"\n{routes}",
                root.display().to_string(),
            ),
        )
        .unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_volley"))
            .args(["run", "--config"])
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // A line says where the metrics are: "volley: metrics on http://ADDR/metrics and /status".
        let mut stderr = BufReader::new(child.stderr.take().unwrap());
        let mut line = String::new();
        for _ in 0..10 {
            line.clear();
            stderr.read_line(&mut line).unwrap();
            if line.contains("metrics on") {
                break;
            }
        }
        let addr = line
            .split("http://")
            .nth(1)
            .and_then(|r| r.split('/').next())
            .unwrap_or_else(|| {
                let _ = child.kill();
                let _ = child.wait();
                panic!("no metrics address in {line:?}")
            });
        std::thread::spawn(move || std::io::copy(&mut stderr, &mut std::io::stderr()));
        Service {
            child,
            metrics: addr.parse().unwrap(),
            incoming: root.join("incoming"),
            done: root.join("done"),
        }
    }

    fn get(&self, path: &str) -> String {
        get(&format!("http://{}{path}", self.metrics))
    }

    fn send_and_wait(&self, name: &str, jobs: &[String]) {
        self.send_message_and_wait(name, jobs, "Subject: metrics\n\nhello\n")
    }

    fn send_message_and_wait(&self, name: &str, jobs: &[String], message: &str) {
        std::fs::write(self.incoming.join("news.eml"), message).unwrap();
        let tmp = self.incoming.join(format!("{name}.jsonl.tmp"));
        std::fs::write(&tmp, jobs.join("\n") + "\n").unwrap();
        std::fs::rename(&tmp, self.incoming.join(format!("{name}.jsonl"))).unwrap();
        let summary = self.done.join(format!("{name}.jsonl.summary.json"));
        wait_for(&format!("{name} done"), Duration::from_secs(60), || summary.exists());
        // The exporter learns it from the collector's next board.
        wait_for(&format!("{name} done in /status"), Duration::from_secs(10), || {
            let v: serde_json::Value = serde_json::from_str(&self.get("/status")).unwrap();
            v["files"].as_array().is_some_and(|f| f.is_empty())
        });
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
    }
}

fn get(url: &str) -> String {
    ureq::get(url)
        .call()
        .unwrap_or_else(|e| panic!("GET {url}: {e}"))
        .body_mut()
        .read_to_string()
        .unwrap()
}

fn wait_for(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn jobs(n: usize, domains: usize) -> Vec<String> {
    (0..n)
        .map(|i| {
            format!(
                "{{\"from\":\"s@x.test\",\"to\":[\"r{i}@d{}.test\"],\"message\":\"news.eml\"}}",
                i % domains
            )
        })
        .collect()
}

/// A sample of the text format: name, labels, value.
#[derive(Debug)]
struct Sample {
    name: String,
    labels: HashMap<String, String>,
    value: f64,
}

fn parse(text: &str) -> Vec<Sample> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let (head, value) = l.rsplit_once(' ').unwrap();
            let (name, labels) = match head.split_once('{') {
                Some((n, rest)) => (n, rest.trim_end_matches('}')),
                None => (head, ""),
            };
            let labels = labels
                .split("\",")
                .filter(|p| !p.is_empty())
                .map(|p| {
                    let (k, v) = p.split_once("=\"").unwrap();
                    (k.to_string(), v.trim_end_matches('"').to_string())
                })
                .collect();
            Sample {
                name: name.to_string(),
                labels,
                value: value.parse().unwrap(),
            }
        })
        .collect()
}

/// The sum of the samples of `name` that have all these labels.
fn total(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> f64 {
    samples
        .iter()
        .filter(|s| {
            s.name == name
                && labels
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(v))
        })
        .map(|s| s.value)
        .sum()
}

fn sum(samples: &[Sample], name: &str, label: (&str, &str)) -> f64 {
    total(samples, name, &[label])
}

fn promtool() -> &'static str {
    let p = "/usr/bin/promtool";
    assert!(
        Path::new(p).exists(),
        "{p} is missing: install Debian's prometheus package (.ci/run does)"
    );
    p
}

#[test]
fn the_scrape_is_valid_and_counts_every_outcome_and_phase() {
    let dir = tempfile::tempdir().unwrap();
    let sink = Sink::start(SinkOptions {
        listen: "127.0.0.1:0".parse().unwrap(),
        reject_rate: 0.2,
        seed: 7,
        ..Default::default()
    })
    .unwrap();
    let svc = Service::start(dir.path(), sink.addr(), "");
    svc.send_and_wait("news", &jobs(600, 6));
    let text = svc.get("/metrics");
    let mut check = Command::new(promtool())
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(check.stdin.as_mut().unwrap(), text.as_bytes()).unwrap();
    let out = check.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let s = parse(&text);
    let accepted = sink.stop().recipients as f64;
    assert!(accepted > 300.0 && accepted < 600.0, "{accepted}");
    let delivered = sum(&s, "volley_deliveries_total", ("outcome", "delivered"));
    let bounced = sum(&s, "volley_deliveries_total", ("outcome", "bounced"));
    assert_eq!((delivered, bounced), (accepted, 600.0 - accepted));
    // Each bounce has a category (a 550 to RCPT from the sink: "other" or a recipient problem).
    let categorized = sum(&s, "volley_bounce_categories_total", ("outcome", "bounced"));
    assert_eq!(categorized, bounced);
    // Every RCPT got a reply, counted by code.
    let rcpt_replies = sum(&s, "volley_smtp_replies_total", ("command", "rcpt"));
    assert_eq!(rcpt_replies, 600.0);
    let rcpt_550 = total(&s, "volley_smtp_replies_total", &[("command", "rcpt"), ("code", "550")]);
    assert_eq!(rcpt_550, bounced);
    // A failing reply is its domain's; the successes are counted under the
    // destination's first domain, the one its connections are counted under.
    let owners: BTreeSet<&str> = s
        .iter()
        .filter(|x| x.name == "volley_connections_total" && x.value > 0.0)
        .map(|x| x.labels["domain"].as_str())
        .collect();
    // A failing reply carries its enhanced status code (the sink's
    // refusal is 550 5.1.1); a success none. DATA refused after every RCPT
    // was refused follows from those refusals: under the first domain too.
    for x in s.iter().filter(|x| x.name == "volley_smtp_replies_total") {
        let code: u16 = x.labels["code"].parse().unwrap();
        let under_owner = owners.contains(x.labels["domain"].as_str());
        if code < 400 {
            assert!(under_owner, "{x:?} not under {owners:?}");
            assert!(!x.labels.contains_key("enhanced"), "{x:?}");
        } else {
            assert!(x.labels.contains_key("enhanced"), "{x:?}");
        }
        if code == 550 {
            assert_eq!(x.labels["enhanced"], "5.1.1", "{x:?}");
        }
        if x.labels["command"] == "data" && code >= 400 {
            assert!(under_owner, "{x:?} not under {owners:?}");
        }
    }
    // A domain that shares its destination's connections has no gauge saying 0 of them.
    for x in s.iter().filter(|x| x.name == "volley_connections_open") {
        let d = x.labels["domain"].as_str();
        assert!(x.value > 0.0 || d == "_other", "{x:?}");
    }
    let domains_550: BTreeSet<&str> = s
        .iter()
        .filter(|x| x.name == "volley_smtp_replies_total" && x.labels["code"] == "550")
        .map(|x| x.labels["domain"].as_str())
        .collect();
    assert!(
        domains_550.len() > owners.len(),
        "550s under their own domains: {domains_550:?}"
    );
    // Six domains, each with its own label, each with every phase timed.
    let domains: BTreeSet<&str> = s
        .iter()
        .filter(|x| x.name == "volley_recipients_total")
        .map(|x| x.labels["domain"].as_str())
        .collect();
    assert_eq!(
        domains,
        BTreeSet::from([
            "_other", "d0.test", "d1.test", "d2.test", "d3.test", "d4.test", "d5.test"
        ])
    );
    for phase in ["connect", "banner", "ehlo", "mail", "rcpt", "data", "dot"] {
        let count = s
            .iter()
            .find(|x| {
                x.name == "volley_smtp_phase_duration_seconds_count"
                    && x.labels["phase"] == phase
                    && x.labels["domain"] != "_other"
            })
            .map(|x| x.value);
        assert!(count.is_some_and(|c| c > 0.0), "phase {phase}: {count:?}");
    }
    // One delivery duration per delivered recipient.
    let delivery_count = sum(&s, "volley_delivery_duration_seconds_count", ("domain", "d0.test"));
    let d0_delivered = total(
        &s,
        "volley_deliveries_total",
        &[("domain", "d0.test"), ("outcome", "delivered")],
    );
    assert!(d0_delivered > 0.0);
    assert_eq!(delivery_count, d0_delivered);
    // The queue is empty once the file is done; the spool gauges say so.
    assert_eq!(sum(&s, "volley_queue_recipients", ("domain", "d0.test")), 0.0);
    assert_eq!(sum(&s, "volley_spool_files", ("state", "done")), 1.0);
    assert_eq!(sum(&s, "volley_spool_recipients", ("state", "pending")), 0.0);
    assert!(s.iter().any(|x| x.name == "process_resident_memory_bytes"));

    let status: serde_json::Value = serde_json::from_str(&svc.get("/status")).unwrap();
    assert_eq!(status["spool"]["files_done"], 1, "{status}");
    assert_eq!(status["spool"]["finals"], 600, "{status}");
    assert!(status["shards"].as_array().is_some_and(|a| !a.is_empty()), "{status}");
}

#[test]
fn status_shows_a_file_while_it_is_sent() {
    let dir = tempfile::tempdir().unwrap();
    // Slow replies keep the file in flight long enough to look at it.
    let sink = Sink::start(SinkOptions {
        listen: "127.0.0.1:0".parse().unwrap(),
        latency: Duration::from_millis(200),
        ..Default::default()
    })
    .unwrap();
    let svc = Service::start(dir.path(), sink.addr(), "max_connections_per_destination = 1");
    std::fs::write(svc.incoming.join("news.eml"), "Subject: metrics\n\nhello\n").unwrap();
    let tmp = svc.incoming.join("slow.jsonl.tmp");
    std::fs::write(&tmp, jobs(40, 1).join("\n") + "\n").unwrap();
    std::fs::rename(&tmp, svc.incoming.join("slow.jsonl")).unwrap();
    let mut seen = None;
    wait_for("the file in /status", Duration::from_secs(30), || {
        let v: serde_json::Value = serde_json::from_str(&svc.get("/status")).unwrap();
        let f = v["files"].get(0).cloned();
        let sending = f
            .as_ref()
            .is_some_and(|f| f["state"] == "sending" && f["finals"].as_u64().is_some_and(|n| n > 0));
        if sending {
            seen = f;
        }
        sending
    });
    let f = seen.unwrap();
    assert_eq!(f["name"], "slow.jsonl");
    assert_eq!(f["recipients"], 40);
    assert!(f["finals"].as_u64().unwrap() < 40, "{f}");
    let metrics = parse(&svc.get("/metrics"));
    assert!(sum(&metrics, "volley_queue_recipients", ("domain", "d0.test")) > 0.0);
    assert!(sum(&metrics, "volley_connections_open", ("domain", "d0.test")) >= 1.0);
    // Finished, it leaves `files` for `finished`, with its counts.
    let mut finished = None;
    wait_for("the file among the finished", Duration::from_secs(60), || {
        let v: serde_json::Value = serde_json::from_str(&svc.get("/status")).unwrap();
        finished = v["finished"].get(0).cloned();
        finished.is_some() && v["files"].as_array().is_some_and(|f| f.is_empty())
    });
    let f = finished.unwrap();
    assert_eq!(
        (f["name"].as_str(), f["state"].as_str()),
        (Some("slow.jsonl"), Some("done")),
        "{f}"
    );
    assert_eq!(
        (f["recipients"].as_u64(), f["delivered"].as_u64()),
        (Some(40), Some(40)),
        "{f}"
    );
    assert!(f["finished_at"].as_str().is_some_and(|t| t.ends_with('Z')), "{f}");
    drop(svc);
    sink.stop();
}

#[test]
fn thousands_of_domains_share_the_other_label() {
    let dir = tempfile::tempdir().unwrap();
    let sink = Sink::start(SinkOptions {
        listen: "127.0.0.1:0".parse().unwrap(),
        ..Default::default()
    })
    .unwrap();
    let svc = Service::start(dir.path(), sink.addr(), "metrics_max_domains = 5");
    // One big domain among 2,000 small ones.
    let mut js = jobs(2000, 2000);
    for i in 0..300 {
        js.push(format!(
            "{{\"from\":\"s@x.test\",\"to\":[\"big{i}@big.test\"],\"message\":\"news.eml\"}}"
        ));
    }
    svc.send_and_wait("many", &js);
    let s = parse(&svc.get("/metrics"));
    let domains: BTreeSet<&str> = s
        .iter()
        .filter_map(|x| x.labels.get("domain").map(String::as_str))
        .collect();
    assert!(domains.len() <= 6, "{} domain labels: {domains:?}", domains.len());
    assert!(
        domains.contains("big.test") && domains.contains("_other"),
        "{domains:?}"
    );
    let delivered = sum(&s, "volley_deliveries_total", ("outcome", "delivered"));
    assert_eq!(delivered, 2300.0, "nothing is lost in _other");
    assert_eq!(sum(&s, "volley_recipients_total", ("domain", "big.test")), 300.0);
    sink.stop();
}

/// A real Prometheus scraping `targets` every second, stopped when dropped.
struct Prometheus {
    child: Child,
    port: u16,
}

impl Prometheus {
    fn start(dir: &Path, targets: &[SocketAddr]) -> Prometheus {
        let prometheus = "/usr/bin/prometheus";
        assert!(
            Path::new(prometheus).exists(),
            "{prometheus} is missing: install Debian's prometheus package (.ci/run does)"
        );
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let targets: Vec<String> = targets.iter().map(|t| format!("'{t}'")).collect();
        let config = dir.join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: volley\n    static_configs:\n      - targets: [{}]\n",
                targets.join(", ")
            ),
        )
        .unwrap();
        let child = Command::new(prometheus)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!("--storage.tsdb.path={}", dir.join("tsdb").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        Prometheus { child, port }
    }

    /// The answer to an instant query (Null until Prometheus answers).
    fn query(&self, q: &str) -> serde_json::Value {
        let url = format!(
            "http://127.0.0.1:{}/api/v1/query?query={}",
            self.port,
            q.replace(' ', "%20")
                .replace('{', "%7B")
                .replace('}', "%7D")
                .replace('"', "%22")
                .replace('+', "%2B")
        );
        ureq::get(&url)
            .call()
            .ok()
            .and_then(|mut r| r.body_mut().read_to_string().ok())
            .and_then(|b| serde_json::from_str(&b).ok())
            .unwrap_or(serde_json::Value::Null)
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn a_real_prometheus_scrapes_volley() {
    let dir = tempfile::tempdir().unwrap();
    let sink = Sink::start(SinkOptions {
        listen: "127.0.0.1:0".parse().unwrap(),
        ..Default::default()
    })
    .unwrap();
    let svc = Service::start(dir.path(), sink.addr(), "");
    let prom = Prometheus::start(dir.path(), &[svc.metrics]);
    svc.send_and_wait("news", &jobs(500, 5));
    let query = |q: &str| prom.query(q);
    let mut delivered = None;
    wait_for("Prometheus to scrape 500 deliveries", Duration::from_secs(60), || {
        let v = query("sum(volley_deliveries_total{outcome=\"delivered\"})");
        delivered = v["data"]["result"][0]["value"][1].as_str().map(str::to_string);
        delivered.as_deref() == Some("500")
    });
    // Phases are counted under the domain that first routed to the destination.
    let p99 = query("max(volley_smtp_phase_duration_seconds{phase=\"dot\",quantile=\"0.99\"})");
    let value: f64 = p99["data"]["result"][0]["value"][1]
        .as_str()
        .unwrap_or_else(|| panic!("no p99 of the dot phase: {p99}"))
        .parse()
        .unwrap();
    assert!(value > 0.0, "{p99}");
    drop(svc);
    sink.stop();
}

/// Three nodes, one of them sending to a fast server and two to a slow one,
/// scraped by one Prometheus: the fleet's p99 per domain comes from the
/// summed buckets of all three (what summaries' quantiles cannot give), and
/// is the slow nodes' while the fast node's own p99 stays low.
#[test]
fn a_fleet_s_p99_per_domain_comes_from_the_buckets_of_every_node() {
    let dir = tempfile::tempdir().unwrap();
    let fast = Sink::start(SinkOptions {
        listen: "127.0.0.1:0".parse().unwrap(),
        ..Default::default()
    })
    .unwrap();
    let slow = Sink::start(SinkOptions {
        listen: "127.0.0.1:0".parse().unwrap(),
        latency: Duration::from_millis(200),
        ..Default::default()
    })
    .unwrap();
    let nodes: Vec<Service> = (0..3)
        .map(|k| {
            let d = dir.path().join(format!("node-{k}"));
            std::fs::create_dir_all(&d).unwrap();
            let sink = if k == 0 { fast.addr() } else { slow.addr() };
            Service::start(&d, sink, "")
        })
        .collect();
    let prom = Prometheus::start(dir.path(), &nodes.iter().map(|n| n.metrics).collect::<Vec<_>>());
    for n in &nodes {
        n.send_and_wait("news", &jobs(100, 4));
    }
    let query = |q: &str| prom.query(q);
    wait_for(
        "Prometheus to scrape 300 deliveries from 3 nodes",
        Duration::from_secs(60),
        || {
            let v = query("sum(volley_delivery_duration_seconds_count)");
            let n = query("count(count by (instance) (volley_delivery_duration_seconds_count))");
            v["data"]["result"][0]["value"][1].as_str() == Some("300")
                && n["data"]["result"][0]["value"][1].as_str() == Some("3")
        },
    );
    let per_domain = |q: &str| -> Vec<(String, f64)> {
        let v = query(q);
        let mut out: Vec<(String, f64)> = v["data"]["result"]
            .as_array()
            .unwrap_or_else(|| panic!("{q}: {v}"))
            .iter()
            .map(|r| {
                (
                    r["metric"]["domain"].as_str().unwrap().to_string(),
                    r["value"][1].as_str().unwrap().parse().unwrap(),
                )
            })
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    };
    let fleet = per_domain("histogram_quantile(0.99, sum by (le, domain) (volley_delivery_duration_seconds_bucket))");
    let fast_node = per_domain(&format!(
        "histogram_quantile(0.99, sum by (le, domain) (volley_delivery_duration_seconds_bucket{{instance=\"{}\"}}))",
        nodes[0].metrics
    ));
    let domains: Vec<&str> = fleet.iter().map(|(d, _)| d.as_str()).collect();
    assert_eq!(domains, ["d0.test", "d1.test", "d2.test", "d3.test"], "{fleet:?}");
    assert_eq!(fast_node.len(), 4, "{fast_node:?}");
    for ((d, all), (_, own)) in fleet.iter().zip(&fast_node) {
        assert!(*own <= 0.25, "{d}: the fast node alone: p99 {own} s");
        assert!(
            *all > 0.25,
            "{d}: the fleet, two thirds of it 200 ms a reply away: p99 {all} s"
        );
    }
    drop(nodes);
    fast.stop();
    slow.stop();
}

/// Every `volley_…`/`process_…` name in a text (PromQL in the dashboard and the alert rules).
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for prefix in ["volley_", "process_"] {
        for (i, _) in text.match_indices(prefix) {
            let name: String = text[i..]
                .chars()
                .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_')
                .collect();
            names.insert(name);
        }
    }
    names
}

#[test]
fn the_deploy_files_pass_promtool_and_name_metrics_that_exist() {
    let deploy = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy");
    for args in [
        vec!["check", "config", "prometheus.yml"],
        vec!["check", "rules", "volley-alerts.yml"],
        vec!["test", "rules", "volley-alerts.test.yml"],
    ] {
        let out = Command::new(promtool())
            .args(&args)
            .current_dir(&deploy)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "promtool {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // A scrape with deliveries, bounces and an automation rule that fired
    // (on the bounces) has every family the dashboard and the alerts use.
    let dir = tempfile::tempdir().unwrap();
    let sink = Sink::start(SinkOptions {
        listen: "127.0.0.1:0".parse().unwrap(),
        reject_rate: 0.3,
        ..Default::default()
    })
    .unwrap();
    let shaping = dir.path().join("shaping.toml");
    std::fs::write(
        &shaping,
        "[[default.automation]]\nregex = '^550 5\\.1\\.1'\naction = { set = { max_connections = 20 } }\nduration = \"10m\"\n",
    )
    .unwrap();
    let svc = Service::start(
        dir.path(),
        sink.addr(),
        // A fleet member whose Redis is not there: its fleet metrics are scraped too.
        &format!(
            "shaping = [{:?}]\n[fleet]\nredis = \"redis://127.0.0.1:1/\"",
            shaping.display().to_string()
        ),
    );
    svc.send_and_wait("news", &jobs(100, 3));
    let samples = parse(&svc.get("/metrics"));
    let redis_up: Vec<_> = samples.iter().filter(|s| s.name == "volley_fleet_redis_up").collect();
    assert!(
        redis_up.len() == 1 && redis_up[0].value == 0.0,
        "a node without its Redis says so: {redis_up:?}"
    );
    let throttled: Vec<_> = samples
        .iter()
        .filter(|s| s.name == "volley_domain_throttled_seconds_total")
        .collect();
    assert!(
        throttled
            .iter()
            .any(|s| s.value > 0.0 && s.labels["domain"] != "_other"),
        "the rule in force shows as time throttled on its domains"
    );
    let scraped: BTreeSet<String> = samples.into_iter().map(|s| s.name).collect();
    let dashboard = std::fs::read_to_string(deploy.join("grafana-dashboard.json")).unwrap();
    let json: serde_json::Value = serde_json::from_str(&dashboard).unwrap();
    let panels = json["panels"].as_array().unwrap();
    assert!(panels.len() >= 10);
    for p in panels {
        assert_eq!(
            p["datasource"]["uid"], "${datasource}",
            "{}: templated data source",
            p["title"]
        );
    }
    let alerts = std::fs::read_to_string(deploy.join("volley-alerts.yml")).unwrap();
    for (what, text) in [("dashboard", &dashboard), ("alerts", &alerts)] {
        let used = metric_names(text);
        assert!(used.len() >= 5, "{what}: {used:?}");
        let missing: Vec<_> = used.difference(&scraped).collect();
        assert!(
            missing.is_empty(),
            "{what} uses metrics volley does not export: {missing:?}"
        );
    }
    drop(svc);
    sink.stop();
}

/// A one-domain spool on two shards: the domain carries all the work, so
/// it is spread over both, and its connection cap (6) is one budget that
/// both shards use in full together — never more. `/status` shows it.
#[test]
fn a_one_domain_spool_uses_every_shard_and_the_whole_connection_cap() {
    let dir = tempfile::tempdir().unwrap();
    // Replies after 5 ms keep the queue deep enough to want every connection.
    let sink = Sink::start(SinkOptions {
        listen: "127.0.0.1:0".parse().unwrap(),
        latency: Duration::from_millis(5),
        ..Default::default()
    })
    .unwrap();
    let svc = Service::start(
        dir.path(),
        sink.addr(),
        "shards = 2\nmax_connections_per_destination = 6\nmax_rcpts_per_txn = 1",
    );
    std::fs::write(svc.incoming.join("news.eml"), "Subject: metrics\n\nhello\n").unwrap();
    let tmp = svc.incoming.join("one.jsonl.tmp");
    std::fs::write(&tmp, jobs(6_000, 1).join("\n") + "\n").unwrap();
    std::fs::rename(&tmp, svc.incoming.join("one.jsonl")).unwrap();
    let mut most = 0u64;
    let mut both_full = None;
    wait_for("both shards sending on the whole cap", Duration::from_secs(60), || {
        let v: serde_json::Value = serde_json::from_str(&svc.get("/status")).unwrap();
        let shards = v["shards"].as_array().cloned().unwrap_or_default();
        let conns: Vec<u64> = shards.iter().map(|s| s["connections_open"].as_u64().unwrap()).collect();
        let held: Vec<u64> = shards.iter().map(|s| s["recipients"].as_u64().unwrap()).collect();
        let total: u64 = conns.iter().sum();
        most = most.max(total);
        assert!(total <= 6, "more connections than the cap: {conns:?}");
        let full = shards.len() == 2 && total == 6 && conns.iter().all(|&c| c > 0) && held.iter().all(|&h| h > 0);
        if full {
            both_full = Some((conns, held));
        }
        full
    });
    let (conns, held) = both_full.unwrap();
    eprintln!("connections per shard {conns:?}, recipients held per shard {held:?}");
    wait_for("one.jsonl done", Duration::from_secs(120), || {
        dir.path().join("spool/done/one.jsonl.summary.json").exists()
    });
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("spool/done/one.jsonl.summary.json")).unwrap())
            .unwrap();
    assert_eq!(summary["delivered"], 6_000, "{summary}");
    assert!(most <= 6);
    drop(svc);
    sink.stop();
}

/// A newsletter (one message file) to 300 recipients on two shards: each
/// shard signs it once (RSA and Ed25519), not once per recipient.
#[test]
fn a_newsletter_is_signed_once_per_shard_not_per_recipient() {
    let dir = tempfile::tempdir().unwrap();
    // Replies after 20 ms keep the message in use while its jobs come in.
    let sink = Sink::start(SinkOptions {
        listen: "127.0.0.1:0".parse().unwrap(),
        latency: Duration::from_millis(20),
        ..Default::default()
    })
    .unwrap();
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/dkim");
    let svc = Service::start(
        dir.path(),
        sink.addr(),
        &format!(
            "shards = 2\nmax_connections_per_destination = 2\n[dkim.\"news.example.com\"]\nkeys = [{{ selector = \"rsa1\", key_file = {:?} }}, {{ selector = \"ed1\", key_file = {:?} }}]\n",
            data.join("rsa2048.pem"),
            data.join("ed25519.pem")
        ),
    );
    svc.send_message_and_wait(
        "signed",
        &jobs(300, 1),
        "From: news@news.example.com\nSubject: weekly\n\nhello\n",
    );
    let samples = parse(&svc.get("/metrics"));
    let signed = |alg: &str| -> f64 {
        samples
            .iter()
            .filter(|s| {
                s.name == "volley_dkim_signatures_total"
                    && s.labels["domain"] == "news.example.com"
                    && s.labels["algorithm"] == alg
            })
            .map(|s| s.value)
            .sum()
    };
    for alg in ["rsa-sha256", "ed25519-sha256"] {
        let n = signed(alg);
        assert!(
            (1.0..=2.0).contains(&n),
            "{alg}: {n} signatures for 300 recipients on 2 shards"
        );
    }
    let delivered: f64 = samples
        .iter()
        .filter(|s| s.name == "volley_deliveries_total" && s.labels["outcome"] == "delivered")
        .map(|s| s.value)
        .sum();
    assert_eq!(delivered, 300.0);
    drop(svc);
    sink.stop();
}

/// A destination that refuses connections shows in `/status` with its
/// state (backing off, until when), its last error and when it happened,
/// and what is queued for it; one that works does not show.
#[test]
fn status_names_a_failing_destination_its_state_and_last_error() {
    let dir = tempfile::tempdir().unwrap();
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let sink = Sink::start(SinkOptions {
        listen: "127.0.0.1:0".parse().unwrap(),
        ..Default::default()
    })
    .unwrap();
    // Every domain to the closed port but ok.test, which goes to the sink.
    // Its recipients wait past the service's 1 s max_age, so it stays failing.
    let extra = "shards = 1\n[retry_domain.\"down.test\"]\nmax_age = \"1m\"\n";
    let svc = Service::start_with(
        dir.path(),
        closed,
        extra,
        &format!("\"ok.test\" = \"{}\"\n", sink.addr()),
    );
    let jobs = [
        "{\"from\":\"s@x.test\",\"to\":[\"a@down.test\",\"b@down.test\"],\"message\":\"news.eml\"}".to_string(),
        "{\"from\":\"s@x.test\",\"to\":[\"c@ok.test\"],\"message\":\"news.eml\"}".to_string(),
    ];
    std::fs::write(svc.incoming.join("news.eml"), "Subject: s\n\nhello\n").unwrap();
    std::fs::write(svc.incoming.join("f.jsonl.tmp"), jobs.join("\n") + "\n").unwrap();
    std::fs::rename(svc.incoming.join("f.jsonl.tmp"), svc.incoming.join("f.jsonl")).unwrap();
    let mut seen = None;
    wait_for("the failing destination in /status", Duration::from_secs(30), || {
        let v: serde_json::Value = serde_json::from_str(&svc.get("/status")).unwrap();
        let d = v["destinations"].as_array().cloned().unwrap_or_default();
        let found = d.iter().find(|d| d["state"] == "backing-off").cloned();
        if found.is_some() {
            seen = Some(d);
        }
        found.is_some()
    });
    let d = seen.unwrap();
    eprintln!("{}", serde_json::to_string_pretty(&d).unwrap());
    assert_eq!(d.len(), 1, "only the failing destination: {d:?}");
    let down = &d[0];
    assert_eq!(down["destination"], closed.to_string(), "{down}");
    let err = down["last_error"].as_str().unwrap();
    assert!(
        err.contains("Connection refused") && err.contains(&closed.to_string()),
        "{err}"
    );
    assert!(down["last_error_seconds_ago"].as_f64().unwrap() < 30.0, "{down}");
    assert!(down["until_seconds"].as_f64().unwrap() > 0.0, "{down}");
    assert!(down["failures"].as_u64().unwrap() >= 1, "{down}");
    drop(svc);
    sink.stop();
}
