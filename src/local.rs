//! volley's own failures, typed: what went wrong on this side when no
//! server reply decided an outcome. Classification (`classify.rs`, rules
//! with `local = true` and `kinds = [...]`) and automation rules with
//! `match_local = true` match these kinds, never the English of the reason.

use std::fmt;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Local {
    /// No TCP connection: refused, unreachable, timed out.
    Connect,
    /// No reply within its RFC 5321 timeout.
    Timeout,
    /// The connection closed or broke in the middle.
    Closed,
    /// A TLS handshake failed, or TLS was required and could not be had.
    Tls,
    /// The server broke the protocol (a reply that cannot be parsed or was not asked for).
    Protocol,
    /// The session cannot be used as configured (AUTH required but not offered, …).
    Policy,
    /// The server refused the session (its greeting, EHLO, STARTTLS or AUTH reply).
    Refused,
    /// An MX or address lookup failed for now.
    Dns,
    /// The domain does not exist or takes no mail (NXDOMAIN, null MX, no address).
    NoSuchDomain,
    /// No route and no resolver.
    NoResolver,
    /// The destination is backed off after its connections failed.
    DestinationDown,
    /// The destination was suspended by an automation rule past max_age.
    Suspended,
    /// The message or an address cannot go as it is (a line too long, an
    /// address that cannot be written on a command line).
    Message,
    /// An automation rule makes the destination's recipients bounce.
    RuleBounce,
    /// A UTF-8 address, and the server does not offer SMTPUTF8 (RFC 6531).
    Smtputf8,
}

impl Local {
    pub const ALL: [Local; 15] = [
        Local::Connect,
        Local::Timeout,
        Local::Closed,
        Local::Tls,
        Local::Protocol,
        Local::Policy,
        Local::Refused,
        Local::Dns,
        Local::NoSuchDomain,
        Local::NoResolver,
        Local::DestinationDown,
        Local::Suspended,
        Local::Message,
        Local::RuleBounce,
        Local::Smtputf8,
    ];

    /// Its name in rules and the delivery log.
    pub fn name(self) -> &'static str {
        match self {
            Local::Connect => "connect",
            Local::Timeout => "timeout",
            Local::Closed => "closed",
            Local::Tls => "tls",
            Local::Protocol => "protocol",
            Local::Policy => "policy",
            Local::Refused => "refused",
            Local::Dns => "dns",
            Local::NoSuchDomain => "no-such-domain",
            Local::NoResolver => "no-resolver",
            Local::DestinationDown => "destination-down",
            Local::Suspended => "suspended",
            Local::Message => "message",
            Local::RuleBounce => "rule-bounce",
            Local::Smtputf8 => "smtputf8",
        }
    }

    /// The enhanced status code (RFC 3463) its outcomes carry, where one fits.
    pub fn enhanced(self) -> Option<crate::smtp::Enhanced> {
        match self {
            // RFC 6531 §3.6.1: "5.6.7 … address requires SMTPUTF8".
            Local::Smtputf8 => Some(crate::smtp::Enhanced {
                class: 5,
                subject: 6,
                detail: 7,
            }),
            _ => None,
        }
    }

    pub fn parse(name: &str) -> Option<Local> {
        Local::ALL.into_iter().find(|l| l.name() == name)
    }
}

impl fmt::Display for Local {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A local failure: its kind and the reason, for people.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub kind: Local,
    pub reason: String,
}

impl Failure {
    pub fn new(kind: Local, reason: impl Into<String>) -> Failure {
        Failure {
            kind,
            reason: reason.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_has_a_name_that_parses_back() {
        for k in Local::ALL {
            assert_eq!(Local::parse(k.name()), Some(k));
        }
        assert_eq!(Local::parse("refuse"), None);
    }
}
