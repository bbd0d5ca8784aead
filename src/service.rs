//! `volley run`: the spool-directory service. Producers rename complete
//! `*.jsonl` files into `spool_dir/incoming/`; volley moves each into
//! `active/` (the producer no longer owns its name) and works on it beside
//! the others; once every recipient of a file is final, the file, its journal
//! and a summary go to `done/`. A file that cannot be read at all goes to
//! `failed/` with a `.reason` file. Files left in `active/` by a stop or a
//! crash are resumed first. The delivery machinery is `send`'s.

use std::path::{Path, PathBuf};

use anyhow::Context;
use crossbeam_channel::Sender;

use crate::config::Config;
use crate::ingest::IngestInput;
use crate::outcome::Outcome;
use crate::send::{FileTrack, open_spool};

/// The four folders of a spool directory.
#[derive(Debug, Clone)]
pub struct SpoolDir {
    pub incoming: PathBuf,
    pub active: PathBuf,
    pub done: PathBuf,
    pub failed: PathBuf,
}

impl SpoolDir {
    pub fn create(root: &Path) -> anyhow::Result<SpoolDir> {
        let d = SpoolDir {
            incoming: root.join("incoming"),
            active: root.join("active"),
            done: root.join("done"),
            failed: root.join("failed"),
        };
        for p in [&d.incoming, &d.active, &d.done, &d.failed] {
            std::fs::create_dir_all(p).with_context(|| format!("cannot create {}", p.display()))?;
        }
        Ok(d)
    }
}

/// Feeds new spool files to ingest and files finished ones away.
pub struct Watcher {
    dir: SpoolDir,
    next_id: u32,
    /// Files handed to ingest, by id: (name, path in active/).
    taken: std::collections::HashMap<u32, (String, PathBuf)>,
    resumed: bool,
    /// Files moved to done/ and to failed/ since the start.
    pub done: u64,
    pub failed: u64,
}

fn spool_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|rd| rd.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    files.retain(|p| p.extension().is_some_and(|e| e == "jsonl"));
    files.sort();
    files
}

impl Watcher {
    pub fn new(dir: SpoolDir) -> Watcher {
        Watcher {
            dir,
            next_id: 0,
            taken: Default::default(),
            resumed: false,
            done: 0,
            failed: 0,
        }
    }

    /// Takes every complete file of `incoming/` (and, the first time, what
    /// `active/` still holds) and hands it to ingest.
    pub fn scan(&mut self, cfg: &Config, inputs: &Sender<IngestInput>) -> anyhow::Result<()> {
        let mut work: Vec<(String, PathBuf)> = Vec::new();
        if !self.resumed {
            self.resumed = true;
            for p in spool_files(&self.dir.active) {
                work.push((file_name(&p), p));
            }
        }
        for p in spool_files(&self.dir.incoming) {
            let name = file_name(&p);
            let active = self.dir.active.join(&name);
            if active.exists() {
                tracing::warn!(
                    "{}: a file of that name is already being sent; left in incoming/",
                    p.display()
                );
                continue;
            }
            std::fs::rename(&p, &active).with_context(|| format!("cannot move {} to active/", p.display()))?;
            work.push((name, active));
        }
        for (name, active) in work {
            let origin = self.dir.incoming.join(&name);
            let id = self.next_id;
            self.next_id += 1;
            match open_spool(cfg, id, &active, &origin) {
                Ok(input) => {
                    tracing::info!("taking {name}");
                    self.taken.insert(id, (name, active));
                    inputs.send(IngestInput::Spool(input)).context("ingest stopped")?;
                }
                Err(e) => self.fail(&name, &active, &format!("{e:#}"))?,
            }
        }
        Ok(())
    }

    fn fail(&mut self, name: &str, active: &Path, reason: &str) -> anyhow::Result<()> {
        tracing::warn!("{name} goes to failed/: {reason}");
        self.failed += 1;
        let failed = self.dir.failed.join(name);
        std::fs::rename(active, &failed).with_context(|| format!("cannot move {} to failed/", active.display()))?;
        let why = self.dir.failed.join(format!("{name}.reason"));
        std::fs::write(&why, format!("{reason}\n")).with_context(|| format!("cannot write {}", why.display()))
    }

    /// Moves a finished file, its journal and a summary to `done/`.
    pub fn finished(&mut self, id: u32, track: FileTrack) -> anyhow::Result<()> {
        let Some((name, active)) = self.taken.remove(&id) else {
            return Ok(());
        };
        drop(track.journal);
        let done = self.dir.done.join(&name);
        let journal = crate::journal::path_for(&active);
        if journal.exists() {
            std::fs::rename(&journal, crate::journal::path_for(&done))
                .with_context(|| format!("cannot move {} to done/", journal.display()))?;
        }
        std::fs::rename(&active, &done).with_context(|| format!("cannot move {} to done/", active.display()))?;
        let c = |o: Outcome| track.counts[o.index()];
        let summary = serde_json::json!({
            "file": name,
            "finished": humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
            "recipients": track.finals + track.already_final,
            "delivered": c(Outcome::Delivered),
            "bounced": c(Outcome::Bounced),
            "expired": c(Outcome::Expired),
            "rejected": c(Outcome::Rejected),
            "final_in_earlier_runs": track.already_final,
        });
        let path = self.dir.done.join(format!("{name}.summary.json"));
        std::fs::write(&path, format!("{summary}\n")).with_context(|| format!("cannot write {}", path.display()))?;
        tracing::info!("{name} is done");
        self.done += 1;
        Ok(())
    }
}

fn file_name(p: &Path) -> String {
    p.file_name()
        .map_or_else(String::new, |n| n.to_string_lossy().into_owned())
}
