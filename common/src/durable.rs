//! The one durable-write path: temp file in the target's directory → write → fsync → rename (or
//! no-replace link) → fsync the directory. A guard removes the temp file on every error path.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Suffix of temp files made here; start-up sweeps may remove stray ones.
pub const TEMP_SUFFIX: &str = ".tmp";

static COUNTER: AtomicU64 = AtomicU64::new(0);

/// Fsyncs a directory so that a rename or link inside it survives a power cut.
pub fn fsync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

fn parent_of(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// What [`DurableFile::commit`] does when the destination already exists.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Existing {
    /// Atomically replace it (rename).
    Replace,
    /// Leave it and fail with `AlreadyExists` (hard link, then unlink the temp name).
    Keep,
}

/// A file being written under a temporary name; dropped without `commit`, it disappears.
#[derive(Debug)]
pub struct DurableFile {
    file: Option<File>,
    temp: PathBuf,
    /// Nothing written since the last [`DurableFile::sync`]: `commit` need not fsync again.
    synced: bool,
}

impl DurableFile {
    /// Creates `dir/<stem>.<pid>.<n>.tmp`; `dir` must be on the destination's filesystem.
    pub fn create_in(dir: &Path, stem: &str) -> io::Result<Self> {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let temp = dir.join(format!("{stem}.{}.{n}{TEMP_SUFFIX}", std::process::id()));
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&temp)?;
        Ok(DurableFile {
            file: Some(file),
            temp,
            synced: false,
        })
    }

    /// Creates the temp file at an exact path (e.g. `outbox/<id>.tar.zst.partial`), replacing a
    /// stale one left by a crash.
    pub fn create_at(temp: &Path) -> io::Result<Self> {
        let file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(temp)?;
        Ok(DurableFile {
            file: Some(file),
            temp: temp.to_path_buf(),
            synced: false,
        })
    }

    pub fn temp_path(&self) -> &Path {
        &self.temp
    }

    pub fn file(&mut self) -> &mut File {
        // Handing out the File may mean writes this type does not see.
        self.synced = false;
        self.file_ref()
    }

    fn file_ref(&mut self) -> &mut File {
        // Invariant: `file` is only taken by `commit`, which consumes self.
        self.file
            .as_mut()
            .expect("invariant: file present until commit")
    }

    /// Fsyncs what was written so far, ahead of `commit` (which then skips its own data fsync:
    /// every fsync is a disk cache flush, even one with nothing to write).
    pub fn sync(&mut self) -> io::Result<()> {
        self.file_ref().sync_all()?;
        self.synced = true;
        Ok(())
    }

    /// Fsyncs the data (unless [`DurableFile::sync`] already did and nothing was written since),
    /// moves it to `dest` and fsyncs `dest`'s directory.
    pub fn commit(self, dest: &Path, existing: Existing) -> io::Result<()> {
        self.place(dest, existing)?;
        fsync_dir(parent_of(dest))
    }

    /// As [`DurableFile::commit`] without the last step: the data is durable and `dest` names
    /// it, but the new name is durable only once the caller fsyncs `dest`'s directory (which
    /// lets it share one directory fsync between several files: the receiver's group commit).
    pub fn place(mut self, dest: &Path, existing: Existing) -> io::Result<()> {
        let file = self
            .file
            .take()
            .expect("invariant: file present until commit");
        let synced = self.synced;
        let result = (|| {
            if !synced {
                file.sync_all()?;
            }
            drop(file);
            match existing {
                Existing::Replace => fs::rename(&self.temp, dest)?,
                Existing::Keep => {
                    fs::hard_link(&self.temp, dest)?;
                    fs::remove_file(&self.temp)?;
                }
            }
            Ok(())
        })();
        if result.is_err() {
            let _ = fs::remove_file(&self.temp);
        }
        // Either moved or removed: nothing left for Drop to clean.
        self.temp = PathBuf::new();
        result
    }
}

impl Write for DurableFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.synced = false;
        self.file_ref().write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.file_ref().flush()
    }
}

impl Drop for DurableFile {
    fn drop(&mut self) {
        if !self.temp.as_os_str().is_empty() {
            let _ = fs::remove_file(&self.temp);
        }
    }
}

/// Writes `bytes` to `path` durably, replacing what was there.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    write_atomic_as(path, bytes, None)
}

/// [`write_atomic`] for secrets: the temp file is made owner-only (0600) before a byte is
/// written, so the key is never readable by others, not even for a moment.
pub fn write_atomic_private(path: &Path, bytes: &[u8]) -> io::Result<()> {
    write_atomic_as(path, bytes, Some(0o600))
}

fn write_atomic_as(path: &Path, bytes: &[u8], mode: Option<u32>) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let stem = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "file".into());
    let mut f = DurableFile::create_in(parent_of(path), &format!(".{stem}"))?;
    if let Some(mode) = mode {
        f.file().set_permissions(fs::Permissions::from_mode(mode))?;
    }
    f.write_all(bytes)?;
    f.commit(path, Existing::Replace)
}

/// Appends one line to an append-only log and fsyncs it before returning.
pub fn append_line(file: &mut File, line: &str) -> io::Result<()> {
    let mut buf = Vec::with_capacity(line.len() + 1);
    buf.extend_from_slice(line.as_bytes());
    buf.push(b'\n');
    file.write_all(&buf)?;
    file.sync_data()
}

/// Opens (creating if needed) an append-only file and fsyncs its directory when it is new.
pub fn open_append(path: &Path) -> io::Result<File> {
    let existed = path.exists();
    let f = OpenOptions::new().create(true).append(true).open(path)?;
    if !existed {
        f.sync_all()?;
        fsync_dir(parent_of(path))?;
    }
    Ok(f)
}

/// Creates a directory (and parents) and fsyncs the parent of every directory it created, so
/// each new entry is durable: a store_dir created on first start along with its subdirectories
/// survives a power cut whole, not only its innermost level.
pub fn create_dir_durable(dir: &Path) -> io::Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    let mut missing = Vec::new();
    let mut at = dir;
    while !at.as_os_str().is_empty() && fs::symlink_metadata(at).is_err() {
        missing.push(at);
        match at.parent() {
            Some(p) => at = p,
            None => break,
        }
    }
    fs::create_dir_all(dir)?;
    for d in missing {
        fsync_dir(parent_of(d))?;
    }
    Ok(())
}

/// Renames `from` to `to` (same filesystem) and fsyncs both parent directories.
pub fn rename_durable(from: &Path, to: &Path) -> io::Result<()> {
    fs::rename(from, to)?;
    let (a, b) = (parent_of(from), parent_of(to));
    fsync_dir(b)?;
    if a != b {
        fsync_dir(a)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_private_file_is_owner_only() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("x.key");
        write_atomic_private(&p, b"secret").unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"secret");
        assert_eq!(
            fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(fs::read_dir(d.path()).unwrap().count(), 1);
    }

    #[test]
    fn write_atomic_replaces_and_leaves_no_temp() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("x.json");
        write_atomic(&p, b"one").unwrap();
        write_atomic(&p, b"two").unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"two");
        assert_eq!(fs::read_dir(d.path()).unwrap().count(), 1);
    }

    #[test]
    fn keep_refuses_to_overwrite() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("a");
        fs::write(&p, b"first").unwrap();
        let mut f = DurableFile::create_in(d.path(), "a").unwrap();
        f.write_all(b"second").unwrap();
        let err = f.commit(&p, Existing::Keep).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AlreadyExists);
        assert_eq!(fs::read(&p).unwrap(), b"first");
        assert_eq!(fs::read_dir(d.path()).unwrap().count(), 1, "temp removed");
    }

    #[test]
    fn an_early_sync_is_forgotten_by_a_later_write() {
        let d = tempfile::tempdir().unwrap();
        let mut f = DurableFile::create_in(d.path(), "s").unwrap();
        f.write_all(b"one").unwrap();
        assert!(!f.synced);
        f.sync().unwrap();
        assert!(f.synced, "commit may skip its data fsync");
        f.write_all(b"two").unwrap();
        assert!(!f.synced, "bytes after the sync must be fsynced by commit");
        f.sync().unwrap();
        let _ = f.file();
        assert!(!f.synced, "the raw File may have been written");
        let p = d.path().join("s");
        f.commit(&p, Existing::Keep).unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"onetwo");
    }

    #[test]
    fn dropped_file_disappears() {
        let d = tempfile::tempdir().unwrap();
        let mut f = DurableFile::create_in(d.path(), "z").unwrap();
        f.write_all(b"partial").unwrap();
        let tmp = f.temp_path().to_path_buf();
        assert!(tmp.exists());
        drop(f);
        assert!(!tmp.exists());
    }

    #[test]
    fn create_dir_durable_makes_missing_parents() {
        let d = tempfile::tempdir().unwrap();
        let deep = d.path().join("store").join("episodes");
        create_dir_durable(&deep).unwrap();
        assert!(deep.is_dir());
        create_dir_durable(&deep).unwrap();
    }

    #[test]
    fn append_line_appends() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("index.jsonl");
        let mut f = open_append(&p).unwrap();
        append_line(&mut f, "a").unwrap();
        append_line(&mut f, "b").unwrap();
        assert_eq!(fs::read_to_string(&p).unwrap(), "a\nb\n");
    }
}
