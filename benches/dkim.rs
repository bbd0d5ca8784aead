//! DKIM signing costs with the chosen backend (mail-auth over ring): the
//! raw signature of the backend (RSA-2048, Ed25519, over a header-sized
//! input) and a whole 1.5 KB message signed as volley signs it (body hash,
//! headers, signature, the signed copy prepared for the wire).
//! `cargo bench --bench dkim`.

use std::collections::BTreeMap;
use std::hint::black_box;
use std::path::Path;

use criterion::{Criterion, criterion_group, criterion_main};
use mail_auth::common::crypto::{Ed25519Key, RsaKey, Sha256, SigningKey};
use rustls_pki_types::PrivateKeyDer;
use rustls_pki_types::pem::PemObject;
use volley::dkim::{DomainSpec, Signed, Signers};
use volley::generator::message;
use volley::smtp::WireMessage;

fn key(name: &str) -> PrivateKeyDer<'static> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/dkim").join(name);
    PrivateKeyDer::from_pem_file(path).unwrap()
}

fn raw(c: &mut Criterion) {
    // About what relaxed canonical headers of a newsletter come to.
    let input = vec![b'h'; 400];
    let mut g = c.benchmark_group("dkim_raw_signature");
    let rsa = RsaKey::<Sha256>::from_key_der(key("rsa2048.pem")).unwrap();
    g.bench_function("rsa2048", |b| b.iter(|| rsa.sign(black_box(input.as_slice())).unwrap()));
    let PrivateKeyDer::Pkcs8(ed) = key("ed25519.pem") else {
        unreachable!()
    };
    let ed = Ed25519Key::from_pkcs8_maybe_unchecked_der(ed.secret_pkcs8_der()).unwrap();
    g.bench_function("ed25519", |b| b.iter(|| ed.sign(black_box(input.as_slice())).unwrap()));
    g.finish();
}

fn whole(c: &mut Criterion) {
    let mut g = c.benchmark_group("dkim_sign_message_1500B");
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/dkim");
    let wire = WireMessage::prepare(&message(1500));
    for (name, file) in [("rsa2048", "rsa2048.pem"), ("ed25519", "ed25519.pem")] {
        let text = format!(
            "[\"gen.volley.test\"]\nselector = \"b\"\nkey_file = {:?}\n",
            dir.join(file)
        );
        let specs: BTreeMap<String, DomainSpec> = toml::from_str(&text).unwrap();
        let signers = Signers::load(&specs).unwrap();
        assert!(matches!(signers.sign(&wire, None).unwrap(), Signed::Signed { .. }));
        g.bench_function(name, |b| b.iter(|| signers.sign(black_box(&wire), None).unwrap()));
    }
    g.finish();
}

criterion_group!(benches, raw, whole);
criterion_main!(benches);
