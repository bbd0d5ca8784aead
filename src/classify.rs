//! Bounce classification: every bounce and deferral gets a category from its
//! reply code, enhanced status code and text (or volley's own reason), by
//! the first matching rule of a TOML file. The defaults
//! (deploy/bounce-rules.toml, built in) follow the common replies of the big
//! mailbox providers. Policy lives in that file; this module only applies it.

use std::path::Path;

use anyhow::Context;
use serde::Deserialize;

use crate::local::Local;
use crate::smtp::Enhanced;

/// The built-in rules.
pub const DEFAULT_RULES: &str = include_str!("../deploy/bounce-rules.toml");

/// The category when no rule matches.
pub const OTHER: &str = "other";

/// Every category, in the order metrics list them.
pub const CATEGORIES: [&str; 11] = [
    "invalid-recipient",
    "mailbox-full",
    "policy-or-spam-block",
    "rate-limited",
    "greylisted",
    "message-too-large",
    "dns-failure",
    "tls-failure",
    "connection-failure",
    "protocol-error",
    OTHER,
];

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleFile {
    rule: Vec<Rule>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Rule {
    category: String,
    #[serde(default)]
    local: bool,
    /// For `local` rules: the kinds of volley's own failures (`local.rs`) it matches.
    #[serde(default)]
    kinds: Vec<String>,
    #[serde(default)]
    codes: Vec<u16>,
    #[serde(default)]
    enhanced: Vec<String>,
    #[serde(default)]
    text: Vec<String>,
    /// Only permanent (5xx) replies.
    #[serde(default)]
    permanent: bool,
    /// Only temporary (4xx) replies.
    #[serde(default)]
    temporary: bool,
}

#[derive(Debug)]
pub struct Classifier {
    rules: Vec<Rule>,
}

impl Classifier {
    pub fn parse(toml_text: &str, origin: &str) -> anyhow::Result<Classifier> {
        let mut file: RuleFile = toml::from_str(toml_text).with_context(|| format!("bad bounce rules {origin}"))?;
        for (i, r) in file.rule.iter_mut().enumerate() {
            anyhow::ensure!(
                CATEGORIES.contains(&r.category.as_str()),
                "{origin}: rule {} has unknown category {:?} (one of {})",
                i + 1,
                r.category,
                CATEGORIES.join(", ")
            );
            for t in &mut r.text {
                *t = t.to_lowercase();
            }
            anyhow::ensure!(
                !r.local || r.text.is_empty(),
                "{origin}: rule {} matches text with local = true: volley's own failures are matched by kinds = [...] ({})",
                i + 1,
                Local::ALL.map(Local::name).join(", ")
            );
            anyhow::ensure!(
                !(r.permanent && r.temporary),
                "{origin}: rule {} is both permanent and temporary",
                i + 1
            );
            anyhow::ensure!(
                !r.local || !(r.permanent || r.temporary),
                "{origin}: rule {} has permanent or temporary with local = true (they are about reply codes)",
                i + 1
            );
            anyhow::ensure!(
                r.local || r.kinds.is_empty(),
                "{origin}: rule {} has kinds without local = true",
                i + 1
            );
            for k in &r.kinds {
                anyhow::ensure!(
                    Local::parse(k).is_some(),
                    "{origin}: rule {} has unknown kind {k:?} (one of {})",
                    i + 1,
                    Local::ALL.map(Local::name).join(", ")
                );
            }
        }
        Ok(Classifier { rules: file.rule })
    }

    pub fn load(path: &Path) -> anyhow::Result<Classifier> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("cannot read bounce rules {}", path.display()))?;
        Self::parse(&text, &path.display().to_string())
    }

    /// The category of an outcome: decided by a reply (`code`, `enhanced`,
    /// `text`), or by volley's own failure (`local`: its kind; the text is
    /// then not looked at).
    pub fn classify(&self, code: Option<u16>, enhanced: Option<Enhanced>, text: &str, local: Option<Local>) -> &str {
        if code.is_none() {
            let Some(kind) = local else {
                return OTHER;
            };
            return self
                .rules
                .iter()
                .find(|r| r.local && r.kinds.iter().any(|k| k == kind.name()))
                .map_or(OTHER, |r| &r.category);
        }
        let text = text.to_lowercase();
        let enhanced = enhanced.map(|e| e.to_string());
        for r in &self.rules {
            if r.local {
                continue;
            }
            let class = code.map(|c| c / 100);
            if (r.permanent && class != Some(5)) || (r.temporary && class != Some(4)) {
                continue;
            }
            if !r.codes.is_empty() && !code.is_some_and(|c| r.codes.contains(&c)) {
                continue;
            }
            if !r.enhanced.is_empty()
                && !enhanced
                    .as_deref()
                    .is_some_and(|e| r.enhanced.iter().any(|p| enhanced_matches(e, p)))
            {
                continue;
            }
            if !r.text.is_empty() && !r.text.iter().any(|t| text.contains(t.as_str())) {
                continue;
            }
            return &r.category;
        }
        OTHER
    }
}

impl Default for Classifier {
    fn default() -> Self {
        Classifier::parse(DEFAULT_RULES, "(built in)").expect("the built-in rules parse")
    }
}

/// "5.1.1" matches "5.1.1" and "5.1." but not "5.1.10"'s prefix "5.1.1".
fn enhanced_matches(code: &str, pattern: &str) -> bool {
    if pattern.ends_with('.') {
        code.starts_with(pattern)
    } else {
        code == pattern
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn classify(c: &Classifier, wire: &str) -> String {
        let (code, text) = wire.split_at(3);
        let text = text.trim_start_matches([' ', '-']);
        let code: u16 = code.parse().unwrap();
        c.classify(Some(code), Enhanced::parse_prefix(text), text, None)
            .to_string()
    }

    #[test]
    fn real_replies() {
        let c = Classifier::default();
        let cases = [
            (
                "550 5.1.1 The email account that you tried to reach does not exist.",
                "invalid-recipient",
            ),
            (
                "550 5.1.1 <x@y>: Recipient address rejected: User unknown in virtual mailbox table",
                "invalid-recipient",
            ),
            (
                "550 5.5.0 Requested action not taken: mailbox unavailable",
                "invalid-recipient",
            ),
            (
                "554 5.1.10 RESOLVER.ADR.RecipientNotFound; Recipient not found by SMTP address lookup",
                "invalid-recipient",
            ),
            (
                "552 5.2.2 The email account that you tried to reach is over quota.",
                "mailbox-full",
            ),
            (
                "452 4.2.2 The email account that you tried to reach is over quota.",
                "mailbox-full",
            ),
            (
                "550 5.7.1 Our system has detected that this message is likely unsolicited mail.",
                "policy-or-spam-block",
            ),
            (
                "550 5.7.26 This message does not have authentication information or fails to pass authentication checks (SPF or DKIM).",
                "policy-or-spam-block",
            ),
            (
                "554 5.7.1 Service unavailable; Client host [192.0.2.1] blocked using zen.spamhaus.org",
                "policy-or-spam-block",
            ),
            (
                "554 5.7.9 Message not accepted for policy reasons.",
                "policy-or-spam-block",
            ),
            (
                "421 4.7.28 Our system has detected an unusual rate of unsolicited mail originating from your IP address.",
                "rate-limited",
            ),
            (
                "421 4.7.0 [TSS04] Messages from 192.0.2.1 temporarily deferred due to unexpected volume or user complaints",
                "rate-limited",
            ),
            ("450 4.7.1 Too many connections, slow down", "rate-limited"),
            (
                "552 5.3.4 Message size exceeds fixed maximum message size",
                "message-too-large",
            ),
            ("552 Message size exceeds fixed limit", "message-too-large"),
            ("503 5.5.1 Error: nested MAIL command", "protocol-error"),
            ("500 Syntax error, command unrecognized", "protocol-error"),
            ("451 4.3.0 Temporary server error. Please try again later", "greylisted"),
            // Greylisting: Postfix with postgrey, Exchange, rspamd, milter-greylist, Gmail, Yahoo, Mimecast.
            (
                "450 4.2.0 <ann@example.org>: Recipient address rejected: Greylisted, see http://postgrey.schweikert.ch/help/example.org.html",
                "greylisted",
            ),
            (
                "450 4.7.1 <ann@example.org>: Recipient address rejected: Greylisted for 300 seconds",
                "greylisted",
            ),
            ("451 4.7.1 Greylisting in action, please come back later", "greylisted"),
            ("451 4.7.1 Try again later", "greylisted"),
            (
                "451 4.7.1 Service unavailable - try again later (milter-greylist: greylisted for 5 minutes)",
                "greylisted",
            ),
            (
                "451 4.3.0 Mail server temporarily rejected message. a1-20020a05 - gsmtp",
                "greylisted",
            ),
            (
                "450 4.2.1 <ann@example.org>: Recipient address rejected: try again later",
                "greylisted",
            ),
            ("451 Message temporarily deferred - [160]", "greylisted"),
            (
                "451 Internal resource temporarily unavailable - https://community.mimecast.com/docs/DOC-1369#451",
                "greylisted",
            ),
        ];
        for (wire, want) in cases {
            assert_eq!(classify(&c, wire), want, "{wire}");
        }
    }

    /// A temporary reply never says an address is invalid: the same words
    /// with a 4xx code are not `invalid-recipient`.
    #[test]
    fn a_temporary_reply_never_gets_a_permanent_category() {
        let c = Classifier::default();
        for (wire, want) in [
            (
                "550 5.1.1 <a@b>: Recipient address rejected: User unknown",
                "invalid-recipient",
            ),
            ("450 4.1.1 <a@b>: Recipient address rejected: User unknown", "other"),
            (
                "550 5.2.1 The email account that you tried to reach is disabled.",
                "invalid-recipient",
            ),
            (
                "450 4.2.1 The email account that you tried to reach is disabled.",
                "other",
            ),
            (
                "450 4.1.1 <a@b>: Recipient address rejected: unverified address: try again later",
                "greylisted",
            ),
        ] {
            assert_eq!(classify(&c, wire), want, "{wire}");
        }
        for (wire, _) in [("450 mailbox unavailable", 0), ("451 4.1.1 no such user here", 0)] {
            assert_ne!(classify(&c, wire), "invalid-recipient", "{wire}");
        }
        let err = Classifier::parse(
            "[[rule]]\ncategory = \"other\"\npermanent = true\ntemporary = true\n",
            "rules.toml",
        )
        .unwrap_err();
        assert!(format!("{err:#}").contains("both permanent and temporary"), "{err:#}");
    }

    #[test]
    fn volleys_own_failures_are_classified_by_their_kind_not_their_words() {
        let c = Classifier::default();
        let local = |k: Local, t: &str| c.classify(None, None, t, Some(k)).to_string();
        let cases = [
            (Local::Dns, "dns-failure"),
            (Local::NoSuchDomain, "dns-failure"),
            (Local::NoResolver, "dns-failure"),
            (Local::Tls, "tls-failure"),
            (Local::Connect, "connection-failure"),
            (Local::Closed, "connection-failure"),
            (Local::Timeout, "connection-failure"),
            (Local::Refused, "connection-failure"),
            (Local::DestinationDown, "connection-failure"),
            (Local::Protocol, "protocol-error"),
            (Local::Policy, "protocol-error"),
            (Local::Suspended, "rate-limited"),
            (Local::RuleBounce, "policy-or-spam-block"),
        ];
        for (kind, want) in cases {
            // The words do not matter: a reason that reads like another kind's.
            assert_eq!(local(kind, "TLS handshake failed: connection refused"), want, "{kind}");
        }
        assert_eq!(local(Local::Message, "x"), "other");
        assert_eq!(
            c.classify(None, None, "timed out", None),
            "other",
            "no kind, no local rule"
        );
    }

    #[test]
    fn bad_rule_files_say_what() {
        let err = Classifier::parse("[[rule]]\ncategory = \"spam\"\n", "rules.toml").unwrap_err();
        assert!(
            format!("{err:#}").contains("rule 1 has unknown category \"spam\""),
            "{err:#}"
        );
        assert!(Classifier::parse("[[rule]]\ncategori = \"other\"\n", "rules.toml").is_err());
        let err = Classifier::parse(
            "[[rule]]\ncategory = \"other\"\nlocal = true\ntext = [\"timed out\"]\n",
            "rules.toml",
        )
        .unwrap_err();
        assert!(format!("{err:#}").contains("kinds = [...]"), "{err:#}");
        let err = Classifier::parse(
            "[[rule]]\ncategory = \"other\"\nlocal = true\nkinds = [\"slow\"]\n",
            "rules.toml",
        )
        .unwrap_err();
        assert!(format!("{err:#}").contains("unknown kind \"slow\""), "{err:#}");
    }
}
