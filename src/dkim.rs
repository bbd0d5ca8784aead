//! DKIM signing (RFC 6376; Ed25519 by RFC 8463) with mail-auth over ring,
//! the crypto library rustls already brings: one RSA and Ed25519
//! implementation in the process, constant-time and assembly-backed, and no
//! second C library to build (mail-auth 0.14 and later drop ring for
//! aws-lc-rs, and need a mail-parser that needs Rust 1.98).
//!
//! `[dkim."DOMAIN"]` gives the keys of a From: domain (a subdomain of it
//! signs with it too: `d=` is the configured domain, which DMARC's relaxed
//! alignment accepts). A message is signed on the shard, once per message
//! file (the prepared copy every job of that file shares), over exactly the
//! bytes that go on the wire (CRLF line ends, before dot-stuffing).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use mail_auth::common::crypto::{Ed25519Key, HashContext, HashImpl, RsaKey, Sha256, SigningKey};
use mail_auth::common::headers::{HeaderStream, HeaderWriter, Writable, Writer};
use mail_auth::dkim::{Canonicalization, DkimSigner, Done, Signature};
use rustls_pki_types::PrivateKeyDer;
use rustls_pki_types::pem::PemObject;
use serde::Deserialize;

use crate::smtp::WireMessage;

/// The headers signed unless a domain lists its own. Absent ones are signed
/// as absent (RFC 6376 §5.4: nobody can add them later).
pub const DEFAULT_HEADERS: [&str; 9] = [
    "From",
    "To",
    "Subject",
    "Date",
    "Message-ID",
    "MIME-Version",
    "Content-Type",
    "List-Unsubscribe",
    "List-Unsubscribe-Post",
];

/// One key of a domain.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeySpec {
    pub selector: String,
    /// PEM: PKCS#1 (`RSA PRIVATE KEY`) or PKCS#8 (`PRIVATE KEY`, RSA or Ed25519).
    pub key_file: PathBuf,
}

/// `[dkim."DOMAIN"]`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DomainSpec {
    /// One key: its selector and file.
    pub selector: Option<String>,
    pub key_file: Option<PathBuf>,
    /// Several keys (e.g. RSA-2048 and Ed25519 side by side): one signature each.
    #[serde(default)]
    pub keys: Vec<KeySpec>,
    /// Headers to sign (default: `DEFAULT_HEADERS`); must include From.
    pub headers: Option<Vec<String>>,
    /// Headers signed once more than they occur, so none can be added (default: From).
    pub oversign: Option<Vec<String>>,
    /// `relaxed/relaxed` (default), `relaxed/simple`, `simple/relaxed`, `simple/simple`, or one word for both.
    pub canonicalization: Option<String>,
}

enum Key {
    Rsa(DkimSigner<RsaKey<Sha256>, Done>),
    Ed25519(DkimSigner<Ed25519Key, Done>),
}

impl Key {
    /// The signature's tags as configured (`d=`, `s=`, `a=`, `h=` wanted, canonicalization).
    fn template(&self) -> &Signature {
        match self {
            Key::Rsa(s) => &s.template,
            Key::Ed25519(s) => &s.template,
        }
    }

    /// Signs the canonical headers followed by `sig` itself (RFC 6376 §3.7).
    fn sign(&self, canonical_headers: &[u8], sig: &Signature) -> mail_auth::Result<Vec<u8>> {
        let input = Signable(canonical_headers, sig);
        match self {
            Key::Rsa(s) => s.key.sign(input),
            Key::Ed25519(s) => s.key.sign(input),
        }
    }

    fn algorithm(&self) -> &'static str {
        match self {
            Key::Rsa(_) => "rsa-sha256",
            Key::Ed25519(_) => "ed25519-sha256",
        }
    }
}

/// What a signature signs: the signed headers, canonical, then the
/// DKIM-Signature header with an empty `b=`.
struct Signable<'a>(&'a [u8], &'a Signature);

impl Writable for Signable<'_> {
    fn write(self, writer: &mut impl Writer) {
        writer.write(self.0);
        self.1.write(writer, false);
    }
}

/// The header fields of a message with CRLF line ends, read as mail-auth
/// reads them (its own iterator is not public): a field runs from its name
/// to the end of its last folded line, and the first line without a colon
/// (the empty line) ends the header section; the body follows it.
struct Fields<'x, 'c> {
    msg: &'x [u8],
    pos: usize,
    /// Where the body starts, once the header section has ended.
    body_at: Option<usize>,
    /// The body, told to whoever asked for it.
    body: Option<&'c std::cell::Cell<&'x [u8]>>,
}

impl<'x, 'c> Fields<'x, 'c> {
    fn new(msg: &'x [u8], body: Option<&'c std::cell::Cell<&'x [u8]>>) -> Self {
        Fields {
            msg,
            pos: 0,
            body_at: None,
            body,
        }
    }
}

impl<'x> Iterator for Fields<'x, '_> {
    type Item = (&'x [u8], &'x [u8]);

    fn next(&mut self) -> Option<Self::Item> {
        if self.body_at.is_some() {
            return None;
        }
        let msg = self.msg;
        let start = self.pos;
        let Some(nl) = memchr::memchr(b'\n', &msg[start..]).map(|o| start + o) else {
            self.body_at = Some(msg.len());
            return None;
        };
        let Some(colon) = memchr::memchr(b':', &msg[start..nl]).map(|o| start + o) else {
            self.body_at = Some(nl + 1);
            return None;
        };
        let mut end = nl + 1;
        while matches!(msg.get(end), Some(b' ' | b'\t')) {
            match memchr::memchr(b'\n', &msg[end..]) {
                Some(o) => end += o + 1,
                None => end = msg.len(),
            }
        }
        self.pos = end;
        Some((&msg[start..colon], &msg[colon + 1..end]))
    }
}

impl<'x> HeaderStream<'x> for Fields<'x, '_> {
    fn next_header(&mut self) -> Option<(&'x [u8], &'x [u8])> {
        self.next()
    }

    fn body(&mut self) -> &'x [u8] {
        while self.next().is_some() {}
        let body = &self.msg[self.body_at.unwrap_or(self.msg.len())..];
        if let Some(cell) = self.body {
            cell.set(body);
        }
        body
    }
}

/// What a shard remembers between the copies of one personalised message
/// file, so that what is the same in every copy is worked out once: the
/// From: header and the domain it names, the body and its hash (the body
/// hash is computed once when only headers differ).
#[derive(Default)]
pub struct Memo {
    /// The From: header values (joined) and their domain.
    from: Option<(Vec<u8>, Option<String>)>,
    /// The last body, its canonicalization and its hash.
    body: Option<(Canonicalization, Vec<u8>, Vec<u8>)>,
    /// The From: values of the copy at hand (a buffer kept between copies).
    scratch: Vec<u8>,
    /// Body hashes computed and reused, for the tests.
    pub hashed: u64,
    pub reused: u64,
}

impl Memo {
    fn domain_of_from(&mut self, message: &[u8]) -> Option<String> {
        let key = &mut self.scratch;
        key.clear();
        for (name, value) in Fields::new(message, None) {
            if name.eq_ignore_ascii_case(b"From") {
                key.extend_from_slice(value);
                key.push(0);
            }
        }
        if let Some((k, domain)) = &self.from
            && k == key
        {
            return domain.clone();
        }
        let domain = from_domain(message);
        match &mut self.from {
            Some((k, d)) => {
                std::mem::swap(k, &mut self.scratch);
                d.clone_from(&domain);
            }
            None => self.from = Some((std::mem::take(&mut self.scratch), domain.clone())),
        }
        domain
    }
}

/// The keys of one signing domain.
struct Domain {
    name: String,
    keys: Vec<(String, Key)>,
}

/// Every configured signing domain, loaded at start-up.
#[derive(Default)]
pub struct Signers {
    domains: BTreeMap<String, Domain>,
}

/// What signing a message came to.
#[derive(Debug)]
pub enum Signed {
    /// No key for its From: domain (or no From: address): sent as it is.
    Unsigned,
    /// The message with its DKIM-Signature headers in front, the signing
    /// domain and the algorithms of its signatures.
    Signed {
        wire: WireMessage,
        domain: String,
        algorithms: Vec<&'static str>,
    },
}

impl Signers {
    /// Loads and checks every key of `[dkim]`: a key file that cannot be
    /// read or parsed, or a bad setting, is an error naming its key.
    pub fn load(specs: &BTreeMap<String, DomainSpec>) -> anyhow::Result<Signers> {
        let mut domains = BTreeMap::new();
        for (name, spec) in specs {
            let at = format!("dkim.{name:?}");
            let domain = name.trim_end_matches('.').to_ascii_lowercase();
            if !domain.contains('.') || domain.contains(['@', ' ', '/']) {
                bail!("{at}: {name:?} is not a domain");
            }
            // Each key with where it was given, for errors.
            let mut keys: Vec<(String, &str, &Path)> = Vec::new();
            match (&spec.selector, &spec.key_file) {
                (Some(selector), Some(key_file)) => keys.push((at.clone(), selector, key_file)),
                (None, None) => {}
                (Some(_), None) => bail!("{at}: selector without key_file"),
                (None, Some(_)) => bail!("{at}: key_file without selector"),
            }
            for (i, k) in spec.keys.iter().enumerate() {
                keys.push((format!("{at}.keys[{i}]"), &k.selector, &k.key_file));
            }
            if keys.is_empty() {
                bail!("{at}: no key (selector and key_file, or keys = [{{ selector, key_file }}, …])");
            }
            let mut headers: Vec<String> = match &spec.headers {
                Some(h) => h.clone(),
                None => DEFAULT_HEADERS.iter().map(|h| h.to_string()).collect(),
            };
            if !headers.iter().any(|h| h.eq_ignore_ascii_case("From")) {
                bail!("{at}.headers: must include From (RFC 6376 §5.4)");
            }
            if let Some(bad) = headers
                .iter()
                .find(|h| h.is_empty() || !h.bytes().all(|b| b.is_ascii_graphic() && b != b':'))
            {
                bail!("{at}.headers: {bad:?} is not a header name");
            }
            let oversign = spec.oversign.clone().unwrap_or_else(|| vec!["From".to_string()]);
            headers.extend(oversign);
            let (ch, cb) = canonicalization(spec.canonicalization.as_deref().unwrap_or("relaxed/relaxed"))
                .with_context(|| format!("{at}.canonicalization"))?;
            let mut loaded = Vec::new();
            for (at, selector, key_file) in keys {
                if selector.is_empty()
                    || !selector
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
                {
                    bail!("{at}.selector: {selector:?} is not a DNS label");
                }
                let key = load_key(key_file).with_context(|| format!("{at}.key_file = {}", key_file.display()))?;
                let key = match key {
                    Parsed::Rsa(k) => Key::Rsa(signer_of(k, &domain, selector, &headers, ch, cb)),
                    Parsed::Ed25519(k) => Key::Ed25519(signer_of(k, &domain, selector, &headers, ch, cb)),
                };
                loaded.push((selector.to_string(), key));
            }
            domains.insert(
                domain.clone(),
                Domain {
                    name: domain,
                    keys: loaded,
                },
            );
        }
        Ok(Signers { domains })
    }

    pub fn is_empty(&self) -> bool {
        self.domains.is_empty()
    }

    /// The configured domain that signs for mail from `from_domain`: itself or its closest parent.
    fn domain_for(&self, from_domain: &str) -> Option<&Domain> {
        let mut d = from_domain;
        loop {
            if let Some(x) = self.domains.get(d) {
                return Some(x);
            }
            d = d.split_once('.')?.1;
        }
    }

    /// Signs a message prepared for the wire, if its From: domain has keys.
    /// `memo`: what earlier copies of the same message file left (personalised copies).
    pub fn sign(&self, wire: &WireMessage, memo: Option<&mut Memo>) -> Result<Signed, String> {
        if self.is_empty() {
            return Ok(Signed::Unsigned);
        }
        let plain = wire.chunk();
        let mut memo = memo;
        let from = match memo.as_deref_mut() {
            Some(m) => m.domain_of_from(&plain),
            None => from_domain(&plain),
        };
        let Some(from) = from else {
            return Ok(Signed::Unsigned);
        };
        let Some(domain) = self.domain_for(&from) else {
            return Ok(Signed::Unsigned);
        };
        // Every key of a domain signs the same headers the same way: the
        // headers are canonicalized and the body hashed once for them all.
        let first = domain.keys[0].1.template();
        let body = std::cell::Cell::new(&b""[..]);
        let (_, canonical, signed_headers, _) = first.canonicalize(Fields::new(&plain, Some(&body)));
        let mut headers = Vec::with_capacity(512);
        canonical.write(&mut headers);
        let body = body.get();
        let cb = first.cb;
        let bh = match memo {
            Some(Memo {
                body: Some((c, b, bh)),
                reused,
                ..
            }) if *c == cb && b.as_slice() == body => {
                *reused += 1;
                bh.clone()
            }
            m => {
                let bh = body_hash(cb, body);
                if let Some(m) = m {
                    m.hashed += 1;
                    // The last body's buffer is kept for the next copy's.
                    match &mut m.body {
                        Some((c, b, h)) => {
                            *c = cb;
                            b.clear();
                            b.extend_from_slice(body);
                            h.clone_from(&bh);
                        }
                        None => m.body = Some((cb, body.to_vec(), bh.clone())),
                    }
                }
                bh
            }
        };
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let mut head = Vec::with_capacity(600 * domain.keys.len());
        for (selector, key) in &domain.keys {
            let mut sig = key.template().clone();
            sig.bh = bh.clone();
            sig.t = now;
            sig.h = signed_headers.clone();
            sig.b = key
                .sign(&headers, &sig)
                .map_err(|e| format!("DKIM signing with selector {selector} failed: {e}"))?;
            sig.write_header(&mut head);
        }
        Ok(Signed::Signed {
            wire: wire.prepended(&head),
            domain: domain.name.clone(),
            algorithms: domain.keys.iter().map(|(_, k)| k.algorithm()).collect(),
        })
    }
}

/// The body hash (`bh=`, SHA-256) of `body` canonicalized by `cb`.
fn body_hash(cb: Canonicalization, body: &[u8]) -> Vec<u8> {
    let mut h = <Sha256 as HashImpl>::hasher();
    cb.canonical_body(body, u64::MAX).write(&mut h);
    h.complete().as_ref().to_vec()
}

/// A signer for one key of a domain, ready to sign.
fn signer_of<T: mail_auth::common::crypto::SigningKey>(
    key: T,
    domain: &str,
    selector: &str,
    headers: &[String],
    ch: Canonicalization,
    cb: Canonicalization,
) -> DkimSigner<T, Done> {
    DkimSigner::from_key(key)
        .domain(domain)
        .selector(selector)
        .headers(headers.iter().cloned())
        .header_canonicalization(ch)
        .body_canonicalization(cb)
}

enum Parsed {
    Rsa(RsaKey<Sha256>),
    Ed25519(Ed25519Key),
}

fn load_key(path: &Path) -> anyhow::Result<Parsed> {
    let pem = std::fs::read(path).context("cannot read the key file")?;
    let der = PrivateKeyDer::from_pem_slice(&pem)
        .map_err(|e| anyhow::anyhow!("not a PEM private key (PKCS#1 or PKCS#8): {e}"))?;
    let unparsed = |e: mail_auth::Error| anyhow::anyhow!("the key does not parse: {e}");
    match der {
        PrivateKeyDer::Pkcs1(_) => Ok(Parsed::Rsa(RsaKey::from_key_der(der).map_err(unparsed)?)),
        PrivateKeyDer::Pkcs8(ref p) => {
            // An Ed25519 PKCS#8 key is small; openssl writes it without the public key.
            if let Ok(k) = Ed25519Key::from_pkcs8_maybe_unchecked_der(p.secret_pkcs8_der()) {
                return Ok(Parsed::Ed25519(k));
            }
            Ok(Parsed::Rsa(RsaKey::from_key_der(der).map_err(unparsed)?))
        }
        _ => bail!("an EC (SEC1) key: DKIM signs with RSA or Ed25519"),
    }
}

/// The DNS TXT record that publishes the public half of `key_file` for
/// `selector` at `domain` (RFC 6376 §3.6.1: RSA as SubjectPublicKeyInfo, as
/// opendkim and Gmail publish it; Ed25519 as its 32 raw bytes, RFC 8463),
/// in zone-file form with the value split into strings of at most 255.
pub fn dns_record(key_file: &Path, selector: &str, domain: &str) -> anyhow::Result<String> {
    use base64::Engine;
    let key = load_key(key_file).with_context(|| format!("{}", key_file.display()))?;
    let (k, public) = match key {
        Parsed::Rsa(k) => ("rsa", rsa_spki(&k.public_key())),
        Parsed::Ed25519(k) => ("ed25519", k.public_key()),
    };
    let value = format!(
        "v=DKIM1; k={k}; p={}",
        base64::engine::general_purpose::STANDARD.encode(public)
    );
    let strings: Vec<String> = value
        .as_bytes()
        .chunks(255)
        .map(|c| format!("\"{}\"", String::from_utf8_lossy(c)))
        .collect();
    Ok(format!(
        "{selector}._domainkey.{}. IN TXT ( {} )",
        domain.trim_end_matches('.'),
        strings.join(" ")
    ))
}

/// An RSAPublicKey (PKCS#1) wrapped as a SubjectPublicKeyInfo.
fn rsa_spki(pkcs1: &[u8]) -> Vec<u8> {
    const RSA_ENCRYPTION: [u64; 7] = [1, 2, 840, 113549, 1, 1, 1];
    yasna::construct_der(|w| {
        w.write_sequence(|w| {
            w.next().write_sequence(|w| {
                w.next()
                    .write_oid(&yasna::models::ObjectIdentifier::from_slice(&RSA_ENCRYPTION));
                w.next().write_null();
            });
            w.next().write_bitvec_bytes(pkcs1, pkcs1.len() * 8);
        })
    })
}

fn canonicalization(s: &str) -> anyhow::Result<(Canonicalization, Canonicalization)> {
    let one = |w: &str| match w.trim() {
        "relaxed" => Ok(Canonicalization::Relaxed),
        "simple" => Ok(Canonicalization::Simple),
        other => Err(anyhow::anyhow!(
            "{other:?}: want relaxed or simple (e.g. \"relaxed/relaxed\")"
        )),
    };
    match s.split_once('/') {
        Some((h, b)) => Ok((one(h)?, one(b)?)),
        None => Ok((one(s)?, one(s)?)),
    }
}

/// The domain of the message's From: address, lower-cased (the first
/// address when there are several).
pub fn from_domain(message: &[u8]) -> Option<String> {
    let parsed = mail_parser::MessageParser::new().parse_headers(message)?;
    let addr = parsed.from()?.first()?.address()?;
    let (_, domain) = addr.rsplit_once('@')?;
    let domain = domain.trim().trim_end_matches('.').to_ascii_lowercase();
    (!domain.is_empty()).then_some(domain)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    #[test]
    fn the_from_domain_is_found_through_display_names_and_folding() {
        let m = b"Subject: x\r\nFrom: \"News, Weekly\"\r\n <News@Mail.Example.COM>\r\n\r\nbody\r\n";
        assert_eq!(from_domain(m).as_deref(), Some("mail.example.com"));
        assert_eq!(from_domain(b"Subject: none\r\n\r\nbody\r\n"), None);
        assert_eq!(from_domain(b"From: undisclosed\r\n\r\n"), None);
    }

    #[test]
    fn canonicalization_takes_one_or_two_words() {
        assert_eq!(
            canonicalization("relaxed/simple").unwrap(),
            (Canonicalization::Relaxed, Canonicalization::Simple)
        );
        assert_eq!(
            canonicalization("simple").unwrap(),
            (Canonicalization::Simple, Canonicalization::Simple)
        );
        assert!(
            canonicalization("loose/relaxed")
                .unwrap_err()
                .to_string()
                .contains("\"loose\"")
        );
    }

    #[test]
    fn bad_settings_and_keys_are_refused_by_their_key() {
        let dir = tempfile::tempdir().unwrap();
        let junk = dir.path().join("junk.pem");
        std::fs::write(&junk, "not a key\n").unwrap();
        let garbled = dir.path().join("garbled.pem");
        std::fs::write(
            &garbled,
            "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
        )
        .unwrap();
        let cases = [
            (
                format!("selector = \"s\"\nkey_file = {:?}\n", dir.path().join("none.pem")),
                "dkim.\"news.example.com\".key_file = ",
                "cannot read the key file",
            ),
            (
                format!("selector = \"s\"\nkey_file = {junk:?}\n"),
                "dkim.\"news.example.com\".key_file = ",
                "not a PEM private key",
            ),
            (
                format!("selector = \"s\"\nkey_file = {garbled:?}\n"),
                "dkim.\"news.example.com\".key_file = ",
                "the key does not parse",
            ),
            (
                format!("keys = [{{ selector = \"a\", key_file = {junk:?} }}]\n"),
                "dkim.\"news.example.com\".keys[0].key_file = ",
                "not a PEM",
            ),
            (
                "selector = \"s\"\n".to_string(),
                "dkim.\"news.example.com\": selector without key_file",
                "",
            ),
            (
                "canonicalization = \"relaxed\"\n".to_string(),
                "dkim.\"news.example.com\": no key",
                "",
            ),
            (
                format!("selector = \"s\"\nkey_file = {junk:?}\nheaders = [\"Subject\"]\n"),
                "dkim.\"news.example.com\".headers: must include From",
                "",
            ),
            (
                format!("selector = \"s\"\nkey_file = {junk:?}\ncanonicalization = \"tight\"\n"),
                "dkim.\"news.example.com\".canonicalization",
                "\"tight\"",
            ),
        ];
        for (text, want, cause) in cases {
            let spec: DomainSpec = toml::from_str(&text).unwrap();
            let specs = BTreeMap::from([("news.example.com".to_string(), spec)]);
            let err = format!("{:#}", Signers::load(&specs).err().unwrap());
            assert!(
                err.starts_with(want) && err.contains(cause),
                "{text}\n got: {err}\nwant: {want} … {cause}"
            );
        }
    }

    /// news.example.com with an RSA-2048 key (selector rsa1) and an Ed25519 one (ed1).
    pub(crate) fn two_keys() -> Signers {
        let text = format!(
            "[\"news.example.com\"]\nkeys = [{{ selector = \"rsa1\", key_file = {:?} }}, {{ selector = \"ed1\", key_file = {:?} }}]\n",
            data("rsa2048.pem"),
            data("ed25519.pem")
        );
        let specs: BTreeMap<String, DomainSpec> = toml::from_str(&text).unwrap();
        Signers::load(&specs).unwrap()
    }

    fn data(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/dkim").join(name)
    }

    #[test]
    fn the_dns_record_has_the_public_key_as_openssl_writes_it() {
        for (key, want_k, file) in [
            ("rsa2048.pem", "rsa", "rsa2048.spki.b64"),
            ("rsa2048-pkcs1.pem", "rsa", "rsa2048.spki.b64"),
            ("ed25519.pem", "ed25519", "ed25519.raw.b64"),
        ] {
            let rec = dns_record(&data(key), "s1", "news.example.com.").unwrap();
            let want = std::fs::read_to_string(data(file)).unwrap();
            assert!(
                rec.starts_with("s1._domainkey.news.example.com. IN TXT ( \"v=DKIM1; k="),
                "{rec}"
            );
            let joined: String = rec.split('"').skip(1).step_by(2).collect();
            assert_eq!(joined, format!("v=DKIM1; k={want_k}; p={}", want.trim()), "{key}");
            assert!(rec.split('"').skip(1).step_by(2).all(|s| s.len() <= 255));
        }
        let err = format!("{:#}", dns_record(&data("ec.pem"), "s", "x.test").unwrap_err());
        assert!(err.contains("ec.pem") && err.contains("EC (SEC1)"), "{err}");
    }

    /// The tag `name` of each DKIM-Signature header of a prepared message.
    fn tags(w: &WireMessage, name: &str) -> Vec<String> {
        let text = String::from_utf8(w.bytes.clone()).unwrap();
        let unfolded = text.replace("\r\n\t", "").replace("\r\n ", "");
        unfolded
            .lines()
            .filter(|l| l.starts_with("DKIM-Signature:"))
            .map(|l| {
                l.split(';')
                    .find_map(|t| t.trim().strip_prefix(&format!("{name}=")))
                    .unwrap()
                    .replace(' ', "")
            })
            .collect()
    }

    #[test]
    fn copies_that_differ_only_in_headers_hash_their_body_once() {
        let signers = two_keys();
        let copy = |to: &str, body: &str| {
            WireMessage::prepare(format!("From: n@news.example.com\nTo: {to}\nSubject: s\n\n{body}").as_bytes())
        };
        let signed = |w: &WireMessage, memo: Option<&mut Memo>| match signers.sign(w, memo).unwrap() {
            Signed::Signed { wire, .. } => wire,
            Signed::Unsigned => panic!("signed"),
        };
        let mut memo = Memo::default();
        let a = signed(&copy("a@x.test", "Hello\n.dot\n"), Some(&mut memo));
        let b = signed(&copy("b@x.test", "Hello\n.dot\n"), Some(&mut memo));
        assert_eq!((memo.hashed, memo.reused), (1, 1));
        // The hash carried over is the one signing b alone makes, for both keys.
        let alone = signed(&copy("b@x.test", "Hello\n.dot\n"), None);
        assert_eq!(tags(&b, "bh"), tags(&alone, "bh"));
        assert_eq!(tags(&a, "bh"), tags(&b, "bh"));
        assert_eq!(tags(&b, "bh").len(), 2);
        let c = signed(&copy("c@x.test", "Bye\n"), Some(&mut memo));
        assert_eq!((memo.hashed, memo.reused), (2, 1));
        assert_ne!(tags(&c, "bh"), tags(&b, "bh"));
        assert_eq!(tags(&c, "bh"), tags(&signed(&copy("c@x.test", "Bye\n"), None), "bh"));
        // A From: of another domain is not taken from the memo.
        let other = WireMessage::prepare(b"From: n@other.test\nSubject: s\n\nBye\n");
        assert!(matches!(
            signers.sign(&other, Some(&mut memo)).unwrap(),
            Signed::Unsigned
        ));
    }

    #[test]
    fn fields_are_read_as_mail_auth_reads_them() {
        let msg = b"From: a\r\n b\r\nSubject:x\r\n\r\nbody: not a header\r\n";
        let body = std::cell::Cell::new(&b""[..]);
        let mut f = Fields::new(msg, Some(&body));
        assert_eq!(f.next(), Some((&b"From"[..], &b" a\r\n b\r\n"[..])));
        assert_eq!(f.next(), Some((&b"Subject"[..], &b"x\r\n"[..])));
        assert_eq!(f.next(), None);
        assert_eq!(f.body(), b"body: not a header\r\n");
        assert_eq!(body.get(), b"body: not a header\r\n");
        let mut f = Fields::new(b"Subject: no body\r\n", None);
        assert_eq!(f.next().map(|(n, _)| n), Some(&b"Subject"[..]));
        assert_eq!(f.body(), b"");
    }

    #[test]
    fn a_message_from_a_configured_domain_or_its_subdomain_is_signed_with_every_key() {
        let signers = two_keys();
        let msg = |from: &str| WireMessage::prepare(format!("From: {from}\nSubject: hi\n\n.dot\nbody\n").as_bytes());
        let Signed::Signed {
            wire: w,
            domain,
            algorithms,
        } = signers.sign(&msg("a@mail.news.example.com"), None).unwrap()
        else {
            panic!("a subdomain signs with its parent's keys");
        };
        assert_eq!(
            (domain.as_str(), algorithms),
            ("news.example.com", vec!["rsa-sha256", "ed25519-sha256"])
        );
        let text = String::from_utf8(w.bytes.clone()).unwrap();
        let sigs: Vec<&str> = text.lines().filter(|l| l.starts_with("DKIM-Signature:")).collect();
        assert_eq!(sigs.len(), 2, "{text}");
        assert!(sigs[0].contains("a=rsa-sha256") && text.contains("s=rsa1"), "{text}");
        assert!(sigs[1].contains("a=ed25519-sha256") && text.contains("s=ed1"), "{text}");
        assert!(text.contains("d=news.example.com"), "{text}");
        assert!(text.contains("c=relaxed/relaxed"), "{text}");
        assert!(
            text.contains("h=From:Subject:To:Date:") || text.contains("h=Subject:From:To:"),
            "{text}"
        );
        assert!(
            text.ends_with("\r\n..dot\r\nbody\r\n.\r\n"),
            "still stuffed for DATA: {text:?}"
        );
        assert!(matches!(
            signers.sign(&msg("a@other.test"), None).unwrap(),
            Signed::Unsigned
        ));
        assert!(
            matches!(signers.sign(&msg("a@example.com"), None).unwrap(), Signed::Unsigned),
            "a parent is not signed for"
        );
    }
}
