//! `volley sink`: an SMTP server for load tests and content checks. One
//! glommio executor per core accepts on the same port (SO_REUSEPORT). The
//! protocol side is `ServerSession`, a sans-IO state machine that answers a
//! whole pipelined group from one read; faults are injected on request.
//! Message dumps (`--dump`) are written with blocking file I/O: the sink is a
//! test tool, and dumping is for content checks, not for speed.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::io::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use crossbeam_utils::CachePadded;
use futures_lite::{AsyncReadExt, AsyncWriteExt};
use glommio::ExecutorJoinHandle;
use glommio::net::{TcpListener, TcpStream};

use crate::shaping::Rate;
use crate::tls::MaybeTls;

/// Longest command line accepted (RFC 5321 allows 512 plus extension parameters).
const MAX_COMMAND_BYTES: usize = 4096;
/// A data line longer than this is passed through in pieces.
const MAX_DATA_LINE_BYTES: usize = 64 * 1024;
/// Advertised and enforced message size limit.
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;
/// Recipients accepted per transaction.
const MAX_RCPTS: usize = 1000;
/// A client silent this long is disconnected.
const SESSION_IDLE: Duration = Duration::from_secs(300);

#[derive(Debug, Clone)]
pub struct SinkOptions {
    pub listen: SocketAddr,
    pub shards: usize,
    pub hostname: String,
    /// Probability that a RCPT gets 450.
    pub defer_rate: f64,
    /// Probability that a RCPT gets 550.
    pub reject_rate: f64,
    /// Probability that a MAIL makes the sink close the connection without answering it.
    pub disconnect_rate: f64,
    /// Delay before each batch of replies.
    pub latency: Duration,
    pub dump: Option<PathBuf>,
    pub seed: u64,
    /// Offer STARTTLS with this configuration.
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// Offer STARTTLS, answer 220, then close instead of the handshake (fault injection).
    pub tls_fault: bool,
    /// TLS from the first byte (port 465 style) with `tls`.
    pub implicit_tls: bool,
    /// Require AUTH (PLAIN or LOGIN) with this user and password before MAIL.
    pub auth: Option<(String, String)>,
    /// Offer CHUNKING (RFC 3030): take BDAT as well as DATA.
    pub chunking: bool,
    /// Offer SMTPUTF8 (RFC 6531): take UTF-8 addresses on a MAIL that asks for it.
    pub smtputf8: bool,
    /// Do not offer 8BITMIME (RFC 6152): refuse a message with 8-bit content.
    pub no_8bitmime: bool,
    /// Sessions at once (over every shard); beyond, a new one is greeted with 421 and closed.
    pub max_connections: Option<usize>,
    /// Messages per client address (MAIL commands accepted), like a provider's
    /// throttle; over it MAIL is answered `throttle_reply` (and a 421 closes).
    pub rate_limit: Option<Rate>,
    pub throttle_reply: String,
    /// Messages per session; the next MAIL gets 421 and the session closes.
    pub max_messages_per_connection: Option<u64>,
}

/// The reply to MAIL while a client is over `rate_limit`, by default (Gmail's words).
pub const THROTTLE_REPLY: &str = "421 4.7.28 Our system has detected an unusual rate of unsolicited mail originating from your IP address. Try again later";

/// What the sink's shards share to throttle like a provider.
struct Limits {
    active: AtomicUsize,
    throttle: Option<Arc<Throttle>>,
}

/// `rate_limit` per client address: GCRA with a burst of a tenth of a
/// second's worth (at least one message).
pub struct Throttle {
    interval: Duration,
    burst: Duration,
    tat: Mutex<HashMap<IpAddr, Instant>>,
}

impl Throttle {
    pub fn new(rate: Rate) -> Throttle {
        let interval = rate.interval();
        // GCRA's tolerance: this many intervals early, so that a burst of
        // (tolerance + 1) messages passes at once.
        let burst = interval * ((rate.per_second() / 10.0).max(1.0) as u32 - 1);
        Throttle {
            interval,
            burst,
            tat: Mutex::new(HashMap::new()),
        }
    }

    /// Whether `ip` may send one more message at `now`.
    pub fn allow(&self, ip: IpAddr, now: Instant) -> bool {
        let mut tat = self.tat.lock().unwrap_or_else(|e| e.into_inner());
        let t = tat.entry(ip).or_insert(now);
        if t.saturating_duration_since(now) > self.burst {
            return false;
        }
        *t = (*t).max(now) + self.interval;
        true
    }
}

impl Default for SinkOptions {
    fn default() -> Self {
        SinkOptions {
            listen: "127.0.0.1:2525".parse().expect("valid address"),
            shards: 1,
            hostname: "sink.volley.test".into(),
            defer_rate: 0.0,
            reject_rate: 0.0,
            disconnect_rate: 0.0,
            latency: Duration::ZERO,
            dump: None,
            seed: 1,
            tls: None,
            tls_fault: false,
            implicit_tls: false,
            auth: None,
            chunking: false,
            smtputf8: false,
            no_8bitmime: false,
            max_connections: None,
            rate_limit: None,
            throttle_reply: THROTTLE_REPLY.to_string(),
            max_messages_per_connection: None,
        }
    }
}

/// Totals over all shards.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SinkCounts {
    pub sessions: u64,
    /// Sessions that completed a TLS handshake.
    pub tls_sessions: u64,
    pub messages: u64,
    /// Of those, received with BDAT.
    pub chunked: u64,
    pub recipients: u64,
    pub bytes: u64,
    /// MAIL commands answered with the throttle reply.
    pub throttled: u64,
    /// Sessions refused with 421 at `max_connections`.
    pub refused: u64,
}

impl std::fmt::Display for SinkCounts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "sessions {} tls {} messages {} recipients {} bytes {} (bdat messages {}) throttled {} refused {}",
            self.sessions,
            self.tls_sessions,
            self.messages,
            self.recipients,
            self.bytes,
            self.chunked,
            self.throttled,
            self.refused
        )
    }
}

/// Counters of one shard, written by that shard only.
#[derive(Default)]
struct ShardStats {
    sessions: AtomicU64,
    tls_sessions: AtomicU64,
    messages: AtomicU64,
    chunked: AtomicU64,
    recipients: AtomicU64,
    bytes: AtomicU64,
    throttled: AtomicU64,
    refused: AtomicU64,
}

impl ShardStats {
    fn add(&self, c: &AtomicU64, n: u64) {
        // Single writer: a load and a store, no read-modify-write across cores.
        c.store(c.load(Ordering::Relaxed) + n, Ordering::Relaxed);
    }
}

/// A running sink.
pub struct Sink {
    addr: SocketAddr,
    stats: Arc<Vec<CachePadded<ShardStats>>>,
    stop: Arc<AtomicBool>,
    handles: Vec<ExecutorJoinHandle<()>>,
}

impl Sink {
    pub fn start(opts: SinkOptions) -> anyhow::Result<Sink> {
        if let Some(dir) = &opts.dump {
            std::fs::create_dir_all(dir).with_context(|| format!("cannot create dump folder {}", dir.display()))?;
        }
        let shards = opts.shards.max(1);
        let stats: Arc<Vec<CachePadded<ShardStats>>> = Arc::new((0..shards).map(|_| CachePadded::default()).collect());
        let stop = Arc::new(AtomicBool::new(false));
        let limits = Arc::new(Limits {
            active: AtomicUsize::new(0),
            throttle: opts.rate_limit.map(|r| Arc::new(Throttle::new(r))),
        });
        let mut handles = Vec::new();
        let mut addr = opts.listen;
        for index in 0..shards {
            let (tx, rx) = std::sync::mpsc::channel();
            let mut o = opts.clone();
            o.listen = addr;
            let (stats, stop, limits) = (stats.clone(), stop.clone(), limits.clone());
            handles.push(crate::runtime::spawn_pinned(
                "volley-sink",
                index,
                move || async move {
                    match TcpListener::bind(o.listen) {
                        Ok(listener) => {
                            let _ = tx.send(listener.local_addr().map_err(|e| e.to_string()));
                            serve(listener, index, o, stats, stop, limits).await;
                        }
                        Err(e) => {
                            let _ = tx.send(Err(e.to_string()));
                        }
                    }
                },
            )?);
            let bound = rx
                .recv()
                .context("sink executor ended before binding")?
                .map_err(|e| anyhow::anyhow!("sink cannot listen on {addr}: {e}"))?;
            // Every shard binds the port the first one got (the first may have asked for port 0).
            addr = bound;
        }
        Ok(Sink {
            addr,
            stats,
            stop,
            handles,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn counts(&self) -> SinkCounts {
        Sink::totals(&self.stats)
    }

    /// Stops accepting, closes every session, and returns the totals.
    pub fn stop(self) -> SinkCounts {
        self.stop.store(true, Ordering::Relaxed);
        for h in self.handles {
            let _ = h.join();
        }
        let stats = self.stats;
        Sink::totals(&stats)
    }

    fn totals(stats: &[CachePadded<ShardStats>]) -> SinkCounts {
        let mut c = SinkCounts::default();
        for s in stats {
            c.sessions += s.sessions.load(Ordering::Relaxed);
            c.tls_sessions += s.tls_sessions.load(Ordering::Relaxed);
            c.messages += s.messages.load(Ordering::Relaxed);
            c.chunked += s.chunked.load(Ordering::Relaxed);
            c.recipients += s.recipients.load(Ordering::Relaxed);
            c.bytes += s.bytes.load(Ordering::Relaxed);
            c.throttled += s.throttled.load(Ordering::Relaxed);
            c.refused += s.refused.load(Ordering::Relaxed);
        }
        c
    }
}

struct Ctx {
    index: usize,
    opts: SinkOptions,
    stats: Arc<Vec<CachePadded<ShardStats>>>,
    stop: Arc<AtomicBool>,
    limits: Arc<Limits>,
    active: std::cell::Cell<usize>,
    next_conn: std::cell::Cell<u64>,
}

async fn serve(
    listener: TcpListener,
    index: usize,
    opts: SinkOptions,
    stats: Arc<Vec<CachePadded<ShardStats>>>,
    stop: Arc<AtomicBool>,
    limits: Arc<Limits>,
) {
    let ctx = Rc::new(Ctx {
        index,
        opts,
        stats,
        stop,
        limits,
        active: Default::default(),
        next_conn: Default::default(),
    });
    // The accept in progress is kept across stop checks, never cancelled: a
    // cancelled io_uring accept can lose a connection the kernel already took.
    let mut accepting = Box::pin(listener.accept());
    while !ctx.stop.load(Ordering::Relaxed) {
        let tick = async {
            glommio::timer::sleep(Duration::from_millis(100)).await;
            None
        };
        let accepted = futures_lite::future::or(async { Some((&mut accepting).await) }, tick).await;
        let Some(result) = accepted else { continue };
        accepting = Box::pin(listener.accept());
        match result {
            Ok(stream) => {
                ctx.active.set(ctx.active.get() + 1);
                let ctx2 = ctx.clone();
                glommio::spawn_local(async move {
                    let limits = &ctx2.limits;
                    let open = limits.active.fetch_add(1, Ordering::Relaxed);
                    if ctx2.opts.max_connections.is_some_and(|max| open >= max) {
                        let stats = &ctx2.stats[ctx2.index];
                        stats.add(&stats.refused, 1);
                        let mut stream = stream;
                        let _ = stream
                            .write_all(b"421 4.7.0 Too many connections from your host, try again later\r\n")
                            .await;
                        let _ = stream.shutdown(std::net::Shutdown::Both).await;
                    } else {
                        session(stream, &ctx2).await;
                    }
                    limits.active.fetch_sub(1, Ordering::Relaxed);
                    ctx2.active.set(ctx2.active.get() - 1);
                })
                .detach();
            }
            Err(e) => {
                tracing::warn!("sink accept failed: {e}");
                glommio::timer::sleep(Duration::from_millis(10)).await;
            }
        }
    }
    while ctx.active.get() > 0 {
        glommio::timer::sleep(Duration::from_millis(5)).await;
    }
}

type Stream = MaybeTls<futures_rustls::server::TlsStream<TcpStream>>;

async fn session(tcp: TcpStream, ctx: &Ctx) {
    let stats = &ctx.stats[ctx.index];
    stats.add(&stats.sessions, 1);
    let conn = ctx.next_conn.get();
    ctx.next_conn.set(conn + 1);
    let _ = tcp.set_nodelay(true);
    let _ = tcp.set_read_timeout(Some(Duration::from_millis(250)));
    let peer = tcp.peer_addr().ok();
    let mut stream: Stream = MaybeTls::Plain(tcp);
    let seed = ctx.opts.seed ^ ((ctx.index as u64) << 48) ^ conn.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    let mut s = ServerSession::new(&ctx.opts, seed, ctx.opts.dump.is_some());
    if let (Some(t), Some(peer)) = (&ctx.limits.throttle, peer) {
        s = s.throttled_by(t.clone(), peer.ip());
    }
    if ctx.opts.implicit_tls
        && let Some(config) = &ctx.opts.tls
    {
        let Some(tls) = upgrade(stream, config, stats, &mut s).await else {
            return;
        };
        stream = tls;
    }
    let mut out = Vec::with_capacity(4096);
    s.greeting(&mut out);
    if stream.write_all(&out).await.is_err() {
        return;
    }
    out.clear();
    let mut buf = vec![0u8; 64 * 1024];
    let mut idle = Duration::ZERO;
    let mut dumped = 0u64;
    loop {
        let n = match stream.read(&mut buf).await {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {
                idle += Duration::from_millis(250);
                if ctx.stop.load(Ordering::Relaxed) || idle >= SESSION_IDLE {
                    break;
                }
                continue;
            }
            Err(_) => break,
        };
        idle = Duration::ZERO;
        let action = s.input(&buf[..n], &mut out);
        if s.throttled > 0 {
            stats.add(&stats.throttled, std::mem::take(&mut s.throttled));
        }
        for m in s.received.drain(..) {
            stats.add(&stats.messages, 1);
            stats.add(&stats.chunked, u64::from(m.chunked));
            stats.add(&stats.recipients, m.rcpts.len() as u64);
            stats.add(&stats.bytes, m.bytes as u64);
            if let Some(dir) = &ctx.opts.dump {
                let path = dir.join(format!("{}-{conn}-{dumped}.eml", ctx.index));
                dumped += 1;
                if let Err(e) = dump(&path, &m, peer) {
                    tracing::warn!("cannot write {}: {e}", path.display());
                }
            }
        }
        if !out.is_empty() {
            if !ctx.opts.latency.is_zero() {
                glommio::timer::sleep(ctx.opts.latency).await;
            }
            if stream.write_all(&out).await.is_err() {
                break;
            }
            out.clear();
        }
        match action {
            Action::Continue => {}
            Action::StartTls => {
                let (Some(config), false) = (&ctx.opts.tls, ctx.opts.tls_fault) else {
                    // The fault: STARTTLS accepted, then no handshake.
                    let _ = stream.tcp().shutdown(std::net::Shutdown::Both).await;
                    return;
                };
                let Some(tls) = upgrade(stream, config, stats, &mut s).await else {
                    return;
                };
                stream = tls;
            }
            Action::Close | Action::Drop => break,
        }
    }
    let _ = stream.tcp().shutdown(std::net::Shutdown::Both).await;
}

/// Runs the server side of the handshake on a plaintext stream; `None` ends the session.
async fn upgrade(
    stream: Stream,
    config: &Arc<rustls::ServerConfig>,
    stats: &ShardStats,
    s: &mut ServerSession,
) -> Option<Stream> {
    let MaybeTls::Plain(tcp) = stream else { return None };
    match accept_tls(config, tcp).await {
        Ok(tls) => {
            stats.add(&stats.tls_sessions, 1);
            s.tls_started();
            Some(MaybeTls::Tls(Box::new(tls)))
        }
        Err(e) => {
            tracing::debug!("sink TLS handshake failed: {e}");
            None
        }
    }
}

/// The server side of a TLS handshake, within 10 s (a stalled client must not hold the sink open).
async fn accept_tls(
    config: &Arc<rustls::ServerConfig>,
    tcp: TcpStream,
) -> Result<futures_rustls::server::TlsStream<TcpStream>, glommio::GlommioError<()>> {
    let acceptor = futures_rustls::TlsAcceptor::from(config.clone());
    glommio::timer::timeout(Duration::from_secs(10), async { Ok(acceptor.accept(tcp).await?) }).await
}

fn dump(path: &std::path::Path, m: &Received, peer: Option<SocketAddr>) -> std::io::Result<()> {
    let mut f = std::io::BufWriter::new(std::fs::File::create(path)?);
    if let Some(p) = peer {
        writeln!(f, "X-Peer: {}\r", p.ip())?;
    }
    writeln!(f, "X-Helo: {}\r", m.helo)?;
    writeln!(f, "X-Mail-From: <{}>\r", m.from)?;
    for r in &m.rcpts {
        writeln!(f, "X-Rcpt-To: <{r}>\r")?;
    }
    f.write_all(&m.body)?;
    f.flush()
}

/// What the driver does after writing the replies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Continue,
    /// Write the replies, then close (QUIT, or an error that ends the session).
    Close,
    /// Write the replies owed so far, then close without answering the last
    /// command (injected fault; no accepted message loses its reply).
    Drop,
    /// Write the 220 to STARTTLS, then run the TLS handshake.
    StartTls,
}

/// A message the sink accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Received {
    /// The name the client gave in EHLO/HELO.
    pub helo: String,
    pub from: String,
    pub rcpts: Vec<String>,
    /// The unstuffed data with CRLF line ends (only kept when dumping).
    pub body: Vec<u8>,
    pub bytes: usize,
    /// It came with BDAT.
    pub chunked: bool,
}

#[derive(Debug, PartialEq, Eq)]
enum State {
    Command,
    Data,
    /// Inside a BDAT chunk: octets still to read, whether it is the last, and
    /// the error to answer once it is read (the chunk is read either way).
    Chunk {
        remaining: usize,
        last: bool,
        error: Option<&'static str>,
    },
}

/// The server side of one SMTP session, without I/O.
pub struct ServerSession {
    hostname: String,
    defer_rate: f64,
    reject_rate: f64,
    disconnect_rate: f64,
    rng: fastrand::Rng,
    keep_body: bool,
    tls_offered: bool,
    chunking: bool,
    smtputf8: bool,
    eight_bit_mime: bool,
    /// The transaction's MAIL asked for SMTPUTF8.
    utf8_txn: bool,
    /// The message so far has a byte above 127.
    saw_8bit: bool,
    secure: bool,
    auth: Option<(String, String)>,
    authed: bool,
    sasl: Sasl,
    state: State,
    greeted: bool,
    helo: String,
    mail: Option<String>,
    rcpts: Vec<String>,
    buf: Vec<u8>,
    body: Vec<u8>,
    body_bytes: usize,
    mid_line: bool,
    queued: u64,
    /// Messages completed by the last `input`.
    pub received: Vec<Received>,
    /// The client's address and the throttle it is under (`rate_limit`).
    throttle: Option<(Arc<Throttle>, IpAddr)>,
    throttle_reply: String,
    max_messages: Option<u64>,
    /// MAIL commands accepted in this session.
    mails: u64,
    /// MAIL commands answered with the throttle reply since last taken.
    pub throttled: u64,
}

impl ServerSession {
    pub fn new(opts: &SinkOptions, seed: u64, keep_body: bool) -> ServerSession {
        ServerSession {
            hostname: opts.hostname.clone(),
            defer_rate: opts.defer_rate,
            reject_rate: opts.reject_rate,
            disconnect_rate: opts.disconnect_rate,
            rng: fastrand::Rng::with_seed(seed),
            keep_body,
            tls_offered: (opts.tls.is_some() || opts.tls_fault) && !opts.implicit_tls,
            chunking: opts.chunking,
            smtputf8: opts.smtputf8,
            eight_bit_mime: !opts.no_8bitmime,
            utf8_txn: false,
            saw_8bit: false,
            secure: false,
            auth: opts.auth.clone(),
            authed: false,
            sasl: Sasl::Idle,
            state: State::Command,
            greeted: false,
            helo: String::new(),
            mail: None,
            rcpts: Vec::new(),
            buf: Vec::new(),
            body: Vec::new(),
            body_bytes: 0,
            mid_line: false,
            queued: 0,
            received: Vec::new(),
            throttle: None,
            throttle_reply: opts.throttle_reply.clone(),
            max_messages: opts.max_messages_per_connection,
            mails: 0,
            throttled: 0,
        }
    }

    /// Throttles the session's client, `peer`, with `throttle`.
    pub fn throttled_by(mut self, throttle: Arc<Throttle>, peer: IpAddr) -> ServerSession {
        self.throttle = Some((throttle, peer));
        self
    }

    /// TLS is up: forget the plaintext session, including anything the client
    /// pipelined after STARTTLS (RFC 3207 §4.2); the client must EHLO again.
    pub fn tls_started(&mut self) {
        self.buf.clear();
        self.reset();
        self.greeted = false;
        self.authed = false;
        self.secure = true;
    }

    pub fn greeting(&self, out: &mut Vec<u8>) {
        let _ = write!(out, "220 {} ESMTP volley-sink\r\n", self.hostname);
    }

    /// Consumes client bytes, appending every reply they call for to `out`.
    pub fn input(&mut self, data: &[u8], out: &mut Vec<u8>) -> Action {
        self.buf.extend_from_slice(data);
        let mut start = 0;
        let mut action = Action::Continue;
        while action == Action::Continue {
            let rest = &self.buf[start..];
            if let State::Chunk { remaining, .. } = &mut self.state {
                let n = (*remaining).min(rest.len());
                *remaining -= n;
                let done = *remaining == 0;
                let chunk = rest[..n].to_vec();
                self.data_bytes(&chunk);
                start += n;
                if !done {
                    break;
                }
                self.chunk_read(out);
                continue;
            }
            let Some(nl) = rest.iter().position(|&b| b == b'\n') else {
                match self.state {
                    State::Command if rest.len() > MAX_COMMAND_BYTES => {
                        out.extend_from_slice(b"500 5.5.6 Error: command line too long\r\n");
                        action = Action::Close;
                    }
                    State::Data if rest.len() > MAX_DATA_LINE_BYTES => {
                        let chunk = rest.to_vec();
                        let unstuffed = if !self.mid_line && chunk[0] == b'.' {
                            &chunk[1..]
                        } else {
                            &chunk[..]
                        };
                        self.data_bytes(unstuffed);
                        self.mid_line = true;
                        start = self.buf.len();
                    }
                    _ => {}
                }
                break;
            };
            let line = rest[..=nl].to_vec();
            start += nl + 1;
            action = match self.state {
                State::Command => self.command(&line, out),
                State::Data => {
                    self.data_line(&line, out);
                    Action::Continue
                }
                State::Chunk { .. } => unreachable!("chunks are read above"),
            };
        }
        self.buf.drain(..start.min(self.buf.len()));
        action
    }

    fn data_bytes(&mut self, bytes: &[u8]) {
        self.body_bytes += bytes.len();
        self.saw_8bit |= !bytes.is_ascii();
        if self.keep_body && self.body.len() < MAX_MESSAGE_BYTES {
            self.body.extend_from_slice(bytes);
        }
    }

    /// The end of a message (final dot or last chunk): queue it, or refuse it if too large.
    fn message_end(&mut self, out: &mut Vec<u8>, chunked: bool) {
        self.state = State::Command;
        if self.body_bytes > MAX_MESSAGE_BYTES {
            out.extend_from_slice(b"552 5.3.4 Error: message too large\r\n");
        } else if self.saw_8bit && !self.eight_bit_mime {
            out.extend_from_slice(b"554 5.6.0 Message has 8-bit content, but 8BITMIME was not offered\r\n");
        } else {
            self.queued += 1;
            let _ = write!(
                out,
                "250 2.0.0 Ok: queued as {:08X}{:08X}\r\n",
                self.rng.u32(..),
                self.queued
            );
            self.received.push(Received {
                helo: self.helo.clone(),
                from: self.mail.take().unwrap_or_default(),
                rcpts: std::mem::take(&mut self.rcpts),
                body: std::mem::take(&mut self.body),
                bytes: self.body_bytes,
                chunked,
            });
        }
        self.reset();
    }

    /// A BDAT chunk has been read: answer it.
    fn chunk_read(&mut self, out: &mut Vec<u8>) {
        let State::Chunk { last, error, .. } = std::mem::replace(&mut self.state, State::Command) else {
            return;
        };
        match error {
            Some(e) => {
                // As Postfix does: a failed BDAT ends the transaction.
                out.extend_from_slice(e.as_bytes());
                out.extend_from_slice(b"\r\n");
                self.reset();
            }
            None if last => self.message_end(out, true),
            None => {
                let _ = write!(out, "250 2.0.0 Ok: {} bytes\r\n", self.body_bytes);
            }
        }
    }

    fn data_line(&mut self, line: &[u8], out: &mut Vec<u8>) {
        if !self.mid_line && (line == b".\r\n" || line == b".\n") {
            return self.message_end(out, false);
        }
        let unstuffed = if !self.mid_line && line.first() == Some(&b'.') {
            &line[1..]
        } else {
            line
        };
        self.data_bytes(unstuffed);
        self.mid_line = false;
    }

    fn reset(&mut self) {
        self.mail = None;
        self.utf8_txn = false;
        self.saw_8bit = false;
        self.rcpts.clear();
        self.body.clear();
        self.body_bytes = 0;
        self.mid_line = false;
    }

    fn command(&mut self, raw: &[u8], out: &mut Vec<u8>) -> Action {
        let line = String::from_utf8_lossy(raw);
        let line = line.trim_end_matches(['\r', '\n']);
        if self.sasl != Sasl::Idle {
            self.sasl_response(line, out);
            return Action::Continue;
        }
        let (verb, arg) = line.split_once(' ').unwrap_or((line, ""));
        let reply = |out: &mut Vec<u8>, s: &str| {
            out.extend_from_slice(s.as_bytes());
            out.extend_from_slice(b"\r\n");
        };
        match verb.to_ascii_uppercase().as_str() {
            "EHLO" if arg.trim().is_empty() => reply(out, "501 5.5.4 Syntax: EHLO hostname"),
            "EHLO" => {
                self.greeted = true;
                self.helo = arg.trim().to_string();
                self.reset();
                let mut s = String::new();
                let _ = write!(
                    s,
                    "250-{}\r\n250-PIPELINING\r\n250-SIZE {MAX_MESSAGE_BYTES}\r\n",
                    self.hostname
                );
                if self.eight_bit_mime {
                    s.push_str("250-8BITMIME\r\n");
                }
                if self.smtputf8 {
                    s.push_str("250-SMTPUTF8\r\n");
                }
                if self.tls_offered && !self.secure {
                    s.push_str("250-STARTTLS\r\n");
                }
                if self.auth.is_some() {
                    s.push_str("250-AUTH PLAIN LOGIN\r\n");
                }
                if self.chunking {
                    s.push_str("250-CHUNKING\r\n");
                }
                s.push_str("250 ENHANCEDSTATUSCODES");
                reply(out, &s);
            }
            "HELO" if arg.trim().is_empty() => reply(out, "501 5.5.4 Syntax: HELO hostname"),
            "HELO" => {
                self.greeted = true;
                self.helo = arg.trim().to_string();
                self.reset();
                reply(out, &format!("250 {}", self.hostname));
            }
            "MAIL" => {
                let Some(path) = strip_prefix_ci(arg, "FROM:").and_then(angle_path) else {
                    reply(out, "501 5.5.4 Syntax: MAIL FROM:<address>");
                    return Action::Continue;
                };
                let utf8 = has_param(arg, "SMTPUTF8");
                let body_8bit = arg
                    .split_ascii_whitespace()
                    .any(|p| p.eq_ignore_ascii_case("BODY=8BITMIME"));
                if utf8 && !self.smtputf8 {
                    reply(out, "555 5.5.4 Unsupported option: SMTPUTF8");
                } else if body_8bit && !self.eight_bit_mime {
                    reply(out, "555 5.5.4 Unsupported option: BODY=8BITMIME");
                } else if !path_ok(path.0) {
                    reply(out, "501 5.1.7 Bad sender address syntax");
                } else if !path.0.is_ascii() && !utf8 {
                    reply(out, "553 5.6.7 Non-ASCII sender address requires SMTPUTF8");
                } else if !self.greeted {
                    reply(out, "503 5.5.1 Error: send HELO/EHLO first");
                } else if self.auth.is_some() && !self.authed {
                    reply(out, "530 5.7.0 Authentication required");
                } else if self.mail.is_some() {
                    reply(out, "503 5.5.1 Error: nested MAIL command");
                } else if self.disconnect_rate > 0.0 && self.rng.f64() < self.disconnect_rate {
                    return Action::Drop;
                } else if size_param(arg).is_some_and(|n| n > MAX_MESSAGE_BYTES) {
                    reply(out, "552 5.3.4 Message size exceeds fixed limit");
                } else if self.max_messages.is_some_and(|max| self.mails >= max) {
                    reply(out, "421 4.7.0 Too many messages on this connection, try again later");
                    return Action::Close;
                } else if let Some((t, ip)) = &self.throttle
                    && !t.allow(*ip, Instant::now())
                {
                    self.throttled += 1;
                    reply(out, &self.throttle_reply);
                    if self.throttle_reply.starts_with("421") {
                        return Action::Close;
                    }
                } else {
                    self.mails += 1;
                    self.mail = Some(path.0.to_string());
                    self.utf8_txn = utf8;
                    reply(out, "250 2.1.0 Ok");
                }
            }
            "RCPT" => {
                let Some((path, _)) = strip_prefix_ci(arg, "TO:").and_then(angle_path) else {
                    reply(out, "501 5.5.4 Syntax: RCPT TO:<address>");
                    return Action::Continue;
                };
                if !path_ok(path) {
                    reply(out, "501 5.1.3 Bad recipient address syntax");
                } else if self.mail.is_some() && !path.is_ascii() && !self.utf8_txn {
                    reply(out, "553 5.6.7 Non-ASCII recipient address requires SMTPUTF8");
                } else if self.mail.is_none() {
                    reply(out, "503 5.5.1 Error: need MAIL command");
                } else if self.rcpts.len() >= MAX_RCPTS {
                    reply(out, "452 4.5.3 Error: too many recipients");
                } else if self.reject_rate > 0.0 && self.rng.f64() < self.reject_rate {
                    reply(
                        out,
                        &format!("550 5.1.1 <{path}>: Recipient address rejected: User unknown"),
                    );
                } else if self.defer_rate > 0.0 && self.rng.f64() < self.defer_rate {
                    reply(
                        out,
                        &format!("450 4.2.1 <{path}>: Recipient address rejected: try again later"),
                    );
                } else {
                    self.rcpts.push(path.to_string());
                    reply(out, "250 2.1.5 Ok");
                }
            }
            "DATA" if !arg.is_empty() => reply(out, "501 5.5.4 Syntax: DATA"),
            "DATA" if self.mail.is_none() => reply(out, "503 5.5.1 Error: need MAIL command"),
            "DATA" if self.rcpts.is_empty() => reply(out, "554 5.5.1 Error: no valid recipients"),
            "DATA" => {
                self.state = State::Data;
                reply(out, "354 End data with <CR><LF>.<CR><LF>");
            }
            "BDAT" if !self.chunking => reply(out, "502 5.5.1 Error: command not implemented"),
            "BDAT" => {
                let mut words = arg.split_ascii_whitespace();
                let size = words.next().and_then(|n| n.parse::<usize>().ok());
                let last = words.next().map(str::to_ascii_uppercase);
                let (Some(size), None | Some("LAST")) = (size, last.as_deref()) else {
                    // Without a size the chunk cannot be skipped: the session ends.
                    reply(out, "501 5.5.4 Syntax: BDAT size [LAST]");
                    return Action::Close;
                };
                let error = if self.mail.is_none() {
                    Some("503 5.5.1 Error: need MAIL command")
                } else if self.rcpts.is_empty() {
                    Some("554 5.5.1 Error: no valid recipients")
                } else {
                    None
                };
                self.state = State::Chunk {
                    remaining: size,
                    last: last.is_some(),
                    error,
                };
                if size == 0 {
                    self.chunk_read(out);
                }
            }
            "RSET" => {
                self.reset();
                reply(out, "250 2.0.0 Ok");
            }
            "STARTTLS" if !self.tls_offered => reply(out, "502 5.5.1 Error: command not implemented"),
            "STARTTLS" if self.secure => reply(out, "554 5.5.1 Error: TLS already active"),
            "STARTTLS" if !arg.is_empty() => reply(out, "501 5.5.4 Syntax: STARTTLS"),
            "STARTTLS" => {
                reply(out, "220 2.0.0 Ready to start TLS");
                return Action::StartTls;
            }
            "AUTH" if self.auth.is_none() => reply(out, "502 5.5.1 Error: authentication not enabled"),
            "AUTH" if self.authed => reply(out, "503 5.5.1 Error: already authenticated"),
            "AUTH" if self.mail.is_some() => reply(out, "503 5.5.1 Error: MAIL transaction in progress"),
            "AUTH" => {
                let mut words = arg.split_ascii_whitespace();
                match (words.next().map(str::to_ascii_uppercase).as_deref(), words.next()) {
                    (Some("PLAIN"), Some(initial)) => self.check_plain(initial, out),
                    (Some("PLAIN"), None) => {
                        self.sasl = Sasl::Plain;
                        reply(out, "334 ");
                    }
                    (Some("LOGIN"), None) => {
                        self.sasl = Sasl::LoginUser;
                        reply(out, "334 VXNlcm5hbWU6");
                    }
                    _ => reply(out, "504 5.5.4 Unrecognized authentication type"),
                }
            }
            "NOOP" => reply(out, "250 2.0.0 Ok"),
            "VRFY" => reply(out, "252 2.0.0 Cannot VRFY user, but will accept message"),
            "HELP" => reply(out, "214 2.0.0 volley-sink: see RFC 5321"),
            "QUIT" => {
                reply(out, "221 2.0.0 Bye");
                return Action::Close;
            }
            _ => reply(out, "500 5.5.2 Error: command not recognized"),
        }
        Action::Continue
    }
}

/// Where a SASL exchange (RFC 4954) stands.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Sasl {
    Idle,
    Plain,
    LoginUser,
    LoginPassword(String),
}

impl ServerSession {
    fn sasl_response(&mut self, line: &str, out: &mut Vec<u8>) {
        if line == "*" {
            self.sasl = Sasl::Idle;
            out.extend_from_slice(b"501 5.7.0 Authentication cancelled\r\n");
            return;
        }
        match std::mem::replace(&mut self.sasl, Sasl::Idle) {
            Sasl::Plain => self.check_plain(line, out),
            Sasl::LoginUser => match decode(line) {
                Some(user) => {
                    self.sasl = Sasl::LoginPassword(user);
                    out.extend_from_slice(b"334 UGFzc3dvcmQ6\r\n");
                }
                None => out.extend_from_slice(b"501 5.5.2 Error: bad base64\r\n"),
            },
            Sasl::LoginPassword(user) => match decode(line) {
                Some(password) => self.verdict(&user, &password, out),
                None => out.extend_from_slice(b"501 5.5.2 Error: bad base64\r\n"),
            },
            Sasl::Idle => {}
        }
    }

    fn check_plain(&mut self, token: &str, out: &mut Vec<u8>) {
        let parts: Option<Vec<String>> = decode(token).map(|t| t.split('\0').map(str::to_string).collect());
        match parts.as_deref() {
            Some([_authzid, user, password]) => {
                let (user, password) = (user.clone(), password.clone());
                self.verdict(&user, &password, out);
            }
            _ => out.extend_from_slice(b"501 5.5.2 Error: malformed AUTH PLAIN token\r\n"),
        }
    }

    fn verdict(&mut self, user: &str, password: &str, out: &mut Vec<u8>) {
        let ok = self.auth.as_ref().is_some_and(|(u, p)| u == user && p == password);
        self.authed = ok;
        out.extend_from_slice(if ok {
            b"235 2.7.0 Authentication successful\r\n"
        } else {
            b"535 5.7.8 Error: authentication failed\r\n"
        });
    }
}

fn decode(b64: &str) -> Option<String> {
    use base64::Engine as _;
    let bytes = base64::engine::general_purpose::STANDARD.decode(b64.trim()).ok()?;
    String::from_utf8(bytes).ok()
}

fn strip_prefix_ci<'a>(s: &'a str, prefix: &str) -> Option<&'a str> {
    let head = s.get(..prefix.len())?;
    head.eq_ignore_ascii_case(prefix).then(|| &s[prefix.len()..])
}

/// `<path> params` → (path, params).
fn angle_path(s: &str) -> Option<(&str, &str)> {
    let s = s.trim_start().strip_prefix('<')?;
    let end = s.find('>')?;
    Some((&s[..end], s[end + 1..].trim()))
}

/// A path the sink takes and may echo in a reply: printable ASCII, at most
/// 254 octets (RFC 5321 §4.5.3.1.3), so no reply line passes 512 octets.
/// An address as it may appear in `<…>` (UTF-8 is checked by the caller: only with SMTPUTF8).
fn path_ok(path: &str) -> bool {
    // U+FFFD: what bytes that are not UTF-8 were read as.
    path.len() <= 254
        && path
            .chars()
            .all(|c| c.is_ascii_graphic() || (!c.is_ascii() && c != char::REPLACEMENT_CHARACTER))
}

/// Whether a MAIL argument has the parameter `name` (no value).
fn has_param(arg: &str, name: &str) -> bool {
    arg.split_ascii_whitespace()
        .skip(1)
        .any(|p| p.eq_ignore_ascii_case(name))
}

fn size_param(arg: &str) -> Option<usize> {
    arg.split_ascii_whitespace()
        .find_map(|p| strip_prefix_ci(p, "SIZE="))
        .and_then(|n| n.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(s: &mut ServerSession, input: &str) -> String {
        let mut out = Vec::new();
        s.input(input.as_bytes(), &mut out);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn pipelined_group_answered_in_one_go() {
        let mut s = ServerSession::new(&SinkOptions::default(), 1, true);
        assert!(run(&mut s, "EHLO c.test\r\n").contains("250-PIPELINING\r\n"));
        let got = run(
            &mut s,
            "MAIL FROM:<a@b.test> SIZE=10\r\nRCPT TO:<x@y.test>\r\nRCPT TO:<z@y.test>\r\nDATA\r\n",
        );
        assert_eq!(
            got,
            "250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n250 2.1.5 Ok\r\n354 End data with <CR><LF>.<CR><LF>\r\n"
        );
        let got = run(&mut s, "Subject: x\r\n\r\n..dot\r\n.\r\nMAIL FROM:<> \r\n");
        assert!(got.starts_with("250 2.0.0 Ok: queued as "), "{got}");
        assert!(got.ends_with("250 2.1.0 Ok\r\n"), "{got}");
        assert_eq!(s.received.len(), 1);
        assert_eq!(s.received[0].rcpts, vec!["x@y.test", "z@y.test"]);
        assert_eq!(s.received[0].body, b"Subject: x\r\n\r\n.dot\r\n");
    }

    /// Found by fuzzing: a refused recipient is echoed in the reply, so an
    /// address of 8-bit bytes (each shown as three) made a reply line of 684
    /// octets; RFC 5321 §4.5.3.1.5 allows 512.
    #[test]
    fn an_address_that_cannot_be_echoed_is_refused_as_bad_syntax() {
        let opts = SinkOptions {
            reject_rate: 1.0,
            ..SinkOptions::default()
        };
        let mut s = ServerSession::new(&opts, 1, false);
        run(&mut s, "EHLO c.test\r\nMAIL FROM:<a@b.test>\r\n");
        let mut out = Vec::new();
        let mut line = b"RCPT TO:<".to_vec();
        line.extend_from_slice(&[0xff; 200]);
        line.extend_from_slice(b"@d.test>\r\n");
        s.input(&line, &mut out);
        assert_eq!(out, b"501 5.1.3 Bad recipient address syntax\r\n");
        let long = format!("RCPT TO:<{}@d.test>\r\n", "a".repeat(250));
        assert_eq!(run(&mut s, &long), "501 5.1.3 Bad recipient address syntax\r\n");
        let got = run(&mut s, "RCPT TO:<x@d.test>\r\n");
        assert_eq!(
            got,
            "550 5.1.1 <x@d.test>: Recipient address rejected: User unknown\r\n"
        );
        let got = run(&mut s, &format!("RSET\r\nMAIL FROM:<{}@b.test>\r\n", "é".repeat(10)));
        assert_eq!(
            got,
            "250 2.0.0 Ok\r\n553 5.6.7 Non-ASCII sender address requires SMTPUTF8\r\n"
        );
    }

    #[test]
    fn smtputf8_and_8bitmime_are_offered_and_held_to() {
        // Offered: a UTF-8 transaction goes through; UTF-8 without the parameter does not.
        let opts = SinkOptions {
            smtputf8: true,
            ..SinkOptions::default()
        };
        let mut s = ServerSession::new(&opts, 1, true);
        let ehlo = run(&mut s, "EHLO c.test\r\n");
        assert!(
            ehlo.contains("250-SMTPUTF8\r\n") && ehlo.contains("250-8BITMIME\r\n"),
            "{ehlo}"
        );
        assert_eq!(
            run(&mut s, "MAIL FROM:<a@b.test>\r\nRCPT TO:<jörg@bücher.test>\r\nRSET\r\n"),
            "250 2.1.0 Ok\r\n553 5.6.7 Non-ASCII recipient address requires SMTPUTF8\r\n250 2.0.0 Ok\r\n"
        );
        let got = run(
            &mut s,
            "MAIL FROM:<nöws@b.test> SMTPUTF8 BODY=8BITMIME\r\nRCPT TO:<jörg@bücher.test>\r\nDATA\r\ncafé\r\n.\r\n",
        );
        assert!(
            got.ends_with("354 End data with <CR><LF>.<CR><LF>\r\n250 2.0.0 Ok: queued as ")
                || got.contains("queued as"),
            "{got}"
        );
        assert_eq!(s.received[0].rcpts, ["jörg@bücher.test"]);
        assert_eq!(s.received[0].from, "nöws@b.test");
        // Not offered: the parameters are refused, and 8-bit content too.
        let opts = SinkOptions {
            no_8bitmime: true,
            ..SinkOptions::default()
        };
        let mut s = ServerSession::new(&opts, 1, true);
        let ehlo = run(&mut s, "EHLO c.test\r\n");
        assert!(!ehlo.contains("SMTPUTF8") && !ehlo.contains("8BITMIME"), "{ehlo}");
        assert_eq!(
            run(
                &mut s,
                "MAIL FROM:<a@b.test> SMTPUTF8\r\nMAIL FROM:<a@b.test> BODY=8BITMIME\r\n"
            ),
            "555 5.5.4 Unsupported option: SMTPUTF8\r\n555 5.5.4 Unsupported option: BODY=8BITMIME\r\n"
        );
        let got = run(
            &mut s,
            "MAIL FROM:<a@b.test>\r\nRCPT TO:<x@y.test>\r\nDATA\r\ncafé\r\n.\r\n",
        );
        assert!(
            got.ends_with("554 5.6.0 Message has 8-bit content, but 8BITMIME was not offered\r\n"),
            "{got}"
        );
        assert!(s.received.is_empty());
    }

    #[test]
    fn bdat_chunks_split_anywhere_and_failed_ones_are_read_then_refused() {
        let opts = SinkOptions {
            chunking: true,
            ..SinkOptions::default()
        };
        let mut s = ServerSession::new(&opts, 1, true);
        assert!(run(&mut s, "EHLO c.test\r\n").contains("250-CHUNKING\r\n"));
        // Two chunks, the second split across reads, binary-looking content kept as is.
        let got = run(&mut s, "MAIL FROM:<a@b.test>\r\nRCPT TO:<x@y.test>\r\nBDAT 5\r\n.dot\n");
        assert_eq!(got, "250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n250 2.0.0 Ok: 5 bytes\r\n");
        assert_eq!(run(&mut s, "BDAT 7 LAST\r\nab"), "");
        let got = run(&mut s, "c\r\n.\nMAIL FROM:<a@b.test>\r\n");
        assert!(got.starts_with("250 2.0.0 Ok: queued as "), "{got}");
        assert!(got.ends_with("250 2.1.0 Ok\r\n"), "{got}");
        assert_eq!(s.received.len(), 1);
        assert_eq!(s.received[0].body, b".dot\nabc\r\n.\n");
        // No valid recipient: the chunk is still read, then refused, and the transaction is over.
        let got = run(&mut s, "BDAT 4 LAST\r\nMAIL");
        assert_eq!(got, "554 5.5.1 Error: no valid recipients\r\n");
        let got = run(&mut s, "MAIL FROM:<a@b.test>\r\n");
        assert_eq!(got, "250 2.1.0 Ok\r\n");
        assert_eq!(s.received.len(), 1);
        // Without CHUNKING offered, BDAT is unknown.
        let mut plain = ServerSession::new(&SinkOptions::default(), 1, false);
        assert!(!run(&mut plain, "EHLO c.test\r\n").contains("CHUNKING"));
        assert!(run(&mut plain, "BDAT 1 LAST\r\n").starts_with("502"));
    }

    #[test]
    fn a_client_over_the_rate_gets_the_throttle_reply_and_a_421_ends_the_session() {
        let t0 = Instant::now();
        let ip: IpAddr = "127.0.0.7".parse().unwrap();
        let t = Throttle::new("100/s".parse().unwrap());
        // A burst of a tenth of a second's worth, then one every 10 ms.
        let burst = (0..20).filter(|_| t.allow(ip, t0)).count();
        assert_eq!(burst, 10);
        assert!(!t.allow(ip, t0 + Duration::from_millis(5)));
        assert!(t.allow(ip, t0 + Duration::from_millis(10)));
        assert!(t.allow("127.0.0.8".parse().unwrap(), t0), "per client address");
        let throttle = Arc::new(Throttle::new("1/h".parse().unwrap()));
        let mut s = ServerSession::new(&SinkOptions::default(), 1, false).throttled_by(throttle, ip);
        run(&mut s, "EHLO c\r\n");
        assert!(run(&mut s, "MAIL FROM:<a@b>\r\n").starts_with("250"));
        run(&mut s, "RSET\r\n");
        let mut out = Vec::new();
        assert_eq!(s.input(b"MAIL FROM:<a@b>\r\n", &mut out), Action::Close);
        assert_eq!(String::from_utf8(out).unwrap(), format!("{THROTTLE_REPLY}\r\n"));
        assert_eq!(s.throttled, 1);
        let opts = SinkOptions {
            throttle_reply: "451 4.7.500 Server busy. Please try again later".into(),
            ..SinkOptions::default()
        };
        let throttle = Arc::new(Throttle::new("1/h".parse().unwrap()));
        let mut s = ServerSession::new(&opts, 1, false).throttled_by(throttle, ip);
        run(&mut s, "EHLO c\r\nMAIL FROM:<a@b>\r\nRSET\r\n");
        assert!(
            run(&mut s, "MAIL FROM:<a@b>\r\n").starts_with("451 4.7.500"),
            "not a 421: the session goes on"
        );
    }

    #[test]
    fn the_message_after_the_last_a_connection_may_carry_gets_421() {
        let opts = SinkOptions {
            max_messages_per_connection: Some(1),
            ..SinkOptions::default()
        };
        let mut s = ServerSession::new(&opts, 1, false);
        run(
            &mut s,
            "EHLO c\r\nMAIL FROM:<a@b>\r\nRCPT TO:<x@y>\r\nDATA\r\nhi\r\n.\r\n",
        );
        let mut out = Vec::new();
        assert_eq!(s.input(b"MAIL FROM:<a@b>\r\n", &mut out), Action::Close);
        assert!(
            String::from_utf8(out)
                .unwrap()
                .starts_with("421 4.7.0 Too many messages")
        );
    }

    #[test]
    fn sequence_errors() {
        let mut s = ServerSession::new(&SinkOptions::default(), 1, false);
        assert!(run(&mut s, "MAIL FROM:<a@b>\r\n").starts_with("503"));
        run(&mut s, "HELO c\r\n");
        assert!(run(&mut s, "RCPT TO:<a@b>\r\n").starts_with("503"));
        assert!(run(&mut s, "DATA\r\n").starts_with("503"));
        run(&mut s, "MAIL FROM:<a@b>\r\n");
        assert!(run(&mut s, "MAIL FROM:<a@b>\r\n").starts_with("503 5.5.1 Error: nested"));
        assert!(run(&mut s, "DATA\r\n").starts_with("554"));
        assert!(run(&mut s, "RCPT TO:a@b\r\n").starts_with("501"));
        assert!(run(&mut s, "BOGUS\r\n").starts_with("500"));
        assert!(run(&mut s, "VRFY x\r\n").starts_with("252"));
        assert!(run(&mut s, "NOOP\r\n").starts_with("250"));
        let mut out = Vec::new();
        assert_eq!(s.input(b"QUIT\r\n", &mut out), Action::Close);
        assert_eq!(out, b"221 2.0.0 Bye\r\n");
    }

    #[test]
    fn faults() {
        let opts = SinkOptions {
            reject_rate: 1.0,
            ..Default::default()
        };
        let mut s = ServerSession::new(&opts, 1, false);
        run(&mut s, "EHLO c\r\nMAIL FROM:<a@b>\r\n");
        assert!(run(&mut s, "RCPT TO:<x@y>\r\n").starts_with("550 5.1.1"));
        let opts = SinkOptions {
            defer_rate: 1.0,
            ..Default::default()
        };
        let mut s = ServerSession::new(&opts, 1, false);
        run(&mut s, "EHLO c\r\nMAIL FROM:<a@b>\r\n");
        assert!(run(&mut s, "RCPT TO:<x@y>\r\n").starts_with("450 4.2.1"));
        let opts = SinkOptions {
            disconnect_rate: 1.0,
            ..Default::default()
        };
        let mut s = ServerSession::new(&opts, 1, false);
        let mut out = Vec::new();
        assert_eq!(s.input(b"EHLO c\r\nMAIL FROM:<a@b>\r\n", &mut out), Action::Drop);
    }

    #[test]
    fn auth_plain_and_login() {
        let opts = SinkOptions {
            auth: Some(("u".into(), "p".into())),
            ..Default::default()
        };
        let mut s = ServerSession::new(&opts, 1, false);
        assert!(run(&mut s, "EHLO c\r\n").contains("250-AUTH PLAIN LOGIN\r\n"));
        assert!(run(&mut s, "MAIL FROM:<a@b>\r\n").starts_with("530 5.7.0"));
        // "\0u\0wrong" then "\0u\0p"
        assert!(run(&mut s, "AUTH PLAIN AHUAd3Jvbmc=\r\n").starts_with("535 5.7.8"));
        assert!(run(&mut s, "AUTH PLAIN AHUAcA==\r\n").starts_with("235 2.7.0"));
        assert!(run(&mut s, "MAIL FROM:<a@b>\r\n").starts_with("250"));
        let mut s = ServerSession::new(&opts, 1, false);
        run(&mut s, "EHLO c\r\n");
        assert_eq!(run(&mut s, "AUTH LOGIN\r\n"), "334 VXNlcm5hbWU6\r\n");
        assert_eq!(run(&mut s, "dQ==\r\n"), "334 UGFzc3dvcmQ6\r\n");
        assert!(run(&mut s, "cA==\r\n").starts_with("235"));
    }

    #[test]
    fn long_data_lines_pass_through() {
        let mut s = ServerSession::new(&SinkOptions::default(), 1, true);
        run(&mut s, "EHLO c\r\nMAIL FROM:<a@b>\r\nRCPT TO:<x@y>\r\nDATA\r\n");
        let long = format!(".{}", "x".repeat(MAX_DATA_LINE_BYTES + 10));
        let mut out = Vec::new();
        s.input(long.as_bytes(), &mut out);
        s.input(b"\r\n.\r\n", &mut out);
        assert_eq!(s.received.len(), 1);
        // The leading dot of the long line is unstuffed even though the line arrives in pieces.
        assert_eq!(s.received[0].bytes, long.len() - 1 + 2);
    }
}
