//! Advisory whole-directory locks (`flock` on a `.lock` file): one process changes a state
//! directory at a time, and a second daemon on the same directory is refused.

use std::fs::{File, OpenOptions};
use std::io;
use std::path::Path;

use nix::fcntl::{Flock, FlockArg};

/// Held until dropped.
pub struct DirLock {
    _lock: Flock<File>,
}

/// Opens the lock file read-only (flock needs no write access, so a lock file first created by
/// root stays usable by the service user), creating it when absent.
fn open(dir: &Path, name: &str) -> io::Result<File> {
    let path = dir.join(name);
    match File::open(&path) {
        Ok(f) => Ok(f),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            drop(
                OpenOptions::new()
                    .create(true)
                    .truncate(false)
                    .write(true)
                    .open(&path)?,
            );
            File::open(&path)
        }
        Err(e) => Err(e),
    }
}

/// Waits for the exclusive lock of `dir` (`dir/.lock`).
pub fn exclusive(dir: &Path) -> io::Result<DirLock> {
    let f = open(dir, ".lock")?;
    Flock::lock(f, FlockArg::LockExclusive)
        .map(|l| DirLock { _lock: l })
        .map_err(|(_, e)| io::Error::from(e))
}

/// Takes the exclusive lock of `dir` if nobody holds it; `Ok(None)` when someone does.
pub fn try_exclusive(dir: &Path) -> io::Result<Option<DirLock>> {
    try_exclusive_named(dir, ".lock")
}

/// Like [`try_exclusive`] on another lock file of `dir` (a process-lifetime lock must not share
/// a file with short locks taken by the same process: flock would see two holders).
pub fn try_exclusive_named(dir: &Path, name: &str) -> io::Result<Option<DirLock>> {
    let f = open(dir, name)?;
    match Flock::lock(f, FlockArg::LockExclusiveNonblock) {
        Ok(l) => Ok(Some(DirLock { _lock: l })),
        Err((_, nix::errno::Errno::EWOULDBLOCK)) => Ok(None),
        Err((_, e)) => Err(io::Error::from(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_holder_is_refused_until_the_first_drops() {
        let d = tempfile::tempdir().unwrap();
        let a = try_exclusive(d.path()).unwrap();
        assert!(a.is_some());
        assert!(try_exclusive(d.path()).unwrap().is_none());
        drop(a);
        assert!(try_exclusive(d.path()).unwrap().is_some());
    }
}
