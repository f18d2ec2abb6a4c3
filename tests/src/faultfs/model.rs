//! What a power cut may take away: per file, the bytes changed since its last fsync; per
//! directory (or, journalled, for the whole filesystem) the entry changes not yet committed; and
//! how those are rolled back in the backing directory when the power goes.

use std::collections::HashMap;
use std::ffi::{CString, OsStr, OsString};
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use crate::harness::Lcg;

/// How the filesystem orders metadata.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ordering {
    /// Like ext4 or XFS: entry changes reach the disk in the order they were made, and any
    /// fsync (of a file or a directory) commits every entry change made before it.
    Journalled,
    /// Like ext2 without fsck: each directory's entries reach the disk only when that
    /// directory is fsynced; a rename between two directories is two independent changes.
    PerDirectory,
}

/// What survives of the state that was not made durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Loss {
    /// Nothing: every unsynced byte and every uncommitted entry change is rolled back.
    All,
    /// A seeded random part: a file keeps a random prefix of its unsynced appends (or, after an
    /// overwrite or truncation, either its durable content or a random prefix of the new one);
    /// a random prefix of the uncommitted entry changes survives (of the whole log when
    /// journalled, of each directory's log otherwise).
    Random(u64),
}

/// `errno` as an `io::Error` when a libc call returned -1.
pub(crate) fn check(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

pub(crate) fn cstr(name: &OsStr) -> io::Result<CString> {
    CString::new(name.as_bytes()).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

/// `fstatat(dir, name, AT_SYMLINK_NOFOLLOW)`; an empty name stats `dir` itself.
pub(crate) fn stat_at(dir: &OwnedFd, name: &OsStr) -> io::Result<libc::stat> {
    let c = cstr(name)?;
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    let flags = if name.is_empty() {
        libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW
    } else {
        libc::AT_SYMLINK_NOFOLLOW
    };
    // SAFETY: valid fd, NUL-terminated name, and a stat buffer we own.
    check(unsafe { libc::fstatat(dir.as_raw_fd(), c.as_ptr(), &mut st, flags) })?;
    Ok(st)
}

/// Reopens an `O_PATH` descriptor with real access flags (works for unlinked files too).
pub(crate) fn reopen(fd: &OwnedFd, flags: libc::c_int) -> io::Result<File> {
    let path = CString::new(format!("/proc/self/fd/{}", fd.as_raw_fd())).expect("no NUL");
    // SAFETY: a NUL-terminated path; the returned descriptor is owned by the File.
    let raw = check(unsafe { libc::open(path.as_ptr(), flags | libc::O_CLOEXEC) })?;
    Ok(unsafe { File::from_raw_fd(raw) })
}

/// A hard link in the graveyard that keeps an inode (and its content) alive while an entry
/// change that removed one of its names may still be rolled back. Unlinked when dropped, that
/// is when the change is committed or rolled back.
#[derive(Debug)]
pub(crate) struct GraveLink {
    grave: Arc<OwnedFd>,
    name: CString,
}

impl GraveLink {
    /// Links `dir/name` into the graveyard under a fresh name.
    pub(crate) fn keep(
        grave: &Arc<OwnedFd>,
        counter: &mut u64,
        dir: &OwnedFd,
        name: &OsStr,
    ) -> io::Result<GraveLink> {
        *counter += 1;
        let gname = CString::new(format!("g{counter}")).expect("no NUL");
        let src = cstr(name)?;
        // SAFETY: valid descriptors and NUL-terminated names.
        check(unsafe {
            libc::linkat(
                dir.as_raw_fd(),
                src.as_ptr(),
                grave.as_raw_fd(),
                gname.as_ptr(),
                0,
            )
        })?;
        Ok(GraveLink {
            grave: grave.clone(),
            name: gname,
        })
    }

    /// Puts the kept inode back at `dir/name`.
    fn restore(&self, dir: &OwnedFd, name: &CString) -> io::Result<()> {
        // SAFETY: valid descriptors and NUL-terminated names.
        check(unsafe {
            libc::linkat(
                self.grave.as_raw_fd(),
                self.name.as_ptr(),
                dir.as_raw_fd(),
                name.as_ptr(),
                0,
            )
        })
        .map(drop)
    }
}

impl Drop for GraveLink {
    fn drop(&mut self) {
        // SAFETY: valid descriptor and NUL-terminated name.
        unsafe { libc::unlinkat(self.grave.as_raw_fd(), self.name.as_ptr(), 0) };
    }
}

/// What a directory entry pointed to.
#[derive(Debug)]
pub(crate) enum Obj {
    /// A file, symlink or special file; `keep` holds it when the change removed its name.
    Node { ino: u64, keep: Option<GraveLink> },
    /// A directory (restored empty, with its mode, when an rmdir is rolled back).
    Dir { ino: u64, mode: u32 },
}

impl Obj {
    fn ino(&self) -> u64 {
        match self {
            Obj::Node { ino, .. } | Obj::Dir { ino, .. } => *ino,
        }
    }
}

/// One uncommitted change of the namespace, undone as a unit.
#[derive(Debug)]
pub(crate) enum Change {
    /// `dir/name` went from `old` to `new` (`None`: no entry).
    Entry {
        dir: Arc<OwnedFd>,
        name: OsString,
        old: Option<Obj>,
        new: Option<Obj>,
    },
    /// A directory moved from `from/from_name` to `to/to_name`, replacing an empty directory
    /// there when `replaced` is set.
    MoveDir {
        from: Arc<OwnedFd>,
        from_name: OsString,
        to: Arc<OwnedFd>,
        to_name: OsString,
        ino: u64,
        replaced: Option<u32>,
    },
}

/// An uncommitted change and the directory whose fsync commits it (per-directory ordering).
#[derive(Debug)]
struct Pending {
    dir: u64,
    changes: Vec<Change>,
}

/// A file written since its last fsync: what it held then is its current content with the
/// saved ranges written back (newest first) and cut to `durable_len`.
#[derive(Debug)]
struct Dirty {
    fd: Arc<OwnedFd>,
    durable_len: u64,
    saved: Vec<(u64, Vec<u8>)>,
}

/// Counts of what a cut rolled back, for the tests and the reports.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct CutReport {
    /// Processes SIGKILLed because they had something open on the mount.
    pub killed: usize,
    /// Files whose unsynced bytes were (wholly or partly) discarded.
    pub files_rolled_back: usize,
    /// Uncommitted namespace changes undone.
    pub changes_undone: usize,
    /// Uncommitted namespace changes that survived (only with [`Loss::Random`]).
    pub changes_kept: usize,
    /// Undo steps that could not apply (e.g. the directory was itself removed durably), so
    /// what they would have restored is lost, as on a real disk.
    pub orphaned: usize,
}

/// The non-durable state of one mounted session.
#[derive(Debug)]
pub(crate) struct Model {
    pub(crate) ordering: Ordering,
    dirty: HashMap<u64, Dirty>,
    log: Vec<Pending>,
}

impl Model {
    pub(crate) fn new(ordering: Ordering) -> Model {
        Model {
            ordering,
            dirty: HashMap::new(),
            log: Vec::new(),
        }
    }

    /// Called before `len` bytes are written at `offset` (the end of file for appends):
    /// remembers the durable bytes about to be overwritten.
    pub(crate) fn before_write(
        &mut self,
        ino: u64,
        node: &Arc<OwnedFd>,
        offset: u64,
        len: u64,
    ) -> io::Result<()> {
        self.before_change(ino, node, offset, offset.saturating_add(len))
    }

    /// Called before the file is cut to `size`.
    pub(crate) fn before_truncate(
        &mut self,
        ino: u64,
        node: &Arc<OwnedFd>,
        size: u64,
    ) -> io::Result<()> {
        self.before_change(ino, node, size, u64::MAX)
    }

    fn before_change(
        &mut self,
        ino: u64,
        node: &Arc<OwnedFd>,
        start: u64,
        end: u64,
    ) -> io::Result<()> {
        let size = stat_at(node, OsStr::new(""))?.st_size as u64;
        let dirty = self.dirty.entry(ino).or_insert_with(|| Dirty {
            fd: node.clone(),
            durable_len: size,
            saved: Vec::new(),
        });
        // Only bytes that exist now and belong to the durable content need saving: bytes past
        // the current end were saved by the truncation that removed them.
        let end = end.min(size).min(dirty.durable_len);
        if start < end {
            let mut old = vec![0u8; (end - start) as usize];
            reopen(node, libc::O_RDONLY)?.read_exact_at(&mut old, start)?;
            dirty.saved.push((start, old));
        }
        Ok(())
    }

    /// fsync or fdatasync of a file: its content is durable; journalled, so is every entry
    /// change made so far.
    pub(crate) fn fsync_file(&mut self, ino: u64) {
        self.dirty.remove(&ino);
        if self.ordering == Ordering::Journalled {
            self.log.clear();
        }
    }

    /// fsync of a directory: its entry changes (journalled: all of them) are durable.
    pub(crate) fn fsync_dir(&mut self, ino: u64) {
        match self.ordering {
            Ordering::Journalled => self.log.clear(),
            Ordering::PerDirectory => self.log.retain(|p| p.dir != ino),
        }
    }

    /// Records an uncommitted namespace change, committed by an fsync of directory `dir`.
    pub(crate) fn record(&mut self, dir: u64, changes: Vec<Change>) {
        self.log.push(Pending { dir, changes });
    }

    /// The power goes: rolls the backing directory back to a state the disk could hold.
    pub(crate) fn cut(self, loss: Loss) -> CutReport {
        let mut report = CutReport::default();
        let mut rng = match loss {
            Loss::All => None,
            Loss::Random(seed) => Some(Lcg(seed ^ 0x9e37_79b9_7f4a_7c15)),
        };
        // Data first, while every inode is still reachable through its descriptor.
        let mut dirty: Vec<_> = self.dirty.into_iter().collect();
        dirty.sort_by_key(|(ino, _)| *ino);
        for (_, d) in dirty {
            match roll_back_data(&d, rng.as_mut()) {
                Ok(true) => report.files_rolled_back += 1,
                Ok(false) => {}
                Err(_) => report.orphaned += 1,
            }
        }
        // Which uncommitted changes survive: a prefix of the log, or of each directory's log.
        let mut survives = vec![false; self.log.len()];
        if let Some(rng) = rng.as_mut() {
            match self.ordering {
                Ordering::Journalled => {
                    let k = rng.below(self.log.len() as u64 + 1) as usize;
                    survives[..k].iter_mut().for_each(|s| *s = true);
                }
                Ordering::PerDirectory => {
                    let mut keep: HashMap<u64, u64> = HashMap::new();
                    let mut count: HashMap<u64, u64> = HashMap::new();
                    for p in &self.log {
                        *count.entry(p.dir).or_default() += 1;
                    }
                    let mut dirs: Vec<_> = count.into_iter().collect();
                    dirs.sort();
                    for (dir, n) in dirs {
                        keep.insert(dir, rng.below(n + 1));
                    }
                    let mut seen: HashMap<u64, u64> = HashMap::new();
                    for (i, p) in self.log.iter().enumerate() {
                        let n = seen.entry(p.dir).or_default();
                        survives[i] = *n < keep[&p.dir];
                        *n += 1;
                    }
                }
            }
        }
        for (pending, kept) in self.log.into_iter().zip(survives).rev() {
            if kept {
                report.changes_kept += 1;
                continue;
            }
            report.changes_undone += 1;
            for change in pending.changes.into_iter().rev() {
                if undo(change).is_err() {
                    report.orphaned += 1;
                }
            }
        }
        report
    }
}

/// Puts a dirty file back to its durable content, or (randomly) to a torn version of the new
/// one. Returns whether anything was discarded.
fn roll_back_data(d: &Dirty, rng: Option<&mut Lcg>) -> io::Result<bool> {
    let f = reopen(&d.fd, libc::O_RDWR)?;
    let size = f.metadata()?.len();
    let appended_only = d.saved.is_empty() && size >= d.durable_len;
    if let Some(rng) = rng {
        if appended_only {
            let keep = d.durable_len + rng.below(size - d.durable_len + 1);
            f.set_len(keep)?;
            return Ok(keep < size);
        }
        if rng.below(2) == 0 {
            // The new content, cut at a random point.
            f.set_len(rng.below(size + 1))?;
            return Ok(true);
        }
    }
    if size != d.durable_len {
        f.set_len(d.durable_len)?;
    }
    for (offset, old) in d.saved.iter().rev() {
        f.write_all_at(old, *offset)?;
    }
    Ok(size != d.durable_len || !d.saved.is_empty())
}

/// Whether `dir/name` is the inode `ino`.
fn is(dir: &OwnedFd, name: &OsStr, ino: u64) -> bool {
    stat_at(dir, name).is_ok_and(|st| st.st_ino == ino)
}

fn undo(change: Change) -> io::Result<()> {
    match change {
        Change::Entry {
            dir,
            name,
            old,
            new,
        } => {
            let c = cstr(&name)?;
            if let Some(new) = new {
                if !is(&dir, &name, new.ino()) {
                    return Err(io::Error::from_raw_os_error(libc::ENOENT));
                }
                match new {
                    Obj::Node { .. } => {
                        // SAFETY: valid descriptor and NUL-terminated name.
                        check(unsafe { libc::unlinkat(dir.as_raw_fd(), c.as_ptr(), 0) })?;
                    }
                    // A directory made since the last commit of its parent: whatever was put
                    // in it is unreachable after the cut, as an orphan would be.
                    Obj::Dir { .. } => remove_tree(&dir, &name)?,
                }
            }
            match old {
                None => Ok(()),
                Some(Obj::Node { keep, .. }) => keep
                    .ok_or_else(|| io::Error::from_raw_os_error(libc::ENOENT))?
                    .restore(&dir, &c),
                Some(Obj::Dir { mode, .. }) => {
                    // SAFETY: valid descriptor and NUL-terminated name.
                    check(unsafe { libc::mkdirat(dir.as_raw_fd(), c.as_ptr(), mode) }).map(drop)
                }
            }
        }
        Change::MoveDir {
            from,
            from_name,
            to,
            to_name,
            ino,
            replaced,
        } => {
            if !is(&to, &to_name, ino) {
                return Err(io::Error::from_raw_os_error(libc::ENOENT));
            }
            let (a, b) = (cstr(&to_name)?, cstr(&from_name)?);
            // SAFETY: valid descriptors and NUL-terminated names.
            check(unsafe {
                libc::renameat(to.as_raw_fd(), a.as_ptr(), from.as_raw_fd(), b.as_ptr())
            })?;
            if let Some(mode) = replaced {
                // SAFETY: as above.
                check(unsafe { libc::mkdirat(to.as_raw_fd(), a.as_ptr(), mode) })?;
            }
            Ok(())
        }
    }
}

/// Removes `dir/name` and everything under it.
fn remove_tree(dir: &OwnedFd, name: &OsStr) -> io::Result<()> {
    let path = std::path::PathBuf::from(format!("/proc/self/fd/{}", dir.as_raw_fd())).join(name);
    std::fs::remove_dir_all(path)
}
