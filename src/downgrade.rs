//! 8-bit to 7-bit (RFC 6152 §3, RFC 2045 §6.7): for a server that does not
//! offer 8BITMIME, every MIME leaf part whose body has 8-bit octets and no
//! transfer encoding is re-encoded as quoted-printable, its
//! Content-Transfer-Encoding header replaced. The message is parsed with
//! mail-parser, which gives each part's offsets; everything else is kept
//! byte for byte. Headers with 8-bit octets (RFC 6532) and 8-bit content in
//! a nested message cannot be downgraded this way: those are refused.

use mail_parser::{HeaderName, MessageParser, PartType};

/// `msg` (CRLF line ends, not dot-stuffed) with its 8-bit parts in
/// quoted-printable; an error says why it cannot be.
pub fn to_7bit(msg: &[u8]) -> Result<Vec<u8>, String> {
    let parsed = MessageParser::default()
        .parse(msg)
        .ok_or_else(|| "the message cannot be parsed as MIME".to_string())?;
    let mut edits: Vec<(usize, usize, Vec<u8>)> = Vec::new();
    for (i, part) in parsed.parts.iter().enumerate() {
        let (h0, b0, end) = (
            part.offset_header as usize,
            part.offset_body as usize,
            part.offset_end as usize,
        );
        let header = msg.get(h0..b0).unwrap_or_default();
        if !header.is_ascii() {
            return Err(if i == 0 {
                "the message's headers have 8-bit octets (RFC 6532)".to_string()
            } else {
                format!("the headers of MIME part {i} have 8-bit octets")
            });
        }
        match &part.body {
            PartType::Multipart(_) => continue,
            PartType::Message(_) => {
                if !msg.get(b0..end).unwrap_or_default().is_ascii() {
                    return Err(format!("MIME part {i} is a message with 8-bit content"));
                }
                continue;
            }
            _ => {}
        }
        let body = msg.get(b0..end).unwrap_or_default();
        if body.is_ascii() {
            continue;
        }
        if part.encoding != mail_parser::Encoding::None {
            // Already encoded, yet 8-bit: not something to guess about.
            return Err(format!("MIME part {i} is encoded but has 8-bit octets"));
        }
        // The header block without its Content-Transfer-Encoding, then ours.
        let mut new = Vec::with_capacity(header.len() + body.len() * 3 / 2 + 64);
        let mut at = h0;
        for h in &part.headers {
            if h.name == HeaderName::ContentTransferEncoding {
                let (f, e) = (h.offset_field as usize, h.offset_end as usize);
                new.extend_from_slice(&msg[at..f]);
                // Its end takes its line break with it (or the next two octets are it).
                at = if msg[..e].ends_with(b"\r\n") || !msg[e..].starts_with(b"\r\n") {
                    e
                } else {
                    e + 2
                };
            }
        }
        let rest = &msg[at..b0];
        // The blank line that ends the headers stays last.
        if !rest.ends_with(b"\r\n") {
            return Err(format!("MIME part {i} has no blank line after its headers"));
        }
        let split = rest.len() - 2;
        new.extend_from_slice(&rest[..split]);
        if i == 0
            && !parsed.parts[0]
                .headers
                .iter()
                .any(|h| h.name == HeaderName::ContentType)
        {
            // A message without MIME headers: say what it is.
            let charset = if std::str::from_utf8(body).is_ok() {
                "utf-8"
            } else {
                "unknown-8bit"
            };
            if !parsed.parts[0]
                .headers
                .iter()
                .any(|h| h.name == HeaderName::MimeVersion)
            {
                new.extend_from_slice(b"MIME-Version: 1.0\r\n");
            }
            new.extend_from_slice(format!("Content-Type: text/plain; charset={charset}\r\n").as_bytes());
        }
        new.extend_from_slice(b"Content-Transfer-Encoding: quoted-printable\r\n");
        new.extend_from_slice(&rest[split..]);
        // A part's body ends with the line break before the next boundary:
        // keep it a line break, not an encoded one.
        let (text, tail): (&[u8], &[u8]) = match body.strip_suffix(b"\r\n") {
            Some(t) => (t, b"\r\n"),
            None => (body, b""),
        };
        new.extend_from_slice(&quoted_printable::encode(text));
        new.extend_from_slice(tail);
        edits.push((h0, end, new));
    }
    let mut out = Vec::with_capacity(msg.len() + msg.len() / 2);
    let mut at = 0;
    for (start, end, new) in edits {
        out.extend_from_slice(&msg[at..start]);
        out.extend_from_slice(&new);
        at = end;
    }
    out.extend_from_slice(&msg[at..]);
    debug_assert!(out.is_ascii());
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decoded_text(msg: &[u8], part: usize) -> String {
        let m = MessageParser::default().parse(msg).unwrap();
        m.body_text(part).unwrap().into_owned()
    }

    #[test]
    fn a_plain_8bit_message_becomes_quoted_printable_and_reads_the_same() {
        let src = "From: a@x.test\r\nSubject: hi\r\nMIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\nCaf\u{e9} cr\u{e8}me =\r\n\r\nline two, which is long enough to be folded by the encoder at seventy-six \u{fc}\r\n";
        let out = to_7bit(src.as_bytes()).unwrap();
        let text = String::from_utf8(out.clone()).unwrap();
        assert!(text.is_ascii());
        assert!(
            text.contains("\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\nCaf=C3=A9"),
            "{text}"
        );
        assert!(!text.contains("8bit"), "{text}");
        assert!(text.lines().all(|l| l.len() <= 76), "{text}");
        assert_eq!(
            decoded_text(&out, 0),
            decoded_text(src.as_bytes(), 0),
            "the same text once decoded"
        );
    }

    #[test]
    fn only_the_8bit_parts_of_a_multipart_change() {
        let src = "From: a@x.test\r\nMIME-Version: 1.0\r\nContent-Type: multipart/alternative; boundary=\"b1\"\r\n\r\npreamble\r\n--b1\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\nplain part\r\n--b1\r\nContent-Type: text/html; charset=utf-8\r\n\r\n<p>\u{fc}ber</p>\r\n--b1--\r\n";
        let out = to_7bit(src.as_bytes()).unwrap();
        let text = String::from_utf8(out.clone()).unwrap();
        assert!(
            text.contains("--b1\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\nplain part\r\n--b1\r\n"),
            "the ASCII part as it was: {text}"
        );
        assert!(
            text.contains("Content-Type: text/html; charset=utf-8\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n<p>=C3=BCber</p>\r\n--b1--\r\n"),
            "{text}"
        );
        let m = MessageParser::default().parse(&out).unwrap();
        assert_eq!(m.body_html(0).unwrap(), "<p>\u{fc}ber</p>");
    }

    #[test]
    fn a_message_without_mime_headers_says_what_it_is() {
        let out = to_7bit("Subject: x\r\n\r\ncaf\u{e9}\r\n".as_bytes()).unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "Subject: x\r\nMIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\ncaf=C3=A9\r\n"
        );
    }

    #[test]
    fn what_cannot_be_downgraded_says_why() {
        let e = to_7bit("Subject: Gr\u{fc}\u{df}e\r\n\r\nhi\r\n".as_bytes()).unwrap_err();
        assert!(e.contains("headers have 8-bit"), "{e}");
    }
}
