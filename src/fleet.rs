//! What the nodes of a fleet share, through Redis: automation rules marked
//! `fleet = true` (a reason that concerns the sending domain, not one IP),
//! and how many nodes are alive. A node whose rule fires publishes it; every
//! node applies the rules the others published to its destinations of the
//! same name and scope, until they end. Each node beats in `{name}:nodes`
//! every poll; `fleet_message_rate` (a shaping knob) is divided by the nodes
//! alive, so the fleet keeps to it however many nodes run, with no round
//! trip to Redis on any transaction's path (a GCRA in Redis per message,
//! as KumoMTA's shared throttles do it, would put one there).
//!
//! The exchange runs on a thread of its own with a plain Redis connection
//! (nothing of it is on a shard's path): rules in force are members of one
//! sorted set, `{name}:rules`, scored by when they end (ms since the Unix
//! epoch), so a node that starts or reconnects late still sees the rules in
//! force, and ended ones are removed by whoever looks. Redis being
//! unreachable changes nothing else: the node keeps to its own rules and
//! limits, retries the connection every few seconds, and says so in its
//! metrics (`volley_fleet_redis_up 0`) and its log.

use std::sync::Arc;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crossbeam_channel::{Receiver, RecvTimeoutError};
use serde::{Deserialize, Serialize};

use crate::shard::Budgets;
use crate::shard::budget::RuleNews;

/// `[fleet]` in the configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FleetConfig {
    /// `redis://HOST:PORT/` (or `redis://HOST:PORT/DB`).
    pub redis: String,
    /// This node's name in what it publishes; default: `POD_NAME`, else the host name.
    pub node: Option<String>,
    /// The fleet's name: the prefix of its Redis keys (several fleets may share a Redis).
    #[serde(default = "default_name")]
    pub name: String,
    /// How often the rules of the others are read.
    #[serde(with = "humantime_serde", default = "default_poll")]
    pub poll_interval: Duration,
}

fn default_name() -> String {
    "volley".into()
}

fn default_poll() -> Duration {
    Duration::from_millis(500)
}

/// A rule as the fleet shares it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SharedRule {
    pub node: String,
    /// The destination's name (its MX host set or route) and its shaping scope.
    pub label: String,
    pub scope: String,
    pub rule: String,
    /// When it ends, ms since the Unix epoch.
    pub until_ms: u64,
}

/// The exchange's state, for the metrics.
#[derive(Debug, Default)]
pub struct FleetState {
    pub up: AtomicBool,
    pub published: AtomicU64,
    pub received: AtomicU64,
    pub errors: AtomicU64,
}

static STATE: OnceLock<Arc<FleetState>> = OnceLock::new();

/// Nodes of the fleet seen alive (this one among them) as of the last
/// exchange with Redis; 1 outside a fleet or before Redis first answered,
/// and the last count while it does not answer.
static NODES_ALIVE: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(1);

/// The number `fleet_message_rate` is divided by.
pub fn nodes_alive() -> u32 {
    NODES_ALIVE.load(Ordering::Relaxed).max(1)
}

/// A node is alive while its last heartbeat is this recent (in polls).
const ALIVE_POLLS: u32 = 6;

/// Heartbeats kept this long (ms): what a node that just joined counts.
const REMEMBER_MS: u64 = 60_000;

/// The exchange's state where this process is part of a fleet.
pub fn state() -> Option<&'static Arc<FleetState>> {
    STATE.get()
}

/// A rule this node fired, to publish.
pub struct Outgoing {
    pub label: String,
    pub scope: String,
    pub rule: String,
    pub until: Instant,
}

fn epoch_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).unwrap_or_default().as_millis() as u64
}

/// The node's name: configured, else the pod's (a StatefulSet's `volley-2`), else the host's.
pub fn node_name(cfg: &FleetConfig) -> String {
    cfg.node
        .clone()
        .or_else(|| std::env::var("POD_NAME").ok().filter(|s| !s.is_empty()))
        .unwrap_or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|s| s.trim().to_string())
                .unwrap_or_else(|_| "volley".into())
        })
}

/// This process's part in a fleet: the exchange ends when it is dropped.
pub struct Membership {
    budgets: Arc<Budgets>,
}

impl Drop for Membership {
    fn drop(&mut self) {
        self.budgets.leave_fleet();
        // Outside a fleet, fleet_message_rate is this process's alone.
        NODES_ALIVE.store(1, Ordering::Relaxed);
    }
}

/// Starts the exchange: rules fired here go out, the others' come in to
/// every shard through `budgets`.
pub fn join(cfg: &FleetConfig, budgets: Arc<Budgets>) -> anyhow::Result<Membership> {
    start(cfg, budgets.clone())?;
    Ok(Membership { budgets })
}

fn start(cfg: &FleetConfig, budgets: Arc<Budgets>) -> anyhow::Result<std::thread::JoinHandle<()>> {
    let client =
        redis::Client::open(cfg.redis.as_str()).map_err(|e| anyhow::anyhow!("[fleet] redis = {:?}: {e}", cfg.redis))?;
    let state = STATE.get_or_init(|| Arc::new(FleetState::default())).clone();
    let (tx, rx) = crossbeam_channel::unbounded();
    budgets.set_fleet(tx);
    let mut ex = Exchange {
        client,
        node: node_name(cfg),
        key: format!("{}:rules", cfg.name),
        nodes_key: format!("{}:nodes", cfg.name),
        joined: Instant::now(),
        poll: cfg.poll_interval,
        state,
        budgets,
        con: None,
        retry_at: Instant::now(),
        down_since: None,
        pending: Vec::new(),
        seen: std::collections::HashMap::new(),
    };
    // Once before any shard starts: rules in force on the fleet hold from
    // this node's first connection (at most a second's wait when Redis is away).
    ex.exchange(true);
    Ok(std::thread::Builder::new()
        .name("volley-fleet".into())
        .spawn(move || ex.run(rx))?)
}

struct Exchange {
    client: redis::Client,
    node: String,
    key: String,
    /// The nodes' heartbeats: a sorted set scored by each one's last (ms since the epoch).
    nodes_key: String,
    joined: Instant,
    poll: Duration,
    state: Arc<FleetState>,
    budgets: Arc<Budgets>,
    con: Option<redis::Connection>,
    retry_at: Instant,
    down_since: Option<Instant>,
    /// Rules fired while Redis was away, published when it is back (if still in force).
    pending: Vec<SharedRule>,
    /// The others' rules taken in, and when they end (ms since the epoch).
    seen: std::collections::HashMap<String, u64>,
}

const TIMEOUT: Duration = Duration::from_secs(1);
const RECONNECT_EVERY: Duration = Duration::from_secs(3);

impl Exchange {
    fn run(mut self, rx: Receiver<Outgoing>) {
        let mut next_poll = Instant::now();
        loop {
            match rx.recv_timeout(next_poll.saturating_duration_since(Instant::now())) {
                Ok(o) => {
                    let now = Instant::now();
                    let until = SystemTime::now() + o.until.saturating_duration_since(now);
                    self.pending.push(SharedRule {
                        node: self.node.clone(),
                        label: o.label,
                        scope: o.scope,
                        rule: o.rule,
                        until_ms: epoch_ms(until),
                    });
                    self.exchange(false);
                }
                Err(RecvTimeoutError::Timeout) => {
                    self.exchange(true);
                    next_poll = Instant::now() + self.poll;
                }
                Err(RecvTimeoutError::Disconnected) => return,
            }
        }
    }

    fn connection(&mut self) -> Option<&mut redis::Connection> {
        if self.con.is_none() && Instant::now() >= self.retry_at {
            match self.client.get_connection_with_timeout(TIMEOUT) {
                Ok(c) => {
                    let _ = c.set_read_timeout(Some(TIMEOUT));
                    let _ = c.set_write_timeout(Some(TIMEOUT));
                    if let Some(since) = self.down_since.take() {
                        tracing::info!(
                            "fleet: Redis is back after {:.0?}: sharing rules again",
                            since.elapsed()
                        );
                    }
                    self.con = Some(c);
                    self.state.up.store(true, Ordering::Relaxed);
                }
                Err(e) => self.failed(&e),
            }
        }
        self.con.as_mut()
    }

    fn failed(&mut self, e: &redis::RedisError) {
        self.con = None;
        self.retry_at = Instant::now() + RECONNECT_EVERY;
        self.state.up.store(false, Ordering::Relaxed);
        self.state.errors.fetch_add(1, Ordering::Relaxed);
        if self.down_since.is_none() {
            self.down_since = Some(Instant::now());
            tracing::warn!(
                "fleet: Redis unreachable ({e}): this node keeps to its own rules and limits; trying again every {}s",
                RECONNECT_EVERY.as_secs()
            );
        }
    }

    /// Publishes what is pending and, when `read`, reads the others' rules.
    fn exchange(&mut self, read: bool) {
        let now_ms = epoch_ms(SystemTime::now());
        self.pending.retain(|r| r.until_ms > now_ms);
        let key = self.key.clone();
        let (nodes, me) = (self.nodes_key.clone(), self.node.clone());
        let alive_since = now_ms.saturating_sub(self.poll.as_millis() as u64 * u64::from(ALIVE_POLLS));
        // Until this node has been here as long as a beat stays fresh, it may
        // not have seen the others that started with it: it counts those seen
        // in the last minute too (a fleet restarting), rather than take the
        // whole rate.
        let since = if self.joined.elapsed() < self.poll * ALIVE_POLLS {
            now_ms.saturating_sub(REMEMBER_MS)
        } else {
            alive_since
        };
        let pending = std::mem::take(&mut self.pending);
        let Some(con) = self.connection() else {
            self.pending = pending;
            return;
        };
        let mut pipe = redis::pipe();
        for r in &pending {
            let member = serde_json::to_string(r).expect("a rule serialises");
            pipe.cmd("ZADD").arg(&key).arg(r.until_ms).arg(member).ignore();
        }
        pipe.cmd("ZREMRANGEBYSCORE").arg(&key).arg("-inf").arg(now_ms).ignore();
        let result: redis::RedisResult<(Vec<String>, u32)> = if read {
            // The heartbeat: this node is alive now; the others are while theirs is recent.
            pipe.cmd("ZADD").arg(&nodes).arg(now_ms).arg(&me).ignore();
            pipe.cmd("ZREMRANGEBYSCORE")
                .arg(&nodes)
                .arg("-inf")
                .arg(now_ms.saturating_sub(REMEMBER_MS))
                .ignore();
            pipe.cmd("ZRANGEBYSCORE")
                .arg(&key)
                .arg(format!("({now_ms}"))
                .arg("+inf");
            pipe.cmd("ZCOUNT").arg(&nodes).arg(since).arg("+inf");
            pipe.query(con)
        } else {
            pipe.query::<()>(con).map(|()| (Vec::new(), 0))
        };
        match result {
            Ok((answers, alive)) => {
                if read {
                    let alive = alive.max(1);
                    if NODES_ALIVE.swap(alive, Ordering::Relaxed) != alive {
                        tracing::info!("fleet: {alive} nodes alive (they share fleet_message_rate)");
                    }
                }
                self.state.published.fetch_add(pending.len() as u64, Ordering::Relaxed);
                for r in &pending {
                    tracing::info!(
                        "fleet: shared rule {} on {} ({}) with the other nodes",
                        r.rule,
                        r.label,
                        r.scope
                    );
                }
                self.seen.retain(|_, until| *until > now_ms);
                for member in answers {
                    self.received(member, now_ms);
                }
            }
            Err(e) => {
                self.pending = pending;
                self.failed(&e);
            }
        }
    }

    /// A rule in force on the fleet, new to this node: every shard applies
    /// it to its destinations of that name and scope, and keeps it for those
    /// it makes while it holds (so it is announced once).
    fn received(&mut self, member: String, now_ms: u64) {
        let Ok(r) = serde_json::from_str::<SharedRule>(&member) else {
            return;
        };
        if r.node == self.node {
            return;
        }
        if self.seen.insert(member, r.until_ms).is_some() {
            return;
        }
        self.state.received.fetch_add(1, Ordering::Relaxed);
        tracing::info!(
            "fleet: rule {} on {} ({}) from node {}",
            r.rule,
            r.label,
            r.scope,
            r.node
        );
        let until = Instant::now() + Duration::from_millis(r.until_ms.saturating_sub(now_ms));
        self.budgets.announce_fleet(RuleNews {
            key: Box::from(""),
            fleet: Some((Box::from(r.label.as_str()), Box::from(r.scope.as_str()))),
            rule: r.rule,
            until,
        });
    }
}
