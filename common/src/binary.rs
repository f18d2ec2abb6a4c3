//! Whether a daemon still runs the program installed where it was started from (SPEC §12): an
//! install that replaces the binary (write new + rename) leaves the running process on the old
//! inode, so it runs old code until someone restarts it.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

/// Where the kernel says this process's executable is.
const SELF_EXE: &str = "/proc/self/exe";
/// What the kernel appends to the link when the executable's file was unlinked.
const DELETED: &str = " (deleted)";

/// Why the running executable no longer is the installed one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Replaced {
    /// The path now names another file (another inode or device).
    NewFile,
    /// Nothing is at the path any more.
    Gone,
    /// The kernel reports the running executable's file as deleted.
    Deleted,
}

impl std::fmt::Display for Replaced {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Replaced::NewFile => "the file at that path was replaced",
            Replaced::Gone => "nothing is at that path any more",
            Replaced::Deleted => "the running executable's file was deleted",
        })
    }
}

/// The executable's path and identity at start, compared with the disk at each check.
#[derive(Debug)]
pub struct BinaryWatch {
    path: PathBuf,
    dev: u64,
    ino: u64,
    stale: AtomicBool,
}

impl BinaryWatch {
    /// Watches this process's own executable; `None` where `/proc/self/exe` cannot be read
    /// (then staleness is never reported).
    pub fn of_self() -> Option<BinaryWatch> {
        let link = std::fs::read_link(SELF_EXE).ok()?;
        let running = std::fs::metadata(SELF_EXE).ok()?;
        Some(BinaryWatch::new(
            strip_deleted(&link),
            running.dev(),
            running.ino(),
        ))
    }

    /// Watches `path`, whose file had identity (`dev`, `ino`) when the process started.
    pub fn new(path: PathBuf, dev: u64, ino: u64) -> BinaryWatch {
        BinaryWatch {
            path,
            dev,
            ino,
            stale: AtomicBool::new(false),
        }
    }

    /// The path the process was started from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether a check has found the binary replaced (it stays so: a process cannot become
    /// current again).
    pub fn is_stale(&self) -> bool {
        self.stale.load(Ordering::Relaxed)
    }

    /// Looks at the disk; returns why the binary is stale the first time it is found so, and
    /// `None` otherwise (current, or already reported).
    pub fn check(&self) -> Option<Replaced> {
        if self.is_stale() {
            return None;
        }
        let why = self.replaced()?;
        if self.stale.swap(true, Ordering::Relaxed) {
            return None;
        }
        Some(why)
    }

    fn replaced(&self) -> Option<Replaced> {
        if let Ok(link) = std::fs::read_link(SELF_EXE) {
            if link.to_string_lossy().ends_with(DELETED) && !self.path.exists() {
                return Some(Replaced::Deleted);
            }
        }
        match std::fs::metadata(&self.path) {
            Ok(m) if m.dev() == self.dev && m.ino() == self.ino => None,
            Ok(_) => Some(Replaced::NewFile),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Some(Replaced::Gone),
            // Unreadable for another reason (permissions): say nothing rather than guess.
            Err(_) => None,
        }
    }
}

fn strip_deleted(link: &Path) -> PathBuf {
    let s = link.to_string_lossy();
    match s.strip_suffix(DELETED) {
        Some(p) => PathBuf::from(p),
        None => link.to_path_buf(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn watch(path: &Path) -> BinaryWatch {
        let m = std::fs::metadata(path).unwrap();
        BinaryWatch::new(path.to_path_buf(), m.dev(), m.ino())
    }

    #[test]
    fn an_untouched_file_is_current() {
        let dir = tempfile::tempdir().unwrap();
        let bin = dir.path().join("daemon");
        std::fs::write(&bin, b"v1").unwrap();
        let w = watch(&bin);
        for _ in 0..3 {
            assert_eq!(w.check(), None);
        }
        assert!(!w.is_stale());
    }

    #[test]
    fn a_rename_over_the_path_is_reported_once() {
        let dir = tempfile::tempdir().unwrap();
        let bin = dir.path().join("daemon");
        std::fs::write(&bin, b"v1").unwrap();
        let w = watch(&bin);
        let new = dir.path().join("daemon.new");
        std::fs::write(&new, b"v2").unwrap();
        std::fs::rename(&new, &bin).unwrap();
        assert_eq!(w.check(), Some(Replaced::NewFile));
        assert!(w.is_stale());
        assert_eq!(w.check(), None, "reported once");
        assert!(w.is_stale());
    }

    #[test]
    fn a_removed_file_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let bin = dir.path().join("daemon");
        std::fs::write(&bin, b"v1").unwrap();
        let w = watch(&bin);
        std::fs::remove_file(&bin).unwrap();
        assert_eq!(w.check(), Some(Replaced::Gone));
    }

    #[test]
    fn the_test_binary_itself_is_current() {
        let w = BinaryWatch::of_self().expect("/proc/self/exe is readable on Linux");
        assert!(w.path().is_absolute());
        assert_eq!(w.check(), None);
    }

    #[test]
    fn the_deleted_suffix_is_removed_from_the_path() {
        assert_eq!(
            strip_deleted(Path::new("/opt/cis490/bin/x (deleted)")),
            PathBuf::from("/opt/cis490/bin/x")
        );
        assert_eq!(strip_deleted(Path::new("/a/b")), PathBuf::from("/a/b"));
    }
}
