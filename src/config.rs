//! Configuration: the TOML file, its defaults, and command-line overrides.
//! Policy lives here (limits, timeouts, retry schedule, routes); the
//! mechanisms that apply it live in the shard and the driver.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use serde::Deserialize;

use crate::smtp::{Credentials, Wait};
use crate::tls::TlsPolicy;

/// Where `volley run` serves metrics unless told otherwise (the port registered for Prometheus exporters of this kind).
pub const DEFAULT_METRICS_LISTEN: &str = "127.0.0.1:9464";

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Executors (one per core); default: the cores available.
    pub shards: Option<usize>,
    /// Name sent in EHLO/HELO; default: this host's name.
    pub ehlo_name: Option<String>,
    /// Open connections per destination for the whole process, split among the shards.
    pub max_connections_per_destination: usize,
    pub max_messages_per_connection: usize,
    pub max_rcpts_per_txn: usize,
    /// Recipients a shard holds queued or in flight before it stops taking more from ingest.
    pub max_queued_recipients_per_shard: usize,
    /// Recipients a shard holds waiting for a retry before it stops taking more from ingest
    /// (they do not count against `max_queued_recipients_per_shard`).
    pub max_deferred_recipients_per_shard: usize,
    /// Recipients of one domain a shard holds queued or in flight before ingest
    /// passes that domain's lines over (and comes back for them), so a slow
    /// domain leaves the rest of its shard's room to the other domains.
    pub max_queued_recipients_per_domain: usize,
    /// Domains spread over every shard by a hash of the recipient from the
    /// start (others are spread once they carry a large share of the work).
    pub spread_domains: Vec<String>,
    /// A spool line longer than this is rejected unread.
    pub max_job_line_bytes: usize,
    /// A message file larger than this is refused: its jobs' recipients are rejected.
    pub max_message_bytes: u64,
    /// Message files mapped at once (each stays mapped while work uses it); past
    /// this, ingest waits for room.
    pub max_message_files_in_use: usize,
    /// Bytes of message files mapped at once; past this, ingest waits for room.
    pub max_message_bytes_in_use: u64,
    /// A connection with nothing to do for this long says QUIT.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    pub timeouts: Timeouts,
    pub retry: Retry,
    /// Retry schedules per domain (complete tables; unset keys take the built-in defaults).
    pub retry_domain: BTreeMap<String, Retry>,
    /// Traffic shaping files, layered in order over the built-in
    /// deploy/shaping.toml (paths as given, like `bounce_rules`).
    pub shaping: Vec<PathBuf>,
    /// DKIM keys by the From: domain they sign for (`[dkim."DOMAIN"]`).
    pub dkim: BTreeMap<String, crate::dkim::DomainSpec>,
    /// Headers volley adds to messages that lack them (`[headers]`).
    pub headers: crate::headers::HeadersConfig,
    /// Recipients an earlier run finished with one of these outcomes are
    /// sent again (`volley send --resend`; not a configuration key).
    #[serde(skip)]
    pub resend: Vec<crate::outcome::Outcome>,
    /// VERP for every job without its own `verp`: a template of each
    /// recipient's envelope sender, e.g. `"{{ from_local }}+{{ rcpt_local
    /// }}={{ rcpt_domain }}@{{ from_domain }}"`.
    pub verp: Option<String>,
    /// Domain (or `*`) → `HOST:PORT` or a relay table; a routed domain skips MX lookup.
    pub routes: BTreeMap<String, RouteSpec>,
    /// Port of the MX hosts (25; other values are for tests and labs).
    pub mx_port: u16,
    /// TLS policy for every domain without its own in `tls_policy`.
    pub tls: TlsPolicy,
    /// TLS policy per domain.
    pub tls_policy: BTreeMap<String, TlsPolicy>,
    /// Local addresses to send from, in rotation (empty: the kernel chooses).
    pub source_addresses: Vec<SourceAddress>,
    /// Source addresses per domain, instead of `source_addresses`.
    pub domain_source_addresses: BTreeMap<String, Vec<SourceAddress>>,
    /// Extra trust roots (PEM) for the `verify` policy, beside the system store.
    pub ca_file: Option<PathBuf>,
    /// After a failed handshake under `opportunistic`, a host gets plaintext for this long.
    #[serde(with = "humantime_serde")]
    pub tls_fallback: Duration,
    pub dns: DnsConfig,
    /// `[fleet]`: the Redis through which the nodes of a fleet share rules.
    pub fleet: Option<crate::fleet::FleetConfig>,
    /// Delivery log (JSON Lines), appended to.
    pub log: Option<PathBuf>,
    /// `volley run`: the spool directory (incoming/, active/, done/, failed/).
    pub spool_dir: Option<PathBuf>,
    /// Bounce classification rules (TOML); default: the built-in rules.
    pub bounce_rules: Option<PathBuf>,
    /// On SIGTERM/SIGINT, how long transactions in flight may take to finish.
    #[serde(with = "humantime_serde")]
    pub shutdown_timeout: Duration,
    /// Keep a progress journal beside each spool file (`NAME.journal`).
    pub journal: bool,
    /// fdatasync each group of journal records (off only for benchmarks).
    pub journal_fsync: bool,
    /// How long final outcomes gather before they are written and synced as one group.
    #[serde(with = "humantime_serde")]
    pub journal_sync_interval: Duration,
    /// `IP:PORT` to serve `/metrics` and `/status` on; `volley run` defaults to
    /// `127.0.0.1:9464`, `send` serves none unless asked; `""` turns it off.
    pub metrics_listen: Option<String>,
    /// Domains with their own `domain` label; the rest are summed into `_other`.
    pub metrics_max_domains: usize,
    /// Use PIPELINING (RFC 2920) where offered; off: every command waits for its reply.
    pub pipelining: bool,
    /// Use CHUNKING (RFC 3030, BDAT) where offered with PIPELINING.
    pub chunking: bool,
    /// With CHUNKING: transactions in flight at once on one connection, to start with.
    pub pipeline_window: usize,
    /// With CHUNKING: what that window may grow to while the server takes
    /// every transaction whole (one more per transaction, halved when it
    /// puts off MAIL or BDAT); equal to `pipeline_window`: no growth. Unset:
    /// `PIPELINE_WINDOW_MAX` or `pipeline_window`, whichever is larger
    /// (see [`Config::window_max`]).
    pub pipeline_window_max: Option<usize>,
    /// With CHUNKING: message bytes in flight at once on one connection.
    pub pipeline_window_bytes: usize,
}

/// What the BDAT window grows to when `pipeline_window_max` is not set.
pub const PIPELINE_WINDOW_MAX: usize = 64;

/// Durations past this are surely mistakes (and `Instant + d` would overflow).
const LONGEST_DAYS: u64 = 3650;
const LONGEST_DURATION: Duration = Duration::from_secs(LONGEST_DAYS * 86_400);

impl Default for Config {
    fn default() -> Self {
        Config {
            shards: None,
            ehlo_name: None,
            max_connections_per_destination: 20,
            max_messages_per_connection: 1000,
            max_rcpts_per_txn: 100,
            max_queued_recipients_per_shard: 100_000,
            max_deferred_recipients_per_shard: 1_000_000,
            max_queued_recipients_per_domain: 20_000,
            spread_domains: Vec::new(),
            max_job_line_bytes: 64 << 20,
            max_message_bytes: 50 << 20,
            max_message_files_in_use: 10_000,
            max_message_bytes_in_use: 1 << 30,
            idle_timeout: Duration::from_secs(5),
            timeouts: Timeouts::default(),
            retry: Retry::default(),
            retry_domain: BTreeMap::new(),
            shaping: Vec::new(),
            dkim: BTreeMap::new(),
            headers: crate::headers::HeadersConfig::default(),
            verp: None,
            resend: Vec::new(),
            routes: BTreeMap::new(),
            mx_port: 25,
            tls: TlsPolicy::default(),
            tls_policy: BTreeMap::new(),
            source_addresses: Vec::new(),
            domain_source_addresses: BTreeMap::new(),
            ca_file: None,
            tls_fallback: Duration::from_secs(600),
            dns: DnsConfig::default(),
            fleet: None,
            log: None,
            spool_dir: None,
            bounce_rules: None,
            shutdown_timeout: Duration::from_secs(30),
            journal: true,
            journal_fsync: true,
            journal_sync_interval: Duration::from_millis(5),
            metrics_listen: None,
            metrics_max_domains: 100,
            pipelining: true,
            chunking: true,
            pipeline_window: 8,
            pipeline_window_max: None,
            pipeline_window_bytes: 1 << 20,
        }
    }
}

/// Where a route sends: `"HOST:PORT"`, or a relay (smarthost) table.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum RouteSpec {
    Target(String),
    Relay(RelaySpec),
}

/// `{ host = "smtp.relay.example:587", auth = { user = "u", password_file = "/etc/volley/relay.pass" } }`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RelaySpec {
    pub host: String,
    pub auth: Option<AuthSpec>,
    /// TLS from the first byte (port 465); default: true on port 465.
    pub implicit_tls: Option<bool>,
    /// Allow AUTH without TLS.
    #[serde(default)]
    pub allow_plaintext_auth: bool,
    /// TLS policy for this relay (default: the domain's).
    pub tls: Option<TlsPolicy>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthSpec {
    pub user: String,
    /// A file holding the password (a final newline is ignored).
    pub password_file: PathBuf,
}

/// A local address to send from, with the EHLO name that goes with it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SourceAddress {
    pub address: IpAddr,
    /// Default: the global `ehlo_name`.
    pub ehlo_name: Option<String>,
}

impl<'de> Deserialize<'de> for SourceAddress {
    /// `"192.0.2.7"` or `{ address = "192.0.2.7", ehlo_name = "mta7.example.com" }`.
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Full {
            address: IpAddr,
            ehlo_name: Option<String>,
        }
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Either {
            Bare(IpAddr),
            Full(Full),
        }
        match Either::deserialize(d).map_err(|_| {
            serde::de::Error::custom("a source address is \"IP\" or { address = \"IP\", ehlo_name = \"NAME\" }")
        })? {
            Either::Bare(address) => Ok(SourceAddress {
                address,
                ehlo_name: None,
            }),
            Either::Full(f) => Ok(SourceAddress {
                address: f.address,
                ehlo_name: f.ehlo_name,
            }),
        }
    }
}

/// MX resolution: which nameservers, and how long answers are kept.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DnsConfig {
    /// Nameservers as `IP:PORT`; empty means those of /etc/resolv.conf.
    pub servers: Vec<SocketAddr>,
    /// Per query attempt.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// Attempts per query: a lookup that has no answer after `attempts ×
    /// timeout` is deferred (a temporary DNS failure).
    pub attempts: usize,
    /// Answers are kept at least this long, whatever their TTL…
    #[serde(with = "humantime_serde")]
    pub min_ttl: Duration,
    /// …and at most this long.
    #[serde(with = "humantime_serde")]
    pub max_ttl: Duration,
    /// How long "no such domain" and null MX answers are kept.
    #[serde(with = "humantime_serde")]
    pub negative_ttl: Duration,
    /// Queries in flight at once (each has a socket of its own); the rest wait their turn.
    pub max_in_flight: usize,
    /// Side threads that make the lookups, each with its own resolver
    /// (lookups go to them in turn; the MX hosts' addresses are shared).
    pub threads: usize,
}

impl Default for DnsConfig {
    fn default() -> Self {
        DnsConfig {
            servers: Vec::new(),
            timeout: Duration::from_secs(5),
            attempts: 2,
            min_ttl: Duration::from_secs(30),
            max_ttl: Duration::from_secs(3600),
            negative_ttl: Duration::from_secs(60),
            max_in_flight: 256,
            threads: 4,
        }
    }
}

impl DnsConfig {
    /// How long to keep an answer whose TTL is `ttl`.
    pub fn keep(&self, ttl: Duration) -> Duration {
        ttl.clamp(self.min_ttl, self.max_ttl.max(self.min_ttl))
    }
}

/// Timeouts per RFC 5321 §4.5.3.2 (defaults are the RFC's minimums).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Timeouts {
    #[serde(with = "humantime_serde")]
    pub connect: Duration,
    #[serde(with = "humantime_serde")]
    pub greeting: Duration,
    #[serde(with = "humantime_serde")]
    pub ehlo: Duration,
    #[serde(with = "humantime_serde")]
    pub mail: Duration,
    #[serde(with = "humantime_serde")]
    pub rcpt: Duration,
    #[serde(with = "humantime_serde")]
    pub data_init: Duration,
    /// For each write of message data.
    #[serde(with = "humantime_serde")]
    pub data_block: Duration,
    #[serde(with = "humantime_serde")]
    pub data_term: Duration,
    #[serde(with = "humantime_serde")]
    pub quit: Duration,
    /// For the TLS handshake after STARTTLS.
    #[serde(with = "humantime_serde")]
    pub starttls: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        let m = |n: u64| Duration::from_secs(60 * n);
        Timeouts {
            connect: Duration::from_secs(30),
            greeting: m(5),
            ehlo: m(5),
            mail: m(5),
            rcpt: m(5),
            data_init: m(2),
            data_block: m(3),
            data_term: m(10),
            quit: Duration::from_secs(30),
            starttls: Duration::from_secs(30),
        }
    }
}

impl Timeouts {
    pub fn for_wait(&self, wait: Wait) -> Duration {
        match wait {
            Wait::Greeting => self.greeting,
            Wait::Ehlo | Wait::StartTls => self.ehlo,
            Wait::Mail | Wait::Rset => self.mail,
            Wait::Rcpt => self.rcpt,
            Wait::DataInit => self.data_init,
            Wait::DataTerm => self.data_term,
            Wait::Quit => self.quit,
        }
    }
}

/// Exponential backoff for deferred recipients.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Retry {
    #[serde(with = "humantime_serde")]
    pub initial: Duration,
    pub multiplier: f64,
    #[serde(with = "humantime_serde")]
    pub max_delay: Duration,
    /// A recipient still deferred this long after it was first seen expires.
    #[serde(with = "humantime_serde")]
    pub max_age: Duration,
    /// Each delay is spread by up to ± this fraction, so retries do not arrive in lockstep.
    pub jitter: f64,
}

impl Default for Retry {
    fn default() -> Self {
        Retry {
            initial: Duration::from_secs(1),
            multiplier: 2.0,
            max_delay: Duration::from_secs(300),
            max_age: Duration::from_secs(3600),
            jitter: 0.1,
        }
    }
}

impl Retry {
    /// Delay before attempt `attempt + 1`, after `attempt` attempts (1-based).
    pub fn delay(&self, attempt: u32) -> Duration {
        let factor = self.multiplier.max(1.0).powi(attempt.saturating_sub(1).min(64) as i32);
        let spread = 1.0 + self.jitter.clamp(0.0, 1.0) * (fastrand::f64() * 2.0 - 1.0);
        // In float seconds: initial × factor outgrows a Duration long before the cap applies.
        let secs = (self.initial.as_secs_f64() * factor).min(self.max_delay.as_secs_f64()) * spread;
        Duration::try_from_secs_f64(secs).unwrap_or(self.max_delay)
    }
}

impl Config {
    /// The bound of the BDAT window: `pipeline_window_max`, or when unset
    /// `PIPELINE_WINDOW_MAX` or `pipeline_window`, whichever is larger.
    pub fn window_max(&self) -> usize {
        self.pipeline_window_max
            .unwrap_or(PIPELINE_WINDOW_MAX.max(self.pipeline_window))
    }

    pub fn load(path: &Path) -> anyhow::Result<Config> {
        let text = std::fs::read_to_string(path).with_context(|| format!("cannot read config {}", path.display()))?;
        if let Ok(t) = toml::from_str::<toml::Table>(&text)
            && t.contains_key("domain_backoff_after")
        {
            bail!(
                "bad config {}: domain_backoff_after is gone: a destination that defers every transaction is now \
                 suspended by the automation rule \"deferred-in-a-row\" (10 in a row, 1m) of the built-in \
                 deploy/shaping.toml; to change it, give a [[default.automation]] rule of that name in a \
                 shaping file (see the README's traffic shaping section)",
                path.display()
            );
        }
        toml::from_str(&text).with_context(|| format!("bad config {}", path.display()))
    }

    /// Loads a config for `volley run`: without a `[retry]` table the
    /// service's schedule applies (first retry after 1 min, doubling, at most
    /// 1 h apart, for 3 days).
    pub fn load_for_run(path: &Path) -> anyhow::Result<Config> {
        let mut cfg = Config::load(path)?;
        let text = std::fs::read_to_string(path)?;
        let table: toml::Table = toml::from_str(&text).with_context(|| format!("bad config {}", path.display()))?;
        if !table.contains_key("metrics_listen") {
            cfg.metrics_listen = Some(DEFAULT_METRICS_LISTEN.to_string());
        }
        if !table.contains_key("retry") {
            cfg.retry = Retry {
                initial: Duration::from_secs(60),
                max_delay: Duration::from_secs(3600),
                max_age: Duration::from_secs(3 * 86400),
                ..Retry::default()
            };
        }
        Ok(cfg)
    }

    /// Where to serve metrics, if anywhere.
    pub fn metrics_addr(&self) -> anyhow::Result<Option<SocketAddr>> {
        match self.metrics_listen.as_deref().map(str::trim) {
            None | Some("") => Ok(None),
            Some(a) => a
                .parse()
                .map(Some)
                .with_context(|| format!("metrics_listen: {a:?} is not an IP:PORT address")),
        }
    }

    pub fn shards(&self) -> usize {
        self.shards
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
            .max(1)
    }

    pub fn ehlo_name(&self) -> String {
        self.ehlo_name.clone().unwrap_or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
                .unwrap_or_else(|| "localhost".into())
        })
    }

    /// The source addresses of a lower-cased domain (empty: the kernel chooses).
    pub fn sources_of(&self, domain: &str) -> &[SourceAddress] {
        self.domain_source_addresses
            .get(domain)
            .unwrap_or(&self.source_addresses)
    }

    /// True when some connection must be bound to a source address.
    pub fn binds_sources(&self) -> bool {
        !self.source_addresses.is_empty() || self.domain_source_addresses.values().any(|v| !v.is_empty())
    }

    /// The retry schedule of a lower-cased domain.
    pub fn retry_of(&self, domain: &str) -> &Retry {
        self.retry_domain.get(domain).unwrap_or(&self.retry)
    }

    /// The TLS policy of a lower-cased domain.
    pub fn tls_policy_of(&self, domain: &str) -> TlsPolicy {
        self.tls_policy.get(domain).copied().unwrap_or(self.tls)
    }

    /// Adds a `DOMAIN=HOST:PORT` route from the command line (it overrides the file's).
    /// A malformed one is a `UsageError`.
    pub fn add_route(&mut self, spec: &str) -> anyhow::Result<()> {
        let usage = |why: String| anyhow::Error::new(UsageError(why));
        let Some((domain, target)) = spec.split_once('=') else {
            return Err(usage(format!("--route needs DOMAIN=HOST:PORT, got {spec:?}")));
        };
        if domain.trim().is_empty() {
            return Err(usage(format!(
                "--route {spec:?}: no domain before '=' (use * for every domain)"
            )));
        }
        match target.trim().rsplit_once(':').map(|(_, p)| p.parse::<u16>()) {
            Some(Ok(0)) => {
                return Err(usage(format!(
                    "--route {spec:?}: port 0 is not a port a server listens on"
                )));
            }
            Some(Ok(_)) => {}
            _ => {
                return Err(usage(format!(
                    "--route {spec:?}: want DOMAIN=HOST:PORT (a port from 1 to 65535)"
                )));
            }
        }
        self.routes
            .insert(domain.trim().to_string(), RouteSpec::Target(target.trim().to_string()));
        Ok(())
    }

    /// Every duration of the configuration, by its key.
    fn durations(&self) -> Vec<(String, Duration)> {
        let t = &self.timeouts;
        let mut out: Vec<(String, Duration)> = [
            ("idle_timeout", self.idle_timeout),
            ("tls_fallback", self.tls_fallback),
            ("shutdown_timeout", self.shutdown_timeout),
            ("journal_sync_interval", self.journal_sync_interval),
            ("dns.timeout", self.dns.timeout),
            ("dns.min_ttl", self.dns.min_ttl),
            ("dns.max_ttl", self.dns.max_ttl),
            ("dns.negative_ttl", self.dns.negative_ttl),
            ("timeouts.connect", t.connect),
            ("timeouts.greeting", t.greeting),
            ("timeouts.ehlo", t.ehlo),
            ("timeouts.mail", t.mail),
            ("timeouts.rcpt", t.rcpt),
            ("timeouts.data_init", t.data_init),
            ("timeouts.data_block", t.data_block),
            ("timeouts.data_term", t.data_term),
            ("timeouts.quit", t.quit),
            ("timeouts.starttls", t.starttls),
        ]
        .into_iter()
        .map(|(k, d)| (k.to_string(), d))
        .collect();
        let retries = std::iter::once(("retry".to_string(), &self.retry)).chain(
            self.retry_domain
                .iter()
                .map(|(d, r)| (format!("retry_domain.\"{d}\""), r)),
        );
        for (table, r) in retries {
            for (key, d) in [
                ("initial", r.initial),
                ("max_delay", r.max_delay),
                ("max_age", r.max_age),
            ] {
                out.push((format!("{table}.{key}"), d));
            }
        }
        out
    }

    /// Recipients of one domain a shard holds queued or in flight before
    /// ingest passes the domain over: `max_queued_recipients_per_domain`, and
    /// at most a quarter of `max_queued_recipients_per_shard`, so four domains
    /// stuck at theirs still leave room for the rest.
    pub fn domain_queue_bound(&self) -> u64 {
        let shard = self.max_queued_recipients_per_shard / 4;
        self.max_queued_recipients_per_domain.min(shard).max(1) as u64
    }

    pub fn validate(&self) -> anyhow::Result<()> {
        self.headers.check()?;
        if let Some(t) = &self.verp {
            crate::template::check(t).map_err(|e| anyhow::anyhow!("verp: template: {e}"))?;
            if !crate::headers::is_template(t) {
                bail!(
                    "verp = {t:?} has no fields: every recipient would get the same sender (set the jobs' \"from\" instead, or use {{{{ rcpt_local }}}} and {{{{ rcpt_domain }}}})"
                );
            }
        }
        let positive = [
            ("max_connections_per_destination", self.max_connections_per_destination),
            ("max_messages_per_connection", self.max_messages_per_connection),
            ("max_rcpts_per_txn", self.max_rcpts_per_txn),
            ("max_queued_recipients_per_shard", self.max_queued_recipients_per_shard),
            (
                "max_queued_recipients_per_domain",
                self.max_queued_recipients_per_domain,
            ),
            (
                "max_deferred_recipients_per_shard",
                self.max_deferred_recipients_per_shard,
            ),
            ("pipeline_window", self.pipeline_window),
            ("pipeline_window_max", self.pipeline_window_max.unwrap_or(1)),
            ("max_message_files_in_use", self.max_message_files_in_use),
            ("max_message_bytes", self.max_message_bytes as usize),
            ("max_message_bytes_in_use", self.max_message_bytes_in_use as usize),
            ("dns.max_in_flight", self.dns.max_in_flight),
            ("dns.threads", self.dns.threads),
            ("dns.attempts", self.dns.attempts),
        ];
        for (name, v) in positive {
            if v == 0 {
                bail!("{name} must be at least 1");
            }
        }
        if let Some(max) = self.pipeline_window_max
            && max < self.pipeline_window
        {
            bail!(
                "pipeline_window_max ({max}) is below pipeline_window ({}): the window starts at pipeline_window and grows up to pipeline_window_max",
                self.pipeline_window
            );
        }
        for (i, d) in self.spread_domains.iter().enumerate() {
            if d.is_empty()
                || d.bytes()
                    .any(|b| b == b'@' || b.is_ascii_whitespace() || b.is_ascii_control())
            {
                bail!("spread_domains[{i}] = {d:?} is not a domain name");
            }
        }
        if self.timeouts.connect.is_zero() {
            bail!("timeouts.connect must be more than zero");
        }
        for (name, d) in self.durations() {
            if d > LONGEST_DURATION {
                bail!(
                    "{name} = {} is longer than the longest allowed, {LONGEST_DAYS} days",
                    humantime::format_duration(d)
                );
            }
        }
        let names = self.ehlo_name.iter().map(|n| ("ehlo_name".to_string(), n)).chain(
            self.source_addresses
                .iter()
                .map(|s| ("source_addresses".to_string(), s))
                .chain(
                    self.domain_source_addresses
                        .iter()
                        .flat_map(|(d, v)| v.iter().map(move |s| (format!("domain_source_addresses.{d:?}"), s))),
                )
                .filter_map(|(k, s)| s.ehlo_name.as_ref().map(|n| (format!("{k}: ehlo_name"), n))),
        );
        for (key, name) in names {
            // It goes on the EHLO command line as it is (RFC 5321 §4.1.1.1: a domain or an address literal).
            if name.is_empty() || name.len() > 255 || !name.bytes().all(|b| b.is_ascii_graphic()) {
                bail!("{key} = {name:?} is not a host name (printable ASCII without spaces, at most 255 octets)");
            }
        }
        self.metrics_addr()?;
        Ok(())
    }
}

/// A place to deliver to: what the user wrote and the address it resolved to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub label: String,
    /// The host part of the label (a name or an address), for TLS.
    pub host: String,
    pub addr: SocketAddr,
    pub relay: Option<Arc<Relay>>,
}

/// How to talk to a relay (smarthost).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Relay {
    pub credentials: Option<Credentials>,
    pub implicit_tls: bool,
    pub tls: Option<TlsPolicy>,
}

/// A mistake in how volley was called (exit status 2, like a bad option).
#[derive(Debug)]
pub struct UsageError(pub String);

impl std::fmt::Display for UsageError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for UsageError {}

/// Routes with their targets resolved (once, at start-up, off the executors).
#[derive(Debug, Clone, Default)]
pub struct Routes {
    exact: HashMap<String, Target>,
    wildcard: Option<Target>,
}

impl Routes {
    pub fn resolve(routes: &BTreeMap<String, RouteSpec>) -> anyhow::Result<Routes> {
        let mut out = Routes::default();
        for (domain, spec) in routes {
            let (target, relay) = match spec {
                RouteSpec::Target(t) => (t, None),
                RouteSpec::Relay(r) => (&r.host, Some(r)),
            };
            let addr = target
                .to_socket_addrs()
                .with_context(|| format!("route {domain}={target}: cannot resolve {target:?} (want HOST:PORT)"))?
                .next()
                .with_context(|| format!("route {domain}={target}: {target:?} has no address"))?;
            if addr.port() == 0 {
                bail!("route {domain}={target}: port 0 is not a port a server listens on");
            }
            let relay = match relay {
                None => None,
                Some(r) => {
                    let credentials = match &r.auth {
                        None => None,
                        Some(a) => {
                            let password = std::fs::read_to_string(&a.password_file).with_context(|| {
                                format!(
                                    "route {domain}: cannot read password_file {}",
                                    a.password_file.display()
                                )
                            })?;
                            Some(Credentials {
                                user: a.user.clone(),
                                password: password.trim_end_matches(['\r', '\n']).to_string(),
                                allow_plaintext: r.allow_plaintext_auth,
                            })
                        }
                    };
                    Some(Arc::new(Relay {
                        credentials,
                        implicit_tls: r.implicit_tls.unwrap_or(addr.port() == 465),
                        tls: r.tls,
                    }))
                }
            };
            let host = target.rsplit_once(':').map_or(target.as_str(), |(h, _)| h);
            let t = Target {
                label: target.clone(),
                host: host.trim_start_matches('[').trim_end_matches(']').to_string(),
                addr,
                relay,
            };
            if domain == "*" {
                out.wildcard = Some(t);
            } else if domain.is_empty() {
                bail!("route ={target}: the domain is empty");
            } else {
                out.exact.insert(domain.to_ascii_lowercase(), t);
            }
        }
        Ok(out)
    }

    /// The target of a lower-cased domain.
    pub fn lookup(&self, domain: &str) -> Option<&Target> {
        self.exact.get(domain).or(self.wildcard.as_ref())
    }

    /// True when every domain has a route, so no MX lookup is ever needed.
    pub fn covers_all(&self) -> bool {
        self.wildcard.is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn toml_with_defaults_and_routes() {
        let cfg: Config = toml::from_str(
            r#"
            max_connections_per_destination = 4
            idle_timeout = "2s"
            [retry]
            initial = "500ms"
            max_age = "10m"
            [routes]
            "Example.COM" = "127.0.0.1:2525"
            "*" = "127.0.0.2:25"
            "#,
        )
        .unwrap();
        assert_eq!(cfg.max_connections_per_destination, 4);
        assert_eq!(cfg.max_rcpts_per_txn, 100);
        assert_eq!(cfg.idle_timeout, Duration::from_secs(2));
        assert_eq!(cfg.retry.initial, Duration::from_millis(500));
        assert_eq!(cfg.timeouts.data_term, Duration::from_secs(600));
        let routes = Routes::resolve(&cfg.routes).unwrap();
        assert_eq!(routes.lookup("example.com").unwrap().label, "127.0.0.1:2525");
        assert_eq!(routes.lookup("other.test").unwrap().label, "127.0.0.2:25");
    }

    #[test]
    fn the_shipped_example_parses_and_states_the_defaults() {
        let cfg: Config = toml::from_str(include_str!("../deploy/volley.example.toml")).unwrap();
        let d = Config::default();
        assert_eq!(cfg.max_connections_per_destination, d.max_connections_per_destination);
        assert_eq!(cfg.max_messages_per_connection, d.max_messages_per_connection);
        assert_eq!(cfg.max_rcpts_per_txn, d.max_rcpts_per_txn);
        assert_eq!(cfg.max_queued_recipients_per_shard, d.max_queued_recipients_per_shard);
        assert_eq!(
            cfg.max_deferred_recipients_per_shard,
            d.max_deferred_recipients_per_shard
        );
        assert_eq!(cfg.max_queued_recipients_per_domain, d.max_queued_recipients_per_domain);
        assert_eq!(cfg.spread_domains, d.spread_domains);
        assert_eq!(cfg.idle_timeout, d.idle_timeout);
        assert_eq!(format!("{:?}", cfg.timeouts), format!("{:?}", d.timeouts));
        assert_eq!(format!("{:?}", cfg.retry), format!("{:?}", d.retry));
        assert_eq!(cfg.max_job_line_bytes, d.max_job_line_bytes);
        assert_eq!(
            (
                cfg.max_message_bytes,
                cfg.max_message_files_in_use,
                cfg.max_message_bytes_in_use
            ),
            (
                d.max_message_bytes,
                d.max_message_files_in_use,
                d.max_message_bytes_in_use
            )
        );
        assert_eq!(cfg.shutdown_timeout, d.shutdown_timeout);
        // Per-domain examples are comments: installed as it is, it routes nothing anywhere.
        assert!(cfg.routes.is_empty() && cfg.tls_policy.is_empty() && cfg.retry_domain.is_empty());
        let examples = [
            "[tls_policy]",
            "\"bank.example\"",
            "[retry_domain.",
            "initial = \"1m\"",
            "max_age = \"3d\"",
            "[routes]",
            "\"example.com\"",
            "[fleet]",
            "redis = ",
            "node = ",
            "name = ",
            "poll_interval = ",
        ];
        let uncommented: String = include_str!("../deploy/volley.example.toml")
            .lines()
            .map(|l| match l.strip_prefix("# ") {
                Some(rest) if examples.iter().any(|e| rest.starts_with(e)) => format!("{rest}\n"),
                _ => format!("{l}\n"),
            })
            .collect();
        let ex: Config = toml::from_str(&uncommented).unwrap();
        assert_eq!(ex.retry_of("slow.example").initial, Duration::from_secs(60));
        assert_eq!(ex.routes.len(), 1);
        assert_eq!(ex.tls_policy["bank.example"], TlsPolicy::Verify);
        let fleet = ex.fleet.expect("the example's [fleet]");
        assert_eq!(
            (fleet.name.as_str(), fleet.poll_interval),
            ("volley", Duration::from_millis(500))
        );
        assert_eq!(cfg.mx_port, d.mx_port);
        assert_eq!(
            (cfg.journal, cfg.journal_fsync, cfg.journal_sync_interval),
            (d.journal, d.journal_fsync, d.journal_sync_interval)
        );
        assert_eq!((cfg.tls, cfg.tls_fallback), (d.tls, d.tls_fallback));
        assert_eq!(format!("{:?}", cfg.dns), format!("{:?}", d.dns));
        assert_eq!(cfg.metrics_max_domains, d.metrics_max_domains);
        assert_eq!(cfg.metrics_listen, None);
        assert_eq!(
            (
                cfg.pipelining,
                cfg.chunking,
                cfg.pipeline_window,
                cfg.pipeline_window_bytes
            ),
            (d.pipelining, d.chunking, d.pipeline_window, d.pipeline_window_bytes)
        );
    }

    #[test]
    fn source_addresses_bare_or_with_a_name() {
        let cfg: Config = toml::from_str(
            r#"
            source_addresses = ["127.0.0.2", { address = "127.0.0.3", ehlo_name = "mta3.test" }]
            [domain_source_addresses]
            "big.example" = ["::1"]
            "#,
        )
        .unwrap();
        assert_eq!(cfg.sources_of("other.test").len(), 2);
        assert_eq!(cfg.sources_of("other.test")[1].ehlo_name.as_deref(), Some("mta3.test"));
        assert_eq!(
            cfg.sources_of("big.example")[0].address,
            "::1".parse::<IpAddr>().unwrap()
        );
        assert!(cfg.binds_sources());
        let err = toml::from_str::<Config>(r#"source_addresses = ["not-an-ip"]"#).unwrap_err();
        assert!(err.to_string().contains("a source address is"), "{err}");
    }

    #[test]
    fn relay_routes_read_their_password_file() {
        let dir = tempfile::tempdir().unwrap();
        let pass = dir.path().join("pass");
        std::fs::write(&pass, "s3cret\n").unwrap();
        let text = format!(
            "[routes]\n\"*\" = {{ host = \"127.0.0.1:465\", auth = {{ user = \"u\", password_file = {:?} }} }}\n",
            pass.display().to_string()
        );
        let cfg: Config = toml::from_str(&text).unwrap();
        let routes = Routes::resolve(&cfg.routes).unwrap();
        let relay = routes.lookup("any.test").unwrap().relay.clone().unwrap();
        assert!(relay.implicit_tls, "port 465 means implicit TLS");
        let c = relay.credentials.clone().unwrap();
        assert_eq!(
            (c.user.as_str(), c.password.as_str(), c.allow_plaintext),
            ("u", "s3cret", false)
        );
        assert!(!format!("{c:?}").contains("s3cret"), "the password is not printed");
        std::fs::remove_file(&pass).unwrap();
        let err = Routes::resolve(&cfg.routes).unwrap_err();
        assert!(format!("{err:#}").contains("cannot read password_file"), "{err:#}");
    }

    #[test]
    fn unknown_keys_are_errors() {
        let err = toml::from_str::<Config>("max_conections = 3").unwrap_err();
        assert!(err.to_string().contains("max_conections"), "{err}");
    }

    #[test]
    fn a_list_unsubscribe_template_that_does_not_compile_is_refused_by_its_key() {
        let cfg: Config = toml::from_str("[headers]\nlist_unsubscribe = \"<https://u.test/{{ rcpt >\"\n").unwrap();
        let err = cfg.validate().unwrap_err().to_string();
        assert!(err.starts_with("headers.list_unsubscribe: template: "), "{err}");
        let err = toml::from_str::<Config>("[headers]\nmessage_ids = true\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("message_ids"), "{err}");
    }

    #[test]
    fn the_old_domain_backoff_key_says_what_replaced_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.toml");
        std::fs::write(&path, "domain_backoff_after = 3\n").unwrap();
        let err = Config::load(&path).unwrap_err().to_string();
        assert!(
            err.contains("v.toml: domain_backoff_after is gone") && err.contains("\"deferred-in-a-row\""),
            "{err}"
        );
    }

    #[test]
    fn an_absurd_duration_is_refused_by_its_key() {
        let cfg: Config = toml::from_str("[retry_domain.\"slow.test\"]\nmax_age = \"20years\"\n").unwrap();
        let err = cfg.validate().unwrap_err().to_string();
        assert!(err.starts_with("retry_domain.\"slow.test\".max_age = 20years"), "{err}");
        let cfg: Config = toml::from_str("[timeouts]\ndata_term = \"400000h\"\n").unwrap();
        assert!(
            cfg.validate()
                .unwrap_err()
                .to_string()
                .starts_with("timeouts.data_term")
        );
        let cfg: Config = toml::from_str("[retry]\nmax_age = \"5days\"\n").unwrap();
        cfg.validate().unwrap();
    }

    #[test]
    fn no_resolver_threads_is_refused_by_its_key() {
        let cfg: Config = toml::from_str("[dns]\nthreads = 0\n").unwrap();
        assert_eq!(
            cfg.validate().unwrap_err().to_string(),
            "dns.threads must be at least 1"
        );
        let cfg: Config = toml::from_str("[dns]\nthreads = 1\n").unwrap();
        cfg.validate().unwrap();
    }

    #[test]
    fn a_window_bound_below_its_start_is_refused_by_its_keys() {
        let cfg: Config = toml::from_str("pipeline_window = 16\npipeline_window_max = 4\n").unwrap();
        let err = cfg.validate().unwrap_err().to_string();
        assert!(
            err.starts_with("pipeline_window_max (4) is below pipeline_window (16)"),
            "{err}"
        );
        let cfg: Config = toml::from_str("pipeline_window = 16\npipeline_window_max = 16\n").unwrap();
        cfg.validate().unwrap();
        assert_eq!(cfg.window_max(), 16);
        assert_eq!(Config::default().window_max(), PIPELINE_WINDOW_MAX);
        // A bigger start without a bound of its own is its own bound (no growth, no error).
        let cfg: Config = toml::from_str("pipeline_window = 64\n").unwrap();
        cfg.validate().unwrap();
        assert_eq!(cfg.window_max(), 64);
    }

    #[test]
    fn route_errors_name_the_route() {
        let mut cfg = Config::default();
        for (bad, why) in [
            ("nonsense", "needs DOMAIN=HOST:PORT"),
            ("a.test=no-port", "want DOMAIN=HOST:PORT"),
            ("*=127.0.0.1:0", "port 0"),
            ("*=127.0.0.1:99999", "want DOMAIN=HOST:PORT"),
            ("=127.0.0.1:25", "no domain"),
        ] {
            let err = cfg.add_route(bad).unwrap_err();
            assert!(err.is::<UsageError>(), "{bad}");
            assert!(
                format!("{err:#}").contains(why) && format!("{err:#}").contains(bad),
                "{err:#}"
            );
        }
        // A file's routes are checked when they are resolved.
        let cfg: Config = toml::from_str(
            "[routes]
\"a.test\" = \"no-port\"\n\"b.test\" = \"127.0.0.1:0\"\n",
        )
        .unwrap();
        let err = Routes::resolve(&cfg.routes).unwrap_err();
        assert!(format!("{err:#}").contains("a.test=no-port"), "{err:#}");
        let cfg: Config = toml::from_str("[routes]\n\"b.test\" = \"127.0.0.1:0\"\n").unwrap();
        let err = Routes::resolve(&cfg.routes).unwrap_err();
        assert!(format!("{err:#}").contains("b.test=127.0.0.1:0: port 0"), "{err:#}");
    }

    #[test]
    fn dns_answers_are_kept_between_the_floor_and_the_ceiling() {
        let d = DnsConfig::default();
        assert_eq!(d.keep(Duration::from_secs(5)), Duration::from_secs(30));
        assert_eq!(d.keep(Duration::from_secs(600)), Duration::from_secs(600));
        assert_eq!(d.keep(Duration::from_secs(86400)), Duration::from_secs(3600));
    }

    #[test]
    fn backoff_doubles_caps_and_jitters() {
        let exact = Retry {
            jitter: 0.0,
            ..Retry::default()
        };
        assert_eq!(exact.delay(1), Duration::from_secs(1));
        assert_eq!(exact.delay(2), Duration::from_secs(2));
        assert_eq!(exact.delay(4), Duration::from_secs(8));
        assert_eq!(exact.delay(40), Duration::from_secs(300));
        let r = Retry::default();
        let delays: Vec<Duration> = (0..200).map(|_| r.delay(4)).collect();
        assert!(
            delays
                .iter()
                .all(|d| *d >= Duration::from_millis(7200) && *d <= Duration::from_millis(8800))
        );
        assert!(delays.iter().any(|d| *d != delays[0]), "the delays are spread");
    }

    #[test]
    fn a_long_streak_of_deferrals_stays_at_the_cap() {
        // A domain backed off for thousands of transactions in a row asks for
        // delay(n) with a large n: initial × 2^63 is no Duration.
        let r = Retry {
            initial: Duration::from_secs(60),
            max_delay: Duration::from_secs(60),
            ..Retry::default()
        };
        for n in [63, 64, 65, 1000, u32::MAX] {
            let d = r.delay(n);
            assert!(
                d >= Duration::from_secs(54) && d <= Duration::from_secs(66),
                "delay({n}) = {d:?}"
            );
        }
    }

    #[test]
    fn per_domain_retry() {
        let cfg: Config =
            toml::from_str("[retry_domain.\"slow.example\"]\ninitial = \"1m\"\nmax_age = \"3d\"\n").unwrap();
        assert_eq!(cfg.retry_of("slow.example").initial, Duration::from_secs(60));
        assert_eq!(cfg.retry_of("slow.example").max_age, Duration::from_secs(3 * 86400));
        assert_eq!(cfg.retry_of("other.example").initial, Duration::from_secs(1));
    }

    #[test]
    fn an_ehlo_name_that_would_break_the_command_line_is_refused_with_its_key() {
        let cfg: Config = toml::from_str("ehlo_name = \"mta 1\"\n").unwrap();
        assert_eq!(
            cfg.validate().unwrap_err().to_string(),
            "ehlo_name = \"mta 1\" is not a host name (printable ASCII without spaces, at most 255 octets)"
        );
        let cfg: Config = toml::from_str(
            "[domain_source_addresses]\n\"big.example\" = [{ address = \"127.0.0.2\", ehlo_name = \"a\\r\\nQUIT\" }]\n",
        )
        .unwrap();
        let e = cfg.validate().unwrap_err().to_string();
        assert!(
            e.starts_with("domain_source_addresses.\"big.example\": ehlo_name = \"a\\r\\nQUIT\""),
            "{e}"
        );
        let ok: Config = toml::from_str("ehlo_name = \"[192.0.2.1]\"\n").unwrap();
        ok.validate().unwrap();
    }
}
