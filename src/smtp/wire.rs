//! Message data for the DATA command: every line end made CRLF (a bare LF or
//! a lone CR becomes CRLF), lines starting with `.` dot-stuffed (RFC 5321
//! §4.5.2), and the final `.` line appended. Done once per message file per shard.
//! BDAT (RFC 3030) sends the same CRLF text without the stuffing and the final
//! line: the positions of the stuffed dots are kept, so both come from one copy.

/// A message ready for the wire, and what was learnt while preparing it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WireMessage {
    /// CRLF line ends, dot-stuffed, ending with `.\r\n`.
    pub bytes: Vec<u8>,
    /// Some byte is above 127.
    pub eight_bit: bool,
    /// Some byte of the header section is above 127 (UTF-8 headers, RFC 6532).
    pub eight_bit_headers: bool,
    /// Longest line in octets, CRLF excluded (RFC 5321 §4.5.3.1.6 allows 998).
    pub longest_line: usize,
    /// Offsets in `bytes` of the dots added by stuffing.
    stuffed: Vec<usize>,
}

impl WireMessage {
    pub fn prepare(src: &[u8]) -> WireMessage {
        let mut bytes = Vec::with_capacity(src.len() + src.len() / 32 + 8);
        let mut eight_bit = false;
        let mut eight_bit_headers = false;
        let mut in_headers = true;
        let mut longest_line = 0;
        let mut stuffed = Vec::new();
        let mut rest = src;
        while !rest.is_empty() {
            let end = memchr::memchr2(b'\n', b'\r', rest).unwrap_or(rest.len());
            let line = &rest[..end];
            if line.first() == Some(&b'.') {
                stuffed.push(bytes.len());
                bytes.push(b'.');
            }
            bytes.extend_from_slice(line);
            bytes.extend_from_slice(b"\r\n");
            let ascii = line.is_ascii();
            eight_bit |= !ascii;
            if in_headers {
                eight_bit_headers |= !ascii;
                in_headers = !line.is_empty();
            }
            longest_line = longest_line.max(line.len());
            rest = &rest[end..];
            rest = match rest {
                [b'\r', b'\n', tail @ ..] | [b'\r', tail @ ..] | [b'\n', tail @ ..] => tail,
                _ => rest,
            };
        }
        bytes.extend_from_slice(b".\r\n");
        WireMessage {
            bytes,
            eight_bit,
            eight_bit_headers,
            longest_line,
            stuffed,
        }
    }

    /// `head` (whole lines, such as DKIM-Signature headers) put in front:
    /// the same as preparing `head` followed by the source, without going
    /// over the message again.
    pub fn prepended(&self, head: &[u8]) -> WireMessage {
        let h = WireMessage::prepare(head);
        let n = h.bytes.len() - 3;
        let mut bytes = Vec::with_capacity(n + self.bytes.len());
        bytes.extend_from_slice(&h.bytes[..n]);
        bytes.extend_from_slice(&self.bytes);
        let mut stuffed = h.stuffed;
        stuffed.extend(self.stuffed.iter().map(|&at| at + n));
        WireMessage {
            bytes,
            eight_bit: self.eight_bit || h.eight_bit,
            eight_bit_headers: self.eight_bit_headers || h.eight_bit,
            longest_line: self.longest_line.max(h.longest_line),
            stuffed,
        }
    }

    /// The message as BDAT sends it, borrowed when nothing was stuffed.
    pub fn chunk(&self) -> std::borrow::Cow<'_, [u8]> {
        if self.stuffed.is_empty() {
            return self.bytes[..self.bytes.len() - 3].into();
        }
        let mut out = Vec::with_capacity(self.chunk_len());
        self.write_chunk(&mut out);
        out.into()
    }

    /// The length of the message for BDAT: CRLF line ends, no stuffing, no final `.` line.
    pub fn chunk_len(&self) -> usize {
        self.bytes.len() - 3 - self.stuffed.len()
    }

    /// Appends the message as BDAT sends it (`chunk_len` bytes).
    pub fn write_chunk(&self, out: &mut Vec<u8>) {
        for part in self.chunk_parts() {
            out.extend_from_slice(part);
        }
    }

    /// How many parts [`WireMessage::chunk_parts`] gives at most.
    pub fn chunk_part_count(&self) -> usize {
        self.stuffed.len() + 1
    }

    /// The message as BDAT sends it, in the parts of `bytes` it is made of
    /// (without the dots stuffing added and the final `.` line).
    pub fn chunk_parts(&self) -> impl Iterator<Item = &[u8]> {
        let end = self.bytes.len() - 3;
        let starts = std::iter::once(0).chain(self.stuffed.iter().map(|&dot| dot + 1));
        let ends = self.stuffed.iter().copied().chain(std::iter::once(end));
        starts
            .zip(ends)
            .map(|(a, b)| &self.bytes[a..b])
            .filter(|p| !p.is_empty())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn eight_bit_headers_are_told_from_an_eight_bit_body() {
        let m = WireMessage::prepare("Subject: Gr\u{fc}\u{df}e\n\nplain\n".as_bytes());
        assert!(m.eight_bit && m.eight_bit_headers);
        let m = WireMessage::prepare("Subject: x\n\ncaf\u{e9}\n".as_bytes());
        assert!(m.eight_bit && !m.eight_bit_headers);
    }

    #[test]
    fn table() {
        let cases: &[(&[u8], &[u8])] = &[
            (b"", b".\r\n"),
            (b"a\r\nb\r\n", b"a\r\nb\r\n.\r\n"),
            (b"a\nb\n", b"a\r\nb\r\n.\r\n"),
            (b"a\nb", b"a\r\nb\r\n.\r\n"),
            (b"a\rb\r\n", b"a\r\nb\r\n.\r\n"),
            (b".\r\n", b"..\r\n.\r\n"),
            (b"x\n.hidden\n..two\n", b"x\r\n..hidden\r\n...two\r\n.\r\n"),
            (b"x\r\n.\r\ny\r\n", b"x\r\n..\r\ny\r\n.\r\n"),
            (b"\n\n", b"\r\n\r\n.\r\n"),
            (b"a.b\n", b"a.b\r\n.\r\n"),
        ];
        for (src, want) in cases {
            let got = WireMessage::prepare(src);
            assert_eq!(
                String::from_utf8_lossy(&got.bytes),
                String::from_utf8_lossy(want),
                "source {:?}",
                String::from_utf8_lossy(src)
            );
            // The BDAT form: the same CRLF text, unstuffed, without the final line.
            let mut chunk = Vec::new();
            got.write_chunk(&mut chunk);
            let mut expected = Vec::new();
            for line in want[..want.len() - 3].split_inclusive(|&b| b == b'\n') {
                expected.extend_from_slice(line.strip_prefix(b".").unwrap_or(line));
            }
            assert_eq!(chunk, expected, "source {:?}", String::from_utf8_lossy(src));
            assert_eq!(chunk.len(), got.chunk_len());
            assert_eq!(*got.chunk(), chunk[..]);
            // A head put in front is the same as preparing it with the source.
            for head in [
                &b""[..],
                b"A: 1\r\n",
                b"B: x\r\n\t.y\r\n",
                b"D: x\r\n.y\r\n",
                b"C: caf\xc3\xa9\n",
            ] {
                let mut whole = head.to_vec();
                whole.extend_from_slice(src);
                assert_eq!(got.prepended(head), WireMessage::prepare(&whole), "{head:?} + {src:?}");
            }
        }
    }

    #[test]
    fn facts() {
        let m = WireMessage::prepare("h\nsome caf\u{e9}\n".as_bytes());
        assert!(m.eight_bit);
        assert_eq!(m.longest_line, 10);
        let m = WireMessage::prepare(b"plain\n");
        assert!(!m.eight_bit);
    }
}
