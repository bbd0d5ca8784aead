//! Traffic shaping as data: per destination limits and automation rules,
//! from TOML files layered over the built-in `deploy/shaping.toml` (later
//! files override earlier keys; their automation rules are added after the
//! earlier ones). Scopes, from the least to the most specific:
//!
//! - the main configuration's own keys (`max_connections_per_destination`,
//!   `max_messages_per_connection`, `pipeline_window`, `tls`, …);
//! - `[default]`;
//! - `[provider.NAME]`, with `match = [{ mx_suffix = ".google.com" },
//!   { domain_suffix = ".yahoo.com" }]`: a domain belongs to the first
//!   provider (by name) one of whose entries matches it — an `mx_suffix`
//!   when every MX host of the domain ends with it, a `domain_suffix` when
//!   the domain does (a leading dot also matches the name without it);
//! - `["DOMAIN"]`;
//! - the main configuration's per-domain tables (`tls_policy`,
//!   `domain_source_addresses`, `retry_domain`).
//!
//! Mechanism is elsewhere: the shard core applies a [`Policy`] to each
//! destination it makes. This module only reads, checks and resolves.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use regex::Regex;
use serde::Deserialize;

use crate::config::{Config, Retry, SourceAddress};
use crate::tls::TlsPolicy;

/// The built-in shaping (mailbox providers' limits and throttling replies).
pub const BUILT_IN: &str = include_str!("../deploy/shaping.toml");

/// `N/s`, `N/min`, `N/h` or `N/d` (also `N/10min`: a count per span).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    pub count: u64,
    pub per: Duration,
}

impl Rate {
    /// One of `n` equal parts of this rate.
    pub fn part(&self, n: u32) -> Rate {
        Rate {
            count: self.count,
            per: self.per * n.max(1),
        }
    }

    /// The slower of two rates.
    pub fn slower(self, other: Rate) -> Rate {
        if other.per_second() < self.per_second() {
            other
        } else {
            self
        }
    }

    /// The time between two events at this rate.
    pub fn interval(&self) -> Duration {
        self.per / self.count.min(u32::MAX as u64) as u32
    }

    pub fn per_second(&self) -> f64 {
        self.count as f64 / self.per.as_secs_f64()
    }
}

impl std::str::FromStr for Rate {
    type Err = String;
    fn from_str(s: &str) -> Result<Rate, String> {
        let bad = || format!("{s:?} is not a rate (want N/s, N/min, N/h, N/d or N/10min)");
        let (n, unit) = s.trim().split_once('/').ok_or_else(bad)?;
        let count: u64 = n.trim().replace('_', "").parse().map_err(|_| bad())?;
        let unit = unit.trim();
        let digits = unit.bytes().take_while(u8::is_ascii_digit).count();
        let times: u32 = if digits == 0 {
            1
        } else {
            unit[..digits].parse().map_err(|_| bad())?
        };
        let span = match &unit[digits..] {
            "s" | "sec" | "second" => Duration::from_secs(1),
            "m" | "min" | "minute" => Duration::from_secs(60),
            "h" | "hour" => Duration::from_secs(3600),
            "d" | "day" => Duration::from_secs(86_400),
            _ => return Err(bad()),
        };
        if count == 0 || times == 0 {
            return Err(format!("{s:?}: a rate must be at least 1 per span"));
        }
        Ok(Rate {
            count,
            per: span * times,
        })
    }
}

impl std::fmt::Display for Rate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let secs = self.per.as_secs();
        let unit = match secs {
            1 => "s".to_string(),
            60 => "min".to_string(),
            3600 => "h".to_string(),
            86_400 => "d".to_string(),
            s if s % 60 == 0 => format!("{}min", s / 60),
            s => format!("{s}s"),
        };
        write!(f, "{}/{unit}", self.count)
    }
}

impl<'de> Deserialize<'de> for Rate {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Rate, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// The knobs of one scope, each unset unless the scope sets it.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Knobs {
    pub max_connections: Option<u32>,
    pub max_message_rate: Option<Rate>,
    /// For the whole fleet (`[fleet]`): each node takes its part, this
    /// divided by the nodes alive, below its own `max_message_rate`.
    pub fleet_message_rate: Option<Rate>,
    pub max_connection_rate: Option<Rate>,
    pub max_deliveries_per_connection: Option<usize>,
    pub max_rcpts_per_txn: Option<usize>,
    pub pipeline_window: Option<usize>,
    pub pipeline_window_max: Option<usize>,
    pub tls: Option<TlsPolicy>,
    pub source_addresses: Option<Vec<SourceAddress>>,
    #[serde(default, with = "humantime_serde::option")]
    pub idle_timeout: Option<Duration>,
    /// A whole retry schedule (unset keys take the built-in defaults).
    pub retry: Option<Retry>,
}

impl Knobs {
    /// `other`'s settings over these.
    fn layer(&mut self, other: &Knobs) {
        macro_rules! over {
            ($($f:ident),*) => {$(
                if other.$f.is_some() {
                    self.$f = other.$f.clone();
                }
            )*};
        }
        over!(
            max_connections,
            max_message_rate,
            fleet_message_rate,
            max_connection_rate,
            max_deliveries_per_connection,
            max_rcpts_per_txn,
            pipeline_window,
            pipeline_window_max,
            tls,
            source_addresses,
            idle_timeout,
            retry
        );
    }

    fn check(&self, at: &str) -> anyhow::Result<()> {
        let positive = [
            ("max_connections", self.max_connections.map(|v| v as usize)),
            ("max_deliveries_per_connection", self.max_deliveries_per_connection),
            ("max_rcpts_per_txn", self.max_rcpts_per_txn),
            ("pipeline_window", self.pipeline_window),
            ("pipeline_window_max", self.pipeline_window_max),
        ];
        for (key, v) in positive {
            if v == Some(0) {
                bail!("{at}: {key} must be at least 1");
            }
        }
        if let (Some(w), Some(m)) = (self.pipeline_window, self.pipeline_window_max)
            && m < w
        {
            bail!("{at}: pipeline_window_max ({m}) is below pipeline_window ({w})");
        }
        Ok(())
    }
}

/// When a rule fires.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    /// At the first matching reply.
    Immediate,
    /// When `hits` matching replies come within `window`.
    Threshold { hits: u32, window: Duration },
    /// When this many transactions in a row are deferred whole (every
    /// recipient deferred, the deciding reply or failure matching); a
    /// transaction that delivers or bounces a recipient ends the streak.
    /// Such a rule matches only transactions deferred whole.
    InARow(u32),
}

/// What a rule does to the destination while it is active.
#[derive(Debug, Clone)]
pub enum RuleAction {
    /// Nothing is sent; what is queued waits, without using attempts, and
    /// goes out when the suspension ends.
    Suspend,
    /// These limits apply over the destination's own.
    Set(Box<Knobs>),
    /// Recipients for the destination bounce.
    Bounce,
}

impl RuleAction {
    /// Its name in metrics and `/status`.
    pub fn name(&self) -> &'static str {
        match self {
            RuleAction::Suspend => "suspend",
            RuleAction::Set(_) => "set",
            RuleAction::Bounce => "bounce",
        }
    }
}

/// An automation rule: a reply pattern and what it does.
#[derive(Debug, Clone)]
pub struct Rule {
    /// `SCOPE#N` unless named.
    pub name: String,
    pub regex: Regex,
    pub trigger: Trigger,
    pub action: RuleAction,
    pub duration: Duration,
    /// Also matches volley's own failures (their text, `local: …`).
    pub match_local: bool,
    /// Shared with the other nodes of the fleet (`[fleet]`): a reason that
    /// concerns the sending domain, not this node's addresses.
    pub fleet: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleSpec {
    name: Option<String>,
    regex: String,
    #[serde(default)]
    trigger: Option<toml::Value>,
    action: toml::Value,
    #[serde(with = "humantime_serde")]
    duration: Duration,
    #[serde(default)]
    match_local: bool,
    #[serde(default)]
    fleet: bool,
}

impl Rule {
    fn parse(v: toml::Value, at: &str) -> anyhow::Result<Rule> {
        let spec = RuleSpec::deserialize(v).map_err(|e| anyhow::anyhow!("{at}: {}", e.message()))?;
        let regex = Regex::new(&spec.regex).map_err(|e| anyhow::anyhow!("{at}: regex: {e}"))?;
        let trigger = match spec.trigger {
            None => Trigger::Immediate,
            Some(toml::Value::String(s)) if s == "immediate" => Trigger::Immediate,
            Some(toml::Value::Table(t)) if t.len() == 1 && t.contains_key("threshold") => {
                let r: Rate = t["threshold"]
                    .as_str()
                    .ok_or_else(|| anyhow::anyhow!("{at}: trigger.threshold must be a string like \"3/10min\""))?
                    .parse()
                    .map_err(|e| anyhow::anyhow!("{at}: trigger.threshold: {e}"))?;
                Trigger::Threshold {
                    hits: r.count.min(u32::MAX as u64) as u32,
                    window: r.per,
                }
            }
            Some(toml::Value::Table(t)) if t.len() == 1 && t.contains_key("in_a_row") => match t["in_a_row"] {
                toml::Value::Integer(n) if n >= 1 && n <= u32::MAX as i64 => Trigger::InARow(n as u32),
                ref v => bail!("{at}: trigger.in_a_row = {v} (want a count of transactions, at least 1)"),
            },
            Some(other) => {
                bail!(
                    "{at}: trigger = {other} (want \"immediate\", {{ threshold = \"3/10min\" }} or {{ in_a_row = 10 }})"
                )
            }
        };
        let action = match spec.action {
            toml::Value::String(s) if s == "suspend" => RuleAction::Suspend,
            toml::Value::String(s) if s == "bounce" => RuleAction::Bounce,
            toml::Value::Table(mut t) if t.len() == 1 && t.contains_key("set") => {
                let set = t.remove("set").expect("checked");
                let knobs =
                    Knobs::deserialize(set).map_err(|e| anyhow::anyhow!("{at}: action.set: {}", e.message()))?;
                knobs.check(&format!("{at}: action.set"))?;
                let fixed = [
                    ("tls", knobs.tls.is_some()),
                    ("source_addresses", knobs.source_addresses.is_some()),
                    ("idle_timeout", knobs.idle_timeout.is_some()),
                    ("retry", knobs.retry.is_some()),
                    ("fleet_message_rate", knobs.fleet_message_rate.is_some()),
                ];
                if let Some((key, _)) = fixed.iter().find(|(_, set)| *set) {
                    bail!(
                        "{at}: action.set: {key} cannot be changed by a rule (a rule sets max_connections, \
                         max_message_rate, max_connection_rate, max_deliveries_per_connection, \
                         max_rcpts_per_txn, pipeline_window, pipeline_window_max)"
                    );
                }
                RuleAction::Set(Box::new(knobs))
            }
            other => bail!("{at}: action = {other} (want \"suspend\", \"bounce\" or {{ set = {{ … }} }})"),
        };
        if spec.duration.is_zero() {
            bail!("{at}: duration must be more than 0");
        }
        Ok(Rule {
            name: spec.name.unwrap_or_else(|| at.to_string()),
            regex,
            trigger,
            action,
            duration: spec.duration,
            match_local: spec.match_local,
            fleet: spec.fleet,
        })
    }
}

/// How a provider recognises its domains.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Match {
    pub mx_suffix: Option<String>,
    pub domain_suffix: Option<String>,
}

fn suffix_matches(name: &str, suffix: &str) -> bool {
    // Runs for every provider's every suffix when a shard first meets a
    // domain (a real list has hundreds of thousands): no allocation.
    let name = name.trim_end_matches('.').as_bytes();
    let suffix = suffix.trim_end_matches('.');
    let bare = suffix.strip_prefix('.').unwrap_or(suffix).as_bytes();
    if name.eq_ignore_ascii_case(bare) {
        return true;
    }
    // `name` ends with "." and then `bare`, on a label boundary.
    name.len() > bare.len()
        && name[name.len() - bare.len() - 1] == b'.'
        && name[name.len() - bare.len()..].eq_ignore_ascii_case(bare)
}

/// One scope: its knobs and its rules.
#[derive(Debug, Clone, Default)]
struct Scope {
    knobs: Knobs,
    rules: Vec<Arc<Rule>>,
}

#[derive(Debug, Clone)]
struct Provider {
    name: String,
    matches: Vec<Match>,
    scope: Scope,
}

/// Every scope, layered from the files.
#[derive(Debug, Clone, Default)]
pub struct Shaping {
    default: Scope,
    providers: BTreeMap<String, Provider>,
    domains: BTreeMap<String, Scope>,
}

/// What applies to one destination, every knob resolved.
#[derive(Debug, Clone)]
pub struct Policy {
    /// The most specific shaping scope that applies: `default`,
    /// `provider.NAME` or the domain (destinations never mix scopes).
    pub scope: String,
    pub provider: Option<String>,
    pub max_connections: u32,
    pub max_message_rate: Option<Rate>,
    /// The fleet's rate for the destination, shared by the nodes alive.
    pub fleet_message_rate: Option<Rate>,
    pub max_connection_rate: Option<Rate>,
    pub max_deliveries_per_connection: usize,
    pub max_rcpts_per_txn: usize,
    pub pipeline_window: usize,
    /// Never below `pipeline_window`.
    pub pipeline_window_max: usize,
    pub tls: TlsPolicy,
    pub sources: Vec<SourceAddress>,
    pub idle_timeout: Duration,
    pub retry: Retry,
    /// The domain's rules, then its provider's, then the default ones.
    pub rules: Vec<Arc<Rule>>,
}

impl Shaping {
    /// The built-in shaping, then each of `files` over it.
    pub fn load(files: &[PathBuf]) -> anyhow::Result<Shaping> {
        let mut s = Shaping::default();
        s.add(BUILT_IN, "built-in deploy/shaping.toml")?;
        for f in files {
            let text =
                std::fs::read_to_string(f).with_context(|| format!("cannot read shaping file {}", f.display()))?;
            s.add(&text, &f.display().to_string())?;
        }
        Ok(s)
    }

    /// Only the built-in shaping.
    pub fn built_in() -> Shaping {
        let mut s = Shaping::default();
        s.add(BUILT_IN, "built-in deploy/shaping.toml")
            .expect("the built-in shaping parses (tested)");
        s
    }

    /// Layers one file's scopes over what is there; `origin` names it in errors.
    pub fn add(&mut self, text: &str, origin: &str) -> anyhow::Result<()> {
        let table: toml::Table = text.parse().map_err(|e| anyhow::anyhow!("{origin}: {e}"))?;
        for (key, value) in table {
            let toml::Value::Table(t) = value else {
                bail!("{origin}: {key} must be a table ([default], [provider.NAME] or [\"DOMAIN\"])");
            };
            match key.as_str() {
                "default" => add_scope(&mut self.default, t, &format!("{origin}: [default]"))?,
                "provider" => {
                    for (name, v) in t {
                        let at = format!("{origin}: [provider.{name}]");
                        let toml::Value::Table(mut p) = v else {
                            bail!("{at} must be a table");
                        };
                        let matches = match p.remove("match") {
                            None => None,
                            Some(m) => Some(
                                Vec::<Match>::deserialize(m)
                                    .map_err(|e| anyhow::anyhow!("{at}: match: {}", e.message()))?,
                            ),
                        };
                        for m in matches.iter().flatten() {
                            if m.mx_suffix.is_some() == m.domain_suffix.is_some() {
                                bail!("{at}: each match entry needs exactly one of mx_suffix and domain_suffix");
                            }
                        }
                        let entry = self.providers.entry(name.clone()).or_insert_with(|| Provider {
                            name: name.clone(),
                            matches: Vec::new(),
                            scope: Scope::default(),
                        });
                        if let Some(m) = matches {
                            entry.matches = m;
                        }
                        add_scope(&mut entry.scope, p, &at)?;
                        if entry.matches.is_empty() {
                            bail!("{at}: a provider needs match = [{{ mx_suffix = \"…\" }}, …]");
                        }
                    }
                }
                domain => {
                    if domain.contains('@') || domain.contains(char::is_whitespace) || !domain.contains('.') {
                        bail!("{origin}: [{key:?}] is not a domain (scopes: [default], [provider.NAME], [\"DOMAIN\"])");
                    }
                    let scope = self.domains.entry(domain.to_ascii_lowercase()).or_default();
                    add_scope(scope, t, &format!("{origin}: [\"{domain}\"]"))?;
                }
            }
        }
        Ok(())
    }

    /// The provider of a domain whose MX hosts are `mx` (empty: not known, or routed).
    pub fn provider_of(&self, domain: &str, mx: &[&str]) -> Option<&str> {
        self.providers
            .values()
            .find(|p| {
                p.matches.iter().any(|m| match (&m.mx_suffix, &m.domain_suffix) {
                    (Some(s), _) => !mx.is_empty() && mx.iter().all(|h| suffix_matches(h, s)),
                    (_, Some(s)) => suffix_matches(domain, s),
                    _ => false,
                })
            })
            .map(|p| p.name.as_str())
    }

    /// What applies to `domain`'s destination, its MX hosts being `mx`.
    pub fn policy(&self, cfg: &Config, domain: &str, mx: &[&str]) -> Policy {
        let provider = self.provider_of(domain, mx).map(|p| &self.providers[p]);
        let own = self.domains.get(domain);
        let mut knobs = self.default.knobs.clone();
        let mut scope = "default".to_string();
        if let Some(p) = provider {
            knobs.layer(&p.scope.knobs);
            scope = format!("provider.{}", p.name);
        }
        if let Some(d) = own {
            knobs.layer(&d.knobs);
            scope = domain.to_string();
        }
        let mut rules: Vec<Arc<Rule>> = Vec::new();
        for s in [own, provider.map(|p| &p.scope), Some(&self.default)]
            .into_iter()
            .flatten()
        {
            rules.extend(s.rules.iter().cloned());
        }
        Policy {
            scope,
            provider: provider.map(|p| p.name.clone()),
            max_connections: knobs
                .max_connections
                .unwrap_or(cfg.max_connections_per_destination.min(u32::MAX as usize) as u32),
            max_message_rate: knobs.max_message_rate,
            fleet_message_rate: knobs.fleet_message_rate,
            max_connection_rate: knobs.max_connection_rate,
            max_deliveries_per_connection: knobs
                .max_deliveries_per_connection
                .unwrap_or(cfg.max_messages_per_connection),
            max_rcpts_per_txn: knobs.max_rcpts_per_txn.unwrap_or(cfg.max_rcpts_per_txn),
            pipeline_window: knobs.pipeline_window.unwrap_or(cfg.pipeline_window),
            pipeline_window_max: {
                let window = knobs.pipeline_window.unwrap_or(cfg.pipeline_window);
                knobs
                    .pipeline_window_max
                    .or(cfg.pipeline_window_max)
                    .unwrap_or(crate::config::PIPELINE_WINDOW_MAX)
                    .max(window)
            },
            tls: match cfg.tls_policy.get(domain) {
                Some(t) => *t,
                None => knobs.tls.unwrap_or(cfg.tls),
            },
            sources: match cfg.domain_source_addresses.get(domain) {
                Some(s) => s.clone(),
                None => knobs.source_addresses.unwrap_or_else(|| cfg.source_addresses.clone()),
            },
            idle_timeout: knobs.idle_timeout.unwrap_or(cfg.idle_timeout),
            retry: match cfg.retry_domain.get(domain) {
                Some(r) => r.clone(),
                None => knobs.retry.unwrap_or_else(|| cfg.retry.clone()),
            },
            rules,
        }
    }
}

fn add_scope(scope: &mut Scope, mut t: toml::Table, at: &str) -> anyhow::Result<()> {
    let rules = t.remove("automation");
    let knobs = Knobs::deserialize(toml::Value::Table(t)).map_err(|e| anyhow::anyhow!("{at}: {}", e.message()))?;
    knobs.check(at)?;
    scope.knobs.layer(&knobs);
    if let Some(rules) = rules {
        let toml::Value::Array(rules) = rules else {
            bail!("{at}: automation must be an array of tables ([[…automation]])");
        };
        for (i, mut r) in rules.into_iter().enumerate() {
            let at = format!("{at} automation[{i}]");
            let enabled = match r.as_table_mut().and_then(|t| t.remove("enabled")) {
                None => true,
                Some(toml::Value::Boolean(b)) => b,
                Some(v) => bail!("{at}: enabled = {v} (want true or false)"),
            };
            if !enabled {
                // Removes an earlier file's rule of that name from this scope.
                let name = r.get("name").and_then(|n| n.as_str());
                let Some(name) = name else {
                    bail!("{at}: enabled = false needs the name of the rule it turns off");
                };
                if !scope.rules.iter().any(|x| x.name == name) {
                    bail!("{at}: enabled = false, but this scope has no rule named {name:?}");
                }
                scope.rules.retain(|x| x.name != name);
                continue;
            }
            let rule = Arc::new(Rule::parse(r, &at)?);
            // A rule named like an earlier one of this scope replaces it.
            match scope.rules.iter_mut().find(|x| x.name == rule.name) {
                Some(x) => *x = rule,
                None => scope.rules.push(rule),
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_suffix_matches_whole_labels_in_any_case() {
        for (name, suffix, want) in [
            ("gmail-smtp-in.l.google.com", ".google.com", true),
            ("gmail-smtp-in.l.google.com", "google.com", true),
            ("GMAIL-SMTP-IN.L.Google.COM.", ".GOOGLE.com", true),
            ("google.com", ".google.com", true),
            ("google.com.", "google.com.", true),
            ("notgoogle.com", ".google.com", false),
            ("notgoogle.com", "google.com", false),
            ("google.com.evil.test", ".google.com", false),
            ("com", ".google.com", false),
            ("mx.yahoodns.net", ".yahoodns.net", true),
            ("é.yahoodns.net", "yahoodns.net", true),
            ("é", "yahoodns.net", false),
        ] {
            assert_eq!(suffix_matches(name, suffix), want, "{name} ~ {suffix}");
        }
    }

    #[test]
    fn rates_parse_with_their_spans() {
        let r: Rate = "100/s".parse().unwrap();
        assert_eq!(r.interval(), Duration::from_millis(10));
        let r: Rate = "20000/h".parse().unwrap();
        assert_eq!(r.interval(), Duration::from_millis(180));
        let r: Rate = "3/10min".parse().unwrap();
        assert_eq!((r.count, r.per), (3, Duration::from_secs(600)));
        assert_eq!(r.to_string(), "3/10min");
        for bad in ["100", "0/s", "x/s", "10/fortnight", "5/0min"] {
            assert!(bad.parse::<Rate>().is_err(), "{bad}");
        }
    }

    #[test]
    fn the_built_in_shaping_parses_and_knows_the_big_providers() {
        let s = Shaping::built_in();
        let gmail = ["gmail-smtp-in.l.google.com", "alt1.gmail-smtp-in.l.google.com"];
        assert_eq!(s.provider_of("gmail.com", &gmail), Some("google"));
        assert_eq!(
            s.provider_of("example-workspace.com", &["aspmx.l.google.com"]),
            Some("google")
        );
        assert_eq!(
            s.provider_of("a.test", &["aspmx.l.google.com", "mx.other.test"]),
            None,
            "every MX host must match"
        );
        assert_eq!(s.provider_of("yahoo.com", &[]), Some("yahoo"));
        assert_eq!(
            s.provider_of("contoso.com", &["contoso-com.mail.protection.outlook.com"]),
            Some("microsoft")
        );
        assert_eq!(s.provider_of("icloud.com", &["mx01.mail.icloud.com"]), Some("apple"));
        assert_eq!(s.provider_of("d1.test", &["mx.hosting.test"]), None);
    }

    /// Each built-in rule on the reply its provider really sends.
    #[test]
    fn the_built_in_rules_match_the_providers_throttling_replies() {
        let s = Shaping::built_in();
        let cfg = Config::default();
        let cases: [(&str, &[&str], &str, &str); 12] = [
            (
                "gmail.com",
                &["gmail-smtp-in.l.google.com"],
                "421 4.7.28 Our system has detected an unusual rate of unsolicited mail originating from your DKIM domain [news.example.com 30]. To protect our users from spam, mail sent from your domain has been temporarily rate limited.",
                "google-domain-rate-limited",
            ),
            (
                "gmail.com",
                &["gmail-smtp-in.l.google.com"],
                "421 4.7.28 [192.0.2.1] Our system has detected an unusual rate of unsolicited mail originating from your IP address. To protect our users from spam, mail sent from your IP address has been temporarily rate limited.",
                "google-rate-limited",
            ),
            (
                "example-workspace.com",
                &["aspmx.l.google.com"],
                "421 4.7.0 Try again later, closing connection. (EHLO) d75a77b69052e-4a7",
                "google-try-later",
            ),
            (
                "yahoo.com",
                &["mta5.am0.yahoodns.net"],
                "421 4.7.0 [TSS04] Messages from 192.0.2.1 temporarily deferred due to unexpected volume or user complaints - 4.16.55.1; see https://postmaster.yahooinc.com/error-codes",
                "yahoo-tss04",
            ),
            (
                "aol.com",
                &["mx-aol.mail.gm0.yahoodns.net"],
                "421 4.7.0 [TSS09] All messages from 192.0.2.1 will be permanently deferred; Retrying will NOT succeed. See https://postmaster.yahooinc.com/error-codes",
                "yahoo-tss09",
            ),
            (
                "outlook.com",
                &["outlook-com.olc.protection.outlook.com"],
                "451 4.7.500 Server busy. Please try again later from [192.0.2.1]. (S77719) [BN8NAM11FT066.eop-nam11.prod.protection.outlook.com]",
                "microsoft-busy",
            ),
            (
                "contoso.com",
                &["contoso-com.mail.protection.outlook.com"],
                "421 4.3.2 The maximum number of concurrent server connections has exceeded a limit, closing transmission channel",
                "microsoft-connections",
            ),
            (
                "icloud.com",
                &["mx01.mail.icloud.com"],
                "421 4.7.0 Too many messages from 192.0.2.1, try again later",
                "apple-throttled",
            ),
            (
                "comcast.net",
                &["mx1a1.comcast.net"],
                "421 4.7.0 resimta-po-25v.sys.comcast.net Comcast block for spam. Please see http://postmaster.comcast.net/smtp-error-codes.php#RL000001",
                "comcast-rate-limited",
            ),
            (
                "web.de",
                &["mx-ha03.web.de"],
                "421 web.de (mxweb111) Nemesis ESMTP Service not available, too many connections from your IP 192.0.2.1",
                "gmx-too-many",
            ),
            (
                "gmx.net",
                &["mx00.emig.gmx.net"],
                "421 gmx.net (mxgmx116) Nemesis ESMTP Service not available, too many messages from your IP",
                "gmx-too-many",
            ),
            (
                "small-isp.test",
                &["mx.small-isp.test"],
                "421 4.7.0 Too many messages from your IP, slow down",
                "throttled",
            ),
        ];
        for (domain, mx, reply, want) in cases {
            let p = s.policy(&cfg, domain, mx);
            let first = p
                .rules
                .iter()
                .find(|r| !matches!(r.trigger, Trigger::InARow(_)) && r.regex.is_match(reply))
                .map(|r| r.name.as_str());
            assert_eq!(first, Some(want), "{domain} ({}): {reply}", p.scope);
            // Only the sending domain's reputation is the fleet's business.
            let fleet = p.rules.iter().find(|r| r.name == want).unwrap().fleet;
            assert_eq!(fleet, want == "google-domain-rate-limited", "{want}");
        }
        // A reply that is not a throttle fires nothing.
        let p = s.policy(&cfg, "gmail.com", &["gmail-smtp-in.l.google.com"]);
        let bounce = "550 5.1.1 The email account that you tried to reach does not exist.";
        assert!(
            p.rules
                .iter()
                .all(|r| matches!(r.trigger, Trigger::InARow(_)) || !r.regex.is_match(bounce))
        );
        // Every destination has the streak rule (it counts only transactions
        // deferred whole, never a bounce): last, after the reply rules.
        let last = p.rules.last().unwrap();
        assert_eq!(last.name, "deferred-in-a-row");
        assert!(matches!(last.trigger, Trigger::InARow(10)) && !last.match_local);
        assert!(matches!(last.action, RuleAction::Suspend));
    }

    #[test]
    fn later_files_override_earlier_keys_and_the_domain_scope_wins() {
        let mut s = Shaping::built_in();
        s.add(
            "[default]\nmax_connections = 7\n[provider.google]\nmax_message_rate = \"50/s\"\n[\"gmail.com\"]\nmax_connections = 3\n",
            "mine.toml",
        )
        .unwrap();
        let cfg = Config::default();
        let other = s.policy(&cfg, "d1.test", &["mx.hosting.test"]);
        assert_eq!((other.scope.as_str(), other.max_connections), ("default", 7));
        let ws = s.policy(&cfg, "w.test", &["aspmx.l.google.com"]);
        assert_eq!(ws.scope, "provider.google");
        assert_eq!(ws.max_message_rate, Some("50/s".parse().unwrap()));
        let gmail = s.policy(&cfg, "gmail.com", &["gmail-smtp-in.l.google.com"]);
        assert_eq!((gmail.scope.as_str(), gmail.max_connections), ("gmail.com", 3));
        assert_eq!(
            gmail.max_message_rate,
            Some("50/s".parse().unwrap()),
            "the provider's rate still applies"
        );
        assert!(!gmail.rules.is_empty(), "the provider's rules apply to its domains");
    }

    #[test]
    fn the_main_configuration_is_the_base_and_its_per_domain_tables_win() {
        let s = Shaping::default();
        let cfg: Config = toml::from_str(
            "max_connections_per_destination = 9\nmax_messages_per_connection = 50\n[tls_policy]\n\"bank.test\" = \"verify\"\n",
        )
        .unwrap();
        let p = s.policy(&cfg, "d.test", &[]);
        assert_eq!((p.max_connections, p.max_deliveries_per_connection), (9, 50));
        assert_eq!(
            (p.pipeline_window, p.pipeline_window_max),
            (8, crate::config::PIPELINE_WINDOW_MAX)
        );
        // A scope's bigger start without a bound of its own grows no further (and is not an error).
        let mut wide = Shaping::default();
        wide.add("[\"w.test\"]\npipeline_window = 64\n", "w.toml").unwrap();
        let p = wide.policy(&cfg, "w.test", &[]);
        assert_eq!((p.pipeline_window, p.pipeline_window_max), (64, 64));
        assert_eq!(p.tls, TlsPolicy::Opportunistic);
        assert_eq!(s.policy(&cfg, "bank.test", &[]).tls, TlsPolicy::Verify);
    }

    #[test]
    fn bad_shaping_is_refused_naming_file_table_and_key() {
        let cases = [
            (
                "[default]\nmax_conections = 3\n",
                "f.toml: [default]: unknown field `max_conections`",
            ),
            (
                "[provider.x]\nmatch = [{ mx_suffix = \".x.test\" }]\nmax_message_rate = \"fast\"\n",
                "f.toml: [provider.x]: \"fast\" is not a rate",
            ),
            (
                "[\"a.test\"]\nmax_connections = 0\n",
                "f.toml: [\"a.test\"]: max_connections must be at least 1",
            ),
            (
                "[provider.y]\nmax_connections = 2\n",
                "f.toml: [provider.y]: a provider needs match",
            ),
            (
                "[\"a.test\"]\npipeline_window = 16\npipeline_window_max = 4\n",
                "f.toml: [\"a.test\"]: pipeline_window_max (4) is below pipeline_window (16)",
            ),
            (
                "[[default.automation]]\nregex = \"(\"\naction = \"suspend\"\nduration = \"1m\"\n",
                "f.toml: [default] automation[0]: regex:",
            ),
            (
                "[[default.automation]]\nregex = \"x\"\naction = \"pause\"\nduration = \"1m\"\n",
                "f.toml: [default] automation[0]: action = \"pause\"",
            ),
            (
                "[[default.automation]]\nregex = \"x\"\ntrigger = { threshold = \"often\" }\naction = \"suspend\"\nduration = \"1m\"\n",
                "f.toml: [default] automation[0]: trigger.threshold:",
            ),
            (
                "[[default.automation]]\nregex = \"x\"\ntrigger = { in_a_row = 0 }\naction = \"suspend\"\nduration = \"1m\"\n",
                "f.toml: [default] automation[0]: trigger.in_a_row = 0",
            ),
            (
                "[[default.automation]]\nname = \"nope\"\nenabled = false\n",
                "f.toml: [default] automation[0]: enabled = false, but this scope has no rule named \"nope\"",
            ),
            (
                "[[default.automation]]\nregex = \"x\"\naction = { set = { tls = \"disabled\" } }\nduration = \"1m\"\n",
                "f.toml: [default] automation[0]: action.set: tls cannot be changed by a rule",
            ),
            (
                "[nodots]\nmax_connections = 1\n",
                "f.toml: [\"nodots\"] is not a domain",
            ),
        ];
        for (text, want) in cases {
            let err = Shaping::default().add(text, "f.toml").unwrap_err().to_string();
            assert!(err.starts_with(want), "{text}\n got: {err}\nwant: {want}");
        }
    }

    #[test]
    fn a_later_rule_of_the_same_name_replaces_the_built_in_one_or_turns_it_off() {
        let mut s = Shaping::built_in();
        s.add(
            "[[default.automation]]\nname = \"deferred-in-a-row\"\nregex = '^4'\ntrigger = { in_a_row = 3 }\naction = \"suspend\"\nduration = \"5m\"\n",
            "mine.toml",
        )
        .unwrap();
        let cfg = Config::default();
        let rules = s.policy(&cfg, "d.test", &[]).rules;
        let streak: Vec<_> = rules.iter().filter(|r| r.name == "deferred-in-a-row").collect();
        assert_eq!(streak.len(), 1, "replaced, not added");
        assert!(matches!(streak[0].trigger, Trigger::InARow(3)));
        assert_eq!(streak[0].duration, Duration::from_secs(300));
        assert_eq!(rules.last().unwrap().name, "deferred-in-a-row", "in its place");
        s.add(
            "[[default.automation]]\nname = \"deferred-in-a-row\"\nenabled = false\n",
            "off.toml",
        )
        .unwrap();
        let rules = s.policy(&cfg, "d.test", &[]).rules;
        assert!(rules.iter().all(|r| r.name != "deferred-in-a-row"));
        assert!(rules.iter().any(|r| r.name == "throttled"), "the others stay");
    }

    #[test]
    fn rules_parse_with_their_triggers_and_actions() {
        let mut s = Shaping::default();
        s.add(
            r#"
[[default.automation]]
regex = "4\\.7\\.28"
action = "suspend"
duration = "90m"

[[default.automation]]
name = "busy"
regex = "Server busy"
trigger = { threshold = "3/10min" }
action = { set = { max_message_rate = "10/min", max_connections = 1 } }
duration = "30m"
"#,
            "r.toml",
        )
        .unwrap();
        let p = s.policy(&Config::default(), "d.test", &[]);
        assert_eq!(p.rules.len(), 2);
        assert_eq!(p.rules[0].name, "r.toml: [default] automation[0]");
        assert_eq!(p.rules[0].trigger, Trigger::Immediate);
        assert!(matches!(p.rules[0].action, RuleAction::Suspend));
        assert_eq!(p.rules[0].duration, Duration::from_secs(90 * 60));
        assert_eq!(p.rules[1].name, "busy");
        assert_eq!(
            p.rules[1].trigger,
            Trigger::Threshold {
                hits: 3,
                window: Duration::from_secs(600)
            }
        );
        let RuleAction::Set(k) = &p.rules[1].action else {
            panic!("a set action")
        };
        assert_eq!(k.max_connections, Some(1));
    }

    #[test]
    fn a_fleet_rate_is_shared_and_the_slower_rate_wins() {
        let r: Rate = "900/s".parse().unwrap();
        assert!((r.part(3).per_second() - 300.0).abs() < 1e-9);
        assert!(
            (r.part(0).per_second() - 900.0).abs() < 1e-9,
            "no nodes counted: the whole rate"
        );
        let own: Rate = "200/s".parse().unwrap();
        assert_eq!(r.part(3).slower(own), own);
        assert_eq!(r.part(9).slower(own), r.part(9));
        let mut s = Shaping::built_in();
        s.add("[provider.google]\nfleet_message_rate = \"900/s\"\n", "mine.toml")
            .unwrap();
        let p = s.policy(&Config::default(), "gmail.com", &[]);
        assert_eq!(p.fleet_message_rate, Some(r));
        let bad = "[[default.automation]]\nregex = 'x'\naction = { set = { fleet_message_rate = \"1/s\" } }\nduration = \"1m\"\n";
        let err = format!("{:#}", Shaping::built_in().add(bad, "mine.toml").unwrap_err());
        assert!(err.contains("fleet_message_rate cannot be changed by a rule"), "{err}");
    }
}
