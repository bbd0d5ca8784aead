//! Spool v1: memory-mapped JSON Lines job files and the message files they
//! name. Jobs are parsed borrowing from the map (a string is copied only when
//! JSON escapes had to be decoded) and refer to it by offsets, so a job can
//! cross to a shard without copying its addresses. Validation lives here too:
//! no address that could break the SMTP command line ever leaves this module.

use std::borrow::Cow;
use std::fs::File;
use std::io;
use std::path::{Component, Path, PathBuf};

use memmap2::Mmap;
use serde::Deserialize;
use smallvec::SmallVec;

/// A read-only mapped file (spool or message). Empty files have no map.
#[derive(Debug)]
pub struct MappedFile {
    path: PathBuf,
    map: Option<Mmap>,
}

impl MappedFile {
    pub fn open(path: &Path) -> io::Result<MappedFile> {
        let file = File::open(path)?;
        let meta = file.metadata()?;
        if !meta.is_file() {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "not a regular file"));
        }
        // Safety: spool and message files are immutable once visible (the
        // producer contract in the README); volley never writes through the map.
        let map = if meta.len() == 0 {
            None
        } else {
            Some(unsafe { Mmap::map(&file)? })
        };
        Ok(MappedFile {
            path: path.to_path_buf(),
            map,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn bytes(&self) -> &[u8] {
        self.map.as_deref().unwrap_or(&[])
    }
}

/// A string of a job: a place in the spool file's map, or owned when it held JSON escapes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Span {
    Map { off: usize, len: usize },
    Owned(Box<str>),
}

impl Span {
    fn from_cow(base: &[u8], s: Cow<'_, str>) -> Span {
        match s {
            Cow::Borrowed(b) => {
                let off = b.as_ptr() as usize - base.as_ptr() as usize;
                debug_assert!(off + b.len() <= base.len());
                Span::Map { off, len: b.len() }
            }
            Cow::Owned(o) => Span::Owned(o.into_boxed_str()),
        }
    }

    /// Whether it is all ASCII, given the map of the spool file it came from.
    #[inline]
    pub fn is_ascii(&self, map: &[u8]) -> bool {
        match self {
            Span::Map { off, len } => span_is_ascii(map, *off, &map[*off..*off + *len]),
            Span::Owned(s) => s.is_ascii(),
        }
    }

    /// The string, given the map of the spool file it came from.
    #[inline]
    pub fn get<'a>(&'a self, map: &'a [u8]) -> &'a str {
        match self {
            // Every Map span was cut from a `&str` that serde_json checked, on char boundaries.
            Span::Map { off, len } => {
                let bytes = &map[*off..*off + *len];
                if span_is_ascii(map, *off, bytes) {
                    // SAFETY: ASCII is UTF-8 (most spans are addresses and
                    // ids, read on every line and transaction: checked
                    // without a loop).
                    unsafe { std::str::from_utf8_unchecked(bytes) }
                } else {
                    std::str::from_utf8(bytes).expect("span lies on UTF-8 the parser checked")
                }
            }
            Span::Owned(s) => s,
        }
    }
}

/// Whether `bytes`, which lie at `off` in `map`, are all ASCII: the same
/// answer as `bytes.is_ascii()`. A span of up to 32 bytes, the usual
/// address or id, is read as one or two 16-byte loads (the first and the
/// last 16 bytes of it; for a shorter one, 16 bytes of the map around it
/// with the bytes outside it masked off) instead of a loop.
#[inline]
fn span_is_ascii(map: &[u8], off: usize, bytes: &[u8]) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_mm_loadu_si128, _mm_movemask_epi8};
        let len = bytes.len();
        debug_assert!(std::ptr::eq(bytes.as_ptr(), map[off..].as_ptr()));
        // Bytes of 0x80 and above, one bit each, of the 16 bytes from `p`.
        // SAFETY (every call below): the 16 bytes from `p` lie inside
        // `bytes` or inside `map`, as the test before it checks; an
        // unaligned load takes any address. SSE2 is part of x86_64.
        unsafe fn high(p: *const u8) -> u32 {
            unsafe { _mm_movemask_epi8(_mm_loadu_si128(p.cast())) as u32 }
        }
        if (16..=32).contains(&len) {
            // The first and the last 16 bytes of the span (they overlap
            // when it is shorter than 32).
            return unsafe { high(bytes.as_ptr()) | high(bytes[len - 16..].as_ptr()) } == 0;
        }
        if len < 16 {
            let mask = (1u32 << len) - 1;
            if off + 16 <= map.len() {
                // The span and the bytes after it.
                return unsafe { high(bytes.as_ptr()) } & mask == 0;
            }
            if off + len >= 16 {
                // The bytes before the span and the span, which ends the 16.
                return unsafe { high(map[off + len - 16..].as_ptr()) } & (mask << (16 - len)) == 0;
            }
        }
    }
    bytes.is_ascii()
}

/// Where a job's message is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobBody {
    /// A path relative to the spool file's folder.
    File(Span),
    /// The message itself.
    Inline(Span),
}

/// One parsed job line; its strings are spans into the spool map.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Job {
    pub id: Option<Span>,
    pub from: Span,
    /// Inline for one recipient, the usual newsletter job (no allocation per line).
    pub to: SmallVec<[Span; 1]>,
    pub body: JobBody,
    /// Spool v2: the message is a template rendered per recipient.
    pub personal: Option<Personal>,
    /// Spool v2: each recipient's envelope sender, from this template (VERP).
    pub verp: Option<Span>,
    /// Spool v2: the List-Unsubscribe this job's copies get (a template).
    pub list_unsubscribe: Option<Span>,
}

/// What a personalised job adds (spool v2): its variables and each
/// recipient's, as the JSON text of objects (parsed when rendering).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Personal {
    pub vars: Option<Span>,
    /// Per recipient of `to` (same order): its own variables, if any.
    pub rcpt_vars: Vec<Option<Span>>,
}

/// A string that borrows from the input unless it holds escapes (a bare
/// `Cow<str>` deserializes owned; only a `borrow` field borrows).
#[derive(Deserialize)]
#[serde(transparent)]
struct BorrowedStr<'a>(#[serde(borrow)] Cow<'a, str>);

/// One element of `to`: an address (v1), or `{"rcpt": …, "vars": {…}}`
/// (v2), read in the one pass over the line (a borrowed string unless it
/// holds escapes).
struct RawTo<'a> {
    rcpt: Cow<'a, str>,
    /// Written as an object (whose `vars` may still be absent).
    object: bool,
    vars: Option<&'a serde_json::value::RawValue>,
}

impl<'de: 'a, 'a> Deserialize<'de> for RawTo<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> serde::de::Visitor<'de> for V<'a> {
            type Value = RawTo<'a>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an address or {\"rcpt\": …, \"vars\": {…}}")
            }
            fn visit_borrowed_str<E: serde::de::Error>(self, v: &'de str) -> Result<RawTo<'a>, E> {
                Ok(RawTo {
                    rcpt: Cow::Borrowed(v),
                    object: false,
                    vars: None,
                })
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<RawTo<'a>, E> {
                Ok(RawTo {
                    rcpt: Cow::Owned(v.to_owned()),
                    object: false,
                    vars: None,
                })
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut m: A) -> Result<RawTo<'a>, A::Error> {
                let (mut rcpt, mut vars) = (None, None);
                while let Some(BorrowedStr(key)) = m.next_key::<BorrowedStr<'de>>()? {
                    match &*key {
                        "rcpt" if rcpt.is_none() => rcpt = Some(m.next_value::<BorrowedStr<'de>>()?.0),
                        "vars" if vars.is_none() => vars = Some(m.next_value::<&'de serde_json::value::RawValue>()?),
                        "rcpt" | "vars" => return Err(serde::de::Error::custom(format!("duplicate field `{key}`"))),
                        other => return Err(serde::de::Error::unknown_field(other, &["rcpt", "vars"])),
                    }
                }
                Ok(RawTo {
                    rcpt: rcpt.ok_or_else(|| serde::de::Error::missing_field("rcpt"))?,
                    object: true,
                    vars,
                })
            }
        }
        d.deserialize_any(V(std::marker::PhantomData))
    }
}

#[derive(Deserialize)]
struct RawJob<'a> {
    #[serde(borrow, default)]
    id: Option<Cow<'a, str>>,
    #[serde(borrow)]
    from: Cow<'a, str>,
    #[serde(borrow)]
    to: SmallVec<[RawTo<'a>; 1]>,
    #[serde(borrow, default)]
    vars: Option<&'a serde_json::value::RawValue>,
    #[serde(default)]
    template: bool,
    #[serde(borrow, default)]
    verp: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    list_unsubscribe: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    message: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    data: Option<Cow<'a, str>>,
}

/// The `"id"` of a line that did not parse as a job, if it is a JSON
/// object with a string id.
pub fn id_of_bad_line(line: &[u8]) -> Option<String> {
    #[derive(Deserialize)]
    struct IdOnly<'a> {
        #[serde(borrow)]
        id: Option<Cow<'a, str>>,
    }
    let v: IdOnly<'_> = serde_json::from_slice(line).ok()?;
    v.id.map(Cow::into_owned).filter(|id| !id.is_empty())
}

/// Where the plain text of a JSON string that starts at `from` of the line
/// at `base` in `map` (`len` bytes long) ends: the first byte at or after
/// `from` that is a quote, a backslash, a control character or not ASCII,
/// or `len`. Sixteen bytes at a time where the map has them (bytes past
/// the line only count when before `len`).
#[inline]
fn plain_run(map: &[u8], base: usize, len: usize, from: usize) -> usize {
    let mut j = from;
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{
            _mm_cmpeq_epi8, _mm_cmplt_epi8, _mm_loadu_si128, _mm_movemask_epi8, _mm_or_si128, _mm_set1_epi8,
        };
        while j < len && base + j + 16 <= map.len() {
            // SAFETY: the 16 bytes from base + j lie inside `map` (checked
            // above); an unaligned load takes any address. SSE2 is part of x86_64.
            let hits = unsafe {
                let v = _mm_loadu_si128(map.as_ptr().add(base + j).cast());
                let quote = _mm_cmpeq_epi8(v, _mm_set1_epi8(b'"' as i8));
                let backslash = _mm_cmpeq_epi8(v, _mm_set1_epi8(b'\\' as i8));
                // Signed bytes: below 0x20 are the control characters and
                // every byte from 0x80 (negative).
                let other = _mm_cmplt_epi8(v, _mm_set1_epi8(0x20));
                _mm_movemask_epi8(_mm_or_si128(_mm_or_si128(quote, backslash), other)) as u32
            };
            if hits != 0 {
                return (j + hits.trailing_zeros() as usize).min(len);
            }
            j += 16;
        }
    }
    let b = &map[base..base + len];
    while j < len && !matches!(b[j], b'"' | b'\\' | 0..=0x1f | 0x80..) {
        j += 1;
    }
    j
}

/// The usual line, read without serde: one object whose members are the
/// string fields of a job and a `to` array of strings, every string ASCII
/// with no escape or control character, any JSON whitespace between tokens,
/// and a job that needs no error said (recipients, one body, a good or empty
/// `from`). It answers `None` for anything else (an escape, non-ASCII text,
/// `null`, `vars`, `template`, a recipient object, an unknown or repeated
/// key, a syntax error, a job to refuse), and serde_json reads that line
/// instead, so the two agree on every line (a property test holds them to
/// it): this is only the fast way through. The job is built straight from
/// the bytes: every byte it accepts is ASCII, so the line needs no UTF-8
/// check of its own.
fn scan_plain(map: &[u8], line: &[u8], parser: &mut JobParser) -> Option<Job> {
    /// Member keys the scan knows, as bits of `seen`.
    const ID: u8 = 1;
    const FROM: u8 = 2;
    const TO: u8 = 4;
    const MESSAGE: u8 = 8;
    const DATA: u8 = 16;
    const VERP: u8 = 32;
    const UNSUBSCRIBE: u8 = 64;
    let b = line;
    let base = line.as_ptr() as usize - map.as_ptr() as usize;
    let mut i = 0;
    let ws = |i: &mut usize| {
        while *i < b.len() && matches!(b[*i], b' ' | b'\t' | b'\n' | b'\r') {
            *i += 1;
        }
    };
    // A string from its opening quote: where its text lies in `line`, with
    // `i` past the closing quote.
    let string = |i: &mut usize| -> Option<(usize, usize)> {
        if b.get(*i) != Some(&b'"') {
            return None;
        }
        let start = *i + 1;
        let j = plain_run(map, base, b.len(), start);
        if b.get(j) != Some(&b'"') {
            return None;
        }
        *i = j + 1;
        Some((start, j))
    };
    let span = |(start, end): (usize, usize)| Span::Map {
        off: base + start,
        len: end - start,
    };
    // After a value: a comma (true: another follows) or `close` (false: the
    // list ends), `i` past it and the whitespace after a comma.
    let next = |i: &mut usize, close: u8| -> Option<bool> {
        ws(i);
        let c = *b.get(*i)?;
        *i += 1;
        if c == b',' {
            ws(i);
            Some(true)
        } else {
            (c == close).then_some(false)
        }
    };
    let (mut id, mut from, mut to) = (None, (0, 0), SmallVec::new());
    let (mut message, mut data, mut verp, mut list_unsubscribe) = (None, None, None, None);
    let mut seen = 0u8;
    ws(&mut i);
    if b.get(i) != Some(&b'{') {
        return None;
    }
    i += 1;
    ws(&mut i);
    loop {
        let key = string(&mut i)?;
        let bit = match &b[key.0..key.1] {
            b"id" => ID,
            b"from" => FROM,
            b"to" => TO,
            b"message" => MESSAGE,
            b"data" => DATA,
            b"verp" => VERP,
            b"list_unsubscribe" => UNSUBSCRIBE,
            _ => return None,
        };
        if seen & bit != 0 {
            return None;
        }
        seen |= bit;
        ws(&mut i);
        if b.get(i) != Some(&b':') {
            return None;
        }
        i += 1;
        ws(&mut i);
        if bit == TO {
            if b.get(i) != Some(&b'[') {
                return None;
            }
            i += 1;
            ws(&mut i);
            loop {
                to.push(span(string(&mut i)?));
                if !next(&mut i, b']')? {
                    break;
                }
            }
        } else {
            let v = string(&mut i)?;
            match bit {
                ID => id = Some(v),
                FROM => from = v,
                MESSAGE => message = Some(v),
                DATA => data = Some(v),
                VERP => verp = Some(v),
                _ => list_unsubscribe = Some(v),
            }
        }
        if !next(&mut i, b'}')? {
            break;
        }
    }
    ws(&mut i);
    if i != b.len() || seen & (FROM | TO) != FROM | TO {
        return None;
    }
    let body = match (message, data) {
        (Some(m), None) => JobBody::File(span(m)),
        (None, Some(d)) => JobBody::Inline(span(d)),
        _ => return None,
    };
    // Lines in a row mostly have one sender: checked once.
    let sender = &b[from.0..from.1];
    if !sender.is_empty() && *parser.good_sender != *sender {
        // ASCII (checked above), so UTF-8.
        validate_address(std::str::from_utf8(sender).ok()?).ok()?;
        parser.good_sender.clear();
        parser.good_sender.extend_from_slice(sender);
    }
    Some(Job {
        id: id.map(span),
        from: span(from),
        to,
        body,
        personal: None,
        verp: verp.map(span),
        list_unsubscribe: list_unsubscribe.map(span),
    })
}

/// Parses one line (without its newline) lying inside `map`. The error is
/// the reason, for the caller to prefix with file and line.
pub fn parse_job(map: &[u8], line: &[u8]) -> Result<Job, String> {
    JobParser::default().parse(map, line)
}

/// Reads job lines one after another ([`parse_job`]), remembering the last
/// sender address found good (the next line's is mostly the same).
#[derive(Debug, Default)]
pub struct JobParser {
    good_sender: Vec<u8>,
}

impl JobParser {
    pub fn parse(&mut self, map: &[u8], line: &[u8]) -> Result<Job, String> {
        parse_job_with(map, line, Some(self))
    }
}

/// [`parse_job`], trying [`scan_plain`] first when given a parser.
fn parse_job_with(map: &[u8], line: &[u8], scan: Option<&mut JobParser>) -> Result<Job, String> {
    if let Some(job) = scan.and_then(|p| scan_plain(map, line, p)) {
        return Ok(job);
    }
    let text = std::str::from_utf8(line).map_err(|e| format!("not UTF-8 ({e})"))?;
    let raw: RawJob<'_> = serde_json::from_str(text).map_err(|e| format!("not a valid job: {e}"))?;
    if raw.to.is_empty() {
        return Err("\"to\" is empty".into());
    }
    if !raw.from.is_empty() {
        validate_address(&raw.from).map_err(|why| format!("bad \"from\" address {:?}: {why}", raw.from))?;
    }
    let body = match (raw.message, raw.data) {
        (Some(m), None) => JobBody::File(Span::from_cow(map, m)),
        (None, Some(d)) => JobBody::Inline(Span::from_cow(map, d)),
        (Some(_), Some(_)) => return Err("has both \"message\" and \"data\"; give one".into()),
        (None, None) => return Err("has neither \"message\" nor \"data\"".into()),
    };
    let object = |v: &serde_json::value::RawValue, what: &str| -> Result<Span, String> {
        if !v.get().starts_with('{') {
            return Err(format!("{what} must be an object, not {}", v.get()));
        }
        Ok(Span::from_cow(map, Cow::Borrowed(v.get())))
    };
    let mut to = SmallVec::with_capacity(raw.to.len());
    let mut rcpt_vars = Vec::new();
    for (i, r) in raw.to.into_iter().enumerate() {
        if r.object {
            if rcpt_vars.is_empty() {
                rcpt_vars.resize(i, None);
            }
            rcpt_vars.push(r.vars.map(|v| object(v, &format!("to[{i}].vars"))).transpose()?);
        } else if !rcpt_vars.is_empty() {
            rcpt_vars.push(None);
        }
        to.push(Span::from_cow(map, r.rcpt));
    }
    if !rcpt_vars.is_empty() {
        rcpt_vars.resize(to.len(), None);
    }
    let vars = raw.vars.map(|v| object(v, "\"vars\"")).transpose()?;
    let personal = (raw.template || vars.is_some() || !rcpt_vars.is_empty()).then_some(Personal { vars, rcpt_vars });
    Ok(Job {
        id: raw.id.map(|s| Span::from_cow(map, s)),
        from: Span::from_cow(map, raw.from),
        to,
        body,
        personal,
        verp: raw.verp.map(|v| Span::from_cow(map, v)),
        list_unsubscribe: raw.list_unsubscribe.map(|v| Span::from_cow(map, v)),
    })
}

/// What a byte is to [`validate_address`]: most are ordinary.
const ORDINARY: u8 = 0;
const AT: u8 = 1;
const DOT: u8 = 2;
const REFUSED: u8 = 3;
static ADDRESS_BYTE: [u8; 256] = {
    let mut t = [ORDINARY; 256];
    let mut b = 0;
    while b < 256 {
        if b <= b' ' as usize || b == b'<' as usize || b == b'>' as usize || b == 0x7f {
            t[b] = REFUSED;
        }
        b += 1;
    }
    t[b'@' as usize] = AT;
    t[b'.' as usize] = DOT;
    t
};

/// Checks that an address can be written inside `<...>` on an SMTP command line.
pub fn validate_address(addr: &str) -> Result<(), &'static str> {
    address_domain(addr).map(|_| ())
}

/// [`validate_address`], answering the address's domain (after its last
/// `@`, found on the way) when it is good.
pub fn address_domain(addr: &str) -> Result<&str, &'static str> {
    if addr.len() > 254 {
        return Err("longer than 254 octets");
    }
    #[cfg(target_arch = "x86_64")]
    if addr.len() <= 64 {
        return short_address_domain(addr);
    }
    address_domain_bytewise(addr)
}

/// The reason for a byte that cannot stand on a command line.
fn refused_byte(b: u8) -> &'static str {
    match b {
        b'\r' | b'\n' => "contains CR or LF",
        b'<' | b'>' => "contains < or >",
        b' ' => "contains a space",
        _ => "contains a control character",
    }
}

/// [`address_domain`] of an address of up to 64 bytes (most are): each
/// test is a bit mask over its bytes, made 16 bytes at a time, instead of
/// a branch per byte.
#[cfg(target_arch = "x86_64")]
fn short_address_domain(addr: &str) -> Result<&str, &'static str> {
    use std::arch::x86_64::{
        _mm_cmpeq_epi8, _mm_loadu_si128, _mm_min_epu8, _mm_movemask_epi8, _mm_or_si128, _mm_set1_epi8,
    };
    let bytes = addr.as_bytes();
    let len = bytes.len();
    debug_assert!(len <= 64);
    // Padded with an ordinary byte.
    let mut buf = [b'a'; 64];
    buf[..len].copy_from_slice(bytes);
    let (mut refused, mut at, mut dot) = (0u64, 0u64, 0u64);
    // The chunks the address reaches (the rest is padding).
    for (k, chunk) in buf.chunks_exact(16).take(len.div_ceil(16)).enumerate() {
        // SAFETY: `chunk` is 16 bytes; an unaligned load takes any address.
        // SSE2 is part of x86_64.
        let (r, a, d) = unsafe {
            let v = _mm_loadu_si128(chunk.as_ptr().cast());
            let eq = |c: u8| _mm_cmpeq_epi8(v, _mm_set1_epi8(c as i8));
            // Unsigned: up to the space, then < > and DEL.
            let low = _mm_cmpeq_epi8(_mm_min_epu8(v, _mm_set1_epi8(b' ' as i8)), v);
            let r = _mm_or_si128(_mm_or_si128(low, eq(0x7f)), _mm_or_si128(eq(b'<'), eq(b'>')));
            (
                _mm_movemask_epi8(r) as u16,
                _mm_movemask_epi8(eq(b'@')) as u16,
                _mm_movemask_epi8(eq(b'.')) as u16,
            )
        };
        refused |= u64::from(r) << (16 * k);
        at |= u64::from(a) << (16 * k);
        dot |= u64::from(d) << (16 * k);
    }
    // The first byte that cannot stand on a command line says why.
    if refused != 0 {
        return Err(refused_byte(bytes[refused.trailing_zeros() as usize]));
    }
    if at == 0 {
        return Err("has no @");
    }
    let at = 63 - at.leading_zeros() as usize;
    if at == 0 {
        return Err("has an empty local part");
    }
    let domain = &bytes[at + 1..];
    if domain.is_empty() {
        return Err("has an empty domain");
    }
    // Two dots in a row after the `@` (the padding has none).
    let pairs = dot & (dot >> 1);
    if domain[0] == b'.' || domain[domain.len() - 1] == b'.' || pairs >> at != 0 {
        return Err("has a malformed domain");
    }
    // `@` is ASCII: the domain starts on a char boundary.
    Ok(&addr[at + 1..])
}

/// [`address_domain`] a byte at a time, for addresses past 64 bytes.
fn address_domain_bytewise(addr: &str) -> Result<&str, &'static str> {
    let bytes = addr.as_bytes();
    // One pass: the first byte that cannot stand on a command line says
    // why; the last `@` and the last ".." are found on the way.
    let (mut at, mut dots, mut last_dot) = (None, None, None);
    for (i, &b) in bytes.iter().enumerate() {
        match ADDRESS_BYTE[b as usize] {
            ORDINARY => {}
            AT => at = Some(i),
            DOT => {
                if i > 0 && last_dot == Some(i - 1) {
                    dots = Some(i - 1);
                }
                last_dot = Some(i);
            }
            _ => return Err(refused_byte(b)),
        }
    }
    let Some(at) = at else {
        return Err("has no @");
    };
    if at == 0 {
        return Err("has an empty local part");
    }
    let domain = &bytes[at + 1..];
    if domain.is_empty() {
        return Err("has an empty domain");
    }
    if domain[0] == b'.' || domain[domain.len() - 1] == b'.' || dots.is_some_and(|d| d > at) {
        return Err("has a malformed domain");
    }
    // `@` is ASCII: the domain starts on a char boundary.
    Ok(&addr[at + 1..])
}

/// The domain of a validated address (after the last `@`).
pub fn domain_of(addr: &str) -> &str {
    addr.rsplit_once('@').map_or("", |(_, d)| d)
}

/// Resolves a job's `message` path against the spool file's folder; paths
/// that are absolute or climb out of it with `..` are refused.
pub fn message_path(spool: &Path, name: &str) -> Result<PathBuf, String> {
    let rel = Path::new(name);
    if name.is_empty() {
        return Err("\"message\" is empty".into());
    }
    if rel
        .components()
        .any(|c| !matches!(c, Component::Normal(_) | Component::CurDir))
    {
        return Err(format!("\"message\" path {name:?} must stay inside the spool folder"));
    }
    Ok(spool.parent().unwrap_or(Path::new(".")).join(rel))
}

/// A place in a mapped file that yields its lines one at a time:
/// (1-based line number, bytes without the line end), blank lines skipped.
/// It holds offsets only, so a reader can keep it across turns.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LineCursor {
    /// Byte offset of the next line.
    pub pos: usize,
    /// Number of the last line passed (1-based).
    pub line_no: u32,
}

/// The UTF-8 byte order mark some editors and exporters put first in a file.
const BOM: &[u8] = b"\xef\xbb\xbf";

impl LineCursor {
    pub fn next_line<'a>(&mut self, map: &'a [u8]) -> Option<(u32, &'a [u8])> {
        if self.pos == 0 && map.starts_with(BOM) {
            self.pos = BOM.len();
        }
        while self.pos < map.len() {
            let rest = &map[self.pos..];
            let end = memchr::memchr(b'\n', rest).unwrap_or(rest.len());
            self.pos += end + 1;
            self.line_no += 1;
            let raw = &rest[..end];
            let line = raw.strip_suffix(b"\r").unwrap_or(raw);
            if !line.iter().all(u8::is_ascii_whitespace) {
                return Some((self.line_no, line));
            }
        }
        None
    }

    /// The line that starts at byte `off` (as [`LineCursor::next_line`] gave it).
    pub fn line_at(map: &[u8], off: usize) -> &[u8] {
        let rest = &map[off..];
        let raw = &rest[..memchr::memchr(b'\n', rest).unwrap_or(rest.len())];
        raw.strip_suffix(b"\r").unwrap_or(raw)
    }

    pub fn at_end(&self, map: &[u8]) -> bool {
        self.pos >= map.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_span_is_ascii_exactly_when_its_bytes_are() {
        // Every span of maps of every length up to 48, with bytes of 0x80
        // and above just before, inside and just after the spans.
        for map_len in 0..48usize {
            for bad in [
                None,
                Some(0),
                Some(7),
                Some(15),
                Some(16),
                Some(17),
                Some(31),
                Some(32),
                Some(47),
            ] {
                let map: Vec<u8> = (0..map_len)
                    .map(|i| if Some(i) == bad { 0xC3 } else { b'a' + (i % 26) as u8 })
                    .collect();
                for off in 0..=map_len {
                    for len in 0..=map_len - off {
                        let bytes = &map[off..off + len];
                        assert_eq!(
                            span_is_ascii(&map, off, bytes),
                            bytes.is_ascii(),
                            "map of {map_len}, byte {bad:?} not ASCII, span {off}+{len}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn borrows_plain_strings_and_owns_escaped_ones() {
        let map = br#"{"id":"j1","from":"b@x.test","to":["a@y.test","\u0063@y.test"],"message":"m.eml","extra":1}"#;
        let job = parse_job(map, map).unwrap();
        assert!(matches!(job.from, Span::Map { .. }));
        assert_eq!(job.from.get(map), "b@x.test");
        assert!(matches!(job.to[0], Span::Map { .. }));
        assert_eq!(job.to[1], Span::Owned("c@y.test".into()));
        assert_eq!(job.id.unwrap().get(map), "j1");
        assert!(matches!(job.body, JobBody::File(ref s) if s.get(map) == "m.eml"));
    }

    #[test]
    fn recipients_as_strings_and_objects_keep_their_own_variables() {
        let map = br#"{"from":"b@x.test","to":[{"rcpt":"a@y.test","vars":{"n":1}},"b@y.test",{"rcpt":"c@y.test"},{"rcpt":"d\u0040y.test","vars":{"n":4}}],"data":"x"}"#;
        let job = parse_job(map, map).unwrap();
        let to: Vec<_> = job.to.iter().map(|s| s.get(map)).collect();
        assert_eq!(to, ["a@y.test", "b@y.test", "c@y.test", "d@y.test"]);
        // An object's address borrows from the line unless it holds escapes.
        assert!(matches!(job.to[0], Span::Map { .. }));
        assert!(matches!(job.to[2], Span::Map { .. }));
        assert_eq!(job.to[3], Span::Owned("d@y.test".into()));
        let vars: Vec<_> = job
            .personal
            .unwrap()
            .rcpt_vars
            .iter()
            .map(|v| v.as_ref().map(|s| s.get(map).to_string()))
            .collect();
        assert_eq!(
            vars,
            [Some("{\"n\":1}".to_string()), None, None, Some("{\"n\":4}".to_string())]
        );
        for (line, want) in [
            (
                r#"{"from":"","to":[{"rcpt":"a@b","x":1}],"data":"x"}"#,
                "unknown field `x`",
            ),
            (r#"{"from":"","to":[{"vars":{}}],"data":"x"}"#, "missing field `rcpt`"),
            (
                r#"{"from":"","to":[{"rcpt":"a@b","rcpt":"c@d"}],"data":"x"}"#,
                "duplicate field `rcpt`",
            ),
            (r#"{"from":"","to":[7],"data":"x"}"#, "expected an address or"),
            (
                r#"{"from":"","to":[{"rcpt":"a@b","vars":[1]}],"data":"x"}"#,
                "to[0].vars must be an object",
            ),
        ] {
            let err = parse_job(line.as_bytes(), line.as_bytes()).unwrap_err();
            assert!(err.contains(want), "{line}: {err}");
        }
        let bad = b"{\"from\":\"\",\"to\":[\"a\xff@b\"],\"data\":\"x\"}";
        assert!(parse_job(bad, bad).unwrap_err().contains("not UTF-8"));
    }

    /// Lines near the usual shape: the members of a job and others, strings
    /// with and without escapes, quotes and control characters, `null`,
    /// objects, numbers, odd whitespace and broken syntax.
    fn near_job_line() -> impl Strategy<Value = String> {
        let text = prop_oneof!["[a-z@.]{0,6}", "[a-z@. <>\\\\\"\\x01\\x7fé]{0,5}", Just(String::new()),];
        let string = text.prop_map(|t| format!("\"{t}\""));
        let ws = prop_oneof![Just(""), Just(""), Just(" "), Just("\t"), Just(" \r\n")];
        let value = prop_oneof![
            4 => string.clone(),
            1 => Just("null".to_string()),
            1 => Just("true".to_string()),
            1 => Just("7".to_string()),
            1 => Just("{\"n\":1}".to_string()),
            3 => prop::collection::vec(prop_oneof![3 => string.clone(), 1 => Just("{\"rcpt\":\"a@b\"}".to_string())], 0..3)
                .prop_map(|v| format!("[{}]", v.join(","))),
        ];
        let key = prop_oneof![
            Just("id"),
            Just("from"),
            Just("to"),
            Just("message"),
            Just("data"),
            Just("verp"),
            Just("list_unsubscribe"),
            Just("vars"),
            Just("template"),
            Just("x"),
        ];
        let member = |key: BoxedStrategy<&'static str>, value: BoxedStrategy<String>| {
            (key, ws.clone(), value, ws.clone()).prop_map(|(k, w1, v, w2)| format!("\"{k}\"{w1}:{w2}{v}"))
        };
        let address = "[a-z]{1,3}@[a-z]{1,3}\\.test".prop_map(|a| format!("\"{a}\""));
        // Closed with `]`, now and then with the object's brace instead.
        let to = (
            prop::collection::vec(address.clone(), 1..3),
            prop_oneof![8 => Just("]"), 1 => Just("}")],
        )
            .prop_map(|(v, close)| format!("[{}{close}", v.join(",")));
        // Most lines hold a whole job (so most could be read either way), in any order, among other members.
        let usual = prop_oneof![
            6 => (
                member(Just("from").boxed(), prop_oneof![3 => address, 1 => string.clone()].boxed()),
                member(Just("to").boxed(), prop_oneof![3 => to, 1 => value.clone()].boxed()),
                member(prop_oneof![Just("message"), Just("data")].boxed(), string.boxed()),
            )
                .prop_map(|(a, b, c)| vec![a, b, c]),
            1 => Just(Vec::new()),
        ];
        let others = prop::collection::vec(member(key.boxed(), value.boxed()), 0..3);
        let sep = prop_oneof![12 => Just(","), 1 => Just(" , "), 1 => Just(""), 1 => Just(",,")];
        let end = prop_oneof![12 => Just("}"), 1 => Just(""), 1 => Just("} x"), 1 => Just("}}"), 1 => Just("]")];
        (
            ws.clone(),
            usual,
            others,
            any::<u64>(),
            prop::collection::vec(sep, 6),
            ws,
            end,
        )
            .prop_map(|(w, usual, others, order, seps, w2, end)| {
                let mut members: Vec<String> = usual.into_iter().chain(others).collect();
                // A shuffle led by the drawn number.
                let n = members.len();
                for i in (1..n).rev() {
                    members.swap(i, (order >> (i * 3)) as usize % (i + 1));
                }
                let mut line = format!("{w}{{");
                for (i, m) in members.iter().enumerate() {
                    if i > 0 {
                        line.push_str(seps[i]);
                    }
                    line.push_str(m);
                }
                format!("{line}{w2}{end}")
            })
    }

    proptest::proptest! {
        #![proptest_config(ProptestConfig::with_cases(4000))]
        #[test]
        fn the_plain_scan_agrees_with_serde(line in near_job_line(), framed in proptest::bool::ANY) {
            // Alone, or inside a map with lines before and after it whose
            // bytes (quotes, escapes, control characters, UTF-8) the scan
            // reads sixteen at a time but must not count.
            let text = if framed {
                format!("{{\"id\":\"before\"}}\n{line}\n\"\\\u{1}é\"}}\n{{\"to\":[\"\\u0041\"]}}\n")
            } else {
                line.clone()
            };
            let b = text.as_bytes();
            let at = if framed { text.find('\n').unwrap() + 1 } else { 0 };
            let l = &b[at..at + line.len()];
            // Compared as the strings the spans hold (serde_json owns an empty string; the scan borrows it).
            let text = |s: &Span| s.get(b).to_string();
            let read = |job: Result<Job, String>| {
                job.map(|j| {
                    let body = match &j.body {
                        JobBody::File(s) => ("file", text(s)),
                        JobBody::Inline(s) => ("inline", text(s)),
                    };
                    let personal = j.personal.as_ref().map(|p| {
                        (p.vars.as_ref().map(text), p.rcpt_vars.iter().map(|v| v.as_ref().map(text)).collect::<Vec<_>>())
                    });
                    let to: Vec<String> = j.to.iter().map(text).collect();
                    (j.id.as_ref().map(text), text(&j.from), to, body, personal, j.verp.as_ref().map(text), j.list_unsubscribe.as_ref().map(text))
                })
            };
            proptest::prop_assert_eq!(read(parse_job_with(b, l, Some(&mut JobParser::default()))), read(parse_job_with(b, l, None)), "{}", line);
        }
    }

    #[test]
    fn the_usual_line_is_read_by_the_plain_scan() {
        let line = br#"{"id":"gen-1","from":"b@x.test","to":["a@y.test"],"message":"m.eml"}"#;
        let job = scan_plain(line, line, &mut JobParser::default()).expect("the usual line scans");
        assert_eq!(job.from.get(line), "b@x.test");
        assert_eq!(job.to.len(), 1);
        assert_eq!(job.to[0].get(line), "a@y.test");
        assert_eq!(job.id.as_ref().map(|s| s.get(line)), Some("gen-1"));
        assert!(matches!(&job.body, JobBody::File(s) if s.get(line) == "m.eml"));
        for line in [
            r#"{"id":"gen-1","from":"b@x.test","to":["a\u0040y.test"],"message":"m.eml"}"#,
            r#"{"id":null,"from":"b@x.test","to":["a@y.test"],"message":"m.eml"}"#,
            r#"{"from":"b@x.test","from":"c@x.test","to":["a@y.test"],"message":"m.eml"}"#,
            r#"{"from":"b@x.test","to":["a@y.test"],"message":"m.eml","x":1}"#,
            // Left to serde_json, which reads them or says what is wrong.
            r#"{"from":"b@x.test","to":["andré@y.test"],"message":"m.eml"}"#,
            r#"{"from":"b@x.test","to":[],"message":"m.eml"}"#,
            r#"{"from":"b@x.test","to":["a@y.test"]}"#,
            r#"{"from":"b@x.test","to":["a@y.test"],"message":"m.eml","data":"x"}"#,
            r#"{"from":"b x@x.test","to":["a@y.test"],"message":"m.eml"}"#,
        ] {
            assert!(
                scan_plain(line.as_bytes(), line.as_bytes(), &mut JobParser::default()).is_none(),
                "{line}"
            );
        }
    }

    #[test]
    fn a_sender_is_checked_again_unless_it_is_the_last_one_found_good() {
        let mut p = JobParser::default();
        let line = |from: &str| format!(r#"{{"from":"{from}","to":["a@y.test"],"message":"m.eml"}}"#);
        for (from, good) in [
            ("b@x.test", true),
            ("b@x.test", true),
            ("b@x.tes", true),
            ("b@x.tes.", false),
            ("b@x.tes", true),
            ("b x@x.tes", false),
            ("", true),
            ("b x@x.tes", false),
        ] {
            let l = line(from);
            let got = p.parse(l.as_bytes(), l.as_bytes());
            assert_eq!(got.is_ok(), good, "{from:?}: {got:?}");
            if let Err(e) = got {
                assert!(e.contains("bad \"from\" address"), "{e}");
            }
        }
    }

    #[test]
    fn a_line_that_is_not_utf8_is_refused_whatever_reads_it() {
        let line = b"{\"from\":\"b@x.test\",\"to\":[\"a\xff@y.test\"],\"message\":\"m.eml\"}";
        let e = parse_job(line, line).unwrap_err();
        assert!(e.starts_with("not UTF-8"), "{e}");
    }

    #[test]
    fn bad_lines_say_why() {
        let cases: &[(&str, &str)] = &[
            ("not json", "not a valid job"),
            (r#"{"from":"a@b","to":[],"data":"x"}"#, "\"to\" is empty"),
            (r#"{"to":["a@b"],"data":"x"}"#, "missing field `from`"),
            (r#"{"from":"a@b","to":"a@b","data":"x"}"#, "invalid type"),
            (r#"{"from":"a@b","to":["c@d"]}"#, "neither"),
            (r#"{"from":"a@b","to":["c@d"],"data":"x","message":"m"}"#, "both"),
            (r#"{"from":"a b@c","to":["c@d"],"data":"x"}"#, "bad \"from\" address"),
        ];
        for (line, want) in cases {
            let err = parse_job(line.as_bytes(), line.as_bytes()).unwrap_err();
            assert!(err.contains(want), "{line}: {err}");
        }
        assert!(parse_job(b"\xff", b"\xff").unwrap_err().contains("not UTF-8"));
    }

    #[test]
    fn null_reverse_path_is_allowed() {
        let line = br#"{"from":"","to":["a@b.test"],"data":"x"}"#;
        assert_eq!(parse_job(line, line).unwrap().from.get(line), "");
    }

    #[test]
    fn addresses() {
        let long = format!("{}@example.com", "a".repeat(250));
        let bad: &[(&str, &str)] = &[
            ("a\r\nRCPT TO:<x@y>@b", "CR or LF"),
            ("a>b@c", "< or >"),
            ("a b@c", "space"),
            ("a\0b@c", "control"),
            ("a\tb@c", "control"),
            ("nobody", "no @"),
            ("@c", "empty local part"),
            ("a@", "empty domain"),
            ("a@b..c", "malformed domain"),
            (&long, "254"),
        ];
        for (addr, want) in bad {
            let err = validate_address(addr).unwrap_err();
            assert!(err.contains(want), "{addr:?}: {err}");
        }
        assert!(validate_address("first.last+tag@sub.example.com").is_ok());
        assert!(
            validate_address("j\u{f6}rg@b\u{fc}cher.example").is_ok(),
            "UTF-8 (RFC 6531)"
        );
        assert!(validate_address("\"quoted@local\"@example.com").is_ok());
        assert_eq!(domain_of("\"quoted@local\"@Example.COM"), "Example.COM");
    }

    /// The checks as first written (a reason per test, in this order), to
    /// hold the one-pass reading to.
    fn validate_by_steps(addr: &str) -> Result<(), &'static str> {
        if addr.len() > 254 {
            return Err("longer than 254 octets");
        }
        for b in addr.bytes() {
            match b {
                b'\r' | b'\n' => return Err("contains CR or LF"),
                b'<' | b'>' => return Err("contains < or >"),
                b' ' => return Err("contains a space"),
                0..=0x1f | 0x7f => return Err("contains a control character"),
                _ => {}
            }
        }
        let Some(at) = addr.rfind('@') else {
            return Err("has no @");
        };
        if at == 0 {
            return Err("has an empty local part");
        }
        let domain = &addr[at + 1..];
        if domain.is_empty() {
            return Err("has an empty domain");
        }
        if domain.starts_with('.') || domain.ends_with('.') || domain.contains("..") {
            return Err("has a malformed domain");
        }
        Ok(())
    }

    proptest::proptest! {
        #[test]
        fn one_pass_address_check_agrees_with_the_steps(addr in "[a@.<> \\r\\n\\t\\x7fé\"b]{0,12}(@[a.]{0,4})?") {
            proptest::prop_assert_eq!(validate_address(&addr), validate_by_steps(&addr));
            // The domain it finds on the way is the one after the last `@`.
            proptest::prop_assert_eq!(address_domain(&addr), validate_by_steps(&addr).map(|()| domain_of(&addr)));
        }

        // Around 64 bytes, where the mask test gives way to the byte-wise one,
        // and across its 16-byte chunks.
        #[test]
        fn either_address_check_agrees_with_the_steps(
            addr in "[a.@]{0,40}[a@.<> \\r\\n\\x01\\x7fé]?[a.@]{0,40}(@[a.]{0,20})?",
        ) {
            proptest::prop_assert_eq!(address_domain(&addr), validate_by_steps(&addr).map(|()| domain_of(&addr)));
            proptest::prop_assert_eq!(address_domain_bytewise(&addr), validate_by_steps(&addr).map(|()| domain_of(&addr)));
        }
    }

    #[test]
    fn message_paths_stay_inside() {
        let spool = Path::new("/spool/in/a.jsonl");
        assert_eq!(message_path(spool, "m/x.eml").unwrap(), Path::new("/spool/in/m/x.eml"));
        assert!(message_path(spool, "../x.eml").is_err());
        assert!(message_path(spool, "a/../../x.eml").is_err());
        assert!(message_path(spool, "/etc/passwd").is_err());
        assert!(message_path(spool, "").is_err());
    }

    #[test]
    fn lines_numbers_and_blank_lines() {
        let map = b"a\r\n\nb\n  \nc";
        let mut c = LineCursor::default();
        let got: Vec<_> = std::iter::from_fn(|| c.next_line(map)).collect();
        assert_eq!(got, vec![(1, &b"a"[..]), (3, &b"b"[..]), (5, &b"c"[..])]);
        assert!(c.at_end(map));
        // A copy of the cursor takes up again where it stopped.
        let mut c = LineCursor::default();
        assert_eq!(c.next_line(map), Some((1, &b"a"[..])));
        let mut later = c;
        assert_eq!(later.next_line(map), Some((3, &b"b"[..])));
        // A byte order mark before the first line is not part of it.
        let map = b"\xef\xbb\xbf{\"a\":1}\r\n\xef\xbb\xbf";
        let mut c = LineCursor::default();
        assert_eq!(c.next_line(map), Some((1, &b"{\"a\":1}"[..])));
        assert_eq!(
            c.next_line(map),
            Some((2, &b"\xef\xbb\xbf"[..])),
            "only the first is skipped"
        );
    }
}
