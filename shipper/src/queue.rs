//! The episode lifecycle on disk: `episodes/ → outbox/ → shipped/ | quarantine/`. Every state
//! change is one named function below; its doc says which crash it survives and how the next
//! start finishes or undoes it. `docs/transport.md` draws the same machine.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use cis490_common::durable::{self, DurableFile, Existing};
use cis490_common::{timefmt, validate_id, Commit, Reason};

use crate::pack::{self, Compression, PackError, Packed};

pub const REASON_FILE: &str = "quarantine_reason.json";
const PENDING_SUFFIX: &str = ".reason.pending";

/// `quarantine/<id>/quarantine_reason.json`. `reason` stays a string when read back, so a
/// file written by another version still counts under its own name in `status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QuarantineReason {
    pub episode_id: String,
    pub reason: String,
    pub http_status: Option<u16>,
    pub receiver_response: Option<Value>,
    pub commit: Option<String>,
    pub quarantined_at: String,
}

/// The on-disk queue: the shipper's four directories under `data_dir` and the transitions
/// between them.
#[derive(Debug, Clone)]
pub struct Queue {
    pub root: PathBuf,
    /// Set by [`Queue::retire`], cleared by [`Queue::sync_retired`]: moves into shipped/ whose
    /// directory entries may not be on disk yet.
    retired_unsynced: Arc<AtomicBool>,
    /// Set by any failed [`Queue::sync_retired`] and never cleared: after an fsync error a
    /// later successful fsync proves nothing, so `once` must not report success.
    retire_sync_failed: Arc<AtomicBool>,
    /// Entries of shipped/ for [`Queue::census`]: listed once, then followed through
    /// [`Queue::retire`], and listed again after every [`Queue::cleanup`] (which also picks up
    /// changes made by hand). [`UNCOUNTED`] until listed.
    shipped_count: Arc<AtomicU64>,
}

/// `shipped_count` before the listing it needs.
const UNCOUNTED: u64 = u64::MAX;

/// An episode directory found in `episodes/`.
#[derive(Debug, Clone)]
pub struct Candidate {
    pub id: String,
    pub dir: PathBuf,
    pub mtime: SystemTime,
}

/// What reading `meta.json` told us.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stamp {
    Missing,
    Commit(Commit),
    Bad(String),
}

fn io_ctx(path: &Path, e: io::Error) -> io::Error {
    io::Error::new(e.kind(), format!("{}: {e}", path.display()))
}

impl Queue {
    pub fn new(root: &Path) -> Queue {
        Queue {
            root: root.to_path_buf(),
            retired_unsynced: Arc::new(AtomicBool::new(false)),
            retire_sync_failed: Arc::new(AtomicBool::new(false)),
            shipped_count: Arc::new(AtomicU64::new(UNCOUNTED)),
        }
    }
    pub fn episodes_dir(&self) -> PathBuf {
        self.root.join("episodes")
    }
    pub fn outbox_dir(&self) -> PathBuf {
        self.root.join("outbox")
    }
    pub fn shipped_dir(&self) -> PathBuf {
        self.root.join("shipped")
    }
    pub fn quarantine_dir(&self) -> PathBuf {
        self.root.join("quarantine")
    }
    pub fn tarball(&self, id: &str) -> PathBuf {
        self.outbox_dir().join(format!("{id}.tar.zst"))
    }
    fn partial(&self, id: &str) -> PathBuf {
        self.outbox_dir().join(format!("{id}.tar.zst.partial"))
    }

    /// Serialises state changes between the daemon's workers and the CLI commands.
    fn lock(&self) -> io::Result<cis490_common::lock::DirLock> {
        cis490_common::lock::exclusive(&self.root).map_err(|e| io_ctx(&self.root.join(".lock"), e))
    }

    /// Creates the four directories (idempotent) and proves `data_dir` is writable.
    pub fn prepare(&self) -> io::Result<()> {
        for d in [
            self.episodes_dir(),
            self.outbox_dir(),
            self.shipped_dir(),
            self.quarantine_dir(),
        ] {
            durable::create_dir_durable(&d).map_err(|e| io_ctx(&d, e))?;
        }
        let probe = DurableFile::create_in(&self.outbox_dir(), ".probe")
            .map_err(|e| io_ctx(&self.outbox_dir(), e))?;
        drop(probe);
        Ok(())
    }

    /// Episode directories with valid ids, oldest (by directory mtime) first.
    pub fn list(&self) -> io::Result<Vec<Candidate>> {
        self.list_all().map(|(ok, _)| ok)
    }

    /// Like [`Queue::list`], plus the names in episodes/ that are not valid episode ids (they
    /// are never shipped; the daemon warns about each once).
    pub fn list_all(&self) -> io::Result<(Vec<Candidate>, Vec<String>)> {
        let dir = self.episodes_dir();
        let mut out = Vec::new();
        let mut invalid = Vec::new();
        for e in fs::read_dir(&dir).map_err(|e| io_ctx(&dir, e))? {
            let e = e?;
            let name = match e.file_name().into_string() {
                Ok(n) => n,
                Err(raw) => {
                    invalid.push(raw.to_string_lossy().into_owned());
                    continue;
                }
            };
            if name.starts_with('.') {
                continue;
            }
            if validate_id(&name).is_err() {
                invalid.push(name);
                continue;
            }
            let md = match fs::symlink_metadata(e.path()) {
                Ok(m) => m,
                Err(_) => continue,
            };
            if !md.is_dir() {
                continue;
            }
            out.push(Candidate {
                id: name,
                dir: e.path(),
                mtime: md.modified().unwrap_or(SystemTime::UNIX_EPOCH),
            });
        }
        out.sort_by(|a, b| a.mtime.cmp(&b.mtime).then_with(|| a.id.cmp(&b.id)));
        Ok((out, invalid))
    }

    /// Ready = `meta.json` present and nothing in the tree modified in the last `settle`.
    #[cfg(test)]
    pub fn is_ready(&self, c: &Candidate, settle: Duration, now: SystemTime) -> bool {
        self.readiness(c, settle, now).is_some()
    }

    /// [`Queue::is_ready`] with what the same walk saw: about how long the episode's tar is
    /// ([`TreeWalk::tar_bytes`]) when it is ready, so the work loop knows a small episode before
    /// packing it.
    pub fn readiness(&self, c: &Candidate, settle: Duration, now: SystemTime) -> Option<u64> {
        if !c.dir.join("meta.json").exists() {
            return None;
        }
        let walk = walk_tree(&c.dir).ok()?;
        (now.duration_since(walk.newest).unwrap_or_default() >= settle).then_some(walk.tar_bytes)
    }

    /// Sweep (SPEC §2): removes `*.partial` files and tarballs whose episode is gone, and finishes
    /// quarantines a crash interrupted. Bounded by the number of entries in outbox/.
    /// Episodes in `busy` are being packed or sent by this process right now: theirs are left.
    pub fn sweep(&self, busy: &std::collections::HashSet<String>) -> io::Result<Vec<String>> {
        let _lock = self.lock()?;
        self.recover_pending()?;
        let mut removed = Vec::new();
        let outbox = self.outbox_dir();
        for e in fs::read_dir(&outbox).map_err(|e| io_ctx(&outbox, e))? {
            let e = e?;
            let name = e.file_name().to_string_lossy().into_owned();
            let owner = name.split(".tar.zst").next().unwrap_or("");
            if busy.contains(owner) {
                continue;
            }
            let orphan = if name.ends_with(".partial") || name.ends_with(durable::TEMP_SUFFIX) {
                true
            } else if let Some(id) = name.strip_suffix(".tar.zst") {
                !self.episodes_dir().join(id).is_dir()
            } else {
                false
            };
            if orphan {
                match fs::remove_file(e.path()) {
                    Ok(()) => removed.push(name),
                    Err(err) if err.kind() == io::ErrorKind::NotFound => {}
                    Err(err) => return Err(io_ctx(&e.path(), err)),
                }
            }
        }
        if !removed.is_empty() {
            durable::fsync_dir(&outbox)?;
        }
        Ok(removed)
    }

    /// Transition *pack*. A tarball of at most [`IN_MEMORY_MAX`] bytes stays in memory and is
    /// never written (a crash loses nothing: the canonical tar packs to the same bytes again).
    /// A larger one becomes `outbox/<id>.tar.zst`, built as `.partial`, fsynced, renamed; a
    /// crash leaves at most a `.partial`, which the sweep removes.
    pub fn pack(
        &self,
        c: &Candidate,
        compression: Compression,
    ) -> Result<(Packed, Tarball), PackError> {
        let partial = self.partial(&c.id);
        let out = Spill {
            mem: Vec::new(),
            file: None,
            path: partial.clone(),
        };
        let (packed, out) = pack::pack(&c.dir, &c.id, out, compression)?;
        let Some(file) = out.file else {
            // Bytes keeps a Vec's spare capacity: give it back so a held tarball costs its size.
            let mut mem = out.mem;
            mem.shrink_to_fit();
            return Ok((packed, Tarball::Memory(bytes::Bytes::from(mem))));
        };
        let dest = self.tarball(&c.id);
        file.commit(&dest, Existing::Replace)
            .map_err(|source| PackError::Io {
                path: dest.clone(),
                source,
            })?;
        let len = fs::metadata(&dest)
            .map_err(|source| PackError::Io {
                path: dest.clone(),
                source,
            })?
            .len();
        Ok((packed, Tarball::File { path: dest, len }))
    }

    /// The SHA-256 and length of a tarball packed before a restart (decompressed and hashed
    /// again, since only the tarball itself is kept on disk).
    pub fn existing_tarball(&self, id: &str) -> Option<(String, u64)> {
        let path = self.tarball(id);
        let len = fs::metadata(&path).ok()?.len();
        match pack::hash_tarball(&path) {
            Ok(sha) => Some((sha, len)),
            Err(e) => {
                tracing::warn!(episode = id, error = %e, "unreadable outbox tarball; packing again");
                let _ = fs::remove_file(&path);
                None
            }
        }
    }

    fn free_name(&self, parent: &Path, id: &str) -> String {
        let taken = |n: &str| {
            parent.join(n).exists() || parent.join(format!(".{n}{PENDING_SUFFIX}")).exists()
        };
        if !taken(id) {
            return id.to_string();
        }
        (1..)
            .map(|k| format!("{id}.{k}"))
            .find(|n| !taken(n))
            .unwrap_or_else(|| id.to_string())
    }

    fn drop_tarball(&self, id: &str) -> io::Result<()> {
        match fs::remove_file(self.tarball(id)) {
            Ok(()) => durable::fsync_dir(&self.outbox_dir()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Transition *retire*: after a 200/201. The tarball goes first, then the directory moves
    /// to `shipped/`. A crash in between leaves the episode in episodes/ without a tarball: it is
    /// packed and sent again and the receiver answers 200 already_stored, so nothing duplicates.
    ///
    /// The move is not fsynced here: [`Queue::sync_retired`] makes any number of them durable
    /// with one fsync of each parent. On a journalling filesystem (ext4, XFS) a power cut before
    /// that can only undo a move (the rename is atomic), and an undone move is a re-ship the
    /// receiver answers with already_stored. Without a journal no fsync order makes a rename
    /// atomic across a power cut; the window is wider here (docs/decisions.md). What batching
    /// the fsyncs gains is measured in docs/BENCHMARKS.md.
    pub fn retire(&self, id: &str) -> io::Result<PathBuf> {
        let _lock = self.lock()?;
        self.drop_tarball(id)?;
        let target = self.free_name(&self.shipped_dir(), id);
        let dest = self.shipped_dir().join(&target);
        let src = self.episodes_dir().join(id);
        // Stamped just before the move: a rename leaves a directory's mtime alone, so retention
        // counts from this moment. On a journalling filesystem the stamp is in the same or an
        // earlier commit than the move; without a journal a power cut may keep the move and lose
        // the stamp, and retention then counts from the producer's last write.
        File::open(&src)?.set_modified(SystemTime::now())?;
        fs::rename(&src, &dest)?;
        self.retired_unsynced.store(true, Ordering::Release);
        // Under the lock, so a census listing shipped/ right now cannot count this one twice.
        let _ = self
            .shipped_count
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n != UNCOUNTED).then(|| n + 1)
            });
        Ok(dest)
    }

    /// Makes every earlier [`Queue::retire`] durable: one fsync of shipped/ and one of
    /// episodes/, however many moves there were (none if there were none). On failure the moves
    /// stay marked, so the next call tries again.
    pub fn sync_retired(&self) -> io::Result<()> {
        // Cleared before the fsyncs: a retire that lands while they run marks it again.
        if !self.retired_unsynced.swap(false, Ordering::AcqRel) {
            return Ok(());
        }
        let r = durable::fsync_dir(&self.shipped_dir())
            .and_then(|()| durable::fsync_dir(&self.episodes_dir()));
        if r.is_err() {
            self.retired_unsynced.store(true, Ordering::Release);
            self.retire_sync_failed.store(true, Ordering::Release);
        }
        r
    }

    /// Whether every retire so far is durable and no retire fsync ever failed.
    pub fn retires_durable(&self) -> bool {
        !self.retired_unsynced() && !self.retire_sync_failed.load(Ordering::Acquire)
    }

    /// Whether a retire is waiting for [`Queue::sync_retired`].
    pub fn retired_unsynced(&self) -> bool {
        self.retired_unsynced.load(Ordering::Acquire)
    }

    /// Transition *quarantine*: the reason is written as `quarantine/.<name>.reason.pending`, the
    /// directory is renamed into quarantine/, then the reason is written again inside it and the
    /// pending file removed. A crash before the directory rename leaves a stale pending file
    /// (removed; the episode is tried again); after it, the sweep writes the reason inside from
    /// the pending file.
    ///
    /// The reason is written inside (a temp file, fsync, a rename within the episode's directory,
    /// fsync), never renamed in from quarantine/: without a journal a rename between two
    /// directories is two separate writes, and a power cut could keep the pending name's removal
    /// and lose the new name, leaving a quarantined episode with no reason anywhere.
    pub fn quarantine(&self, id: &str, reason: &QuarantineReason) -> io::Result<PathBuf> {
        let _lock = self.lock()?;
        // This fsyncs episodes/: the entries earlier retires added to shipped/ go first.
        self.sync_retired()?;
        let src = self.episodes_dir().join(id);
        if !src.is_dir() {
            // Another process (the daemon, or quarantine-unstamped) moved it first.
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("{}: already moved", src.display()),
            ));
        }
        self.drop_tarball(id)?;
        let qdir = self.quarantine_dir();
        let target = self.free_name(&qdir, id);
        let pending = qdir.join(format!(".{target}{PENDING_SUFFIX}"));
        let json = serde_json::to_vec_pretty(reason).map_err(io::Error::other)?;
        durable::write_atomic(&pending, &json)?;
        let dest = qdir.join(&target);
        touch(&src)?;
        if let Err(e) = durable::rename_durable(&src, &dest) {
            let _ = fs::remove_file(&pending);
            return Err(e);
        }
        durable::write_atomic(&dest.join(REASON_FILE), &json)?;
        // Not fsynced: should the removal be undone, the sweep finds the reason in place and
        // removes the pending file again.
        fs::remove_file(&pending)?;
        touch(&dest)?;
        Ok(dest)
    }

    /// Finishes or discards quarantines a crash interrupted (under the lock, so no quarantine is
    /// running): a pending reason whose directory moved is written inside it, any other pending
    /// reason is stale. Temp files of either write that a power cut left are removed.
    pub fn recover_pending(&self) -> io::Result<()> {
        let qdir = self.quarantine_dir();
        let mut removed = false;
        for e in fs::read_dir(&qdir).map_err(|e| io_ctx(&qdir, e))? {
            let e = e?;
            let name = e.file_name().to_string_lossy().into_owned();
            if is_pending_temp(&name) {
                remove_if_there(&e.path())?;
                removed = true;
                continue;
            }
            let Some(target) = name
                .strip_prefix('.')
                .and_then(|n| n.strip_suffix(PENDING_SUFFIX))
            else {
                continue;
            };
            let dest = qdir.join(target);
            if dest.is_dir() {
                let mut inside = false;
                for f in fs::read_dir(&dest).map_err(|e| io_ctx(&dest, e))? {
                    let f = f?;
                    if is_reason_temp(&f.file_name().to_string_lossy()) {
                        remove_if_there(&f.path())?;
                        inside = true;
                    }
                }
                if inside {
                    durable::fsync_dir(&dest)?;
                }
                if !dest.join(REASON_FILE).exists() {
                    let json = fs::read(e.path()).map_err(|err| io_ctx(&e.path(), err))?;
                    durable::write_atomic(&dest.join(REASON_FILE), &json)?;
                    touch(&dest)?;
                    tracing::warn!(
                        event = "quarantined",
                        episode = target,
                        "finished a quarantine interrupted by a crash"
                    );
                }
            }
            remove_if_there(&e.path())?;
            removed = true;
        }
        if removed {
            durable::fsync_dir(&qdir)?;
        }
        Ok(())
    }

    /// `requeue`: moves `quarantine/<name>` back to `episodes/<episode_id>` without its reason.
    pub fn requeue(&self, name: &str) -> Result<PathBuf, String> {
        validate_id(name).map_err(|e| format!("{name}: {e}"))?;
        let _lock = self.lock().map_err(|e| e.to_string())?;
        let src = self.quarantine_dir().join(name);
        if !src.is_dir() {
            return Err(format!(
                "{name}: not in {}",
                self.quarantine_dir().display()
            ));
        }
        let reason: Option<QuarantineReason> = fs::read(src.join(REASON_FILE))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok());
        // The reason file is data on disk: its id is checked before it becomes a path.
        let id = reason
            .map(|r| r.episode_id)
            .filter(|id| validate_id(id).is_ok())
            .unwrap_or_else(|| name.to_string());
        let dest = self.episodes_dir().join(&id);
        if dest.exists() {
            return Err(format!(
                "{name}: {} already exists; move it away first",
                dest.display()
            ));
        }
        match fs::remove_file(src.join(REASON_FILE)) {
            Ok(()) => durable::fsync_dir(&src).map_err(|e| e.to_string())?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(format!("{name}: {e}")),
        }
        durable::rename_durable(&src, &dest).map_err(|e| format!("{name}: {e}"))?;
        Ok(dest)
    }

    /// Retention: removes entries of `shipped/` or `quarantine/` moved there over `keep_days` ago.
    /// Under the lock an expired entry is only renamed to `.<name>.deleting`; the slow delete
    /// runs after the lock is released (and finishes any a crash interrupted).
    pub fn cleanup(
        &self,
        which: &Path,
        keep_days: u64,
        now: SystemTime,
    ) -> io::Result<Vec<String>> {
        // Whatever this removes (or someone removed by hand), the next census lists again.
        self.shipped_count.store(UNCOUNTED, Ordering::Release);
        let mut removed = Vec::new();
        if keep_days > 0 {
            let keep = Duration::from_secs(keep_days * 86_400);
            let _lock = self.lock()?;
            for e in fs::read_dir(which)? {
                let e = e?;
                let name = e.file_name().to_string_lossy().into_owned();
                if name.starts_with('.') {
                    continue;
                }
                let md = fs::symlink_metadata(e.path())?;
                let age = now
                    .duration_since(md.modified().unwrap_or(now))
                    .unwrap_or_default();
                if md.is_dir() && age > keep {
                    fs::rename(e.path(), which.join(format!(".{name}.deleting")))?;
                    removed.push(name);
                }
            }
            if !removed.is_empty() {
                durable::fsync_dir(which)?;
            }
        }
        for e in fs::read_dir(which)? {
            let e = e?;
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') && name.ends_with(".deleting") {
                fs::remove_dir_all(e.path())?;
            }
        }
        Ok(removed)
    }
}

/// Tarballs up to this size are packed in memory and sent from there: no outbox file, no
/// fsyncs (4 fewer per small episode). The daemon holds at most `concurrency` plus its small
/// lane's total of them at once (`daemon::in_hand::Slots`): 10 MiB at most with the defaults.
pub const IN_MEMORY_MAX: usize = 1 << 20;

/// A packed episode: in memory, or in the outbox.
#[derive(Debug, Clone)]
pub enum Tarball {
    Memory(bytes::Bytes),
    File { path: PathBuf, len: u64 },
}

impl Tarball {
    pub fn len(&self) -> u64 {
        match self {
            Tarball::Memory(b) => b.len() as u64,
            Tarball::File { len, .. } => *len,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The packer's output: memory until the tarball outgrows [`IN_MEMORY_MAX`], then the
/// `.partial` file (what was buffered is written first).
struct Spill {
    mem: Vec<u8>,
    file: Option<DurableFile>,
    path: PathBuf,
}

impl Write for Spill {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if let Some(f) = self.file.as_mut() {
            return f.write(buf);
        }
        if self.mem.len() + buf.len() <= IN_MEMORY_MAX {
            self.mem.extend_from_slice(buf);
            return Ok(buf.len());
        }
        let mut f = DurableFile::create_at(&self.path)
            .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", self.path.display())))?;
        f.write_all(&std::mem::take(&mut self.mem))?;
        let n = f.write(buf)?;
        self.file = Some(f);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        match self.file.as_mut() {
            Some(f) => f.flush(),
            None => Ok(()),
        }
    }
}

/// `quarantine/..<name>.reason.pending.<pid>.<n>.tmp`: the temp file of a pending reason's
/// durable write, left behind when the power went before its rename.
fn is_pending_temp(name: &str) -> bool {
    name.starts_with('.')
        && name
            .strip_suffix(durable::TEMP_SUFFIX)
            .is_some_and(|n| n.contains(&format!("{PENDING_SUFFIX}.")))
}

/// `quarantine/<name>/.quarantine_reason.json.<pid>.<n>.tmp`: the same for the reason file.
fn is_reason_temp(name: &str) -> bool {
    name.strip_prefix('.')
        .and_then(|n| n.strip_prefix(REASON_FILE))
        .is_some_and(|n| n.starts_with('.') && n.ends_with(durable::TEMP_SUFFIX))
}

fn remove_if_there(path: &Path) -> io::Result<()> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(io_ctx(path, e)),
        _ => Ok(()),
    }
}

/// Sets a moved directory's mtime to now: retention counts from the move (SPEC §2).
fn touch(dir: &Path) -> io::Result<()> {
    let f = File::open(dir)?;
    f.set_modified(SystemTime::now())?;
    f.sync_all()
}

/// The newest mtime of anything in the tree (entries are not followed).
pub fn newest_mtime(dir: &Path) -> io::Result<SystemTime> {
    walk_tree(dir).map(|w| w.newest)
}

/// What one walk of an episode's tree found.
#[derive(Debug, Clone, Copy)]
pub struct TreeWalk {
    /// The newest mtime of the directory and everything in it.
    pub newest: SystemTime,
    /// About the length of its tar: a header for every entry (the directory's own too), the
    /// files' bytes padded to blocks, and the end blocks. Long-name records are not counted.
    pub tar_bytes: u64,
}

/// Stats every entry under `dir` once (the settle check; symlinks are not followed).
pub fn walk_tree(dir: &Path) -> io::Result<TreeWalk> {
    let mut newest = fs::symlink_metadata(dir)?.modified()?;
    const BLOCK: u64 = 512;
    let mut tar_bytes = 3 * BLOCK;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d)? {
            let e = e?;
            let md = fs::symlink_metadata(e.path())?;
            if let Ok(t) = md.modified() {
                newest = newest.max(t);
            }
            let padded = if md.is_file() {
                md.len().div_ceil(BLOCK).saturating_mul(BLOCK)
            } else {
                0
            };
            tar_bytes = tar_bytes.saturating_add(BLOCK).saturating_add(padded);
            if md.is_dir() {
                stack.push(e.path());
            }
        }
    }
    Ok(TreeWalk { newest, tar_bytes })
}

/// Reads `meta.json`'s commit the way the receiver will.
pub fn read_stamp(dir: &Path) -> Stamp {
    let path = dir.join("meta.json");
    let f = match File::open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Stamp::Missing,
        Err(e) => return Stamp::Bad(format!("meta.json is unreadable: {e}")),
    };
    let mut buf = Vec::new();
    if let Err(e) = f
        .take(cis490_common::meta::MAX_META_BYTES + 1)
        .read_to_end(&mut buf)
    {
        return Stamp::Bad(format!("meta.json is unreadable: {e}"));
    }
    match cis490_common::meta::commit_from_meta(&buf) {
        Ok(c) => Stamp::Commit(c),
        Err(e) => Stamp::Bad(e.to_string()),
    }
}

impl QuarantineReason {
    /// The reason file for `id`, stamped now.
    pub fn new(
        id: &str,
        reason: Reason,
        http_status: Option<u16>,
        receiver_response: Option<Value>,
        commit: Option<String>,
    ) -> QuarantineReason {
        QuarantineReason {
            episode_id: id.to_string(),
            reason: reason.as_str().to_string(),
            http_status,
            receiver_response,
            commit,
            quarantined_at: timefmt::now_rfc3339(),
        }
    }
}

/// Counts and oldest age of one directory's entries.
#[derive(Debug, Clone, Default, Serialize)]
pub struct DirStatus {
    pub count: u64,
    pub oldest_age_s: Option<u64>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct QuarantineStatus {
    pub count: u64,
    pub oldest_age_s: Option<u64>,
    pub by_reason: BTreeMap<String, u64>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Status {
    pub episodes: DirStatus,
    pub outbox: DirStatus,
    pub shipped: DirStatus,
    pub quarantine: QuarantineStatus,
}

/// What one listing of a queue directory found: how many entries, and (when asked for) the
/// oldest and newest mtime among them.
#[derive(Debug, Clone, Copy, Default)]
struct Tally {
    count: u64,
    oldest: Option<SystemTime>,
    newest: Option<SystemTime>,
}

/// Counts `dir`'s entries of the kind the queue keeps there (directories, or `*.tar.zst` files
/// when `want_dirs` is false), hidden names skipped. The type comes from the directory entry
/// itself, so only `with_times` costs a `stat` per entry.
fn tally(dir: &Path, want_dirs: bool, with_times: bool) -> Tally {
    let mut t = Tally::default();
    let Ok(rd) = fs::read_dir(dir) else { return t };
    for e in rd.flatten() {
        let name = e.file_name();
        let name = name.to_string_lossy();
        if name.starts_with('.') {
            continue;
        }
        let Ok(ft) = e.file_type() else { continue };
        if want_dirs != ft.is_dir() || (!want_dirs && !name.ends_with(".tar.zst")) {
            continue;
        }
        if with_times {
            let Ok(md) = fs::symlink_metadata(e.path()) else {
                continue;
            };
            if let Ok(m) = md.modified() {
                t.oldest = Some(t.oldest.map_or(m, |o| o.min(m)));
                t.newest = Some(t.newest.map_or(m, |n| n.max(m)));
            }
        }
        t.count += 1;
    }
    t
}

fn age_s(now: SystemTime, t: SystemTime) -> u64 {
    now.duration_since(t).map_or(0, |d| d.as_secs())
}

fn dir_status(dir: &Path, want_dirs: bool, now: SystemTime) -> DirStatus {
    let t = tally(dir, want_dirs, true);
    DirStatus {
        count: t.count,
        // An entry whose mtime cannot be read still counts, as zero seconds old.
        oldest_age_s: (t.count > 0).then(|| t.oldest.map_or(0, |o| age_s(now, o))),
    }
}

/// What the daemon's metrics need of the queue at every scan (SPEC §12): the four counts and
/// the oldest queued episode's age, with a `stat` only for the entries of episodes/ and a
/// listing of shipped/ (which can hold `shipped_keep_days` of episodes) only now and then.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Census {
    pub episodes: u64,
    pub outbox: u64,
    pub shipped: u64,
    pub quarantine: u64,
    /// Age of the oldest entry of episodes/ by its mtime, as `status` reports it.
    pub oldest_queued_age_s: Option<u64>,
}

impl Queue {
    /// The counts of [`Queue::status`] without the ages of outbox/, shipped/ and quarantine/
    /// or the reason files, and shipped/ listed only when [`Queue::cleanup`] (or nothing yet)
    /// has: cheap enough for every scan. Another process changes episodes/ and quarantine/
    /// (`requeue`, `quarantine-unstamped`), never shipped/, so those two are listed each time.
    pub fn census(&self, now: SystemTime) -> Census {
        let episodes = dir_status(&self.episodes_dir(), true, now);
        Census {
            episodes: episodes.count,
            outbox: tally(&self.outbox_dir(), false, false).count,
            shipped: self.shipped_count(),
            quarantine: tally(&self.quarantine_dir(), true, false).count,
            oldest_queued_age_s: episodes.oldest_age_s,
        }
    }

    fn shipped_count(&self) -> u64 {
        let n = self.shipped_count.load(Ordering::Acquire);
        if n != UNCOUNTED {
            return n;
        }
        // Listed under the lock, so no retire lands between the listing and the store (should
        // the lock fail, a retire at that instant is missed until the next listing).
        let _lock = self.lock().ok();
        let n = tally(&self.shipped_dir(), true, false).count;
        self.shipped_count.store(n, Ordering::Release);
        n
    }

    /// When the newest entry of shipped/ was retired (its mtime is set then, SPEC §2).
    pub fn last_shipped_at(&self) -> Option<SystemTime> {
        tally(&self.shipped_dir(), true, true).newest
    }
}

impl Queue {
    pub fn status(&self, now: SystemTime) -> Status {
        let q = dir_status(&self.quarantine_dir(), true, now);
        let mut by_reason = BTreeMap::new();
        if let Ok(rd) = fs::read_dir(self.quarantine_dir()) {
            for e in rd.flatten() {
                if e.file_name().to_string_lossy().starts_with('.') || !e.path().is_dir() {
                    continue;
                }
                let r = fs::read(e.path().join(REASON_FILE))
                    .ok()
                    .and_then(|b| serde_json::from_slice::<QuarantineReason>(&b).ok())
                    .map_or_else(|| "unknown".to_string(), |r| r.reason);
                *by_reason.entry(r).or_insert(0) += 1;
            }
        }
        Status {
            episodes: dir_status(&self.episodes_dir(), true, now),
            outbox: dir_status(&self.outbox_dir(), false, now),
            shipped: dir_status(&self.shipped_dir(), true, now),
            quarantine: QuarantineStatus {
                count: q.count,
                oldest_age_s: q.oldest_age_s,
                by_reason,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const C: &str = "0123456789abcdef0123456789abcdef01234567";

    fn queue() -> (tempfile::TempDir, Queue) {
        let t = tempfile::tempdir().unwrap();
        let l = Queue::new(t.path());
        l.prepare().unwrap();
        (t, l)
    }

    fn episode(l: &Queue, id: &str) -> Candidate {
        let d = l.episodes_dir().join(id);
        fs::create_dir_all(&d).unwrap();
        fs::write(
            d.join("meta.json"),
            format!(r#"{{"code_version":{{"commit":"{C}"}}}}"#),
        )
        .unwrap();
        fs::write(d.join("data"), b"abc").unwrap();
        Candidate {
            id: id.into(),
            dir: d,
            mtime: SystemTime::now(),
        }
    }

    use crate::test_bytes::noise;

    #[test]
    fn small_tarballs_stay_in_memory_and_large_ones_go_to_the_outbox() {
        let (_t, l) = queue();
        for (id, size, in_memory) in [
            ("small", 1000, true),
            ("edge", IN_MEMORY_MAX - 64 * 1024, true),
            ("large", IN_MEMORY_MAX + 64 * 1024, false),
        ] {
            let c = episode(&l, id);
            fs::write(c.dir.join("data"), noise(size)).unwrap();
            let (p, t) = l.pack(&c, Compression::default()).unwrap();
            // Either way the bytes are the canonical tarball: the same SHA as a plain pack.
            let (again, bytes) =
                pack::pack(&c.dir, id, Vec::new(), Compression::default()).unwrap();
            assert_eq!(p.tar_sha256, again.tar_sha256);
            match t {
                Tarball::Memory(b) => {
                    assert!(in_memory, "{id}");
                    assert_eq!(&b[..], &bytes[..]);
                    assert!(!l.tarball(id).exists() && !l.partial(id).exists(), "{id}");
                }
                Tarball::File { path, len } => {
                    assert!(!in_memory, "{id}");
                    assert_eq!(path, l.tarball(id));
                    assert_eq!(fs::read(&path).unwrap(), bytes);
                    assert_eq!(len, bytes.len() as u64);
                    assert!(!l.partial(id).exists());
                }
            }
        }
    }

    #[test]
    fn retire_moves_and_drops_the_tarball_and_suffixes_collisions() {
        let (_t, l) = queue();
        let c = episode(&l, "ep1");
        fs::write(c.dir.join("data"), noise(IN_MEMORY_MAX + 1)).unwrap();
        let (_, t) = l.pack(&c, Compression::default()).unwrap();
        assert!(matches!(t, Tarball::File { .. }));
        assert!(l.tarball("ep1").exists());
        fs::create_dir_all(l.shipped_dir().join("ep1")).unwrap();
        let dest = l.retire("ep1").unwrap();
        assert_eq!(dest, l.shipped_dir().join("ep1.1"));
        assert!(!l.tarball("ep1").exists());
        assert!(!l.episodes_dir().join("ep1").exists());
        assert!(dest.join("data").exists());
    }

    #[test]
    fn retires_wait_for_one_sync_that_is_retried_until_it_succeeds() {
        let (_t, l) = queue();
        assert!(!l.retired_unsynced());
        l.sync_retired().unwrap();
        for id in ["a", "b"] {
            episode(&l, id);
            l.retire(id).unwrap();
        }
        assert!(l.retired_unsynced(), "two moves wait for the sync");
        // A failing fsync leaves them marked for the next call.
        let moved = l.root.join("shipped.aside");
        fs::rename(l.shipped_dir(), &moved).unwrap();
        assert!(l.sync_retired().is_err());
        assert!(l.retired_unsynced());
        fs::rename(&moved, l.shipped_dir()).unwrap();
        l.sync_retired().unwrap();
        assert!(!l.retired_unsynced());
        assert!(!l.retires_durable(), "a failed fsync is remembered");
        assert!(l.shipped_dir().join("a").is_dir() && l.shipped_dir().join("b").is_dir());
        let (_t2, fresh) = queue();
        episode(&fresh, "c");
        fresh.retire("c").unwrap();
        assert!(!fresh.retires_durable());
        fresh.sync_retired().unwrap();
        assert!(fresh.retires_durable());
    }

    #[test]
    fn a_quarantine_first_makes_earlier_retires_durable() {
        let (_t, l) = queue();
        episode(&l, "a");
        episode(&l, "b");
        l.retire("a").unwrap();
        l.quarantine(
            "b",
            &QuarantineReason::new("b", Reason::Conflict, Some(409), None, None),
        )
        .unwrap();
        assert!(!l.retired_unsynced() && l.retires_durable());
    }

    #[test]
    fn quarantine_writes_the_reason_inside() {
        let (_t, l) = queue();
        episode(&l, "ep1");
        let r = QuarantineReason::new(
            "ep1",
            Reason::Conflict,
            Some(409),
            Some(serde_json::json!({"error":"conflict"})),
            Some(C.into()),
        );
        let dest = l.quarantine("ep1", &r).unwrap();
        let back: QuarantineReason =
            serde_json::from_slice(&fs::read(dest.join(REASON_FILE)).unwrap()).unwrap();
        assert_eq!(back, r);
        let s = l.status(SystemTime::now());
        assert_eq!(s.quarantine.count, 1);
        assert_eq!(s.quarantine.by_reason["conflict"], 1);
        assert_eq!(s.episodes.count, 0);
    }

    #[test]
    fn interrupted_quarantines_are_finished_or_discarded() {
        let (_t, l) = queue();
        // Crash after the directory rename, before the reason moved in.
        episode(&l, "ep1");
        fs::rename(l.episodes_dir().join("ep1"), l.quarantine_dir().join("ep1")).unwrap();
        fs::write(l.quarantine_dir().join(".ep1.reason.pending"), b"{\"x\":1}").unwrap();
        // Crash before the directory rename: the episode is still queued.
        episode(&l, "ep2");
        fs::write(l.quarantine_dir().join(".ep2.reason.pending"), b"{}").unwrap();
        l.sweep(&Default::default()).unwrap();
        assert!(l.quarantine_dir().join("ep1").join(REASON_FILE).exists());
        assert!(!l.quarantine_dir().join(".ep1.reason.pending").exists());
        assert!(!l.quarantine_dir().join(".ep2.reason.pending").exists());
        assert!(l.episodes_dir().join("ep2").exists());
    }

    #[test]
    fn the_sweep_removes_temp_files_a_power_cut_left_in_a_quarantine() {
        let (_t, l) = queue();
        let q = l.quarantine_dir();
        // The pending reason's own temp file, its write cut before the rename.
        fs::write(q.join("..ep1.reason.pending.77.0.tmp"), b"{").unwrap();
        // The directory moved and the reason's temp file inside it, cut before its rename.
        episode(&l, "ep2");
        fs::rename(l.episodes_dir().join("ep2"), q.join("ep2")).unwrap();
        fs::write(q.join(".ep2.reason.pending"), b"{\"y\":2}").unwrap();
        fs::write(q.join("ep2").join(".quarantine_reason.json.77.1.tmp"), b"{").unwrap();
        // A finished quarantine whose pending file's removal was undone.
        episode(&l, "ep3");
        fs::rename(l.episodes_dir().join("ep3"), q.join("ep3")).unwrap();
        fs::write(q.join("ep3").join(REASON_FILE), b"{\"z\":3}").unwrap();
        fs::write(q.join(".ep3.reason.pending"), b"{\"z\":3}").unwrap();
        l.sweep(&Default::default()).unwrap();
        let mut left: Vec<String> = fs::read_dir(&q)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(left, ["ep2", "ep3"]);
        assert_eq!(
            fs::read(q.join("ep2").join(REASON_FILE)).unwrap(),
            b"{\"y\":2}"
        );
        assert!(!q
            .join("ep2")
            .join(".quarantine_reason.json.77.1.tmp")
            .exists());
        assert_eq!(
            fs::read(q.join("ep3").join(REASON_FILE)).unwrap(),
            b"{\"z\":3}"
        );
    }

    #[test]
    fn sweep_removes_partials_and_orphans_only() {
        let (_t, l) = queue();
        episode(&l, "live");
        fs::write(l.tarball("live"), b"x").unwrap();
        fs::write(l.tarball("gone"), b"x").unwrap();
        fs::write(l.outbox_dir().join("live.tar.zst.partial"), b"x").unwrap();
        let mut removed = l.sweep(&Default::default()).unwrap();
        removed.sort();
        assert_eq!(removed, vec!["gone.tar.zst", "live.tar.zst.partial"]);
        assert!(l.tarball("live").exists());
    }

    #[test]
    fn readiness_needs_meta_and_quiet() {
        let (_t, l) = queue();
        let c = episode(&l, "ep1");
        let now = SystemTime::now();
        assert!(!l.is_ready(&c, Duration::from_secs(60), now));
        assert!(l.is_ready(&c, Duration::from_secs(60), now + Duration::from_secs(61)));
        fs::remove_file(c.dir.join("meta.json")).unwrap();
        assert!(!l.is_ready(&c, Duration::ZERO, now + Duration::from_secs(61)));
    }

    #[test]
    fn the_settle_walk_knows_the_tar_length() {
        let (_t, l) = queue();
        let c = episode(&l, "ep1");
        fs::create_dir(c.dir.join("frames")).unwrap();
        fs::write(c.dir.join("frames").join("0001.bin"), vec![7u8; 5000]).unwrap();
        fs::write(c.dir.join("empty"), b"").unwrap();
        let later = SystemTime::now() + Duration::from_secs(61);
        let estimate = l.readiness(&c, Duration::from_secs(60), later);
        let (packed, _) = l.pack(&c, Compression::default()).unwrap();
        assert_eq!(estimate, Some(packed.tar_bytes), "short names: exact");
        assert_eq!(
            l.readiness(&c, Duration::from_secs(60), SystemTime::now()),
            None
        );
    }

    #[test]
    fn requeue_restores_the_episode_without_its_reason() {
        let (_t, l) = queue();
        episode(&l, "ep1");
        l.quarantine(
            "ep1",
            &QuarantineReason::new("ep1", Reason::Conflict, Some(409), None, None),
        )
        .unwrap();
        episode(&l, "ep1");
        l.quarantine(
            "ep1",
            &QuarantineReason::new("ep1", Reason::Conflict, Some(409), None, None),
        )
        .unwrap();
        assert!(l.quarantine_dir().join("ep1.1").exists());
        let back = l.requeue("ep1.1").unwrap();
        assert_eq!(back, l.episodes_dir().join("ep1"));
        assert!(!back.join(REASON_FILE).exists());
        assert!(l.requeue("ep1").unwrap_err().contains("already exists"));
        assert!(l.requeue("nope").is_err());
    }

    #[test]
    fn cleanup_honours_keep_days_and_zero() {
        let (_t, l) = queue();
        episode(&l, "ep1");
        l.retire("ep1").unwrap();
        let later = SystemTime::now() + Duration::from_secs(15 * 86_400);
        assert!(l.cleanup(&l.shipped_dir(), 0, later).unwrap().is_empty());
        assert!(l.cleanup(&l.shipped_dir(), 30, later).unwrap().is_empty());
        assert_eq!(l.cleanup(&l.shipped_dir(), 14, later).unwrap(), vec!["ep1"]);
        assert_eq!(
            fs::read_dir(l.shipped_dir()).unwrap().count(),
            0,
            "no .deleting left"
        );
    }

    fn set_mtime(p: &Path, t: SystemTime) {
        File::open(p).unwrap().set_modified(t).unwrap();
    }

    #[test]
    fn the_census_counts_what_status_counts_and_the_oldest_queued_age() {
        let (_t, l) = queue();
        let now = SystemTime::now();
        assert_eq!(l.census(now), Census::default(), "empty: no age");
        assert_eq!(l.last_shipped_at(), None);
        for id in ["old", "new", "gone1", "gone2", "bad"] {
            episode(&l, id);
        }
        let hour_ago = now - Duration::from_secs(3600);
        set_mtime(&l.episodes_dir().join("old"), hour_ago);
        l.retire("gone1").unwrap();
        l.retire("gone2").unwrap();
        let day_ago = now - Duration::from_secs(86_400);
        set_mtime(&l.shipped_dir().join("gone1"), day_ago);
        l.quarantine(
            "bad",
            &QuarantineReason::new("bad", Reason::Conflict, Some(409), None, None),
        )
        .unwrap();
        fs::write(l.tarball("new"), b"x").unwrap();
        fs::write(l.outbox_dir().join("new.tar.zst.partial"), b"x").unwrap();
        fs::write(l.episodes_dir().join("stray-file"), b"x").unwrap();
        fs::create_dir(l.episodes_dir().join(".hidden")).unwrap();
        let c = l.census(now);
        let s = l.status(now);
        assert_eq!(
            (c.episodes, c.outbox, c.shipped, c.quarantine),
            (
                s.episodes.count,
                s.outbox.count,
                s.shipped.count,
                s.quarantine.count
            )
        );
        assert_eq!(
            (c.episodes, c.outbox, c.shipped, c.quarantine),
            (2, 1, 2, 1)
        );
        assert_eq!(c.oldest_queued_age_s, s.episodes.oldest_age_s);
        assert_eq!(c.oldest_queued_age_s, Some(3600));
        // Retired a moment ago (gone2), not a day ago (gone1).
        let last = l.last_shipped_at().unwrap();
        assert!(now.duration_since(last).unwrap_or_default() < Duration::from_secs(60));

        // shipped/ is followed, not listed: a retire counts, a hand-made change waits for the
        // next cleanup's listing.
        l.retire("new").unwrap();
        fs::create_dir(l.shipped_dir().join("by-hand")).unwrap();
        assert_eq!(l.census(now).shipped, 3);
        l.cleanup(&l.shipped_dir(), 0, now).unwrap();
        assert_eq!(l.census(now).shipped, 4);
        assert_eq!(l.census(now).shipped, l.status(now).shipped.count);
    }

    #[test]
    fn stamps() {
        let (_t, l) = queue();
        let c = episode(&l, "ep1");
        assert_eq!(read_stamp(&c.dir), Stamp::Commit(Commit::parse(C).unwrap()));
        fs::write(c.dir.join("meta.json"), b"{}").unwrap();
        assert!(matches!(read_stamp(&c.dir), Stamp::Bad(_)));
        fs::remove_file(c.dir.join("meta.json")).unwrap();
        assert_eq!(read_stamp(&c.dir), Stamp::Missing);
    }
}
