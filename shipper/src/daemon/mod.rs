//! The work loop shared by `run` and `once`: scan, sweep, clean up, hand ready episodes to
//! workers (two per large upload slot, so the next is packed while the current one is on the
//! wire, and one per slot of the small lane, see `in_hand::Slots`),
//! make retires durable in batches, feed the systemd watchdog (and answer `/healthz`) only while
//! the loop and every upload make progress, and at every scan bring the metrics up to date (queue
//! counts, the install checkout's HEAD, whether this binary is stale). `in_hand` holds what is
//! known about each episode; `steps` is one episode's attempt.

mod in_hand;
#[cfg(test)]
mod lanes_tests;
#[cfg(test)]
mod model_tests;
mod steps;

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tokio::sync::Semaphore;
use tokio::task::{JoinError, JoinSet};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use cis490_common::binary::BinaryWatch;
use cis490_common::notify;

use crate::adapt::{Controller, Move, Usage};
use crate::config::Config;
use crate::host;
use crate::metrics::{self, CertFile, Metrics, Textfile};
use crate::pack::{self, Compression};
use crate::queue::{Candidate, Queue, IN_MEMORY_MAX};
use crate::retry::{RetryPolicy, Setback};
use crate::transport::Transport;
use in_hand::{InHand, Slots};

/// How one attempt ended, for `once`'s exit code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    Shipped,
    Quarantined,
    Kept,
}

/// What the work loop is run for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// `run`: until shutdown, sweeping and cleaning up every `scan_interval_s`.
    Daemon,
    /// `once`: every ready episode gets one attempt, then the loop ends.
    Once,
}

/// Episodes in hand per large upload slot: one uploading, one packed (or packing) behind it.
const IN_HAND_PER_SLOT: usize = 2;

/// How many more episodes the work loop may hand to workers, by the size the settle walk saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Room {
    /// Episodes whose tar may outgrow memory (an outbox tarball each).
    large: usize,
    /// Episodes of both sizes.
    total: usize,
}

impl Room {
    /// What is left of the limits for `slots` with `workers` in hand, `large` of them large.
    fn left(slots: Slots, workers: usize, large: usize) -> Room {
        let large_max = slots.large * IN_HAND_PER_SLOT;
        // The small lane's extra slots get one episode each: a small pack takes well under a
        // millisecond, so none needs to wait packed behind it.
        let total_max = large_max + (slots.total - slots.large);
        Room {
            large: large_max.saturating_sub(large),
            total: total_max.saturating_sub(workers),
        }
    }

    /// Takes room for an episode whose tar is about `tar_bytes` long: whether it counts as
    /// large, or `None` when there is no room (then it waits, and so do the younger ones behind
    /// it). Only admission goes by this estimate; the upload's lane is the tarball's own (in
    /// memory or in outbox/); an estimate that misses (long names) can leave a few more outbox
    /// tarballs in hand than `2 × concurrency`, never more than one per episode in hand.
    fn take(&mut self, tar_bytes: u64) -> Option<bool> {
        let large = tar_bytes > IN_MEMORY_MAX as u64;
        if self.total == 0 || (large && self.large == 0) {
            return None;
        }
        self.total -= 1;
        self.large -= usize::from(large);
        Some(large)
    }
}

/// How long a retire may wait for the fsync that makes it durable (`Queue::sync_retired`); a
/// power cut inside that window means re-shipping those episodes, answered with already_stored.
const RETIRE_SYNC_EVERY: Duration = Duration::from_secs(1);

/// How long a stopping daemon waits for its aborted workers.
const DRAIN_LIMIT: Duration = Duration::from_secs(5);

/// How long the loop or an upload may stand still before `/healthz` says so, when systemd gave
/// no watchdog interval (then `WATCHDOG_USEC` is the limit): the unit's `WatchdogSec`.
const HEALTH_WINDOW: Duration = Duration::from_secs(180);

pub(crate) struct Shipper {
    cfg: Config,
    queue: Queue,
    transport: Transport,
    retry: RetryPolicy,
    /// `[shipping]`'s zstd settings, `zstd_threads = 0` resolved for this host's cores; under
    /// `compression = "auto"` the level is `adapt`'s.
    compression: Compression,
    /// The zstd level adapted to the link (`compression = "auto"` only).
    adapt: Option<Mutex<Controller>>,
    in_hand: InHand,
    /// The upload lanes `in_hand` enforces, for the work loop's own limit of episodes in hand.
    slots: Slots,
    /// At most `concurrency` packs at once (the upload slots are counted in `in_hand`).
    pack_slots: Semaphore,
    /// Last time the work loop went round: the watchdog's first condition.
    loop_turned: Mutex<Instant>,
    metrics: Arc<Metrics>,
    /// `[metrics] textfile`, rewritten at every scan.
    textfile: Option<Textfile>,
    /// This process's own executable, checked for replacement at every scan.
    binary: Option<BinaryWatch>,
}

/// This process's clock and CPU time (user + system, every thread), for the level controller.
/// Without `getrusage` the CPU reads 0, so the controller goes by the stages' times alone.
pub(crate) fn usage() -> Usage {
    static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    let wall_s = START
        .get_or_init(std::time::Instant::now)
        .elapsed()
        .as_secs_f64();
    let secs = |t: nix::sys::time::TimeVal| t.tv_sec() as f64 + t.tv_usec() as f64 / 1e6;
    let cpu_s = nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_SELF)
        .map_or(0.0, |u| secs(u.user_time()) + secs(u.system_time()));
    Usage { wall_s, cpu_s }
}

/// The work loop's own bookkeeping. Only the loop touches it, so it needs no lock.
#[derive(Default)]
struct Rounds {
    /// The last listing of episodes/, consumed front to back between listings so that a large
    /// backlog is listed once per scan interval, not once per upload.
    listing: VecDeque<Candidate>,
    listed_at: Option<Instant>,
    /// Names in episodes/ that are not episode ids, already warned about.
    warned: HashSet<String>,
    last_cleanup: Option<Instant>,
    /// `once`: the episodes already given their one attempt.
    attempted: HashSet<String>,
    workers: JoinSet<(String, Verdict)>,
    /// Each worker's episode (for a worker that panics: its result carries no id then) and
    /// whether the settle walk found it large.
    worker_ids: HashMap<tokio::task::Id, (String, bool)>,
    /// Workers whose episode the settle walk found large.
    large_workers: usize,
    /// Attempts that ended with the episode kept.
    kept: usize,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Invariant: the critical sections store an Instant or do the level controller's arithmetic;
    // neither can panic midway.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Shipper {
    /// `textfile` has been checked (`Textfile::open`) by the caller, as a config error.
    pub(crate) fn new(cfg: Config, transport: Transport, textfile: Option<Textfile>) -> Shipper {
        let conc = cfg.shipping.concurrency.max(1);
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let metrics = Arc::new(Metrics::new());
        // The certificates in use are those loaded now: a renewed file needs a restart anyway.
        for (which, file) in [
            (CertFile::Client, &cfg.receiver.cert_file),
            (CertFile::Ca, &cfg.receiver.ca_file),
        ] {
            match cis490_common::tls::summarize(file) {
                Ok(s) => metrics.cert_not_after(which, s.not_after),
                Err(e) => {
                    tracing::warn!(file = %file.display(), error = %e, "failed to read the certificate's expiry for the metrics")
                }
            }
        }
        metrics.host_commit(transport.host_commit().as_deref().map(String::as_str));
        let compression = cfg.shipping.compression(cores);
        metrics.zstd_level(compression.level);
        let adapt = (compression.mode == pack::Mode::Auto).then(|| {
            Mutex::new(Controller::new(
                compression.level,
                cfg.shipping.zstd_max_level,
                cores,
            ))
        });
        Shipper {
            queue: Queue::new(&cfg.data_dir),
            transport,
            retry: RetryPolicy::new(Duration::from_secs(cfg.shipping.max_backoff_s)),
            compression,
            adapt,
            in_hand: InHand::new(Slots::for_concurrency(conc)),
            slots: Slots::for_concurrency(conc),
            pack_slots: Semaphore::new(conc),
            loop_turned: Mutex::new(Instant::now()),
            metrics,
            textfile,
            binary: BinaryWatch::of_self(),
            cfg,
        }
    }

    /// The zstd settings for a pack starting now.
    fn compression_now(&self) -> Compression {
        let mut c = self.compression;
        if let Some(a) = &self.adapt {
            c.level = lock(a).level();
        }
        c
    }

    /// Feeds the level controller (no-op under `compression = "level"`) and reports a move.
    fn adapt(&self, feed: impl FnOnce(&mut Controller) -> Option<Move>) {
        let Some(a) = &self.adapt else { return };
        let Some(m) = feed(&mut lock(a)) else { return };
        self.metrics.zstd_level(m.to);
        tracing::info!(
            event = "zstd_level",
            from = m.from,
            to = m.to,
            pack_s_per_gib = format_args!("{:.2}", m.pack_s_per_gib),
            send_s_per_gib = format_args!("{:.2}", m.send_s_per_gib),
            cpu_busy = format_args!("{:.2}", m.cpu_busy),
            "zstd level {} -> {}: {}",
            m.from,
            m.to,
            m.why
        );
    }

    /// The daemon: runs until `shutdown`, serving `/metrics` and `/healthz` on `ops` (already
    /// bound) if given; `on_ready` fires once the queue is built and the listener is up.
    pub(crate) async fn run(
        self: &Arc<Self>,
        shutdown: CancellationToken,
        on_ready: impl FnOnce(),
        ops: Option<tokio::net::TcpListener>,
    ) -> anyhow::Result<()> {
        let mut rounds = Rounds::default();
        self.queue.prepare()?;
        self.start_metrics();
        self.housekeeping(&mut rounds);
        let initial = self.queue.list()?.len();
        let metrics_listen = ops
            .as_ref()
            .and_then(|l| l.local_addr().ok())
            .map_or_else(|| "off".to_string(), |a| a.to_string());
        let host_commit = self.transport.host_commit();
        tracing::info!(
            version = env!("CARGO_PKG_VERSION"),
            pid = std::process::id(),
            queued = initial,
            data_dir = %self.cfg.data_dir.display(),
            metrics_listen = %metrics_listen,
            host_commit = %host_commit.as_deref().map_or("none", String::as_str),
            "shipper started"
        );
        let served = ops.map(|listener| {
            let me = self.clone();
            let window = notify::watchdog_interval().map_or(HEALTH_WINDOW, |every| every * 2);
            let health: metrics::Health = Arc::new(move || me.progress(window));
            tokio::spawn(metrics::serve(
                listener,
                self.metrics.clone(),
                health,
                shutdown.clone(),
            ))
        });
        on_ready();
        let watchdog = notify::watchdog_interval().map(|every| {
            let me = self.clone();
            let stop = shutdown.clone();
            tokio::spawn(async move { me.watchdog(every, stop).await })
        });
        let worked = self.work(Mode::Daemon, &mut rounds, &shutdown).await;
        for task in [watchdog, served].into_iter().flatten() {
            task.abort();
        }
        worked
    }

    /// `once`: every ready episode gets one attempt. Returns true when nothing is left to retry.
    pub(crate) async fn once(
        self: &Arc<Self>,
        shutdown: CancellationToken,
    ) -> anyhow::Result<bool> {
        let mut rounds = Rounds::default();
        self.queue.prepare()?;
        self.start_metrics();
        self.housekeeping(&mut rounds);
        self.work(Mode::Once, &mut rounds, &shutdown).await?;
        // The textfile shows where the pass left the queue.
        self.observe();
        Ok(rounds.kept == 0 && !shutdown.is_cancelled())
    }

    /// The loop both modes share; the caller has prepared the queue and swept it once.
    async fn work(
        self: &Arc<Self>,
        mode: Mode,
        rounds: &mut Rounds,
        shutdown: &CancellationToken,
    ) -> anyhow::Result<()> {
        let stop_syncer = CancellationToken::new();
        let syncer = self.spawn_retire_syncer(stop_syncer.clone());
        let scan_every = Duration::from_secs(self.cfg.shipping.scan_interval_s);
        let mut next_scan = Instant::now() + scan_every;
        let mut refill = true;
        loop {
            *lock(&self.loop_turned) = Instant::now();
            if mode == Mode::Daemon && Instant::now() >= next_scan {
                self.housekeeping(rounds);
                next_scan = Instant::now() + scan_every;
                refill = true;
            }
            let room = Room::left(self.slots, rounds.workers.len(), rounds.large_workers);
            if refill && room.total > 0 {
                refill = false;
                let batch = self.ready(rounds, room, mode);
                if mode == Mode::Once && batch.is_empty() && rounds.workers.is_empty() {
                    break;
                }
                for (c, large) in batch {
                    self.spawn(rounds, c, large);
                }
            }
            // Wake a few times a second so the watchdog sees the loop alive even with a short
            // WatchdogSec.
            let wait = next_scan
                .saturating_duration_since(Instant::now())
                .min(Duration::from_millis(250));
            tokio::select! {
                _ = shutdown.cancelled() => break,
                Some(r) = rounds.workers.join_next_with_id(), if !rounds.workers.is_empty() => {
                    self.finished(rounds, r);
                    // A worker is free: take more work right away (the sweep waits for the
                    // next scan).
                    refill = true;
                }
                _ = tokio::time::sleep(wait) => {}
            }
        }
        if mode == Mode::Daemon {
            tracing::info!(
                in_flight = rounds.workers.len(),
                "stopping: abandoning in-flight uploads (they are re-shipped on the next start)"
            );
        }
        rounds.workers.abort_all();
        let _ = tokio::time::timeout(DRAIN_LIMIT, async {
            while rounds.workers.join_next().await.is_some() {}
        })
        .await;
        self.finish_retires(stop_syncer, syncer).await
    }

    fn settle(&self) -> Duration {
        Duration::from_secs(self.cfg.shipping.settle_s)
    }

    /// What the metrics know from before this process: the last success is the newest retire
    /// in shipped/ (its mtime is set then), so a restart does not look like a stall.
    fn start_metrics(&self) {
        if let Some(t) = self.queue.last_shipped_at() {
            self.metrics.last_succeeded_at(t);
        }
    }

    /// The scan's look at itself (SPEC §12): queue counts, the install checkout's HEAD, whether
    /// this binary was replaced; then the textfile.
    fn observe(&self) {
        self.metrics
            .record_census(&self.queue.census(SystemTime::now()));
        self.refresh_host_commit();
        self.check_binary();
        if let Some(t) = &self.textfile {
            t.write(&self.metrics.render());
        }
    }

    /// Reads the install checkout's HEAD again, so a `git pull` shows in the next request's
    /// `X-Cis490-Host-Commit` and in build_info without a restart.
    fn refresh_host_commit(&self) {
        let root = &self.cfg.receiver.install_root;
        let head = host::installed_commit(root);
        let before = self.transport.host_commit();
        if before.as_deref() != head.as_ref() {
            tracing::info!(
                install_root = %root.display(),
                host_commit = %head.as_deref().unwrap_or("none"),
                previous = %before.as_deref().map_or("none", String::as_str),
                "the install checkout's HEAD changed"
            );
            self.transport.set_host_commit(head.clone());
        }
        self.metrics.host_commit(head.as_deref());
    }

    /// Logs `event=stale_binary` once, the first time this process's executable is found
    /// replaced; it keeps working (restarting is the operator's or the install script's call).
    fn check_binary(&self) {
        let Some(watch) = &self.binary else { return };
        if let Some(why) = watch.check() {
            let path = watch.path().display();
            tracing::error!(
                event = "stale_binary",
                path = %path,
                why = why.to_string(),
                fix = host::RESTART,
                "this daemon runs an old binary: {path} changed since it started ({why}); restart it: {}",
                host::RESTART
            );
        }
        self.metrics.binary_stale(watch.is_stale());
    }

    /// Sweep, recovery, (when due) retention and the metrics: the start of every scan.
    fn housekeeping(&self, rounds: &mut Rounds) {
        match self.queue.sweep(&self.in_hand.busy()) {
            Ok(removed) => {
                for name in removed {
                    let episode = name.split(".tar.zst").next().unwrap_or(&name).to_string();
                    tracing::info!(event = "outbox_swept", episode = %episode, file = %name, "removed a stale outbox file");
                }
            }
            Err(e) => tracing::error!(error = %e, "outbox sweep failed"),
        }
        self.retention(rounds);
        self.observe();
    }

    /// Retention (SPEC §2), at most once per `cleanup_interval_s`.
    fn retention(&self, rounds: &mut Rounds) {
        let interval = Duration::from_secs(self.cfg.retention.cleanup_interval_s);
        if rounds.last_cleanup.is_some_and(|t| t.elapsed() < interval) {
            return;
        }
        rounds.last_cleanup = Some(Instant::now());
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

    /// Ready episodes no worker has and not backing off, oldest first, as many as `room` takes
    /// (each with whether it is large); in `once`, each episode at most once. A large episode
    /// that finds no room stops the batch, so the small ones behind it do not overtake it.
    fn ready(&self, rounds: &mut Rounds, mut room: Room, mode: Mode) -> Vec<(Candidate, bool)> {
        let scan_every = Duration::from_secs(self.cfg.shipping.scan_interval_s);
        let stale = rounds.listed_at.is_none_or(|t| t.elapsed() >= scan_every);
        if rounds.listing.is_empty() || stale {
            match self.queue.list_all() {
                Ok((listing, invalid)) => {
                    for name in invalid {
                        if rounds.warned.insert(name.clone()) {
                            tracing::warn!(entry = %name, "episodes/ holds an entry whose name is not a valid episode id (letters, digits, '.', '_', '-'; at most 128); it is never shipped");
                        }
                    }
                    rounds.listing = listing.into();
                    rounds.listed_at = Some(Instant::now());
                }
                Err(e) => {
                    tracing::error!(error = %e, "failed to list episodes");
                    return Vec::new();
                }
            }
        }
        let now_sys = SystemTime::now();
        let now = Instant::now();
        let mut out = Vec::new();
        // Episodes skipped here come back with the next listing.
        while room.total > 0 {
            let Some(c) = rounds.listing.pop_front() else {
                break;
            };
            if !self.in_hand.available(&c.id, now)
                || (mode == Mode::Once && rounds.attempted.contains(&c.id))
                || !c.dir.is_dir()
            {
                continue;
            }
            let Some(tar_bytes) = self.queue.readiness(&c, self.settle(), now_sys) else {
                continue;
            };
            let Some(large) = room.take(tar_bytes) else {
                rounds.listing.push_front(c);
                break;
            };
            if mode == Mode::Once {
                rounds.attempted.insert(c.id.clone());
            }
            out.push((c, large));
        }
        out
    }

    /// Hands `c` to a worker of its own, so a panic in one episode's work stops only that one.
    fn spawn(self: &Arc<Self>, rounds: &mut Rounds, c: Candidate, large: bool) {
        self.in_hand.take(&c);
        let id = c.id.clone();
        let me = self.clone();
        let task = rounds.workers.spawn(async move {
            let id = c.id.clone();
            let verdict = me.attempt(c).await;
            me.in_hand.finish(&id);
            (id, verdict)
        });
        rounds.worker_ids.insert(task.id(), (id, large));
        rounds.large_workers += usize::from(large);
    }

    fn finished(
        &self,
        rounds: &mut Rounds,
        r: Result<(tokio::task::Id, (String, Verdict)), JoinError>,
    ) {
        match r {
            Ok((task, (_, verdict))) => {
                // Forget the task's id too, or a months-long run grows by one entry an episode.
                if let Some((_, large)) = rounds.worker_ids.remove(&task) {
                    rounds.large_workers -= usize::from(large);
                }
                if verdict == Verdict::Kept {
                    rounds.kept += 1;
                }
            }
            Err(e) => {
                // A panic inside one episode's work: log it, set the episode aside, keep going.
                if let Some((id, large)) = rounds.worker_ids.remove(&e.id()) {
                    rounds.large_workers -= usize::from(large);
                    let delay = self.retry.delay(Setback::WorkerFailed, 0);
                    self.in_hand.back_off(&id, delay);
                    self.in_hand.finish(&id);
                    tracing::error!(episode = %id, error = %e, "episode worker failed");
                }
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

    /// Whether the work makes progress: the loop turned within `window` and every upload in
    /// flight moved bytes within `window` (or just started). The watchdog's and `/healthz`'s
    /// condition; the error says what stands still.
    fn progress(&self, window: Duration) -> Result<(), Vec<String>> {
        let mut problems = Vec::new();
        let turned = lock(&self.loop_turned).elapsed();
        if turned >= window {
            problems.push(format!(
                "the work loop has not turned for {}s",
                turned.as_secs()
            ));
        }
        if !self.in_hand.uploads_moving(window) {
            problems.push(format!(
                "an upload has sent no bytes for {}s or more",
                window.as_secs()
            ));
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems)
        }
    }

    /// `WATCHDOG=1` while the work makes progress ([`Shipper::progress`]).
    async fn watchdog(self: Arc<Self>, every: Duration, stop: CancellationToken) {
        let window = every * 2;
        loop {
            match self.progress(window) {
                Ok(()) => notify::watchdog(),
                Err(problems) => tracing::error!(
                    problems = %problems.join("; "),
                    "work stalled; withholding the watchdog heartbeat"
                ),
            }
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(every) => {}
            }
        }
    }
}
