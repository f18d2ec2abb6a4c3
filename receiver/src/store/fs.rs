//! Durable episode storage behind a narrow interface (temp upload → validate → commit, lookup,
//! list), with the filesystem layout of SPEC §5 as its first implementation.

use std::collections::BTreeMap;
use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{self, BufRead as _, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::{Duration, SystemTime};

use cis490_common::durable::{self, DurableFile, Existing};
use cis490_common::timefmt;

use crate::ingest::{self, Validated};

use super::group::{Flush, GroupCommit};
use super::resume::{PartFile, Resumes};
use super::{CommitOutcome, IndexRow, QuarantineNote, Upload};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("failed to prepare {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
}

fn at(path: &Path) -> impl FnOnce(io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_path_buf(),
        source,
    }
}

type Key = (String, String);

/// Where an episode's row sits in `index.jsonl`. The receiver keeps only this per stored
/// episode in memory (about 70 bytes with its id, against ~1.4 KB for a parsed row) and reads
/// the row itself from the file when asked, so 10^7 episodes fit in well under a GiB.
#[derive(Debug, Clone, Copy)]
struct Slot {
    offset: u64,
    len: u32,
}

/// Stored episodes by host, then by id (hosts are few: their names are kept once).
#[derive(Default)]
struct Slots(HashMap<Box<str>, HashMap<Box<str>, Slot>>);

impl Slots {
    fn get(&self, host: &str, ep: &str) -> Option<Slot> {
        self.0.get(host)?.get(ep).copied()
    }

    fn insert(&mut self, host: &str, ep: &str, slot: Slot) {
        match self.0.get_mut(host) {
            Some(m) => {
                m.insert(ep.into(), slot);
            }
            None => {
                self.0
                    .insert(host.into(), HashMap::from([(ep.into(), slot)]));
            }
        }
    }

    fn contains(&self, host: &str, ep: &str) -> bool {
        self.get(host, ep).is_some()
    }
}

struct FsInner {
    root: PathBuf,
    /// What is stored, for lookups from request handlers (never held across I/O).
    rows: RwLock<Slots>,
    /// The append handle of `index.jsonl`; holding it serialises commits.
    writer: Mutex<File>,
    /// A read handle of `index.jsonl` for positioned reads of single rows (no lock needed).
    reader: File,
    keep_days: u64,
    max_quarantine_bytes: u64,
    max_quarantine_entries: u64,
    /// What `quarantine/` holds, kept as entries are added and removed (never rescanned per
    /// rejection, SPEC §16).
    ledger: Mutex<QuarantineLedger>,
    /// Listings of `quarantine/` (at open, then at most hourly).
    quarantine_scans: std::sync::atomic::AtomicU64,
    max_uncompressed: u64,
    /// Prefixes of interrupted uploads (SPEC §13).
    resumes: Resumes,
    /// Uploads whose rows wait for a shared flush (issue 21).
    group: GroupCommit,
    /// Held for the store's lifetime: one receiver per store directory.
    _lock: cis490_common::lock::DirLock,
}

/// The filesystem store: `episodes/<host>/<id>.tar.zst`, `index.jsonl`, `quarantine/`, `tmp/`.
#[derive(Clone)]
pub struct FsStore {
    inner: Arc<FsInner>,
}

pub struct FsOptions {
    pub max_uncompressed: u64,
    pub quarantine_keep_days: u64,
    pub quarantine_max_bytes: u64,
    pub quarantine_max_entries: u64,
    pub resume_keep_s: u64,
    pub resume_max_bytes: u64,
}

impl FsStore {
    /// Opens the store for serving: takes its lock (refusing a second receiver), empties
    /// `tmp/`, drops expired prefixes from `resume/`, loads the index and adds rows for stored
    /// files it lacks.
    pub fn open(root: &Path, opts: &FsOptions) -> Result<FsStore, StoreError> {
        for d in ["episodes", "quarantine", "tmp"] {
            let p = root.join(d);
            durable::create_dir_durable(&p).map_err(at(&p))?;
        }
        let lock = lock_store(root)?;
        let tmp = root.join("tmp");
        for e in fs::read_dir(&tmp).map_err(at(&tmp))? {
            let e = e.map_err(at(&tmp))?;
            let p = e.path();
            let r = if p.is_dir() {
                fs::remove_dir_all(&p)
            } else {
                fs::remove_file(&p)
            };
            r.map_err(at(&p))?;
        }
        let resume_dir = root.join("resume");
        let resumes = Resumes::open(&resume_dir, opts.resume_keep_s, opts.resume_max_bytes)
            .map_err(at(&resume_dir))?;
        let index_path = root.join("index.jsonl");
        let mut rows = Slots::default();
        scan_index(&index_path, |row, slot| {
            rows.insert(&row.host_id, &row.episode_id, slot)
        })
        .map_err(at(&index_path))?;
        let file = durable::open_append(&index_path).map_err(at(&index_path))?;
        let reader = File::open(&index_path).map_err(at(&index_path))?;
        let store = FsStore {
            inner: Arc::new(FsInner {
                root: root.to_path_buf(),
                rows: RwLock::new(rows),
                writer: Mutex::new(file),
                reader,
                keep_days: opts.quarantine_keep_days,
                max_quarantine_bytes: opts.quarantine_max_bytes,
                max_quarantine_entries: opts.quarantine_max_entries,
                ledger: Mutex::new(
                    QuarantineLedger::scan(&root.join("quarantine"))
                        .map_err(at(&root.join("quarantine")))?,
                ),
                quarantine_scans: std::sync::atomic::AtomicU64::new(1),
                max_uncompressed: opts.max_uncompressed,
                resumes,
                group: GroupCommit::default(),
                _lock: lock,
            }),
        };
        store.repair(opts.max_uncompressed)?;
        // Loading and repairing a large index leaves freed buffers behind; give them back.
        cis490_common::memory::release_free_memory();
        Ok(store)
    }

    /// What `check-config` does: the store (or, before the first start, its parent) is a
    /// writable directory. Nothing is created or changed: a receiver may be serving from it, and
    /// a check run as root must not leave root-owned directories behind.
    pub fn check(root: &Path) -> Result<(), StoreError> {
        let target = if root.exists() {
            root
        } else {
            root.parent()
                .filter(|p| !p.as_os_str().is_empty())
                .unwrap_or(Path::new("."))
        };
        if !target.is_dir() {
            return Err(StoreError::Io {
                path: target.to_path_buf(),
                source: io::Error::new(io::ErrorKind::NotFound, "not a directory"),
            });
        }
        nix::unistd::access(
            target,
            nix::unistd::AccessFlags::W_OK | nix::unistd::AccessFlags::X_OK,
        )
        .map_err(|e| StoreError::Io {
            path: target.to_path_buf(),
            source: io::Error::from(e),
        })
    }

    pub fn root(&self) -> &Path {
        &self.inner.root
    }

    fn rows_read(&self) -> std::sync::RwLockReadGuard<'_, Slots> {
        // Invariant: rows are inserted only after their line is durable and no code panics
        // while holding the lock, so a poisoned lock still guards consistent data.
        self.inner.rows.read().unwrap_or_else(|p| p.into_inner())
    }

    fn rows_write(&self) -> std::sync::RwLockWriteGuard<'_, Slots> {
        self.inner.rows.write().unwrap_or_else(|p| p.into_inner())
    }

    fn writer(&self) -> MutexGuard<'_, File> {
        self.inner.writer.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Appends a row durably and records where it is; on failure the index is cut back so no
    /// torn line stays behind.
    fn append_row(&self, w: &mut File, row: &IndexRow) -> io::Result<()> {
        let line = serde_json::to_string(row).map_err(io::Error::other)?;
        let len =
            u32::try_from(line.len()).map_err(|_| io::Error::other("index row over 4 GiB"))?;
        let before = w.metadata()?.len();
        if let Err(e) = durable::append_line(w, &line) {
            let _ = w.set_len(before);
            let _ = w.sync_all();
            return Err(e);
        }
        self.rows_write().insert(
            &row.host_id,
            &row.episode_id,
            Slot {
                offset: before,
                len,
            },
        );
        Ok(())
    }

    /// The stored row of an id, read back from `index.jsonl`.
    pub fn lookup(&self, host_id: &str, episode_id: &str) -> io::Result<Option<IndexRow>> {
        let Some(slot) = self.rows_read().get(host_id, episode_id) else {
            return Ok(None);
        };
        let mut buf = vec![0; slot.len as usize];
        std::os::unix::fs::FileExt::read_exact_at(&self.inner.reader, &mut buf, slot.offset)?;
        let row: IndexRow = serde_json::from_slice(&buf).map_err(|e| {
            io::Error::other(format!(
                "index.jsonl at byte {}: unreadable row: {e}",
                slot.offset
            ))
        })?;
        Ok(Some(row))
    }

    /// The stored row of an id whose body is still on disk with the indexed length (SPEC §15:
    /// the disk wins over the index). A row whose body is gone or has another length is
    /// logged as `stored_missing` and answered as no row, so the episode can be stored again.
    pub fn lookup_intact(&self, host_id: &str, episode_id: &str) -> io::Result<Option<IndexRow>> {
        let Some(row) = self.lookup(host_id, episode_id)? else {
            return Ok(None);
        };
        let found = match fs::metadata(self.inner.root.join(&row.path)) {
            Ok(m) if m.len() == row.bytes => return Ok(Some(row)),
            Ok(m) => Some(m.len()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(e),
        };
        tracing::error!(
            event = "stored_missing",
            host_id = %host_id,
            episode = %episode_id,
            found_bytes = ?found,
            indexed_bytes = row.bytes,
            path = %row.path,
            "an indexed episode's body is not in the store as indexed; it will be stored again when its host sends it"
        );
        Ok(None)
    }

    /// Adds index rows for stored files that have none (a crash between link and append).
    /// On a large store this reads every such file, so systemd's start timeout is extended.
    fn repair(&self, max_uncompressed: u64) -> Result<(), StoreError> {
        // One host directory at a time, so a store of millions of episodes never has them all
        // listed in memory at once.
        let index_path = self.inner.root.join("index.jsonl");
        let mut w = self.writer();
        let mut last_extend: Option<std::time::Instant> = None;
        let mut hosts_seen = std::collections::HashSet::new();
        for (host, hp) in stored_hosts(&self.inner.root)? {
            let eps = stored_in(&hp)?;
            if let Some(m) = self.rows_write().0.get_mut(host.as_str()) {
                m.retain(|ep, _| {
                    let keep = eps.binary_search_by(|e| e.as_str().cmp(ep)).is_ok();
                    if !keep {
                        tracing::warn!(host = %host, episode = %ep, "index row names a file that is gone; ignoring it");
                    }
                    keep
                });
            }
            for ep in eps {
                if self.rows_read().contains(&host, &ep) {
                    continue;
                }
                if last_extend.is_none_or(|t| t.elapsed() >= std::time::Duration::from_secs(10)) {
                    cis490_common::notify::extend_timeout(std::time::Duration::from_secs(30));
                    last_extend = Some(std::time::Instant::now());
                }
                let path = hp.join(format!("{ep}.tar.zst"));
                match row_for_file(&self.inner.root, &host, &ep, &path, max_uncompressed, None) {
                    Ok(row) => {
                        self.append_row(&mut w, &row).map_err(at(&index_path))?;
                        tracing::warn!(host = %host, episode = %ep, "added the missing index row of a stored episode");
                    }
                    Err(e) => {
                        tracing::error!(path = %path.display(), error = %e, "stored file cannot be summarised; leaving it out of the index");
                    }
                }
            }
            hosts_seen.insert(host);
        }
        self.rows_write().0.retain(|host, eps| {
            let keep = hosts_seen.contains(host.as_ref());
            if !keep {
                tracing::warn!(host = %host, rows = eps.len(), "index rows name a host directory that is gone; ignoring them");
            }
            keep
        });
        Ok(())
    }
}

/// Takes the store's lock, or says that another receiver holds it.
fn lock_store(root: &Path) -> Result<cis490_common::lock::DirLock, StoreError> {
    match cis490_common::lock::try_exclusive(root) {
        Ok(Some(l)) => Ok(l),
        Ok(None) => Err(StoreError::Io {
            path: root.to_path_buf(),
            source: io::Error::new(
                io::ErrorKind::WouldBlock,
                "the store is in use by another cis490-receiver (serve or reindex); stop it first",
            ),
        }),
        Err(e) => Err(StoreError::Io {
            path: root.join(".lock"),
            source: e,
        }),
    }
}

/// Reads `index.jsonl` row by row (streamed: the file may be gigabytes), giving each parsed row
/// and where its line is; a torn last line (crash mid-append) is cut off so appends stay aligned.
fn scan_index(path: &Path, mut each: impl FnMut(IndexRow, Slot)) -> io::Result<()> {
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    let mut r = io::BufReader::with_capacity(1 << 20, file);
    let mut line = Vec::with_capacity(512);
    let (mut offset, mut n) = (0u64, 0usize);
    loop {
        line.clear();
        let got = r.read_until(b'\n', &mut line)?;
        if got == 0 {
            return Ok(());
        }
        if line.last() != Some(&b'\n') {
            tracing::warn!(path = %path.display(), bytes = got, "cutting a torn last line off the index");
            let f = fs::OpenOptions::new().write(true).open(path)?;
            f.set_len(offset)?;
            f.sync_all()?;
            return Ok(());
        }
        n += 1;
        let body = &line[..line.len() - 1];
        if !body.iter().all(u8::is_ascii_whitespace) {
            match serde_json::from_slice::<IndexRow>(body) {
                Ok(row) => match u32::try_from(body.len()) {
                    Ok(len) => each(row, Slot { offset, len }),
                    Err(_) => {
                        tracing::warn!(path = %path.display(), line = n, "skipping an index row over 4 GiB")
                    }
                },
                Err(e) => {
                    tracing::warn!(path = %path.display(), line = n, error = %e, "skipping an unreadable index row")
                }
            }
        }
        offset += got as u64;
    }
}

/// Every `episodes/<host>/<id>.tar.zst` in the store, sorted.
pub fn list_stored(root: &Path) -> Result<Vec<(String, String, PathBuf)>, StoreError> {
    let mut out = Vec::new();
    for (host, hp) in stored_hosts(root)? {
        for ep in stored_in(&hp)? {
            let path = hp.join(format!("{ep}.tar.zst"));
            out.push((host.clone(), ep, path));
        }
    }
    out.sort();
    Ok(out)
}

/// The host directories under `episodes/`.
fn stored_hosts(root: &Path) -> Result<Vec<(String, PathBuf)>, StoreError> {
    let episodes = root.join("episodes");
    let mut out = Vec::new();
    for host in fs::read_dir(&episodes).map_err(at(&episodes))? {
        let host = host.map_err(at(&episodes))?;
        if host.file_type().map_err(at(&episodes))?.is_dir() {
            out.push((host.file_name().to_string_lossy().into_owned(), host.path()));
        }
    }
    out.sort();
    Ok(out)
}

/// The episode ids stored in one host directory, sorted.
fn stored_in(hp: &Path) -> Result<Vec<String>, StoreError> {
    let mut out = Vec::new();
    for f in fs::read_dir(hp).map_err(at(hp))? {
        let f = f.map_err(at(hp))?;
        let name = f.file_name();
        let Some(ep) = name.to_str().and_then(|n| n.strip_suffix(".tar.zst")) else {
            continue;
        };
        if cis490_common::validate_id(ep).is_ok() && f.file_type().map_err(at(hp))?.is_file() {
            out.push(ep.to_string());
        }
    }
    out.sort();
    Ok(out)
}

fn row_for_file(
    root: &Path,
    host: &str,
    ep: &str,
    path: &Path,
    max_uncompressed: u64,
    ts: Option<String>,
) -> Result<IndexRow, ingest::Rejection> {
    let v = ingest::summarize_file(path, ep, max_uncompressed)?;
    let ts = ts.unwrap_or_else(|| {
        fs::metadata(path)
            .and_then(|m| m.modified())
            .map(timefmt::rfc3339)
            .unwrap_or_else(|_| timefmt::now_rfc3339())
    });
    Ok(IndexRow::new(
        host,
        ep,
        rel_path(root, path),
        v.compressed_bytes,
        &v,
        ts,
    ))
}

fn rel_path(root: &Path, path: &Path) -> String {
    path.strip_prefix(root)
        .unwrap_or(path)
        .to_string_lossy()
        .into_owned()
}

/// Rebuilds `index.jsonl` from the files under `episodes/`, keeping known `ts` values.
pub(crate) fn reindex(root: &Path, max_uncompressed: u64) -> anyhow::Result<(usize, usize)> {
    // A serving receiver appends to the index it holds open: never replace it under its feet.
    let _lock = lock_store(root)?;
    let index_path = root.join("index.jsonl");
    let mut old: HashMap<Key, String> = HashMap::new();
    scan_index(&index_path, |row, _| {
        old.insert((row.host_id, row.episode_id), row.ts);
    })?;
    let mut out = String::new();
    let (mut ok, mut bad) = (0, 0);
    for (host, ep, path) in list_stored(root)? {
        let ts = old.remove(&(host.clone(), ep.clone()));
        match row_for_file(root, &host, &ep, &path, max_uncompressed, ts) {
            Ok(row) => {
                out.push_str(&serde_json::to_string(&row)?);
                out.push('\n');
                ok += 1;
            }
            Err(e) => {
                eprintln!("{}: skipped: {e}", path.display());
                bad += 1;
            }
        }
    }
    durable::write_atomic(&index_path, out.as_bytes())?;
    Ok((ok, bad))
}

struct FsUpload {
    store: FsStore,
    host_id: String,
    episode_id: String,
    file: Target,
}

/// Where an upload's body is written: a temp file under `tmp/`, or, for a body long enough to
/// be worth a resume, its part file under `resume/`.
pub(crate) enum Target {
    Temp(DurableFile),
    Part(PartFile),
}

impl Target {
    fn sync(&mut self) -> io::Result<()> {
        match self {
            Target::Temp(f) => f.sync(),
            Target::Part(f) => f.sync(),
        }
    }

    /// Links the durable body at `dest`; the directory fsync is the group's (group.rs).
    fn place(self, dest: &Path, existing: Existing) -> io::Result<()> {
        match self {
            Target::Temp(f) => f.place(dest, existing),
            Target::Part(f) => f.place(dest, existing),
        }
    }

    fn commit(self, dest: &Path, existing: Existing) -> io::Result<()> {
        match self {
            Target::Temp(f) => f.commit(dest, existing),
            Target::Part(f) => f.commit(dest, existing),
        }
    }
}

impl Flush for FsInner {
    fn fsync_dir(&self, dir: &Path) -> io::Result<()> {
        durable::fsync_dir(dir)
    }

    /// One write and one `fdatasync` for the whole group; on failure the index is cut back to
    /// where it was, so no row of the group stays (nor a torn line).
    fn append_rows(&self, rows: &[&IndexRow]) -> io::Result<()> {
        let mut lines = Vec::with_capacity(rows.len());
        let mut buf = Vec::new();
        for row in rows {
            let line = serde_json::to_string(row).map_err(io::Error::other)?;
            let len =
                u32::try_from(line.len()).map_err(|_| io::Error::other("index row over 4 GiB"))?;
            lines.push((buf.len() as u64, len));
            buf.extend_from_slice(line.as_bytes());
            buf.push(b'\n');
        }
        let mut w = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        let before = w.metadata()?.len();
        if let Err(e) = w.write_all(&buf).and_then(|()| w.sync_data()) {
            let _ = w.set_len(before);
            let _ = w.sync_all();
            return Err(e);
        }
        let mut slots = self.rows.write().unwrap_or_else(|p| p.into_inner());
        for (row, (at, len)) in rows.iter().zip(lines) {
            slots.insert(
                &row.host_id,
                &row.episode_id,
                Slot {
                    offset: before + at,
                    len,
                },
            );
        }
        Ok(())
    }

    fn unlink(&self, dest: &Path) {
        let _ = fs::remove_file(dest);
        if let Some(dir) = dest.parent() {
            let _ = durable::fsync_dir(dir);
        }
    }
}

impl Write for FsUpload {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match &mut self.file {
            Target::Temp(f) => f.write(buf),
            Target::Part(f) => f.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match &mut self.file {
            Target::Temp(f) => f.flush(),
            Target::Part(f) => f.flush(),
        }
    }
}

impl Upload for FsUpload {
    fn can_read_back(&self) -> bool {
        true
    }

    /// The temp or part file, opened again for reading (its own offset; what was just written
    /// is in the page cache, so this costs no disk read). Unbuffered: the decoder reading it
    /// has its own buffer.
    fn stored_body(&mut self) -> io::Result<Box<dyn io::Read + Send>> {
        let file = match &mut self.file {
            Target::Temp(f) => {
                f.flush()?;
                File::open(f.temp_path())?
            }
            Target::Part(f) => f.read_back()?,
        };
        Ok(Box::new(file))
    }

    fn commit(self: Box<Self>, v: &Validated) -> io::Result<CommitOutcome> {
        let FsUpload {
            store,
            host_id,
            episode_id,
            mut file,
        } = *self;
        // The data fsync is the slow part: do it before taking the index lock.
        file.sync()?;
        let root = &store.inner.root;
        let host_dir = root.join("episodes").join(&host_id);
        durable::create_dir_durable(&host_dir)?;
        let dest = host_dir.join(format!("{episode_id}.tar.zst"));
        let group = &store.inner.group;
        let mut w = store.writer();
        // A row of this id still on its way to the disk is decided first: its file is already
        // linked at `dest`, and the outcome (stored, or unlinked by a failed flush) decides
        // what this upload is.
        while group.is_pending(&host_id, &episode_id) {
            drop(w);
            group.wait_settled(&host_id, &episode_id);
            w = store.writer();
        }
        if let Some(row) = store.lookup_intact(&host_id, &episode_id)? {
            return Ok(judge(&row, v));
        }
        // An indexed body that is gone or cut short is replaced; its new row comes last in
        // the index and wins (SPEC §15).
        let existing = if store.lookup(&host_id, &episode_id)?.is_some() {
            Existing::Replace
        } else {
            Existing::Keep
        };
        // Linked now; durable with its group's flush, which fsyncs the directory before it
        // writes the row (group.rs): a crash can leave a stored file without a row, which
        // start-up repair indexes, never a row without a file.
        match file.place(&dest, existing) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                // A stored file without an index row (an append that failed, or a file start-up
                // repair could not read): judge against what is on disk and index it.
                let existing = row_for_file(
                    root,
                    &host_id,
                    &episode_id,
                    &dest,
                    store.inner.max_uncompressed,
                    None,
                )
                .map_err(|r| {
                    io::Error::other(format!("{} exists but cannot be read: {r}", dest.display()))
                })?;
                store.append_row(&mut w, &existing)?;
                return Ok(judge(&existing, v));
            }
            Err(e) => return Err(e),
        }
        let row = IndexRow::new(
            &host_id,
            &episode_id,
            rel_path(root, &dest),
            v.compressed_bytes,
            v,
            timefmt::now_rfc3339(),
        );
        let ticket = group.enqueue(row.clone(), dest);
        drop(w);
        // No row, no file when the group fails: the client gets an error (507 when the disk
        // is full) and retries.
        group.wait(&ticket, &*store.inner)?;
        Ok(CommitOutcome::Stored(row))
    }

    fn quarantine(self: Box<Self>, note: &QuarantineNote) -> io::Result<()> {
        let FsUpload { store, file, .. } = *self;
        let qdir = store.inner.root.join("quarantine");
        let stamp = humantime::format_rfc3339_seconds(SystemTime::now())
            .to_string()
            .replace([':', '-'], "");
        let base = format!(
            "{stamp}-{}-{}-{}",
            note.host_id,
            note.episode_id,
            rand::random::<u32>()
        );
        let body = qdir.join(format!("{base}.tar.zst"));
        file.commit(&body, Existing::Keep)?;
        let json = serde_json::to_vec_pretty(note).map_err(io::Error::other)?;
        durable::write_atomic(&qdir.join(format!("{base}.reason.json")), &json)?;
        let len = fs::metadata(&body).map(|m| m.len()).unwrap_or(0);
        store
            .inner
            .ledger
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .add(SystemTime::now(), len + json.len() as u64, base);
        // Enforced here, not by the caller: `max_bytes` holds even if the request is gone. The
        // entry is kept whatever the trim does, so its errors are only logged.
        if let Err(e) = store.clean_quarantine() {
            tracing::warn!(error = %e, "failed to trim the receiver quarantine");
        }
        Ok(())
    }
}

fn judge(row: &IndexRow, v: &Validated) -> CommitOutcome {
    if row.tar_sha256 == v.tar_sha256 {
        CommitOutcome::AlreadyStored(row.clone())
    } else {
        CommitOutcome::Conflict(row.clone())
    }
}

impl FsStore {
    /// Listings of the quarantine directory so far (for `/metrics`).
    pub(crate) fn quarantine_scans(&self) -> u64 {
        self.inner
            .quarantine_scans
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    pub(crate) fn get(&self, host_id: &str, episode_id: &str) -> io::Result<Option<IndexRow>> {
        self.lookup(host_id, episode_id)
    }

    /// The `resume/` directory, for `check` offers and resumed uploads.
    /// What the group commit has done since start.
    pub(crate) fn group_counts(&self) -> super::group::Counts {
        self.inner.group.counts()
    }

    pub(crate) fn resumes(&self) -> &Resumes {
        &self.inner.resumes
    }

    /// Opens an upload into `part` (a resumable one) or a new temp file under `tmp/`.
    pub(crate) fn begin(
        &self,
        host_id: &str,
        episode_id: &str,
        part: Option<PartFile>,
    ) -> io::Result<Box<dyn Upload>> {
        let file = match part {
            Some(p) => Target::Part(p),
            None => Target::Temp(DurableFile::create_in(
                &self.inner.root.join("tmp"),
                "upload",
            )?),
        };
        Ok(Box::new(FsUpload {
            store: self.clone(),
            host_id: host_id.to_string(),
            episode_id: episode_id.to_string(),
            file,
        }))
    }

    pub(crate) fn free_bytes(&self) -> Option<u64> {
        let st = nix::sys::statvfs::statvfs(&self.inner.root).ok()?;
        Some(st.blocks_available() as u64 * st.fragment_size() as u64)
    }

    pub(crate) fn probe_writable(&self) -> io::Result<()> {
        let mut f = DurableFile::create_in(&self.inner.root.join("tmp"), "healthz")?;
        f.write_all(b"ok")?;
        drop(f);
        Ok(())
    }

    pub(crate) fn clean_quarantine(&self) -> io::Result<u64> {
        let qdir = self.inner.root.join("quarantine");
        // Invariant: the ledger is only ever left consistent, so a poisoned lock is still good.
        let mut ledger = self.inner.ledger.lock().unwrap_or_else(|p| p.into_inner());
        if ledger.scanned.elapsed() >= LEDGER_RESCAN {
            // Entries removed or added by hand are picked up here, not per rejection.
            *ledger = QuarantineLedger::scan(&qdir)?;
            self.inner
                .quarantine_scans
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        ledger.trim(
            &qdir,
            self.inner.keep_days,
            self.inner.max_quarantine_bytes,
            self.inner.max_quarantine_entries,
        );
        Ok(ledger.bytes)
    }
}

/// How often the ledger is rebuilt from the directory (entries changed by hand).
const LEDGER_RESCAN: Duration = Duration::from_secs(3600);

/// The receiver quarantine's entries, oldest first, and their total size.
#[derive(Debug)]
struct QuarantineLedger {
    entries: std::collections::VecDeque<(SystemTime, u64, String)>,
    bytes: u64,
    scanned: std::time::Instant,
}

impl QuarantineLedger {
    fn scan(qdir: &Path) -> io::Result<QuarantineLedger> {
        let mut items: BTreeMap<String, (SystemTime, u64)> = BTreeMap::new();
        for e in fs::read_dir(qdir)? {
            let e = e?;
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(base) = name
                .strip_suffix(".tar.zst")
                .or_else(|| name.strip_suffix(".reason.json"))
            else {
                continue;
            };
            // Another trim may remove entries while this one lists them.
            let md = match e.metadata() {
                Ok(md) => md,
                Err(err) if err.kind() == io::ErrorKind::NotFound => continue,
                Err(err) => return Err(err),
            };
            let item = items.entry(base.to_string()).or_insert((md.modified()?, 0));
            item.0 = item.0.min(md.modified()?);
            item.1 += md.len();
        }
        let mut entries: Vec<_> = items.into_iter().map(|(b, (t, l))| (t, l, b)).collect();
        entries.sort();
        let bytes = entries.iter().map(|e| e.1).sum();
        Ok(QuarantineLedger {
            entries: entries.into(),
            bytes,
            scanned: std::time::Instant::now(),
        })
    }

    fn add(&mut self, at: SystemTime, len: u64, base: String) {
        self.bytes += len;
        self.entries.push_back((at, len, base));
    }

    /// Drops expired entries, then the oldest until under `max_bytes` and `max_entries`
    /// (0 = that limit off). Costs one step per entry removed.
    fn trim(&mut self, qdir: &Path, keep_days: u64, max_bytes: u64, max_entries: u64) {
        let keep = Duration::from_secs(keep_days * 86_400);
        let now = SystemTime::now();
        while let Some((at, len, base)) = self.entries.front() {
            let expired = keep_days > 0 && now.duration_since(*at).unwrap_or_default() > keep;
            let over_bytes = max_bytes > 0 && self.bytes > max_bytes;
            let over_count = max_entries > 0 && self.entries.len() as u64 > max_entries;
            if !(expired || over_bytes || over_count) {
                break;
            }
            let _ = fs::remove_file(qdir.join(format!("{base}.tar.zst")));
            let _ = fs::remove_file(qdir.join(format!("{base}.reason.json")));
            let why = if expired {
                "expired"
            } else if over_bytes {
                "max_bytes"
            } else {
                "max_entries"
            };
            tracing::info!(event = "cleanup", file = %base, bytes = *len, why, "removed a receiver quarantine entry");
            self.bytes -= len;
            self.entries.pop_front();
        }
    }
}

/// Writes every row of `index.jsonl` to `out`, one JSON object per line, in stored order.
pub(crate) fn export_index(root: &Path, out: &mut (dyn Write + Send)) -> anyhow::Result<()> {
    let path = root.join("index.jsonl");
    let text = match fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(anyhow::anyhow!("failed to read {}: {e}", path.display())),
    };
    // An id stored again (its body had gone missing) has several rows: the last one wins
    // (SPEC §15), written where it stands in the file.
    for (line, _) in super::scrub::last_rows(&text) {
        writeln!(out, "{line}")?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ingest::{validate, Expect};
    use cis490_common::Commit;

    const C: &str = "0123456789abcdef0123456789abcdef01234567";

    fn body(extra: &[u8]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        let meta = format!(r#"{{"code_version":{{"commit":"{C}"}}}}"#);
        for (name, data) in [("ep/meta.json", meta.as_bytes()), ("ep/x", extra)] {
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            b.append_data(&mut h, name, data).unwrap();
        }
        zstd::encode_all(&b.into_inner().unwrap()[..], 3).unwrap()
    }

    fn opts() -> FsOptions {
        FsOptions {
            max_uncompressed: 1 << 30,
            quarantine_keep_days: 30,
            quarantine_max_bytes: 0,
            quarantine_max_entries: 0,
            resume_keep_s: 86400,
            resume_max_bytes: 1 << 30,
        }
    }

    fn upload(store: &FsStore, bytes: &[u8]) -> io::Result<CommitOutcome> {
        let mut up = store.begin("h", "ep", None)?;
        let v = validate(
            bytes,
            &mut up,
            &Expect {
                commit: Some(Commit::parse(C).unwrap()),
                ..Expect::new("ep", 1 << 30)
            },
        )
        .unwrap();
        up.commit(&v)
    }

    fn upload_as(store: &FsStore, host: &str, bytes: &[u8]) -> io::Result<CommitOutcome> {
        let mut up = store.begin(host, "ep", None)?;
        let v = validate(
            bytes,
            &mut up,
            &Expect {
                commit: Some(Commit::parse(C).unwrap()),
                ..Expect::new("ep", 1 << 30)
            },
        )
        .unwrap();
        up.commit(&v)
    }

    /// Concurrent commits through the group commit (issue 21): many hosts at once are all
    /// stored, each with one row that survives a reopen; one id uploaded many times at once is
    /// stored once, and every other upload of it is judged against that row (200 or 409),
    /// never indexed twice.
    #[test]
    fn concurrent_commits_are_grouped_and_one_id_is_stored_once() {
        let d = tempfile::tempdir().unwrap();
        let store = FsStore::open(d.path(), &opts()).unwrap();
        let b = body(b"same");
        let other = body(b"other");
        std::thread::scope(|s| {
            let mut hs = Vec::new();
            for i in 0..16 {
                let store = &store;
                hs.push(s.spawn(move || upload_as(store, &format!("h{i}"), &body(b"x"))));
            }
            for i in 0..12 {
                let (store, b, other) = (&store, &b, &other);
                hs.push(s.spawn(move || upload_as(store, "same", if i == 11 { other } else { b })));
            }
            let outcomes: Vec<CommitOutcome> =
                hs.into_iter().map(|h| h.join().unwrap().unwrap()).collect();
            let stored = |range: std::ops::Range<usize>| {
                outcomes[range]
                    .iter()
                    .filter(|o| matches!(o, CommitOutcome::Stored(_)))
                    .count()
            };
            assert_eq!(stored(0..16), 16);
            assert_eq!(stored(16..28), 1, "{:?}", &outcomes[16..]);
        });
        let text = std::fs::read_to_string(d.path().join("index.jsonl")).unwrap();
        assert_eq!(text.lines().count(), 17, "{text}");
        let g = store.group_counts();
        assert_eq!(g.rows, 17);
        assert!(g.groups <= 17 && g.dir_fsyncs <= 17, "{g:?}");
        drop(store);
        let store = FsStore::open(d.path(), &opts()).unwrap();
        for i in 0..16 {
            let row = store.get(&format!("h{i}"), "ep").unwrap().unwrap();
            assert_eq!(row.path, format!("episodes/h{i}/ep.tar.zst"));
        }
        let same = store.get("same", "ep").unwrap().unwrap();
        let on_disk = std::fs::read(d.path().join(&same.path)).unwrap();
        assert!(on_disk == b || on_disk == other);
        assert_eq!(
            std::fs::read_to_string(d.path().join("index.jsonl")).unwrap(),
            text
        );
    }

    #[test]
    fn a_stored_file_without_a_row_is_judged_and_indexed() {
        let d = tempfile::tempdir().unwrap();
        let store = FsStore::open(d.path(), &opts()).unwrap();
        // The file landed but its row did not (say, a full disk at the append).
        let a = body(b"first");
        std::fs::create_dir_all(d.path().join("episodes/h")).unwrap();
        std::fs::write(d.path().join("episodes/h/ep.tar.zst"), &a).unwrap();
        assert!(store.get("h", "ep").unwrap().is_none());
        match upload(&store, &a).unwrap() {
            CommitOutcome::AlreadyStored(row) => assert_eq!(row.episode_id, "ep"),
            other => panic!("{other:?}"),
        }
        assert!(store.get("h", "ep").unwrap().is_some(), "the row was added");
        assert!(matches!(
            upload(&store, &body(b"second")).unwrap(),
            CommitOutcome::Conflict(_)
        ));
        assert_eq!(
            std::fs::read(d.path().join("episodes/h/ep.tar.zst")).unwrap(),
            a
        );
        let rows = std::fs::read_to_string(d.path().join("index.jsonl")).unwrap();
        assert_eq!(rows.lines().count(), 1);
    }

    fn row(host: &str, ep: &str, bytes: u64) -> IndexRow {
        IndexRow {
            ts: "2026-11-28T12:00:00Z".into(),
            host_id: host.into(),
            episode_id: ep.into(),
            path: format!("episodes/{host}/{ep}.tar.zst"),
            bytes,
            tar_sha256: format!("{bytes:064x}"),
            uncompressed_bytes: bytes * 2,
            files: 2,
            commit: C.into(),
        }
    }

    /// Rows are read back from their place in index.jsonl: blank, unreadable and repeated
    /// lines, a host whose directory is gone and a torn last line must not shift any of them.
    #[test]
    fn rows_are_read_back_from_where_the_index_holds_them() {
        let d = tempfile::tempdir().unwrap();
        let mut text = String::new();
        let mut want = Vec::new();
        for i in 0..40u64 {
            let (host, ep) = (format!("h{}", i % 3), format!("ep-{i}"));
            std::fs::create_dir_all(d.path().join("episodes").join(&host)).unwrap();
            std::fs::write(d.path().join(format!("episodes/{host}/{ep}.tar.zst")), b"").unwrap();
            let r = row(&host, &ep, i);
            text.push_str(&serde_json::to_string(&r).unwrap());
            text.push('\n');
            match i % 7 {
                0 => text.push('\n'),
                1 => text.push_str("{not json\n"),
                _ => {}
            }
            want.push(r);
        }
        // A later row for the same id wins, as it did when the index was read whole.
        let newer = row("h1", "ep-1", 1000);
        text.push_str(&serde_json::to_string(&newer).unwrap());
        text.push('\n');
        want[1] = newer;
        // Rows of a host whose directory is gone are ignored; a torn last line is cut off.
        text.push_str(&serde_json::to_string(&row("gone", "x", 1)).unwrap());
        text.push_str("\n{\"ts\":\"2026");
        std::fs::write(d.path().join("index.jsonl"), &text).unwrap();
        // One stored file of a host that is still there disappears: its row is dropped.
        std::fs::remove_file(d.path().join("episodes/h2/ep-5.tar.zst")).unwrap();
        let gone = want.remove(5);
        let store = FsStore::open(d.path(), &opts()).unwrap();
        assert!(store
            .get(&gone.host_id, &gone.episode_id)
            .unwrap()
            .is_none());
        for r in &want {
            assert_eq!(
                store.get(&r.host_id, &r.episode_id).unwrap().as_ref(),
                Some(r)
            );
        }
        assert!(store.get("gone", "x").unwrap().is_none());
        assert!(store.get("h0", "ep-1").unwrap().is_none(), "ep-1 is h1's");
        let on_disk = std::fs::read_to_string(d.path().join("index.jsonl")).unwrap();
        assert!(on_disk.ends_with("}\n"), "the torn line was cut");
        // A row appended now is found at its place too.
        std::fs::create_dir_all(d.path().join("episodes/h")).unwrap();
        match upload(&store, &body(b"new")).unwrap() {
            CommitOutcome::Stored(r) => {
                assert_eq!(store.get("h", "ep").unwrap(), Some(r));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(store.get("h2", "ep-2").unwrap().as_ref(), Some(&want[2]));
        assert_eq!(
            store.get("h2", "ep-8").unwrap().as_ref(),
            want.iter().find(|r| r.episode_id == "ep-8")
        );
    }

    #[test]
    fn a_second_store_on_the_same_directory_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let _first = FsStore::open(d.path(), &opts()).unwrap();
        let err = FsStore::open(d.path(), &opts()).err().unwrap().to_string();
        assert!(err.contains("in use by another cis490-receiver"), "{err}");
        assert!(reindex(d.path(), 1 << 30).is_err());
    }
}
