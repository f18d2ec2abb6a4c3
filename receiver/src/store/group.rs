//! Group commit for the fs store (issue 21): uploads that finish while a flush is running
//! share the next one, so a burst of small uploads costs one fsync per host directory and one
//! `fdatasync` of `index.jsonl` per group instead of two fsyncs each.
//!
//! An upload's body is already durable and linked under `episodes/<host>/` when it joins the
//! queue. Whoever finds no flush running becomes the leader: it takes everything queued, fsyncs
//! each directory once, then appends every row in one write and one `fdatasync`, and wakes the
//! others. The order is the one a single upload had (the directory before the row), so a power
//! cut can still leave a stored file without a row, which start-up repair indexes, and never a
//! row without its file. No waiter returns before the flush that covers its own row ends, and a
//! failed flush fails every upload in the group: their files are unlinked by the leader before
//! anyone can see them, and no row of the group is written.

use std::collections::{BTreeSet, HashSet};
use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};

use super::IndexRow;

/// An upload waiting for its group's flush.
pub(crate) struct Pending {
    pub row: IndexRow,
    /// The stored file the row names.
    pub dest: PathBuf,
    /// Set by the leader: `None` when the row is durable, else why the group failed.
    ticket: Arc<OnceLock<Option<Failure>>>,
}

/// Why a group failed: the kind is kept, so a full disk still answers 507.
#[derive(Debug, Clone)]
pub(crate) struct Failure {
    kind: io::ErrorKind,
    message: String,
}

impl Failure {
    fn to_io(&self) -> io::Error {
        io::Error::new(self.kind, self.message.clone())
    }
}

#[derive(Default)]
struct State {
    queue: Vec<Pending>,
    /// (host, episode) of every row queued or being flushed.
    ids: HashSet<(String, String)>,
    flushing: bool,
}

/// How many flushes ran and how many rows they made durable (for tests and benchmarks).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Counts {
    pub groups: u64,
    pub rows: u64,
    pub dir_fsyncs: u64,
}

#[derive(Default)]
pub(crate) struct GroupCommit {
    state: Mutex<State>,
    flushed: Condvar,
    groups: AtomicU64,
    rows: AtomicU64,
    dir_fsyncs: AtomicU64,
}

/// What the leader runs for a group: make the directories named by `dirs` durable, then the
/// rows; on an error nothing of the group may be indexed.
pub(crate) trait Flush {
    fn fsync_dir(&self, dir: &std::path::Path) -> io::Result<()>;
    fn append_rows(&self, rows: &[&IndexRow]) -> io::Result<()>;
    /// Undoes the link of a stored file whose group failed.
    fn unlink(&self, dest: &std::path::Path);
}

impl GroupCommit {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether a row for this id is queued or being flushed: its file is linked but not yet
    /// durable, so the id must be decided again once that flush ends.
    pub(crate) fn is_pending(&self, host: &str, ep: &str) -> bool {
        self.lock()
            .ids
            .contains(&(host.to_string(), ep.to_string()))
    }

    /// Waits until no row for this id is queued or being flushed.
    pub(crate) fn wait_settled(&self, host: &str, ep: &str) {
        let id = (host.to_string(), ep.to_string());
        let mut st = self.lock();
        while st.ids.contains(&id) {
            st = self.flushed.wait(st).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Queues a row whose file is linked at `dest`; the caller holds the store's writer lock,
    /// so no other upload can decide this id between the link and this call.
    pub(crate) fn enqueue(&self, row: IndexRow, dest: PathBuf) -> Arc<OnceLock<Option<Failure>>> {
        let ticket = Arc::new(OnceLock::new());
        let mut st = self.lock();
        st.ids.insert((row.host_id.clone(), row.episode_id.clone()));
        st.queue.push(Pending {
            row,
            dest,
            ticket: ticket.clone(),
        });
        ticket
    }

    /// Returns once the group holding `ticket` is flushed: `Ok` when its row is durable.
    /// Leads a flush whenever one is due and none runs.
    pub(crate) fn wait(
        &self,
        ticket: &OnceLock<Option<Failure>>,
        flush: &dyn Flush,
    ) -> io::Result<()> {
        let mut st = self.lock();
        loop {
            if let Some(outcome) = ticket.get() {
                return match outcome {
                    None => Ok(()),
                    Some(f) => Err(f.to_io()),
                };
            }
            if st.flushing || st.queue.is_empty() {
                st = self.flushed.wait(st).unwrap_or_else(|p| p.into_inner());
                continue;
            }
            st.flushing = true;
            let group = std::mem::take(&mut st.queue);
            drop(st);
            let outcome = self.flush(&group, flush);
            st = self.lock();
            for p in &group {
                st.ids
                    .remove(&(p.row.host_id.clone(), p.row.episode_id.clone()));
                // Invariant: a ticket is set once, by the one leader that took its row.
                let _ = p.ticket.set(outcome.clone());
            }
            st.flushing = false;
            self.flushed.notify_all();
        }
    }

    fn flush(&self, group: &[Pending], flush: &dyn Flush) -> Option<Failure> {
        let dirs: BTreeSet<&std::path::Path> =
            group.iter().filter_map(|p| p.dest.parent()).collect();
        let result = (|| {
            for d in &dirs {
                self.dir_fsyncs.fetch_add(1, Ordering::Relaxed);
                flush.fsync_dir(d).map_err(|e| Failure {
                    kind: e.kind(),
                    message: format!("fsync of {}: {e}", d.display()),
                })?;
            }
            let rows: Vec<&IndexRow> = group.iter().map(|p| &p.row).collect();
            flush.append_rows(&rows).map_err(|e| Failure {
                kind: e.kind(),
                message: format!("index.jsonl: {e}"),
            })
        })();
        self.groups.fetch_add(1, Ordering::Relaxed);
        match result {
            Ok(()) => {
                self.rows.fetch_add(group.len() as u64, Ordering::Relaxed);
                None
            }
            Err(e) => {
                tracing::error!(error = %e.message, uploads = group.len(), "a group commit failed; every upload in it fails");
                for p in group {
                    flush.unlink(&p.dest);
                }
                Some(e)
            }
        }
    }

    pub(crate) fn counts(&self) -> Counts {
        Counts {
            groups: self.groups.load(Ordering::Relaxed),
            rows: self.rows.load(Ordering::Relaxed),
            dir_fsyncs: self.dir_fsyncs.load(Ordering::Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;
    use std::sync::mpsc;
    use std::time::{Duration, Instant};

    fn row(host: &str, ep: &str) -> IndexRow {
        IndexRow {
            ts: "2026-12-07T00:00:00Z".into(),
            host_id: host.into(),
            episode_id: ep.into(),
            path: format!("episodes/{host}/{ep}.tar.zst"),
            bytes: 1,
            tar_sha256: "0".repeat(64),
            uncompressed_bytes: 2,
            files: 1,
            commit: "0".repeat(40),
        }
    }

    /// Records what the leader does, in order; the first directory fsync can be held until
    /// the test lets it go, and any step can be made to fail.
    #[derive(Default)]
    struct Log {
        events: Mutex<Vec<String>>,
        hold_first: Mutex<Option<mpsc::Receiver<()>>>,
        fail_dir: Mutex<Option<String>>,
    }

    impl Flush for Log {
        fn fsync_dir(&self, dir: &Path) -> io::Result<()> {
            if let Some(rx) = self.hold_first.lock().unwrap().take() {
                rx.recv().unwrap();
            }
            self.events
                .lock()
                .unwrap()
                .push(format!("dir {}", dir.display()));
            if self.fail_dir.lock().unwrap().as_deref() == dir.to_str() {
                return Err(io::Error::new(io::ErrorKind::StorageFull, "ENOSPC"));
            }
            Ok(())
        }
        fn append_rows(&self, rows: &[&IndexRow]) -> io::Result<()> {
            let ids: Vec<String> = rows.iter().map(|r| r.episode_id.clone()).collect();
            self.events
                .lock()
                .unwrap()
                .push(format!("rows {}", ids.join(",")));
            Ok(())
        }
        fn unlink(&self, dest: &Path) {
            self.events
                .lock()
                .unwrap()
                .push(format!("unlink {}", dest.display()));
        }
    }

    fn commit(g: &GroupCommit, log: &Log, host: &str, ep: &str) -> io::Result<()> {
        let t = g.enqueue(
            row(host, ep),
            PathBuf::from(format!("/s/episodes/{host}/{ep}.tar.zst")),
        );
        g.wait(&t, log)
    }

    fn wait_until(what: &str, cond: impl Fn() -> bool) {
        let start = Instant::now();
        while !cond() {
            assert!(start.elapsed() < Duration::from_secs(10), "{what}");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Uploads that arrive while a flush runs share the next one: one fsync per directory and
    /// one index append for all of them, each after its directories.
    #[test]
    fn uploads_arriving_during_a_flush_share_the_next_one() {
        let g = Arc::new(GroupCommit::default());
        let log = Arc::new(Log::default());
        let (go, held) = mpsc::channel();
        *log.hold_first.lock().unwrap() = Some(held);
        std::thread::scope(|s| {
            let first = s.spawn(|| commit(&g, &log, "a", "e0"));
            wait_until("the first flush starts", || {
                g.lock().flushing && g.is_pending("a", "e0")
            });
            let mut rest = Vec::new();
            for i in 1..=12 {
                let (g, log) = (&g, &log);
                let host = if i % 2 == 0 { "a" } else { "b" };
                rest.push(s.spawn(move || commit(g, log, host, &format!("e{i}"))));
            }
            wait_until("all twelve are queued", || g.lock().queue.len() == 12);
            go.send(()).unwrap();
            first.join().unwrap().unwrap();
            for r in rest {
                r.join().unwrap().unwrap();
            }
        });
        let events = log.events.lock().unwrap().clone();
        assert_eq!(events.len(), 5, "{events:?}");
        assert_eq!(events[0], "dir /s/episodes/a");
        assert_eq!(events[1], "rows e0");
        assert_eq!(events[2], "dir /s/episodes/a");
        assert_eq!(events[3], "dir /s/episodes/b");
        let mut ids: Vec<&str> = events[4]
            .strip_prefix("rows ")
            .unwrap()
            .split(',')
            .collect();
        ids.sort_by_key(|e| e[1..].parse::<u32>().unwrap());
        assert_eq!(ids, (1..=12).map(|i| format!("e{i}")).collect::<Vec<_>>());
        assert_eq!(
            g.counts(),
            Counts {
                groups: 2,
                rows: 13,
                dir_fsyncs: 3
            }
        );
        assert!(!g.is_pending("a", "e0") && !g.is_pending("b", "e1"));
    }

    /// A failed directory fsync fails every upload of its group: no row is written, every
    /// file of the group is unlinked, and the next group is unaffected.
    #[test]
    fn a_failed_fsync_fails_the_whole_group_and_writes_no_row() {
        let g = Arc::new(GroupCommit::default());
        let log = Arc::new(Log::default());
        let (go, held) = mpsc::channel();
        *log.hold_first.lock().unwrap() = Some(held);
        *log.fail_dir.lock().unwrap() = Some("/s/episodes/b".into());
        std::thread::scope(|s| {
            let first = s.spawn(|| commit(&g, &log, "a", "e0"));
            wait_until("the first flush starts", || g.lock().flushing);
            let second = [
                s.spawn(|| commit(&g, &log, "a", "e1")),
                s.spawn(|| commit(&g, &log, "b", "e2")),
            ];
            wait_until("both are queued", || g.lock().queue.len() == 2);
            go.send(()).unwrap();
            first.join().unwrap().unwrap();
            for r in second {
                let e = r.join().unwrap().unwrap_err();
                assert!(
                    e.to_string().contains("fsync of /s/episodes/b: ENOSPC"),
                    "{e}"
                );
                // A full disk stays a full disk (507), whoever's directory it hit.
                assert_eq!(e.kind(), io::ErrorKind::StorageFull);
            }
        });
        let events = log.events.lock().unwrap().clone();
        assert!(
            events.iter().filter(|e| e.starts_with("rows")).count() == 1,
            "{events:?}"
        );
        assert!(events.contains(&"unlink /s/episodes/a/e1.tar.zst".to_string()));
        assert!(events.contains(&"unlink /s/episodes/b/e2.tar.zst".to_string()));
        assert_eq!(g.counts().rows, 1);
        *log.fail_dir.lock().unwrap() = None;
        commit(&g, &log, "b", "e3").unwrap();
        assert_eq!(g.counts().rows, 2);
    }
}
