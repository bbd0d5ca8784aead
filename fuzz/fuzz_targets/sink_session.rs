//! The sink's server session fed arbitrary client bytes, in arbitrary
//! reads: it never panics, and everything it writes is well-formed reply
//! lines (three digits, then a space or a dash, text, CRLF).
#![no_main]

use libfuzzer_sys::fuzz_target;
use volley::sink::{Action, ServerSession, SinkOptions};

fuzz_target!(|data: &[u8]| {
    let Some((&flags, input)) = data.split_first() else {
        return;
    };
    let opts = SinkOptions {
        chunking: flags & 1 != 0,
        tls_fault: flags & 2 != 0,
        auth: (flags & 4 != 0).then(|| ("user".to_string(), "secret".to_string())),
        defer_rate: if flags & 8 != 0 { 0.3 } else { 0.0 },
        reject_rate: if flags & 16 != 0 { 0.3 } else { 0.0 },
        ..SinkOptions::default()
    };
    let mut s = ServerSession::new(&opts, u64::from(flags), flags & 32 != 0);
    let mut out = Vec::new();
    s.greeting(&mut out);
    // Reads end after each 0xff byte (kept in the data).
    for read in input.split_inclusive(|&b| b == 0xff) {
        let action = s.input(read, &mut out);
        if action == Action::StartTls {
            s.tls_started();
        }
        if matches!(action, Action::Close | Action::Drop) {
            break;
        }
    }
    assert!(out.ends_with(b"\r\n"));
    for line in out.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
        assert!(line.ends_with(b"\r"), "{:?}", String::from_utf8_lossy(line));
        assert!(
            line.len() >= 4 && line[..3].iter().all(u8::is_ascii_digit),
            "{:?}",
            String::from_utf8_lossy(line)
        );
        assert!(
            line.len() == 4 || line[3] == b' ' || line[3] == b'-',
            "{:?}",
            String::from_utf8_lossy(line)
        );
        assert!(line.len() <= 512, "reply line of {} bytes", line.len());
    }
});
