//! Headers volley adds on request (`[headers]` in the configuration, and
//! `list_unsubscribe` per job): `Message-ID` and `Date` when the message
//! has none, `List-Unsubscribe` (a template, rendered per recipient when
//! it uses their fields) with `List-Unsubscribe-Post:
//! List-Unsubscribe=One-Click` (RFC 8058). They go in front of the message,
//! before it is DKIM-signed, so the signature covers them. A header the
//! message already has is left as it is.

use std::hash::{Hash, Hasher};

use serde::Deserialize;

/// `[headers]`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HeadersConfig {
    /// Add a Message-ID to a message without one.
    pub message_id: bool,
    /// Add a Date to a message without one.
    pub date: bool,
    /// `List-Unsubscribe` for every message without one: `<https://…>,
    /// <mailto:…>`, a template (`{{ rcpt }}`, the recipient's `vars`, …).
    pub list_unsubscribe: Option<String>,
    /// With List-Unsubscribe, `List-Unsubscribe-Post: List-Unsubscribe=One-Click`
    /// (RFC 8058; it needs an https URI in List-Unsubscribe).
    pub one_click: bool,
}

impl Default for HeadersConfig {
    fn default() -> Self {
        HeadersConfig {
            message_id: false,
            date: false,
            list_unsubscribe: None,
            one_click: true,
        }
    }
}

impl HeadersConfig {
    /// Whether the configured List-Unsubscribe differs per recipient.
    pub fn per_recipient(&self) -> bool {
        self.list_unsubscribe.as_deref().is_some_and(is_template)
    }

    /// Checks the settings at start-up; errors name their key.
    pub fn check(&self) -> anyhow::Result<()> {
        if let Some(t) = &self.list_unsubscribe {
            crate::template::check(t).map_err(|e| anyhow::anyhow!("headers.list_unsubscribe: template: {e}"))?;
            if t.trim().is_empty() {
                anyhow::bail!("headers.list_unsubscribe is empty");
            }
        }
        Ok(())
    }
}

/// Whether a value has template syntax in it.
pub fn is_template(s: &str) -> bool {
    s.contains("{{") || s.contains("{%")
}

/// What to add to one message.
pub struct Adding<'a> {
    pub message_id: bool,
    pub date: bool,
    /// Rendered already.
    pub list_unsubscribe: Option<&'a str>,
    pub one_click: bool,
    /// The right-hand side of a Message-ID volley makes.
    pub id_domain: &'a str,
    /// What makes the Message-ID differ between copies that are the same
    /// message (e.g. the recipient of a personalised copy); empty for a shared one.
    pub salt: &'a str,
}

impl Adding<'_> {
    fn nothing(&self) -> bool {
        !self.message_id && !self.date && self.list_unsubscribe.is_none()
    }
}

/// `msg` with the asked-for headers it lacks in front, or `None` when it lacks none.
pub fn add(msg: &[u8], a: &Adding<'_>) -> Option<Vec<u8>> {
    if a.nothing() {
        return None;
    }
    let has = |name: &str| has_header(msg, name);
    let mut head = String::new();
    if a.message_id && !has("Message-ID") {
        let mut h = std::hash::DefaultHasher::new();
        msg.hash(&mut h);
        a.salt.hash(&mut h);
        head.push_str(&format!("Message-ID: <{:016x}.volley@{}>\r\n", h.finish(), a.id_domain));
    }
    if a.date && !has("Date") {
        let now = time::OffsetDateTime::now_utc();
        let date = now
            .format(&time::format_description::well_known::Rfc2822)
            .expect("a date in range");
        head.push_str(&format!("Date: {date}\r\n"));
    }
    if let Some(lu) = a.list_unsubscribe
        && !has("List-Unsubscribe")
    {
        head.push_str(&format!("List-Unsubscribe: {}\r\n", lu.trim()));
        if a.one_click && !has("List-Unsubscribe-Post") {
            head.push_str("List-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n");
        }
    }
    if head.is_empty() {
        return None;
    }
    let mut out = Vec::with_capacity(head.len() + msg.len());
    out.extend_from_slice(head.as_bytes());
    out.extend_from_slice(msg);
    Some(out)
}

/// Whether the header block of `msg` has a field `name` (case-insensitive).
fn has_header(msg: &[u8], name: &str) -> bool {
    for line in msg.split(|&b| b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() {
            return false;
        }
        if let Some(colon) = line.iter().position(|&b| b == b':')
            && line[..colon].trim_ascii_end().eq_ignore_ascii_case(name.as_bytes())
        {
            return true;
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    fn adding(lu: Option<&str>) -> Adding<'_> {
        Adding {
            message_id: true,
            date: true,
            list_unsubscribe: lu,
            one_click: true,
            id_domain: "news.example.com",
            salt: "",
        }
    }

    #[test]
    fn missing_headers_are_added_in_front_and_present_ones_kept() {
        let msg = b"From: a@x.test\r\nSubject: hi\r\n\r\nMessage-ID: in the body\r\n";
        let out = String::from_utf8(add(msg, &adding(Some("<https://u.test/1>"))).unwrap()).unwrap();
        let lines: Vec<&str> = out.lines().collect();
        assert!(
            lines[0].starts_with("Message-ID: <") && lines[0].ends_with(".volley@news.example.com>"),
            "{out}"
        );
        assert!(lines[1].starts_with("Date: ") && lines[1].ends_with(" +0000"), "{out}");
        assert_eq!(lines[2], "List-Unsubscribe: <https://u.test/1>");
        assert_eq!(lines[3], "List-Unsubscribe-Post: List-Unsubscribe=One-Click");
        assert!(out.ends_with("From: a@x.test\r\nSubject: hi\r\n\r\nMessage-ID: in the body\r\n"));
        let has_all =
            b"message-id: <m@x>\r\nDATE: Tue, 1 Dec 2026 10:00:00 +0000\r\nList-Unsubscribe: <mailto:u@x>\r\n\r\nb\r\n";
        assert!(
            add(has_all, &adding(Some("<https://u.test/1>"))).is_none(),
            "nothing it lacks"
        );
    }

    #[test]
    fn the_same_message_gets_the_same_id_and_a_salted_copy_another() {
        let msg = b"Subject: hi\r\n\r\nb\r\n";
        let id = |salt: &str| {
            let a = Adding { salt, ..adding(None) };
            String::from_utf8(add(msg, &a).unwrap())
                .unwrap()
                .lines()
                .next()
                .unwrap()
                .to_string()
        };
        assert_eq!(id(""), id(""), "every shard makes the same one");
        assert_ne!(id(""), id("ann@example.org"));
    }
}
