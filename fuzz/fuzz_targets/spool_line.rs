//! Spool lines as a producer may write them: the parser never panics, every
//! span it returns lies in the line, a job it accepts has a valid sender,
//! and address validation never lets through a byte that could break an
//! SMTP command line.
#![no_main]

use libfuzzer_sys::fuzz_target;
use volley::spool::{JobBody, LineCursor, parse_job, validate_address};

fuzz_target!(|data: &[u8]| {
    // As ingest reads a file: lines, then each one parsed against the whole map.
    let mut cursor = LineCursor::default();
    while let Some((_, line)) = cursor.next_line(data) {
        let Ok(job) = parse_job(data, line) else {
            continue;
        };
        let from = job.from.get(data);
        assert!(from.is_empty() || validate_address(from).is_ok(), "{from:?}");
        assert!(!job.to.is_empty());
        for to in &job.to {
            let addr = to.get(data);
            if validate_address(addr).is_ok() {
                assert!(addr.contains('@'));
                assert!(
                    !addr.bytes().any(|b| b <= b' ' || b >= 0x7f || b == b'<' || b == b'>'),
                    "{addr:?}"
                );
                assert!(addr.len() <= 254);
            }
        }
        match &job.body {
            JobBody::File(s) | JobBody::Inline(s) => {
                s.get(data);
            }
        }
        if let Some(id) = &job.id {
            id.get(data);
        }
    }
});
