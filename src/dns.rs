//! Name resolution and bound connects off the executors. hickory-resolver
//! needs tokio, so it runs on one side thread with a current-thread tokio
//! runtime; shards hand it work with `Handle::spawn` and await the returned
//! `JoinHandle`, which wakes any executor. The same thread makes connections
//! that must be bound to a source address first (glommio has no such option).
//! This module owns no cache: each shard caches the answers of its own domains.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use hickory_resolver::TokioResolver;
use hickory_resolver::config::{NameServerConfig, ResolverConfig, ResolverOpts};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::proto::rr::RData;

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

/// Handle to the side thread, cloned into every shard.
#[derive(Clone)]
pub struct Net {
    handle: tokio::runtime::Handle,
    resolver: Arc<TokioResolver>,
}

/// Owns the side thread; dropping it stops the thread.
pub struct NetThread {
    net: Net,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
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
        opts.attempts = 2;
        let (tx, rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("volley-net".into())
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
                    Ok(r) => {
                        let _ = tx.send(Ok((rt.handle().clone(), Arc::new(r))));
                        rt.block_on(async {
                            let _ = stop_rx.await;
                        });
                    }
                    Err(e) => {
                        let _ = tx.send(Err(anyhow::anyhow!("cannot build the resolver: {e}")));
                    }
                }
            })
            .context("cannot start the resolver thread")?;
        let (handle, resolver) = rx.recv().context("the resolver thread ended at start-up")??;
        Ok(NetThread {
            net: Net { handle, resolver },
            stop: Some(stop_tx),
            thread: Some(thread),
        })
    }

    pub fn net(&self) -> Net {
        self.net.clone()
    }
}

impl Drop for NetThread {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Net {
    /// The mail exchangers of `domain` (RFC 5321 §5.1, RFC 7505).
    pub async fn resolve_mx(&self, domain: &str) -> MxAnswer {
        let resolver = self.resolver.clone();
        let domain = domain.to_string();
        match self
            .handle
            .spawn(async move { resolve_mx(&resolver, &domain).await })
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
        let task = self.handle.spawn(async move {
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

async fn resolve_mx(resolver: &TokioResolver, domain: &str) -> MxAnswer {
    let fqdn = format!("{}.", domain.trim_end_matches('.'));
    let lookup = match resolver.mx_lookup(fqdn.as_str()).await {
        Ok(l) => l,
        Err(e) if e.is_nx_domain() => return MxAnswer::NoSuchDomain(format!("{domain}: no such domain (NXDOMAIN)")),
        Err(e) if e.is_no_records_found() => return implicit_mx(resolver, domain, &fqdn).await,
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
        return implicit_mx(resolver, domain, &fqdn).await;
    }
    // By preference; equal preferences in random order (RFC 5321 §5.1).
    fastrand::shuffle(&mut mx);
    mx.sort_by_key(|(p, _)| *p);
    let mut hosts = Vec::with_capacity(mx.len());
    let mut problems = Vec::new();
    for (preference, name) in mx {
        let fq = if name.ends_with('.') {
            name.clone()
        } else {
            format!("{name}.")
        };
        match resolver.lookup_ip(fq.as_str()).await {
            Ok(ips) => hosts.push(MxHost {
                name: name.trim_end_matches('.').to_string(),
                preference,
                addrs: ips.iter().collect(),
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

/// No MX records: the domain's own addresses are its mail exchanger.
async fn implicit_mx(resolver: &TokioResolver, domain: &str, fqdn: &str) -> MxAnswer {
    match resolver.lookup_ip(fqdn).await {
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
