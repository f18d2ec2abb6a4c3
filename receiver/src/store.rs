//! Durable episode storage behind a narrow interface (temp upload → validate → commit, lookup,
//! list), with the filesystem layout of SPEC §5 as its first implementation.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{self, BufRead, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use cis490_common::durable::{self, DurableFile, Existing};
use cis490_common::timefmt;
use serde::{Deserialize, Serialize};

use crate::ingest::{self, Validated};

/// One line of `index.jsonl` (SPEC §5).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IndexRow {
    pub ts: String,
    pub host_id: String,
    pub episode_id: String,
    pub path: String,
    pub bytes: u64,
    pub tar_sha256: String,
    pub uncompressed_bytes: u64,
    pub files: u64,
    pub commit: String,
}

/// How a commit attempt ended.
#[derive(Debug, Clone)]
pub enum CommitOutcome {
    Stored(IndexRow),
    /// Someone stored the same bytes first: the upload is discarded.
    AlreadyStored(IndexRow),
    /// Someone stored different bytes under this id: the upload is discarded.
    Conflict(IndexRow),
}

/// Why an upload was set aside, written beside it in the receiver's quarantine.
#[derive(Debug, Clone, Serialize)]
pub struct QuarantineNote {
    pub host_id: String,
    pub episode_id: String,
    pub commit: String,
    pub http_status: u16,
    pub error: String,
    pub message: String,
    pub quarantined_at: String,
}

/// An upload being written; dropped without `commit` or `quarantine`, it leaves nothing.
pub trait Upload: Write + Send {
    fn commit(self: Box<Self>, v: &Validated) -> io::Result<CommitOutcome>;
    fn quarantine(self: Box<Self>, note: &QuarantineNote) -> io::Result<()>;
}

/// What the HTTP layer needs from a store.
pub trait EpisodeStore: Send + Sync {
    fn get(&self, host_id: &str, episode_id: &str) -> Option<IndexRow>;
    fn begin(&self, host_id: &str, episode_id: &str) -> io::Result<Box<dyn Upload>>;
    /// Bytes free for new uploads, if the store can tell.
    fn free_bytes(&self) -> Option<u64>;
    /// Proves the store accepts writes right now (for `/healthz`).
    fn probe_writable(&self) -> io::Result<()>;
    fn rows(&self) -> Vec<IndexRow>;
    /// Applies quarantine retention; returns the bytes still held.
    fn clean_quarantine(&self) -> io::Result<u64>;
}

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

struct IndexState {
    file: File,
    rows: HashMap<Key, IndexRow>,
}

struct FsInner {
    root: PathBuf,
    index: Mutex<IndexState>,
    keep_days: u64,
    max_quarantine_bytes: u64,
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
}

impl FsStore {
    /// Opens the store: empties `tmp/`, loads the index, adds rows for stored files it lacks.
    pub fn open(root: &Path, opts: &FsOptions) -> Result<FsStore, StoreError> {
        for d in ["episodes", "quarantine", "tmp"] {
            let p = root.join(d);
            durable::create_dir_durable(&p).map_err(at(&p))?;
        }
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
        let index_path = root.join("index.jsonl");
        let rows = load_index(&index_path).map_err(at(&index_path))?;
        let file = durable::open_append(&index_path).map_err(at(&index_path))?;
        let store = FsStore {
            inner: Arc::new(FsInner {
                root: root.to_path_buf(),
                index: Mutex::new(IndexState { file, rows }),
                keep_days: opts.quarantine_keep_days,
                max_quarantine_bytes: opts.quarantine_max_bytes,
            }),
        };
        store.repair(opts.max_uncompressed)?;
        Ok(store)
    }

    pub fn root(&self) -> &Path {
        &self.inner.root
    }

    fn lock(&self) -> MutexGuard<'_, IndexState> {
        lock_index(&self.inner.index)
    }

    /// Adds index rows for stored files that have none (a crash between link and append).
    fn repair(&self, max_uncompressed: u64) -> Result<(), StoreError> {
        let stored = list_stored(&self.inner.root)?;
        let mut st = self.lock();
        let on_disk: std::collections::HashSet<Key> = stored
            .iter()
            .map(|(h, e, _)| (h.clone(), e.clone()))
            .collect();
        st.rows.retain(|k, row| {
            let keep = on_disk.contains(k);
            if !keep {
                tracing::warn!(host = %k.0, episode = %k.1, path = %row.path, "index row names a file that is gone; ignoring it");
            }
            keep
        });
        for (host, ep, path) in stored {
            if st.rows.contains_key(&(host.clone(), ep.clone())) {
                continue;
            }
            match row_for_file(&self.inner.root, &host, &ep, &path, max_uncompressed, None) {
                Ok(row) => {
                    let line = serde_json::to_string(&row).map_err(|e| StoreError::Io {
                        path: path.clone(),
                        source: io::Error::other(e),
                    })?;
                    let index_path = self.inner.root.join("index.jsonl");
                    durable::append_line(&mut st.file, &line).map_err(at(&index_path))?;
                    tracing::warn!(host = %host, episode = %ep, "added the missing index row of a stored episode");
                    st.rows.insert((host, ep), row);
                }
                Err(e) => {
                    tracing::error!(path = %path.display(), error = %e, "stored file cannot be summarised; leaving it out of the index");
                }
            }
        }
        Ok(())
    }
}

fn lock_index(m: &Mutex<IndexState>) -> MutexGuard<'_, IndexState> {
    // Invariant: rows are inserted only after their line is durable; a panic cannot leave the
    // map ahead of the file, so a poisoned lock still guards consistent state.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Reads `index.jsonl`; a torn last line (crash mid-append) is cut off so appends stay aligned.
fn load_index(path: &Path) -> io::Result<HashMap<Key, IndexRow>> {
    let mut rows = HashMap::new();
    let bytes = match fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(rows),
        Err(e) => return Err(e),
    };
    let good_len = bytes.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
    if good_len < bytes.len() {
        tracing::warn!(path = %path.display(), bytes = bytes.len() - good_len, "cutting a torn last line off the index");
        let f = fs::OpenOptions::new().write(true).open(path)?;
        f.set_len(good_len as u64)?;
        f.sync_all()?;
    }
    for (n, line) in bytes[..good_len].lines().enumerate() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str::<IndexRow>(&line) {
            Ok(row) => {
                rows.insert((row.host_id.clone(), row.episode_id.clone()), row);
            }
            Err(e) => {
                tracing::warn!(path = %path.display(), line = n + 1, error = %e, "skipping an unreadable index row")
            }
        }
    }
    Ok(rows)
}

/// Every `episodes/<host>/<id>.tar.zst` in the store.
pub fn list_stored(root: &Path) -> Result<Vec<(String, String, PathBuf)>, StoreError> {
    let mut out = Vec::new();
    let episodes = root.join("episodes");
    for host in fs::read_dir(&episodes).map_err(at(&episodes))? {
        let host = host.map_err(at(&episodes))?;
        if !host.file_type().map_err(at(&episodes))?.is_dir() {
            continue;
        }
        let host_name = host.file_name().to_string_lossy().into_owned();
        let hp = host.path();
        for f in fs::read_dir(&hp).map_err(at(&hp))? {
            let f = f.map_err(at(&hp))?;
            let name = f.file_name().to_string_lossy().into_owned();
            if let Some(ep) = name.strip_suffix(".tar.zst") {
                if cis490_common::validate_id(ep).is_ok()
                    && f.file_type().map_err(at(&hp))?.is_file()
                {
                    out.push((host_name.clone(), ep.to_string(), f.path()));
                }
            }
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
    Ok(IndexRow {
        ts,
        host_id: host.to_string(),
        episode_id: ep.to_string(),
        path: rel_path(root, path),
        bytes: v.compressed_bytes,
        tar_sha256: v.tar_sha256,
        uncompressed_bytes: v.uncompressed_bytes,
        files: v.files,
        commit: v.commit.to_string(),
    })
}

fn rel_path(root: &Path, path: &Path) -> String {
    path.strip_prefix(root)
        .unwrap_or(path)
        .to_string_lossy()
        .into_owned()
}

/// Rebuilds `index.jsonl` from the files under `episodes/`, keeping known `ts` values.
pub fn reindex(root: &Path, max_uncompressed: u64) -> anyhow::Result<(usize, usize)> {
    let index_path = root.join("index.jsonl");
    let old = load_index(&index_path)?;
    let mut out = String::new();
    let (mut ok, mut bad) = (0, 0);
    for (host, ep, path) in list_stored(root)? {
        let ts = old.get(&(host.clone(), ep.clone())).map(|r| r.ts.clone());
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
    file: DurableFile,
}

impl Write for FsUpload {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.file.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

impl Upload for FsUpload {
    fn commit(self: Box<Self>, v: &Validated) -> io::Result<CommitOutcome> {
        let FsUpload {
            store,
            host_id,
            episode_id,
            mut file,
        } = *self;
        // The data fsync is the slow part: do it before taking the index lock.
        file.file().sync_all()?;
        let root = &store.inner.root;
        let host_dir = root.join("episodes").join(&host_id);
        durable::create_dir_durable(&host_dir)?;
        let dest = host_dir.join(format!("{episode_id}.tar.zst"));
        let key = (host_id.clone(), episode_id.clone());
        let mut st = store.lock();
        if let Some(row) = st.rows.get(&key) {
            return Ok(if row.tar_sha256 == v.tar_sha256 {
                CommitOutcome::AlreadyStored(row.clone())
            } else {
                CommitOutcome::Conflict(row.clone())
            });
        }
        file.commit(&dest, Existing::Keep)?;
        let row = IndexRow {
            ts: timefmt::now_rfc3339(),
            host_id,
            episode_id,
            path: rel_path(root, &dest),
            bytes: v.compressed_bytes,
            tar_sha256: v.tar_sha256.clone(),
            uncompressed_bytes: v.uncompressed_bytes,
            files: v.files,
            commit: v.commit.to_string(),
        };
        let line = serde_json::to_string(&row).map_err(io::Error::other)?;
        durable::append_line(&mut st.file, &line)?;
        st.rows.insert(key, row.clone());
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
        file.commit(&qdir.join(format!("{base}.tar.zst")), Existing::Keep)?;
        let json = serde_json::to_vec_pretty(note).map_err(io::Error::other)?;
        durable::write_atomic(&qdir.join(format!("{base}.reason.json")), &json)?;
        Ok(())
    }
}

impl EpisodeStore for FsStore {
    fn get(&self, host_id: &str, episode_id: &str) -> Option<IndexRow> {
        self.lock()
            .rows
            .get(&(host_id.to_string(), episode_id.to_string()))
            .cloned()
    }

    fn begin(&self, host_id: &str, episode_id: &str) -> io::Result<Box<dyn Upload>> {
        let file = DurableFile::create_in(&self.inner.root.join("tmp"), "upload")?;
        Ok(Box::new(FsUpload {
            store: self.clone(),
            host_id: host_id.to_string(),
            episode_id: episode_id.to_string(),
            file,
        }))
    }

    fn free_bytes(&self) -> Option<u64> {
        let st = nix::sys::statvfs::statvfs(&self.inner.root).ok()?;
        Some(st.blocks_available() as u64 * st.fragment_size() as u64)
    }

    fn probe_writable(&self) -> io::Result<()> {
        let mut f = DurableFile::create_in(&self.inner.root.join("tmp"), "healthz")?;
        f.write_all(b"ok")?;
        drop(f);
        Ok(())
    }

    fn rows(&self) -> Vec<IndexRow> {
        let mut v: Vec<_> = self.lock().rows.values().cloned().collect();
        v.sort_by(|a, b| (&a.host_id, &a.episode_id).cmp(&(&b.host_id, &b.episode_id)));
        v
    }

    fn clean_quarantine(&self) -> io::Result<u64> {
        let qdir = self.inner.root.join("quarantine");
        let mut items = Vec::new();
        for e in fs::read_dir(&qdir)? {
            let e = e?;
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(base) = name.strip_suffix(".tar.zst") {
                let md = e.metadata()?;
                items.push((md.modified()?, md.len(), base.to_string()));
            }
        }
        items.sort();
        let remove = |base: &str| {
            let _ = fs::remove_file(qdir.join(format!("{base}.tar.zst")));
            let _ = fs::remove_file(qdir.join(format!("{base}.reason.json")));
        };
        let mut total: u64 = items.iter().map(|i| i.1).sum();
        let keep = Duration::from_secs(self.inner.keep_days * 86_400);
        let now = SystemTime::now();
        let mut kept = Vec::new();
        for (mtime, len, base) in items {
            let old =
                self.inner.keep_days > 0 && now.duration_since(mtime).unwrap_or_default() > keep;
            if old {
                remove(&base);
                total -= len;
                tracing::info!(event = "cleanup", file = %base, bytes = len, "removed an expired receiver quarantine entry");
            } else {
                kept.push((len, base));
            }
        }
        if self.inner.max_quarantine_bytes > 0 {
            for (len, base) in kept {
                if total <= self.inner.max_quarantine_bytes {
                    break;
                }
                remove(&base);
                total -= len;
                tracing::info!(event = "cleanup", file = %base, bytes = len, "removed the oldest receiver quarantine entry to stay under max_bytes");
            }
        }
        Ok(total)
    }
}

/// Writes every row of `index.jsonl` to `out`, one JSON object per line, in stored order.
pub fn export_index(root: &Path, out: &mut dyn Write) -> anyhow::Result<()> {
    let path = root.join("index.jsonl");
    let text = match fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(anyhow::anyhow!("failed to read {}: {e}", path.display())),
    };
    for line in text.lines() {
        if serde_json::from_str::<IndexRow>(line).is_ok() {
            writeln!(out, "{line}")?;
        }
    }
    Ok(())
}
