//! The reply parser fed arbitrary server bytes: it never panics, never
//! keeps more than its limits, and gives the same replies (or the same
//! error) however the bytes are split into reads.
#![no_main]

use std::collections::VecDeque;

use libfuzzer_sys::fuzz_target;
use volley::smtp::reply::{MAX_LINES, MAX_TEXT_BYTES};
use volley::smtp::{Reply, ReplyError, ReplyParser};

fn parse(chunks: &[&[u8]]) -> Result<Vec<Reply>, ReplyError> {
    let mut p = ReplyParser::new();
    let mut out = VecDeque::new();
    for c in chunks {
        p.feed(c, &mut out)?;
    }
    Ok(out.into())
}

fuzz_target!(|data: &[u8]| {
    let Some((&cut, wire)) = data.split_first() else {
        return;
    };
    let whole = parse(&[wire]);
    let at = usize::from(cut) * wire.len() / 256;
    let split = parse(&[&wire[..at], &wire[at..]]);
    let bytewise: Vec<&[u8]> = wire.chunks(1).collect();
    assert_eq!(whole, split, "split at {at}");
    assert_eq!(whole, parse(&bytewise), "fed a byte at a time");
    for r in whole.iter().flatten() {
        assert!((200..600).contains(&r.code), "code {}", r.code);
        assert!(r.text.len() <= MAX_TEXT_BYTES + 4096, "text of {} bytes", r.text.len());
        assert!(r.lines().count() <= MAX_LINES);
    }
});
