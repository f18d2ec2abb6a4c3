//! The work loop: scan, sweep, clean up, dispatch ready episodes to `concurrency` workers, apply
//! each outcome as a queue transition, back off what failed, and feed the systemd watchdog only
//! while the loop and every upload make progress.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use cis490_common::{notify, ErrorCode, Reason};

use crate::config::Config;
use crate::pack::{Compression, PackError};
use crate::queue::{self, Candidate, Queue, Stamp, Tarball};
use crate::transport::{Outcome, Shipment, Transport};

/// Exponential backoff with full jitter, capped, never shorter than the server's Retry-After.
pub fn backoff_delay(
    attempt: u32,
    cap: Duration,
    retry_after: Option<Duration>,
    unit: f64,
) -> Duration {
    let base = Duration::from_secs(1);
    let ceiling = base
        .checked_mul(1u32.checked_shl(attempt.min(20)).unwrap_or(u32::MAX))
        .unwrap_or(cap)
        .min(cap);
    let jittered = ceiling.mul_f64(unit.clamp(0.0, 1.0));
    match retry_after {
        Some(ra) => jittered.max(ra.min(cap.max(ra))),
        None => jittered,
    }
}

/// `zstd_threads = 0` means "all cores" for the host, shared by the `concurrency` packs that may
/// run at once, so packing never oversubscribes the cores (nor multiplies zstd's buffers).
pub fn zstd_threads_per_pack(configured: u32, concurrency: usize, cores: usize) -> u32 {
    if configured > 0 {
        return configured;
    }
    (cores / concurrency.max(1)).max(1) as u32
}

#[derive(Debug, Clone, Copy)]
struct Retry {
    attempts: u32,
    until: Instant,
}

/// How one attempt ended, for `once`'s exit code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Shipped,
    Quarantined,
    Kept,
}

/// An upload's own byte counter, its value at the last look, and when it last moved.
type UploadProgress = (Arc<std::sync::atomic::AtomicU64>, u64, Instant);

pub struct Shipper {
    pub cfg: Config,
    pub queue: Queue,
    pub transport: Arc<Transport>,
    retries: Mutex<HashMap<String, Retry>>,
    inflight: Mutex<HashSet<String>>,
    /// Last time the scan loop went round.
    loop_tick: Mutex<Instant>,
    /// Uploads in flight: their own byte counter, its last value, and when it last moved.
    uploads: Mutex<HashMap<String, UploadProgress>>,
    /// Tar SHA-256 and length of tarballs packed by this process, so a retry does not hash
    /// the tarball again.
    packed: Mutex<HashMap<String, (String, u64)>>,
    /// Names in episodes/ that are not episode ids, already warned about.
    warned: Mutex<HashSet<String>>,
    last_cleanup: Mutex<Option<Instant>>,
    /// The last listing of episodes/, consumed front to back between listings so that a large
    /// backlog is listed once per scan interval, not once per upload.
    pending: Mutex<(std::collections::VecDeque<Candidate>, Option<Instant>)>,
    /// At most `concurrency` packs and `concurrency` uploads at once, but up to twice that many
    /// episodes in hand: the next episodes are packed while the current ones are on the wire.
    pack_slots: Arc<tokio::sync::Semaphore>,
    upload_slots: Arc<tokio::sync::Semaphore>,
}

/// Episodes in hand per upload slot: one uploading, one packed (or packing) behind it.
const IN_HAND_PER_SLOT: usize = 2;

/// How long a retire may wait for the fsync that makes it durable (`Queue::sync_retired`); a
/// power cut inside that window means re-shipping those episodes, answered with already_stored.
const RETIRE_SYNC_EVERY: Duration = Duration::from_secs(1);

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Invariant: every critical section below is a plain map update that cannot panic midway.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Shipper {
    pub fn new(cfg: Config, transport: Transport) -> Shipper {
        let queue = Queue::new(&cfg.data_dir);
        let conc = cfg.shipping.concurrency.max(1);
        Shipper {
            pack_slots: Arc::new(tokio::sync::Semaphore::new(conc)),
            upload_slots: Arc::new(tokio::sync::Semaphore::new(conc)),
            cfg,
            queue,
            transport: Arc::new(transport),
            retries: Mutex::new(HashMap::new()),
            inflight: Mutex::new(HashSet::new()),
            loop_tick: Mutex::new(Instant::now()),
            uploads: Mutex::new(HashMap::new()),
            packed: Mutex::new(HashMap::new()),
            warned: Mutex::new(HashSet::new()),
            last_cleanup: Mutex::new(None),
            pending: Mutex::new((std::collections::VecDeque::new(), None)),
        }
    }

    fn settle(&self) -> Duration {
        Duration::from_secs(self.cfg.shipping.settle_s)
    }

    fn compression(&self) -> Compression {
        Compression {
            level: self.cfg.shipping.zstd_level,
            threads: zstd_threads_per_pack(
                self.cfg.shipping.zstd_threads,
                self.cfg.shipping.concurrency,
                std::thread::available_parallelism().map_or(1, |n| n.get()),
            ),
        }
    }

    /// Sweep, recovery and (when due) retention: the start of every scan.
    fn housekeeping(&self) {
        let busy = lock(&self.inflight).clone();
        match self.queue.sweep(&busy) {
            Ok(removed) => {
                for name in removed {
                    let episode = name.split(".tar.zst").next().unwrap_or(&name).to_string();
                    tracing::info!(event = "outbox_swept", episode = %episode, file = %name, "removed a stale outbox file");
                }
            }
            Err(e) => tracing::error!(error = %e, "outbox sweep failed"),
        }
        let due = {
            let mut last = lock(&self.last_cleanup);
            let interval = Duration::from_secs(self.cfg.retention.cleanup_interval_s);
            let due = last.is_none_or(|t| t.elapsed() >= interval);
            if due {
                *last = Some(Instant::now());
            }
            due
        };
        if due {
            let now = SystemTime::now();
            let r = &self.cfg.retention;
            for (dir, keep) in [
                (self.queue.shipped_dir(), r.shipped_keep_days),
                (self.queue.quarantine_dir(), r.quarantine_keep_days),
            ] {
                match self.queue.cleanup(&dir, keep, now) {
                    Ok(removed) => {
                        for name in removed {
                            tracing::info!(event = "cleanup", episode = %name, dir = %dir.display(), keep_days = keep, "removed an expired entry");
                        }
                    }
                    Err(e) => tracing::error!(error = %e, dir = %dir.display(), "cleanup failed"),
                }
            }
        }
    }

    /// Ready episodes not in flight and not backing off, oldest first, at most `limit`.
    fn ready(&self, limit: usize, skip: &HashSet<String>) -> Vec<Candidate> {
        let scan_every = Duration::from_secs(self.cfg.shipping.scan_interval_s);
        let mut pending = lock(&self.pending);
        let stale = pending.1.is_none_or(|t| t.elapsed() >= scan_every);
        if pending.0.is_empty() || stale {
            match self.queue.list_all() {
                Ok((l, invalid)) => {
                    let mut warned = lock(&self.warned);
                    for name in invalid {
                        if warned.insert(name.clone()) {
                            tracing::warn!(entry = %name, "episodes/ holds an entry whose name is not a valid episode id (letters, digits, '.', '_', '-'; at most 128); it is never shipped");
                        }
                    }
                    *pending = (l.into(), Some(Instant::now()));
                }
                Err(e) => {
                    tracing::error!(error = %e, "failed to list episodes");
                    return Vec::new();
                }
            }
        }
        let now_sys = SystemTime::now();
        let now = Instant::now();
        let inflight = lock(&self.inflight).clone();
        let retries = lock(&self.retries).clone();
        let mut out = Vec::new();
        // Episodes skipped here come back with the next listing.
        while out.len() < limit {
            let Some(c) = pending.0.pop_front() else {
                break;
            };
            if inflight.contains(&c.id) || skip.contains(&c.id) {
                continue;
            }
            if retries.get(&c.id).is_some_and(|r| r.until > now) {
                continue;
            }
            if c.dir.is_dir() && self.queue.is_ready(&c, self.settle(), now_sys) {
                out.push(c);
            }
        }
        out
    }

    fn note_retry(&self, id: &str, delay: Duration) {
        let mut r = lock(&self.retries);
        let e = r.entry(id.to_string()).or_insert(Retry {
            attempts: 0,
            until: Instant::now(),
        });
        e.attempts += 1;
        e.until = Instant::now() + delay;
    }

    fn attempts(&self, id: &str) -> u32 {
        lock(&self.retries).get(id).map_or(0, |r| r.attempts)
    }

    /// One episode, start to finish: stamp, pack (or reuse the tarball), ship, transition.
    pub async fn process(self: &Arc<Self>, c: Candidate) -> Verdict {
        let id = c.id.clone();
        let commit = match queue::read_stamp(&c.dir) {
            Stamp::Commit(commit) => commit.to_string(),
            Stamp::Missing => return Verdict::Kept,
            Stamp::Bad(why) => {
                tracing::error!(event = "ship_rejected", episode = %id, reason = Reason::Unstamped.as_str(), detail = %why, "meta.json has no usable code_version.commit");
                return self.quarantine(&id, Reason::Unstamped, None, None, None);
            }
        };
        let cached = lock(&self.packed)
            .get(&id)
            .cloned()
            .filter(|_| self.queue.tarball(&id).exists())
            .map(|(sha, len)| {
                let path = self.queue.tarball(&id);
                (sha, Tarball::File { path, len })
            });
        let (sha, tarball) = match cached {
            Some(x) => x,
            None => {
                // Re-hashing a tarball left by an earlier run costs as much disk and CPU as a
                // pack, so it takes a pack slot too (after a restart every episode in hand may
                // have one).
                let _packing = self
                    .pack_slots
                    .clone()
                    .acquire_owned()
                    .await
                    .expect("invariant: the pack semaphore is never closed");
                let me = self.clone();
                let cc = c.clone();
                let packed =
                    tokio::task::spawn_blocking(move || match me.queue.existing_tarball(&cc.id) {
                        Some((sha, len)) => {
                            let path = me.queue.tarball(&cc.id);
                            Ok((sha, Tarball::File { path, len }))
                        }
                        None => me
                            .queue
                            .pack(&cc, me.compression())
                            .map(|(p, t)| (p.tar_sha256, t)),
                    })
                    .await;
                match packed {
                    Ok(Ok((sha, tarball))) => {
                        // Only outbox files are worth remembering: a retry of an in-memory
                        // tarball packs the (small) episode again.
                        if let Tarball::File { len, .. } = &tarball {
                            lock(&self.packed).insert(id.clone(), (sha.clone(), *len));
                        }
                        (sha, tarball)
                    }
                    Ok(Err(PackError::Unsupported { path, kind })) => {
                        tracing::error!(event = "ship_rejected", episode = %id, reason = Reason::UnsupportedEntry.as_str(), path = %path.display(), kind, "episode holds an entry that cannot be shipped");
                        return self.quarantine(
                            &id,
                            Reason::UnsupportedEntry,
                            None,
                            None,
                            Some(commit),
                        );
                    }
                    Ok(Err(PackError::NonUtf8 { path })) => {
                        tracing::error!(event = "ship_rejected", episode = %id, reason = Reason::UnsupportedEntry.as_str(), path = %path.display(), "episode holds a file name that is not UTF-8");
                        return self.quarantine(
                            &id,
                            Reason::UnsupportedEntry,
                            None,
                            None,
                            Some(commit),
                        );
                    }
                    Ok(Err(e)) => {
                        let delay = self.transient_delay(&id, None);
                        tracing::warn!(event = "ship_transient", episode = %id, error = %e, retry_in_s = delay.as_secs(), "failed to pack; will retry");
                        return Verdict::Kept;
                    }
                    Err(e) => {
                        let delay = self.transient_delay(&id, None);
                        tracing::error!(event = "ship_transient", episode = %id, error = %e, retry_in_s = delay.as_secs(), "packing task failed; will retry");
                        return Verdict::Kept;
                    }
                }
            }
        };
        let shipment = Shipment {
            host_id: self.cfg.host_id.clone(),
            episode_id: id.clone(),
            commit: commit.clone(),
            tar_sha256: sha,
            tarball,
            progress: Arc::new(std::sync::atomic::AtomicU64::new(0)),
        };
        let uploading = self
            .upload_slots
            .clone()
            .acquire_owned()
            .await
            .expect("invariant: the upload semaphore is never closed");
        lock(&self.uploads).insert(id.clone(), (shipment.progress.clone(), 0, Instant::now()));
        let outcome = self.transport.ship(&shipment).await;
        lock(&self.uploads).remove(&id);
        // The next upload may start while this one is retired or quarantined.
        drop(uploading);
        self.apply(&id, &commit, &shipment, outcome)
    }

    fn transient_delay(&self, id: &str, retry_after: Option<Duration>) -> Duration {
        let cap = Duration::from_secs(self.cfg.shipping.max_backoff_s);
        let d = backoff_delay(self.attempts(id), cap, retry_after, rand::random::<f64>());
        self.note_retry(id, d);
        d
    }

    fn quarantine(
        &self,
        id: &str,
        reason: Reason,
        status: Option<u16>,
        body: Option<serde_json::Value>,
        commit: Option<String>,
    ) -> Verdict {
        let r = queue::QuarantineReason::new(id, reason, status, body, commit);
        match self.queue.quarantine(id, &r) {
            Ok(dest) => {
                lock(&self.retries).remove(id);
                lock(&self.packed).remove(id);
                tracing::warn!(event = "quarantined", episode = %id, reason = reason.as_str(), status = status.map_or_else(|| "none".to_string(), |s| s.to_string()), dir = %dest.display(), "episode quarantined");
                Verdict::Quarantined
            }
            Err(e)
                if e.kind() == std::io::ErrorKind::NotFound
                    && !self.queue.episodes_dir().join(id).is_dir() =>
            {
                tracing::info!(episode = %id, "episode was moved by another process meanwhile");
                Verdict::Quarantined
            }
            Err(e) => {
                tracing::error!(episode = %id, error = %e, "failed to quarantine; will try again");
                self.note_retry(id, Duration::from_secs(5));
                Verdict::Kept
            }
        }
    }

    fn apply(&self, id: &str, commit: &str, s: &Shipment, outcome: Outcome) -> Verdict {
        match outcome {
            Outcome::Stored { status, .. } => match self.queue.retire(id) {
                Ok(dest) => {
                    lock(&self.retries).remove(id);
                    lock(&self.packed).remove(id);
                    tracing::info!(event = "shipped", episode = %id, status, bytes = s.tarball.len(), tar_sha256 = %s.tar_sha256, dir = %dest.display(), "episode shipped");
                    Verdict::Shipped
                }
                Err(e) => {
                    tracing::error!(episode = %id, error = %e, "stored at the receiver but failed to retire; will re-ship (the receiver answers already_stored)");
                    self.note_retry(id, Duration::from_secs(5));
                    Verdict::Kept
                }
            },
            Outcome::Fatal {
                reason,
                status,
                body,
            } => {
                let message = body
                    .as_ref()
                    .and_then(|b| b.get("message"))
                    .and_then(|m| m.as_str())
                    .unwrap_or("")
                    .to_string();
                if reason == Reason::CommitNotInWindow {
                    let remediation = body
                        .as_ref()
                        .and_then(|b| b.get("remediation"))
                        .and_then(|m| m.as_str())
                        .unwrap_or("")
                        .to_string();
                    tracing::error!(
                        event = "ship_rejected",
                        episode = %id,
                        status,
                        reason = reason.as_str(),
                        commit,
                        remediation = ?remediation,
                        "this lab host's code is out of date; run on this host:\n{remediation}"
                    );
                } else {
                    tracing::error!(event = "ship_rejected", episode = %id, status, reason = reason.as_str(), message = %message, "receiver refused the episode");
                }
                self.quarantine(id, reason, Some(status), body, Some(commit.to_string()))
            }
            Outcome::Auth { status, body } => {
                let cap = Duration::from_secs(self.cfg.shipping.max_backoff_s);
                self.note_retry(id, cap);
                let message = body
                    .as_ref()
                    .and_then(|b| b.get("message"))
                    .and_then(|m| m.as_str())
                    .unwrap_or("")
                    .to_string();
                tracing::error!(event = "ship_rejected", episode = %id, status, reason = if status == 401 { ErrorCode::Unauthorized } else { ErrorCode::Forbidden }.as_str(), message = %message, retry_in_s = cap.as_secs(), "receiver refused this host's credentials; check the certificate and token");
                Verdict::Kept
            }
            Outcome::Transient {
                detail,
                retry_after,
            } => {
                let delay = self.transient_delay(id, retry_after);
                tracing::warn!(event = "ship_transient", episode = %id, detail = %detail, retry_in_s = delay.as_secs_f64(), "transient failure; will retry");
                Verdict::Kept
            }
        }
    }

    fn spawn(
        self: &Arc<Self>,
        set: &mut JoinSet<(String, Verdict)>,
        c: Candidate,
    ) -> tokio::task::Id {
        lock(&self.inflight).insert(c.id.clone());
        let me = self.clone();
        set.spawn(async move {
            let id = c.id.clone();
            let v = me.process(c).await;
            (id, v)
        })
        .id()
    }

    fn finished(
        &self,
        r: Result<(String, Verdict), tokio::task::JoinError>,
        ids: &HashMap<tokio::task::Id, String>,
    ) -> Option<(String, Verdict)> {
        match r {
            Ok((id, v)) => {
                lock(&self.inflight).remove(&id);
                Some((id, v))
            }
            Err(e) => {
                // A panic inside one episode's work: log it, release the id, keep going.
                if let Some(id) = ids.get(&e.id()) {
                    lock(&self.inflight).remove(id);
                    lock(&self.uploads).remove(id);
                    self.note_retry(id, Duration::from_secs(30));
                    tracing::error!(episode = %id, error = %e, "episode worker failed");
                }
                None
            }
        }
    }

    async fn sync_retired(&self) {
        let queue = self.queue.clone();
        match tokio::task::spawn_blocking(move || queue.sync_retired()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::error!(error = %e, "failed to fsync shipped/ after retiring; will try again")
            }
            Err(e) => tracing::error!(error = %e, "retire sync task failed; will try again"),
        }
    }

    /// Makes retires durable in batches until `stop` ([`Shipper::finish_retires`] does the last).
    fn spawn_retire_syncer(
        self: &Arc<Self>,
        stop: CancellationToken,
    ) -> tokio::task::JoinHandle<()> {
        let me = self.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tokio::time::sleep(RETIRE_SYNC_EVERY) => {}
                }
                if me.queue.retired_unsynced() {
                    me.sync_retired().await;
                }
            }
        })
    }

    /// Stops the retire syncer after its last round, then syncs once more for a retire that
    /// outlived the abort of its task; an error if any retire may not be durable.
    async fn finish_retires(
        &self,
        stop: CancellationToken,
        syncer: tokio::task::JoinHandle<()>,
    ) -> anyhow::Result<()> {
        stop.cancel();
        let _ = syncer.await;
        self.sync_retired().await;
        if !self.queue.retires_durable() {
            anyhow::bail!(
                "an fsync of shipped/ or episodes/ failed: the last retired episodes may not be durable (they are re-shipped if the move is lost)"
            );
        }
        Ok(())
    }

    /// `once`: every ready episode gets one attempt. Returns true when nothing is left to retry.
    pub async fn run_once(self: &Arc<Self>, shutdown: CancellationToken) -> anyhow::Result<bool> {
        self.queue.prepare()?;
        self.housekeeping();
        let stop_syncer = CancellationToken::new();
        let syncer = self.spawn_retire_syncer(stop_syncer.clone());
        let mut attempted = HashSet::new();
        let mut kept = 0usize;
        let mut set = JoinSet::new();
        let mut ids = HashMap::new();
        let conc = self.cfg.shipping.concurrency * IN_HAND_PER_SLOT;
        loop {
            if shutdown.is_cancelled() {
                break;
            }
            let free = conc.saturating_sub(set.len());
            if free > 0 {
                let batch = self.ready(free, &attempted);
                if batch.is_empty() && set.is_empty() {
                    break;
                }
                for c in batch {
                    attempted.insert(c.id.clone());
                    let id = c.id.clone();
                    ids.insert(self.spawn(&mut set, c), id);
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => break,
                r = set.join_next_with_id() => match r {
                    Some(r) => {
                        let tid = match &r { Ok((t, _)) => *t, Err(e) => e.id() };
                        let r = r.map(|(_, x)| x);
                        if let Some((_, Verdict::Kept)) = self.finished(r, &ids) { kept += 1; }
                        ids.remove(&tid);
                    }
                    None => continue,
                },
            }
        }
        set.abort_all();
        while set.join_next().await.is_some() {}
        self.finish_retires(stop_syncer, syncer).await?;
        Ok(kept == 0 && !shutdown.is_cancelled())
    }

    /// The daemon: runs until `shutdown`; `ready` fires once the queue is built.
    pub async fn run(
        self: &Arc<Self>,
        shutdown: CancellationToken,
        on_ready: impl FnOnce(),
    ) -> anyhow::Result<()> {
        self.queue.prepare()?;
        self.housekeeping();
        let initial = self.queue.list()?.len();
        tracing::info!(queued = initial, data_dir = %self.cfg.data_dir.display(), "shipper started");
        on_ready();
        let watchdog = notify::watchdog_interval().map(|every| {
            let me = self.clone();
            let stop = shutdown.clone();
            tokio::spawn(async move { me.watchdog(every, stop).await })
        });
        let stop_syncer = CancellationToken::new();
        let syncer = self.spawn_retire_syncer(stop_syncer.clone());
        let mut set = JoinSet::new();
        let mut ids = HashMap::new();
        let conc = self.cfg.shipping.concurrency * IN_HAND_PER_SLOT;
        let scan_every = Duration::from_secs(self.cfg.shipping.scan_interval_s);
        let mut next_scan = Instant::now();
        let mut refill = false;
        loop {
            *lock(&self.loop_tick) = Instant::now();
            if Instant::now() >= next_scan {
                self.housekeeping();
                next_scan = Instant::now() + scan_every;
                refill = true;
            }
            if refill {
                refill = false;
                let free = conc.saturating_sub(set.len());
                for c in self.ready(free, &HashSet::new()) {
                    let id = c.id.clone();
                    ids.insert(self.spawn(&mut set, c), id);
                }
            }
            // Wake a few times a second so the watchdog sees the loop alive even with a short
            // WatchdogSec.
            let wait = next_scan
                .saturating_duration_since(Instant::now())
                .min(Duration::from_millis(250));
            tokio::select! {
                _ = shutdown.cancelled() => break,
                Some(r) = set.join_next_with_id(), if !set.is_empty() => {
                    let tid = match &r { Ok((t, _)) => *t, Err(e) => e.id() };
                    let r = r.map(|(_, x)| x);
                    self.finished(r, &ids);
                    // Forget the task's id too, or a months-long run grows by one entry an episode.
                    ids.remove(&tid);
                    // A slot freed: take more work right away (the sweep waits for the next scan).
                    refill = true;
                }
                _ = tokio::time::sleep(wait) => {}
            }
        }
        tracing::info!(
            in_flight = set.len(),
            "stopping: abandoning in-flight uploads (they are re-shipped on the next start)"
        );
        set.abort_all();
        let _ = tokio::time::timeout(Duration::from_secs(5), async {
            while set.join_next().await.is_some() {}
        })
        .await;
        if let Some(w) = watchdog {
            w.abort();
        }
        self.finish_retires(stop_syncer, syncer).await
    }

    /// `WATCHDOG=1` while the loop turns and every upload's bytes move (or it just started).
    async fn watchdog(self: Arc<Self>, every: Duration, stop: CancellationToken) {
        let window = every * 2;
        loop {
            let loop_ok = lock(&self.loop_tick).elapsed() < window;
            let uploads_ok = {
                let mut u = lock(&self.uploads);
                let now = Instant::now();
                for (counter, last, at) in u.values_mut() {
                    let v = counter.load(Ordering::Relaxed);
                    if v != *last {
                        *last = v;
                        *at = now;
                    }
                }
                u.values().all(|(_, _, at)| at.elapsed() < window)
            };
            if loop_ok && uploads_ok {
                notify::watchdog();
            } else {
                tracing::error!(
                    loop_ok,
                    uploads_ok,
                    "work stalled; withholding the watchdog heartbeat"
                );
            }
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(every) => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_zstd_threads_share_the_cores_between_packs() {
        assert_eq!(zstd_threads_per_pack(0, 2, 2), 1);
        assert_eq!(zstd_threads_per_pack(0, 2, 8), 4);
        assert_eq!(zstd_threads_per_pack(0, 4, 2), 1);
        assert_eq!(
            zstd_threads_per_pack(3, 2, 2),
            3,
            "an explicit value is kept"
        );
    }

    #[test]
    fn backoff_grows_caps_and_honours_retry_after() {
        let cap = Duration::from_secs(300);
        assert_eq!(backoff_delay(0, cap, None, 1.0), Duration::from_secs(1));
        assert_eq!(backoff_delay(3, cap, None, 1.0), Duration::from_secs(8));
        assert_eq!(backoff_delay(30, cap, None, 1.0), cap);
        assert_eq!(backoff_delay(5, cap, None, 0.0), Duration::ZERO);
        assert_eq!(backoff_delay(5, cap, None, 0.5), Duration::from_secs(16));
        assert_eq!(
            backoff_delay(0, cap, Some(Duration::from_secs(42)), 0.1),
            Duration::from_secs(42)
        );
    }
}
