//! The exporter: an HTTP server (tiny_http) on its own thread with
//! `/metrics` (Prometheus text format) and `/status` (JSON). Each scrape asks
//! every shard for a snapshot over its request channel; a shard that has
//! stopped left its last snapshot behind, so counters never go back.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::Context;
use crossbeam_channel::{Receiver, Sender, bounded};
use prometheus::{Encoder, Registry, TextEncoder};
use serde::Serialize;

use super::{ShardSnapshot, SnapshotRequest, SpoolGauges, families, merge};

/// How long a scrape waits for a shard's snapshot before it uses the last one.
const SHARD_ANSWER: Duration = Duration::from_secs(2);
/// Requests waiting for a shard that does not answer (a stuck shard does not pile them up).
const PENDING_REQUESTS: usize = 4;

/// The shard's end of its link to the exporter.
pub struct ShardLink {
    pub requests: Receiver<SnapshotRequest>,
    /// Where the shard leaves its final snapshot when it stops.
    pub last: Arc<Mutex<Option<ShardSnapshot>>>,
}

struct ShardEnd {
    requests: Sender<SnapshotRequest>,
    last: Arc<Mutex<Option<ShardSnapshot>>>,
}

/// One spool file as `/status` shows it.
#[derive(Debug, Clone, Default, Serialize)]
pub struct FileStatus {
    pub name: String,
    /// `reading` until ingest has read it to its end, then `sending`;
    /// `retrying` when every recipient not final yet waits for a retry;
    /// `done` in `finished`.
    pub state: &'static str,
    /// Recipients in the file (null while it is being read).
    pub recipients: Option<u64>,
    pub finals: u64,
    pub delivered: u64,
    pub bounced: u64,
    pub expired: u64,
    pub rejected: u64,
    /// Deferred at least once and not final yet.
    pub deferred: u64,
    /// Recipients made final per second, over the last ten seconds or so.
    pub rate_per_second: f64,
    /// At that rate, once the file is read; null while everything left
    /// waits for a retry (it then depends on the servers, not on volley).
    pub eta_seconds: Option<f64>,
    /// When it was finished (in `finished`), RFC 3339.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<String>,
}

/// What the collector publishes (about once a second) for the exporter.
#[derive(Debug, Clone, Default)]
pub struct Board {
    pub files: Vec<FileStatus>,
    /// The last files finished, the newest first (counts include earlier runs').
    pub finished: Vec<FileStatus>,
    pub spool: SpoolGauges,
}

/// Shared by the collector (which publishes the board) and the exporter thread.
pub struct Hub {
    shards: Vec<ShardEnd>,
    max_domains: usize,
    board: Mutex<Board>,
    registry: Registry,
    started: Instant,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Hub {
    /// A hub for `shards` shards, and each shard's end of its link.
    pub fn new(shards: usize, max_domains: usize) -> (Arc<Hub>, Vec<ShardLink>) {
        let mut ends = Vec::new();
        let mut links = Vec::new();
        for _ in 0..shards {
            let (tx, rx) = bounded(PENDING_REQUESTS);
            let last = Arc::new(Mutex::new(None));
            ends.push(ShardEnd {
                requests: tx,
                last: last.clone(),
            });
            links.push(ShardLink { requests: rx, last });
        }
        let registry = Registry::new();
        #[cfg(target_os = "linux")]
        registry
            .register(Box::new(prometheus::process_collector::ProcessCollector::for_self()))
            .expect("the process collector registers once");
        let hub = Hub {
            shards: ends,
            max_domains,
            board: Mutex::default(),
            registry,
            started: Instant::now(),
        };
        (Arc::new(hub), links)
    }

    pub fn publish(&self, board: Board) {
        *lock(&self.board) = board;
    }

    /// Every shard's snapshot: fresh where the shard answers in time, else its last.
    fn snapshots(&self, full: bool) -> Vec<ShardSnapshot> {
        let asked: Vec<_> = self
            .shards
            .iter()
            .map(|s| {
                let (tx, rx) = bounded(1);
                let sent = s.requests.try_send(SnapshotRequest { full, reply: tx }).is_ok();
                (s, sent.then_some(rx))
            })
            .collect();
        let deadline = Instant::now() + SHARD_ANSWER;
        asked
            .into_iter()
            .enumerate()
            .map(|(i, (s, rx))| {
                let fresh = rx.and_then(|rx| rx.recv_deadline(deadline).ok());
                let mut last = lock(&s.last);
                match fresh {
                    Some(snap) if full => {
                        *last = Some(snap.clone());
                        snap
                    }
                    Some(snap) => snap,
                    None => last.clone().unwrap_or_else(|| ShardSnapshot {
                        shard: i,
                        ..ShardSnapshot::default()
                    }),
                }
            })
            .collect()
    }

    /// The `/metrics` page.
    pub fn render_metrics(&self) -> String {
        let merged = merge(self.snapshots(true), self.max_domains);
        let spool = lock(&self.board).spool.clone();
        let mut fams = self.registry.gather();
        fams.extend(families(&merged, &spool));
        if let Some(f) = crate::fleet::state() {
            fams.extend(super::render::fleet_families(f));
        }
        let mut buf = Vec::new();
        TextEncoder::new()
            .encode(&fams, &mut buf)
            .expect("metric families are well formed");
        String::from_utf8(buf).expect("the text format is UTF-8")
    }

    /// The `/status` page.
    pub fn render_status(&self) -> String {
        #[derive(Serialize)]
        struct ShardStatus {
            shard: usize,
            recipients: u64,
            retry_backlog: u64,
            domains: u64,
            destinations: u64,
            connections_open: u64,
        }
        #[derive(Serialize)]
        struct Status<'a> {
            version: &'static str,
            uptime_seconds: f64,
            spool: &'a SpoolGauges,
            files: &'a [FileStatus],
            /// The last files finished, the newest first.
            finished: &'a [FileStatus],
            shards: Vec<ShardStatus>,
            /// Automation rules in force, per destination and shard.
            automation: Vec<super::ActiveRule>,
            /// Destinations that failed, with their last error and state, the worst first.
            destinations: Vec<super::DestState>,
        }
        let snaps = self.snapshots(false);
        let mut automation: Vec<super::ActiveRule> = snaps.iter().flat_map(|s| s.active_rules.clone()).collect();
        automation.sort_by(|a, b| (&a.scope, &a.destination, a.shard).cmp(&(&b.scope, &b.destination, b.shard)));
        let mut destinations: Vec<super::DestState> = snaps.iter().flat_map(|s| s.troubled.clone()).collect();
        super::worst_first(&mut destinations);
        destinations.truncate(super::MAX_TROUBLED);
        let shards = snaps
            .into_iter()
            .map(|s| ShardStatus {
                shard: s.shard,
                recipients: s.held,
                retry_backlog: s.retry_backlog,
                domains: s.domains_known,
                destinations: s.destinations,
                connections_open: s.connections_open,
            })
            .collect();
        let board = lock(&self.board);
        let status = Status {
            version: env!("CARGO_PKG_VERSION"),
            uptime_seconds: self.started.elapsed().as_secs_f64(),
            spool: &board.spool,
            files: &board.files,
            finished: &board.finished,
            shards,
            automation,
            destinations,
        };
        serde_json::to_string_pretty(&status).expect("status serializes") + "\n"
    }
}

/// The HTTP server; stops when dropped.
pub struct Exporter {
    server: Arc<tiny_http::Server>,
    thread: Option<JoinHandle<()>>,
    addr: SocketAddr,
}

impl Exporter {
    pub fn start(addr: SocketAddr, hub: Arc<Hub>) -> anyhow::Result<Exporter> {
        let server = tiny_http::Server::http(addr)
            .map_err(|e| anyhow::anyhow!("{e}"))
            .with_context(|| format!("cannot serve metrics on {addr}"))?;
        let addr = server.server_addr().to_ip().unwrap_or(addr);
        let server = Arc::new(server);
        let s = server.clone();
        let thread = std::thread::Builder::new()
            .name("volley-metrics".into())
            .spawn(move || serve(&s, &hub))
            .context("cannot start the metrics thread")?;
        Ok(Exporter {
            server,
            thread: Some(thread),
            addr,
        })
    }

    /// The address it listens on (the port chosen when 0 was asked for).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for Exporter {
    fn drop(&mut self) {
        self.server.unblock();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn serve(server: &tiny_http::Server, hub: &Hub) {
    use tiny_http::{Header, Method, Response};
    for req in server.incoming_requests() {
        let path = req.url().split('?').next().unwrap_or("").to_string();
        let (body, status, ctype) = match (req.method(), path.as_str()) {
            (Method::Get, "/metrics") => (hub.render_metrics(), 200, prometheus::TEXT_FORMAT),
            (Method::Get, "/status") => (hub.render_status(), 200, "application/json"),
            (Method::Get, "/") => (
                "volley: see /metrics (Prometheus) and /status (JSON)\n".to_string(),
                200,
                "text/plain; charset=utf-8",
            ),
            (Method::Get, _) => ("not found\n".to_string(), 404, "text/plain; charset=utf-8"),
            _ => ("only GET\n".to_string(), 405, "text/plain; charset=utf-8"),
        };
        let header = Header::from_bytes("Content-Type", ctype).expect("valid header");
        let _ = req.respond(Response::from_string(body).with_status_code(status).with_header(header));
    }
}
