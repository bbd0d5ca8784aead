//! The client engine fed arbitrary server bytes: it never panics, every
//! transaction it is given comes back exactly once (done or unsent), and
//! what it writes keeps SMTP's line rules: CRLF line ends only, no line
//! over 1,000 octets, and nothing written before the greeting arrives.
#![no_main]

use libfuzzer_sys::fuzz_target;
use volley::smtp::{Credentials, Envelope, Event, Extensions, Session, TlsMode, WireMessage};

struct Txn {
    rcpts: Vec<String>,
    wire: WireMessage,
}

impl Envelope for Txn {
    fn reverse_path(&self) -> &str {
        "news@sender.test"
    }
    fn recipient_count(&self) -> usize {
        self.rcpts.len()
    }
    fn recipient(&self, i: usize) -> &str {
        &self.rcpts[i]
    }
    fn message(&self) -> &WireMessage {
        &self.wire
    }
}

/// What the client has written so far on the line it is on.
#[derive(Default)]
struct Line {
    len: usize,
    last: u8,
}

/// Checks what the client wrote: CRLF line ends only, lines of at most
/// 1,000 octets with their CRLF (RFC 5321 §4.5.3.1.6).
fn check_lines(out: &[u8], line: &mut Line) {
    for &b in out {
        assert!(line.last != b'\r' || b == b'\n', "a CR not followed by LF");
        assert!(b != b'\n' || line.last == b'\r', "a bare LF");
        line.len = if b == b'\n' { 0 } else { line.len + 1 };
        assert!(line.len <= 999, "a line over 1,000 octets");
        line.last = b;
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&flags, input)) = data.split_first() else {
        return;
    };
    let tls = match flags & 3 {
        0 => TlsMode::Off,
        1 => TlsMode::Offer,
        _ => TlsMode::Require,
    };
    let mut s: Session<Txn> = Session::new("client.test", tls).with_extensions(Extensions {
        pipelining: flags & 4 != 0,
        chunking: flags & 8 != 0,
        window: 1 + usize::from(flags >> 5),
        window_bytes: 4096,
    });
    if flags & 16 != 0 {
        s = s.with_auth(Credentials {
            user: "u".into(),
            password: "p".into(),
            allow_plaintext: true,
        });
    }
    let body = b"Subject: t\n\n.dot\nline\r\n.\nend";
    let mut pending: Vec<Txn> = (0..4)
        .map(|i| Txn {
            rcpts: (0..=i).map(|r| format!("r{r}@d{i}.test")).collect(),
            wire: WireMessage::prepare(body),
        })
        .collect();
    let given = pending.len();
    let (mut back, mut line, mut greeted) = (0, Line::default(), false);
    assert!(s.output().is_empty(), "nothing before the greeting");
    for read in input.split_inclusive(|&b| b == b'\n') {
        greeted = true;
        s.feed(read);
        while let Some(e) = s.poll_event() {
            match e {
                Event::StartTls => s.tls_established(),
                Event::Done(_) | Event::Unsent(_) => back += 1,
                Event::Ready | Event::Failed { .. } => {}
            }
        }
        while s.wants_txn()
            && let Some(t) = pending.pop()
        {
            s.submit(t);
        }
        let out = s.output();
        check_lines(out, &mut line);
        let n = out.len();
        s.consume_output(n);
    }
    assert!(greeted || s.output().is_empty());
    s.connection_lost("end of input");
    while let Some(e) = s.poll_event() {
        if matches!(e, Event::Done(_) | Event::Unsent(_)) {
            back += 1;
        }
    }
    assert_eq!(
        back,
        given - pending.len(),
        "every submitted transaction comes back once"
    );
});
