//! Name resolution and bound connects off the executors. hickory-resolver
//! needs tokio, so it runs on side threads (`[dns] threads`), each with a
//! current-thread tokio runtime and its own resolver; shards hand lookups to
//! them in turn with `Handle::spawn` and await the returned `JoinHandle`,
//! which wakes any executor. (One thread was the limit of a list of new
//! domains: 4.7× the routed time for 20,000 of them, against 2.9× with four,
//! on two cores.) The first thread also makes connections that must be
//! bound to a source address first (glommio has no such option).
//! Lookups in flight are bounded (`[dns] max_in_flight`): past the bound
//! they wait their turn, so a list of 100,000 distinct domains never runs
//! the process out of sockets (each query has its own UDP socket) and no
//! recipient is deferred because of volley's own limits. MX hosts' addresses
//! are cached here, shared by every domain (and shard) that names them, and
//! one lookup of a host serves everyone who asks while it runs; each shard
//! caches the MX answers of its own domains.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use hickory_resolver::TokioResolver;
use hickory_resolver::config::{NameServerConfig, ResolverConfig, ResolverOpts};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::proto::rr::RData;
use tokio::sync::{Semaphore, watch};

use crate::config::DnsConfig;

/// One MX host (or the domain itself, for an implicit MX) and its addresses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MxHost {
    pub name: String,
    pub preference: u16,
    pub addrs: Vec<IpAddr>,
}

/// What a domain's mail exchangers are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MxAnswer {
    /// Hosts in the order to try: by preference, equal preferences shuffled.
    Hosts { hosts: Vec<MxHost>, ttl: Duration },
    /// `MX 0 .` (RFC 7505): the domain accepts no mail.
    NullMx,
    /// NXDOMAIN, or a domain with neither MX nor address records.
    NoSuchDomain(String),
    /// SERVFAIL, timeout, refused: try again later.
    Temporary(String),
}

/// MX hosts' addresses cached on the side thread, bounded in entries.
const MAX_CACHED_HOSTS: usize = 100_000;

/// Handle to the side threads, cloned into every shard.
#[derive(Clone)]
pub struct Net {
    sides: Arc<[Side]>,
    /// The next side thread to hand a lookup to (round robin).
    next: Arc<AtomicUsize>,
}

/// One side thread: its runtime and its resolver.
struct Side {
    handle: tokio::runtime::Handle,
    lookups: Arc<Lookups>,
}

/// What one side thread's lookups use.
struct Lookups {
    resolver: TokioResolver,
    /// Queries in flight at once on this thread; the rest wait for a permit (FIFO).
    in_flight: Semaphore,
    /// MX hosts' addresses, shared by every side thread.
    hosts: Arc<std::sync::Mutex<HashMap<String, HostEntry>>>,
    min_ttl: Duration,
    max_ttl: Duration,
    deadline: Deadline,
}

/// How long a query may take in all: `attempts × timeout`, as the
/// configuration says (the resolver's own retries over UDP and TCP could
/// take longer).
#[derive(Clone, Copy)]
struct Deadline {
    timeout: Duration,
    attempts: usize,
}

impl Deadline {
    /// `query`, or why it had no answer in time.
    async fn run<T, E: std::fmt::Display>(
        self,
        what: &str,
        query: impl std::future::Future<Output = Result<T, E>>,
    ) -> Result<Result<T, E>, String> {
        let all = self.timeout * self.attempts as u32;
        tokio::time::timeout(all, query).await.map_err(|_| {
            format!(
                "{what}: no answer within {} ({} attempts of {})",
                humantime::format_duration(all),
                self.attempts,
                humantime::format_duration(self.timeout)
            )
        })
    }
}

impl Lookups {
    /// A turn to query: waits while this thread's share of `max_in_flight` queries are out.
    async fn permit(&self) -> tokio::sync::SemaphorePermit<'_> {
        self.in_flight.acquire().await.expect("the semaphore is never closed")
    }
}

/// The addresses of an MX host: known until a time, or being looked up.
#[derive(Clone)]
enum HostEntry {
    Known { addrs: Vec<IpAddr>, until: Instant },
    Resolving(HostWaiter),
}

/// Where the answer of a host lookup under way will appear.
type HostWaiter = watch::Receiver<Option<Result<Vec<IpAddr>, String>>>;

/// Owns the side threads; dropping it stops them.
pub struct NetThread {
    net: Net,
    stops: Vec<tokio::sync::oneshot::Sender<()>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl NetThread {
    pub fn start(cfg: &DnsConfig) -> anyhow::Result<NetThread> {
        let (config, mut opts) = if cfg.servers.is_empty() {
            hickory_resolver::system_conf::read_system_conf()
                .context("cannot read /etc/resolv.conf (or give --dns HOST:PORT)")?
        } else {
            let servers = cfg
                .servers
                .iter()
                .map(|s| {
                    let mut ns = NameServerConfig::udp_and_tcp(s.ip());
                    for c in &mut ns.connections {
                        c.port = s.port();
                    }
                    ns
                })
                .collect();
            (ResolverConfig::from_name_servers(servers), ResolverOpts::default())
        };
        opts.timeout = cfg.timeout;
        opts.attempts = cfg.attempts.max(1);
        let deadline = Deadline {
            timeout: cfg.timeout,
            attempts: cfg.attempts.max(1),
        };
        let threads = cfg.threads.max(1);
        let in_flight = cfg.max_in_flight.max(1).div_ceil(threads);
        let hosts = Arc::new(std::sync::Mutex::new(HashMap::new()));
        let mut sides = Vec::with_capacity(threads);
        let mut out = NetThread {
            net: Net {
                sides: Arc::from(Vec::new()),
                next: Arc::new(AtomicUsize::new(0)),
            },
            stops: Vec::new(),
            threads: Vec::new(),
        };
        for i in 0..threads {
            let (tx, rx) = std::sync::mpsc::channel();
            let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
            let (config, opts, hosts) = (config.clone(), opts.clone(), hosts.clone());
            let (min_ttl, max_ttl) = (cfg.min_ttl, cfg.max_ttl);
            let thread = std::thread::Builder::new()
                .name(format!("volley-net-{i}"))
                .spawn(move || {
                    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                        Ok(rt) => rt,
                        Err(e) => {
                            let _ = tx.send(Err(anyhow::anyhow!("cannot start the resolver runtime: {e}")));
                            return;
                        }
                    };
                    let mut builder = TokioResolver::builder_with_config(config, TokioRuntimeProvider::default());
                    *builder.options_mut() = opts;
                    let resolver = {
                        let _guard = rt.enter();
                        builder.build()
                    };
                    match resolver {
                        Ok(resolver) => {
                            let lookups = Lookups {
                                resolver,
                                in_flight: Semaphore::new(in_flight),
                                hosts,
                                min_ttl,
                                max_ttl,
                                deadline,
                            };
                            let _ = tx.send(Ok(Side {
                                handle: rt.handle().clone(),
                                lookups: Arc::new(lookups),
                            }));
                            rt.block_on(async {
                                let _ = stop_rx.await;
                            });
                        }
                        Err(e) => {
                            let _ = tx.send(Err(anyhow::anyhow!("cannot build the resolver: {e}")));
                        }
                    }
                })
                .context("cannot start a resolver thread")?;
            out.stops.push(stop_tx);
            out.threads.push(thread);
            sides.push(rx.recv().context("a resolver thread ended at start-up")??);
        }
        out.net.sides = Arc::from(sides);
        Ok(out)
    }

    pub fn net(&self) -> Net {
        self.net.clone()
    }
}

impl Drop for NetThread {
    fn drop(&mut self) {
        for s in self.stops.drain(..) {
            let _ = s.send(());
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Net {
    /// The mail exchangers of `domain` (RFC 5321 §5.1, RFC 7505).
    pub async fn resolve_mx(&self, domain: &str) -> MxAnswer {
        let side = &self.sides[self.next.fetch_add(1, Ordering::Relaxed) % self.sides.len()];
        let lookups = side.lookups.clone();
        let domain = domain.to_string();
        match side
            .handle
            .spawn(async move { resolve_mx(&lookups, &domain).await })
            .await
        {
            Ok(answer) => answer,
            Err(e) => MxAnswer::Temporary(format!("resolver task failed: {e}")),
        }
    }

    /// Connects from `source` to `addr` within `timeout`; the socket is bound before connecting.
    pub async fn connect_from(
        &self,
        source: IpAddr,
        addr: SocketAddr,
        timeout: Duration,
    ) -> std::io::Result<std::net::TcpStream> {
        let task = self.sides[0].handle.spawn(async move {
            let domain = if addr.is_ipv4() {
                socket2::Domain::IPV4
            } else {
                socket2::Domain::IPV6
            };
            let socket = socket2::Socket::new(domain, socket2::Type::STREAM, Some(socket2::Protocol::TCP))?;
            socket.bind(&SocketAddr::new(source, 0).into())?;
            socket.set_nonblocking(true)?;
            let socket = tokio::net::TcpSocket::from_std_stream(std::net::TcpStream::from(socket));
            let stream = tokio::time::timeout(timeout, socket.connect(addr))
                .await
                .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connection timed out"))??;
            stream.into_std()
        });
        task.await.map_err(std::io::Error::other)?
    }
}

async fn resolve_mx(lookups: &Lookups, domain: &str) -> MxAnswer {
    let fqdn = format!("{}.", domain.trim_end_matches('.'));
    let answer = {
        let _permit = lookups.permit().await;
        lookups
            .deadline
            .run(
                &format!("MX lookup for {domain}"),
                lookups.resolver.mx_lookup(fqdn.as_str()),
            )
            .await
    };
    let answer = match answer {
        Ok(a) => a,
        Err(late) => return MxAnswer::Temporary(late),
    };
    let lookup = match answer {
        Ok(l) => l,
        Err(e) if e.is_nx_domain() => return MxAnswer::NoSuchDomain(format!("{domain}: no such domain (NXDOMAIN)")),
        Err(e) if e.is_no_records_found() => return implicit_mx(lookups, domain, &fqdn).await,
        Err(e) => return MxAnswer::Temporary(format!("MX lookup for {domain} failed: {e}")),
    };
    let ttl = lookup.valid_until().saturating_duration_since(Instant::now());
    let mut mx: Vec<(u16, String)> = lookup
        .answers()
        .iter()
        .filter_map(|r| match &r.data {
            RData::MX(mx) => Some((mx.preference, mx.exchange.to_ascii())),
            _ => None,
        })
        .collect();
    if mx.iter().any(|(_, host)| host == "." || host.is_empty()) {
        return MxAnswer::NullMx;
    }
    if mx.is_empty() {
        return implicit_mx(lookups, domain, &fqdn).await;
    }
    // By preference; equal preferences in random order (RFC 5321 §5.1).
    fastrand::shuffle(&mut mx);
    mx.sort_by_key(|(p, _)| *p);
    let mut hosts = Vec::with_capacity(mx.len());
    let mut problems = Vec::new();
    for (preference, name) in mx {
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        match host_addrs(lookups, &name).await {
            Ok(addrs) => hosts.push(MxHost {
                name,
                preference,
                addrs,
            }),
            Err(e) => problems.push(format!("{name}: {e}")),
        }
    }
    if hosts.is_empty() {
        return MxAnswer::Temporary(format!(
            "no MX host of {domain} has an address ({})",
            problems.join("; ")
        ));
    }
    MxAnswer::Hosts { hosts, ttl }
}

/// The addresses of an MX host: from the cache, from a lookup of it already
/// running, or from a new one (which then serves the others that ask).
async fn host_addrs(lookups: &Lookups, host: &str) -> Result<Vec<IpAddr>, String> {
    loop {
        match host_entry(lookups, host) {
            Ok(addrs) => return Ok(addrs),
            Err(Some(mut rx)) => {
                if let Ok(done) = rx.wait_for(Option::is_some).await
                    && let Some(result) = done.clone()
                {
                    return result;
                }
                // The lookup went away without an answer: ask again.
            }
            Err(None) => {
                let (tx, rx) = watch::channel(None);
                set_host(lookups, host, Some(HostEntry::Resolving(rx)));
                let result = lookup_host(lookups, host).await;
                // A failure is not kept: the next domain that names the host asks again.
                let entry = result.as_ref().ok().map(|(addrs, until)| HostEntry::Known {
                    addrs: addrs.clone(),
                    until: *until,
                });
                set_host(lookups, host, entry);
                let result = result.map(|(addrs, _)| addrs);
                let _ = tx.send(Some(result.clone()));
                return result;
            }
        }
    }
}

/// The cached addresses of `host` (Ok), the lookup of it under way
/// (Err(Some)), or nothing: the caller looks it up (Err(None)).
fn host_entry(lookups: &Lookups, host: &str) -> Result<Vec<IpAddr>, Option<HostWaiter>> {
    let hosts = lookups.hosts.lock().unwrap_or_else(|e| e.into_inner());
    match hosts.get(host) {
        Some(HostEntry::Known { addrs, until }) if *until > Instant::now() => Ok(addrs.clone()),
        Some(HostEntry::Resolving(rx)) => Err(Some(rx.clone())),
        _ => Err(None),
    }
}

fn set_host(lookups: &Lookups, host: &str, entry: Option<HostEntry>) {
    let mut hosts = lookups.hosts.lock().unwrap_or_else(|e| e.into_inner());
    match entry {
        Some(e) => {
            if hosts.len() >= MAX_CACHED_HOSTS && !hosts.contains_key(host) {
                let now = Instant::now();
                hosts.retain(|_, e| matches!(e, HostEntry::Known { until, .. } if *until > now));
                if hosts.len() >= MAX_CACHED_HOSTS {
                    hosts.clear();
                }
            }
            hosts.insert(host.to_string(), e);
        }
        None => {
            hosts.remove(host);
        }
    }
}

async fn lookup_host(lookups: &Lookups, host: &str) -> Result<(Vec<IpAddr>, Instant), String> {
    let _permit = lookups.permit().await;
    let ips = lookups
        .deadline
        .run(
            &format!("address lookup for {host}"),
            lookups.resolver.lookup_ip(format!("{host}.").as_str()),
        )
        .await?
        .map_err(|e| e.to_string())?;
    let ttl = ips
        .valid_until()
        .saturating_duration_since(Instant::now())
        .clamp(lookups.min_ttl, lookups.max_ttl);
    Ok((ips.iter().collect(), Instant::now() + ttl))
}

/// No MX records: the domain's own addresses are its mail exchanger.
async fn implicit_mx(lookups: &Lookups, domain: &str, fqdn: &str) -> MxAnswer {
    let answer = {
        let _permit = lookups.permit().await;
        lookups
            .deadline
            .run(
                &format!("address lookup for {domain}"),
                lookups.resolver.lookup_ip(fqdn),
            )
            .await
    };
    let answer = match answer {
        Ok(a) => a,
        Err(late) => return MxAnswer::Temporary(late),
    };
    match answer {
        Ok(ips) => MxAnswer::Hosts {
            ttl: ips.valid_until().saturating_duration_since(Instant::now()),
            hosts: vec![MxHost {
                name: domain.to_string(),
                preference: 0,
                addrs: ips.iter().collect(),
            }],
        },
        Err(e) if e.is_nx_domain() || e.is_no_records_found() => {
            MxAnswer::NoSuchDomain(format!("{domain}: no MX and no address records"))
        }
        Err(e) => MxAnswer::Temporary(format!("address lookup for {domain} failed: {e}")),
    }
}
