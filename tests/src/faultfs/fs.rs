//! The FUSE side: every request is carried out on the backing directory (through `O_PATH`
//! descriptors, so renames never leave a stale path behind) and its non-durable effect is
//! recorded in the [`Model`].

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirEntryExt, FileExt, FileTypeExt};
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{
    AccessFlags, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation,
    INodeNo, LockOwner, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory,
    ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, Request, TimeOrNow, WriteFlags,
};

use super::model::{check, cstr, reopen, stat_at, Change, GraveLink, Model, Obj, Ordering};

/// The kernel asks again every time: nothing it caches can hide a request from the model, and
/// nothing survives a remount.
const TTL: Duration = Duration::ZERO;

#[derive(Debug)]
struct Node {
    fd: Arc<OwnedFd>,
    nlookup: u64,
}

#[derive(Debug)]
enum Handle {
    File {
        file: File,
        append: bool,
        sync: bool,
    },
    Dir {
        entries: Vec<(u64, FileType, OsString)>,
    },
}

/// Everything one mounted session knows; shared with [`super::FaultFs`], which freezes it at a
/// cut and takes the model out.
#[derive(Debug)]
pub(crate) struct Shared {
    nodes: HashMap<u64, Node>,
    handles: HashMap<u64, Handle>,
    next_fh: u64,
    pub(crate) model: Model,
    /// The power is off: every request fails with EIO and nothing reaches the backing dir.
    pub(crate) frozen: bool,
    /// Changing requests still allowed before the power goes by itself (`None`: no limit).
    pub(crate) budget: Option<u64>,
    /// Changing requests (writes, truncations, entry changes, fsyncs) carried out so far.
    pub(crate) changes: u64,
    grave: Arc<OwnedFd>,
    grave_counter: u64,
    root_ino: u64,
}

impl Shared {
    pub(crate) fn new(root: OwnedFd, grave: OwnedFd, ordering: Ordering) -> io::Result<Shared> {
        let root_ino = stat_at(&root, OsStr::new(""))?.st_ino;
        let mut nodes = HashMap::new();
        nodes.insert(
            1,
            Node {
                fd: Arc::new(root),
                nlookup: u64::MAX / 2,
            },
        );
        Ok(Shared {
            nodes,
            handles: HashMap::new(),
            next_fh: 1,
            model: Model::new(ordering),
            frozen: false,
            budget: None,
            changes: 0,
            grave: Arc::new(grave),
            grave_counter: 0,
            root_ino,
        })
    }

    /// The kernel's inode number for a backing one: the root must be 1, so the two swap.
    fn fuse_ino(&self, backing: u64) -> u64 {
        if backing == self.root_ino {
            1
        } else if backing == 1 {
            self.root_ino
        } else {
            backing
        }
    }

    /// Lets a request through, counting it when it changes state; fails it once the power is off.
    fn gate(&mut self, changing: bool) -> Result<(), Errno> {
        if self.frozen {
            return Err(Errno::EIO);
        }
        if changing {
            match &mut self.budget {
                Some(0) => {
                    self.frozen = true;
                    return Err(Errno::EIO);
                }
                Some(n) => *n -= 1,
                None => {}
            }
            self.changes += 1;
        }
        Ok(())
    }

    fn node(&self, ino: INodeNo) -> Result<Arc<OwnedFd>, Errno> {
        self.nodes
            .get(&ino.0)
            .map(|n| n.fd.clone())
            .ok_or(Errno::ENOENT)
    }

    fn attr(&self, st: &libc::stat) -> FileAttr {
        let kind = match st.st_mode & libc::S_IFMT {
            libc::S_IFDIR => FileType::Directory,
            libc::S_IFLNK => FileType::Symlink,
            libc::S_IFIFO => FileType::NamedPipe,
            libc::S_IFSOCK => FileType::Socket,
            libc::S_IFCHR => FileType::CharDevice,
            libc::S_IFBLK => FileType::BlockDevice,
            _ => FileType::RegularFile,
        };
        FileAttr {
            ino: INodeNo(self.fuse_ino(st.st_ino)),
            size: st.st_size as u64,
            blocks: st.st_blocks as u64,
            atime: time(st.st_atime, st.st_atime_nsec),
            mtime: time(st.st_mtime, st.st_mtime_nsec),
            ctime: time(st.st_ctime, st.st_ctime_nsec),
            crtime: UNIX_EPOCH,
            kind,
            perm: (st.st_mode & 0o7777) as u16,
            nlink: st.st_nlink as u32,
            uid: st.st_uid,
            gid: st.st_gid,
            rdev: st.st_rdev as u32,
            blksize: st.st_blksize as u32,
            flags: 0,
        }
    }

    /// Opens `dir/name` as a node the kernel now holds one more lookup of.
    fn remember(&mut self, dir: &OwnedFd, name: &OsStr) -> io::Result<FileAttr> {
        let c = cstr(name)?;
        // SAFETY: valid descriptor and NUL-terminated name; the result is owned below.
        let raw = check(unsafe {
            libc::openat(
                dir.as_raw_fd(),
                c.as_ptr(),
                libc::O_PATH | libc::O_NOFOLLOW | libc::O_CLOEXEC,
            )
        })?;
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let st = stat_at(&fd, OsStr::new(""))?;
        let attr = self.attr(&st);
        self.nodes
            .entry(attr.ino.0)
            .and_modify(|n| n.nlookup += 1)
            .or_insert(Node {
                fd: Arc::new(fd),
                nlookup: 1,
            });
        Ok(attr)
    }

    fn keep(&mut self, dir: &OwnedFd, name: &OsStr) -> io::Result<GraveLink> {
        GraveLink::keep(&self.grave, &mut self.grave_counter, dir, name)
    }

    fn add_handle(&mut self, h: Handle) -> FileHandle {
        let fh = self.next_fh;
        self.next_fh += 1;
        self.handles.insert(fh, h);
        FileHandle(fh)
    }

    /// Records a new entry `parent/name` (a create, mknod, mkdir, symlink or link).
    fn record_new(&mut self, parent: INodeNo, dir: Arc<OwnedFd>, name: &OsStr, attr: &FileAttr) {
        let ino = stat_at(&dir, name).map_or(0, |st| st.st_ino);
        let new = if attr.kind == FileType::Directory {
            Obj::Dir {
                ino,
                mode: u32::from(attr.perm),
            }
        } else {
            Obj::Node { ino, keep: None }
        };
        self.model.record(
            parent.0,
            vec![Change::Entry {
                dir,
                name: name.to_os_string(),
                old: None,
                new: Some(new),
            }],
        );
    }
}

fn time(secs: i64, nsecs: i64) -> SystemTime {
    if secs >= 0 {
        UNIX_EPOCH + Duration::new(secs as u64, nsecs as u32)
    } else {
        UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs()) + Duration::from_nanos(nsecs as u64)
    }
}

fn errno(e: io::Error) -> Errno {
    Errno::from(e)
}

fn is_dir(st: &libc::stat) -> bool {
    st.st_mode & libc::S_IFMT == libc::S_IFDIR
}

fn proc_path(fd: &OwnedFd) -> std::ffi::CString {
    std::ffi::CString::new(format!("/proc/self/fd/{}", fd.as_raw_fd())).expect("no NUL")
}

/// The filesystem handed to `fuser`.
pub(crate) struct Ops {
    pub(crate) shared: Arc<Mutex<Shared>>,
}

impl Ops {
    fn lock(&self) -> MutexGuard<'_, Shared> {
        // A panic in one request must not wedge every later one (the model is still coherent:
        // each request records its change only after it succeeded).
        self.shared.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Replies with the error of a failed step.
macro_rules! tri {
    ($reply:expr, $e:expr) => {
        match $e {
            Ok(v) => v,
            Err(e) => {
                $reply.error(e.into());
                return;
            }
        }
    };
}

impl From<io::Error> for ErrnoOf {
    fn from(e: io::Error) -> Self {
        ErrnoOf(errno(e))
    }
}

impl From<Errno> for ErrnoOf {
    fn from(e: Errno) -> Self {
        ErrnoOf(e)
    }
}

impl From<ErrnoOf> for Errno {
    fn from(e: ErrnoOf) -> Self {
        e.0
    }
}

/// One error type for the `?`s inside a request, whether they come from libc or the gate.
struct ErrnoOf(Errno);

type R<T> = Result<T, ErrnoOf>;

impl Filesystem for Ops {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let mut s = self.lock();
        let r: R<FileAttr> = (|| {
            s.gate(false)?;
            let dir = s.node(parent)?;
            Ok(s.remember(&dir, name)?)
        })();
        let attr = tri!(reply, r);
        reply.entry(&TTL, &attr, Generation(0));
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        let mut s = self.lock();
        if ino.0 == 1 {
            return;
        }
        if let Some(n) = s.nodes.get_mut(&ino.0) {
            n.nlookup = n.nlookup.saturating_sub(nlookup);
            if n.nlookup == 0 {
                s.nodes.remove(&ino.0);
            }
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        let mut s = self.lock();
        let r: R<FileAttr> = (|| {
            s.gate(false)?;
            let fd = s.node(ino)?;
            let st = stat_at(&fd, OsStr::new(""))?;
            Ok(s.attr(&st))
        })();
        let attr = tri!(reply, r);
        reply.attr(&TTL, &attr);
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let mut s = self.lock();
        let r: R<FileAttr> = (|| {
            s.gate(true)?;
            let fd = s.node(ino)?;
            let path = proc_path(&fd);
            if let Some(mode) = mode {
                // SAFETY: NUL-terminated path.
                check(unsafe { libc::chmod(path.as_ptr(), mode & 0o7777) })?;
            }
            if uid.is_some() || gid.is_some() {
                let empty = cstr(OsStr::new(""))?;
                // SAFETY: valid descriptor, empty path with AT_EMPTY_PATH.
                check(unsafe {
                    libc::fchownat(
                        fd.as_raw_fd(),
                        empty.as_ptr(),
                        uid.unwrap_or(u32::MAX),
                        gid.unwrap_or(u32::MAX),
                        libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW,
                    )
                })?;
            }
            if let Some(size) = size {
                s.model.before_truncate(ino.0, &fd, size)?;
                reopen(&fd, libc::O_WRONLY)?.set_len(size)?;
            }
            if atime.is_some() || mtime.is_some() {
                let ts = |t: Option<TimeOrNow>| match t {
                    None => libc::timespec {
                        tv_sec: 0,
                        tv_nsec: libc::UTIME_OMIT,
                    },
                    Some(TimeOrNow::Now) => libc::timespec {
                        tv_sec: 0,
                        tv_nsec: libc::UTIME_NOW,
                    },
                    Some(TimeOrNow::SpecificTime(t)) => {
                        let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
                        libc::timespec {
                            tv_sec: d.as_secs() as libc::time_t,
                            tv_nsec: d.subsec_nanos() as libc::c_long,
                        }
                    }
                };
                let times = [ts(atime), ts(mtime)];
                // SAFETY: NUL-terminated path and a two-element array.
                check(unsafe {
                    libc::utimensat(libc::AT_FDCWD, path.as_ptr(), times.as_ptr(), 0)
                })?;
            }
            let st = stat_at(&fd, OsStr::new(""))?;
            Ok(s.attr(&st))
        })();
        let attr = tri!(reply, r);
        reply.attr(&TTL, &attr);
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        let mut s = self.lock();
        let r: R<Vec<u8>> = (|| {
            s.gate(false)?;
            let fd = s.node(ino)?;
            let empty = cstr(OsStr::new(""))?;
            let mut buf = vec![0u8; libc::PATH_MAX as usize];
            // SAFETY: valid descriptor, empty path, and a buffer of the given length.
            let n = unsafe {
                libc::readlinkat(
                    fd.as_raw_fd(),
                    empty.as_ptr(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                )
            };
            if n < 0 {
                return Err(io::Error::last_os_error().into());
            }
            buf.truncate(n as usize);
            Ok(buf)
        })();
        let data = tri!(reply, r);
        reply.data(&data);
    }

    fn mknod(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        let mut s = self.lock();
        let r: R<FileAttr> = (|| {
            s.gate(true)?;
            let dir = s.node(parent)?;
            let c = cstr(name)?;
            // SAFETY: valid descriptor and NUL-terminated name.
            check(unsafe {
                libc::mknodat(
                    dir.as_raw_fd(),
                    c.as_ptr(),
                    mode & !umask,
                    libc::dev_t::from(rdev),
                )
            })?;
            let attr = s.remember(&dir, name)?;
            s.record_new(parent, dir, name, &attr);
            Ok(attr)
        })();
        let attr = tri!(reply, r);
        reply.entry(&TTL, &attr, Generation(0));
    }

    fn mkdir(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        let mut s = self.lock();
        let r: R<FileAttr> = (|| {
            s.gate(true)?;
            let dir = s.node(parent)?;
            let c = cstr(name)?;
            // SAFETY: valid descriptor and NUL-terminated name.
            check(unsafe { libc::mkdirat(dir.as_raw_fd(), c.as_ptr(), mode & !umask) })?;
            let attr = s.remember(&dir, name)?;
            s.record_new(parent, dir, name, &attr);
            Ok(attr)
        })();
        let attr = tri!(reply, r);
        reply.entry(&TTL, &attr, Generation(0));
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let mut s = self.lock();
        let r: R<()> = (|| {
            s.gate(true)?;
            let dir = s.node(parent)?;
            let st = stat_at(&dir, name)?;
            if is_dir(&st) {
                return Err(Errno::EISDIR.into());
            }
            let keep = s.keep(&dir, name)?;
            let c = cstr(name)?;
            // SAFETY: valid descriptor and NUL-terminated name.
            check(unsafe { libc::unlinkat(dir.as_raw_fd(), c.as_ptr(), 0) })?;
            s.model.record(
                parent.0,
                vec![Change::Entry {
                    dir,
                    name: name.to_os_string(),
                    old: Some(Obj::Node {
                        ino: st.st_ino,
                        keep: Some(keep),
                    }),
                    new: None,
                }],
            );
            Ok(())
        })();
        tri!(reply, r);
        reply.ok();
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let mut s = self.lock();
        let r: R<()> = (|| {
            s.gate(true)?;
            let dir = s.node(parent)?;
            let st = stat_at(&dir, name)?;
            let c = cstr(name)?;
            // SAFETY: valid descriptor and NUL-terminated name.
            check(unsafe { libc::unlinkat(dir.as_raw_fd(), c.as_ptr(), libc::AT_REMOVEDIR) })?;
            s.model.record(
                parent.0,
                vec![Change::Entry {
                    dir,
                    name: name.to_os_string(),
                    old: Some(Obj::Dir {
                        ino: st.st_ino,
                        mode: st.st_mode & 0o7777,
                    }),
                    new: None,
                }],
            );
            Ok(())
        })();
        tri!(reply, r);
        reply.ok();
    }

    fn symlink(
        &self,
        _req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        let mut s = self.lock();
        let r: R<FileAttr> = (|| {
            s.gate(true)?;
            let dir = s.node(parent)?;
            let (c, t) = (cstr(link_name)?, cstr(target.as_os_str())?);
            // SAFETY: valid descriptor and NUL-terminated strings.
            check(unsafe { libc::symlinkat(t.as_ptr(), dir.as_raw_fd(), c.as_ptr()) })?;
            let attr = s.remember(&dir, link_name)?;
            s.record_new(parent, dir, link_name, &attr);
            Ok(attr)
        })();
        let attr = tri!(reply, r);
        reply.entry(&TTL, &attr, Generation(0));
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let mut s = self.lock();
        let r: R<()> = (|| {
            s.gate(true)?;
            if !(flags - RenameFlags::RENAME_NOREPLACE).is_empty() {
                return Err(Errno::EINVAL.into());
            }
            let (from, to) = (s.node(parent)?, s.node(newparent)?);
            let src = stat_at(&from, name)?;
            let dst = stat_at(&to, newname).ok();
            let (a, b) = (cstr(name)?, cstr(newname)?);
            let rename = || {
                // SAFETY: valid descriptors and NUL-terminated names.
                check(unsafe {
                    libc::renameat2(
                        from.as_raw_fd(),
                        a.as_ptr(),
                        to.as_raw_fd(),
                        b.as_ptr(),
                        flags.bits(),
                    )
                })
            };
            if dst.is_some_and(|d| d.st_ino == src.st_ino) {
                // Two names of one inode: rename(2) does nothing.
                rename()?;
                return Ok(());
            }
            if is_dir(&src) {
                rename()?;
                s.model.record(
                    newparent.0,
                    vec![Change::MoveDir {
                        from: from.clone(),
                        from_name: name.to_os_string(),
                        to: to.clone(),
                        to_name: newname.to_os_string(),
                        ino: src.st_ino,
                        replaced: dst.map(|d| d.st_mode & 0o7777),
                    }],
                );
                return Ok(());
            }
            let src_keep = s.keep(&from, name)?;
            let old = match dst {
                Some(d) if is_dir(&d) => return Err(Errno::EISDIR.into()),
                Some(d) => Some(Obj::Node {
                    ino: d.st_ino,
                    keep: Some(s.keep(&to, newname)?),
                }),
                None => None,
            };
            rename()?;
            let added = Change::Entry {
                dir: to.clone(),
                name: newname.to_os_string(),
                old,
                new: Some(Obj::Node {
                    ino: src.st_ino,
                    keep: None,
                }),
            };
            let removed = Change::Entry {
                dir: from.clone(),
                name: name.to_os_string(),
                old: Some(Obj::Node {
                    ino: src.st_ino,
                    keep: Some(src_keep),
                }),
                new: None,
            };
            if s.model.ordering == Ordering::PerDirectory && parent != newparent {
                // Two directories, two independent writes: either may reach the disk alone.
                s.model.record(newparent.0, vec![added]);
                s.model.record(parent.0, vec![removed]);
            } else {
                s.model.record(newparent.0, vec![added, removed]);
            }
            Ok(())
        })();
        tri!(reply, r);
        reply.ok();
    }

    fn link(
        &self,
        _req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        let mut s = self.lock();
        let r: R<FileAttr> = (|| {
            s.gate(true)?;
            let (fd, dir) = (s.node(ino)?, s.node(newparent)?);
            let (empty, c) = (cstr(OsStr::new(""))?, cstr(newname)?);
            // SAFETY: valid descriptors and NUL-terminated names.
            check(unsafe {
                libc::linkat(
                    fd.as_raw_fd(),
                    empty.as_ptr(),
                    dir.as_raw_fd(),
                    c.as_ptr(),
                    libc::AT_EMPTY_PATH,
                )
            })?;
            let attr = s.remember(&dir, newname)?;
            s.record_new(newparent, dir, newname, &attr);
            Ok(attr)
        })();
        let attr = tri!(reply, r);
        reply.entry(&TTL, &attr, Generation(0));
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let mut s = self.lock();
        let r: R<FileHandle> = (|| {
            s.gate(false)?;
            let fd = s.node(ino)?;
            let keep = libc::O_ACCMODE | libc::O_APPEND | libc::O_SYNC | libc::O_DSYNC;
            let file = reopen(&fd, flags.0 & keep)?;
            Ok(s.add_handle(Handle::File {
                file,
                append: flags.0 & libc::O_APPEND != 0,
                sync: flags.0 & libc::O_DSYNC != 0,
            }))
        })();
        let fh = tri!(reply, r);
        reply.opened(fh, FopenFlags::FOPEN_DIRECT_IO);
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let mut s = self.lock();
        let r: R<Vec<u8>> = (|| {
            s.gate(false)?;
            let Some(Handle::File { file, .. }) = s.handles.get(&fh.0) else {
                return Err(Errno::EBADF.into());
            };
            let mut buf = vec![0u8; size as usize];
            let mut got = 0;
            while got < buf.len() {
                match file.read_at(&mut buf[got..], offset + got as u64)? {
                    0 => break,
                    n => got += n,
                }
            }
            buf.truncate(got);
            Ok(buf)
        })();
        let data = tri!(reply, r);
        reply.data(&data);
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let mut s = self.lock();
        let r: R<u32> = (|| {
            s.gate(true)?;
            let fd = s.node(ino)?;
            let Shared { handles, model, .. } = &mut *s;
            let Some(Handle::File { file, append, sync }) = handles.get(&fh.0) else {
                return Err(Errno::EBADF.into());
            };
            // Appends land at the end whatever the offset says (the backing file is O_APPEND
            // too, and Linux's pwrite appends on such a file).
            let at = if *append {
                file.metadata()?.len()
            } else {
                offset
            };
            model.before_write(ino.0, &fd, at, data.len() as u64)?;
            file.write_all_at(data, at)?;
            if *sync {
                model.fsync_file(ino.0);
            }
            Ok(data.len() as u32)
        })();
        let n = tri!(reply, r);
        reply.written(n);
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.lock().handles.remove(&fh.0);
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        let mut s = self.lock();
        // The backing directory is scratch space: only the model's notion of durable matters,
        // so no real fsync is made.
        tri!(reply, s.gate(true));
        s.model.fsync_file(ino.0);
        reply.ok();
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        let mut s = self.lock();
        let r: R<FileHandle> = (|| {
            s.gate(false)?;
            s.node(ino)?;
            Ok(s.add_handle(Handle::Dir {
                entries: Vec::new(),
            }))
        })();
        let fh = tri!(reply, r);
        reply.opened(fh, FopenFlags::empty());
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let mut s = self.lock();
        let r: R<()> = (|| {
            s.gate(false)?;
            if offset == 0 {
                let fd = s.node(ino)?;
                let path = format!("/proc/self/fd/{}", fd.as_raw_fd());
                let mut entries = Vec::new();
                for e in std::fs::read_dir(path)? {
                    let e = e?;
                    let t = e.file_type()?;
                    let kind = if t.is_dir() {
                        FileType::Directory
                    } else if t.is_symlink() {
                        FileType::Symlink
                    } else if t.is_fifo() {
                        FileType::NamedPipe
                    } else if t.is_socket() {
                        FileType::Socket
                    } else {
                        FileType::RegularFile
                    };
                    entries.push((s.fuse_ino(e.ino()), kind, e.file_name()));
                }
                entries.sort_by(|a, b| a.2.as_bytes().cmp(b.2.as_bytes()));
                if let Some(Handle::Dir { entries: e }) = s.handles.get_mut(&fh.0) {
                    *e = entries;
                }
            }
            Ok(())
        })();
        tri!(reply, r);
        if let Some(Handle::Dir { entries }) = s.handles.get(&fh.0) {
            for (i, (ino, kind, name)) in entries.iter().enumerate().skip(offset as usize) {
                if reply.add(INodeNo(*ino), i as u64 + 1, *kind, name) {
                    break;
                }
            }
        }
        reply.ok();
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        self.lock().handles.remove(&fh.0);
        reply.ok();
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        let mut s = self.lock();
        tri!(reply, s.gate(true));
        s.model.fsync_dir(ino.0);
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let mut s = self.lock();
        let r: R<libc::statvfs> = (|| {
            s.gate(false)?;
            let root = s.node(INodeNo(1))?;
            let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
            // SAFETY: valid descriptor and a buffer we own.
            check(unsafe { libc::fstatvfs(root.as_raw_fd(), &mut st) })?;
            Ok(st)
        })();
        let st = tri!(reply, r);
        reply.statfs(
            st.f_blocks,
            st.f_bfree,
            st.f_bavail,
            st.f_files,
            st.f_ffree,
            st.f_bsize as u32,
            st.f_namemax as u32,
            st.f_frsize as u32,
        );
    }

    fn access(&self, _req: &Request, _ino: INodeNo, _mask: AccessFlags, reply: ReplyEmpty) {
        // Only root uses this filesystem.
        reply.ok();
    }

    fn create(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let mut s = self.lock();
        let r: R<(FileAttr, FileHandle)> = (|| {
            s.gate(true)?;
            let dir = s.node(parent)?;
            let c = cstr(name)?;
            let keep = libc::O_ACCMODE | libc::O_APPEND | libc::O_SYNC | libc::O_DSYNC;
            // SAFETY: valid descriptor and NUL-terminated name; the result is owned below.
            let raw = unsafe {
                libc::openat(
                    dir.as_raw_fd(),
                    c.as_ptr(),
                    (flags & keep) | libc::O_CREAT | libc::O_EXCL | libc::O_CLOEXEC,
                    mode & !umask,
                )
            };
            let created = raw >= 0;
            let file = if created {
                unsafe { File::from_raw_fd(raw) }
            } else {
                let e = io::Error::last_os_error();
                if e.raw_os_error() != Some(libc::EEXIST) || flags & libc::O_EXCL != 0 {
                    return Err(e.into());
                }
                // Someone else made it first: an ordinary open of the existing file.
                let raw = check(unsafe {
                    libc::openat(
                        dir.as_raw_fd(),
                        c.as_ptr(),
                        (flags & keep) | libc::O_CLOEXEC,
                    )
                })?;
                unsafe { File::from_raw_fd(raw) }
            };
            let attr = s.remember(&dir, name)?;
            if created {
                s.record_new(parent, dir, name, &attr);
            } else if flags & libc::O_TRUNC != 0 {
                let fd = s.node(attr.ino)?;
                s.model.before_truncate(attr.ino.0, &fd, 0)?;
                file.set_len(0)?;
            }
            let fh = s.add_handle(Handle::File {
                file,
                append: flags & libc::O_APPEND != 0,
                sync: flags & libc::O_DSYNC != 0,
            });
            Ok((attr, fh))
        })();
        let (attr, fh) = tri!(reply, r);
        reply.created(&TTL, &attr, Generation(0), fh, FopenFlags::FOPEN_DIRECT_IO);
    }
}
