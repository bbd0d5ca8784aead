//! The SMTP client session as a pure state machine (sans-IO): it is fed reply
//! bytes, hands out bytes to write, and returns each transaction with its
//! replies. No sockets, clocks or runtime here; the driver owns those.
//!
//! With PIPELINING (RFC 2920) MAIL, every RCPT and DATA go out as one group,
//! and the next transaction's group follows the message body and its final dot
//! in the same write, so a message costs one round trip. With CHUNKING (RFC
//! 3030) as well, each transaction is MAIL, RCPTs and `BDAT n LAST` with the
//! message in one go, and up to `window` transactions are in flight at once,
//! so a connection no longer waits a round trip per message. Without
//! PIPELINING each command waits for its reply (lock-step).

use std::collections::VecDeque;
use std::io::Write;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use smallvec::SmallVec;

use super::caps::Capabilities;
use super::reply::{Reply, ReplyParser};
use super::wire::WireMessage;
use crate::local::{Failure, Local};

/// What the engine needs to know of a transaction; the shard's type implements it.
pub trait Envelope {
    /// The reverse-path without angle brackets; empty for the null path `<>`.
    fn reverse_path(&self) -> &str;
    fn recipient_count(&self) -> usize;
    fn recipient(&self, i: usize) -> &str;
    /// The message prepared for the wire (for DATA and for BDAT).
    fn message(&self) -> &WireMessage;
    /// The message in 7 bits (8-bit parts in quoted-printable, RFC 6152
    /// §3) for a server without 8BITMIME, or why there is none.
    fn seven_bit(&self) -> Result<&WireMessage, &str> {
        Err("it is not converted")
    }
}

/// What goes on the wire for `t` with `caps`: its 7-bit form where the
/// server takes no 8-bit and one exists.
fn body_of<'t, T: Envelope>(caps: &Capabilities, t: &'t T) -> &'t WireMessage {
    let m = t.message();
    if m.eight_bit && !caps.eight_bit_mime {
        t.seven_bit().unwrap_or(m)
    } else {
        m
    }
}

/// What the session is waiting for; the driver maps it to an RFC 5321 §4.5.3.2 timeout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wait {
    Greeting,
    Ehlo,
    StartTls,
    Mail,
    Rcpt,
    DataInit,
    DataTerm,
    Rset,
    Quit,
}

/// The fate of one recipient in one attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Status {
    Delivered,
    Bounced,
    Deferred,
}

/// What decided a recipient's status: a server reply, or a local failure
/// (connection lost, timeout, protocol error) with its reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decider<'a> {
    Reply(&'a Reply),
    /// volley's own failure: its kind and its reason.
    Failure(Local, &'a str),
}

/// A finished transaction with every reply it got.
#[derive(Debug)]
pub struct TxnReport<T> {
    pub txn: T,
    pub mail: Option<Reply>,
    /// One slot per recipient, inline for one (the usual newsletter
    /// transaction): no allocation, and on the cache line of its report.
    pub rcpts: SmallVec<[Option<Reply>; 1]>,
    pub data: Option<Reply>,
    pub dot: Option<Reply>,
    /// Set when the transaction ended before all its replies came.
    pub failure: Option<Failure>,
    /// The failure is permanent (the message cannot go to this server as it is).
    pub permanent: bool,
    /// How long its replies took.
    pub timing: TxnTiming,
    /// Sent with BDAT: no DATA reply; `dot` holds the reply to `BDAT n LAST`.
    pub chunked: bool,
}

/// How long a transaction's replies took, in microseconds of the driver's
/// clock, each from the write that carried its command. With PIPELINING,
/// MAIL, RCPT and DATA go out in one write: each is then timed from that
/// group's write, so `rcpt` and `data` include the replies before them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TxnTiming {
    pub mail: Option<u64>,
    /// To the reply of the last RCPT.
    pub rcpt: Option<u64>,
    pub data: Option<u64>,
    /// From the write that carried the end of the body to the reply to the final dot.
    pub dot: Option<u64>,
}

/// What a reply answers. Set-up and session commands come back as `Seen`;
/// a transaction's replies (MAIL, RCPT, DATA, the final dot) in its `TxnReport`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Command {
    /// The server's greeting (no command: timed from the connection).
    Greeting,
    Ehlo,
    Helo,
    StartTls,
    Auth,
    Rset,
    Quit,
    Mail,
    Rcpt,
    Data,
    /// The end of the message (the final dot).
    Dot,
    /// `BDAT n LAST` with the message.
    Bdat,
}

impl Command {
    pub const ALL: [Command; 12] = [
        Command::Greeting,
        Command::Ehlo,
        Command::Helo,
        Command::StartTls,
        Command::Auth,
        Command::Rset,
        Command::Quit,
        Command::Mail,
        Command::Rcpt,
        Command::Data,
        Command::Dot,
        Command::Bdat,
    ];
    pub fn name(self) -> &'static str {
        match self {
            Command::Greeting => "greeting",
            Command::Ehlo => "ehlo",
            Command::Helo => "helo",
            Command::StartTls => "starttls",
            Command::Auth => "auth",
            Command::Rset => "rset",
            Command::Quit => "quit",
            Command::Mail => "mail",
            Command::Rcpt => "rcpt",
            Command::Data => "data",
            Command::Dot => "dot",
            Command::Bdat => "bdat",
        }
    }
}

/// A reply to a command outside transactions, and how long it took (µs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seen {
    pub command: Command,
    pub code: u16,
    pub enhanced: Option<super::Enhanced>,
    pub micros: u64,
}

impl<T> TxnReport<T> {
    /// The status of recipient `i` and what decided it.
    pub fn verdict(&self, i: usize) -> (Status, Decider<'_>) {
        fn by_reply(r: &Reply) -> (Status, Decider<'_>) {
            let status = if r.is_permanent() {
                Status::Bounced
            } else {
                Status::Deferred
            };
            (status, Decider::Reply(r))
        }
        let failure = || {
            let status = if self.permanent {
                Status::Bounced
            } else {
                Status::Deferred
            };
            let decider = match &self.failure {
                Some(f) => Decider::Failure(f.kind, &f.reason),
                None => Decider::Failure(Local::Protocol, "no reply"),
            };
            (status, decider)
        };
        match &self.mail {
            None => return failure(),
            Some(r) if !r.is_positive() => return by_reply(r),
            Some(_) => {}
        }
        match self.rcpts.get(i).and_then(Option::as_ref) {
            None => return failure(),
            Some(r) if !r.is_positive() => return by_reply(r),
            Some(_) => {}
        }
        match &self.data {
            None if self.chunked => {}
            None => return failure(),
            Some(r) if r.code != 354 => return by_reply(r),
            Some(_) => {}
        }
        match &self.dot {
            None => failure(),
            Some(r) if r.is_positive() => (Status::Delivered, Decider::Reply(r)),
            Some(r) => by_reply(r),
        }
    }

    fn accepted(&self) -> usize {
        self.rcpts.iter().flatten().filter(|r| r.is_positive()).count()
    }
}

/// What the session does about STARTTLS (RFC 3207).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsMode {
    /// Never send STARTTLS.
    Off,
    /// Send STARTTLS when the server offers it; go on in plaintext otherwise.
    Offer,
    /// Send STARTTLS or give up: never send mail in plaintext.
    Require,
}

/// Credentials for SMTP AUTH (RFC 4954) with a relay.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub user: String,
    pub password: String,
    /// Allow AUTH without TLS (the password then crosses the wire in clear).
    pub allow_plaintext: bool,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Credentials {{ user: {:?}, password: <hidden> }}", self.user)
    }
}

#[derive(Debug)]
pub enum Event<T> {
    /// EHLO (or HELO) succeeded; transactions may be submitted.
    Ready,
    /// The server agreed to STARTTLS: the driver must run the TLS handshake
    /// on the connection, then call `tls_established` (or `connection_lost`).
    StartTls,
    /// A transaction finished, well or not (boxed from its start: it moves
    /// from flight to event to its settling without copying).
    Done(Box<TxnReport<T>>),
    /// A submitted transaction that never went on the wire (the session ended first).
    Unsent(T),
    /// The session could not be set up (greeting or EHLO/HELO refused, or lost before it was ready).
    Failed {
        reason: String,
        reply: Option<Reply>,
        /// What went wrong when no reply says it.
        kind: Local,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Greeting,
    Ehlo,
    Helo,
    StartTls,
    Handshake,
    Auth,
    Ready,
    Quitting,
    Closed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    Greeting,
    Ehlo,
    Helo,
    StartTls,
    AuthDone,
    AuthLoginUser,
    AuthLoginPassword,
    Mail(u64),
    Rcpt(u64, usize),
    Data(u64),
    Dot(u64),
    Bdat(u64),
    Rset,
    Quit,
}

#[derive(Debug, PartialEq, Eq)]
enum Stage {
    Envelope,
    Body,
}

struct Flight<T> {
    seq: u64,
    stage: Stage,
    /// Its message's bytes counted against `window_bytes` (BDAT), else 0.
    chunk: usize,
    report: Box<TxnReport<T>>,
}

/// Chunks written by reference at once, and the parts one may have: the
/// slices of [`Session::output_slices`] stay under 600.
const MAX_REFS: usize = 64;
const MAX_REF_PARTS: usize = 8;

/// A BDAT chunk written by reference: the message of flight `seq` (`len`
/// bytes as BDAT sends it), to go after the first `at` bytes of the output.
struct ChunkRef {
    at: usize,
    len: usize,
    seq: u64,
}

/// Not written yet (the `sent` time of a command still in the output buffer).
const UNSENT: u64 = u64::MAX;

/// The replies awaited, in order, each with the time its command was written.
#[derive(Default)]
struct Awaited {
    q: VecDeque<(Expect, u64)>,
}

impl Awaited {
    #[inline]
    fn push_back(&mut self, e: Expect) {
        self.q.push_back((e, UNSENT));
    }
    #[inline]
    fn pop_front(&mut self) -> Option<(Expect, u64)> {
        self.q.pop_front()
    }
    fn front(&self) -> Option<&Expect> {
        self.q.front().map(|(e, _)| e)
    }
    fn clear(&mut self) {
        self.q.clear();
    }
    fn is_empty(&self) -> bool {
        self.q.is_empty()
    }
    /// The commands in the output buffer went out at `now`.
    fn written(&mut self, now: u64) {
        for (_, sent) in self.q.iter_mut().rev() {
            if *sent != UNSENT {
                break;
            }
            *sent = now;
        }
    }
}

/// The longest address written between `<` and `>` (RFC 5321 §4.5.3.1.3
/// allows a path of 256 octets with its brackets).
const MAX_ADDRESS: usize = 254;

/// Whether an ASCII byte may stand inside `<…>` on a command line: no space,
/// control character, `<` or `>`.
fn line_byte(b: u8) -> bool {
    b.is_ascii_graphic() && b != b'<' && b != b'>'
}

/// Whether `addr` can go inside `<…>` on a command line (UTF-8 only on a
/// session with SMTPUTF8, checked apart).
fn command_safe(addr: &str) -> bool {
    // Byte by byte: every byte of a UTF-8 character past ASCII is above 127.
    addr.len() <= MAX_ADDRESS && addr.bytes().all(|b| !b.is_ascii() || line_byte(b))
}

/// `RCPT TO:<addr>` and its line end.
fn rcpt_to(out: &mut Vec<u8>, addr: &str, plain: bool) {
    out.extend_from_slice(b"RCPT TO:<");
    put_address(out, addr, plain);
    out.extend_from_slice(b">\r\n");
}

/// An address as it goes on the wire: a UTF-8 domain after an ASCII local
/// part becomes its A-label (IDNA), which needs no SMTPUTF8; anything else
/// as it is.
fn wire_address(addr: &str) -> std::borrow::Cow<'_, str> {
    if addr.is_ascii() {
        return addr.into();
    }
    match addr.rsplit_once('@') {
        Some((local, domain)) if local.is_ascii() => match idna::domain_to_ascii(domain) {
            Ok(a) => format!("{local}@{a}").into(),
            Err(_) => addr.into(),
        },
        _ => addr.into(),
    }
}

/// Whether every address of the envelope is ASCII that can go on a command
/// line as it is (the usual case), told in one pass over each: such an
/// envelope needs neither SMTPUTF8 nor a closer look.
fn plain_envelope(from: &str, rcpts: &[&str]) -> bool {
    // Without short-circuit, so it runs a vector at a time.
    let plain = |a: &str| a.len() <= MAX_ADDRESS && a.bytes().fold(true, |ok, b| ok & line_byte(b));
    plain(from) && rcpts.iter().all(|a| plain(a))
}

/// An address on a command line: as it is when the envelope is plain (ASCII
/// throughout), else in its wire form.
fn put_address(out: &mut Vec<u8>, addr: &str, plain: bool) {
    if plain {
        out.extend_from_slice(addr.as_bytes());
    } else {
        out.extend_from_slice(wire_address(addr).as_bytes());
    }
}

/// Whether a transaction's envelope has an address that stays UTF-8 on the wire (RFC 6531).
fn needs_smtputf8(from: &str, rcpts: &[&str]) -> bool {
    std::iter::once(from)
        .chain(rcpts.iter().copied())
        .any(|a| !wire_address(a).is_ascii())
}

fn push_command(out: &mut Vec<u8>, expects: &mut Awaited, cmd: std::fmt::Arguments<'_>, expect: Expect) {
    out.write_fmt(cmd).expect("writing to a Vec cannot fail");
    out.extend_from_slice(b"\r\n");
    expects.push_back(expect);
}

/// With DATA: at most one transaction awaiting its envelope replies and one awaiting its final dot.
const DATA_FLIGHTS: usize = 2;

/// Which extensions the session may use when the server offers them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extensions {
    pub pipelining: bool,
    pub chunking: bool,
    /// Transactions in flight at once with CHUNKING (BDAT), to start with.
    pub window: usize,
    /// What the window may grow to while the server keeps up: each
    /// transaction it accepts whole widens it by one (so it doubles each
    /// round trip), one it refuses with a temporary failure to MAIL or BDAT
    /// (or a 421) halves it, never below `window`. Equal to `window`: no growth.
    pub window_max: usize,
    /// Message bytes in flight at once with CHUNKING: a transaction that would
    /// pass it waits for earlier ones (unless nothing is in flight), so big
    /// messages do not fill the output buffer eightfold.
    pub window_bytes: usize,
}

impl Default for Extensions {
    fn default() -> Self {
        Extensions {
            pipelining: true,
            chunking: true,
            window: 8,
            window_max: 8,
            window_bytes: 1 << 20,
        }
    }
}

pub struct Session<T> {
    ehlo_name: String,
    tls: TlsMode,
    auth: Option<Credentials>,
    /// TLS is up (after STARTTLS and the handshake).
    secure: bool,
    phase: Phase,
    caps: Capabilities,
    parser: ReplyParser,
    replies: VecDeque<Reply>,
    expects: Awaited,
    out: Vec<u8>,
    /// BDAT chunks written by reference: not copied into `out` but sent
    /// from the transaction's own message (see [`Session::write_by_reference`]).
    by_reference: bool,
    refs: Vec<ChunkRef>,
    /// The driver's clock (µs since the connection was established).
    now: u64,
    /// Replies to set-up commands, for the driver's metrics.
    seen: Vec<Seen>,
    flights: VecDeque<Flight<T>>,
    /// The `chunk` bytes of the flights, summed as they come and go.
    in_flight_bytes: usize,
    waiting: Option<T>,
    events: VecDeque<Event<T>>,
    next_seq: u64,
    quit_requested: bool,
    ext: Extensions,
    /// A BDAT failed on this connection: a server that kept that transaction
    /// answers the next MAIL with 503, which must not bounce anyone.
    bdat_failed: bool,
    /// RSET goes before the next MAIL.
    rset_first: bool,
    /// The BDAT window now, between `ext.window` and `ext.window_max`.
    window: usize,
}

impl<T: Envelope> Session<T> {
    pub fn new(ehlo_name: &str, tls: TlsMode) -> Self {
        Session {
            ehlo_name: ehlo_name.to_string(),
            tls,
            auth: None,
            secure: false,
            phase: Phase::Greeting,
            caps: Capabilities::default(),
            parser: ReplyParser::new(),
            replies: VecDeque::new(),
            // The greeting is timed from the connection (time 0).
            expects: Awaited {
                q: VecDeque::from([(Expect::Greeting, 0)]),
            },
            out: Vec::with_capacity(4096),
            by_reference: false,
            refs: Vec::new(),
            now: 0,
            seen: Vec::new(),
            flights: VecDeque::new(),
            in_flight_bytes: 0,
            waiting: None,
            events: VecDeque::new(),
            next_seq: 0,
            quit_requested: false,
            ext: Extensions::default(),
            bdat_failed: false,
            rset_first: false,
            window: Extensions::default().window,
        }
    }

    /// Limits the extensions used (for lock-step or DATA-only sending, and the window).
    pub fn with_extensions(mut self, ext: Extensions) -> Self {
        self.ext = ext;
        self.window = ext.window.max(1);
        self
    }

    /// Transactions that may be in flight at once with BDAT now.
    pub fn window(&self) -> usize {
        self.window
    }

    /// Transactions go out with BDAT (CHUNKING and PIPELINING offered and allowed).
    pub fn is_chunking(&self) -> bool {
        self.caps.chunking && self.caps.pipelining
    }

    fn max_flights(&self) -> usize {
        if self.is_chunking() { self.window } else { DATA_FLIGHTS }
    }

    /// Authenticates (AUTH PLAIN, else LOGIN) after EHLO, and after TLS
    /// unless the credentials allow plaintext.
    pub fn with_auth(mut self, credentials: Credentials) -> Self {
        self.auth = Some(credentials);
        self
    }

    /// The connection is TLS from its first byte (port 465, RFC 8314): no STARTTLS.
    pub fn implicit_tls(mut self) -> Self {
        self.secure = true;
        self
    }

    pub fn capabilities(&self) -> &Capabilities {
        &self.caps
    }
    pub fn is_ready(&self) -> bool {
        self.phase == Phase::Ready
    }
    pub fn is_closed(&self) -> bool {
        self.phase == Phase::Closed
    }
    /// TLS was negotiated with STARTTLS.
    pub fn is_secure(&self) -> bool {
        self.secure
    }
    /// Nothing submitted, nothing in flight, no reply awaited.
    pub fn is_idle(&self) -> bool {
        self.flights.is_empty() && self.waiting.is_none() && self.expects.is_empty()
    }
    /// True when a transaction handed in now would go out without delay.
    pub fn wants_txn(&self) -> bool {
        self.phase == Phase::Ready
            && !self.quit_requested
            && self.waiting.is_none()
            && self.flights.len() < self.max_flights()
    }
    /// Which reply the session waits for, if any.
    pub fn waiting_for(&self) -> Option<Wait> {
        self.expects.front().map(|e| match e {
            Expect::Greeting => Wait::Greeting,
            Expect::Ehlo | Expect::Helo => Wait::Ehlo,
            Expect::StartTls => Wait::StartTls,
            Expect::AuthDone | Expect::AuthLoginUser | Expect::AuthLoginPassword => Wait::Ehlo,
            Expect::Mail(_) => Wait::Mail,
            Expect::Rcpt(..) => Wait::Rcpt,
            Expect::Data(_) => Wait::DataInit,
            Expect::Dot(_) | Expect::Bdat(_) => Wait::DataTerm,
            Expect::Rset => Wait::Rset,
            Expect::Quit => Wait::Quit,
        })
    }

    /// Bytes to write to the server (with no chunk written by reference
    /// pending: see [`Session::contiguous_output`]).
    pub fn output(&self) -> &[u8] {
        debug_assert!(
            self.refs.is_empty(),
            "output() with chunks written by reference pending"
        );
        &self.out
    }
    /// Whether BDAT chunks written by reference wait in the output.
    pub fn has_chunks_by_reference(&self) -> bool {
        !self.refs.is_empty()
    }
    /// Whether anything waits to be written.
    pub fn has_output(&self) -> bool {
        !self.out.is_empty() || !self.refs.is_empty()
    }
    /// Bytes to write to the server, the chunks written by reference copied in.
    pub fn contiguous_output(&mut self) -> &[u8] {
        self.flatten();
        &self.out
    }
    /// The output as slices, in order: the commands' bytes and, for each
    /// chunk written by reference, its message's own bytes (no copy).
    pub fn output_slices(&self) -> SmallVec<[std::io::IoSlice<'_>; 64]> {
        let mut parts = SmallVec::new();
        let mut start = 0;
        for r in &self.refs {
            if r.at > start {
                parts.push(std::io::IoSlice::new(&self.out[start..r.at]));
            }
            start = r.at;
            for part in self.referenced(r.seq).chunk_parts() {
                parts.push(std::io::IoSlice::new(part));
            }
        }
        if self.out.len() > start {
            parts.push(std::io::IoSlice::new(&self.out[start..]));
        }
        parts
    }
    /// `n` bytes of the output were written (at the time last given to `set_clock`).
    pub fn consume_output(&mut self, n: usize) {
        if !self.refs.is_empty() {
            if n == self.output_len() {
                self.refs.clear();
                self.out.clear();
            } else {
                // Part of it went: what is left is copied together and written on.
                self.flatten();
            }
        }
        self.out.drain(..n.min(self.out.len()));
        if self.out.is_empty() {
            self.expects.written(self.now);
        }
    }
    /// Bytes waiting to be written, the chunks written by reference included.
    pub fn output_len(&self) -> usize {
        self.out.len() + self.refs.iter().map(|r| r.len).sum::<usize>()
    }
    /// BDAT chunks are left in their transactions' messages and given by
    /// [`Session::output_slices`] instead of copied into the output (for a
    /// driver that writes a plaintext socket with one vectored write). Off
    /// by default; turning it off copies the chunks still pending in.
    pub fn write_by_reference(&mut self, on: bool) {
        if !on {
            self.flatten();
        }
        self.by_reference = on;
    }
    /// The message a chunk written by reference is sent from.
    fn referenced(&self, seq: u64) -> &WireMessage {
        // Flights are pushed in the order of their sequence numbers.
        let i = self
            .flights
            .binary_search_by_key(&seq, |f| f.seq)
            .expect("a chunk written by reference belongs to a transaction in flight");
        body_of(&self.caps, &self.flights[i].report.txn)
    }
    /// Copies the chunks written by reference into the output, in place.
    fn flatten(&mut self) {
        if self.refs.is_empty() {
            return;
        }
        let mut flat = Vec::with_capacity(self.output_len());
        let mut start = 0;
        for r in &self.refs {
            flat.extend_from_slice(&self.out[start..r.at]);
            start = r.at;
            self.referenced(r.seq).write_chunk(&mut flat);
        }
        flat.extend_from_slice(&self.out[start..]);
        self.refs.clear();
        self.out = flat;
    }
    /// Sets the session's clock: microseconds since the connection was established.
    /// Call it before `feed` and `consume_output`; replies are timed with it.
    pub fn set_clock(&mut self, micros: u64) {
        self.now = micros;
    }
    /// Replies to set-up commands (greeting, EHLO, STARTTLS, AUTH, RSET, QUIT) since the last call.
    /// Take them every turn (they are kept until taken).
    pub fn take_seen(&mut self) -> std::vec::Drain<'_, Seen> {
        self.seen.drain(..)
    }
    pub fn has_seen(&self) -> bool {
        !self.seen.is_empty()
    }
    pub fn poll_event(&mut self) -> Option<Event<T>> {
        self.events.pop_front()
    }

    /// Hands in a transaction; call only when `wants_txn()`.
    pub fn submit(&mut self, txn: T) {
        assert!(self.wants_txn(), "submit while the session cannot take a transaction");
        debug_assert!(txn.recipient_count() > 0);
        self.waiting = Some(txn);
        self.pump();
    }

    /// Sends QUIT as soon as nothing is in flight.
    pub fn quit(&mut self) {
        self.quit_requested = true;
        self.maybe_quit();
    }

    /// Feeds bytes read from the server.
    pub fn feed(&mut self, data: &[u8]) {
        if self.phase == Phase::Closed {
            return;
        }
        let parsed = self.parser.feed(data, &mut self.replies);
        while let Some(reply) = self.replies.pop_front() {
            self.on_reply(reply);
            if self.phase == Phase::Closed {
                self.replies.clear();
                return;
            }
            if self.phase == Phase::Handshake {
                // RFC 3207 §5: whatever came after the 220 in plaintext is
                // discarded unread, or a man in the middle could inject replies.
                self.replies.clear();
                self.parser = ReplyParser::new();
                return;
            }
        }
        if let Err(e) = parsed {
            self.connection_lost(Local::Protocol, &format!("protocol error: {e}"));
        }
    }

    /// The connection broke, timed out or was closed: everything in flight fails with `reason`.
    pub fn connection_lost(&mut self, kind: Local, reason: &str) {
        if self.phase == Phase::Closed {
            return;
        }
        if matches!(
            self.phase,
            Phase::Greeting | Phase::Ehlo | Phase::Helo | Phase::StartTls | Phase::Handshake
        ) {
            self.events.push_back(Event::Failed {
                reason: reason.to_string(),
                reply: None,
                kind,
            });
        }
        self.in_flight_bytes = 0;
        while let Some(mut flight) = self.flights.pop_front() {
            flight.report.failure = Some(Failure::new(kind, reason));
            self.events.push_back(Event::Done(flight.report));
        }
        if let Some(txn) = self.waiting.take() {
            self.events.push_back(Event::Unsent(txn));
        }
        self.expects.clear();
        self.out.clear();
        self.refs.clear();
        self.phase = Phase::Closed;
    }

    fn on_reply(&mut self, reply: Reply) {
        let Some((expect, sent)) = self.expects.pop_front() else {
            return self.connection_lost(Local::Protocol, &format!("unexpected reply from server: {reply}"));
        };
        let micros = if sent == UNSENT {
            0
        } else {
            self.now.saturating_sub(sent)
        };
        let command = match expect {
            Expect::Greeting => Some(Command::Greeting),
            Expect::Ehlo => Some(Command::Ehlo),
            Expect::Helo => Some(Command::Helo),
            Expect::StartTls => Some(Command::StartTls),
            Expect::AuthDone | Expect::AuthLoginUser | Expect::AuthLoginPassword => Some(Command::Auth),
            Expect::Rset => Some(Command::Rset),
            Expect::Quit => Some(Command::Quit),
            Expect::Mail(_) | Expect::Rcpt(..) | Expect::Data(_) | Expect::Dot(_) | Expect::Bdat(_) => None,
        };
        if let Some(command) = command {
            self.seen.push(Seen {
                command,
                code: reply.code,
                enhanced: reply.enhanced,
                micros,
            });
        }
        let closing = reply.code == 421;
        let summary = if closing { Some(reply.to_string()) } else { None };
        match expect {
            Expect::Greeting if reply.code == 220 => self.ehlo(),
            Expect::Greeting => return self.setup_failed("greeting", reply),
            Expect::Ehlo if reply.is_positive() => {
                self.caps = Capabilities::from_ehlo(&reply);
                self.caps.pipelining &= self.ext.pipelining;
                self.caps.chunking &= self.ext.chunking;
                if !self.secure && self.tls != TlsMode::Off && self.caps.starttls {
                    push_command(
                        &mut self.out,
                        &mut self.expects,
                        format_args!("STARTTLS"),
                        Expect::StartTls,
                    );
                    self.phase = Phase::StartTls;
                } else if !self.secure && self.tls == TlsMode::Require {
                    return self.give_up(Local::Tls, "TLS is required and the server does not offer STARTTLS");
                } else {
                    self.authenticate_or_ready();
                }
            }
            Expect::Ehlo if reply.is_permanent() => {
                push_command(
                    &mut self.out,
                    &mut self.expects,
                    format_args!("HELO {}", self.ehlo_name),
                    Expect::Helo,
                );
                self.phase = Phase::Helo;
            }
            Expect::Ehlo => return self.setup_failed("EHLO", reply),
            Expect::Helo if reply.is_positive() && self.tls == TlsMode::Require => {
                return self.give_up(
                    Local::Tls,
                    "TLS is required and the server speaks HELO only, without STARTTLS",
                );
            }
            Expect::Helo if reply.is_positive() => {
                self.caps = Capabilities::default();
                self.authenticate_or_ready();
            }
            Expect::Helo => return self.setup_failed("HELO", reply),
            Expect::StartTls if reply.code == 220 => {
                self.phase = Phase::Handshake;
                self.events.push_back(Event::StartTls);
                return;
            }
            Expect::StartTls if self.tls == TlsMode::Require => return self.setup_failed("STARTTLS", reply),
            // Opportunistic: a refused STARTTLS leaves the session in plaintext.
            Expect::StartTls if !closing => self.authenticate_or_ready(),
            Expect::StartTls => return self.setup_failed("STARTTLS", reply),
            Expect::Mail(seq) if reply.code == 503 && self.bdat_failed => {
                // The server kept the transaction whose BDAT failed (RFC 3030 leaves its
                // state open): this MAIL was refused for that, not for itself. Retry it.
                let flight = self.flight(seq);
                flight.report.failure = Some(Failure::new(
                    Local::Protocol,
                    format!("{reply} (after a failed BDAT; retried)"),
                ));
                flight.report.timing.mail = Some(micros);
                self.rset_first = true;
            }
            Expect::Mail(seq) => {
                let ok = reply.is_positive();
                let flight = self.flight(seq);
                flight.report.mail = Some(reply);
                flight.report.timing.mail = Some(micros);
                if !self.caps.pipelining {
                    if ok {
                        let rcpt = format!("RCPT TO:<{}>", wire_address(self.flight(seq).report.txn.recipient(0)));
                        push_command(
                            &mut self.out,
                            &mut self.expects,
                            format_args!("{rcpt}"),
                            Expect::Rcpt(seq, 0),
                        );
                    } else {
                        self.finish(seq);
                    }
                }
            }
            Expect::Rcpt(seq, i) => {
                let flight = self.flight(seq);
                flight.report.rcpts[i] = Some(reply);
                flight.report.timing.rcpt = Some(micros);
                if !self.caps.pipelining {
                    let flight = self.flight(seq);
                    let n = flight.report.txn.recipient_count();
                    if i + 1 < n {
                        let rcpt = format!("RCPT TO:<{}>", wire_address(flight.report.txn.recipient(i + 1)));
                        push_command(
                            &mut self.out,
                            &mut self.expects,
                            format_args!("{rcpt}"),
                            Expect::Rcpt(seq, i + 1),
                        );
                    } else if flight.report.accepted() > 0 {
                        push_command(
                            &mut self.out,
                            &mut self.expects,
                            format_args!("DATA"),
                            Expect::Data(seq),
                        );
                    } else {
                        self.finish(seq);
                        push_command(&mut self.out, &mut self.expects, format_args!("RSET"), Expect::Rset);
                    }
                }
            }
            Expect::Data(seq) if reply.code == 354 => {
                let flight = self.flight(seq);
                let send_body =
                    flight.report.mail.as_ref().is_some_and(Reply::is_positive) && flight.report.accepted() > 0;
                flight.report.data = Some(reply);
                flight.report.timing.data = Some(micros);
                flight.stage = Stage::Body;
                let idx = self.flights.iter().position(|f| f.seq == seq).expect("flight exists");
                if send_body {
                    let body = body_of(&self.caps, &self.flights[idx].report.txn);
                    self.out.extend_from_slice(&body.bytes);
                } else {
                    // The server invited data it cannot deliver to anyone: end it empty.
                    self.out.extend_from_slice(b".\r\n");
                }
                self.expects.push_back(Expect::Dot(seq));
            }
            Expect::Data(seq) => {
                let flight = self.flight(seq);
                let mail_ok = flight.report.mail.as_ref().is_some_and(Reply::is_positive);
                flight.report.data = Some(reply);
                flight.report.timing.data = Some(micros);
                self.finish(seq);
                if mail_ok && !closing {
                    push_command(&mut self.out, &mut self.expects, format_args!("RSET"), Expect::Rset);
                }
            }
            Expect::Dot(seq) => {
                let flight = self.flight(seq);
                flight.report.dot = Some(reply);
                flight.report.timing.dot = Some(micros);
                self.finish(seq);
            }
            Expect::Bdat(seq) => {
                if !reply.is_positive() {
                    self.bdat_failed = true;
                }
                let flight = self.flight(seq);
                flight.report.dot = Some(reply);
                flight.report.timing.dot = Some(micros);
                self.finish(seq);
            }
            Expect::AuthLoginUser | Expect::AuthLoginPassword if reply.code == 334 => {
                let auth = self.auth.as_ref().expect("AUTH only with credentials");
                let (secret, next) = if expect == Expect::AuthLoginUser {
                    (auth.user.as_str(), Expect::AuthLoginPassword)
                } else {
                    (auth.password.as_str(), Expect::AuthDone)
                };
                let b64 = BASE64.encode(secret);
                push_command(&mut self.out, &mut self.expects, format_args!("{b64}"), next);
                return;
            }
            Expect::AuthDone if reply.code == 235 => self.ready(),
            Expect::AuthDone | Expect::AuthLoginUser | Expect::AuthLoginPassword => {
                return self.setup_failed("AUTH", reply);
            }
            Expect::Rset => {}
            Expect::Quit => {
                self.phase = Phase::Closed;
                return;
            }
        }
        if let Some(summary) = summary {
            return self.connection_lost(Local::Closed, &format!("server closed the connection: {summary}"));
        }
        self.pump();
        self.maybe_quit();
    }

    /// After EHLO (and TLS, if any): AUTH when there are credentials, else ready.
    fn authenticate_or_ready(&mut self) {
        let Some(auth) = &self.auth else {
            return self.ready();
        };
        if !self.secure && !auth.allow_plaintext {
            return self.give_up(Local::Policy, "AUTH needs TLS first (allow_plaintext_auth is off)");
        }
        if self.caps.auth_plain {
            let token = BASE64.encode(format!("\0{}\0{}", auth.user, auth.password));
            push_command(
                &mut self.out,
                &mut self.expects,
                format_args!("AUTH PLAIN {token}"),
                Expect::AuthDone,
            );
        } else if self.caps.auth_login {
            push_command(
                &mut self.out,
                &mut self.expects,
                format_args!("AUTH LOGIN"),
                Expect::AuthLoginUser,
            );
        } else {
            return self.give_up(Local::Policy, "the server offers neither AUTH PLAIN nor AUTH LOGIN");
        }
        self.phase = Phase::Auth;
    }

    /// The TLS handshake succeeded: start over with EHLO, as RFC 3207 §4.2 requires.
    pub fn tls_established(&mut self) {
        assert_eq!(self.phase, Phase::Handshake, "tls_established without STARTTLS");
        self.secure = true;
        self.caps = Capabilities::default();
        self.ehlo();
    }

    fn ehlo(&mut self) {
        push_command(
            &mut self.out,
            &mut self.expects,
            format_args!("EHLO {}", self.ehlo_name),
            Expect::Ehlo,
        );
        self.phase = Phase::Ehlo;
    }

    fn ready(&mut self) {
        self.phase = Phase::Ready;
        self.events.push_back(Event::Ready);
    }

    fn setup_failed(&mut self, stage: &str, reply: Reply) {
        let reason = format!("{stage} refused: {reply}");
        self.events.push_back(Event::Failed {
            reason,
            reply: Some(reply.clone()),
            kind: Local::Refused,
        });
        if reply.code == 421 {
            self.expects.clear();
            self.phase = Phase::Closed;
        } else {
            // RFC 5321 §3.1: after a 554 greeting the client should still say QUIT.
            self.expects.clear();
            push_command(&mut self.out, &mut self.expects, format_args!("QUIT"), Expect::Quit);
            self.phase = Phase::Quitting;
        }
    }

    /// Ends a session that cannot be used as policy wants, politely.
    fn give_up(&mut self, kind: Local, reason: &str) {
        self.events.push_back(Event::Failed {
            reason: reason.to_string(),
            reply: None,
            kind,
        });
        self.expects.clear();
        push_command(&mut self.out, &mut self.expects, format_args!("QUIT"), Expect::Quit);
        self.phase = Phase::Quitting;
    }

    /// Where the flight of `seq` is: flights are in the order of their
    /// sequence numbers, and replies mostly answer the first.
    fn flight_index(&self, seq: u64) -> Option<usize> {
        match self.flights.front() {
            Some(f) if f.seq == seq => Some(0),
            _ => self.flights.binary_search_by_key(&seq, |f| f.seq).ok(),
        }
    }

    fn flight(&mut self, seq: u64) -> &mut Flight<T> {
        let idx = self
            .flight_index(seq)
            .expect("a reply is matched to a transaction in flight");
        &mut self.flights[idx]
    }

    fn finish(&mut self, seq: u64) {
        // A server may answer before it has read everything (a hostile or
        // broken one): a chunk still unwritten is copied before its message goes.
        if self.refs.iter().any(|r| r.seq == seq) {
            self.flatten();
        }
        let idx = self.flight_index(seq).expect("flight exists");
        let flight = self.flights.remove(idx).expect("flight exists");
        self.in_flight_bytes -= flight.chunk;
        if flight.report.chunked {
            self.adapt_window(&flight.report);
        }
        self.events.push_back(Event::Done(flight.report));
    }

    /// Widens the BDAT window by one for a transaction the server took
    /// whole (MAIL, every RCPT and BDAT answered 2xx), and halves it (never
    /// below the configured start) when the server put off MAIL or BDAT or
    /// said 421: a server that keeps up gets more in flight, one that
    /// pushes back gets less. A recipient's own refusal changes nothing.
    fn adapt_window(&mut self, r: &TxnReport<T>) {
        let ok = |x: &Option<Reply>| x.as_ref().is_some_and(|r| r.code / 100 == 2);
        let pushed_back = |x: &Option<Reply>| x.as_ref().is_some_and(|r| r.code / 100 == 4);
        let start = self.ext.window.max(1);
        let said_421 = [&r.mail, &r.dot]
            .into_iter()
            .chain(r.rcpts.iter())
            .any(|x| x.as_ref().is_some_and(|r| r.code == 421));
        if said_421 || pushed_back(&r.mail) || pushed_back(&r.dot) {
            self.window = (self.window / 2).max(start);
        } else if r.failure.is_none() && ok(&r.mail) && ok(&r.dot) && r.rcpts.iter().all(ok) {
            self.window = (self.window + 1).min(self.ext.window_max.max(start));
        }
    }

    /// Starts the waiting transaction when the protocol allows it.
    fn pump(&mut self) {
        if self.phase != Phase::Ready || self.waiting.is_none() {
            return;
        }
        let can_start = if self.is_chunking() {
            let waiting = self.waiting.as_ref().map_or(0, |t| body_of(&self.caps, t).chunk_len());
            self.flights.len() < self.max_flights()
                && (self.flights.is_empty() || self.in_flight_bytes + waiting <= self.ext.window_bytes)
        } else if self.caps.pipelining {
            self.flights.iter().all(|f| f.stage == Stage::Body)
        } else {
            self.flights.is_empty() && self.expects.is_empty()
        };
        if !can_start {
            return;
        }
        let txn = self.waiting.take().expect("checked above");
        let chunked = self.is_chunking();
        // RFC 6531 §3.2: SMTPUTF8 for a UTF-8 address, and (where offered) for UTF-8 headers.
        let utf8_headers = self.caps.smtputf8 && body_of(&self.caps, &txn).eight_bit_headers;
        // Each address read once (a job's are spans of the mapped spool).
        let from = txn.reverse_path();
        let rcpts: SmallVec<[&str; 2]> = (0..txn.recipient_count()).map(|i| txn.recipient(i)).collect();
        let plain = plain_envelope(from, &rcpts);
        let utf8 = (!plain && needs_smtputf8(from, &rcpts)) || utf8_headers;
        let envelope = || std::iter::once(from).chain(rcpts.iter().copied());
        let refusal = if utf8 && !self.caps.smtputf8 {
            // RFC 6531 §3.2: a UTF-8 address only to a server that offers SMTPUTF8.
            let addr = envelope().find(|a| !wire_address(a).is_ascii()).unwrap_or_default();
            Some(Failure::new(
                Local::Smtputf8,
                format!("address {addr:?} needs SMTPUTF8 (RFC 6531), which the server does not offer"),
            ))
        } else if let (true, Err(why)) = (txn.message().eight_bit && !self.caps.eight_bit_mime, txn.seven_bit()) {
            // RFC 6152: 8-bit data only to a server that offers 8BITMIME; else its 7-bit form.
            Some(Failure::new(
                Local::Message,
                format!(
                    "the message has 8-bit content, the server does not offer 8BITMIME, and it cannot go in 7 bits: {why}"
                ),
            ))
        } else if plain {
            None
        } else {
            // Ingest lets no such address through; this keeps any other caller from
            // putting a second command on the line (CRLF) or passing its length limit.
            envelope().find(|a| !command_safe(a)).map(|a| {
                Failure::new(
                    Local::Message,
                    format!("address {a:?} cannot be written on an SMTP command line"),
                )
            })
        };
        if let Some(failure) = refusal {
            // The addresses borrow from the transaction, which moves on here.
            drop(rcpts);
            let n = txn.recipient_count();
            self.events.push_back(Event::Done(Box::new(TxnReport {
                txn,
                mail: None,
                rcpts: smallvec::smallvec![None; n],
                data: None,
                dot: None,
                failure: Some(failure),
                permanent: true,
                timing: TxnTiming::default(),
                chunked,
            })));
            return;
        }
        if self.rset_first {
            self.rset_first = false;
            push_command(&mut self.out, &mut self.expects, format_args!("RSET"), Expect::Rset);
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        let n = txn.recipient_count();
        let message = body_of(&self.caps, &txn);
        self.out.extend_from_slice(b"MAIL FROM:<");
        put_address(&mut self.out, from, plain);
        self.out.push(b'>');
        if self.caps.size.is_some() {
            let size = if chunked {
                message.chunk_len()
            } else {
                message.bytes.len()
            };
            self.out.extend_from_slice(b" SIZE=");
            self.out.extend_from_slice(itoa::Buffer::new().format(size).as_bytes());
        }
        if message.eight_bit && self.caps.eight_bit_mime {
            self.out.extend_from_slice(b" BODY=8BITMIME");
        }
        if utf8 {
            self.out.extend_from_slice(b" SMTPUTF8");
        }
        self.out.extend_from_slice(b"\r\n");
        self.expects.push_back(Expect::Mail(seq));
        if chunked {
            for (i, rcpt) in rcpts.iter().enumerate() {
                rcpt_to(&mut self.out, rcpt, plain);
                self.expects.push_back(Expect::Rcpt(seq, i));
            }
            // RFC 3030: the whole message as one last chunk, read by the server
            // whatever it answered before, so nothing waits on a reply.
            self.out.extend_from_slice(b"BDAT ");
            self.out
                .extend_from_slice(itoa::Buffer::new().format(message.chunk_len()).as_bytes());
            self.out.extend_from_slice(b" LAST\r\n");
            // By reference unless the chunk is in many parts (dots were
            // stuffed) or many are pending: a vectored write takes at most
            // IOV_MAX (1,024) slices.
            if self.by_reference && message.chunk_part_count() <= MAX_REF_PARTS && self.refs.len() < MAX_REFS {
                self.refs.push(ChunkRef {
                    at: self.out.len(),
                    len: message.chunk_len(),
                    seq,
                });
            } else {
                message.write_chunk(&mut self.out);
            }
            self.expects.push_back(Expect::Bdat(seq));
        } else if self.caps.pipelining {
            for (i, rcpt) in rcpts.iter().enumerate() {
                rcpt_to(&mut self.out, rcpt, plain);
                self.expects.push_back(Expect::Rcpt(seq, i));
            }
            self.out.extend_from_slice(b"DATA\r\n");
            self.expects.push_back(Expect::Data(seq));
        }
        // The addresses borrow from the transaction, which moves into its flight.
        drop(rcpts);
        let chunk = if chunked { message.chunk_len() } else { 0 };
        self.in_flight_bytes += chunk;
        self.flights.push_back(Flight {
            seq,
            chunk,
            stage: if chunked { Stage::Body } else { Stage::Envelope },
            // Written into the box, not built beside it and copied in.
            report: Box::write(
                Box::new_uninit(),
                TxnReport {
                    txn,
                    mail: None,
                    rcpts: smallvec::smallvec![None; n],
                    data: None,
                    dot: None,
                    failure: None,
                    permanent: false,
                    timing: TxnTiming::default(),
                    chunked,
                },
            ),
        });
    }

    fn maybe_quit(&mut self) {
        if self.quit_requested && self.phase == Phase::Ready && self.is_idle() {
            push_command(&mut self.out, &mut self.expects, format_args!("QUIT"), Expect::Quit);
            self.phase = Phase::Quitting;
        }
    }
}
