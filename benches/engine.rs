//! Micro-benchmarks of the per-message CPU path: reply parsing, wire
//! preparation (CRLF + dot-stuffing), and one transaction through the
//! session engine, pipelined with DATA and with BDAT; one delivery-log
//! line (as the shards write it, and as serde_json writes the same record);
//! one spool line parsed; a recipient address checked and its domain
//! found; a job's string read from the spool map; the shaping policy a
//! shard works out when it first meets a domain. `cargo bench --bench engine`.

use std::collections::VecDeque;
use std::hint::black_box;
use std::rc::Rc;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use volley::generator::message;
use volley::outcome::{JobId, LogRecord, Outcome, Stamp};
use volley::smtp::{Enhanced, Envelope, Event, ReplyParser, Session, TlsMode, WireMessage};

fn replies(c: &mut Criterion) {
    let mut g = c.benchmark_group("reply_parser");
    let group =
        b"250 2.0.0 Ok: queued as 4F2A1B\r\n250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n354 End data with <CR><LF>.<CR><LF>\r\n";
    g.throughput(Throughput::Bytes(group.len() as u64));
    g.bench_function("pipelined_group_of_4", |b| {
        let mut p = ReplyParser::new();
        let mut out = VecDeque::new();
        b.iter(|| {
            p.feed(black_box(group), &mut out).unwrap();
            out.clear();
        })
    });
    let ehlo = b"250-mx.example.com\r\n250-PIPELINING\r\n250-SIZE 10240000\r\n250-ETRN\r\n250-STARTTLS\r\n250-ENHANCEDSTATUSCODES\r\n250-8BITMIME\r\n250-DSN\r\n250 CHUNKING\r\n";
    g.bench_function("ehlo_9_lines", |b| {
        let mut p = ReplyParser::new();
        let mut out = VecDeque::new();
        b.iter(|| {
            p.feed(black_box(ehlo), &mut out).unwrap();
            out.clear();
        })
    });
    g.finish();
}

fn wire(c: &mut Criterion) {
    let mut g = c.benchmark_group("wire_prepare");
    for size in [1500usize, 100 * 1024] {
        let m = message(size);
        g.throughput(Throughput::Bytes(m.len() as u64));
        g.bench_function(format!("{size}_bytes"), |b| {
            b.iter(|| WireMessage::prepare(black_box(&m)))
        });
    }
    g.finish();
}

/// A transaction sharing its prepared message, as the shard's do.
struct Txn(Rc<WireMessage>);
impl Envelope for Txn {
    fn reverse_path(&self) -> &str {
        "bounces@news.example.com"
    }
    fn recipient_count(&self) -> usize {
        1
    }
    fn recipient(&self, _: usize) -> &str {
        "alice@example.org"
    }
    fn message(&self) -> &WireMessage {
        &self.0
    }
}

/// A session past EHLO with these extensions.
fn ready(ehlo: &[u8]) -> Session<Txn> {
    let mut s: Session<Txn> = Session::new("bench.test", TlsMode::Off);
    s.feed(b"220 mx ESMTP\r\n");
    s.feed(ehlo);
    while s.poll_event().is_some() {}
    let n = s.output().len();
    s.consume_output(n);
    s
}

fn session(c: &mut Criterion) {
    let body = Rc::new(WireMessage::prepare(&message(1500)));
    c.bench_function("session_pipelined_transaction", |b| {
        let mut s = ready(b"250-mx\r\n250 PIPELINING\r\n");
        b.iter(|| {
            s.submit(Txn(body.clone()));
            s.feed(b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n354 go\r\n");
            s.feed(b"250 2.0.0 Ok: queued\r\n");
            let n = s.output().len();
            s.consume_output(n);
            while let Some(e) = s.poll_event() {
                assert!(matches!(e, Event::Done(_)));
            }
        })
    });
    c.bench_function("session_bdat_transaction", |b| {
        let mut s = ready(b"250-mx\r\n250-PIPELINING\r\n250 CHUNKING\r\n");
        b.iter(|| {
            s.submit(Txn(body.clone()));
            let n = s.output().len();
            s.consume_output(n);
            s.feed(b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n250 2.0.0 Ok: queued\r\n");
            while let Some(e) = s.poll_event() {
                assert!(matches!(e, Event::Done(_)));
            }
        })
    });
    // The chunk left in the message and given as slices, as a plaintext connection writes it.
    c.bench_function("session_bdat_transaction_by_reference", |b| {
        let mut s = ready(b"250-mx\r\n250-PIPELINING\r\n250 CHUNKING\r\n");
        s.write_by_reference(true);
        b.iter(|| {
            s.submit(Txn(body.clone()));
            black_box(s.output_slices());
            let n = s.output_len();
            s.consume_output(n);
            s.feed(b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n250 2.0.0 Ok: queued\r\n");
            while let Some(e) = s.poll_event() {
                assert!(matches!(e, Event::Done(_)));
            }
        })
    });
}

fn log_line(c: &mut Criterion) {
    let rec = LogRecord {
        ts: std::time::SystemTime::now(),
        id: JobId::Given("gen-0001234"),
        rcpt: Some("u17@d42.test"),
        domain: Some("d42.test"),
        outcome: Outcome::Delivered,
        code: Some(250),
        enhanced: Enhanced::parse_prefix("2.0.0"),
        reply: Some("2.0.0 Ok: queued as B6D1BEB100000001"),
        mx: Some("127.0.0.1"),
        ip: Some("127.0.0.1".parse().unwrap()),
        attempt: 1,
        latency_ms: Some(3),
        tls: None,
        category: None,
        rule: None,
        local: None,
        plain: false,
    };
    let mut g = c.benchmark_group("delivery_log_line");
    g.bench_function("written", |b| {
        let mut stamp = Stamp::default();
        let mut out = Vec::with_capacity(1024);
        b.iter(|| {
            out.clear();
            black_box(&rec).write_json(&mut out, &mut stamp);
            black_box(out.len())
        })
    });
    // The usual record: id and recipient as they lie in the spool line.
    let spool_text = LogRecord { plain: true, ..rec };
    g.bench_function("written_spool_text", |b| {
        let mut stamp = Stamp::default();
        let mut out = Vec::with_capacity(1024);
        b.iter(|| {
            out.clear();
            black_box(&spool_text).write_json(&mut out, &mut stamp);
            black_box(out.len())
        })
    });
    g.bench_function("serde_json", |b| {
        let mut out = Vec::with_capacity(1024);
        b.iter(|| {
            out.clear();
            serde_json::to_writer(&mut out, black_box(&rec)).unwrap();
            black_box(out.len())
        })
    });
    g.finish();
}

fn spool_line(c: &mut Criterion) {
    let line = br#"{"id":"gen-0001234","from":"bounces@gen.volley.test","to":["u0@d1234.test"],"message":"m.eml"}"#;
    let mut g = c.benchmark_group("spool_line_parse");
    // The usual line: read by the plain scan, its sender not the one before
    // (two lines of different senders in turn through one parser).
    let other = br#"{"id":"gen-0001235","from":"bounces@gen2.volley.test","to":["u0@d1235.test"],"message":"m.eml"}"#;
    let mut parser = volley::spool::JobParser::default();
    let mut turn = false;
    g.bench_function("plain", |b| {
        b.iter(|| {
            turn = !turn;
            let l: &[u8] = if turn { line } else { other };
            parser.parse(black_box(l), black_box(l)).unwrap()
        })
    });
    // The same line through one parser, as ingest reads a spool: the sender
    // found good on the line before is not checked again.
    let mut parser = volley::spool::JobParser::default();
    g.bench_function("plain_same_sender", |b| {
        b.iter(|| parser.parse(black_box(line), black_box(line)).unwrap())
    });
    // One escape: the scan gives up where it meets it and serde_json reads the line.
    let escaped =
        br#"{"id":"gen-0001234","from":"bounces@gen.volley.test","to":["u0@d1234.test"],"message":"m\u002eeml"}"#;
    g.bench_function("escaped", |b| {
        b.iter(|| volley::spool::parse_job(black_box(escaped), black_box(escaped)).unwrap())
    });
    g.finish();
}

fn shaping_policy(c: &mut Criterion) {
    // The built-in providers, and a domain that is none of them: every
    // provider's every suffix is tried (the long tail of a real list).
    let shaping = volley::shaping::Shaping::built_in();
    let cfg = volley::config::Config::default();
    let mut g = c.benchmark_group("shaping_policy");
    g.bench_function("new_domain_no_provider", |b| {
        b.iter(|| {
            shaping.policy(
                &cfg,
                black_box("small-isp.example"),
                black_box(&["mx1.small-isp.example"]),
            )
        })
    });
    g.bench_function("new_domain_gmail_by_mx", |b| {
        b.iter(|| shaping.policy(&cfg, black_box("example.com"), black_box(&["aspmx.l.google.com"])))
    });
    g.finish();
}

fn spool_strings(c: &mut Criterion) {
    let mut g = c.benchmark_group("spool_strings");
    // A recipient as ingest checks it, once per recipient of every line.
    let addr = "first.last+news@mail.example.com";
    g.bench_function("address_domain_32B", |b| {
        b.iter(|| volley::spool::address_domain(black_box(addr)).unwrap())
    });
    let long = "a-rather-long-local-part.with.dots+and-a-tag@a.long.subdomain.example.com";
    g.bench_function("address_domain_73B", |b| {
        b.iter(|| volley::spool::address_domain(black_box(long)).unwrap())
    });
    // A job's strings read back from the map, as ingest and the shards do
    // about nine times a message.
    let line = br#"{"id":"gen-0001234","from":"bounces@gen.volley.test","to":["first.last+news@mail.example.com"],"message":"m.eml"}"#;
    let job = volley::spool::parse_job(line, line).unwrap();
    g.bench_function("span_get_id_from_rcpt", |b| {
        b.iter(|| {
            let map = black_box(&line[..]);
            job.id.as_ref().unwrap().get(map).len() + job.from.get(map).len() + job.to[0].get(map).len()
        })
    });
    g.finish();
}

criterion_group!(
    benches,
    replies,
    wire,
    session,
    log_line,
    spool_line,
    spool_strings,
    shaping_policy
);
criterion_main!(benches);
