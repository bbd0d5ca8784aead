//! EHLO replies as a server may send them: the capability parser never
//! panics, and what it finds only comes from the lines after the first.
#![no_main]

use libfuzzer_sys::fuzz_target;
use volley::smtp::{Capabilities, Reply};

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let caps = Capabilities::from_ehlo(&Reply::new(250, &text));
    // The first line is the server's name, never a keyword.
    let first_only = text.lines().next().unwrap_or("").replace('\n', "");
    let alone = Capabilities::from_ehlo(&Reply::new(250, &first_only));
    assert_eq!(alone, Capabilities::default(), "{first_only:?}");
    if caps.pipelining {
        assert!(text.to_ascii_uppercase().contains("PIPELINING"));
    }
    if caps.chunking {
        assert!(text.to_ascii_uppercase().contains("CHUNKING"));
    }
});
