//! The I/O driver of one SMTP connection: moves bytes between a glommio
//! socket and the session engine, applies the RFC 5321 timeouts, feeds the
//! engine transactions from its destination's queue, and parks the
//! connection while the queue is empty (QUIT after `idle_timeout`).

use std::io;
use std::rc::Rc;
use std::time::Instant;

use futures_lite::{AsyncReadExt, AsyncWriteExt};
use glommio::net::TcpStream;

use super::{Candidate, Dest, Shard, Txn};
use crate::smtp::{Event, Session};

/// Bytes read from the socket at a time.
const READ_BUF_BYTES: usize = 16 * 1024;

pub(super) async fn run(shard: Rc<Shard>, dest: Rc<Dest>) {
    // Try the hosts in order (MX preference, then each address) until one
    // gets as far as EHLO; only when none does is the destination at fault.
    let hosts = dest.hosts.borrow().clone();
    let mut failure = Some(format!("{}: no host to connect to", dest.label));
    for host in hosts.iter() {
        match drive(&shard, &dest, host).await {
            Ok(()) => {
                failure = None;
                break;
            }
            Err(reason) => {
                tracing::debug!("{reason}");
                failure = Some(reason);
            }
        }
    }
    dest.open.set(dest.open.get() - 1);
    if let Some(reason) = failure {
        shard.destination_failed(&dest, &reason);
    }
    if !dest.queue.borrow().is_empty() {
        shard.kick(&dest);
    }
}

/// Runs the connection to its end. `Err` means it never got ready (connect,
/// greeting or EHLO failed): the destination's problem, not a transaction's.
async fn drive(shard: &Rc<Shard>, dest: &Rc<Dest>, host: &Candidate) -> Result<(), String> {
    let cfg = &shard.cfg;
    let peer = format!("{} [{}]", host.name, host.addr);
    let mut stream = TcpStream::connect_timeout(host.addr, cfg.timeouts.connect)
        .await
        .map_err(|e| format!("connect to {peer} failed: {e}"))?;
    let _ = stream.set_nodelay(true);
    let _ = stream.set_write_timeout(Some(cfg.timeouts.data_block));
    let mut session: Session<Txn> = Session::new(&shard.ehlo_name);
    let mut buf = vec![0u8; READ_BUF_BYTES];
    let mut submitted = 0usize;
    let mut setup_error = None;
    let mut was_ready = false;
    loop {
        while let Some(event) = session.poll_event() {
            match event {
                Event::Ready => {
                    was_ready = true;
                    dest.ready.set(dest.ready.get() + 1);
                    shard.destination_up(dest);
                }
                Event::Done(report) => shard.complete(report, host),
                Event::Unsent(txn) => dest.queue.borrow_mut().push_front(txn),
                Event::Failed { reason, .. } => setup_error = Some(format!("{peer}: {reason}")),
            }
        }
        if session.is_closed() {
            break;
        }
        if session.is_ready() {
            while session.wants_txn() && submitted < cfg.max_messages_per_connection {
                let Some(mut txn) = dest.queue.borrow_mut().pop_front() else {
                    break;
                };
                txn.started = Instant::now();
                session.submit(txn);
                submitted += 1;
            }
            if submitted >= cfg.max_messages_per_connection || shard.stopping.get() {
                session.quit();
            }
        }
        if !session.output().is_empty() {
            if let Err(e) = stream.write_all(session.output()).await {
                session.connection_lost(&format!("write to {} failed: {e}", peer));
                continue;
            }
            let n = session.output().len();
            session.consume_output(n);
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
        let _ = stream.set_read_timeout(Some(cfg.timeouts.for_wait(wait)));
        match stream.read(&mut buf).await {
            Ok(0) => session.connection_lost(&format!("{} closed the connection", peer)),
            Ok(n) => session.feed(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::TimedOut => session.connection_lost(&format!(
                "timed out after {}s waiting for {} to answer {wait:?}",
                cfg.timeouts.for_wait(wait).as_secs(),
                peer
            )),
            Err(e) => session.connection_lost(&format!("read from {} failed: {e}", peer)),
        }
    }
    if was_ready {
        dest.ready.set(dest.ready.get() - 1);
    }
    let _ = stream.shutdown(std::net::Shutdown::Both).await;
    match setup_error {
        Some(reason) if !was_ready => Err(reason),
        _ => Ok(()),
    }
}

/// Parks until the destination has work (true) or the idle timeout passes or the shard stops (false).
async fn wait_for_work(shard: &Shard, dest: &Dest) -> bool {
    let deadline = Instant::now() + shard.cfg.idle_timeout;
    loop {
        if !dest.queue.borrow().is_empty() {
            return true;
        }
        let now = Instant::now();
        if shard.stopping.get() || now >= deadline {
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
