//! `volley run`: the spool-directory service. Producers rename complete
//! `*.jsonl` files into `spool_dir/incoming/`; volley moves each into
//! `active/` (the producer no longer owns its name) and works on it beside
//! the others; once every recipient of a file is final and recorded, a
//! summary, the file and its journal go to `done/`. A file that cannot be
//! read at all goes to `failed/` with a `.reason` file. Files left in
//! `active/` by a stop or a crash are resumed first. One service per spool
//! directory: `spool_dir/.lock` is held for the life of the process.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use anyhow::Context;
use crossbeam_channel::Sender;

use crate::collector::{FileTrack, StorageError};
use crate::config::Config;
use crate::ingest::{IngestInput, SpoolInput};
use crate::journal;
use crate::lock::{Lock, LockError};
use crate::outcome::Outcome;

/// The four folders of a spool directory.
#[derive(Debug, Clone)]
pub struct SpoolDir {
    pub root: PathBuf,
    pub incoming: PathBuf,
    pub active: PathBuf,
    pub done: PathBuf,
    pub failed: PathBuf,
}

impl SpoolDir {
    pub fn create(root: &Path) -> anyhow::Result<SpoolDir> {
        let d = SpoolDir {
            root: root.to_path_buf(),
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
    _lock: Lock,
    /// Write and sync `done/` so that a finished file stays finished after power loss.
    fsync: bool,
    next_id: u32,
    /// Files handed to ingest, by id: (name, path in active/).
    taken: std::collections::HashMap<u32, (String, PathBuf)>,
    /// Names in active/ that are taken (the values of `taken`).
    active_names: HashSet<String>,
    /// Files skipped because another process holds them (warned once).
    busy: HashSet<PathBuf>,
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

fn storage(path: &Path) -> impl FnOnce(std::io::Error) -> StorageError + '_ {
    move |e| StorageError::new("the spool directory", path, e)
}

impl Watcher {
    /// Takes the spool directory's lock (refused while another service
    /// holds it) and tidies what a crash in the middle of a move to `done/`
    /// can leave behind.
    pub fn new(dir: SpoolDir, fsync: bool) -> anyhow::Result<Watcher> {
        let lock = Lock::dir(&dir.root, "spool directory")?;
        for j in std::fs::read_dir(&dir.active).with_context(|| format!("cannot read {}", dir.active.display()))? {
            let j = j.map_err(storage(&dir.active))?.path();
            let Some(spool) = j.to_str().and_then(|s| s.strip_suffix(".journal")).map(PathBuf::from) else {
                continue;
            };
            let name = file_name(&spool);
            if !spool.exists() && dir.done.join(&name).exists() {
                let to = journal::path_for(&dir.done.join(&name));
                std::fs::rename(&j, &to).map_err(storage(&j))?;
            }
        }
        Ok(Watcher {
            dir,
            _lock: lock,
            fsync,
            next_id: 0,
            taken: Default::default(),
            active_names: HashSet::new(),
            busy: HashSet::new(),
            done: 0,
            failed: 0,
        })
    }

    /// Takes the files of `active/` not yet taken (left by a stop or a
    /// crash) and every complete file of `incoming/`, and hands them to
    /// ingest. A file that another process holds is left where it is.
    pub fn scan(&mut self, cfg: &Config, inputs: &Sender<IngestInput>) -> anyhow::Result<()> {
        let mut work: Vec<(String, PathBuf, Lock)> = Vec::new();
        for p in spool_files(&self.dir.active) {
            let name = file_name(&p);
            if self.active_names.contains(&name) {
                continue;
            }
            if let Some(lock) = self.lock(&p) {
                work.push((name, p, lock));
            }
        }
        for p in spool_files(&self.dir.incoming) {
            let name = file_name(&p);
            let active = self.dir.active.join(&name);
            if self.active_names.contains(&name) || active.exists() {
                if self.busy.insert(p.clone()) {
                    tracing::warn!(
                        "{}: a file of that name is already being sent; left in incoming/",
                        p.display()
                    );
                }
                continue;
            }
            let Some(lock) = self.lock(&p) else { continue };
            std::fs::rename(&p, &active).map_err(storage(&p))?;
            work.push((name, active, lock));
        }
        for (name, active, lock) in work {
            let origin = self.dir.incoming.join(&name);
            let id = self.next_id;
            self.next_id += 1;
            match SpoolInput::open(cfg, id, &active, &origin, Some(lock)) {
                Ok(input) => {
                    tracing::info!("taking {name}");
                    self.taken.insert(id, (name.clone(), active));
                    self.active_names.insert(name);
                    inputs.send(IngestInput::Spool(input)).context("ingest stopped")?;
                }
                Err(e) if e.chain().any(|c| c.is::<StorageError>()) => return Err(e),
                Err(e) => self.fail(&name, &active, &format!("{e:#}"))?,
            }
        }
        Ok(())
    }

    /// This process's lock on a spool file, or None (said once) when
    /// another process holds it or it is gone.
    fn lock(&mut self, p: &Path) -> Option<Lock> {
        match Lock::file(p, "spool file") {
            Ok(l) => {
                self.busy.remove(p);
                Some(l)
            }
            Err(e @ LockError::Held { .. }) => {
                if self.busy.insert(p.to_path_buf()) {
                    tracing::warn!("{e}; left where it is until it is free");
                }
                None
            }
            // Gone between the listing and the lock (a producer took it back).
            Err(LockError::Io { .. }) => None,
        }
    }

    fn fail(&mut self, name: &str, active: &Path, reason: &str) -> anyhow::Result<()> {
        tracing::warn!("{name} goes to failed/: {reason}");
        self.failed += 1;
        let failed = self.dir.failed.join(name);
        std::fs::rename(active, &failed).map_err(storage(active))?;
        let why = self.dir.failed.join(format!("{name}.reason"));
        std::fs::write(&why, format!("{reason}\n")).map_err(storage(&why))?;
        Ok(())
    }

    /// Moves a finished file to `done/`: first its summary, then the file,
    /// then its journal. A crash between two steps leaves either the file
    /// in `active/` with its journal (resumed: nothing left to send, and it
    /// is finished again) or an orphan journal in `active/` (moved on at the
    /// next start).
    pub fn finished(&mut self, id: u32, track: FileTrack) -> anyhow::Result<()> {
        let Some((name, active)) = self.taken.remove(&id) else {
            return Ok(());
        };
        self.active_names.remove(&name);
        let done = self.dir.done.join(&name);
        let c = |o: Outcome| track.counts[o.index()] + track.earlier[o.index()];
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
        let tmp = self.dir.done.join(format!("{name}.summary.json.tmp"));
        std::fs::write(&tmp, format!("{summary}\n")).map_err(storage(&tmp))?;
        std::fs::rename(&tmp, &path).map_err(storage(&path))?;
        std::fs::rename(&active, &done).map_err(storage(&active))?;
        let journal = journal::path_for(&active);
        if journal.exists() {
            std::fs::rename(&journal, journal::path_for(&done)).map_err(storage(&journal))?;
        }
        if self.fsync {
            std::fs::File::open(&self.dir.done)
                .and_then(|d| d.sync_all())
                .map_err(storage(&self.dir.done))?;
        }
        tracing::info!(
            "{name} is done: {} recipients, {} delivered, {} bounced, {} expired, {} rejected ({} final in earlier runs)",
            track.finals + track.already_final,
            c(Outcome::Delivered),
            c(Outcome::Bounced),
            c(Outcome::Expired),
            c(Outcome::Rejected),
            track.already_final
        );
        drop(track);
        self.done += 1;
        Ok(())
    }
}

fn file_name(p: &Path) -> String {
    p.file_name()
        .map_or_else(String::new, |n| n.to_string_lossy().into_owned())
}
