//! `volley demo`: the whole path on loopback with no set-up: an in-process
//! sink, a generated spool of 100,000 recipients over 1,000 domains, and a send.

use std::time::Duration;

use crate::collector::Summary;
use crate::config::Config;
use crate::generator::{GenOptions, generate};
use crate::send::{Progress, SendOptions, send};
use crate::sink::{Sink, SinkCounts, SinkOptions};

pub struct DemoOptions {
    pub recipients: u64,
    pub domains: u64,
    pub shards: Option<usize>,
    pub progress: Progress,
}

impl Default for DemoOptions {
    fn default() -> Self {
        DemoOptions {
            recipients: 100_000,
            domains: 1_000,
            shards: None,
            progress: Progress::Auto,
        }
    }
}

pub struct DemoResult {
    pub summary: Summary,
    pub sink: SinkCounts,
    pub expected: u64,
}

impl DemoResult {
    pub fn ok(&self) -> bool {
        self.summary.count(crate::outcome::Outcome::Delivered) == self.expected && self.sink.recipients == self.expected
    }
}

pub fn demo(o: DemoOptions) -> anyhow::Result<DemoResult> {
    let dir = tempfile::tempdir()?;
    let mut config = Config {
        shards: o.shards,
        ..Config::default()
    };
    let sink = Sink::start(SinkOptions {
        listen: "127.0.0.1:0".parse()?,
        shards: config.shards(),
        // As most big receivers do: volley then sends with BDAT windows.
        chunking: true,
        ..SinkOptions::default()
    })?;
    let spool = dir.path().join("demo.jsonl");
    generate(&GenOptions {
        out: spool.clone(),
        jobs: o.recipients,
        domains: o.domains,
        size: 1500,
        rcpts_per_job: 1,
        from: "bounces@demo.volley.test".into(),
        personalised: false,
    })?;
    config.add_route(&format!("*={}", sink.addr()))?;
    config.retry.initial = Duration::from_millis(200);
    eprintln!(
        "volley demo: {} recipients over {} domains, 1.5 KB each, to the sink on {}",
        o.recipients,
        o.domains,
        sink.addr()
    );
    let summary = send(SendOptions {
        spools: vec![spool],
        config,
        progress: o.progress,
        stop: None,
        watch: None,
    });
    let counts = sink.stop();
    Ok(DemoResult {
        summary: summary?,
        sink: counts,
        expected: o.recipients,
    })
}
