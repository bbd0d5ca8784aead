//! `volley send`: maps the spool files, starts the shards and the ingest
//! thread, and collects outcomes (delivery log, progress, summary) on the
//! calling thread until every recipient is final.

use std::collections::{HashSet, VecDeque};
use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use crossbeam_channel::{Receiver, RecvTimeoutError, Select, TryRecvError, bounded, unbounded};
use indicatif::{ProgressBar, ProgressStyle};

use crate::classify::Classifier;
use crate::collector::{Collector, DeliveryLog, StorageError, Summary};
use crate::config::{Config, Routes};
use crate::dns::NetThread;
use crate::ingest::{Ingest, IngestInput, IngestLimits, SpoolInput};
use crate::messages::MessageBudget;
use crate::metrics::export::{Exporter, Hub};
use crate::outcome::Outcome;
use crate::service::{SpoolDir, Watcher};
use crate::shard::{self, Control, ShardParams};
use crate::tls::TlsClient;

/// How often service mode looks for new and finished files.
const SCAN_EVERY: Duration = Duration::from_millis(200);
/// Outcome batches waiting for the collector, per shard (each at most a
/// shard's flush: 2 ms or 256 KiB of log). A shard whose batch finds no room,
/// or which has more than `MAX_UNRECORDED_PER_SHARD` outcomes not yet
/// written, starts no new transaction until the collector catches up: a
/// slow disk holds the sending back instead of letting delivered but
/// unrecorded outcomes (a crash's duplicates) pile up.
const REPORT_BATCHES_PER_SHARD: usize = 16;
/// How often progress is printed when stderr is not a terminal.
const PLAIN_PROGRESS_EVERY: Duration = Duration::from_secs(5);
/// How often the collector publishes `/status` and the spool gauges.
const PUBLISH_EVERY: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Progress {
    /// A bar on a terminal, periodic lines otherwise.
    Auto,
    Off,
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

/// Sends until every recipient is final (or, in service mode, until
/// stopped). A file volley must write that cannot be written ends the send
/// with an error whose chain holds a [`StorageError`]: no new transactions,
/// those in flight finish or are abandoned within `shutdown_timeout`, and
/// nothing that could not be recorded is counted.
pub fn send(opts: SendOptions) -> anyhow::Result<Summary> {
    let cfg = Arc::new(opts.config);
    cfg.validate()?;
    if opts.spools.is_empty() && opts.watch.is_none() {
        bail!("no spool file given");
    }
    // Locked before anything of the spool directory is touched.
    let mut watcher = match opts.watch.clone() {
        Some(dir) => Some(Watcher::new(dir, cfg.journal && cfg.journal_fsync)?),
        None => None,
    };
    let mut inputs = Vec::new();
    let mut seen = HashSet::new();
    for (id, p) in opts.spools.iter().enumerate() {
        // The same file twice would send it twice and share one journal between two writers.
        let canonical = std::fs::canonicalize(p).with_context(|| format!("cannot read spool file {}", p.display()))?;
        if !seen.insert(canonical) {
            bail!("spool file {} is given more than once", p.display());
        }
        inputs.push(SpoolInput::open(&cfg, id as u32, p, p, None)?);
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
    let shaping = Arc::new(crate::shaping::Shaping::load(&cfg.shaping)?);
    let signers = Arc::new(crate::dkim::Signers::load(&cfg.dkim)?);
    // Appended to: a run that finishes a half-done spool adds to the log of the runs before.
    let log = match &cfg.log {
        Some(p) => Some(DeliveryLog::open(p).map_err(|e| StorageError::new("the delivery log", p, e))?),
        None => None,
    };
    let log_enabled = log.is_some();
    let shards = cfg.shards();
    let ehlo_name = cfg.ehlo_name();
    let started = Instant::now();
    // One share more for ingest's reports.
    let (report_tx, report_rx) = bounded(REPORT_BATCHES_PER_SHARD * (shards + 1));
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
    let recorded: Vec<Arc<AtomicU64>> = (0..shards).map(|_| Arc::default()).collect();
    let budgets = Arc::new(shard::Budgets::new(shards));
    let _fleet = match &cfg.fleet {
        Some(f) => Some(crate::fleet::join(f, budgets.clone())?),
        None => None,
    };
    let mut inboxes = Vec::new();
    // Unbounded: what a shard's inbox holds is bounded by the credit it grants.
    let (credit_tx, credit_rx) = unbounded();
    let mut controls = Vec::new();
    let mut handles = Vec::new();
    let mut alive = Vec::new();
    for (index, link) in links.into_iter().enumerate() {
        let (tx, rx) = unbounded();
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
            credits: credit_tx.clone(),
            control: ctl_rx,
            reports: report_tx.clone(),
            alive: alive_tx,
            metrics: link,
            recorded: recorded[index].clone(),
            budgets: budgets.clone(),
            shaping: shaping.clone(),
            signers: signers.clone(),
        })?);
    }
    let budget = MessageBudget::new(cfg.max_message_files_in_use, cfg.max_message_bytes_in_use);
    drop(credit_tx);
    let ingest = Ingest::new(
        inboxes,
        credit_rx,
        report_tx,
        IngestLimits::of(&cfg),
        budget.clone(),
        log_enabled,
    );
    let (input_tx, input_rx) = unbounded();
    for input in inputs {
        input_tx.send(IngestInput::Spool(input)).expect("the receiver is alive");
    }
    // In service mode the watcher keeps feeding ingest; otherwise the list is all there is.
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

    let mut meter = Meter::new(match opts.progress {
        Progress::Auto if std::io::stderr().is_terminal() => Some(ProgressBar::new(0)),
        _ => None,
    });
    let plain = opts.progress == Progress::Auto && meter.bar.is_none();
    let mut last_plain = Instant::now();

    let sync_every = if journaled {
        cfg.journal_sync_interval
    } else {
        Duration::ZERO
    };
    let mut c = Collector::new(cfg.journal_fsync, log, recorded);
    let files_of = |w: &Option<Watcher>| w.as_ref().map(|w| (w.done, w.failed));
    // Publish at once: /status has something to show from the first scrape.
    let mut last_publish = Instant::now() - PUBLISH_EVERY;
    let mut failure: Option<anyhow::Error> = None;
    let mut dns_alarmed = false;
    let mut last_alarm_check = Instant::now();
    loop {
        if c.all_final() {
            break;
        }
        if let (Some(w), Some(tx)) = (watcher.as_mut(), input_tx.as_ref())
            && last_scan.is_none_or(|t| t.elapsed() >= SCAN_EVERY)
        {
            last_scan = Some(Instant::now());
            let moved = w.scan(&cfg, tx).and_then(|()| {
                for (id, track) in c.take_finished() {
                    w.finished(id, track)?;
                    // The shards let go of the spool file (unmapped once the last goes).
                    let _ = tx.send(IngestInput::Forget(id));
                    if let Some(hub) = &hub {
                        // Show it done in /status at once.
                        hub.publish(c.board(Some((w.done, w.failed))));
                    }
                }
                Ok(())
            });
            if let Err(e) = moved {
                failure = Some(e);
                break;
            }
        }
        if opts.stop.as_ref().is_some_and(|s| s.load(Ordering::Relaxed)) {
            c.summary.interrupted = true;
            c.summary.journaled = journaled;
            break;
        }
        let wait = match c.pending_since() {
            None => Duration::from_millis(200),
            Some(t) => sync_every.saturating_sub(t.elapsed()),
        };
        match report_rx.recv_timeout(wait) {
            Ok(report) => c.take(report),
            Err(RecvTimeoutError::Timeout) => {
                // Ingest says IngestDone before it ends, so an ended ingest with
                // nothing said and nothing queued has failed.
                if c.total.is_none() && ingest.is_finished() {
                    failure = Some(anyhow!("internal failure: ingest stopped early"));
                    break;
                }
                if alive.iter().any(|a| a.try_recv() == Err(TryRecvError::Disconnected)) {
                    failure = Some(anyhow!("internal failure: a shard stopped before the work was done"));
                    break;
                }
            }
            Err(RecvTimeoutError::Disconnected) => {
                failure = Some(anyhow!(
                    "internal failure: every shard stopped before the work was done"
                ));
                break;
            }
        }
        if c.commit_due(sync_every)
            && let Err(e) = c.commit()
        {
            failure = Some(e.into());
            break;
        }
        publish(&hub, &mut last_publish, &mut c, files_of(&watcher));
        meter.show(plain, &mut last_plain, &c, started);
        if !dns_alarmed && last_alarm_check.elapsed() >= Duration::from_secs(1) {
            last_alarm_check = Instant::now();
            if let Some(alarm) = c.summary.dns_alarm() {
                dns_alarmed = true;
                tracing::warn!("{alarm}");
            }
        }
    }
    c.summary.duration = started.elapsed();
    // No new transactions; those in flight finish (or are abandoned) within shutdown_timeout.
    budget.close();
    for c in &controls {
        let _ = c.send(Control::Stop);
    }
    // Take outcomes while the shards wind down: a shard's last batch must
    // find room. Each shard's liveness channel disconnects as it ends: wait
    // on those and the reports together, so the last shard's end is seen at once.
    let mut running: Vec<&Receiver<()>> = alive.iter().collect();
    let mut reports_open = true;
    while !running.is_empty() {
        let mut select = Select::new();
        for a in &running {
            select.recv(a);
        }
        let reports = reports_open.then(|| select.recv(&report_rx));
        match select.select_timeout(Duration::from_millis(100)) {
            Ok(op) if Some(op.index()) == reports => match op.recv(&report_rx) {
                Ok(report) => c.take(report),
                Err(_) => reports_open = false,
            },
            Ok(op) => {
                let i = op.index();
                // Nothing is ever sent on it: ready means ended.
                if op.recv(running[i]).is_err() {
                    running.swap_remove(i);
                }
            }
            Err(_) => {}
        }
    }
    for h in handles {
        if h.join().is_err() {
            failure.get_or_insert(anyhow!("internal failure: a shard panicked"));
        }
    }
    // The shards' last outcomes (after a failed write they are only counted as unrecorded).
    while let Ok(report) = report_rx.try_recv() {
        c.take(report);
    }
    if let Err(e) = c.commit() {
        failure.get_or_insert(e.into());
    }
    // Ingest may be waiting to report: it finds the collector gone and ends.
    drop(report_rx);
    if let Some(hub) = &hub {
        hub.publish(c.board(files_of(&watcher)));
    }
    if let Some(bar) = meter.bar {
        bar.finish_and_clear();
    }
    drop(net_thread);
    input_tx.take();
    let stopped_early = c.summary.interrupted || failure.is_some();
    match ingest.join() {
        Ok(Ok(())) => {}
        // Stopped on purpose: ingest finds the shards gone, which is expected.
        Ok(Err(_)) if stopped_early => {}
        Ok(Err(e)) => {
            failure.get_or_insert(anyhow!("internal failure: {e}"));
        }
        Err(_) => {
            failure.get_or_insert(anyhow!("internal failure: the ingest thread panicked"));
        }
    }
    if let Some(f) = failure {
        if f.chain().any(|e| e.is::<StorageError>()) {
            return Err(f.context(format!(
                "stopped: {} final outcomes could not be recorded (they go out again on the next run)",
                c.unrecorded
            )));
        }
        return Err(f);
    }
    Ok(c.summary)
}

fn publish(hub: &Option<Arc<Hub>>, last: &mut Instant, c: &mut Collector, files: Option<(u64, u64)>) {
    if let Some(hub) = hub
        && last.elapsed() >= PUBLISH_EVERY
    {
        *last = Instant::now();
        hub.publish(c.board(files));
    }
}

/// The progress line: a bar with the recipients final out of all of them
/// (a count until ingest has read every file), a recent rate, an ETA, the
/// counts by outcome and the most frequent reason for deferrals.
struct Meter {
    bar: Option<ProgressBar>,
    /// The bar has its total (and its percentage and ETA).
    sized: bool,
    /// Finals at moments of the last few seconds, for the rate.
    window: VecDeque<(Instant, u64)>,
    last_update: Option<Instant>,
}

/// How often the bar's text is made again.
const METER_EVERY: Duration = Duration::from_millis(200);
/// The rate shown is over this much of the recent past.
const RATE_WINDOW: Duration = Duration::from_secs(5);

impl Meter {
    fn new(bar: Option<ProgressBar>) -> Meter {
        if let Some(bar) = &bar {
            bar.set_style(
                ProgressStyle::with_template(
                    "{elapsed_precise} {spinner} {human_pos} final of {human_len} read so far · {msg}",
                )
                .expect("valid template"),
            );
        }
        Meter {
            bar,
            sized: false,
            window: VecDeque::new(),
            last_update: None,
        }
    }

    /// Recipients final a second, over the last `RATE_WINDOW`.
    fn rate(&mut self, finals: u64, now: Instant) -> f64 {
        self.window.push_back((now, finals));
        while self.window.len() > 2 && now.duration_since(self.window[1].0) >= RATE_WINDOW {
            self.window.pop_front();
        }
        let (t0, f0) = self.window[0];
        let secs = now.duration_since(t0).as_secs_f64();
        if secs > 0.0 { (finals - f0) as f64 / secs } else { 0.0 }
    }

    fn show(&mut self, plain: bool, last_plain: &mut Instant, c: &Collector, started: Instant) {
        let now = Instant::now();
        if self.last_update.is_some_and(|t| now.duration_since(t) < METER_EVERY) {
            return;
        }
        self.last_update = Some(now);
        let s = &c.summary;
        let finals = s.finals();
        let rate = self.rate(finals, now);
        let counts = format!(
            "{}/s · {} delivered · {} bounced · {} deferrals",
            crate::collector::group_digits(rate.round() as u64),
            crate::collector::group_digits(s.count(Outcome::Delivered)),
            crate::collector::group_digits(s.count(Outcome::Bounced) + s.count(Outcome::Expired)),
            crate::collector::group_digits(s.count(Outcome::Deferred)),
        );
        let top = s
            .top_reasons(Outcome::Deferred, 1)
            .first()
            .map(|r| format!(" · top deferral: {}", Summary::reason_line(r)))
            .unwrap_or_default();
        if let Some(bar) = &self.bar {
            if c.total.is_some() && !self.sized {
                self.sized = true;
                bar.set_style(
                    ProgressStyle::with_template(
                        "{elapsed_precise} [{bar:30}] {human_pos}/{human_len} ({percent}%) final · ETA {eta} · {wide_msg}",
                    )
                    .expect("valid template")
                    .progress_chars("=> "),
                );
            }
            bar.set_length(c.ingested);
            bar.set_position(finals);
            bar.set_message(format!("{counts}{top}"));
            bar.tick();
        } else if plain && last_plain.elapsed() >= PLAIN_PROGRESS_EVERY {
            *last_plain = Instant::now();
            let of = match c.total {
                Some(_) if c.ingested > 0 => format!(
                    "{}/{} ({:.0}%)",
                    crate::collector::group_digits(finals),
                    crate::collector::group_digits(c.ingested),
                    100.0 * finals as f64 / c.ingested as f64
                ),
                _ => format!(
                    "{} of {} read so far",
                    crate::collector::group_digits(finals),
                    crate::collector::group_digits(c.ingested)
                ),
            };
            eprintln!(
                "volley: {of} recipients final after {:.0}s: {counts}{top}",
                started.elapsed().as_secs_f64()
            );
        }
    }
}
