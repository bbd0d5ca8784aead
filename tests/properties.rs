//! Properties over generated inputs (proptest):
//! - any message body survives volley's wire encoding and the sink's
//!   decoding (dot-stuffing with DATA, raw chunks with BDAT) as CRLF text;
//! - the client engine, against a model server that answers at random with
//!   random splits of its bytes, keeps SMTP's rules: nothing before the
//!   greeting, no command line over 1,000 octets or with CR/LF inside it,
//!   nothing after a command that must be answered first (EHLO, HELO,
//!   STARTTLS, AUTH, DATA, QUIT), no pipelining unless offered, no message
//!   data before the 354, no address that would break its command line;
//!   and each recipient is delivered exactly when its
//!   RCPT and its transaction's final reply were both 250.

use std::collections::{HashMap, VecDeque};

use proptest::prelude::*;
use volley::sink::{ServerSession, SinkOptions};
use volley::smtp::{Envelope, Event, Extensions, Session, Status, TlsMode, WireMessage};

fn body_bytes() -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(
        prop_oneof![
            4 => Just(b'.'),
            4 => Just(b'\r'),
            4 => Just(b'\n'),
            6 => Just(b'a'),
            1 => any::<u8>(),
        ],
        0..400,
    )
}

/// The body as it must arrive: every line end (CRLF, a lone CR, a lone LF) made CRLF.
fn as_crlf_text(body: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut i = 0;
    let mut line_open = false;
    while i < body.len() {
        match body[i] {
            b'\r' | b'\n' => {
                out.extend_from_slice(b"\r\n");
                line_open = false;
                i += if body[i] == b'\r' && body.get(i + 1) == Some(&b'\n') {
                    2
                } else {
                    1
                };
            }
            b => {
                out.push(b);
                line_open = true;
                i += 1;
            }
        }
    }
    if line_open {
        out.extend_from_slice(b"\r\n");
    }
    out
}

/// Splits `bytes` at the given points (taken modulo its length).
fn pieces<'a>(bytes: &'a [u8], cuts: &[usize]) -> Vec<&'a [u8]> {
    let mut at: Vec<usize> = cuts.iter().map(|c| c % (bytes.len() + 1)).collect();
    at.push(0);
    at.push(bytes.len());
    at.sort_unstable();
    at.dedup();
    at.windows(2).map(|w| &bytes[w[0]..w[1]]).collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn any_body_round_trips_through_dot_stuffing_and_bdat(
        body in body_bytes(),
        cuts in prop::collection::vec(any::<usize>(), 0..6),
        chunked in any::<bool>(),
    ) {
        let wire = WireMessage::prepare(&body);
        let opts = SinkOptions { chunking: true, ..SinkOptions::default() };
        let mut sink = ServerSession::new(&opts, 1, true);
        let mut input = b"EHLO c.test\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<c@d.test>\r\n".to_vec();
        if chunked {
            input.extend_from_slice(format!("BDAT {} LAST\r\n", wire.chunk_len()).as_bytes());
            wire.write_chunk(&mut input);
        } else {
            input.extend_from_slice(b"DATA\r\n");
            input.extend_from_slice(&wire.bytes);
        }
        let mut out = Vec::new();
        let mut received = Vec::new();
        for p in pieces(&input, &cuts) {
            sink.input(p, &mut out);
            received.append(&mut sink.received);
        }
        prop_assert_eq!(received.len(), 1, "{}", String::from_utf8_lossy(&out));
        prop_assert_eq!(&received[0].body, &as_crlf_text(&body));
        prop_assert_eq!(received[0].chunked, chunked);
    }
}

struct Txn {
    from: String,
    rcpts: Vec<String>,
    wire: WireMessage,
}

impl Envelope for Txn {
    fn reverse_path(&self) -> &str {
        &self.from
    }
    fn recipient_count(&self) -> usize {
        self.rcpts.len()
    }
    fn recipient(&self, i: usize) -> &str {
        &self.rcpts[i]
    }
    fn message(&self) -> &WireMessage {
        &self.wire
    }
}

/// What a server offers and how it answers, all generated.
#[derive(Debug, Clone)]
struct Script {
    pipelining: bool,
    chunking: bool,
    starttls: bool,
    eight_bit_mime: bool,
    refuse_ehlo: bool,
    /// Choices consumed one per reply (which code, how many commands to answer at once).
    choices: Vec<u8>,
    /// Where the server's bytes are split into reads.
    cuts: Vec<usize>,
    /// Per transaction: recipients and which body (3: the first body, and a
    /// first recipient with CRLF and a second command in it).
    txns: Vec<(usize, u8)>,
    window: usize,
}

fn script() -> impl Strategy<Value = Script> {
    (
        (
            any::<bool>(),
            any::<bool>(),
            any::<bool>(),
            any::<bool>(),
            prop::bool::weighted(0.1),
        ),
        prop::collection::vec(any::<u8>(), 1..64),
        prop::collection::vec(any::<usize>(), 0..8),
        prop::collection::vec((1usize..4, 0u8..4), 1..6),
        1usize..4,
    )
        .prop_map(
            |((pipelining, chunking, starttls, eight_bit_mime, refuse_ehlo), choices, cuts, txns, window)| Script {
                pipelining,
                chunking,
                starttls,
                eight_bit_mime,
                refuse_ehlo,
                choices,
                cuts,
                txns,
                window,
            },
        )
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Cmd {
    Ehlo,
    Helo,
    StartTls,
    Mail(usize),
    Rcpt(usize, usize),
    Data(usize),
    Dot(usize),
    Bdat(usize),
    Rset,
    Quit,
}

impl Cmd {
    /// RFC 2920 §3.1: these end a group; the client waits for their reply.
    fn must_be_answered_first(self) -> bool {
        matches!(self, Cmd::Ehlo | Cmd::Helo | Cmd::StartTls | Cmd::Data(_) | Cmd::Quit)
    }
}

/// What the model server saw of a transaction (by the index in its MAIL FROM).
#[derive(Debug, Default)]
struct Seen {
    rcpt: HashMap<usize, u16>,
    /// The reply that ended it: to the dot, to BDAT, or a refusal of MAIL or DATA.
    last: Option<u16>,
}

enum Reading {
    Command,
    Body(usize),
    Chunk(usize, usize),
}

/// A server that checks every byte the client writes against the rules.
struct Model {
    s: Script,
    pick: usize,
    greeted: bool,
    closed: bool,
    ehlo_done: bool,
    refused_once: bool,
    offered_pipelining: bool,
    reading: Reading,
    line: Vec<u8>,
    asked: VecDeque<Cmd>,
    current: Option<usize>,
    txns: HashMap<usize, Seen>,
    tls_up: bool,
}

impl Model {
    fn new(s: Script) -> Model {
        Model {
            s,
            pick: 0,
            greeted: false,
            closed: false,
            ehlo_done: false,
            refused_once: false,
            offered_pipelining: false,
            reading: Reading::Command,
            line: Vec::new(),
            asked: VecDeque::new(),
            current: None,
            txns: HashMap::new(),
            tls_up: false,
        }
    }

    fn choice(&mut self) -> u8 {
        let c = self.s.choices[self.pick % self.s.choices.len()];
        self.pick += 1;
        c
    }

    /// Takes what the client wrote, checking it as it goes.
    fn client(&mut self, bytes: &[u8]) {
        for &b in bytes {
            assert!(self.greeted, "the client wrote before the greeting");
            assert!(!self.closed, "the client wrote after the session ended");
            if let Some(c) = self.asked.iter().find(|c| c.must_be_answered_first()) {
                panic!("the client wrote after {c:?} before its reply");
            }
            if let Reading::Chunk(t, left) = &mut self.reading {
                *left -= 1;
                if *left == 0 {
                    let t = *t;
                    self.asked.push_back(Cmd::Bdat(t));
                    self.reading = Reading::Command;
                }
                continue;
            }
            self.line.push(b);
            assert!(self.line.len() <= 1000, "a line over 1,000 octets");
            if b != b'\n' {
                continue;
            }
            let line = std::mem::take(&mut self.line);
            let text = line.strip_suffix(b"\r\n").expect("a line ends in CRLF");
            assert!(
                !text.contains(&b'\r') && !text.contains(&b'\n'),
                "CR or LF inside {text:?}"
            );
            match self.reading {
                Reading::Body(t) => {
                    if text == b"." {
                        self.asked.push_back(Cmd::Dot(t));
                        self.reading = Reading::Command;
                    }
                }
                Reading::Command => self.command(std::str::from_utf8(text).expect("commands are ASCII")),
                Reading::Chunk(..) => unreachable!(),
            }
        }
    }

    fn command(&mut self, text: &str) {
        if !self.asked.is_empty() {
            assert!(self.offered_pipelining, "pipelined {text:?} without PIPELINING");
        }
        let upper = text.to_ascii_uppercase();
        let cmd = if upper.starts_with("EHLO ") {
            Cmd::Ehlo
        } else if upper.starts_with("HELO ") {
            Cmd::Helo
        } else if upper == "STARTTLS" {
            Cmd::StartTls
        } else if upper == "RSET" {
            Cmd::Rset
        } else if upper == "QUIT" {
            Cmd::Quit
        } else if let Some(rest) = text.strip_prefix("MAIL FROM:<t") {
            assert!(self.ehlo_done, "MAIL before EHLO/HELO was answered");
            let t: usize = rest.split('@').next().unwrap().parse().unwrap();
            self.current = Some(t);
            self.txns.entry(t).or_default();
            Cmd::Mail(t)
        } else if let Some(rest) = text.strip_prefix("RCPT TO:<r") {
            let t = self.current.expect("RCPT after MAIL");
            Cmd::Rcpt(t, rest.split('@').next().unwrap().parse().unwrap())
        } else if upper == "DATA" {
            Cmd::Data(self.current.expect("DATA after MAIL"))
        } else if let Some(n) = upper.strip_prefix("BDAT ").and_then(|r| r.strip_suffix(" LAST")) {
            assert!(self.s.chunking, "BDAT without CHUNKING");
            let t = self.current.expect("BDAT after MAIL");
            let n: usize = n.parse().unwrap();
            if n == 0 {
                self.asked.push_back(Cmd::Bdat(t));
            } else {
                self.reading = Reading::Chunk(t, n);
            }
            return;
        } else {
            panic!("unexpected command {text:?}");
        };
        self.asked.push_back(cmd);
    }

    /// Answers some of the commands waiting for a reply.
    fn answer(&mut self) -> Vec<u8> {
        let mut out = Vec::new();
        if self.asked.is_empty() || self.closed {
            return out;
        }
        let n = 1 + usize::from(self.choice()) % self.asked.len();
        for _ in 0..n {
            let cmd = self.asked.pop_front().unwrap();
            let c = self.choice();
            // Now and then a server gives up in the middle.
            if c == 255 && !matches!(cmd, Cmd::Quit) {
                out.extend_from_slice(b"421 4.3.2 going away\r\n");
                self.closed = true;
                return out;
            }
            let code = self.reply_code(cmd, c);
            match cmd {
                Cmd::Ehlo if code == 250 => {
                    let mut r = b"250-model.test\r\n".to_vec();
                    for (on, kw) in [
                        (self.s.pipelining, "PIPELINING"),
                        (self.s.chunking, "CHUNKING"),
                        (self.s.eight_bit_mime, "8BITMIME"),
                        (self.s.starttls && !self.tls_up, "STARTTLS"),
                    ] {
                        if on {
                            r.extend_from_slice(format!("250-{kw}\r\n").as_bytes());
                        }
                    }
                    r.extend_from_slice(b"250 SIZE 1000000\r\n");
                    out.extend_from_slice(&r);
                    self.ehlo_done = true;
                    self.offered_pipelining = self.s.pipelining;
                }
                Cmd::Helo if code == 250 => {
                    out.extend_from_slice(b"250 model.test\r\n");
                    self.ehlo_done = true;
                    self.offered_pipelining = false;
                }
                Cmd::Data(_) if code == 354 => {
                    out.extend_from_slice(b"354 go ahead\r\n");
                    self.reading = Reading::Body(self.current.unwrap());
                }
                Cmd::Quit => {
                    out.extend_from_slice(b"221 2.0.0 bye\r\n");
                    self.closed = true;
                }
                _ => out.extend_from_slice(format!("{code} {}\r\n", reply_text(code)).as_bytes()),
            }
            match cmd {
                Cmd::Rcpt(t, r) => {
                    self.txns.get_mut(&t).unwrap().rcpt.insert(r, code);
                }
                Cmd::Mail(t) | Cmd::Data(t) if code >= 400 => self.txns.get_mut(&t).unwrap().last = Some(code),
                Cmd::Dot(t) | Cmd::Bdat(t) => self.txns.get_mut(&t).unwrap().last = Some(code),
                Cmd::StartTls if code == 220 => {
                    // The session starts over once TLS is up (RFC 3207 §4.2).
                    self.ehlo_done = false;
                    self.offered_pipelining = false;
                    self.asked.clear();
                    return out;
                }
                _ => {}
            }
            if self.asked.is_empty() {
                break;
            }
        }
        out
    }

    fn reply_code(&mut self, cmd: Cmd, c: u8) -> u16 {
        let accepted = |m: &Model, t: usize| m.txns[&t].rcpt.values().any(|&c| c == 250);
        match cmd {
            Cmd::Ehlo if self.s.refuse_ehlo && !self.refused_once => {
                self.refused_once = true;
                502
            }
            Cmd::Ehlo | Cmd::Helo | Cmd::Rset => 250,
            Cmd::StartTls => [220, 220, 454][usize::from(c) % 3],
            Cmd::Quit => 221,
            Cmd::Mail(_) => [250, 250, 250, 250, 250, 451, 550][usize::from(c) % 7],
            // After a refused MAIL there is no transaction (RFC 5321 §4.1.1.3).
            Cmd::Rcpt(t, _) if self.txns[&t].last.is_some() => 503,
            Cmd::Rcpt(..) => [250, 250, 250, 450, 550][usize::from(c) % 5],
            // A server with no accepted recipient refuses DATA (RFC 2920 §3.1).
            Cmd::Data(t) if !accepted(self, t) => 554,
            Cmd::Data(_) => [354, 354, 354, 451, 554][usize::from(c) % 5],
            Cmd::Bdat(t) if !accepted(self, t) => 554,
            Cmd::Dot(_) | Cmd::Bdat(_) => [250, 250, 250, 451, 552][usize::from(c) % 5],
        }
    }
}

fn reply_text(code: u16) -> &'static str {
    match code {
        220 => "ready to start TLS",
        250 => "2.0.0 Ok",
        354 => "go ahead",
        450 => "4.2.1 try later",
        451 => "4.3.0 temporary failure",
        454 => "4.7.0 TLS not available",
        502 => "5.5.1 not implemented",
        550 => "5.1.1 no such user",
        552 => "5.3.4 too big",
        _ => "5.5.1 no",
    }
}

/// Runs the engine against the model; returns the recipients delivered.
fn run_engine(s: Script) -> usize {
    let tls = if s.starttls { TlsMode::Offer } else { TlsMode::Off };
    let mut session: Session<Txn> = Session::new("client.test", tls).with_extensions(Extensions {
        pipelining: true,
        chunking: true,
        window: s.window,
        window_max: s.window * 2,
        window_bytes: 1 << 20,
    });
    let bodies: [&[u8]; 3] = [
        b"Subject: a\n\nhello\n",
        b"Subject: b\r\n\r\n.\r\n..x\r\n.\r\n",
        b"Subject: c\n\ncaf\xc3\xa9\n",
    ];
    let mut queue: VecDeque<Txn> = s
        .txns
        .iter()
        .enumerate()
        .map(|(t, &(n, b))| {
            let mut rcpts: Vec<String> = (0..n).map(|r| format!("r{r}@d.test")).collect();
            if b == 3 {
                rcpts[0] = "r0@d.test>\r\nRSET\r\nMAIL FROM:<evil@x.test".into();
            }
            Txn {
                from: format!("t{t}@s.test"),
                rcpts,
                wire: WireMessage::prepare(bodies[usize::from(b % 3)]),
            }
        })
        .collect();
    let total = queue.len();
    let cuts = s.cuts.clone();
    let mut model = Model::new(s);
    let mut verdicts: HashMap<usize, Vec<Status>> = HashMap::new();
    let mut returned = 0;
    model.client(session.output());
    let mut server: Vec<u8> = b"220 model.test ESMTP\r\n".to_vec();
    model.greeted = true;
    for _round in 0..400 {
        for p in pieces(&server, &cuts) {
            session.feed(p);
        }
        server.clear();
        while let Some(e) = session.poll_event() {
            match e {
                Event::StartTls => {
                    model.tls_up = true;
                    session.tls_established();
                }
                Event::Done(r) => {
                    returned += 1;
                    let t: usize = r.txn.from[1..].split('@').next().unwrap().parse().unwrap();
                    let v = (0..r.txn.rcpts.len()).map(|i| r.verdict(i).0).collect();
                    assert!(verdicts.insert(t, v).is_none(), "t{t} came back twice");
                }
                Event::Unsent(_) => returned += 1,
                Event::Ready | Event::Failed { .. } => {}
            }
        }
        while session.wants_txn()
            && let Some(t) = queue.pop_front()
        {
            session.submit(t);
        }
        if queue.is_empty() && returned == total {
            session.quit();
        }
        let n = session.output().len();
        model.client(session.output());
        session.consume_output(n);
        server = model.answer();
        if server.is_empty() && (model.closed || session.is_closed()) {
            break;
        }
        if server.is_empty() && model.asked.is_empty() && n == 0 {
            // Nobody has anything to say: the session waits for work it will not get.
            break;
        }
    }
    session.connection_lost(volley::local::Local::Closed, "the model server is gone");
    while let Some(e) = session.poll_event() {
        match e {
            Event::Done(r) => {
                returned += 1;
                let t: usize = r.txn.from[1..].split('@').next().unwrap().parse().unwrap();
                let v = (0..r.txn.rcpts.len()).map(|i| r.verdict(i).0).collect();
                assert!(verdicts.insert(t, v).is_none(), "t{t} came back twice");
            }
            Event::Unsent(_) => returned += 1,
            _ => {}
        }
    }
    assert_eq!(
        returned,
        total - queue.len(),
        "every submitted transaction comes back once"
    );
    // Delivered exactly when the server said 250 to its RCPT and to its end.
    let mut delivered_count = 0;
    for (t, v) in &verdicts {
        let seen = model.txns.get(t);
        for (r, status) in v.iter().enumerate() {
            let rcpt = seen.and_then(|s| s.rcpt.get(&r).copied());
            let last = seen.and_then(|s| s.last);
            let delivered = rcpt == Some(250) && last == Some(250);
            assert_eq!(
                *status == Status::Delivered,
                delivered,
                "t{t} r{r}: {status:?} with RCPT {rcpt:?} and end {last:?}"
            );
            delivered_count += usize::from(delivered);
            if *status == Status::Bounced {
                let permanent = rcpt.is_some_and(|c| c >= 500) || last.is_some_and(|c| c >= 500) || rcpt.is_none();
                assert!(
                    permanent,
                    "t{t} r{r} bounced without a 5xx (RCPT {rcpt:?}, end {last:?})"
                );
            }
        }
    }
    delivered_count
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn the_engine_keeps_the_rules_against_any_server(s in script()) {
        run_engine(s);
    }
}

/// The model itself: a server that accepts everything gets every recipient
/// delivered, in lock-step, pipelined, with BDAT windows and after STARTTLS.
#[test]
fn a_cooperative_model_server_gets_everything_delivered() {
    for (pipelining, chunking, starttls) in [
        (false, false, false),
        (true, false, false),
        (true, true, false),
        (true, true, true),
    ] {
        let s = Script {
            pipelining,
            chunking,
            starttls,
            eight_bit_mime: true,
            refuse_ehlo: false,
            // 0 picks the first code of every list: 250, 354, 220.
            choices: vec![0],
            cuts: vec![3, 17, 40],
            txns: vec![(3, 0), (1, 1), (2, 2), (2, 0)],
            window: 3,
        };
        assert_eq!(
            run_engine(s),
            8,
            "pipelining {pipelining}, chunking {chunking}, starttls {starttls}"
        );
    }
}

/// The model catches a client that breaks the rules (so the property above can fail).
mod the_model_catches {
    use super::*;

    fn ready_model(pipelining: bool) -> Model {
        let mut m = Model::new(Script {
            pipelining,
            chunking: false,
            starttls: false,
            eight_bit_mime: true,
            refuse_ehlo: false,
            choices: vec![0],
            cuts: vec![],
            txns: vec![],
            window: 1,
        });
        m.greeted = true;
        m.client(b"EHLO c.test\r\n");
        m.answer();
        m
    }

    #[test]
    #[should_panic(expected = "before the greeting")]
    fn a_write_before_the_greeting() {
        let mut m = Model::new(ready_model(true).s);
        m.client(b"EHLO c.test\r\n");
    }

    #[test]
    #[should_panic(expected = "wrote after Data(0) before its reply")]
    fn data_before_the_354() {
        let mut m = ready_model(true);
        m.client(b"MAIL FROM:<t0@s.test>\r\nRCPT TO:<r0@d.test>\r\nDATA\r\nSubject: x\r\n");
    }

    #[test]
    #[should_panic(expected = "without PIPELINING")]
    fn pipelining_that_was_not_offered() {
        let mut m = ready_model(false);
        m.client(b"MAIL FROM:<t0@s.test>\r\nRCPT TO:<r0@d.test>\r\n");
    }

    #[test]
    #[should_panic(expected = "CR or LF inside")]
    fn a_cr_inside_a_command() {
        let mut m = ready_model(true);
        m.client(b"MAIL FROM:<t0@s.test>\rRSET\r\n");
    }

    #[test]
    #[should_panic(expected = "over 1,000 octets")]
    fn a_line_too_long() {
        let mut m = ready_model(true);
        let mut line = b"RCPT TO:<r0@".to_vec();
        line.resize(1100, b'a');
        m.client(&line);
    }
}
