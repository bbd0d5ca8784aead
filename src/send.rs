//! `volley send`: maps the spool files, starts the shards and the ingest
//! thread, and collects outcomes (delivery log, progress, summary) on the
//! calling thread until every recipient is final.

use std::collections::{HashMap, HashSet, VecDeque};
use std::fs::{File, OpenOptions};
use std::io::{BufWriter, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, bail};
use crossbeam_channel::{RecvTimeoutError, TryRecvError, bounded, unbounded};
use indicatif::{ProgressBar, ProgressStyle};

use crate::classify::Classifier;
use crate::config::{Config, Routes};
use crate::dns::NetThread;
use crate::ingest::{Ingest, IngestInput, Report, SpoolInput};
use crate::journal::{Done, Journal};
use crate::metrics::SpoolGauges;
use crate::metrics::export::{Board, Exporter, FileStatus, Hub};
use crate::outcome::{Outcome, OutcomeBatch};
use crate::service::{SpoolDir, Watcher};
use crate::shard::{self, Control, ShardParams};
use crate::spool::MappedFile;
use crate::tls::TlsClient;

/// How often service mode looks for new and finished files.
const SCAN_EVERY: Duration = Duration::from_millis(200);
/// Batches of work waiting in each shard's inbox.
const INBOX_BATCHES: usize = 16;
/// Outcome batches waiting for the collector.
const REPORT_BATCHES: usize = 1024;
/// How often progress is printed when stderr is not a terminal.
const PLAIN_PROGRESS_EVERY: Duration = Duration::from_secs(5);
/// How often the collector publishes `/status` and the spool gauges.
const PUBLISH_EVERY: Duration = Duration::from_secs(1);
/// The window of the rates `/status` shows.
const RATE_WINDOW: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Progress {
    /// A bar on a terminal, periodic lines otherwise.
    Auto,
    Off,
}

/// What a send did.
#[derive(Debug, Clone, Default)]
pub struct Summary {
    /// Log records per outcome (deferrals count each attempt).
    pub counts: [u64; 5],
    /// Recipients found in the spool (each bad line counts as one).
    pub recipients: u64,
    pub bad_lines: u64,
    /// Recipients an earlier run had already finished (from the journal).
    pub already_final: u64,
    /// The send was stopped before every recipient was final.
    pub interrupted: bool,
    /// Transactions that delivered to at least one recipient.
    pub messages: u64,
    pub codes: HashMap<u16, u64>,
    pub duration: Duration,
}

impl Summary {
    pub fn count(&self, o: Outcome) -> u64 {
        self.counts[o.index()]
    }
    pub fn finals(&self) -> u64 {
        Outcome::ALL
            .iter()
            .filter(|o| o.is_final())
            .map(|o| self.count(*o))
            .sum()
    }

    /// The summary as printed at the end of `send`.
    pub fn render(&self) -> String {
        let secs = self.duration.as_secs_f64().max(1e-9);
        let mut s = format!(
            "{} recipients in {:.2}s: {} delivered, {} bounced, {} expired, {} rejected ({} bad lines); {} deferrals retried\n",
            self.recipients,
            secs,
            self.count(Outcome::Delivered),
            self.count(Outcome::Bounced),
            self.count(Outcome::Expired),
            self.count(Outcome::Rejected),
            self.bad_lines,
            self.count(Outcome::Deferred),
        );
        if self.interrupted {
            s += &format!(
                "interrupted: {} recipients are not final yet; run send again on the same files to finish them\n",
                self.recipients.saturating_sub(self.finals())
            );
        }
        if self.already_final > 0 {
            s += &format!(
                "{} more were already final (from the journal of an earlier run)\n",
                self.already_final
            );
        }
        s += &format!(
            "{:.0} messages/s ({} messages), {:.0} recipients/s delivered\n",
            self.messages as f64 / secs,
            self.messages,
            self.count(Outcome::Delivered) as f64 / secs
        );
        let mut codes: Vec<_> = self.codes.iter().collect();
        codes.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
        if !codes.is_empty() {
            let top: Vec<String> = codes.iter().take(5).map(|(c, n)| format!("{c} ×{n}")).collect();
            s += &format!("top reply codes: {}\n", top.join(", "));
        }
        s
    }
}

pub struct SendOptions {
    pub spools: Vec<PathBuf>,
    pub config: Config,
    pub progress: Progress,
    /// Set (by a signal handler) to stop early: no new transactions, those in
    /// flight finish within `shutdown_timeout`, the journal is flushed.
    pub stop: Option<Arc<AtomicBool>>,
    /// Service mode (`volley run`): take files from this spool directory until stopped.
    pub watch: Option<SpoolDir>,
}

/// Takes outcome batches and makes them count: journal records first
/// (appended and, with fsync, made durable as one group), then the delivery
/// log, then the summary.
pub(crate) struct Collector {
    /// Files being worked on, by id.
    pub(crate) files: HashMap<u32, FileTrack>,
    pub(crate) fsync: bool,
    pub(crate) log: Option<BufWriter<File>>,
    pub(crate) pending: Vec<OutcomeBatch>,
    pub(crate) summary: Summary,
    /// Files finished in this run (in `send`, their counts stay in the gauges).
    pub(crate) finished: SpoolGauges,
}

/// What the collector knows of one spool file.
#[derive(Default)]
pub struct FileTrack {
    pub name: String,
    pub journal: Option<Journal>,
    /// Final outcomes to wait for, once the file is read to its end.
    pub expected: Option<u64>,
    pub already_final: u64,
    /// Final outcomes committed, in all and per outcome.
    pub finals: u64,
    pub counts: [u64; 5],
    /// Recipients (line, index) deferred and not final yet.
    pub deferred: HashSet<(u32, u32)>,
    /// (when, finals) samples for the rate `/status` shows.
    samples: VecDeque<(Instant, u64)>,
}

impl FileTrack {
    pub fn complete(&self) -> bool {
        self.expected.is_some_and(|e| self.finals >= e)
    }

    /// The file as `/status` shows it; takes a rate sample.
    fn status(&mut self, now: Instant) -> FileStatus {
        self.samples.push_back((now, self.finals));
        while self.samples.len() > 2 && now.duration_since(self.samples[0].0) > RATE_WINDOW {
            self.samples.pop_front();
        }
        let (t0, f0) = self.samples[0];
        let secs = now.duration_since(t0).as_secs_f64();
        let rate = if secs > 0.0 {
            (self.finals - f0) as f64 / secs
        } else {
            0.0
        };
        let c = |o: Outcome| self.counts[o.index()];
        FileStatus {
            name: self.name.clone(),
            state: if self.expected.is_some() { "sending" } else { "reading" },
            recipients: self.expected,
            finals: self.finals,
            delivered: c(Outcome::Delivered),
            bounced: c(Outcome::Bounced),
            expired: c(Outcome::Expired),
            rejected: c(Outcome::Rejected),
            deferred: self.deferred.len() as u64,
            rate_per_second: rate,
            eta_seconds: match self.expected {
                Some(e) if rate > 0.0 => Some(e.saturating_sub(self.finals) as f64 / rate),
                Some(e) if e <= self.finals => Some(0.0),
                _ => None,
            },
        }
    }
}

impl Collector {
    /// What `/status` and the spool gauges show now.
    fn board(&mut self, watcher: Option<&Watcher>, ingested: u64) -> Board {
        let now = Instant::now();
        let mut files: Vec<FileStatus> = self.files.values_mut().map(|t| t.status(now)).collect();
        files.sort_by(|a, b| a.name.cmp(&b.name));
        let mut spool = self.finished.clone();
        for f in &files {
            spool.finals += f.finals;
            spool.deferred += f.deferred;
        }
        spool.read = ingested.max(spool.finals);
        spool.rejected = self.summary.count(Outcome::Rejected);
        spool.files_active = files.len() as u64;
        if let Some(w) = watcher {
            spool.files_done = w.done;
            spool.files_failed = w.failed;
        }
        Board { files, spool }
    }

    pub(crate) fn commit(&mut self) -> anyhow::Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        for k in self.pending.iter().flat_map(|b| &b.deferred) {
            self.files.entry(k.file).or_default().deferred.insert((k.line, k.idx));
        }
        for f in self.pending.iter().flat_map(|b| &b.finals) {
            let track = self.files.entry(f.key.file).or_default();
            track.finals += 1;
            track.counts[f.outcome.index()] += 1;
            if !track.deferred.is_empty() {
                track.deferred.remove(&(f.key.line, f.key.idx));
            }
            if let Some(j) = track.journal.as_mut() {
                j.append(f.key.line, f.key.idx, f.outcome);
            }
        }
        for j in self.files.values_mut().filter_map(|t| t.journal.as_mut()) {
            if j.has_pending() {
                j.commit(self.fsync)
                    .with_context(|| format!("cannot write the journal {}", j.path().display()))?;
            }
        }
        for batch in self.pending.drain(..) {
            if let Some(w) = self.log.as_mut() {
                w.write_all(&batch.log).context("cannot write the delivery log")?;
            }
            for (a, b) in self.summary.counts.iter_mut().zip(batch.counts) {
                *a += b;
            }
            for (code, n) in batch.codes {
                *self.summary.codes.entry(code).or_default() += n;
            }
            self.summary.messages += batch.messages;
        }
        Ok(())
    }
}

/// Opens the delivery log for appending. A process killed in the middle of a
/// write leaves a torn last line: it is cut off, so that every line stays
/// one JSON record (that recipient's outcome is in the journal, which is
/// written first).
fn open_log(path: &Path) -> std::io::Result<File> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = OpenOptions::new().create(true).read(true).append(true).open(path)?;
    let len = f.metadata()?.len();
    if len > 0 {
        let tail_len = len.min(1 << 20);
        let mut tail = vec![0u8; tail_len as usize];
        f.seek(SeekFrom::Start(len - tail_len))?;
        f.read_exact(&mut tail)?;
        if tail.last() != Some(&b'\n') {
            let keep = match tail.iter().rposition(|&b| b == b'\n') {
                Some(i) => len - tail_len + i as u64 + 1,
                None if tail_len == len => 0,
                // A last line longer than 1 MiB: not one of volley's; leave it and start afresh.
                None => {
                    f.write_all(b"\n")?;
                    return Ok(f);
                }
            };
            tracing::warn!(
                "{}: cut a torn last line ({} bytes) left by an interrupted run",
                path.display(),
                len - keep
            );
            f.set_len(keep)?;
        }
    }
    Ok(f)
}

/// Maps a spool file and opens its journal: the input ingest reads. `origin`
/// is where the producer put it (message paths are relative to its folder).
pub fn open_spool(cfg: &Config, id: u32, path: &Path, origin: &Path) -> anyhow::Result<SpoolInput> {
    let file = Arc::new(MappedFile::open(path).with_context(|| format!("cannot read spool file {}", path.display()))?);
    let (done, first_seen, journal) = if cfg.journal {
        let opened = Journal::open(path, file.bytes().len() as u64)
            .with_context(|| format!("cannot open the journal of {}", path.display()))?;
        (opened.done, opened.first_seen, Some(opened.journal))
    } else {
        (Done::default(), SystemTime::now(), None)
    };
    // max_age runs from when the spool was first seen, by an earlier run too.
    let age = SystemTime::now().duration_since(first_seen).unwrap_or_default();
    let first_seen = Instant::now().checked_sub(age).unwrap_or_else(Instant::now);
    Ok(SpoolInput {
        id,
        file,
        origin: origin.to_path_buf(),
        journal,
        done,
        first_seen,
    })
}

pub fn send(opts: SendOptions) -> anyhow::Result<Summary> {
    let cfg = Arc::new(opts.config);
    cfg.validate()?;
    if opts.spools.is_empty() && opts.watch.is_none() {
        bail!("no spool file given");
    }
    let mut inputs = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for (id, p) in opts.spools.iter().enumerate() {
        // The same file twice would send it twice and share one journal between two writers.
        let canonical = std::fs::canonicalize(p).with_context(|| format!("cannot read spool file {}", p.display()))?;
        if !seen.insert(canonical) {
            bail!("spool file {} is given more than once", p.display());
        }
        inputs.push(open_spool(&cfg, id as u32, p, p)?);
    }
    let journaled = cfg.journal;
    let routes = Arc::new(Routes::resolve(&cfg.routes)?);
    // MX lookups and bound connects need the side thread; with a route for
    // every domain and no source address there are none.
    let net_thread = if routes.covers_all() && !cfg.binds_sources() {
        None
    } else {
        Some(NetThread::start(&cfg.dns)?)
    };
    let net = net_thread.as_ref().map(NetThread::net);
    let tls = TlsClient::new(cfg.ca_file.as_deref())?;
    let classifier = Arc::new(match &cfg.bounce_rules {
        Some(p) => Classifier::load(p)?,
        None => Classifier::default(),
    });
    // Appended to: a run that finishes a half-done spool adds to the log of the runs before.
    let log = match &cfg.log {
        Some(p) => Some(BufWriter::with_capacity(
            256 * 1024,
            open_log(p).with_context(|| format!("cannot open delivery log {}", p.display()))?,
        )),
        None => None,
    };
    let log_enabled = log.is_some();
    let shards = cfg.shards();
    let ehlo_name = cfg.ehlo_name();
    let started = Instant::now();
    let (report_tx, report_rx) = bounded(REPORT_BATCHES);
    let metrics_addr = cfg.metrics_addr()?;
    let (hub, links) = match metrics_addr {
        Some(_) => {
            let (hub, links) = Hub::new(shards, cfg.metrics_max_domains);
            (Some(hub), links.into_iter().map(Some).collect())
        }
        None => (None, (0..shards).map(|_| None).collect::<Vec<_>>()),
    };
    let _exporter = match (metrics_addr, &hub) {
        (Some(addr), Some(hub)) => {
            let e = Exporter::start(addr, hub.clone())?;
            eprintln!("volley: metrics on http://{}/metrics and /status", e.addr());
            Some(e)
        }
        _ => None,
    };
    let mut inboxes = Vec::new();
    let mut controls = Vec::new();
    let mut handles = Vec::new();
    let mut alive = Vec::new();
    for (index, link) in links.into_iter().enumerate() {
        let (tx, rx) = bounded(INBOX_BATCHES);
        let (ctl_tx, ctl_rx) = unbounded();
        let (alive_tx, alive_rx) = bounded::<()>(0);
        inboxes.push(tx);
        controls.push(ctl_tx);
        alive.push(alive_rx);
        handles.push(shard::spawn(ShardParams {
            index,
            shards,
            cfg: cfg.clone(),
            routes: routes.clone(),
            net: net.clone(),
            tls: tls.clone(),
            classifier: classifier.clone(),
            ehlo_name: ehlo_name.clone(),
            log: log_enabled,
            inbox: rx,
            control: ctl_rx,
            reports: report_tx.clone(),
            alive: alive_tx,
            metrics: link,
        })?);
    }
    let ingest =
        Ingest::new(inboxes, report_tx, cfg.max_rcpts_per_txn, log_enabled).max_line_bytes(cfg.max_job_line_bytes);
    let (input_tx, input_rx) = unbounded();
    for input in inputs {
        input_tx.send(IngestInput::Spool(input)).expect("the receiver is alive");
    }
    // In service mode the watcher keeps feeding ingest; otherwise the list is all there is.
    let mut watcher = opts.watch.clone().map(Watcher::new);
    let mut input_tx = match watcher {
        Some(_) => Some(input_tx),
        None => {
            // Closing the channel tells ingest the list is complete.
            drop(input_tx);
            None
        }
    };
    let mut last_scan: Option<Instant> = None;
    let ingest = std::thread::Builder::new()
        .name("volley-ingest".into())
        .spawn(move || ingest.run(input_rx))
        .context("cannot start the ingest thread")?;

    let bar = match opts.progress {
        Progress::Auto if std::io::stderr().is_terminal() => {
            let bar = ProgressBar::new(0);
            bar.set_style(
                ProgressStyle::with_template("{elapsed_precise} [{bar:40}] {pos}/{len} final, {per_sec} {msg}")
                    .expect("valid template")
                    .progress_chars("=> "),
            );
            Some(bar)
        }
        _ => None,
    };
    let plain = opts.progress == Progress::Auto && bar.is_none();
    let mut last_plain = Instant::now();

    let sync_every = if journaled {
        cfg.journal_sync_interval
    } else {
        Duration::ZERO
    };
    let mut c = Collector {
        files: HashMap::new(),
        fsync: cfg.journal_fsync,
        log,
        pending: Vec::new(),
        summary: Summary::default(),
        finished: SpoolGauges::default(),
    };
    // Publish at once: /status has something to show from the first scrape.
    let mut last_publish = Instant::now() - PUBLISH_EVERY;
    let mut last_commit = Instant::now();
    let mut total: Option<u64> = None;
    let mut ingested = 0;
    let mut failure = None;
    loop {
        if total.is_some_and(|t| c.summary.finals() >= t) {
            break;
        }
        if let (Some(w), Some(tx)) = (watcher.as_mut(), input_tx.as_ref())
            && last_scan.is_none_or(|t| t.elapsed() >= SCAN_EVERY)
        {
            last_scan = Some(Instant::now());
            w.scan(&cfg, tx)?;
            let finished: Vec<u32> = c
                .files
                .iter()
                .filter(|(_, t)| t.complete())
                .map(|(id, _)| *id)
                .collect();
            for id in finished {
                let track = c.files.remove(&id).expect("listed above");
                c.finished.read += track.finals;
                c.finished.finals += track.finals;
                w.finished(id, track)?;
                // The shards let go of the file and its message files (unmapped once the last goes).
                let _ = tx.send(IngestInput::Forget(id));
                if let Some(hub) = &hub {
                    // Show it done in /status at once.
                    hub.publish(c.board(Some(w), ingested));
                }
            }
        }
        if opts.stop.as_ref().is_some_and(|s| s.load(Ordering::Relaxed)) {
            c.summary.interrupted = true;
            break;
        }
        let wait = if c.pending.is_empty() {
            Duration::from_millis(200)
        } else {
            sync_every.saturating_sub(last_commit.elapsed())
        };
        let received = report_rx.recv_timeout(wait);
        if !c.pending.is_empty() && last_commit.elapsed() >= sync_every {
            c.commit()?;
            last_commit = Instant::now();
        }
        match received {
            Ok(Report::Outcomes(batch)) => {
                if c.pending.is_empty() {
                    last_commit = Instant::now();
                }
                c.pending.push(batch);
                if sync_every.is_zero() {
                    c.commit()?;
                }
            }
            Ok(Report::Ingested { recipients }) => ingested = recipients,
            Ok(Report::FileOpened { file, name, journal }) => {
                let track = c.files.entry(file).or_default();
                track.journal = journal;
                track.name = name;
            }
            Ok(Report::FileRead {
                file,
                recipients,
                already_final,
            }) => {
                let track = c.files.entry(file).or_default();
                track.expected = Some(recipients);
                track.already_final = already_final;
            }
            Ok(Report::IngestDone {
                recipients,
                bad_lines,
                already_final,
            }) => {
                ingested = recipients;
                total = Some(recipients);
                c.summary.recipients = recipients;
                c.summary.bad_lines = bad_lines;
                c.summary.already_final = already_final;
            }
            Err(RecvTimeoutError::Timeout) => {
                // Ingest says IngestDone before it ends, so an ended ingest with
                // nothing said and nothing queued has failed.
                if total.is_none() && ingest.is_finished() {
                    failure = Some("ingest stopped early");
                    break;
                }
                if alive.iter().any(|a| a.try_recv() == Err(TryRecvError::Disconnected)) {
                    failure = Some("a shard stopped before the work was done");
                    break;
                }
            }
            Err(RecvTimeoutError::Disconnected) => {
                failure = Some("every shard stopped before the work was done");
                break;
            }
        }
        if let Some(hub) = &hub
            && last_publish.elapsed() >= PUBLISH_EVERY
        {
            last_publish = Instant::now();
            hub.publish(c.board(watcher.as_ref(), ingested));
        }
        if let Some(bar) = &bar {
            bar.set_length(ingested);
            bar.set_position(c.summary.finals());
            bar.set_message(format!("{} deferrals", c.summary.count(Outcome::Deferred)));
        } else if plain && last_plain.elapsed() >= PLAIN_PROGRESS_EVERY {
            last_plain = Instant::now();
            eprintln!(
                "volley: {}/{} recipients final ({} delivered, {} deferrals) after {:.0}s",
                c.summary.finals(),
                ingested,
                c.summary.count(Outcome::Delivered),
                c.summary.count(Outcome::Deferred),
                started.elapsed().as_secs_f64()
            );
        }
    }
    c.summary.duration = started.elapsed();
    for c in &controls {
        let _ = c.send(Control::Stop);
    }
    for h in handles {
        if h.join().is_err() {
            failure.get_or_insert("a shard panicked");
        }
    }
    // Shards flush their last outcomes (QUIT replies do not add any, but be complete).
    while let Ok(report) = report_rx.try_recv() {
        if let Report::Outcomes(batch) = report {
            c.pending.push(batch);
        }
    }
    c.commit()?;
    if let Some(hub) = &hub {
        hub.publish(c.board(watcher.as_ref(), ingested));
    }
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    if let Some(mut w) = c.log.take() {
        w.flush().context("cannot write the delivery log")?;
    }
    drop(net_thread);
    input_tx.take();
    match ingest.join() {
        Ok(Ok(())) => {}
        // Stopped on purpose: ingest finds the shards gone, which is expected.
        Ok(Err(_)) if c.summary.interrupted => {}
        Ok(Err(e)) => {
            failure.get_or_insert(e);
        }
        Err(_) => {
            failure.get_or_insert("the ingest thread panicked");
        }
    }
    if let Some(f) = failure {
        bail!("internal failure: {f}");
    }
    Ok(c.summary)
}

#[cfg(test)]
mod tests {
    use super::open_log;
    use std::io::Write;

    #[test]
    fn a_torn_last_log_line_is_cut_before_appending() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("log.jsonl");
        std::fs::write(&p, "{\"a\":1}\n{\"ts\":\"2026-").unwrap();
        let mut f = open_log(&p).unwrap();
        f.write_all(b"{\"b\":2}\n").unwrap();
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "{\"a\":1}\n{\"b\":2}\n");
        // A whole log is left as it is; a torn first line goes entirely.
        let mut f = open_log(&p).unwrap();
        f.write_all(b"{\"c\":3}\n").unwrap();
        assert_eq!(
            std::fs::read_to_string(&p).unwrap(),
            "{\"a\":1}\n{\"b\":2}\n{\"c\":3}\n"
        );
        std::fs::write(&p, "{\"torn").unwrap();
        drop(open_log(&p).unwrap());
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "");
    }
}
