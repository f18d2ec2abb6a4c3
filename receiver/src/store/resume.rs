//! The received prefixes of interrupted uploads, kept so the shipper can send the rest
//! (SPEC §13), for the fs store: `resume/<host_id>/<episode_id>.<tar_sha256>.<length>.part`.
//!
//! An upload longer than [`MIN_KEPT`] is written straight into its part file instead of a temp
//! file under `tmp/`. It ends one of three ways: committed (the part file is moved into
//! `episodes/`), quarantined (moved into `quarantine/`), or interrupted: then the file stays if
//! more than [`MIN_KEPT`] bytes arrived, fsynced, and is removed otherwise. A resumed upload
//! re-reads the held prefix through the validator, so nothing about the prefix is trusted that
//! was not recomputed from the bytes on disk.

use std::collections::HashSet;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use cis490_common::durable::{self, Existing};
use sha2::{Digest, Sha256};

/// A prefix is kept once more than this many body bytes arrived (SPEC §13).
pub(crate) const MIN_KEPT: u64 = 8 << 20;
/// The held prefix is fsynced at least this often while an upload writes it (SPEC §13).
const SYNC_EVERY: u64 = 64 << 20;
/// Offers are rounded down to this boundary, so a prefix torn by a power cut in its last few
/// bytes is usually still usable after the prefix hash check.
const OFFER_ALIGN: u64 = 64 << 10;

/// One body of one episode, as a resume names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ResumeKey {
    pub(crate) host: String,
    pub(crate) episode: String,
    pub(crate) tar_sha256: String,
    /// The whole body's length.
    pub(crate) length: u64,
}

impl ResumeKey {
    fn file_name(&self) -> String {
        format!("{}.{}.{}.part", self.episode, self.tar_sha256, self.length)
    }
}

/// What the part file's name says, parsed from the right (episode ids may contain dots).
fn parse_part_name(name: &str) -> Option<(&str, &str, u64)> {
    let stem = name.strip_suffix(".part")?;
    let mut it = stem.rsplitn(3, '.');
    let length = it.next()?.parse().ok()?;
    let sha = it.next()?;
    let episode = it.next()?;
    (sha.len() == 64 && sha.bytes().all(|b| b.is_ascii_hexdigit()))
        .then_some((episode, sha, length))
}

/// The offset `check` offers for `held` bytes of a `length`-byte body: never the whole body
/// (a resumed `PUT` sends at least one byte), rounded down to [`OFFER_ALIGN`].
pub(crate) fn offer(held: u64, length: u64) -> u64 {
    let n = held.min(length.saturating_sub(1));
    n - n % OFFER_ALIGN
}

/// Why a resume cannot continue: the client should send from `offset` (SPEC §13 416).
#[derive(Debug)]
pub(crate) enum PartError {
    Unavailable { offset: u64, why: String },
    Io(io::Error),
}

impl From<io::Error> for PartError {
    fn from(e: io::Error) -> Self {
        PartError::Io(e)
    }
}

struct Shared {
    dir: PathBuf,
    keep: Duration,
    max_bytes: u64,
    /// Ids with a resumable upload running: one at a time, as the part file is shared.
    busy: Mutex<HashSet<(String, String)>>,
    resumed: AtomicU64,
}

/// The `resume/` directory of an fs store.
#[derive(Clone)]
pub(crate) struct Resumes(Arc<Shared>);

impl Resumes {
    /// Opens `dir` (creating it), dropping expired and over-budget prefixes.
    pub(crate) fn open(dir: &Path, keep_s: u64, max_bytes: u64) -> io::Result<Resumes> {
        durable::create_dir_durable(dir)?;
        let r = Resumes(Arc::new(Shared {
            dir: dir.to_path_buf(),
            keep: Duration::from_secs(keep_s),
            max_bytes,
            busy: Mutex::new(HashSet::new()),
            resumed: AtomicU64::new(0),
        }));
        r.clean()?;
        Ok(r)
    }

    fn path(&self, key: &ResumeKey) -> PathBuf {
        self.0.dir.join(&key.host).join(key.file_name())
    }

    /// `resume_max_bytes = 0` turns resumable uploads off: nothing is kept or offered.
    pub(crate) fn enabled(&self) -> bool {
        self.0.max_bytes > 0
    }

    /// Resumed uploads whose prefix was accepted, since start (for `/metrics`).
    pub(crate) fn resumed_total(&self) -> u64 {
        self.0.resumed.load(Ordering::Relaxed)
    }

    /// The offset `check` offers for this body (0: start from zero).
    pub(crate) fn offered(&self, key: &ResumeKey) -> u64 {
        match fs::metadata(self.path(key)) {
            Ok(m) if m.len() > 0 && !self.expired(&m) => offer(m.len(), key.length),
            _ => 0,
        }
    }

    /// Whether a prefix is past `resume_keep_s` (the janitor may not have run yet).
    fn expired(&self, m: &fs::Metadata) -> bool {
        m.modified()
            .ok()
            .and_then(|t| SystemTime::now().duration_since(t).ok())
            .is_some_and(|age| age > self.0.keep)
    }

    /// Reserves the id for one resumable upload; `None` while another one runs.
    pub(crate) fn claim(&self, key: &ResumeKey) -> Option<Claim> {
        let id = (key.host.clone(), key.episode.clone());
        let mut busy = self.0.busy.lock().unwrap_or_else(|p| p.into_inner());
        busy.insert(id.clone()).then(|| Claim {
            resumes: self.clone(),
            id,
        })
    }

    /// Opens the part file of `key` to be written from `start` (blocking). From 0 it is made
    /// anew, and other prefixes of the same id (another body) are dropped. From `start > 0`
    /// the held bytes `0..start` must hash to `prefix_sha256`; then the file is cut at `start`
    /// and a reader of that prefix is returned for the validator to read again.
    pub(crate) fn open_part(
        &self,
        key: &ResumeKey,
        start: u64,
        prefix_sha256: Option<&str>,
        claim: Claim,
    ) -> Result<(PartFile, Option<io::Take<File>>), PartError> {
        let host_dir = self.0.dir.join(&key.host);
        durable::create_dir_durable(&host_dir)?;
        let path = self.path(key);
        if start == 0 {
            self.drop_siblings(&host_dir, key);
            // A new prefix may grow past the budget: make room by the rule of `clean`.
            if let Err(e) = self.clean() {
                tracing::warn!(error = %e, "failed to drop old upload prefixes");
            }
            let file = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .open(&path)?;
            return Ok((PartFile::new(file, path, 0, claim), None));
        }
        let mut file = match OpenOptions::new().read(true).write(true).open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(PartError::Unavailable {
                offset: 0,
                why:
                    "the receiver holds no part of this body (expired, dropped, or never received)"
                        .into(),
            }),
            Err(e) => return Err(e.into()),
        };
        let meta = file.metadata()?;
        if self.expired(&meta) {
            drop(file);
            let _ = fs::remove_file(&path);
            return Err(PartError::Unavailable {
                offset: 0,
                why: "the held part of this body expired (limits.resume_keep_s)".into(),
            });
        }
        let held = meta.len();
        if held < start {
            return Err(PartError::Unavailable {
                offset: offer(held, key.length),
                why: format!("the receiver holds {held} bytes of this body, not {start}"),
            });
        }
        let got = hash_prefix(&mut file, start)?;
        if Some(got.as_str()) != prefix_sha256 {
            // Either side's copy differs (another compression of the same tar, or a damaged
            // held prefix): the held bytes are no use to anyone.
            drop(file);
            let _ = fs::remove_file(&path);
            tracing::warn!(
                host = %key.host,
                episode = %key.episode,
                offset = start,
                "the held prefix of an upload does not match the client's; dropped it"
            );
            return Err(PartError::Unavailable {
                offset: 0,
                why: format!(
                    "the SHA-256 of the held bytes 0..{start} differs from X-Cis490-Resume-Prefix-SHA256; send the whole body"
                ),
            });
        }
        file.set_len(start)?;
        file.seek(SeekFrom::Start(start))?;
        let mut prefix = File::open(&path)?;
        prefix.seek(SeekFrom::Start(0))?;
        self.0.resumed.fetch_add(1, Ordering::Relaxed);
        // The part file grows behind this reader as the new bytes arrive: read the prefix only.
        Ok((
            PartFile::new(file, path, start, claim),
            Some(prefix.take(start)),
        ))
    }

    /// Removes the prefixes of other bodies of `key`'s id: a new body replaces them.
    fn drop_siblings(&self, host_dir: &Path, key: &ResumeKey) {
        let Ok(entries) = fs::read_dir(host_dir) else {
            return;
        };
        let mine = key.file_name();
        for e in entries.flatten() {
            let name = e.file_name();
            let Some(name) = name.to_str() else { continue };
            if name == mine {
                continue;
            }
            if parse_part_name(name).is_some_and(|(ep, _, _)| ep == key.episode) {
                let _ = fs::remove_file(e.path());
            }
        }
    }

    /// Every held prefix with its size and age, oldest first.
    fn list(&self) -> io::Result<Vec<(SystemTime, u64, PathBuf)>> {
        let mut out = Vec::new();
        for host in fs::read_dir(&self.0.dir)? {
            let host = host?;
            if !host.file_type()?.is_dir() {
                continue;
            }
            for f in fs::read_dir(host.path())? {
                let f = f?;
                let m = f.metadata()?;
                if m.is_file() {
                    out.push((
                        m.modified().unwrap_or(SystemTime::UNIX_EPOCH),
                        m.len(),
                        f.path(),
                    ));
                }
            }
        }
        out.sort();
        Ok(out)
    }

    /// Bytes held for resumes (for `/metrics`).
    pub(crate) fn held_bytes(&self) -> u64 {
        self.list()
            .map(|l| l.iter().map(|(_, len, _)| len).sum())
            .unwrap_or(0)
    }

    /// Drops prefixes older than `resume_keep_s`, files that are not prefixes, and the oldest
    /// ones while more than `resume_max_bytes` are held. A prefix being written is skipped.
    pub(crate) fn clean(&self) -> io::Result<()> {
        let now = SystemTime::now();
        let busy: HashSet<(String, String)> = self
            .0
            .busy
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let mut kept = Vec::new();
        for (mtime, len, path) in self.list()? {
            let host = path
                .parent()
                .and_then(Path::file_name)
                .and_then(|h| h.to_str())
                .unwrap_or("");
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
            let Some((ep, _, _)) = parse_part_name(name) else {
                tracing::warn!(path = %path.display(), "removing a file that is not an upload prefix from resume/");
                let _ = fs::remove_file(&path);
                continue;
            };
            if busy.contains(&(host.to_string(), ep.to_string())) {
                continue;
            }
            let age = now.duration_since(mtime).unwrap_or_default();
            if age > self.0.keep {
                tracing::info!(path = %path.display(), bytes = len, age_s = age.as_secs(), "dropping an expired upload prefix");
                let _ = fs::remove_file(&path);
                continue;
            }
            kept.push((len, path));
        }
        let mut total: u64 = kept.iter().map(|(len, _)| len).sum();
        for (len, path) in kept {
            if total <= self.0.max_bytes {
                break;
            }
            tracing::info!(path = %path.display(), bytes = len, "dropping the oldest upload prefix (limits.resume_max_bytes)");
            let _ = fs::remove_file(&path);
            total -= len;
        }
        Ok(())
    }
}

/// SHA-256 of the first `n` bytes of `file`.
fn hash_prefix(file: &mut File, n: u64) -> io::Result<String> {
    file.seek(SeekFrom::Start(0))?;
    let mut h = Sha256::new();
    let mut r = io::BufReader::with_capacity(1 << 20, file.take(n));
    let copied = io::copy(&mut r, &mut HashWriter(&mut h))?;
    if copied < n {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "the held prefix shrank while it was read",
        ));
    }
    Ok(hex::encode(h.finalize()))
}

struct HashWriter<'a>(&'a mut Sha256);

impl Write for HashWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.update(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The id of a running resumable upload; released when dropped.
pub(crate) struct Claim {
    resumes: Resumes,
    id: (String, String),
}

impl Drop for Claim {
    fn drop(&mut self) {
        self.resumes
            .0
            .busy
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.id);
    }
}

/// The part file an upload writes. The validator re-reads a resumed upload's prefix and passes
/// it to this writer too: those first bytes are already in the file and are skipped.
pub(crate) struct PartFile {
    file: Option<File>,
    path: PathBuf,
    /// Bytes in the file.
    written: u64,
    /// Bytes known fsynced.
    synced: u64,
    /// Bytes still to skip (the held prefix coming round again through the validator).
    skip: u64,
    _claim: Claim,
}

impl PartFile {
    fn new(file: File, path: PathBuf, start: u64, claim: Claim) -> PartFile {
        PartFile {
            file: Some(file),
            path,
            written: start,
            synced: 0,
            skip: start,
            _claim: claim,
        }
    }

    fn file(&mut self) -> io::Result<&mut File> {
        self.file
            .as_mut()
            .ok_or_else(|| io::Error::other("the part file was already moved"))
    }

    /// Fsyncs what was written so far.
    pub(crate) fn sync(&mut self) -> io::Result<()> {
        self.file()?.sync_all()?;
        self.synced = self.written;
        Ok(())
    }

    /// Moves the whole body to `dest` durably (fsync of the data and of `dest`'s directory).
    pub(crate) fn commit(self, dest: &Path, existing: Existing) -> io::Result<()> {
        self.place(dest, existing)?;
        durable::fsync_dir(dest.parent().unwrap_or(Path::new(".")))
    }

    /// As `commit`, leaving the fsync of `dest`'s directory to the caller (the group commit).
    pub(crate) fn place(mut self, dest: &Path, existing: Existing) -> io::Result<()> {
        if self.synced < self.written || self.written == 0 {
            self.sync()?;
        }
        self.file = None;
        match existing {
            Existing::Replace => fs::rename(&self.path, dest)?,
            Existing::Keep => {
                fs::hard_link(&self.path, dest)?;
                fs::remove_file(&self.path)?;
            }
        }
        // Moved: nothing left for Drop to keep or remove.
        self.path = PathBuf::new();
        Ok(())
    }
}

impl PartFile {
    /// The part file, opened again for reading: the held prefix and everything written since.
    pub(crate) fn read_back(&mut self) -> io::Result<std::fs::File> {
        self.file()?.flush()?;
        std::fs::File::open(&self.path)
    }
}

impl Write for PartFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.skip > 0 {
            let n = (self.skip as usize).min(buf.len());
            self.skip -= n as u64;
            return Ok(n);
        }
        let n = self.file()?.write(buf)?;
        self.written += n as u64;
        if self.written - self.synced >= SYNC_EVERY {
            self.file()?.sync_data()?;
            self.synced = self.written;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for PartFile {
    /// An upload that neither committed nor was quarantined was interrupted: keep what arrived
    /// if it is worth a resume, durably, else remove it.
    fn drop(&mut self) {
        if self.path.as_os_str().is_empty() {
            return;
        }
        let keep = self.written > MIN_KEPT;
        if let Some(f) = self.file.take() {
            if keep {
                let kept = f.set_len(self.written).and_then(|()| f.sync_data());
                if kept.is_ok() {
                    tracing::info!(path = %self.path.display(), bytes = self.written, "kept the received part of an interrupted upload for a resume");
                    return;
                }
            }
        }
        let _ = fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_from_the_right() {
        let sha = "a".repeat(64);
        let name = format!("ep.with.dots.{sha}.12345.part");
        assert_eq!(
            parse_part_name(&name),
            Some(("ep.with.dots", sha.as_str(), 12345))
        );
        assert_eq!(parse_part_name("ep.zz.12.part"), None);
        assert_eq!(parse_part_name(&format!("ep.{sha}.12")), None);
    }

    #[test]
    fn offers_stay_below_the_body_and_on_the_boundary() {
        assert_eq!(offer(0, 100 << 20), 0);
        assert_eq!(offer((9 << 20) + 5, 100 << 20), 9 << 20);
        // All of it held: the last boundary below the end.
        assert_eq!(offer(10 << 20, 10 << 20), (10 << 20) - OFFER_ALIGN);
        assert_eq!(offer(20 << 20, 10 << 20), (10 << 20) - OFFER_ALIGN);
    }

    fn key(length: u64) -> ResumeKey {
        ResumeKey {
            host: "h1".into(),
            episode: "ep".into(),
            tar_sha256: "b".repeat(64),
            length,
        }
    }

    #[test]
    fn an_interrupted_part_is_kept_only_past_the_threshold() {
        let d = tempfile::tempdir().unwrap();
        let r = Resumes::open(d.path(), 3600, u64::MAX).unwrap();
        let k = key(32 << 20);
        let (mut p, _) = r.open_part(&k, 0, None, r.claim(&k).unwrap()).unwrap();
        p.write_all(&vec![1u8; 1 << 20]).unwrap();
        drop(p);
        assert_eq!(r.offered(&k), 0, "1 MiB is not kept");
        let (mut p, _) = r.open_part(&k, 0, None, r.claim(&k).unwrap()).unwrap();
        p.write_all(&vec![1u8; (9 << 20) + 7]).unwrap();
        assert!(r.claim(&k).is_none(), "one upload of an id at a time");
        drop(p);
        assert_eq!(r.offered(&k), 9 << 20);
        assert!(r.claim(&k).is_some(), "the claim ends with the upload");
    }

    #[test]
    fn a_resume_checks_the_prefix_hash_and_skips_the_prefix_when_written_again() {
        let d = tempfile::tempdir().unwrap();
        let r = Resumes::open(d.path(), 3600, u64::MAX).unwrap();
        let k = key(32 << 20);
        let body: Vec<u8> = (0..(12u32 << 20)).map(|i| (i % 251) as u8).collect();
        let (mut p, _) = r.open_part(&k, 0, None, r.claim(&k).unwrap()).unwrap();
        p.write_all(&body).unwrap();
        drop(p);
        let start = r.offered(&k);
        let good = hex::encode(Sha256::digest(&body[..start as usize]));
        let bad = hex::encode(Sha256::digest(b"other"));
        // Held less than asked: the receiver's own offer comes back.
        match r.open_part(
            &k,
            start + OFFER_ALIGN * 100,
            Some(&good),
            r.claim(&k).unwrap(),
        ) {
            Err(PartError::Unavailable { offset, .. }) => assert_eq!(offset, start),
            other => panic!("expected 416, got {:?}", other.map(|_| ())),
        }
        let (mut p, prefix) = r
            .open_part(&k, start, Some(&good), r.claim(&k).unwrap())
            .unwrap();
        let mut again = Vec::new();
        prefix.unwrap().read_to_end(&mut again).unwrap();
        assert_eq!(again, &body[..start as usize]);
        p.write_all(&again).unwrap();
        p.write_all(b"tail").unwrap();
        drop(p);
        let on_disk = fs::read(r.path(&k)).unwrap();
        assert_eq!(&on_disk[..start as usize], &body[..start as usize]);
        assert_eq!(&on_disk[start as usize..], b"tail");
        // A differing hash drops the prefix: from zero.
        match r.open_part(&k, start, Some(&bad), r.claim(&k).unwrap()) {
            Err(PartError::Unavailable { offset, .. }) => assert_eq!(offset, 0),
            other => panic!("expected 416, got {:?}", other.map(|_| ())),
        }
        assert!(!r.path(&k).exists());
        assert_eq!(r.resumed_total(), 1);
    }

    #[test]
    fn clean_drops_the_expired_the_oldest_over_budget_and_strangers() {
        let d = tempfile::tempdir().unwrap();
        let r = Resumes::open(d.path(), 3600, 20 << 20).unwrap();
        let mut keys = Vec::new();
        for (i, ep) in ["a", "b", "c"].iter().enumerate() {
            let k = ResumeKey {
                episode: ep.to_string(),
                ..key(64 << 20)
            };
            let (mut p, _) = r.open_part(&k, 0, None, r.claim(&k).unwrap()).unwrap();
            p.write_all(&vec![i as u8; 9 << 20]).unwrap();
            drop(p);
            let f = File::options().write(true).open(r.path(&k)).unwrap();
            f.set_modified(SystemTime::now() - Duration::from_secs(100 - i as u64 * 10))
                .unwrap();
            keys.push(k);
        }
        fs::write(d.path().join("h1").join("stray"), b"x").unwrap();
        r.clean().unwrap();
        assert!(!r.path(&keys[0]).exists(), "oldest dropped over the budget");
        assert!(r.path(&keys[1]).exists() && r.path(&keys[2]).exists());
        assert!(!d.path().join("h1").join("stray").exists());
        let r = Resumes::open(d.path(), 85, u64::MAX).unwrap();
        assert!(!r.path(&keys[1]).exists(), "90 s old, keep 85 s");
        assert!(r.path(&keys[2]).exists());
    }
}
