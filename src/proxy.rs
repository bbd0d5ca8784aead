//! `volley proxy`: a delay-line TCP proxy that puts a server at a chosen
//! distance on loopback (this kernel has no netem). Every chunk read from one
//! side is written to the other RTT/2 after it arrived, in order, and nothing
//! waits for anything else: many chunks are on the line at once, so the
//! proxy adds the round trip without capping throughput. Each direction of
//! each connection is a reader thread and a writer thread joined by a bounded
//! channel; the writer sleeps until each chunk is due (nanosleep keeps the
//! added delay within a fraction of a millisecond, where a runtime's
//! millisecond timer wheel would add one or two).

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use crossbeam_channel::bounded;

/// Bytes read at a time.
const CHUNK_BYTES: usize = 64 * 1024;
/// Chunks on the line per direction before the reader waits (64 MiB at most).
const LINE_CHUNKS: usize = 1024;

#[derive(Debug, Clone)]
pub struct ProxyOptions {
    pub listen: SocketAddr,
    pub to: SocketAddr,
    /// The round trip added: each direction delays by half.
    pub rtt: Duration,
}

/// What the proxy has done, for tests and the final line.
#[derive(Debug, Default)]
pub struct ProxyStats {
    pub connections: AtomicU64,
    pub bytes: AtomicU64,
    /// Chunks on the lines now, and the most there ever were at once (all lines together).
    in_flight: AtomicUsize,
    pub peak_in_flight: AtomicUsize,
}

/// A running proxy; stops taking connections when dropped.
pub struct Proxy {
    addr: SocketAddr,
    stats: Arc<ProxyStats>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Proxy {
    pub fn start(opts: ProxyOptions) -> anyhow::Result<Proxy> {
        let listener = TcpListener::bind(opts.listen).with_context(|| format!("cannot listen on {}", opts.listen))?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let stats = Arc::new(ProxyStats::default());
        let stop = Arc::new(AtomicBool::new(false));
        let (s, st) = (stats.clone(), stop.clone());
        let thread = std::thread::Builder::new()
            .name("volley-proxy".into())
            .spawn(move || accept_loop(listener, opts, s, st))
            .context("cannot start the proxy thread")?;
        Ok(Proxy {
            addr,
            stats,
            stop,
            thread: Some(thread),
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn stats(&self) -> &ProxyStats {
        &self.stats
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn accept_loop(listener: TcpListener, opts: ProxyOptions, stats: Arc<ProxyStats>, stop: Arc<AtomicBool>) {
    while !stop.load(Ordering::Relaxed) {
        let client = match listener.accept() {
            Ok((c, _)) => c,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(5));
                continue;
            }
            Err(_) => continue,
        };
        let server = match TcpStream::connect(opts.to) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!("proxy: cannot connect to {}: {e}", opts.to);
                continue;
            }
        };
        stats.connections.fetch_add(1, Ordering::Relaxed);
        let _ = client.set_nonblocking(false);
        for s in [&client, &server] {
            let _ = s.set_nodelay(true);
        }
        let half = opts.rtt / 2;
        let pairs = [
            (client.try_clone(), server.try_clone()),
            (server.try_clone(), client.try_clone()),
        ];
        for (from, to) in pairs {
            if let (Ok(from), Ok(to)) = (from, to) {
                delay_line(from, to, half, stats.clone());
            }
        }
    }
}

/// Forwards `from` to `to`, each chunk `delay` after it was read; the end of the stream travels the same way.
fn delay_line(mut from: TcpStream, mut to: TcpStream, delay: Duration, stats: Arc<ProxyStats>) {
    let (tx, rx) = bounded::<(Instant, Vec<u8>)>(LINE_CHUNKS);
    let s = stats.clone();
    std::thread::spawn(move || {
        while let Ok((due, chunk)) = rx.recv() {
            let now = Instant::now();
            if due > now {
                std::thread::sleep(due - now);
            }
            s.in_flight.fetch_sub(1, Ordering::Relaxed);
            if chunk.is_empty() {
                break;
            }
            s.bytes.fetch_add(chunk.len() as u64, Ordering::Relaxed);
            if to.write_all(&chunk).is_err() {
                let _ = from_shutdown(&to);
                return;
            }
        }
        let _ = to.shutdown(Shutdown::Write);
    });
    std::thread::spawn(move || {
        let mut buf = vec![0u8; CHUNK_BYTES];
        loop {
            let n = from.read(&mut buf).unwrap_or(0);
            let now = stats.in_flight.fetch_add(1, Ordering::Relaxed) + 1;
            stats.peak_in_flight.fetch_max(now, Ordering::Relaxed);
            // An empty chunk carries the end of the stream.
            if tx.send((Instant::now() + delay, buf[..n].to_vec())).is_err() || n == 0 {
                break;
            }
        }
    });
}

/// A write failed: the peer is gone, so stop reading for it too.
fn from_shutdown(s: &TcpStream) -> std::io::Result<()> {
    s.shutdown(Shutdown::Both)
}
