//! `volley split`: one spool file per node of a fleet, so that nodes share
//! nothing: each sends its own files with its own journal and `done/`, and
//! no recipient is in two nodes' files.
//!
//! The rule is the shards' one level up, with a hash of its own (a node's
//! domains must still spread over its shards) and bounded loads: a
//! recipient goes to the node of its domain (FNV-1a of `node:` and the
//! lower-cased domain, mixed by MurmurHash3's finaliser, modulo the nodes),
//! unless that node already holds 3% more than an even share, then to the
//! next one with room; a big domain (named, or holding at least
//! 1/(2 × nodes) of all the recipients of the files split together) goes by
//! the same hash of the lower-cased address instead, so every node sends its
//! part of it from its own addresses. The same files and options always
//! split the same way, and most domains keep their node from one list to
//! the next (their mail keeps its sending addresses).
//!
//! A job whose recipients all go to one node keeps its line as it was; one
//! that is cut in parts gets a line per node with only that node's `to`
//! entries (their variables with them). A job without an `"id"` gets the
//! original `FILE:LINE` as its id, so every node's log names where a
//! recipient came from. Message files are linked (or copied) once into each
//! node's folder that has a job using them. A line that is not a valid job
//! goes to node 0 as it is (its sender rejects it and logs why) and is
//! reported here with its file and line.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};

use crate::spool::{JobBody, LineCursor, MappedFile};

/// What to split, and how.
pub struct SplitOptions {
    pub nodes: usize,
    pub out: PathBuf,
    pub spools: Vec<PathBuf>,
    /// Domains spread over every node whatever their share.
    pub spread_domains: Vec<String>,
}

/// What was written, per node.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct NodePart {
    pub lines: u64,
    pub recipients: u64,
    pub messages: u64,
}

#[derive(Debug, Default)]
pub struct SplitReport {
    pub nodes: Vec<NodePart>,
    /// Lines that are not valid jobs (`FILE:LINE: why`), given to node 0.
    pub bad_lines: Vec<String>,
    /// Domains spread over every node, with their recipients.
    pub spread: Vec<(String, u64)>,
}

/// FNV-1a of `node:` and the lower-cased bytes of `s`, through MurmurHash3's
/// 64-bit finaliser: FNV-1a's low bits follow its input's (its lowest bit is
/// the parity of the bytes' lowest bits), so the node and shard numbers of
/// plain FNV-1a would go together whatever the prefix.
fn node_hash(s: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in b"node:"
        .iter()
        .copied()
        .chain(s.bytes().map(|b| b.to_ascii_lowercase()))
    {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

/// The node of a domain that is not spread.
pub fn node_of_domain(domain: &str, nodes: usize) -> usize {
    (node_hash(domain) % nodes as u64) as usize
}

/// The node of a recipient of a spread domain.
pub fn node_of_rcpt(addr: &str, nodes: usize) -> usize {
    (node_hash(addr) % nodes as u64) as usize
}

/// Headroom over an even share that a node may take before a domain whose
/// hash names it goes to the next node instead.
const LOAD_SLACK: f64 = 0.03;

/// The node of every domain that is not spread: its hash's, unless that
/// node holds more than its even share (plus [`LOAD_SLACK`]) already; then
/// the next one that has room, in order (consistent hashing with bounded
/// loads). Domains are placed biggest first (then by name), so the result
/// depends only on the counts, and most domains keep their hash's node from
/// one list to the next (a domain keeps its sending addresses).
fn place_domains<'a>(
    per_domain: &'a HashMap<String, u64>,
    spread: &HashSet<&str>,
    nodes: usize,
) -> HashMap<&'a str, usize> {
    let mut domains: Vec<(&str, u64)> = per_domain
        .iter()
        .filter(|(d, _)| !spread.contains(d.as_str()))
        .map(|(d, n)| (d.as_str(), *n))
        .collect();
    domains.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
    let total: u64 = domains.iter().map(|(_, n)| n).sum();
    let cap = (total as f64 / nodes as f64 * (1.0 + LOAD_SLACK)).ceil() as u64;
    let mut load = vec![0u64; nodes];
    let mut out = HashMap::with_capacity(domains.len());
    for (d, n) in domains {
        let first = node_of_domain(d, nodes);
        let k = (0..nodes)
            .map(|i| (first + i) % nodes)
            .find(|&k| load[k] + n <= cap)
            .unwrap_or_else(|| (0..nodes).min_by_key(|&k| load[k]).expect("one node at least"));
        load[k] += n;
        out.insert(d, k);
    }
    out
}

/// The folder of node `k` under `out`.
pub fn node_dir(out: &Path, k: usize) -> PathBuf {
    out.join(format!("node-{k}"))
}

/// Each valid line's recipients, as (line number, line, addresses).
fn each_job(file: &MappedFile, mut f: impl FnMut(u32, &[u8], Result<crate::spool::Job, String>)) {
    let map = file.bytes();
    let mut c = LineCursor::default();
    let mut parser = crate::spool::JobParser::default();
    while let Some((no, line)) = c.next_line(map) {
        f(no, line, parser.parse(map, line));
    }
}

pub fn split(o: &SplitOptions) -> anyhow::Result<SplitReport> {
    if o.nodes == 0 {
        bail!("--nodes must be 1 or more");
    }
    let mut names = HashSet::new();
    for s in &o.spools {
        let name = s
            .file_name()
            .with_context(|| format!("{} is not a file", s.display()))?;
        if !names.insert(name.to_owned()) {
            bail!(
                "two spool files are named {}: each node's folder holds one file of each name",
                name.to_string_lossy()
            );
        }
    }
    let files: Vec<MappedFile> = o
        .spools
        .iter()
        .map(|p| MappedFile::open(p).with_context(|| format!("cannot read spool file {}", p.display())))
        .collect::<anyhow::Result<_>>()?;
    // Which domains are big: counted over every file.
    let mut per_domain: HashMap<String, u64> = HashMap::new();
    let mut total = 0u64;
    for f in &files {
        each_job(f, |_, _, job| {
            if let Ok(job) = job {
                for r in &job.to {
                    let d = crate::spool::domain_of(r.get(f.bytes())).to_ascii_lowercase();
                    *per_domain.entry(d).or_default() += 1;
                    total += 1;
                }
            }
        });
    }
    let named: HashSet<String> = o.spread_domains.iter().map(|d| d.to_ascii_lowercase()).collect();
    let mut spread: Vec<(String, u64)> = per_domain
        .iter()
        .filter(|(d, n)| o.nodes > 1 && (named.contains(*d) || **n * 2 * o.nodes as u64 >= total))
        .map(|(d, n)| (d.clone(), *n))
        .collect();
    spread.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    let spread_set: HashSet<&str> = spread.iter().map(|(d, _)| d.as_str()).collect();
    let placed = place_domains(&per_domain, &spread_set, o.nodes);
    let node_of = |addr: &str| {
        let d = crate::spool::domain_of(addr).to_ascii_lowercase();
        if spread_set.contains(d.as_str()) {
            node_of_rcpt(addr, o.nodes)
        } else {
            placed
                .get(d.as_str())
                .copied()
                .unwrap_or_else(|| node_of_domain(&d, o.nodes))
        }
    };

    let mut report = SplitReport {
        nodes: vec![NodePart::default(); o.nodes],
        bad_lines: Vec::new(),
        spread: spread.clone(),
    };
    let mut linked: Vec<HashSet<PathBuf>> = vec![HashSet::new(); o.nodes];
    for k in 0..o.nodes {
        let dir = node_dir(&o.out, k);
        std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    for (path, file) in o.spools.iter().zip(&files) {
        let name = path.file_name().expect("checked").to_owned();
        let shown = name.to_string_lossy().into_owned();
        let mut outs: Vec<Option<BufWriter<File>>> = (0..o.nodes).map(|_| None).collect();
        let mut failed: Option<anyhow::Error> = None;
        let map = file.bytes();
        each_job(file, |no, line, job| {
            if failed.is_some() {
                return;
            }
            let mut write = |k: usize, bytes: &[u8], rcpts: u64, report: &mut SplitReport| -> anyhow::Result<()> {
                let out = match &mut outs[k] {
                    Some(w) => w,
                    slot => {
                        let p = node_dir(&o.out, k).join(&name);
                        let f = File::create(&p).with_context(|| format!("cannot write {}", p.display()))?;
                        slot.insert(BufWriter::new(f))
                    }
                };
                out.write_all(bytes)?;
                out.write_all(b"\n")?;
                report.nodes[k].lines += 1;
                report.nodes[k].recipients += rcpts;
                Ok(())
            };
            let job = match job {
                Ok(j) => j,
                Err(why) => {
                    report.bad_lines.push(format!("{shown}:{no}: {why}"));
                    if let Err(e) = write(0, line, 0, &mut report) {
                        failed = Some(e);
                    }
                    return;
                }
            };
            let mut by_node: Vec<Vec<usize>> = vec![Vec::new(); o.nodes];
            for (i, r) in job.to.iter().enumerate() {
                by_node[node_of(r.get(map))].push(i);
            }
            let whole = by_node.iter().filter(|v| !v.is_empty()).count() == 1;
            let value: Option<serde_json::Map<String, serde_json::Value>> = if whole && job.id.is_some() {
                None
            } else {
                match serde_json::from_slice(line) {
                    Ok(serde_json::Value::Object(m)) => Some(m),
                    _ => unreachable!("a line parse_job took is a JSON object"),
                }
            };
            for (k, idx) in by_node.iter().enumerate().filter(|(_, v)| !v.is_empty()) {
                if let JobBody::File(m) = &job.body {
                    let rel = m.get(map);
                    if linked[k].insert(PathBuf::from(rel))
                        && let Err(e) = link_message(path, rel, &node_dir(&o.out, k))
                    {
                        failed = Some(e.context(format!("{shown}:{no}")));
                        return;
                    }
                }
                let res = match &value {
                    None => write(k, line, idx.len() as u64, &mut report),
                    Some(m) => {
                        let mut m = m.clone();
                        if let Some(serde_json::Value::Array(to)) = m.get("to") {
                            let part: Vec<serde_json::Value> = idx.iter().map(|&i| to[i].clone()).collect();
                            m.insert("to".into(), serde_json::Value::Array(part));
                        }
                        if job.id.is_none() {
                            m.insert("id".into(), format!("{shown}:{no}").into());
                        }
                        let text = serde_json::to_vec(&m).expect("a JSON map serialises");
                        write(k, &text, idx.len() as u64, &mut report)
                    }
                };
                if let Err(e) = res {
                    failed = Some(e);
                    return;
                }
            }
        });
        if let Some(e) = failed {
            return Err(e);
        }
        for w in outs.into_iter().flatten() {
            let f = w.into_inner().map_err(|e| e.into_error())?;
            f.sync_all()?;
        }
    }
    for (k, l) in linked.iter().enumerate() {
        report.nodes[k].messages = l.len() as u64;
    }
    Ok(report)
}

/// Puts the message file `rel` of spool `spool` into node folder `dir`
/// (a hard link, else a copy).
fn link_message(spool: &Path, rel: &str, dir: &Path) -> anyhow::Result<()> {
    let from = crate::spool::message_path(spool, rel).map_err(anyhow::Error::msg)?;
    let to = dir.join(rel);
    if let Some(p) = to.parent() {
        std::fs::create_dir_all(p).with_context(|| format!("cannot create {}", p.display()))?;
    }
    let _ = std::fs::remove_file(&to);
    if std::fs::hard_link(&from, &to).is_err() {
        std::fs::copy(&from, &to)
            .with_context(|| format!("cannot copy message file {} to {}", from.display(), to.display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_node_hash_is_not_the_shard_hash() {
        // Nodes and shards hashing alike would leave some of each node's shards idle.
        for (nodes, shards) in [(2, 2), (4, 4), (3, 2), (2, 16)] {
            let mut both = vec![vec![0u32; shards]; nodes];
            let n = 1000 * nodes * shards;
            for i in 0..n {
                let d = format!("d{i}.test");
                both[node_of_domain(&d, nodes)][crate::ingest::shard_of(&d, shards)] += 1;
            }
            let even = (n / (nodes * shards)) as u32;
            for row in &both {
                for &c in row {
                    assert!(
                        c > even * 8 / 10 && c < even * 12 / 10,
                        "{nodes} nodes, {shards} shards: {both:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn domains_keep_their_hash_s_node_unless_it_is_full() {
        // 1,000 domains of 16 recipients and 20 of 100: hashing alone leaves nodes ±10% apart.
        let mut per: HashMap<String, u64> = (0..1000).map(|i| (format!("d{i}.test"), 16)).collect();
        per.extend((0..20).map(|i| (format!("m{i}.test"), 100)));
        let total: u64 = per.values().sum();
        for nodes in [2, 3, 4, 8] {
            let placed = place_domains(&per, &HashSet::new(), nodes);
            let mut load = vec![0u64; nodes];
            for (d, &k) in &placed {
                load[k] += per[*d];
            }
            let even = total as f64 / nodes as f64;
            assert!(
                load.iter().all(|&l| (l as f64) <= even * (1.0 + LOAD_SLACK) + 100.0),
                "{nodes} nodes: {load:?}"
            );
            let kept = placed.iter().filter(|(d, k)| node_of_domain(d, nodes) == **k).count();
            assert!(
                kept * 10 >= placed.len() * 8,
                "{nodes} nodes: {kept} of {} kept",
                placed.len()
            );
            assert_eq!(
                placed,
                place_domains(&per, &HashSet::new(), nodes),
                "the same counts, the same nodes"
            );
        }
    }
}
