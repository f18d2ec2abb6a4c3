//! A FUSE filesystem that simulates power cuts: it passes everything through to a backing
//! directory, remembers what is not yet durable, and on [`FaultFs::power_cut`] kills every
//! process using it, rolls the non-durable part back and mounts again.

mod fs;
mod model;
#[cfg(test)]
mod tests;

use std::fmt;
use std::io;
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub use model::{CutReport, Loss, Ordering};

/// Set to 1 where the power-cut tests must run (CI on the project's machines): there, a
/// missing /dev/fuse fails the test instead of skipping it.
pub const REQUIRE_ENV: &str = "CIS490_REQUIRE_FUSE";

/// Why the filesystem could not be mounted.
#[derive(Debug)]
pub enum MountError {
    /// No /dev/fuse, or not root: nothing can be mounted on this machine.
    Unavailable(String),
    /// The mount itself failed.
    Io(String, io::Error),
}

impl fmt::Display for MountError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MountError::Unavailable(why) => write!(f, "{why}"),
            MountError::Io(what, e) => write!(f, "failed to {what}: {e}"),
        }
    }
}

impl std::error::Error for MountError {}

/// Whether this process can mount the fault filesystem; the reason when it cannot.
pub fn unavailable() -> Option<String> {
    if !Path::new("/dev/fuse").exists() {
        return Some(
            "the fault filesystem needs /dev/fuse, which this machine lacks \
             (load the fuse module, or give the container --device /dev/fuse)"
                .into(),
        );
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some(
            "the fault filesystem mounts /dev/fuse directly and so must run as root".into(),
        );
    }
    None
}

/// For a test: `true` when it can run; otherwise prints why and returns `false` (skip), unless
/// [`REQUIRE_ENV`] is 1, where it panics with the reason.
pub fn usable_or_skip(test: &str) -> bool {
    let Some(why) = unavailable() else {
        return true;
    };
    if std::env::var(REQUIRE_ENV).as_deref() == Ok("1") {
        panic!("{test}: {why} ({REQUIRE_ENV}=1 forbids skipping)");
    }
    eprintln!("SKIPPED {test}: {why}");
    false
}

/// A mounted fault filesystem. Its files live in `backing/` and its mount point is `mnt/`,
/// both under the directory it was given; a third directory, `grave/`, keeps removed inodes
/// while their removal can still be undone.
pub struct FaultFs {
    backing: PathBuf,
    grave: PathBuf,
    mnt: PathBuf,
    ordering: Ordering,
    session: Option<fuser::BackgroundSession>,
    shared: Arc<Mutex<fs::Shared>>,
    /// The FUSE connection's number under /sys/fs/fuse/connections.
    conn: u64,
    cuts: u64,
}

impl fmt::Debug for FaultFs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FaultFs")
            .field("mnt", &self.mnt)
            .field("ordering", &self.ordering)
            .field("cuts", &self.cuts)
            .finish()
    }
}

fn open_path(p: &Path) -> io::Result<OwnedFd> {
    let c = model::cstr(p.as_os_str())?;
    // SAFETY: NUL-terminated path; the descriptor is owned by the result.
    let raw = model::check(unsafe {
        libc::open(
            c.as_ptr(),
            libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC,
        )
    })?;
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

/// Mounts fusectl if nothing has, so a connection can be aborted like a pulled cable.
fn ensure_fusectl() {
    let mounted = std::fs::read_to_string("/proc/self/mounts")
        .is_ok_and(|m| m.lines().any(|l| l.split(' ').nth(2) == Some("fusectl")));
    if !mounted {
        let (src, dir, kind) = (c"fusectl", c"/sys/fs/fuse/connections", c"fusectl");
        // SAFETY: NUL-terminated strings; failure is tolerated (unmount then falls back to
        // waiting for the session to end).
        unsafe {
            libc::mount(
                src.as_ptr(),
                dir.as_ptr(),
                kind.as_ptr(),
                0,
                std::ptr::null(),
            )
        };
    }
}

impl FaultFs {
    /// Creates `dir/{backing,grave,mnt}` and mounts the filesystem on `mnt`.
    pub fn mount(dir: &Path, ordering: Ordering) -> Result<FaultFs, MountError> {
        if let Some(why) = unavailable() {
            return Err(MountError::Unavailable(why));
        }
        let (backing, grave, mnt) = (dir.join("backing"), dir.join("grave"), dir.join("mnt"));
        for d in [&backing, &grave, &mnt] {
            std::fs::create_dir_all(d)
                .map_err(|e| MountError::Io(format!("create {}", d.display()), e))?;
        }
        ensure_fusectl();
        let (session, shared, conn) = start(&backing, &grave, &mnt, ordering)?;
        Ok(FaultFs {
            backing,
            grave,
            mnt,
            ordering,
            session: Some(session),
            shared,
            conn,
            cuts: 0,
        })
    }

    /// The mount point: put the files under test here.
    pub fn path(&self) -> &Path {
        &self.mnt
    }

    /// Where the files really are (read it only between cuts, or while nothing writes).
    pub fn backing(&self) -> &Path {
        &self.backing
    }

    /// Power cuts so far.
    pub fn cuts(&self) -> u64 {
        self.cuts
    }

    /// Changing requests (writes, truncations, entry changes, fsyncs) this mount has served.
    pub fn changes(&self) -> u64 {
        self.shared
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .changes
    }

    /// The power goes by itself after `n` more changing requests: the next one fails with EIO,
    /// as does everything after it, until [`FaultFs::power_cut`].
    pub fn cut_after(&self, n: u64) {
        self.shared.lock().unwrap_or_else(|e| e.into_inner()).budget = Some(n);
    }

    /// The power goes now: every later request fails with EIO and nothing more reaches the
    /// disk. The caller may then kill its daemons at leisure before [`FaultFs::power_cut`].
    pub fn freeze(&self) {
        self.shared.lock().unwrap_or_else(|e| e.into_inner()).frozen = true;
    }

    /// Whether the power is off (by [`FaultFs::cut_after`]) and waits for [`FaultFs::power_cut`].
    pub fn is_frozen(&self) -> bool {
        self.shared.lock().unwrap_or_else(|e| e.into_inner()).frozen
    }

    /// Cuts the power: from this instant nothing reaches the disk; every other process with a
    /// file, directory or working directory on the mount is SIGKILLed; what was not durable is
    /// discarded per `loss`; and the filesystem is mounted again, empty of pending state.
    /// Restarting the killed daemons is the caller's part.
    pub fn power_cut(&mut self, loss: Loss) -> Result<CutReport, MountError> {
        self.shared.lock().unwrap_or_else(|e| e.into_inner()).frozen = true;
        let killed = kill_users(&self.mnt);
        // Pull the cable: requests in flight and to come fail at once, so the session ends
        // even if this process still holds a file open on the mount.
        let _ = std::fs::write(format!("/sys/fs/fuse/connections/{}/abort", self.conn), "1");
        if let Some(session) = self.session.take() {
            session
                .umount_and_join()
                .map_err(|e| MountError::Io("unmount the fault filesystem".into(), e))?;
        }
        let model = {
            let mut s = self.shared.lock().unwrap_or_else(|e| e.into_inner());
            std::mem::replace(&mut s.model, model::Model::new(self.ordering))
        };
        let mut report = model.cut(loss);
        report.killed = killed;
        // Everything kept for undo has been restored or dropped; anything left is noise.
        if let Ok(rd) = std::fs::read_dir(&self.grave) {
            for e in rd.flatten() {
                let _ = std::fs::remove_file(e.path());
            }
        }
        self.cuts += 1;
        let (session, shared, conn) = start(&self.backing, &self.grave, &self.mnt, self.ordering)?;
        (self.session, self.shared, self.conn) = (Some(session), shared, conn);
        Ok(report)
    }
}

impl Drop for FaultFs {
    fn drop(&mut self) {
        if let Some(session) = self.session.take() {
            self.shared.lock().unwrap_or_else(|e| e.into_inner()).frozen = true;
            kill_users(&self.mnt);
            let _ = std::fs::write(format!("/sys/fs/fuse/connections/{}/abort", self.conn), "1");
            let _ = session.umount_and_join();
        }
    }
}

/// Mounts a fresh session (nothing pending) on `mnt`; returns it, its state and its FUSE
/// connection number.
fn start(
    backing: &Path,
    grave: &Path,
    mnt: &Path,
    ordering: Ordering,
) -> Result<(fuser::BackgroundSession, Arc<Mutex<fs::Shared>>, u64), MountError> {
    let io = |what: &str| {
        let what = what.to_string();
        move |e| MountError::Io(what, e)
    };
    let root = open_path(backing).map_err(io("open the backing directory"))?;
    let grave = open_path(grave).map_err(io("open the graveyard"))?;
    let shared = Arc::new(Mutex::new(
        fs::Shared::new(root, grave, ordering).map_err(io("stat the backing directory"))?,
    ));
    let mut config = fuser::Config::default();
    config.mount_options = vec![
        fuser::MountOption::FSName("cis490-faultfs".into()),
        fuser::MountOption::Subtype("faultfs".into()),
    ];
    let ops = fs::Ops {
        shared: shared.clone(),
    };
    let session = fuser::spawn_mount(ops, mnt, &config).map_err(|e| {
        MountError::Io(
            format!(
                "mount the fault filesystem on {} through /dev/fuse",
                mnt.display()
            ),
            e,
        )
    })?;
    let dev = std::fs::metadata(mnt)
        .map_err(io("stat the mount point"))?
        .dev();
    Ok((session, shared, u64::from(libc::minor(dev))))
}

/// SIGKILLs every process but this one that has something open under `mnt` (a descriptor,
/// its working or root directory, its executable), and waits until they hold nothing there.
/// Returns how many were killed.
fn kill_users(mnt: &Path) -> usize {
    let me = std::process::id();
    let users = || -> Vec<u32> {
        let Ok(procs) = std::fs::read_dir("/proc") else {
            return Vec::new();
        };
        let mut found = Vec::new();
        for p in procs.flatten() {
            let Some(pid) = p.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                continue;
            };
            if pid == me {
                continue;
            }
            let base = p.path();
            let on_mount = |link: &Path| std::fs::read_link(link).is_ok_and(|t| t.starts_with(mnt));
            let mut hit = ["cwd", "root", "exe"]
                .iter()
                .any(|l| on_mount(&base.join(l)));
            if !hit {
                if let Ok(fds) = std::fs::read_dir(base.join("fd")) {
                    hit = fds.flatten().any(|fd| on_mount(&fd.path()));
                }
            }
            if hit {
                found.push(pid);
            }
        }
        found
    };
    let victims = users();
    for pid in &victims {
        // SAFETY: kill has no memory-safety preconditions.
        unsafe { libc::kill(*pid as libc::pid_t, libc::SIGKILL) };
    }
    // A killed process lets go of its files as it dies (a zombie holds none).
    let deadline = Instant::now() + Duration::from_secs(10);
    while !users().is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    victims.len()
}

/// Whether `path` names nothing (`ENOENT`), for checks.
pub fn absent(path: &Path) -> bool {
    matches!(std::fs::symlink_metadata(path), Err(e) if e.kind() == io::ErrorKind::NotFound)
}
