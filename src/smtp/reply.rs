//! Incremental SMTP reply parsing (RFC 5321 §4.2) with RFC 3463 enhanced codes.
//! Owns only its partial-line buffer; it never blocks and never grows past
//! `MAX_LINE_BYTES` per line or `MAX_LINES` per reply, whatever a server sends.

use std::collections::VecDeque;
use std::fmt;
use std::rc::Rc;

/// Longest reply line accepted, CRLF included (RFC 5321 allows 512; servers send more).
pub const MAX_LINE_BYTES: usize = 4096;
/// Most lines accepted in one multi-line reply.
pub const MAX_LINES: usize = 128;
/// Most bytes of reply text kept (the rest of a long multi-line reply is dropped).
pub const MAX_TEXT_BYTES: usize = 8192;

/// An RFC 3463 enhanced status code such as `5.1.1`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Enhanced {
    pub class: u8,
    pub subject: u16,
    pub detail: u16,
}

impl fmt::Display for Enhanced {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.class, self.subject, self.detail)
    }
}

impl Enhanced {
    /// Parses a leading `X.Y.Z` (followed by a space or the end) of reply text.
    pub fn parse_prefix(text: &str) -> Option<Enhanced> {
        let b = text.as_bytes();
        let (&class, rest) = b.split_first()?;
        if !matches!(class, b'2' | b'4' | b'5') || rest.first() != Some(&b'.') {
            return None;
        }
        // Up to three digits, then what follows them.
        let number = |s: &[u8]| -> Option<(u16, usize)> {
            let n = s.iter().take(4).take_while(|c| c.is_ascii_digit()).count();
            if n == 0 || n > 3 {
                return None;
            }
            Some((s[..n].iter().fold(0, |v, &c| v * 10 + u16::from(c - b'0')), n))
        };
        let (subject, n) = number(&rest[1..])?;
        let rest = &rest[1 + n..];
        if rest.first() != Some(&b'.') {
            return None;
        }
        let (detail, n) = number(&rest[1..])?;
        // The code is a word of its own: the end, or a space after it.
        if !matches!(rest.get(1 + n), None | Some(b' ')) {
            return None;
        }
        Some(Enhanced {
            class: class - b'0',
            subject,
            detail,
        })
    }
}

/// One complete reply: its code, its enhanced code (taken from the first line
/// when its class matches the code's), and the text of every line joined by `\n`.
/// The text is shared: a reply that repeats one the parser saw lately (a
/// server answers every MAIL and every RCPT alike) costs no allocation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub code: u16,
    pub enhanced: Option<Enhanced>,
    pub text: Rc<str>,
}

impl Reply {
    pub fn new(code: u16, text: &str) -> Reply {
        Reply {
            code,
            enhanced: Self::enhanced_of(code, text),
            text: text.into(),
        }
    }
    fn enhanced_of(code: u16, text: &str) -> Option<Enhanced> {
        Enhanced::parse_prefix(text).filter(|e| u16::from(e.class) == code / 100)
    }
    pub fn is_positive(&self) -> bool {
        (200..300).contains(&self.code)
    }
    pub fn is_intermediate(&self) -> bool {
        (300..400).contains(&self.code)
    }
    pub fn is_transient(&self) -> bool {
        (400..500).contains(&self.code)
    }
    pub fn is_permanent(&self) -> bool {
        (500..600).contains(&self.code)
    }
    pub fn lines(&self) -> impl Iterator<Item = &str> {
        self.text.split('\n')
    }
}

impl fmt::Display for Reply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.code)?;
        for (i, line) in self.lines().enumerate() {
            let sep = if i == 0 { " " } else { " / " };
            write!(f, "{sep}{line}")?;
        }
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReplyError {
    #[error("reply line longer than {MAX_LINE_BYTES} bytes")]
    LineTooLong,
    #[error("reply of more than {MAX_LINES} lines")]
    TooManyLines,
    #[error("malformed reply line {0:?}")]
    Malformed(String),
    #[error("reply code changed within a multi-line reply ({0} then {1})")]
    CodeMismatch(u16, u16),
}

/// Single-line replies remembered, so that one seen again shares their text.
const RECENT: usize = 4;

/// The bytes of reply text that decide its enhanced code: `C.SSS.DDD` and
/// the byte after it (`Enhanced::parse_prefix` looks no further).
const ENHANCED_SPAN: usize = 10;

/// Feeds on bytes as they arrive and yields complete replies.
#[derive(Debug, Default)]
pub struct ReplyParser {
    partial: Vec<u8>,
    /// The multi-line reply being read: its code and its text so far.
    current: Option<(u16, String)>,
    lines: usize,
    /// Recent single-line replies, least recently used replaced first (a
    /// reply that never repeats, such as "queued as ID", does not push out
    /// the MAIL and RCPT replies that come every transaction).
    recent: [Option<(u64, Reply)>; RECENT],
    tick: u64,
}

impl ReplyParser {
    pub fn new() -> Self {
        Self::default()
    }

    /// True when no partial line or reply is buffered.
    pub fn is_empty(&self) -> bool {
        self.partial.is_empty() && self.current.is_none()
    }

    /// Parses `input`, appending every reply it completes to `replies`.
    /// After an error the parser must not be fed again (the connection is unusable).
    pub fn feed(&mut self, mut input: &[u8], replies: &mut VecDeque<Reply>) -> Result<(), ReplyError> {
        while !input.is_empty() {
            match memchr::memchr(b'\n', input) {
                Some(pos) => {
                    let (chunk, rest) = input.split_at(pos + 1);
                    input = rest;
                    if self.partial.is_empty() {
                        self.line(chunk, replies)?;
                    } else {
                        if self.partial.len() + chunk.len() > MAX_LINE_BYTES {
                            return Err(ReplyError::LineTooLong);
                        }
                        let mut line = std::mem::take(&mut self.partial);
                        line.extend_from_slice(chunk);
                        self.line(&line, replies)?;
                        line.clear();
                        self.partial = line;
                    }
                }
                None => {
                    if self.partial.len() + input.len() > MAX_LINE_BYTES {
                        return Err(ReplyError::LineTooLong);
                    }
                    self.partial.extend_from_slice(input);
                    break;
                }
            }
        }
        Ok(())
    }

    fn line(&mut self, raw: &[u8], replies: &mut VecDeque<Reply>) -> Result<(), ReplyError> {
        if raw.len() > MAX_LINE_BYTES {
            return Err(ReplyError::LineTooLong);
        }
        let line = raw.strip_suffix(b"\n").unwrap_or(raw);
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let malformed = || ReplyError::Malformed(String::from_utf8_lossy(line).into_owned());
        if line.len() < 3 || !line[..3].iter().all(u8::is_ascii_digit) || !(b'2'..=b'5').contains(&line[0]) {
            return Err(malformed());
        }
        let code = u16::from(line[0] - b'0') * 100 + u16::from(line[1] - b'0') * 10 + u16::from(line[2] - b'0');
        let (last, text) = match line.get(3) {
            None => (true, &[][..]),
            Some(b' ') => (true, &line[4..]),
            Some(b'-') => (false, &line[4..]),
            Some(_) => return Err(malformed()),
        };
        // A one-line reply the parser saw lately (every MAIL and RCPT is
        // answered alike) is found by its bytes, before any UTF-8 check.
        if last
            && self.current.is_none()
            && let Some(reply) = self.seen_lately(code, text)
        {
            self.lines = 0;
            replies.push_back(reply);
            return Ok(());
        }
        let text = if text.is_ascii() {
            // SAFETY: ASCII is UTF-8 (the usual reply: checked a word at a time).
            std::borrow::Cow::Borrowed(unsafe { std::str::from_utf8_unchecked(text) })
        } else {
            String::from_utf8_lossy(text)
        };
        self.lines += 1;
        if self.lines > MAX_LINES {
            return Err(ReplyError::TooManyLines);
        }
        match &mut self.current {
            None if last => {
                let reply = self.single(code, &text);
                self.lines = 0;
                replies.push_back(reply);
            }
            None => self.current = Some((code, text.into_owned())),
            Some((first, joined)) => {
                if *first != code {
                    return Err(ReplyError::CodeMismatch(*first, code));
                }
                if joined.len() + text.len() < MAX_TEXT_BYTES {
                    joined.push('\n');
                    joined.push_str(&text);
                }
                if last {
                    let (code, joined) = self.current.take().expect("a reply is being built");
                    self.lines = 0;
                    replies.push_back(Reply {
                        code,
                        enhanced: Reply::enhanced_of(code, &joined),
                        text: joined.into(),
                    });
                }
            }
        }
        Ok(())
    }

    /// A clone of a recent one-line reply with this code and text.
    fn seen_lately(&mut self, code: u16, text: &[u8]) -> Option<Reply> {
        // The length and the last byte first: a "queued as ID" reply has the
        // length of the one before it and differs from it at the end.
        let same = |r: &Reply| {
            r.code == code
                && r.text.len() == text.len()
                && r.text.as_bytes().last() == text.last()
                && same_bytes(r.text.as_bytes(), text)
        };
        let (used, r) = self.recent.iter_mut().flatten().find(|(_, r)| same(r))?;
        self.tick += 1;
        *used = self.tick;
        Some(r.clone())
    }

    /// A one-line reply not seen lately: a new one, remembered in place of
    /// the least recently used.
    fn single(&mut self, code: u16, text: &str) -> Reply {
        self.tick += 1;
        let used = |i: usize| self.recent[i].as_ref().map_or(0, |(u, _)| *u);
        let slot = (0..RECENT).min_by_key(|&i| used(i)).expect("RECENT is not 0");
        // The enhanced code lies in the text's first ENHANCED_SPAN bytes: a
        // reply that begins as a recent one of its code has its code ("2.0.0
        // Ok: queued as ID" every message).
        let head = |t: &str| -> Option<[u8; ENHANCED_SPAN]> { t.as_bytes().get(..ENHANCED_SPAN)?.try_into().ok() };
        let text_head = head(text);
        let known = self
            .recent
            .iter()
            .flatten()
            .find(|(_, r)| r.code == code && text_head.is_some() && head(&r.text) == text_head);
        let reply = match known {
            Some((_, r)) => Reply {
                code,
                enhanced: r.enhanced,
                text: text.into(),
            },
            None => Reply::new(code, text),
        };
        self.recent[slot] = Some((self.tick, reply.clone()));
        reply
    }
}

/// `a == b` for slices of one length, the usual reply's (8 to 16 bytes)
/// as two words each instead of a `memcmp` call.
#[inline]
fn same_bytes(a: &[u8], b: &[u8]) -> bool {
    let n = a.len();
    if n != b.len() {
        return false;
    }
    if (8..=16).contains(&n) {
        let word = |s: &[u8], at: usize| u64::from_ne_bytes(s[at..at + 8].try_into().expect("8 bytes"));
        return word(a, 0) == word(b, 0) && word(a, n - 8) == word(b, n - 8);
    }
    a == b
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_are_the_same_exactly_when_they_are_equal() {
        for n in 0..24usize {
            let a: Vec<u8> = (0..n).map(|i| b'a' + i as u8).collect();
            assert!(same_bytes(&a, &a.clone()), "{n}");
            assert!(!same_bytes(&a, &a[..n.saturating_sub(1)]) || n == 0, "{n}");
            for at in 0..n {
                let mut b = a.clone();
                b[at] ^= 0x20;
                assert!(!same_bytes(&a, &b), "{n} bytes, differing at {at}");
            }
        }
    }

    fn parse_all(chunks: &[&[u8]]) -> Result<Vec<Reply>, ReplyError> {
        let mut p = ReplyParser::new();
        let mut out = VecDeque::new();
        for c in chunks {
            p.feed(c, &mut out)?;
        }
        Ok(out.into_iter().collect())
    }

    #[test]
    fn table() {
        // (wire text, expected (code, enhanced, text) of each reply)
        type Expected<'a> = &'a [(u16, Option<&'a str>, &'a str)];
        let cases: &[(&[u8], Expected)] = &[
            (b"220 mx.test ESMTP\r\n", &[(220, None, "mx.test ESMTP")]),
            (b"250 2.1.0 Ok\r\n", &[(250, Some("2.1.0"), "2.1.0 Ok")]),
            (
                b"550 5.1.1 <a@b>: User unknown\r\n",
                &[(550, Some("5.1.1"), "5.1.1 <a@b>: User unknown")],
            ),
            (
                b"250-mx.test\r\n250-PIPELINING\r\n250 \r\n",
                &[(250, None, "mx.test\nPIPELINING\n")],
            ),
            (b"250\r\n", &[(250, None, "")]),
            (b"250 ok\n", &[(250, None, "ok")]),
            (b"451 2.0.0 class mismatch\r\n", &[(451, None, "2.0.0 class mismatch")]),
            (b"250 1.2.3 not enhanced\r\n", &[(250, None, "1.2.3 not enhanced")]),
            (
                b"250 Ok\r\n250 Ok\r\n354 go\r\n",
                &[(250, None, "Ok"), (250, None, "Ok"), (354, None, "go")],
            ),
            // UTF-8 text as it is; bytes that are not UTF-8 replaced, not refused.
            (
                "250 2.0.0 Ok, reçu\r\n".as_bytes(),
                &[(250, Some("2.0.0"), "2.0.0 Ok, reçu")],
            ),
            (b"550 no \xff\xfe here\r\n", &[(550, None, "no \u{FFFD}\u{FFFD} here")]),
            // Replies that share all but their last byte, or their length, stay apart.
            (
                b"250 queued as A1\r\n250 queued as A2\r\n250 queued as B1\r\n250 queued as A1\r\n250 queued as A\r\n",
                &[
                    (250, None, "queued as A1"),
                    (250, None, "queued as A2"),
                    (250, None, "queued as B1"),
                    (250, None, "queued as A1"),
                    (250, None, "queued as A"),
                ],
            ),
        ];
        for (wire, want) in cases {
            let got = parse_all(&[wire]).unwrap();
            let got: Vec<_> = got
                .iter()
                .map(|r| (r.code, r.enhanced.map(|e| e.to_string()), r.text.to_string()))
                .collect();
            let want: Vec<_> = want
                .iter()
                .map(|(c, e, t)| (*c, e.map(str::to_string), t.to_string()))
                .collect();
            assert_eq!(got, want, "wire {:?}", String::from_utf8_lossy(wire));
        }
    }

    /// RFC 3463's `class.subject.detail`, read the plain way (split on
    /// space, then on dots): what the byte-wise `parse_prefix` must agree with.
    fn enhanced_by_splitting(text: &str) -> Option<Enhanced> {
        let word = text.split(' ').next()?;
        let parts: Vec<&str> = word.split('.').collect();
        let digits = |s: &str| (1..=3).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_digit());
        match parts[..] {
            [class, subject, detail] if matches!(class, "2" | "4" | "5") && digits(subject) && digits(detail) => {
                Some(Enhanced {
                    class: class.parse().ok()?,
                    subject: subject.parse().ok()?,
                    detail: detail.parse().ok()?,
                })
            }
            _ => None,
        }
    }

    /// Text that begins with an enhanced code or nearly: up to four digits
    /// a part, and what may follow it.
    const CODE_LIKE: &str = "[245x][.][0-9]{1,4}[.][0-9]{1,4}[ x.0-9]?[a-z ]{0,4}";

    proptest::proptest! {
        #[test]
        fn an_enhanced_code_is_read_as_splitting_reads_it(text in "[0-9245. a-z\\t]{0,14}") {
            proptest::prop_assert_eq!(Enhanced::parse_prefix(&text), enhanced_by_splitting(&text));
        }

        /// What the parser takes from a recent reply that begins the same.
        #[test]
        fn an_enhanced_code_lies_in_the_first_bytes(
            text in CODE_LIKE,
            tail in "[0-9. x]{0,6}",
        ) {
            if text.len() >= ENHANCED_SPAN {
                let other = format!("{}{tail}", &text[..ENHANCED_SPAN]);
                proptest::prop_assert_eq!(Enhanced::parse_prefix(&text), Enhanced::parse_prefix(&other));
            }
        }

        /// Replies parsed one after another (some codes taken from a recent
        /// reply) have the codes each has on its own.
        #[test]
        fn a_reply_has_its_own_enhanced_code_after_others(
            pairs in proptest::collection::vec(("(250|251|550)", CODE_LIKE, 0..16usize, "[0-9. x]{0,4}"), 1..8),
        ) {
            // Each text, then one that begins as it does and goes on otherwise.
            let mut lines = Vec::new();
            for (code, text, cut, tail) in pairs {
                let other = format!("{}{tail}", &text[..cut.min(text.len())]);
                lines.push((code.clone(), text));
                lines.push((code, other));
            }
            let mut wire = Vec::new();
            for (code, text) in &lines {
                wire.extend_from_slice(format!("{code} {text}\r\n").as_bytes());
            }
            let got = parse_all(&[&wire]).unwrap();
            for (r, (code, text)) in got.iter().zip(&lines) {
                let alone = Reply::new(code.parse().unwrap(), text);
                proptest::prop_assert_eq!(r.enhanced, alone.enhanced, "{} {:?}", code, text);
            }
        }
    }

    #[test]
    fn enhanced_codes_at_their_edges() {
        for (text, want) in [
            ("5.1.1", Some((5, 1, 1))),
            ("4.7.28 later", Some((4, 7, 28))),
            ("2.123.999 ok", Some((2, 123, 999))),
            ("2.1234.0 ok", None),
            ("2.1.1000", None),
            ("3.1.1 no", None),
            ("2.1. ok", None),
            ("2..1 ok", None),
            ("2.1.1.1 ok", None),
            ("2.1.1\tok", None),
            ("2.1.1x", None),
            ("", None),
        ] {
            let got = Enhanced::parse_prefix(text).map(|e| (e.class, e.subject, e.detail));
            assert_eq!(got, want, "{text:?}");
        }
    }

    #[test]
    fn split_anywhere() {
        let wire = b"250-first\r\n250-second\r\n250 2.0.0 last\r\n";
        for cut in 0..wire.len() {
            let got = parse_all(&[&wire[..cut], &wire[cut..]]).unwrap();
            assert_eq!(got.len(), 1, "cut at {cut}");
            assert_eq!(&*got[0].text, "first\nsecond\n2.0.0 last");
        }
        let mut p = ReplyParser::new();
        let mut out = VecDeque::new();
        for b in wire.iter() {
            p.feed(std::slice::from_ref(b), &mut out).unwrap();
        }
        assert_eq!(out.len(), 1);
        assert!(p.is_empty());
    }

    #[test]
    fn malformed_and_hostile() {
        assert!(matches!(parse_all(&[b"hello\r\n"]), Err(ReplyError::Malformed(_))));
        assert!(matches!(parse_all(&[b"25\r\n"]), Err(ReplyError::Malformed(_))));
        assert!(matches!(parse_all(&[b"250x\r\n"]), Err(ReplyError::Malformed(_))));
        assert!(matches!(parse_all(&[b"650 no\r\n"]), Err(ReplyError::Malformed(_))));
        assert_eq!(
            parse_all(&[b"250-a\r\n251 b\r\n"]),
            Err(ReplyError::CodeMismatch(250, 251))
        );
        let long = vec![b'a'; MAX_LINE_BYTES + 1];
        assert_eq!(parse_all(&[b"250 ", &long]), Err(ReplyError::LineTooLong));
        let mut endless = Vec::new();
        for _ in 0..=MAX_LINES {
            endless.extend_from_slice(b"250-more\r\n");
        }
        assert_eq!(parse_all(&[&endless]), Err(ReplyError::TooManyLines));
    }

    #[test]
    fn a_reply_seen_lately_shares_its_text_and_one_that_never_repeats_does_not_push_it_out() {
        let mut wire = Vec::new();
        for i in 0..20 {
            wire.extend_from_slice(b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n");
            wire.extend_from_slice(format!("250 2.0.0 Ok: queued as {i}\r\n").as_bytes());
        }
        let got = parse_all(&[&wire]).unwrap();
        assert_eq!(got.len(), 60);
        for (i, txn) in got.chunks(3).enumerate() {
            assert_eq!(&*txn[0].text, "2.1.0 Ok");
            assert_eq!(&*txn[1].text, "2.1.5 Ok");
            assert_eq!(*txn[2].text, *format!("2.0.0 Ok: queued as {i}"));
            assert_eq!(txn[1].enhanced.map(|e| (e.class, e.subject, e.detail)), Some((2, 1, 5)));
            assert!(
                Rc::ptr_eq(&txn[0].text, &got[0].text),
                "MAIL's reply of txn {i} is shared"
            );
            assert!(
                Rc::ptr_eq(&txn[1].text, &got[1].text),
                "RCPT's reply of txn {i} is shared"
            );
        }
        // The same text under another code is another reply.
        let got = parse_all(&[b"250 Ok\r\n251 Ok\r\n250-Ok\r\n250 more\r\n"]).unwrap();
        assert_eq!(got.iter().map(|r| r.code).collect::<Vec<_>>(), [250, 251, 250]);
        assert_eq!(&*got[2].text, "Ok\nmore");
    }

    #[test]
    fn display_joins_lines() {
        let r = parse_all(&[b"550-5.7.1 first\r\n550 5.7.1 second\r\n"]).unwrap();
        assert_eq!(r[0].to_string(), "550 5.7.1 first / 5.7.1 second");
        assert_eq!(r[0].enhanced.unwrap().to_string(), "5.7.1");
    }
}
