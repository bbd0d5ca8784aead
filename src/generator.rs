//! `volley gen`: writes a spool file and the message file its jobs share,
//! for load tests. The message has LF line ends, lines that start with `.`
//! and long-but-legal lines, so the wire preparation is exercised.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};

#[derive(Debug, Clone)]
pub struct GenOptions {
    pub out: PathBuf,
    pub jobs: u64,
    pub domains: u64,
    pub size: usize,
    pub rcpts_per_job: u64,
    pub from: String,
    /// Spool v2: the message is a template and every recipient has its own
    /// variables (a greeting and a token), so each gets its own copy.
    pub personalised: bool,
}

/// The message file written beside a spool file: same stem, `.eml`.
pub fn message_file_for(spool: &Path) -> PathBuf {
    spool.with_extension("eml")
}

/// A message of about `size` bytes with the awkward lines a wire encoder must handle.
pub fn message(size: usize) -> Vec<u8> {
    let mut m = Vec::with_capacity(size + 1024);
    m.extend_from_slice(
        b"From: volley gen <news@gen.volley.test>\nTo: subscribers <list@gen.volley.test>\n\
Subject: volley load test\nMessage-ID: <gen@gen.volley.test>\nMIME-Version: 1.0\n\
Content-Type: text/plain; charset=us-ascii\n\n",
    );
    let mut n = 0u64;
    while m.len() < size {
        n += 1;
        let line: Vec<u8> = match n % 16 {
            3 => b".a line that starts with a dot\n".to_vec(),
            5 => [vec![b'x'; 998], vec![b'\n']].concat(),
            9 => b".\n".to_vec(),
            _ => format!("Line {n} of the newsletter body, plain text.\n").into_bytes(),
        };
        let room = size - m.len();
        if line.len() <= room {
            m.extend_from_slice(&line);
        } else {
            // Fill the rest exactly with a plain line.
            m.extend(std::iter::repeat_n(b'z', room.saturating_sub(1)));
            m.push(b'\n');
        }
    }
    m
}

/// `message(size)` as a template: the subject and a line greet the
/// recipient by name, another gives their token (about the same size rendered).
pub fn template(size: usize) -> Vec<u8> {
    let m = message(size.saturating_sub(120));
    let text = String::from_utf8(m).expect("ASCII");
    let (head, body) = text.split_once("\n\n").expect("headers and body");
    let head = head.replace("Subject: volley load test", "Subject: volley load test for {{ name }}");
    format!("{head}\n\nDear {{{{ name }}}},\nyour link: https://gen.volley.test/u/{{{{ token }}}}\n{body}").into_bytes()
}

/// Writes the spool (via `NAME.tmp` and a rename, as producers must) and its message file.
pub fn generate(o: &GenOptions) -> anyhow::Result<()> {
    if o.jobs == 0 || o.domains == 0 || o.rcpts_per_job == 0 {
        bail!("--jobs, --domains and --rcpts-per-job must be at least 1");
    }
    let msg_path = message_file_for(&o.out);
    let body = if o.personalised {
        template(o.size)
    } else {
        message(o.size)
    };
    std::fs::write(&msg_path, body).with_context(|| format!("cannot write {}", msg_path.display()))?;
    let msg_name = msg_path
        .file_name()
        .expect("has a file name")
        .to_string_lossy()
        .into_owned();
    let tmp = o.out.with_extension("jsonl.tmp");
    let mut w = BufWriter::with_capacity(
        1 << 20,
        File::create(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?,
    );
    let mut g = 0u64;
    for j in 0..o.jobs {
        write!(w, "{{\"id\":\"gen-{j:07}\",\"from\":\"{}\",\"to\":[", o.from)?;
        for r in 0..o.rcpts_per_job {
            if r > 0 {
                w.write_all(b",")?;
            }
            if o.personalised {
                write!(
                    w,
                    "{{\"rcpt\":\"u{}@d{}.test\",\"vars\":{{\"name\":\"Reader {g}\",\"token\":\"t{g:012x}\"}}}}",
                    g / o.domains,
                    g % o.domains
                )?;
            } else {
                write!(w, "\"u{}@d{}.test\"", g / o.domains, g % o.domains)?;
            }
            g += 1;
        }
        writeln!(w, "],\"message\":\"{msg_name}\"}}")?;
    }
    w.flush()?;
    drop(w);
    std::fs::rename(&tmp, &o.out).with_context(|| format!("cannot rename {} to {}", tmp.display(), o.out.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_has_the_awkward_lines_and_the_size() {
        let m = message(1500);
        assert_eq!(m.len(), 1500);
        let text = String::from_utf8(m).unwrap();
        assert!(text.lines().any(|l| l == "."));
        assert!(text.lines().any(|l| l.starts_with(".a line")));
        assert!(text.lines().any(|l| l.len() == 998));
        assert!(!text.contains('\r'));
        assert!(text.lines().all(|l| l.len() <= 998));
    }

    #[test]
    fn a_personalised_spool_renders_for_each_recipient() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("p.jsonl");
        generate(&GenOptions {
            out: out.clone(),
            jobs: 2,
            domains: 2,
            size: 1500,
            rcpts_per_job: 2,
            from: "b@gen.volley.test".into(),
            personalised: true,
        })
        .unwrap();
        let text = std::fs::read_to_string(&out).unwrap();
        let line = text.lines().next().unwrap();
        let map = line.as_bytes();
        let job = crate::spool::parse_job(map, map).unwrap();
        let p = job.personal.expect("personalised");
        assert_eq!(p.rcpt_vars.len(), 2);
        let src = std::fs::read_to_string(message_file_for(&out)).unwrap();
        let rendered = crate::template::render(
            &src,
            &crate::template::Context {
                rcpt: job.to[0].get(map),
                from: "b@gen.volley.test",
                id: "gen-0000000",
                job_vars: None,
                rcpt_vars: p.rcpt_vars[0].as_ref().map(|s| s.get(map)),
            },
        )
        .unwrap();
        assert!(
            rendered.contains("Subject: volley load test for Reader 0\n"),
            "{rendered}"
        );
        assert!(rendered.contains("Dear Reader 0,\nyour link: https://gen.volley.test/u/t000000000000\n"));
        assert!((1400..1700).contains(&rendered.len()), "{}", rendered.len());
    }
}
