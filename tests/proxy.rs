//! `volley proxy`, the delay line: it adds the round trip, keeps every byte
//! in order, and holds many chunks on the line at once (it never waits for a
//! chunk to arrive before taking the next, so it caps no throughput).

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use volley::proxy::{Proxy, ProxyOptions};

/// An echo server on loopback; returns its address.
fn echo() -> std::net::SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for c in l.incoming() {
            let Ok(mut c) = c else { return };
            std::thread::spawn(move || {
                let mut w = c.try_clone().unwrap();
                let _ = std::io::copy(&mut c, &mut w);
            });
        }
    });
    addr
}

fn proxy(rtt_ms: u64) -> Proxy {
    Proxy::start(ProxyOptions {
        listen: "127.0.0.1:0".parse().unwrap(),
        to: echo(),
        rtt: Duration::from_millis(rtt_ms),
    })
    .unwrap()
}

#[test]
fn a_reply_comes_back_no_sooner_than_the_round_trip() {
    let p = proxy(100);
    let mut c = TcpStream::connect(p.addr()).unwrap();
    for _ in 0..3 {
        let t0 = Instant::now();
        c.write_all(b"ping\n").unwrap();
        let mut buf = [0u8; 5];
        c.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"ping\n");
        assert!(t0.elapsed() >= Duration::from_millis(100), "{:?}", t0.elapsed());
    }
}

#[test]
fn every_byte_arrives_in_order_with_many_chunks_on_the_line() {
    // Half a second each way: all the writes below are on the line before the first arrives.
    let p = proxy(1000);
    let mut c = TcpStream::connect(p.addr()).unwrap();
    let data: Vec<u8> = (0..4_000_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect();
    let reader = {
        let mut c = c.try_clone().unwrap();
        let n = data.len();
        std::thread::spawn(move || {
            let mut got = vec![0u8; n];
            c.read_exact(&mut got).unwrap();
            got
        })
    };
    for piece in data.chunks(100_000) {
        c.write_all(piece).unwrap();
        std::thread::sleep(Duration::from_millis(2));
    }
    let got = reader.join().unwrap();
    assert!(got == data, "the bytes came back changed or out of order");
    let peak = p.stats().peak_in_flight.load(Ordering::Relaxed);
    assert!(peak >= 20, "only {peak} chunks were ever on the line at once");
    assert_eq!(p.stats().bytes.load(Ordering::Relaxed), 2 * data.len() as u64);
}

#[test]
fn the_end_of_a_stream_travels_through() {
    let p = proxy(20);
    let mut c = TcpStream::connect(p.addr()).unwrap();
    c.write_all(b"bye").unwrap();
    c.shutdown(std::net::Shutdown::Write).unwrap();
    let mut rest = Vec::new();
    c.read_to_end(&mut rest).unwrap();
    assert_eq!(rest, b"bye");
}
