//! Transcripts of the client session engine: literal wire text in both
//! directions, with the fate of each recipient. No sockets, no clocks.

use volley::local::Local;
use volley::smtp::{Decider, Envelope, Event, Extensions, Session, Status, TlsMode, WireMessage};

#[derive(Debug, Clone)]
struct Txn {
    from: &'static str,
    rcpts: Vec<&'static str>,
    wire: WireMessage,
    seven: Option<WireMessage>,
}

impl Envelope for Txn {
    fn reverse_path(&self) -> &str {
        self.from
    }
    fn recipient_count(&self) -> usize {
        self.rcpts.len()
    }
    fn recipient(&self, i: usize) -> &str {
        self.rcpts[i]
    }
    fn message(&self) -> &WireMessage {
        &self.wire
    }
    fn seven_bit(&self) -> Result<&WireMessage, &str> {
        self.seven.as_ref().ok_or("not converted in this test")
    }
}

fn txn(rcpts: &[&'static str], body: &str) -> Txn {
    Txn {
        from: "news@sender.test",
        rcpts: rcpts.to_vec(),
        wire: WireMessage::prepare(body.as_bytes()),
        seven: None,
    }
}

enum Step {
    /// The client must have written exactly this.
    C(&'static str),
    /// The server sends this.
    S(&'static str),
    /// Hand the next transaction to the session.
    Submit,
    /// The session must not want a transaction now (its window is full).
    Full,
    Quit,
    /// The driver finished the TLS handshake.
    TlsUp,
}
use Step::*;

#[derive(Debug, Default)]
struct Seen {
    ready: bool,
    done: Vec<Vec<(Status, String)>>,
    unsent: usize,
    failed: Option<String>,
    starttls: usize,
}

fn describe(d: Decider<'_>) -> String {
    match d {
        Decider::Reply(r) => r.code.to_string(),
        Decider::Failure(kind, f) => format!("failure ({kind}): {f}"),
    }
}

fn run(name: &str, txns: Vec<Txn>, steps: &[Step]) -> (Session<Txn>, Seen) {
    run_tls(name, TlsMode::Off, txns, steps)
}

fn run_tls(name: &str, mode: TlsMode, txns: Vec<Txn>, steps: &[Step]) -> (Session<Txn>, Seen) {
    run_both(name, || Session::new("client.test", mode), txns, steps)
}

fn run_ext(name: &str, ext: Extensions, txns: Vec<Txn>, steps: &[Step]) -> (Session<Txn>, Seen) {
    run_both(
        name,
        || Session::new("client.test", TlsMode::Off).with_extensions(ext),
        txns,
        steps,
    )
}

/// Every transcript twice: BDAT chunks copied into the output, then written
/// by reference (given as slices of the messages themselves, each write
/// taken in two parts, the second copied together); the wire and the
/// outcomes must be the same.
fn run_both(name: &str, session: impl Fn() -> Session<Txn>, txns: Vec<Txn>, steps: &[Step]) -> (Session<Txn>, Seen) {
    let mut by_reference = session();
    by_reference.write_by_reference(true);
    let (_, seen_by_reference) = run_session(&format!("{name} (by reference)"), by_reference, txns.clone(), steps);
    let (s, seen) = run_session(name, session(), txns, steps);
    assert_eq!(
        format!("{seen_by_reference:?}"),
        format!("{seen:?}"),
        "{name}: the same outcomes with chunks written by reference"
    );
    (s, seen)
}

/// What the client has to write, however it is held.
fn pending(s: &Session<Txn>) -> Vec<u8> {
    s.output_slices().iter().flat_map(|p| p.iter().copied()).collect()
}

fn run_session(name: &str, mut s: Session<Txn>, mut txns: Vec<Txn>, steps: &[Step]) -> (Session<Txn>, Seen) {
    txns.reverse();
    let mut seen = Seen::default();
    for (i, step) in steps.iter().enumerate() {
        match step {
            C(want) => {
                let out = pending(&s);
                assert_eq!(String::from_utf8_lossy(&out), *want, "{name}: step {i}: client output");
                assert_eq!(s.output_len(), out.len(), "{name}: step {i}: output length");
                // A first part, then what is left (copied together when it
                // held chunks written by reference).
                let first = out.len() / 2;
                s.consume_output(first);
                assert_eq!(s.contiguous_output(), &out[first..], "{name}: step {i}: the rest");
                let n = s.output_len();
                s.consume_output(n);
            }
            S(reply) => s.feed(reply.as_bytes()),
            Submit => {
                assert!(s.wants_txn(), "{name}: step {i}: session does not want a transaction");
                s.submit(txns.pop().expect("a transaction to submit"));
            }
            Full => assert!(!s.wants_txn(), "{name}: step {i}: session wants a transaction"),
            Quit => s.quit(),
            TlsUp => s.tls_established(),
        }
        while let Some(e) = s.poll_event() {
            match e {
                Event::Ready => seen.ready = true,
                Event::Done(r) => seen.done.push(
                    (0..r.txn.rcpts.len())
                        .map(|i| {
                            let (st, d) = r.verdict(i);
                            (st, describe(d))
                        })
                        .collect(),
                ),
                Event::Unsent(_) => seen.unsent += 1,
                Event::Failed { reason, .. } => seen.failed = Some(reason),
                Event::StartTls => seen.starttls += 1,
            }
        }
    }
    assert!(
        !s.has_output(),
        "{name}: unchecked client output {:?}",
        String::from_utf8_lossy(&pending(&s))
    );
    (s, seen)
}

const GREET: Step = S("220 mx.test ESMTP\r\n");
const EHLO: Step = C("EHLO client.test\r\n");
const EHLO_PIPE: Step = S("250-mx.test\r\n250-PIPELINING\r\n250 \r\n");
const EHLO_PLAIN: Step = S("250-mx.test\r\n250 8BITMIME\r\n");

fn statuses(seen: &Seen) -> Vec<Vec<Status>> {
    seen.done.iter().map(|t| t.iter().map(|(s, _)| *s).collect()).collect()
}

use Status::{Bounced as B, Deferred as D, Delivered as OK};

#[test]
fn pipelined_happy_path_and_quit() {
    let (s, seen) = run(
        "happy",
        vec![txn(&["a@y.test", "b@y.test"], "Subject: hi\n\nbody\n")],
        &[
            GREET,
            EHLO,
            EHLO_PIPE,
            Submit,
            C("MAIL FROM:<news@sender.test>\r\nRCPT TO:<a@y.test>\r\nRCPT TO:<b@y.test>\r\nDATA\r\n"),
            S("250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n250 2.1.5 Ok\r\n354 go ahead\r\n"),
            C("Subject: hi\r\n\r\nbody\r\n.\r\n"),
            S("250 2.0.0 Ok: queued as X\r\n"),
            Quit,
            C("QUIT\r\n"),
            S("221 2.0.0 Bye\r\n"),
        ],
    );
    assert!(seen.ready);
    assert_eq!(statuses(&seen), vec![vec![OK, OK]]);
    assert_eq!(seen.done[0][0].1, "250");
    assert!(s.is_closed());
    assert!(s.capabilities().pipelining);
}

#[test]
fn next_group_rides_with_the_body() {
    let (_, seen) = run(
        "ride",
        vec![txn(&["a@y.test"], "one\n"), txn(&["b@z.test"], "two\n")],
        &[
            GREET,
            EHLO,
            EHLO_PIPE,
            Submit,
            C("MAIL FROM:<news@sender.test>\r\nRCPT TO:<a@y.test>\r\nDATA\r\n"),
            // A second transaction waits while the first awaits its 354.
            Submit,
            C(""),
            S("250 Ok\r\n250 Ok\r\n354 go\r\n"),
            C("one\r\n.\r\nMAIL FROM:<news@sender.test>\r\nRCPT TO:<b@z.test>\r\nDATA\r\n"),
            S("250 Ok: queued\r\n250 Ok\r\n250 Ok\r\n354 go\r\n"),
            C("two\r\n.\r\n"),
            S("250 Ok: queued\r\n"),
        ],
    );
    assert_eq!(statuses(&seen), vec![vec![OK], vec![OK]]);
}

#[test]
fn helo_fallback_then_lock_step() {
    let (s, seen) = run(
        "helo",
        vec![txn(&["a@y.test", "b@y.test"], "x\n")],
        &[
            GREET,
            EHLO,
            S("502 5.5.2 Error: command not recognized\r\n"),
            C("HELO client.test\r\n"),
            S("250 mx.test\r\n"),
            Submit,
            C("MAIL FROM:<news@sender.test>\r\n"),
            S("250 Ok\r\n"),
            C("RCPT TO:<a@y.test>\r\n"),
            S("250 Ok\r\n"),
            C("RCPT TO:<b@y.test>\r\n"),
            S("550 5.1.1 unknown\r\n"),
            C("DATA\r\n"),
            S("354 go\r\n"),
            C("x\r\n.\r\n"),
            S("250 Ok\r\n"),
        ],
    );
    assert!(!s.capabilities().pipelining);
    assert_eq!(statuses(&seen), vec![vec![OK, B]]);
}

#[test]
fn lock_step_waits_for_the_dot_before_the_next_mail() {
    let (_, seen) = run(
        "lockstep",
        vec![txn(&["a@y.test"], "one\n"), txn(&["b@y.test"], "two\n")],
        &[
            GREET,
            EHLO,
            EHLO_PLAIN,
            Submit,
            C("MAIL FROM:<news@sender.test>\r\n"),
            S("250 Ok\r\n"),
            C("RCPT TO:<a@y.test>\r\n"),
            Submit,
            S("250 Ok\r\n"),
            C("DATA\r\n"),
            S("354 go\r\n"),
            C("one\r\n.\r\n"),
            S("250 Ok\r\n"),
            C("MAIL FROM:<news@sender.test>\r\n"),
            S("250 Ok\r\n"),
            C("RCPT TO:<b@y.test>\r\n"),
            S("250 Ok\r\n"),
            C("DATA\r\n"),
            S("354 go\r\n"),
            C("two\r\n.\r\n"),
            S("250 Ok\r\n"),
        ],
    );
    assert_eq!(statuses(&seen), vec![vec![OK], vec![OK]]);
}

#[test]
fn partial_rcpt_rejection_bounces_and_defers_only_those() {
    let (_, seen) = run(
        "partial",
        vec![txn(&["a@y.test", "b@y.test", "c@y.test"], "x\n")],
        &[
            GREET,
            EHLO,
            EHLO_PIPE,
            Submit,
            C(
                "MAIL FROM:<news@sender.test>\r\nRCPT TO:<a@y.test>\r\nRCPT TO:<b@y.test>\r\nRCPT TO:<c@y.test>\r\nDATA\r\n",
            ),
            S("250 Ok\r\n250 Ok\r\n550 5.1.1 no such user\r\n450 4.2.1 busy\r\n354 go\r\n"),
            C("x\r\n.\r\n"),
            S("250 2.0.0 Ok\r\n"),
        ],
    );
    assert_eq!(statuses(&seen), vec![vec![OK, B, D]]);
    assert_eq!(seen.done[0][1].1, "550");
    assert_eq!(seen.done[0][2].1, "450");
}

#[test]
fn all_rcpts_rejected_means_rset_not_data() {
    // Lock-step: DATA is never sent.
    let (_, seen) = run(
        "all-rejected-lockstep",
        vec![txn(&["a@y.test"], "x\n"), txn(&["b@y.test"], "y\n")],
        &[
            GREET,
            EHLO,
            EHLO_PLAIN,
            Submit,
            C("MAIL FROM:<news@sender.test>\r\n"),
            S("250 Ok\r\n"),
            C("RCPT TO:<a@y.test>\r\n"),
            S("550 5.1.1 no\r\n"),
            C("RSET\r\n"),
            Submit,
            C(""),
            S("250 Ok\r\n"),
            C("MAIL FROM:<news@sender.test>\r\n"),
        ],
    );
    assert_eq!(statuses(&seen), vec![vec![B]]);
    // Pipelined: DATA was already sent; the server refuses it and the client resets.
    let (_, seen) = run(
        "all-rejected-pipelined",
        vec![txn(&["a@y.test"], "x\n")],
        &[
            GREET,
            EHLO,
            EHLO_PIPE,
            Submit,
            C("MAIL FROM:<news@sender.test>\r\nRCPT TO:<a@y.test>\r\nDATA\r\n"),
            S("250 Ok\r\n550 5.1.1 no\r\n554 5.5.1 Error: no valid recipients\r\n"),
            C("RSET\r\n"),
            S("250 Ok\r\n"),
        ],
    );
    assert_eq!(statuses(&seen), vec![vec![B]]);
    assert_eq!(seen.done[0][0].1, "550");
}

#[test]
fn mail_refused_in_a_group_decides_every_recipient() {
    let (_, seen) = run(
        "mail-refused",
        vec![txn(&["a@y.test", "b@y.test"], "x\n")],
        &[
            GREET,
            EHLO,
            EHLO_PIPE,
            Submit,
            C("MAIL FROM:<news@sender.test>\r\nRCPT TO:<a@y.test>\r\nRCPT TO:<b@y.test>\r\nDATA\r\n"),
            S("553 5.7.1 sender rejected\r\n503 5.5.1 need MAIL\r\n503 5.5.1 need MAIL\r\n503 5.5.1 need MAIL\r\n"),
        ],
    );
    assert_eq!(statuses(&seen), vec![vec![B, B]]);
    assert_eq!(seen.done[0][1].1, "553");
}

#[test]
fn a_421_mid_group_defers_what_is_in_flight_and_closes() {
    let (s, seen) = run(
        "421",
        vec![txn(&["a@y.test", "b@y.test"], "x\n"), txn(&["c@y.test"], "y\n")],
        &[
            GREET,
            EHLO,
            EHLO_PIPE,
            Submit,
            C("MAIL FROM:<news@sender.test>\r\nRCPT TO:<a@y.test>\r\nRCPT TO:<b@y.test>\r\nDATA\r\n"),
            Submit,
            S("250 Ok\r\n421 4.3.2 shutting down\r\n"),
        ],
    );
    assert!(s.is_closed());
    assert_eq!(statuses(&seen), vec![vec![D, D]]);
    assert_eq!(seen.done[0][0].1, "421");
    assert!(
        seen.done[0][1]
            .1
            .starts_with("failure (closed): server closed the connection: 421"),
        "{:?}",
        seen.done
    );
    assert_eq!(seen.unsent, 1, "the waiting transaction goes back unsent");
}

#[test]
fn transient_and_permanent_data_replies() {
    let (_, seen) = run(
        "data-4xx",
        vec![txn(&["a@y.test"], "x\n")],
        &[
            GREET,
            EHLO,
            EHLO_PIPE,
            Submit,
            C("MAIL FROM:<news@sender.test>\r\nRCPT TO:<a@y.test>\r\nDATA\r\n"),
            S("250 Ok\r\n250 Ok\r\n451 4.3.0 try later\r\n"),
            C("RSET\r\n"),
        ],
    );
    assert_eq!(statuses(&seen), vec![vec![D]]);
    let (_, seen) = run(
        "dot-5xx",
        vec![txn(&["a@y.test"], "x\n")],
        &[
            GREET,
            EHLO,
            EHLO_PIPE,
            Submit,
            C("MAIL FROM:<news@sender.test>\r\nRCPT TO:<a@y.test>\r\nDATA\r\n"),
            S("250 Ok\r\n250 Ok\r\n354 go\r\n"),
            C("x\r\n.\r\n"),
            S("554 5.7.1 spam\r\n"),
        ],
    );
    assert_eq!(statuses(&seen), vec![vec![B]]);
}

#[test]
fn a_250_instead_of_354_is_not_taken_as_delivery() {
    let (_, seen) = run(
        "250-to-data",
        vec![txn(&["a@y.test"], "x\n")],
        &[
            GREET,
            EHLO,
            EHLO_PIPE,
            Submit,
            C("MAIL FROM:<news@sender.test>\r\nRCPT TO:<a@y.test>\r\nDATA\r\n"),
            S("250 Ok\r\n250 Ok\r\n250 Ok\r\n"),
            C("RSET\r\n"),
        ],
    );
    assert_eq!(statuses(&seen), vec![vec![D]]);
}

#[test]
fn multi_line_replies_split_across_reads() {
    let (s, seen) = run(
        "multiline",
        vec![txn(&["a@y.test"], "x\n")],
        &[
            S("220-mx.test first line\r\n220-"),
            S("second\r\n220 third\r\n"),
            EHLO,
            S("250-mx.test\r\n250-SI"),
            S("ZE 1000\r\n250-8BITMIME\r\n250 PIPELINING\r\n"),
            Submit,
            C("MAIL FROM:<news@sender.test> SIZE=6\r\nRCPT TO:<a@y.test>\r\nDATA\r\n"),
            S("250 Ok\r\n250-first\r\n250 second\r\n354 go\r\n"),
            C("x\r\n.\r\n"),
            S("250-2.0.0 Ok\r\n250 2.0.0 queued\r\n"),
        ],
    );
    assert_eq!(s.capabilities().size, Some(1000));
    assert_eq!(statuses(&seen), vec![vec![OK]]);
}

#[test]
fn eight_bit_message_says_body_8bitmime() {
    let (_, seen) = run(
        "8bit",
        vec![txn(&["a@y.test"], "caf\u{e9}\n")],
        &[
            GREET,
            EHLO,
            S("250-mx.test\r\n250-8BITMIME\r\n250 PIPELINING\r\n"),
            Submit,
            C("MAIL FROM:<news@sender.test> BODY=8BITMIME\r\nRCPT TO:<a@y.test>\r\nDATA\r\n"),
            S("250 Ok\r\n250 Ok\r\n354 go\r\n"),
            C("caf\u{e9}\r\n.\r\n"),
            S("250 Ok\r\n"),
        ],
    );
    assert_eq!(statuses(&seen), vec![vec![OK]]);
}

#[test]
fn dot_stuffing_and_bare_lf_on_the_wire() {
    let (_, seen) = run(
        "dots",
        vec![txn(&["a@y.test"], "a\n.\n..b\r\nc\rlast")],
        &[
            GREET,
            EHLO,
            EHLO_PIPE,
            Submit,
            C("MAIL FROM:<news@sender.test>\r\nRCPT TO:<a@y.test>\r\nDATA\r\n"),
            S("250 Ok\r\n250 Ok\r\n354 go\r\n"),
            C("a\r\n..\r\n...b\r\nc\r\nlast\r\n.\r\n"),
            S("250 Ok\r\n"),
        ],
    );
    assert_eq!(statuses(&seen), vec![vec![OK]]);
}

#[test]
fn malformed_and_over_long_replies_defer_and_close() {
    for (name, bad) in [
        ("garbage", "this is not smtp\r\n".to_string()),
        ("too-long", format!("250 {}\r\n", "x".repeat(10_000))),
        ("code-change", "250-a\r\n550 b\r\n".to_string()),
    ] {
        let mut s: Session<Txn> = Session::new("client.test", TlsMode::Off);
        s.feed(b"220 mx\r\n");
        s.feed(b"250-mx\r\n250 PIPELINING\r\n");
        s.submit(txn(&["a@y.test"], "x\n"));
        s.feed(bad.as_bytes());
        assert!(s.is_closed(), "{name}");
        let mut got = None;
        while let Some(e) = s.poll_event() {
            if let Event::Done(r) = e {
                let (st, d) = r.verdict(0);
                got = Some((st, describe(d)));
            }
        }
        let (st, why) = got.expect("the transaction is reported");
        assert_eq!(st, D, "{name}");
        assert!(why.contains("protocol error"), "{name}: {why}");
    }
}

#[test]
fn greeting_refusals() {
    let (s, seen) = run(
        "554",
        vec![],
        &[S("554 5.3.2 no service\r\n"), C("QUIT\r\n"), S("221 bye\r\n")],
    );
    assert!(s.is_closed());
    assert!(seen.failed.unwrap().contains("554"));
    let (s, seen) = run("421", vec![], &[S("421 4.3.2 busy\r\n")]);
    assert!(s.is_closed());
    assert!(seen.failed.unwrap().contains("greeting refused: 421"));
    let (s, seen) = run("ehlo-4xx", vec![], &[GREET, EHLO, S("421 4.3.2 bye\r\n")]);
    assert!(s.is_closed() && !seen.ready && seen.failed.is_some());
}

#[test]
fn connection_lost_reports_in_flight_and_returns_waiting() {
    let mut s: Session<Txn> = Session::new("client.test", TlsMode::Off);
    s.feed(b"220 mx\r\n250-mx\r\n250 PIPELINING\r\n");
    s.submit(txn(&["a@y.test"], "x\n"));
    s.submit(txn(&["b@y.test"], "x\n"));
    s.connection_lost(Local::Closed, "mx.test closed the connection");
    let mut done = 0;
    let mut unsent = 0;
    while let Some(e) = s.poll_event() {
        match e {
            Event::Done(r) => {
                done += 1;
                assert_eq!(
                    r.verdict(0),
                    (D, Decider::Failure(Local::Closed, "mx.test closed the connection"))
                );
            }
            Event::Unsent(_) => unsent += 1,
            _ => {}
        }
    }
    assert_eq!((done, unsent), (1, 1));
    assert!(s.output().is_empty());
}

#[test]
fn unexpected_reply_closes() {
    let (s, _) = run("unexpected", vec![], &[GREET, EHLO, EHLO_PIPE, S("250 surprise\r\n")]);
    assert!(s.is_closed());
}

const EHLO_TLS: Step = S("250-mx.test\r\n250-STARTTLS\r\n250 PIPELINING\r\n");

#[test]
fn starttls_discards_injected_plaintext_and_says_ehlo_again() {
    let (s, seen) = run_tls(
        "starttls",
        TlsMode::Offer,
        vec![txn(&["a@y.test"], "x\n")],
        &[
            GREET,
            EHLO,
            EHLO_TLS,
            C("STARTTLS\r\n"),
            // A man in the middle appends a reply after the 220: it must be ignored.
            S("220 2.0.0 Ready to start TLS\r\n250-injected\r\n250 PIPELINING\r\n"),
            C(""),
            TlsUp,
            EHLO,
            S("250-mx.test\r\n250 PIPELINING\r\n"),
            Submit,
            C("MAIL FROM:<news@sender.test>\r\nRCPT TO:<a@y.test>\r\nDATA\r\n"),
            S("250 Ok\r\n250 Ok\r\n354 go\r\n"),
            C("x\r\n.\r\n"),
            S("250 Ok\r\n"),
        ],
    );
    assert_eq!(seen.starttls, 1);
    assert!(s.is_secure());
    assert!(!s.capabilities().starttls, "capabilities come from the EHLO after TLS");
    assert_eq!(statuses(&seen), vec![vec![OK]]);
}

#[test]
fn tls_policies_when_starttls_is_missing_or_refused() {
    // Required, not offered: no mail in plaintext, QUIT.
    let (s, seen) = run_tls(
        "require-missing",
        TlsMode::Require,
        vec![],
        &[GREET, EHLO, EHLO_PIPE, C("QUIT\r\n"), S("221 bye\r\n")],
    );
    assert!(s.is_closed() && !seen.ready);
    assert!(seen.failed.unwrap().contains("does not offer STARTTLS"));
    // Required, refused.
    let (_, seen) = run_tls(
        "require-refused",
        TlsMode::Require,
        vec![],
        &[
            GREET,
            EHLO,
            EHLO_TLS,
            C("STARTTLS\r\n"),
            S("454 4.7.0 TLS not available\r\n"),
            C("QUIT\r\n"),
        ],
    );
    assert!(!seen.ready);
    assert!(seen.failed.unwrap().contains("454"));
    // Opportunistic, refused: carry on in plaintext.
    let (s, seen) = run_tls(
        "offer-refused",
        TlsMode::Offer,
        vec![],
        &[
            GREET,
            EHLO,
            EHLO_TLS,
            C("STARTTLS\r\n"),
            S("454 4.7.0 TLS not available\r\n"),
        ],
    );
    assert!(seen.ready && !s.is_secure());
    // Off: never asks.
    let (_, seen) = run_tls("off", TlsMode::Off, vec![], &[GREET, EHLO, EHLO_TLS]);
    assert!(seen.ready && seen.starttls == 0);
    // Required with a HELO-only server.
    let (_, seen) = run_tls(
        "require-helo",
        TlsMode::Require,
        vec![],
        &[
            GREET,
            EHLO,
            S("500 no\r\n"),
            C("HELO client.test\r\n"),
            S("250 mx\r\n"),
            C("QUIT\r\n"),
        ],
    );
    assert!(!seen.ready && seen.failed.unwrap().contains("HELO only"));
}

fn creds(allow_plaintext: bool) -> volley::smtp::Credentials {
    volley::smtp::Credentials {
        user: "u".into(),
        password: "p".into(),
        allow_plaintext,
    }
}

/// A session with credentials, fed the steps; returns what it saw.
fn run_auth(name: &str, secure: bool, allow_plaintext: bool, steps: &[Step]) -> (Session<Txn>, Seen) {
    let mut s: Session<Txn> = Session::new("client.test", TlsMode::Off).with_auth(creds(allow_plaintext));
    if secure {
        s = s.implicit_tls();
    }
    let mut seen = Seen::default();
    for (i, step) in steps.iter().enumerate() {
        match step {
            C(want) => {
                assert_eq!(String::from_utf8_lossy(s.output()), *want, "{name}: step {i}");
                let n = s.output().len();
                s.consume_output(n);
            }
            S(reply) => s.feed(reply.as_bytes()),
            _ => unreachable!("only C and S here"),
        }
        while let Some(e) = s.poll_event() {
            match e {
                Event::Ready => seen.ready = true,
                Event::Failed { reason, .. } => seen.failed = Some(reason),
                _ => {}
            }
        }
    }
    (s, seen)
}

#[test]
fn auth_plain_login_and_refusal() {
    // PLAIN preferred; "\0u\0p" is AHUAcA==.
    let (s, seen) = run_auth(
        "plain",
        true,
        false,
        &[
            GREET,
            EHLO,
            S("250-relay\r\n250 AUTH LOGIN PLAIN\r\n"),
            C("AUTH PLAIN AHUAcA==\r\n"),
            S("235 2.7.0 ok\r\n"),
        ],
    );
    assert!(seen.ready && s.is_secure());
    let (_, seen) = run_auth(
        "login",
        true,
        false,
        &[
            GREET,
            EHLO,
            S("250-relay\r\n250 AUTH LOGIN\r\n"),
            C("AUTH LOGIN\r\n"),
            S("334 VXNlcm5hbWU6\r\n"),
            C("dQ==\r\n"),
            S("334 UGFzc3dvcmQ6\r\n"),
            C("cA==\r\n"),
            S("235 2.7.0 ok\r\n"),
        ],
    );
    assert!(seen.ready);
    let (_, seen) = run_auth(
        "refused",
        true,
        false,
        &[
            GREET,
            EHLO,
            S("250-relay\r\n250 AUTH PLAIN\r\n"),
            C("AUTH PLAIN AHUAcA==\r\n"),
            S("535 5.7.8 no\r\n"),
            C("QUIT\r\n"),
        ],
    );
    assert!(!seen.ready && seen.failed.unwrap().contains("535"));
    // No TLS, no plaintext AUTH allowed: never sends the password.
    let (_, seen) = run_auth(
        "no-tls",
        false,
        false,
        &[GREET, EHLO, S("250-relay\r\n250 AUTH PLAIN\r\n"), C("QUIT\r\n")],
    );
    assert!(seen.failed.unwrap().contains("AUTH needs TLS"));
    let (_, seen) = run_auth(
        "plaintext-allowed",
        false,
        true,
        &[
            GREET,
            EHLO,
            S("250-relay\r\n250 AUTH PLAIN\r\n"),
            C("AUTH PLAIN AHUAcA==\r\n"),
            S("235 ok\r\n"),
        ],
    );
    assert!(seen.ready);
}

/// The first transaction is refused before anything of it is written; the
/// next (`b@y.test`) goes.
const REFUSED_UNSENT_THEN_NEXT: &[Step] = &[
    GREET,
    EHLO,
    EHLO_PIPE,
    Submit,
    C(""),
    Submit,
    C("MAIL FROM:<news@sender.test>\r\nRCPT TO:<b@y.test>\r\nDATA\r\n"),
];

#[test]
fn eight_bit_message_to_a_server_without_8bitmime_bounces_unsent() {
    let (_, seen) = run(
        "8bit-refused",
        vec![txn(&["a@y.test"], "caf\u{e9}\n"), txn(&["b@y.test"], "plain\n")],
        REFUSED_UNSENT_THEN_NEXT,
    );
    assert_eq!(statuses(&seen)[0], vec![B]);
    assert!(seen.done[0][0].1.contains("8BITMIME"), "{:?}", seen.done);
}

/// Replies are timed from the write that carried their command, on the
/// driver's clock; pipelined MAIL/RCPT/DATA share the group's write.
#[test]
fn replies_are_timed_from_the_write_that_carried_their_command() {
    use volley::smtp::{Command, TxnTiming};
    let mut s: Session<Txn> = Session::new("client.test", TlsMode::Off);
    let write = |s: &mut Session<Txn>, at: u64| {
        s.set_clock(at);
        let n = s.output().len();
        assert!(n > 0, "something to write at {at}");
        s.consume_output(n);
    };
    let read = |s: &mut Session<Txn>, at: u64, bytes: &str| {
        s.set_clock(at);
        s.feed(bytes.as_bytes());
    };
    read(&mut s, 300, "220 mx.test ESMTP\r\n");
    write(&mut s, 310);
    read(&mut s, 1_310, "250-mx.test\r\n250 PIPELINING\r\n");
    let seen: Vec<_> = s.take_seen().map(|x| (x.command, x.code, x.micros)).collect();
    assert_eq!(seen, [(Command::Greeting, 220, 300), (Command::Ehlo, 250, 1_000)]);
    s.submit(txn(&["a@y.test", "b@y.test"], "one\n"));
    write(&mut s, 2_000); // MAIL, RCPT, RCPT, DATA
    read(&mut s, 2_500, "250 ok\r\n250 ok\r\n");
    read(&mut s, 2_700, "250 ok\r\n354 go\r\n");
    s.submit(txn(&["c@y.test"], "two\n"));
    write(&mut s, 3_000); // body, dot, and the next MAIL, RCPT, DATA
    read(&mut s, 3_400, "250 queued\r\n250 ok\r\n250 ok\r\n354 go\r\n");
    write(&mut s, 3_500); // the second body and dot
    read(&mut s, 3_600, "250 queued\r\n");
    let mut timings = Vec::new();
    while let Some(e) = s.poll_event() {
        if let Event::Done(r) = e {
            timings.push(r.timing);
        }
    }
    assert_eq!(
        timings,
        [
            TxnTiming {
                mail: Some(500),
                rcpt: Some(700),
                data: Some(700),
                dot: Some(400),
            },
            TxnTiming {
                mail: Some(400),
                rcpt: Some(400),
                data: Some(400),
                dot: Some(100),
            },
        ]
    );
}

const EHLO_CHUNK: Step = S("250-mx.test\r\n250-PIPELINING\r\n250-SIZE 1000000\r\n250 CHUNKING\r\n");

fn window(n: usize) -> Extensions {
    Extensions {
        window: n,
        window_max: n,
        ..Extensions::default()
    }
}

/// The BDAT window grows by one for each transaction the server takes
/// whole, up to `window_max`; a recipient's refusal leaves it as it is; a
/// 4xx to BDAT halves it, never below where it started.
#[test]
fn the_bdat_window_grows_while_the_server_keeps_up_and_halves_when_it_pushes_back() {
    let ok = "250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n250 2.0.0 Ok: queued\r\n";
    let (s, seen) = run_ext(
        "bdat window growth",
        Extensions {
            window: 2,
            window_max: 4,
            ..Extensions::default()
        },
        (0..9).map(|_| txn(&["a@y.test"], "x\n")).collect(),
        &[
            GREET,
            EHLO,
            EHLO_CHUNK,
            Submit,
            Submit,
            C(concat!(
                "MAIL FROM:<news@sender.test> SIZE=3\r\nRCPT TO:<a@y.test>\r\nBDAT 3 LAST\r\nx\r\n",
                "MAIL FROM:<news@sender.test> SIZE=3\r\nRCPT TO:<a@y.test>\r\nBDAT 3 LAST\r\nx\r\n"
            )),
            // Two at first; the first accepted whole makes it three: two more go.
            S("250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n250 2.0.0 Ok: queued\r\n"),
            Submit,
            Submit,
            C(concat!(
                "MAIL FROM:<news@sender.test> SIZE=3\r\nRCPT TO:<a@y.test>\r\nBDAT 3 LAST\r\nx\r\n",
                "MAIL FROM:<news@sender.test> SIZE=3\r\nRCPT TO:<a@y.test>\r\nBDAT 3 LAST\r\nx\r\n"
            )),
            // A refused recipient is not the server pushing back: three stays three,
            // so one more goes (three in flight).
            S("250 2.1.0 Ok\r\n550 5.1.1 no such user\r\n554 5.5.1 no valid recipients\r\n"),
            Submit,
            C("MAIL FROM:<news@sender.test> SIZE=3\r\nRCPT TO:<a@y.test>\r\nBDAT 3 LAST\r\nx\r\n"),
            // The third accepted: four (the bound), two in flight: two more go.
            S(ok),
            Submit,
            Submit,
            C(concat!(
                "MAIL FROM:<news@sender.test> SIZE=3\r\nRCPT TO:<a@y.test>\r\nBDAT 3 LAST\r\nx\r\n",
                "MAIL FROM:<news@sender.test> SIZE=3\r\nRCPT TO:<a@y.test>\r\nBDAT 3 LAST\r\nx\r\n"
            )),
            S(ok),
            S(ok),
            // A BDAT put off: four halves to two. One is in flight, so one
            // more goes, and then the window is full.
            S("250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n451 4.3.0 try again later\r\n"),
            Submit,
            C("MAIL FROM:<news@sender.test> SIZE=3\r\nRCPT TO:<a@y.test>\r\nBDAT 3 LAST\r\nx\r\n"),
            Full,
            S(ok),
            Submit,
            C("MAIL FROM:<news@sender.test> SIZE=3\r\nRCPT TO:<a@y.test>\r\nBDAT 3 LAST\r\nx\r\n"),
            S(ok),
            S(ok),
        ],
    );
    assert_eq!(
        statuses(&seen),
        vec![
            vec![OK],
            vec![B],
            vec![OK],
            vec![OK],
            vec![OK],
            vec![D],
            vec![OK],
            vec![OK],
            vec![OK],
        ]
    );
    // Three accepted after the halving: back to the bound.
    assert_eq!(s.window(), 4);
}

/// With CHUNKING and PIPELINING, transactions go out back to back as
/// MAIL, RCPTs and `BDAT n LAST` with the message, unstuffed, up to the
/// window, without waiting for any reply.
#[test]
fn bdat_transactions_fill_the_window_without_waiting() {
    let (_, seen) = run_ext(
        "bdat window",
        window(2),
        vec![
            txn(&["a@y.test", "b@y.test"], "one\n.dot\n"),
            txn(&["c@y.test"], "two\n"),
            txn(&["d@y.test"], "three\n"),
        ],
        &[
            GREET,
            EHLO,
            EHLO_CHUNK,
            Submit,
            Submit,
            C(
                "MAIL FROM:<news@sender.test> SIZE=11\r\nRCPT TO:<a@y.test>\r\nRCPT TO:<b@y.test>\r\nBDAT 11 LAST\r\none\r\n.dot\r\n\
               MAIL FROM:<news@sender.test> SIZE=5\r\nRCPT TO:<c@y.test>\r\nBDAT 5 LAST\r\ntwo\r\n",
            ),
            // The window is full: the third waits for the first to finish.
            S("250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n250 2.1.5 Ok\r\n250 2.0.0 Ok: queued\r\n"),
            Submit,
            C("MAIL FROM:<news@sender.test> SIZE=7\r\nRCPT TO:<d@y.test>\r\nBDAT 7 LAST\r\nthree\r\n"),
            S("250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n250 2.0.0 Ok: queued\r\n"),
            S("250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n250 2.0.0 Ok: queued\r\n"),
            Quit,
            C("QUIT\r\n"),
            S("221 bye\r\n"),
        ],
    );
    assert_eq!(statuses(&seen), vec![vec![OK, OK], vec![OK], vec![OK]]);
}

/// A vectored write takes at most IOV_MAX (1,024) slices: however many
/// chunks wait and however many dots their messages had stuffed, the output
/// written by reference stays under it, and is what copying would give.
#[test]
fn chunks_written_by_reference_stay_within_one_vectored_write() {
    let dotted: String = (0..40).map(|i| format!("line {i}\n.dot {i}\n")).collect();
    for body in ["plain\n.one dot\n", dotted.as_str()] {
        let ext = Extensions {
            window_bytes: usize::MAX,
            ..window(200)
        };
        let mut by_ref = Session::new("client.test", TlsMode::Off).with_extensions(ext);
        let mut copied = Session::new("client.test", TlsMode::Off).with_extensions(ext);
        by_ref.write_by_reference(true);
        for s in [&mut by_ref, &mut copied] {
            s.feed(b"220 mx.test ESMTP\r\n250-mx.test\r\n250-PIPELINING\r\n250 CHUNKING\r\n");
            let n = s.output_len();
            s.consume_output(n);
            for _ in 0..150 {
                assert!(s.wants_txn());
                s.submit(txn(&["a@y.test"], body));
            }
        }
        assert!(
            by_ref.output_slices().len() <= 1024,
            "{} slices",
            by_ref.output_slices().len()
        );
        assert_eq!(pending(&by_ref), copied.output(), "the same bytes either way");
        assert_eq!(by_ref.contiguous_output(), copied.output());
    }
}

/// A server that answers a transaction before reading its chunk (broken or
/// hostile) ends that transaction; the chunk, not written yet, still goes
/// whole (written by reference, it is copied before its message is let go).
#[test]
fn a_bdat_answered_before_its_chunk_is_written_still_sends_the_whole_chunk() {
    let (_, seen) = run_ext(
        "answered early",
        window(2),
        vec![txn(&["a@y.test"], "one\n.dot\n"), txn(&["b@y.test"], "two\n")],
        &[
            GREET,
            EHLO,
            EHLO_CHUNK,
            Submit,
            Submit,
            S("250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n250 2.0.0 Ok: queued\r\n"),
            C(
                "MAIL FROM:<news@sender.test> SIZE=11\r\nRCPT TO:<a@y.test>\r\nBDAT 11 LAST\r\none\r\n.dot\r\n\
               MAIL FROM:<news@sender.test> SIZE=5\r\nRCPT TO:<b@y.test>\r\nBDAT 5 LAST\r\ntwo\r\n",
            ),
            S("250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n250 2.0.0 Ok: queued\r\n"),
            Quit,
            C("QUIT\r\n"),
            S("221 bye\r\n"),
        ],
    );
    assert_eq!(statuses(&seen), vec![vec![OK], vec![OK]]);
}

#[test]
fn bdat_with_every_recipient_refused_bounces_them_and_the_next_goes_on() {
    let (_, seen) = run_ext(
        "bdat refused",
        window(8),
        vec![txn(&["a@y.test", "b@y.test"], "one\n"), txn(&["c@y.test"], "two\n")],
        &[
            GREET,
            EHLO,
            EHLO_CHUNK,
            Submit,
            Submit,
            C(
                "MAIL FROM:<news@sender.test> SIZE=5\r\nRCPT TO:<a@y.test>\r\nRCPT TO:<b@y.test>\r\nBDAT 5 LAST\r\none\r\n\
               MAIL FROM:<news@sender.test> SIZE=5\r\nRCPT TO:<c@y.test>\r\nBDAT 5 LAST\r\ntwo\r\n",
            ),
            S("250 2.1.0 Ok\r\n550 5.1.1 no\r\n450 4.2.1 later\r\n554 5.5.1 Error: no valid recipients\r\n"),
            // The server reset the failed transaction (as Postfix does): the next one is fine.
            S("250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n250 2.0.0 Ok: queued\r\n"),
        ],
    );
    assert_eq!(statuses(&seen), vec![vec![B, D], vec![OK]]);
    assert_eq!(seen.done[0][0].1, "550");
}

/// A server that keeps the transaction whose BDAT failed answers the next
/// MAIL with 503: that transaction is deferred, not bounced, and RSET goes
/// before the next MAIL.
#[test]
fn a_503_to_mail_after_a_failed_bdat_is_retried_after_rset() {
    let (_, seen) = run_ext(
        "bdat 503",
        window(8),
        vec![
            txn(&["a@y.test"], "one\n"),
            txn(&["c@y.test"], "two\n"),
            txn(&["e@y.test"], "three\n"),
        ],
        &[
            GREET,
            EHLO,
            EHLO_CHUNK,
            Submit,
            Submit,
            C(
                "MAIL FROM:<news@sender.test> SIZE=5\r\nRCPT TO:<a@y.test>\r\nBDAT 5 LAST\r\none\r\n\
               MAIL FROM:<news@sender.test> SIZE=5\r\nRCPT TO:<c@y.test>\r\nBDAT 5 LAST\r\ntwo\r\n",
            ),
            S("250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n552 5.3.4 message too big\r\n"),
            S("503 5.5.1 Error: nested MAIL command\r\n503 5.5.1 Error: need MAIL\r\n503 5.5.1 Error: need MAIL\r\n"),
            Submit,
            C("RSET\r\nMAIL FROM:<news@sender.test> SIZE=7\r\nRCPT TO:<e@y.test>\r\nBDAT 7 LAST\r\nthree\r\n"),
            S("250 2.0.0 Ok\r\n250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n250 2.0.0 Ok: queued\r\n"),
        ],
    );
    assert_eq!(statuses(&seen), vec![vec![B], vec![D], vec![OK]]);
    assert!(seen.done[1][0].1.contains("after a failed BDAT"), "{:?}", seen.done[1]);
}

#[test]
fn a_421_in_a_bdat_window_defers_the_rest_and_closes() {
    let (s, seen) = run_ext(
        "bdat 421",
        window(8),
        vec![
            txn(&["a@y.test"], "one\n"),
            txn(&["c@y.test"], "two\n"),
            txn(&["e@y.test"], "three\n"),
        ],
        &[
            GREET,
            EHLO,
            EHLO_CHUNK,
            Submit,
            Submit,
            Submit,
            C(
                "MAIL FROM:<news@sender.test> SIZE=5\r\nRCPT TO:<a@y.test>\r\nBDAT 5 LAST\r\none\r\n\
               MAIL FROM:<news@sender.test> SIZE=5\r\nRCPT TO:<c@y.test>\r\nBDAT 5 LAST\r\ntwo\r\n\
               MAIL FROM:<news@sender.test> SIZE=7\r\nRCPT TO:<e@y.test>\r\nBDAT 7 LAST\r\nthree\r\n",
            ),
            S("250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n250 2.0.0 Ok: queued\r\n421 4.3.2 shutting down\r\n"),
        ],
    );
    assert_eq!(statuses(&seen), vec![vec![OK], vec![D], vec![D]]);
    assert!(s.is_closed());
}

#[test]
fn chunking_or_pipelining_turned_off_falls_back() {
    // CHUNKING off: DATA, pipelined.
    let (_, seen) = run_ext(
        "no chunking",
        Extensions {
            chunking: false,
            ..Extensions::default()
        },
        vec![txn(&["a@y.test"], "one\n")],
        &[
            GREET,
            EHLO,
            EHLO_CHUNK,
            Submit,
            C("MAIL FROM:<news@sender.test> SIZE=8\r\nRCPT TO:<a@y.test>\r\nDATA\r\n"),
            S("250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n354 go\r\n"),
            C("one\r\n.\r\n"),
            S("250 2.0.0 Ok: queued\r\n"),
        ],
    );
    assert_eq!(statuses(&seen), vec![vec![OK]]);
    // PIPELINING off: lock-step DATA, even with CHUNKING offered (BDAT needs both here).
    let (_, seen) = run_ext(
        "lock-step",
        Extensions {
            pipelining: false,
            ..Extensions::default()
        },
        vec![txn(&["a@y.test"], "one\n")],
        &[
            GREET,
            EHLO,
            EHLO_CHUNK,
            Submit,
            C("MAIL FROM:<news@sender.test> SIZE=8\r\n"),
            S("250 2.1.0 Ok\r\n"),
            C("RCPT TO:<a@y.test>\r\n"),
            S("250 2.1.5 Ok\r\n"),
            C("DATA\r\n"),
            S("354 go\r\n"),
            C("one\r\n.\r\n"),
            S("250 2.0.0 Ok: queued\r\n"),
        ],
    );
    assert_eq!(statuses(&seen), vec![vec![OK]]);
    // CHUNKING offered without PIPELINING: DATA in lock-step.
    let (_, seen) = run(
        "chunking alone",
        vec![txn(&["a@y.test"], "one\n")],
        &[
            GREET,
            EHLO,
            S("250-mx.test\r\n250 CHUNKING\r\n"),
            Submit,
            C("MAIL FROM:<news@sender.test>\r\n"),
            S("250 2.1.0 Ok\r\n"),
            C("RCPT TO:<a@y.test>\r\n"),
            S("250 2.1.5 Ok\r\n"),
            C("DATA\r\n"),
            S("354 go\r\n"),
            C("one\r\n.\r\n"),
            S("250 2.0.0 Ok: queued\r\n"),
        ],
    );
    assert_eq!(statuses(&seen), vec![vec![OK]]);
}

/// The byte window: a transaction that would put more message bytes in
/// flight than `window_bytes` waits for earlier ones; alone, any size goes.
#[test]
fn bdat_byte_window_holds_back_what_would_overflow_it() {
    let (_, seen) = run_ext(
        "bdat bytes",
        Extensions {
            window_bytes: 8,
            ..Extensions::default()
        },
        vec![txn(&["a@y.test"], "one\n"), txn(&["c@y.test"], "a bigger one\n")],
        &[
            GREET,
            EHLO,
            EHLO_CHUNK,
            Submit,
            C("MAIL FROM:<news@sender.test> SIZE=5\r\nRCPT TO:<a@y.test>\r\nBDAT 5 LAST\r\none\r\n"),
            // 5 + 14 bytes would pass 8: the second waits, though the count window has room.
            Submit,
            S("250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n250 2.0.0 Ok: queued\r\n"),
            C("MAIL FROM:<news@sender.test> SIZE=14\r\nRCPT TO:<c@y.test>\r\nBDAT 14 LAST\r\na bigger one\r\n"),
            S("250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n250 2.0.0 Ok: queued\r\n"),
        ],
    );
    assert_eq!(statuses(&seen), vec![vec![OK], vec![OK]]);
}

#[test]
fn a_utf8_address_says_smtputf8_where_the_server_offers_it() {
    let (_, seen) = run(
        "smtputf8",
        vec![txn(&["j\u{f6}rg@b\u{fc}cher.test"], "Subject: hi\n\nhallo\n")],
        &[
            GREET,
            EHLO,
            S("250-mx.test\r\n250-SMTPUTF8\r\n250 PIPELINING\r\n"),
            Submit,
            C("MAIL FROM:<news@sender.test> SMTPUTF8\r\nRCPT TO:<j\u{f6}rg@b\u{fc}cher.test>\r\nDATA\r\n"),
            S("250 Ok\r\n250 Ok\r\n354 go\r\n"),
            C("Subject: hi\r\n\r\nhallo\r\n.\r\n"),
            S("250 Ok\r\n"),
        ],
    );
    assert_eq!(statuses(&seen), vec![vec![OK]]);
}

#[test]
fn a_utf8_address_to_a_server_without_smtputf8_bounces_unsent_and_the_next_goes() {
    let (_, seen) = run(
        "smtputf8-refused",
        vec![txn(&["j\u{f6}rg@y.test"], "plain\n"), txn(&["b@y.test"], "plain\n")],
        REFUSED_UNSENT_THEN_NEXT,
    );
    assert_eq!(statuses(&seen)[0], vec![B]);
    assert!(
        seen.done[0][0]
            .1
            .starts_with("failure (smtputf8): address \"j\u{f6}rg@y.test\" needs SMTPUTF8"),
        "{:?}",
        seen.done
    );
}

#[test]
fn an_address_that_cannot_go_on_a_command_line_bounces_unsent_and_the_next_goes() {
    let long: &'static str = Box::leak(format!("{}@y.test", "a".repeat(250)).into_boxed_str());
    for bad in [
        "a b@y.test",
        "a@y.test>\r\nRSET",
        "a>@y.test",
        "<a@y.test",
        "a\x7f@y.test",
        long,
    ] {
        let (_, seen) = run(
            "unsafe-address",
            vec![txn(&["ok@y.test", bad], "plain\n"), txn(&["b@y.test"], "plain\n")],
            REFUSED_UNSENT_THEN_NEXT,
        );
        assert_eq!(statuses(&seen)[0], vec![B, B], "{bad:?}");
        assert!(
            seen.done[0][1].1.contains("cannot be written on an SMTP command line"),
            "{bad:?}: {:?}",
            seen.done
        );
    }
}

#[test]
fn an_ascii_local_part_at_a_utf8_domain_goes_by_the_a_label_without_smtputf8() {
    let (_, seen) = run(
        "idna",
        vec![txn(&["leser@b\u{fc}cher.test"], "plain\n")],
        &[
            GREET,
            EHLO,
            EHLO_PIPE,
            Submit,
            C("MAIL FROM:<news@sender.test>\r\nRCPT TO:<leser@xn--bcher-kva.test>\r\nDATA\r\n"),
            S("250 Ok\r\n250 Ok\r\n354 go\r\n"),
            C("plain\r\n.\r\n"),
            S("250 Ok\r\n"),
        ],
    );
    assert_eq!(statuses(&seen), vec![vec![OK]]);
}

#[test]
fn an_8bit_message_goes_in_its_7bit_form_to_a_server_without_8bitmime() {
    let mut t = txn(&["a@y.test"], "caf\u{e9}\n");
    t.seven = Some(WireMessage::prepare(
        b"Content-Transfer-Encoding: quoted-printable\n\ncaf=C3=A9\n",
    ));
    for chunking in [false, true] {
        let t = Txn {
            from: t.from,
            rcpts: t.rcpts.clone(),
            wire: t.wire.clone(),
            seven: t.seven.clone(),
        };
        let steps: &[Step] = if chunking {
            &[
                GREET,
                EHLO,
                S("250-mx.test\r\n250-PIPELINING\r\n250 CHUNKING\r\n"),
                Submit,
                C(
                    "MAIL FROM:<news@sender.test>\r\nRCPT TO:<a@y.test>\r\nBDAT 58 LAST\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\ncaf=C3=A9\r\n",
                ),
                S("250 Ok\r\n250 Ok\r\n250 Ok\r\n"),
            ]
        } else {
            &[
                GREET,
                EHLO,
                EHLO_PIPE,
                Submit,
                C("MAIL FROM:<news@sender.test>\r\nRCPT TO:<a@y.test>\r\nDATA\r\n"),
                S("250 Ok\r\n250 Ok\r\n354 go\r\n"),
                C("Content-Transfer-Encoding: quoted-printable\r\n\r\ncaf=C3=A9\r\n.\r\n"),
                S("250 Ok\r\n"),
            ]
        };
        let (_, seen) = run("7bit", vec![t], steps);
        assert_eq!(statuses(&seen), vec![vec![OK]], "chunking {chunking}");
    }
}

#[test]
fn utf8_headers_say_smtputf8_where_the_server_offers_it() {
    let (_, seen) = run(
        "utf8-headers",
        vec![txn(&["a@y.test"], "Subject: Gr\u{fc}\u{df}e\n\nplain\n")],
        &[
            GREET,
            EHLO,
            S("250-mx.test\r\n250-8BITMIME\r\n250-SMTPUTF8\r\n250 PIPELINING\r\n"),
            Submit,
            C("MAIL FROM:<news@sender.test> BODY=8BITMIME SMTPUTF8\r\nRCPT TO:<a@y.test>\r\nDATA\r\n"),
            S("250 Ok\r\n250 Ok\r\n354 go\r\n"),
            C("Subject: Gr\u{fc}\u{df}e\r\n\r\nplain\r\n.\r\n"),
            S("250 Ok\r\n"),
        ],
    );
    assert_eq!(statuses(&seen), vec![vec![OK]]);
}
