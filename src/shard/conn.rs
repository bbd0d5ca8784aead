//! The I/O driver of one SMTP connection: moves bytes between a glommio
//! socket and the session engine, runs the TLS handshake when the engine
//! asks for it (STARTTLS), applies the RFC 5321 timeouts, feeds the engine
//! transactions from its destination's queue, and parks the connection while
//! the queue is empty (QUIT after `idle_timeout`).

use std::io;
use std::rc::Rc;
use std::time::Instant;

use futures_lite::{AsyncReadExt, AsyncWriteExt};
use futures_rustls::client::TlsStream;
use glommio::net::TcpStream;

use super::core::{Candidate, SetupFailure};
use super::{Dest, Shard, Txn};
use crate::config::SourceAddress;
use crate::local::Local;
use crate::metrics::{ConnResult, DomainStats, Phase};
use crate::smtp::{Command, Event, Extensions, Session, TlsMode};
use crate::tls::{Connector, MaybeTls, TlsLayer, TlsPolicy, server_name};

/// Bytes read from the socket at a time.
const READ_BUF_BYTES: usize = 16 * 1024;
/// How often a handshake that waits for the trust roots (read once, on a
/// side thread) looks for them.
const ROOTS_POLL: std::time::Duration = std::time::Duration::from_millis(1);

type Stream = MaybeTls<TlsStream<TcpStream>>;

/// Why a connection never got ready to send.
struct SetupError {
    reason: String,
    /// The TLS handshake failed (opportunistic TLS then retries in plaintext).
    tls: bool,
    /// The relay refused our credentials: pause the destination.
    auth: bool,
    /// The server's reply that refused us, if one did (for the automation rules).
    reply: Option<String>,
    /// What went wrong, when no reply says it.
    kind: Local,
}

pub(super) async fn run(shard: Rc<Shard>, dest: Rc<Dest>) {
    // Try the hosts in order (MX preference, then each address) until one
    // gets as far as EHLO; only when none does is the destination at fault.
    let hosts = dest.hosts.borrow().clone();
    let mut failure = Some(SetupError {
        reason: format!("{}: no host to connect to", dest.label),
        tls: false,
        auth: false,
        reply: None,
        kind: Local::Connect,
    });
    for host in hosts.iter() {
        let implicit = dest.relay.as_ref().is_some_and(|r| r.implicit_tls);
        let broken = || shard.with(|c| c.tls_broken(host.addr, Instant::now()));
        let mode = match dest.tls {
            _ if implicit => TlsMode::Off,
            TlsPolicy::Disabled => TlsMode::Off,
            TlsPolicy::Opportunistic if broken() => TlsMode::Off,
            TlsPolicy::Opportunistic => TlsMode::Offer,
            TlsPolicy::Required | TlsPolicy::Verify => TlsMode::Require,
        };
        let mut result = drive(&shard, &dest, host, mode).await;
        if let Err(e) = &result
            && e.tls
            && dest.tls == TlsPolicy::Opportunistic
        {
            tracing::debug!("{}; retrying in plaintext", e.reason);
            shard.with(|c| c.remember_tls_broken(host.addr, Instant::now()));
            result = drive(&shard, &dest, host, TlsMode::Off).await;
        }
        match result {
            Ok(()) => {
                failure = None;
                break;
            }
            Err(e) => {
                tracing::debug!("{}", e.reason);
                failure = Some(e);
            }
        }
    }
    let failed = failure.as_ref().map(|e| SetupFailure {
        reason: &e.reason,
        auth: e.auth,
        reply: e.reply.as_deref(),
        kind: e.kind,
    });
    shard.with(|c| c.connection_closed(&dest, failed, Instant::now()));
}

/// Runs one connection to `host` to its end. `Err` means it never got ready
/// (connect, greeting, EHLO or TLS failed): the host's problem, not a transaction's.
async fn drive(shard: &Rc<Shard>, dest: &Rc<Dest>, host: &Candidate, mode: TlsMode) -> Result<(), SetupError> {
    let peer = format!("{} [{}]", host.name, host.addr);
    let setup = |reason: String| SetupError {
        reason,
        tls: false,
        auth: false,
        reply: None,
        kind: Local::Connect,
    };
    let source = dest.pick_source();
    let connecting = Instant::now();
    let tcp = match connect(shard, host, source.as_ref().map(|s| s.address)).await {
        Ok(tcp) => tcp,
        Err(e) => {
            count(shard, dest, |m| m.connections[ConnResult::ConnectError as usize] += 1);
            return Err(setup(format!("connect to {peer} failed: {e}")));
        }
    };
    // The session's clock starts now: the greeting is timed from here.
    let origin = Instant::now();
    count(shard, dest, |m| m.phase(Phase::Connect, micros(origin - connecting)));
    let result = converse(shard, dest, host, mode, tcp, source, origin, &peer).await;
    if let Err(e) = &result {
        let r = if e.tls {
            ConnResult::TlsError
        } else if e.auth {
            ConnResult::AuthError
        } else {
            ConnResult::SetupError
        };
        count(shard, dest, |m| m.connections[r as usize] += 1);
    }
    result
}

fn micros(d: std::time::Duration) -> u64 {
    d.as_micros().try_into().unwrap_or(u64::MAX)
}

/// Counts a connection event under the destination's domain.
fn count(shard: &Shard, dest: &Dest, f: impl FnOnce(&mut DomainStats)) {
    shard.core.borrow_mut().metrics.with_name(&dest.owner, f);
}

/// The session on a connected socket, to its end.
#[allow(clippy::too_many_arguments)]
async fn converse(
    shard: &Rc<Shard>,
    dest: &Rc<Dest>,
    host: &Candidate,
    mode: TlsMode,
    tcp: TcpStream,
    source: Option<SourceAddress>,
    origin: Instant,
    peer: &str,
) -> Result<(), SetupError> {
    let cfg = &shard.cfg;
    let ehlo_name = source
        .and_then(|s| s.ehlo_name)
        .unwrap_or_else(|| shard.ehlo_name.clone());
    let _ = tcp.set_nodelay(true);
    let _ = tcp.set_write_timeout(Some(cfg.timeouts.data_block));
    let mut stream: Option<Stream> = Some(MaybeTls::Plain(tcp));
    let mut tls: Option<String> = None;
    let mut session: Session<Txn> = Session::new(&ehlo_name, mode).with_extensions(Extensions {
        pipelining: cfg.pipelining,
        chunking: cfg.chunking,
        window: dest.pipeline_window(),
        window_max: dest.pipeline_window_max(),
        window_bytes: cfg.pipeline_window_bytes,
    });
    let relay = dest.relay.as_deref();
    if relay.is_some_and(|r| r.implicit_tls) {
        // Port 465: TLS before the greeting (RFC 8314).
        let started = Instant::now();
        let upgraded = handshake(shard, dest, host, stream.take()).await;
        count(shard, dest, |m| match &upgraded {
            Ok(_) => {
                m.tls[0] += 1;
                m.phase(Phase::StartTls, micros(started.elapsed()));
            }
            Err(_) => m.tls[1] += 1,
        });
        let upgraded = upgraded.map_err(|reason| SetupError {
            reason: format!("{peer}: TLS handshake failed: {reason}"),
            tls: true,
            auth: false,
            reply: None,
            kind: Local::Tls,
        })?;
        tls = Some(upgraded.describe());
        stream = Some(MaybeTls::Tls(Box::new(upgraded)));
        session = session.implicit_tls();
    }
    let credentials = relay.and_then(|r| r.credentials.clone());
    if let Some(c) = credentials.clone() {
        session = session.with_auth(c);
    }
    let mut auth_refused = false;
    let mut buf = vec![0u8; READ_BUF_BYTES];
    let mut submitted = 0usize;
    let mut setup_error = None;
    let mut setup_reply = None;
    let mut setup_kind = Local::Closed;
    let mut was_ready = false;
    // Leaving to give the slot to another shard (counted in `dest.leaving` until the end).
    let mut leaving = false;
    // The STARTTLS reply's time, added to the handshake's for the starttls phase.
    let mut starttls_micros = 0;
    // The clock when the last reply was read; read only when metrics are on.
    let mut session_clock = 0;
    let timed = shard.core.borrow().metrics.enabled();
    loop {
        // One clock reading a turn: what a turn settles and takes happens
        // within microseconds of it (after a read, or a wait for work).
        let now = Instant::now();
        // Drained every turn, counted only with metrics on and only when there is something.
        if timed && session.has_seen() {
            let seen = session.take_seen();
            count(shard, dest, |m| {
                for seen in seen {
                    // Enhanced codes are counted for transactions only: a session's replies
                    // (RSET after any domain's failure, QUIT) would blur the owner domain's.
                    m.reply(seen.command, seen.code, None);
                    match seen.command {
                        Command::Greeting => m.phase(Phase::Banner, seen.micros),
                        Command::Ehlo | Command::Helo => m.phase(Phase::Ehlo, seen.micros),
                        Command::StartTls => starttls_micros = seen.micros,
                        _ => {}
                    }
                }
            });
        } else {
            session.take_seen();
        }
        while let Some(event) = session.poll_event() {
            match event {
                Event::Ready => {
                    was_ready = true;
                    count(shard, dest, |m| m.connections[ConnResult::Ok as usize] += 1);
                    shard.with(|c| c.connection_ready(dest, Instant::now()));
                }
                Event::StartTls => match handshake(shard, dest, host, stream.take()).await {
                    Ok(upgraded) => {
                        // From the STARTTLS write: its reply's time, then the handshake's.
                        let handshake_micros = micros(origin.elapsed()).saturating_sub(session_clock);
                        count(shard, dest, |m| {
                            m.tls[0] += 1;
                            m.phase(Phase::StartTls, starttls_micros + handshake_micros);
                        });
                        tls = Some(upgraded.describe());
                        stream = Some(MaybeTls::Tls(Box::new(upgraded)));
                        session.tls_established();
                    }
                    Err(reason) => {
                        count(shard, dest, |m| m.tls[1] += 1);
                        let reason = format!("{peer}: TLS handshake failed: {reason}");
                        return Err(SetupError {
                            reason,
                            tls: true,
                            auth: false,
                            reply: None,
                            kind: Local::Tls,
                        });
                    }
                },
                Event::Done(report) => shard.with(|c| c.complete(report, dest, host, tls.as_deref(), now)),
                Event::Unsent(txn) => shard.with(|c| c.unsent(dest, txn)),
                Event::Failed { reason, reply, kind } => {
                    setup_reply = reply.as_ref().map(|r| r.to_string());
                    setup_kind = kind;
                    // 530-539 to AUTH: the credentials (or their use) were refused.
                    auth_refused = credentials.is_some() && reply.is_some_and(|r| (530..540).contains(&r.code));
                    setup_error = Some(format!("{peer}: {reason}"));
                }
            }
        }
        if session.is_closed() {
            break;
        }
        let io = stream.as_mut().expect("the stream is back after STARTTLS");
        // Over plaintext, BDAT chunks go from their messages in one vectored
        // write; over TLS everything passes through rustls's buffer anyway.
        session.write_by_reference(matches!(io, MaybeTls::Plain(_)));
        if session.is_ready() {
            let most = dest.deliveries_per_connection();
            while session.wants_txn() && submitted < most {
                let Some(mut txn) = shard.with(|c| c.next_txn(dest, now)) else {
                    break;
                };
                if let Err(reason) = shard.render(&mut txn, !session.capabilities().eight_bit_mime) {
                    shard.with(|c| c.unsendable(txn, &reason, Instant::now()));
                    continue;
                }
                session.submit(txn);
                submitted += 1;
            }
            if !leaving && shard.with(|c| c.should_leave(dest)) {
                leaving = true;
            }
            if submitted >= most || shard.core.borrow().stopping() || leaving {
                session.quit();
            }
        }
        if session.has_output() {
            if timed {
                session.set_clock(micros(origin.elapsed()));
            }
            // Chunks left in their messages: one vectored write that does not
            // wait; what the socket does not take now (and everything else)
            // goes by write_all, copied together.
            if let MaybeTls::Plain(tcp) = &*io
                && session.has_chunks_by_reference()
            {
                let sent = {
                    let parts = session.output_slices();
                    socket2::SockRef::from(tcp)
                        .send_vectored_with_flags(&parts, libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL)
                };
                // Nothing taken (the socket is full, or the write failed):
                // write_all says which.
                if let Ok(n) = sent {
                    session.consume_output(n);
                }
            }
            if session.has_output() {
                if let Err(e) = io.write_all(session.contiguous_output()).await {
                    let kind = if e.kind() == io::ErrorKind::TimedOut {
                        Local::Timeout
                    } else {
                        Local::Closed
                    };
                    session.connection_lost(kind, &format!("write to {peer} failed: {e}"));
                    continue;
                }
                let n = session.output().len();
                session.consume_output(n);
            }
        }
        if session.is_ready() && session.is_idle() {
            if !wait_for_work(shard, dest).await {
                session.quit();
            }
            continue;
        }
        let Some(wait) = session.waiting_for() else {
            // Not ready, not waiting: the session is over.
            break;
        };
        let limit = cfg.timeouts.for_wait(wait);
        let _ = io.tcp().set_read_timeout(Some(limit));
        match io.read(&mut buf).await {
            Ok(0) => session.connection_lost(Local::Closed, &format!("{peer} closed the connection")),
            Ok(n) => {
                if timed {
                    session_clock = micros(origin.elapsed());
                    session.set_clock(session_clock);
                }
                session.feed(&buf[..n]);
            }
            Err(e) if e.kind() == io::ErrorKind::TimedOut => session.connection_lost(
                Local::Timeout,
                &format!(
                    "timed out after {}s waiting for {peer} to answer {wait:?}",
                    limit.as_secs()
                ),
            ),
            Err(e) => session.connection_lost(Local::Closed, &format!("read from {peer} failed: {e}")),
        }
    }
    shard.with(|c| c.session_ended(dest, was_ready, leaving));
    if let Some(s) = stream {
        let _ = s.tcp().shutdown(std::net::Shutdown::Both).await;
    }
    match setup_error {
        Some(reason) if !was_ready => Err(SetupError {
            reason: if auth_refused {
                format!("{reason} (authentication failed)")
            } else {
                reason
            },
            tls: false,
            auth: auth_refused,
            reply: setup_reply,
            kind: setup_kind,
        }),
        _ => Ok(()),
    }
}

/// Connects to `host`, from `source` when given. glommio cannot bind before
/// connecting, so a bound socket is connected on the side thread and handed over.
async fn connect(shard: &Shard, host: &Candidate, source: Option<std::net::IpAddr>) -> io::Result<TcpStream> {
    let timeout = shard.cfg.timeouts.connect;
    match (source, &shard.net) {
        (None, _) => Ok(TcpStream::connect_timeout(host.addr, timeout).await?),
        (Some(ip), Some(net)) => {
            let std = net.connect_from(ip, host.addr, timeout).await?;
            Ok(TcpStream::from(socket2::Socket::from(std)))
        }
        (Some(_), None) => Err(io::Error::other("source addresses need the side thread")),
    }
}

/// The TLS handshake: after the server's 220 to STARTTLS, or at once for implicit TLS.
async fn handshake(
    shard: &Shard,
    dest: &Dest,
    host: &Candidate,
    stream: Option<Stream>,
) -> Result<TlsStream<TcpStream>, String> {
    let Some(MaybeTls::Plain(tcp)) = stream else {
        return Err("TLS on a connection that is already TLS".into());
    };
    let name = server_name(&host.name).map_err(|e| e.to_string())?;
    let limit = shard.cfg.timeouts.starttls;
    let handshake = async {
        // The trust roots are read on a side thread the first time a
        // connection verifies: wait for them here, without blocking the shard.
        let connector = loop {
            match shard.tls.connector(dest.tls) {
                Connector::Ready(c) => break c,
                Connector::Loading => glommio::timer::sleep(ROOTS_POLL).await,
                Connector::Failed(e) => return Err(glommio::GlommioError::from(io::Error::other(e))),
            }
        };
        connector.connect(name, tcp).await.map_err(glommio::GlommioError::from)
    };
    match glommio::timer::timeout(limit, handshake).await {
        Ok(s) => Ok(s),
        Err(glommio::GlommioError::TimedOut(_)) => Err(format!("no handshake within {}s", limit.as_secs())),
        Err(e) => Err(e.to_string()),
    }
}

/// Parks until the destination has work (true) or the idle timeout passes or
/// the shard stops (false). Waiting for a pacing slot is not being idle.
async fn wait_for_work(shard: &Rc<Shard>, dest: &Rc<Dest>) -> bool {
    let idle = dest.policy.idle_timeout;
    let mut deadline = Instant::now() + idle;
    loop {
        if shard.core.borrow().stopping() {
            return false;
        }
        if shard.held_back() {
            // Waiting for the collector is not being idle: the shard wakes
            // these waiters once it has caught up.
            let listener = shard.caught_up.listen();
            shard.held_waiters.set(shard.held_waiters.get() + 1);
            let _ = glommio::timer::timeout(idle, async {
                listener.await;
                Ok(())
            })
            .await;
            shard.held_waiters.set(shard.held_waiters.get() - 1);
            deadline = Instant::now() + idle;
            continue;
        }
        let now = Instant::now();
        if shard.with(|c| c.work_now(dest, now)) {
            return true;
        }
        if dest.suspended(now) {
            // Nothing goes out until the suspension ends: say QUIT, reconnect then.
            return false;
        }
        if dest.has_work() {
            deadline = now + idle;
        }
        if now >= deadline {
            return false;
        }
        let listener = dest.wake.listen();
        dest.parked.set(dest.parked.get() + 1);
        let _ = glommio::timer::timeout(deadline - now, async {
            listener.await;
            Ok(())
        })
        .await;
        dest.parked.set(dest.parked.get() - 1);
    }
}
