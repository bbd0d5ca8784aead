//! The EHLO keywords volley cares about, parsed once into a typed set.

use super::reply::Reply;

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Capabilities {
    pub pipelining: bool,
    pub eight_bit_mime: bool,
    /// `SIZE` with its limit in bytes (`Some(0)` means no fixed limit).
    pub size: Option<u64>,
    pub enhanced_status_codes: bool,
    pub starttls: bool,
    pub chunking: bool,
    pub smtputf8: bool,
    pub dsn: bool,
    /// SASL mechanisms offered with AUTH that volley can use.
    pub auth_plain: bool,
    pub auth_login: bool,
}

impl Capabilities {
    /// Reads the keywords of a 250 reply to EHLO. The first line is the
    /// server's greeting to us, not a keyword; empty lines (a bare `250 `) are skipped.
    pub fn from_ehlo(reply: &Reply) -> Capabilities {
        let mut caps = Capabilities::default();
        for line in reply.lines().skip(1) {
            let mut words = line.split_ascii_whitespace();
            let Some(keyword) = words.next() else {
                continue;
            };
            match keyword.to_ascii_uppercase().as_str() {
                "PIPELINING" => caps.pipelining = true,
                "8BITMIME" => caps.eight_bit_mime = true,
                "SIZE" => caps.size = Some(words.next().and_then(|n| n.parse().ok()).unwrap_or(0)),
                "ENHANCEDSTATUSCODES" => caps.enhanced_status_codes = true,
                "STARTTLS" => caps.starttls = true,
                "CHUNKING" => caps.chunking = true,
                "SMTPUTF8" => caps.smtputf8 = true,
                "DSN" => caps.dsn = true,
                "AUTH" => {
                    for m in words {
                        caps.auth_plain |= m.eq_ignore_ascii_case("PLAIN");
                        caps.auth_login |= m.eq_ignore_ascii_case("LOGIN");
                    }
                }
                k if k.starts_with("AUTH=") => {
                    // The pre-RFC 4954 form some servers still send.
                    for m in k[5..].split_ascii_whitespace().chain(words) {
                        caps.auth_plain |= m.eq_ignore_ascii_case("PLAIN");
                        caps.auth_login |= m.eq_ignore_ascii_case("LOGIN");
                    }
                }
                _ => {}
            }
        }
        caps
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::smtp::reply::ReplyParser;
    use std::collections::VecDeque;

    fn ehlo(wire: &[u8]) -> Capabilities {
        let mut out = VecDeque::new();
        ReplyParser::new().feed(wire, &mut out).unwrap();
        Capabilities::from_ehlo(&out[0])
    }

    #[test]
    fn postfix_smtp_sink_with_bare_last_line() {
        let caps =
            ehlo(b"250-sink.test\r\n250-PIPELINING\r\n250-8BITMIME\r\n250-ENHANCEDSTATUSCODES\r\n250-DSN\r\n250 \r\n");
        assert_eq!(
            caps,
            Capabilities {
                pipelining: true,
                eight_bit_mime: true,
                enhanced_status_codes: true,
                dsn: true,
                ..Default::default()
            }
        );
    }

    #[test]
    fn postfix_smtpd() {
        let caps = ehlo(
            b"250-strict.test\r\n250-PIPELINING\r\n250-SIZE 10240000\r\n250-VRFY\r\n250-ETRN\r\n250-STARTTLS\r\n\
250-ENHANCEDSTATUSCODES\r\n250-8BITMIME\r\n250-DSN\r\n250-SMTPUTF8\r\n250 CHUNKING\r\n",
        );
        assert!(caps.pipelining && caps.starttls && caps.chunking && caps.smtputf8);
        assert_eq!(caps.size, Some(10_240_000));
        assert!(!caps.auth_plain && !caps.auth_login);
    }

    #[test]
    fn auth_mechanisms() {
        let caps = ehlo(b"250-relay.test\r\n250-AUTH CRAM-MD5 login Plain\r\n250 8BITMIME\r\n");
        assert!(caps.auth_plain && caps.auth_login);
        let caps = ehlo(b"250-relay.test\r\n250 AUTH=LOGIN\r\n");
        assert!(!caps.auth_plain && caps.auth_login);
    }

    #[test]
    fn greeting_line_is_not_a_keyword_and_case_is_ignored() {
        let caps = ehlo(b"250-PIPELINING.example greets you\r\n250 pipelining\r\n");
        assert!(caps.pipelining);
        let caps = ehlo(b"250 PIPELINING\r\n");
        assert!(!caps.pipelining);
    }
}
