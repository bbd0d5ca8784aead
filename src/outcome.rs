//! Outcomes per recipient and the delivery log (JSON Lines). Producers (the
//! shards and ingest) format log lines and tally counts locally, then hand
//! the collector one `OutcomeBatch` at a time: nothing is shared per record.

use foldhash::{HashMap, HashMapExt};
use std::fmt;
use std::net::IpAddr;
use std::time::SystemTime;

use serde::{Serialize, Serializer};

use crate::smtp::Enhanced;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    Delivered,
    Bounced,
    Deferred,
    Expired,
    Rejected,
}

impl Outcome {
    pub const ALL: [Outcome; 5] = [
        Outcome::Delivered,
        Outcome::Bounced,
        Outcome::Deferred,
        Outcome::Expired,
        Outcome::Rejected,
    ];
    pub fn is_final(self) -> bool {
        self != Outcome::Deferred
    }
    pub fn index(self) -> usize {
        self as usize
    }
    pub fn name(self) -> &'static str {
        match self {
            Outcome::Delivered => "delivered",
            Outcome::Bounced => "bounced",
            Outcome::Deferred => "deferred",
            Outcome::Expired => "expired",
            Outcome::Rejected => "rejected",
        }
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The `id` of a job: the producer's, or `FILE:LINE` by default.
#[derive(Debug, Clone, Copy)]
pub enum JobId<'a> {
    Given(&'a str),
    Line(&'a str, u32),
}

impl Serialize for JobId<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            JobId::Given(id) => s.serialize_str(id),
            JobId::Line(file, line) => s.collect_str(&format_args!("{file}:{line}")),
        }
    }
}

fn ts<S: Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(&humantime::format_rfc3339_millis(*t))
}

fn enhanced<S: Serializer>(e: &Option<Enhanced>, s: S) -> Result<S::Ok, S::Error> {
    match e {
        Some(e) => s.collect_str(e),
        None => s.serialize_none(),
    }
}

/// One line of the delivery log.
#[derive(Debug, Serialize)]
pub struct LogRecord<'a> {
    #[serde(serialize_with = "ts")]
    pub ts: SystemTime,
    pub id: JobId<'a>,
    pub rcpt: Option<&'a str>,
    pub domain: Option<&'a str>,
    pub outcome: Outcome,
    pub code: Option<u16>,
    #[serde(serialize_with = "enhanced")]
    pub enhanced: Option<Enhanced>,
    pub reply: Option<&'a str>,
    pub mx: Option<&'a str>,
    pub ip: Option<IpAddr>,
    pub attempt: u32,
    pub latency_ms: Option<u64>,
    /// TLS version and cipher of the connection, when TLS was negotiated.
    pub tls: Option<&'a str>,
    /// Bounce classification of a bounce, deferral or expiry.
    pub category: Option<&'a str>,
    /// The automation rule in force on the destination when it was deferred
    /// (it waits for the rule's end, not for the retry schedule).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rule: Option<&'a str>,
    /// The kind of volley's own failure, when no reply decided (`local.rs`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub local: Option<&'a str>,
    /// The given `id`, `rcpt` and `domain` need no escaping in JSON: they
    /// are text that lies as it is in a JSON spool line, which holds no
    /// quote, backslash or control character (those come escaped, and an
    /// escaped string is copied out of the line, never borrowed from it).
    /// Not a field of the line.
    #[serde(skip)]
    pub plain: bool,
}

/// The timestamps and addresses of log lines written one after another:
/// the second's `YYYY-MM-DDTHH:MM:SS.`, the last IP address and the last
/// outcome with its codes are formatted once, not per line.
#[derive(Debug, Default)]
pub struct Stamp {
    second: Option<(u64, [u8; 20])>,
    /// The last timestamp written, whole (records settled in one turn share it).
    last: Option<(SystemTime, [u8; 24])>,
    ip: Option<(IpAddr, String)>,
    /// The last `,"outcome":…,"code":…,"enhanced":…,"reply":` written: the
    /// same for every delivered recipient of a server.
    outcome: Option<(OutcomeKey, Vec<u8>)>,
}

/// A record's outcome, reply code and enhanced code.
type OutcomeKey = (Outcome, Option<u16>, Option<Enhanced>);

impl Stamp {
    fn write_ts(&mut self, out: &mut Vec<u8>, t: SystemTime) {
        if let Some((last, ts)) = &self.last
            && *last == t
        {
            out.extend_from_slice(ts);
            return;
        }
        let Ok(since) = t.duration_since(SystemTime::UNIX_EPOCH) else {
            out.extend_from_slice(humantime::format_rfc3339_millis(t).to_string().as_bytes());
            return;
        };
        let secs = since.as_secs();
        let prefix = match &self.second {
            Some((s, p)) if *s == secs => p,
            _ => {
                let whole = humantime::format_rfc3339_millis(t).to_string();
                let mut p = [0u8; 20];
                p.copy_from_slice(&whole.as_bytes()[..20]);
                &self.second.insert((secs, p)).1
            }
        };
        let ms = since.subsec_millis();
        let mut ts = [0u8; 24];
        ts[..20].copy_from_slice(prefix);
        ts[20..].copy_from_slice(&[
            b'0' + (ms / 100) as u8,
            b'0' + (ms / 10 % 10) as u8,
            b'0' + (ms % 10) as u8,
            b'Z',
        ]);
        out.extend_from_slice(&ts);
        self.last = Some((t, ts));
    }

    /// `,"outcome":"…","code":…,"enhanced":…,"reply":` for these.
    fn outcome(&mut self, outcome: Outcome, code: Option<u16>, enhanced: Option<Enhanced>) -> &[u8] {
        let key = (outcome, code, enhanced);
        match &self.outcome {
            Some((last, _)) if *last == key => {}
            _ => {
                // The last one's buffer, refilled: records that alternate
                // (deliveries among deferrals) allocate nothing.
                let mut out = self.outcome.take().map(|(_, b)| b).unwrap_or_default();
                out.clear();
                out.extend_from_slice(b",\"outcome\":\"");
                out.extend_from_slice(outcome.name().as_bytes());
                out.extend_from_slice(b"\",\"code\":");
                json_opt_num(&mut out, code.map(u64::from));
                out.extend_from_slice(b",\"enhanced\":");
                match enhanced {
                    Some(e) => {
                        let mut b = itoa::Buffer::new();
                        out.push(b'"');
                        out.extend_from_slice(b.format(e.class).as_bytes());
                        out.push(b'.');
                        out.extend_from_slice(b.format(e.subject).as_bytes());
                        out.push(b'.');
                        out.extend_from_slice(b.format(e.detail).as_bytes());
                        out.push(b'"');
                    }
                    None => out.extend_from_slice(b"null"),
                }
                out.extend_from_slice(b",\"reply\":");
                self.outcome = Some((key, out));
            }
        }
        &self.outcome.as_ref().expect("set above").1
    }

    fn ip(&mut self, ip: IpAddr) -> &str {
        match &self.ip {
            Some((last, _)) if *last == ip => {}
            _ => self.ip = Some((ip, ip.to_string())),
        }
        &self.ip.as_ref().expect("set above").1
    }
}

/// A JSON string: as it is when nothing in it needs escaping (the usual
/// case), else as serde_json escapes it.
fn json_str(out: &mut Vec<u8>, s: &str) {
    if json_plain(s.as_bytes()) {
        out.push(b'"');
        out.extend_from_slice(s.as_bytes());
        out.push(b'"');
    } else {
        serde_json::to_writer(&mut *out, s).expect("serializing to a Vec cannot fail");
    }
}

/// Whether `s` needs no escaping in a JSON string: no quote, backslash
/// or control character. Sixteen bytes at a time from 16 bytes on (the
/// last 16 overlapping the ones before), so a reply's text is read in two
/// or three loads; two words from 8 to 16 (an IP address).
#[inline]
fn json_plain(s: &[u8]) -> bool {
    #[cfg(target_arch = "x86_64")]
    if s.len() >= 16 {
        use std::arch::x86_64::{
            _mm_cmpeq_epi8, _mm_loadu_si128, _mm_min_epu8, _mm_movemask_epi8, _mm_or_si128, _mm_set1_epi8,
        };
        // SAFETY: each load reads the 16 bytes from `at`, and `at + 16 <=
        // s.len()`; an unaligned load takes any address. SSE2 is part of x86_64.
        let escaped = |at: usize| unsafe {
            let v = _mm_loadu_si128(s[at..at + 16].as_ptr().cast());
            let control = _mm_cmpeq_epi8(_mm_min_epu8(v, _mm_set1_epi8(0x1f)), v);
            let quote = _mm_cmpeq_epi8(v, _mm_set1_epi8(b'"' as i8));
            let backslash = _mm_cmpeq_epi8(v, _mm_set1_epi8(b'\\' as i8));
            _mm_movemask_epi8(_mm_or_si128(control, _mm_or_si128(quote, backslash))) != 0
        };
        let mut at = 0;
        while at + 16 < s.len() {
            if escaped(at) {
                return false;
            }
            at += 16;
        }
        return !escaped(s.len() - 16);
    }
    json_plain_portable(s)
}

/// [`json_plain`] without vector loads: from 8 to 16 bytes as two words,
/// else a byte at a time.
fn json_plain_portable(s: &[u8]) -> bool {
    if (8..=16).contains(&s.len()) {
        // The first and the last 8 bytes as words (overlapping when fewer
        // than 16), each tested for a byte below 0x20 and for a byte equal
        // to a quote or a backslash: these tests say exactly whether any
        // byte of the word is one (the carries they make only ever reach
        // bytes above one that is).
        const ONES: u64 = u64::from_ne_bytes([0x01; 8]);
        const HIGHS: u64 = u64::from_ne_bytes([0x80; 8]);
        let below = |w: u64, n: u8| w.wrapping_sub(ONES * u64::from(n)) & !w & HIGHS != 0;
        let holds = |w: u64, c: u8| below(w ^ (ONES * u64::from(c)), 1);
        let escaped = |w: u64| below(w, 0x20) | holds(w, b'"') | holds(w, b'\\');
        let word = |at: usize| u64::from_ne_bytes(s[at..at + 8].try_into().expect("8 bytes"));
        return !(escaped(word(0)) | escaped(word(s.len() - 8)));
    }
    // Without short-circuit, so it runs as one loop of few branches.
    !s.iter()
        .fold(false, |esc, &b| esc | (b < 0x20) | (b == b'"') | (b == b'\\'))
}

fn json_opt_str(out: &mut Vec<u8>, s: Option<&str>) {
    match s {
        Some(s) => json_str(out, s),
        None => out.extend_from_slice(b"null"),
    }
}

fn json_opt_num(out: &mut Vec<u8>, n: Option<u64>) {
    match n {
        Some(n) => out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes()),
        None => out.extend_from_slice(b"null"),
    }
}

impl LogRecord<'_> {
    /// The record as one JSON object, the same bytes as its `Serialize`
    /// gives (tested), written without a serializer: this runs once per
    /// recipient on the shards.
    pub fn write_json(&self, out: &mut Vec<u8>, stamp: &mut Stamp) {
        // A string that needs no escaping, as it is.
        let raw = |out: &mut Vec<u8>, s: &str| {
            out.push(b'"');
            out.extend_from_slice(s.as_bytes());
            out.push(b'"');
        };
        let spool_str = |out: &mut Vec<u8>, s: Option<&str>| match s {
            Some(s) if self.plain => raw(out, s),
            other => json_opt_str(out, other),
        };
        out.extend_from_slice(b"{\"ts\":\"");
        stamp.write_ts(out, self.ts);
        out.extend_from_slice(b"\",\"id\":");
        match self.id {
            JobId::Given(id) => spool_str(out, Some(id)),
            JobId::Line(file, line) => {
                json_str(out, file);
                out.pop();
                out.push(b':');
                out.extend_from_slice(itoa::Buffer::new().format(line).as_bytes());
                out.push(b'"');
            }
        }
        out.extend_from_slice(b",\"rcpt\":");
        spool_str(out, self.rcpt);
        out.extend_from_slice(b",\"domain\":");
        spool_str(out, self.domain);
        out.extend_from_slice(stamp.outcome(self.outcome, self.code, self.enhanced));
        json_opt_str(out, self.reply);
        out.extend_from_slice(b",\"mx\":");
        json_opt_str(out, self.mx);
        out.extend_from_slice(b",\"ip\":");
        match self.ip {
            // Digits, dots, colons and hex letters.
            Some(ip) => raw(out, stamp.ip(ip)),
            None => out.extend_from_slice(b"null"),
        }
        out.extend_from_slice(b",\"attempt\":");
        out.extend_from_slice(itoa::Buffer::new().format(self.attempt).as_bytes());
        out.extend_from_slice(b",\"latency_ms\":");
        json_opt_num(out, self.latency_ms);
        out.extend_from_slice(b",\"tls\":");
        json_opt_str(out, self.tls);
        out.extend_from_slice(b",\"category\":");
        json_opt_str(out, self.category);
        if let Some(rule) = self.rule {
            out.extend_from_slice(b",\"rule\":");
            json_str(out, rule);
        }
        if let Some(local) = self.local {
            out.extend_from_slice(b",\"local\":");
            json_str(out, local);
        }
        out.push(b'}');
    }
}

/// Where a recipient is in the spool: its file, line and index in `to`
/// (`journal::WHOLE_LINE` for a line rejected whole).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RcptKey {
    pub file: u32,
    pub line: u32,
    pub idx: u32,
}

/// A final outcome, for the journal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Final {
    pub key: RcptKey,
    pub outcome: Outcome,
    /// It was deferred before in this run (it is no longer waiting).
    pub retried: bool,
}

/// What one producer sends the collector at a time.
#[derive(Debug, Default)]
pub struct OutcomeBatch {
    /// Final outcomes in this batch, for the journal.
    pub finals: Vec<Final>,
    /// Recipients deferred for the first time in this run, in this batch (for `/status`).
    pub deferred: Vec<RcptKey>,
    /// Delivery log lines, each ending in `\n` (empty when there is no log).
    pub log: Vec<u8>,
    /// Records per outcome, indexed by `Outcome::index`.
    pub counts: [u64; 5],
    /// Records per reply code.
    pub codes: Vec<(u16, u64)>,
    /// Deferrals, bounces and expiries by their reason (see `reason_of`) and domain.
    pub reasons: Vec<(Reason, u64)>,
    /// Transactions that delivered to at least one recipient.
    pub messages: u64,
    /// The shard that sent it (none: ingest); the collector credits the
    /// shard with its records once they are written.
    pub shard: Option<usize>,
}

impl OutcomeBatch {
    /// Log records in the batch (deferrals and final outcomes).
    pub fn records(&self) -> u64 {
        self.counts.iter().sum()
    }
    pub fn final_count(&self) -> u64 {
        Outcome::ALL
            .iter()
            .filter(|o| o.is_final())
            .map(|o| self.counts[o.index()])
            .sum()
    }
    pub fn is_empty(&self) -> bool {
        self.counts.iter().all(|&c| c == 0) && self.messages == 0 && self.finals.is_empty()
    }
    /// Adds a later batch to this one.
    pub fn merge(&mut self, other: OutcomeBatch) {
        self.log.extend_from_slice(&other.log);
        self.finals.extend_from_slice(&other.finals);
        self.deferred.extend_from_slice(&other.deferred);
        for (a, b) in self.counts.iter_mut().zip(other.counts) {
            *a += b;
        }
        self.codes.extend(other.codes);
        self.reasons.extend(other.reasons);
        self.messages += other.messages;
    }
}

/// Why recipients of a domain did not get through, as the progress line,
/// the summary and `/status` show it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Reason {
    pub outcome: Outcome,
    /// `CODE TEXT` of the reply, or `LOCAL-KIND: TEXT` of volley's own
    /// failure; `<…>` for what is between angle brackets (an address), at
    /// most `REASON_CHARS` characters.
    pub text: Box<str>,
    pub domain: Box<str>,
}

/// The longest reason kept.
pub const REASON_CHARS: usize = 160;

/// A record's reason, in a form that gathers the same failure of many recipients.
pub fn reason_of(rec: &LogRecord<'_>) -> Box<str> {
    let text = rec.reply.unwrap_or_default();
    let mut out = match (rec.code, rec.local) {
        (Some(code), _) => format!("{code} "),
        (None, Some(kind)) => format!("{kind}: "),
        (None, None) => String::new(),
    };
    // The domain in its own failure's words ("MX lookup for DOMAIN failed")
    // would make each domain a reason of its own.
    let text: std::borrow::Cow<'_, str> = match rec.domain {
        Some(d) if !d.is_empty() && text.contains(d) => text.replace(d, "{domain}").into(),
        _ => text.into(),
    };
    let mut inside = false;
    for ch in text.chars() {
        if out.chars().count() >= REASON_CHARS {
            out.push('…');
            break;
        }
        match ch {
            '<' if !inside => {
                inside = true;
                out.push_str("<…");
            }
            '>' if inside => {
                inside = false;
                out.push('>');
            }
            _ if inside => {}
            c if c.is_control() => out.push(' '),
            c => out.push(c),
        }
    }
    out.trim_end().into()
}

/// Tallies records into the next batch; one per producer.
#[derive(Debug)]
pub struct Recorder {
    log: bool,
    stamp: Stamp,
    batch: OutcomeBatch,
    /// Records per reply code (a handful of codes: a scan beats a hash).
    codes: Vec<(u16, u64)>,
    reasons: HashMap<Reason, u64>,
    /// The most log bytes and finals a batch has held (up to `ROOM_BYTES`
    /// and `ROOM_FINALS`): the room each new batch starts with.
    room: (usize, usize),
}

/// The most room a new batch is given up front, in log bytes and in finals
/// (a producer flushes at 256 KiB of log; a batch that grows past these
/// grows as a `Vec` does).
const ROOM_BYTES: usize = 1 << 20;
const ROOM_FINALS: usize = 1 << 16;

impl Recorder {
    pub fn new(log: bool) -> Recorder {
        Recorder {
            log,
            stamp: Stamp::default(),
            batch: OutcomeBatch::default(),
            codes: Vec::new(),
            reasons: HashMap::new(),
            room: (0, 0),
        }
    }

    pub fn record(&mut self, key: RcptKey, rec: &LogRecord<'_>) {
        self.batch.counts[rec.outcome.index()] += 1;
        if rec.outcome.is_final() {
            self.batch.finals.push(Final {
                key,
                outcome: rec.outcome,
                retried: rec.attempt > 1,
            });
        } else if rec.attempt == 1 {
            // Each deferral moves the attempt on: a later one is of a recipient counted already.
            self.batch.deferred.push(key);
        }
        if let Some(code) = rec.code {
            match self.codes.iter_mut().find(|(c, _)| *c == code) {
                Some((_, n)) => *n += 1,
                None => self.codes.push((code, 1)),
            }
        }
        if matches!(rec.outcome, Outcome::Deferred | Outcome::Bounced | Outcome::Expired) {
            let reason = Reason {
                outcome: rec.outcome,
                text: reason_of(rec),
                domain: rec.domain.unwrap_or_default().into(),
            };
            *self.reasons.entry(reason).or_default() += 1;
        }
        if self.log {
            rec.write_json(&mut self.batch.log, &mut self.stamp);
            self.batch.log.push(b'\n');
        }
    }

    pub fn message_delivered(&mut self) {
        self.batch.messages += 1;
    }

    /// Bytes of log waiting in the batch.
    pub fn pending_bytes(&self) -> usize {
        self.batch.log.len()
    }

    /// The batch so far, if anything was recorded.
    pub fn take(&mut self) -> Option<OutcomeBatch> {
        if self.batch.is_empty() {
            return None;
        }
        let mut batch = std::mem::take(&mut self.batch);
        // The next batch is likely the size of the biggest so far: room for
        // it up front instead of growing (and copying) it record by record.
        self.room.0 = self.room.0.max(batch.log.len()).min(ROOM_BYTES);
        self.room.1 = self.room.1.max(batch.finals.len()).min(ROOM_FINALS);
        self.batch.log.reserve(self.room.0);
        self.batch.finals.reserve(self.room.1);
        batch.codes = std::mem::take(&mut self.codes);
        batch.reasons = self.reasons.drain().collect();
        Some(batch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_string_needs_escaping_exactly_when_it_holds_a_quote_a_backslash_or_a_control_character() {
        let byte_wise = |s: &[u8]| !s.iter().any(|&b| b < 0x20 || b == b'"' || b == b'\\');
        // Each length up to 70, each such byte at each place, and the bytes
        // just beside them (0x20, 0x7f, UTF-8) that need none.
        for len in 0..70usize {
            let plain: Vec<u8> = (0..len).map(|i| b'a' + (i % 26) as u8).collect();
            assert!(json_plain(&plain), "{len} plain bytes");
            for at in 0..len {
                for b in [
                    b'"', b'\\', 0x00, 0x1f, b'\n', 0x20, 0x7f, 0xc3, b'!', b'#', b'[', b']', 0x80, 0x9f, 0xa0, 0xa2,
                    0xdc, 0xff,
                ] {
                    let mut s = plain.clone();
                    s[at] = b;
                    assert_eq!(json_plain(&s), byte_wise(&s), "{len} bytes, {b:#x} at {at}");
                    // The test without vector loads (other targets) as well.
                    assert_eq!(
                        json_plain_portable(&s),
                        byte_wise(&s),
                        "portable: {len} bytes, {b:#x} at {at}"
                    );
                }
            }
        }
    }

    /// A record of `outcome` for job `x` at the epoch, first attempt, with
    /// nothing else said: tests set what they look at.
    fn bare(outcome: Outcome) -> LogRecord<'static> {
        LogRecord {
            ts: SystemTime::UNIX_EPOCH,
            id: JobId::Given("x"),
            rcpt: None,
            domain: None,
            outcome,
            code: None,
            enhanced: None,
            reply: None,
            mx: None,
            ip: None,
            attempt: 1,
            latency_ms: None,
            tls: None,
            category: None,
            rule: None,
            local: None,
            plain: false,
        }
    }

    #[test]
    fn reasons_leave_out_addresses_and_say_code_or_kind() {
        let rec = |code: Option<u16>, local: Option<&'static str>, reply: &'static str| LogRecord {
            code,
            reply: Some(reply),
            local,
            ..bare(Outcome::Deferred)
        };
        assert_eq!(
            &*reason_of(&rec(
                Some(450),
                None,
                "4.2.1 <ann@x.test>: Recipient address rejected: try again later"
            )),
            "450 4.2.1 <…>: Recipient address rejected: try again later"
        );
        assert_eq!(
            &*reason_of(&rec(None, Some("connect"), "refused\r\n")),
            "connect: refused"
        );
        let long = "y".repeat(500);
        let long: &'static str = Box::leak(long.into_boxed_str());
        assert_eq!(reason_of(&rec(Some(421), None, long)).chars().count(), REASON_CHARS + 1);
    }

    #[test]
    fn log_line_shape() {
        let mut r = Recorder::new(true);
        let key = RcptKey {
            file: 0,
            line: 7,
            idx: 0,
        };
        r.record(
            key,
            &LogRecord {
                ts: SystemTime::UNIX_EPOCH,
                id: JobId::Line("a.jsonl", 7),
                rcpt: Some("x@d.test"),
                domain: Some("d.test"),
                outcome: Outcome::Bounced,
                code: Some(550),
                enhanced: Enhanced::parse_prefix("5.1.1"),
                reply: Some("5.1.1 no such user"),
                mx: Some("127.0.0.1:25"),
                ip: Some("127.0.0.1".parse().unwrap()),
                attempt: 1,
                latency_ms: Some(3),
                tls: Some("TLSv1.3 TLS13_AES_128_GCM_SHA256"),
                category: Some("invalid-recipient"),
                rule: None,
                local: None,
                plain: false,
            },
        );
        let b = r.take().unwrap();
        let line = String::from_utf8(b.log.clone()).unwrap();
        assert_eq!(
            line,
            "{\"ts\":\"1970-01-01T00:00:00.000Z\",\"id\":\"a.jsonl:7\",\"rcpt\":\"x@d.test\",\"domain\":\"d.test\",\
\"outcome\":\"bounced\",\"code\":550,\"enhanced\":\"5.1.1\",\"reply\":\"5.1.1 no such user\",\"mx\":\"127.0.0.1:25\",\
\"ip\":\"127.0.0.1\",\"attempt\":1,\"latency_ms\":3,\"tls\":\"TLSv1.3 TLS13_AES_128_GCM_SHA256\",\"category\":\"invalid-recipient\"}\n"
        );
        assert_eq!(b.final_count(), 1);
        assert_eq!(
            b.finals,
            vec![Final {
                key,
                outcome: Outcome::Bounced,
                retried: false,
            }]
        );
        assert_eq!(b.codes, vec![(550, 1)]);
        assert!(r.take().is_none());
    }

    /// Records one after another that share all but one of outcome, code
    /// and enhanced code each have their own (the part is formatted once
    /// and kept while they stay the same).
    #[test]
    fn a_line_says_its_own_outcome_and_codes_after_one_that_shares_some() {
        let e = |class, subject, detail| Some(Enhanced { class, subject, detail });
        let steps = [
            (Outcome::Delivered, Some(250), e(2, 0, 0)),
            (Outcome::Delivered, Some(250), e(2, 0, 0)),
            (Outcome::Delivered, Some(250), None),
            (Outcome::Delivered, Some(250), e(2, 1, 5)),
            (Outcome::Delivered, Some(251), e(2, 1, 5)),
            (Outcome::Deferred, Some(251), e(2, 1, 5)),
            (Outcome::Deferred, Some(451), e(4, 7, 1)),
            (Outcome::Deferred, None, None),
            (Outcome::Delivered, Some(250), e(2, 0, 0)),
        ];
        let mut stamp = Stamp::default();
        for (outcome, code, enhanced) in steps {
            let rec = LogRecord {
                rcpt: Some("a@b.test"),
                domain: Some("b.test"),
                code,
                enhanced,
                reply: Some("ok"),
                plain: true,
                ..bare(outcome)
            };
            let mut ours = Vec::new();
            rec.write_json(&mut ours, &mut stamp);
            assert_eq!(
                String::from_utf8(ours).unwrap(),
                serde_json::to_string(&rec).unwrap(),
                "{outcome} {code:?} {enhanced:?}"
            );
        }
    }

    proptest::proptest! {
        /// The hand-written line is the serializer's, byte for byte, whatever
        /// the strings hold (quotes, backslashes, control characters, UTF-8)
        /// and whichever fields are missing, over times in one second and apart.
        #[test]
        fn a_log_line_is_what_serde_json_writes(
            recs in proptest::collection::vec((
                0u64..4_000_000_000_000,
                proptest::option::of(".{0,12}"),
                ".{0,12}",
                proptest::option::of(0u32..100_000),
                proptest::option::of(".{0,40}"),
                proptest::option::of((0u16..1000, proptest::option::of((2u8..6, 0u16..1000, 0u16..1000)))),
                proptest::option::of(proptest::bool::ANY),
                (0u32..50, proptest::option::of(0u64..1_000_000)),
                (proptest::option::of(".{0,8}"), proptest::option::of(".{0,8}"), proptest::option::of(".{0,8}")),
                0usize..5,
            ), 1..6),
        ) {
            let mut stamp = Stamp::default();
            let mut before = 0;
            for (i, (ms, rcpt, id, line, reply, code, ip, (attempt, latency), (tls, rule, local), outcome)) in
                recs.iter().enumerate()
            {
                // Every other record in the second of the one before, and
                // every third at the very time of the one before.
                let ms = if i % 3 == 2 {
                    before
                } else if i % 2 == 1 {
                    recs[i - 1].0 / 1000 * 1000 + ms % 1000
                } else {
                    *ms
                };
                before = ms;
                let rec = LogRecord {
                    ts: SystemTime::UNIX_EPOCH + std::time::Duration::from_millis(ms),
                    id: match line {
                        Some(l) => JobId::Line(id, *l),
                        None => JobId::Given(id),
                    },
                    rcpt: rcpt.as_deref(),
                    domain: rcpt.as_deref().map(|r| r.rsplit('@').next().unwrap_or_default()),
                    outcome: Outcome::ALL[*outcome],
                    code: code.map(|c| c.0),
                    enhanced: code.and_then(|c| c.1).map(|(class, subject, detail)| Enhanced { class, subject, detail }),
                    reply: reply.as_deref(),
                    mx: tls.as_deref(),
                    ip: ip.map(|v4| if v4 { "127.0.0.9".parse().unwrap() } else { "::1".parse().unwrap() }),
                    attempt: *attempt,
                    latency_ms: *latency,
                    tls: tls.as_deref(),
                    category: local.as_deref(),
                    rule: rule.as_deref(),
                    local: local.as_deref(),
                    // Said only of text a JSON line holds as it is.
                    plain: [Some(id.as_str()), rcpt.as_deref()]
                        .into_iter()
                        .flatten()
                        .all(|s| !s.bytes().any(|b| b < 0x20 || b == b'"' || b == b'\\')),
                };
                let mut ours = Vec::new();
                rec.write_json(&mut ours, &mut stamp);
                let theirs = serde_json::to_vec(&rec).unwrap();
                proptest::prop_assert_eq!(String::from_utf8(ours).unwrap(), String::from_utf8(theirs).unwrap());
            }
        }
    }

    #[test]
    fn a_recipient_counts_as_deferred_once_until_its_final_outcome() {
        let mut r = Recorder::new(false);
        let key = RcptKey {
            file: 0,
            line: 3,
            idx: 1,
        };
        let rec = |outcome, attempt| LogRecord {
            id: JobId::Line("a.jsonl", 3),
            rcpt: Some("x@d.test"),
            domain: Some("d.test"),
            reply: Some("4.7.0 later"),
            attempt,
            ..bare(outcome)
        };
        for attempt in 1..=3 {
            r.record(key, &rec(Outcome::Deferred, attempt));
        }
        r.record(key, &rec(Outcome::Delivered, 4));
        r.record(RcptKey { idx: 2, ..key }, &rec(Outcome::Delivered, 1));
        let b = r.take().unwrap();
        assert_eq!(b.deferred, vec![key], "counted at its first deferral only");
        assert_eq!(
            b.finals.iter().map(|f| (f.key.idx, f.retried)).collect::<Vec<_>>(),
            [(1, true), (2, false)],
            "a final after a deferral takes it off the count"
        );
    }
}
