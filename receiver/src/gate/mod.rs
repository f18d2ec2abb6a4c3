//! The commit gate (SPEC §4): an immutable allow-list swapped atomically by a background
//! refresher, so admission is a lock-free set lookup; a miss triggers one bounded refresh.

pub mod forgejo;
pub mod git;

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use cis490_common::Commit;
use tokio_util::sync::CancellationToken;

use crate::config::GateConfig;

/// Where the current list came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Forgejo,
    Git,
    GitFallback,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Forgejo => "forgejo",
            Source::Git => "git",
            Source::GitFallback => "git-fallback",
        }
    }
}

/// One loaded allow-list; never mutated after it is published.
#[derive(Debug)]
pub struct Snapshot {
    pub commits: Vec<Commit>,
    set: HashSet<Commit>,
    pub source: Source,
    pub loaded_at: Instant,
}

impl Snapshot {
    pub fn new(commits: Vec<Commit>, source: Source) -> Self {
        let set = commits.iter().copied().collect();
        Snapshot {
            commits,
            set,
            source,
            loaded_at: Instant::now(),
        }
    }

    pub fn contains(&self, c: &Commit) -> bool {
        self.set.contains(c)
    }

    pub fn head(&self) -> Option<Commit> {
        self.commits.first().copied()
    }
}

/// The answer to "may this commit's data enter the dataset?".
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admission {
    Admitted,
    NotInWindow {
        head: Option<Commit>,
    },
    /// No list has ever been loaded: answer 503, never 412.
    Unavailable,
}

/// What `/v1/ping`, `gate` and the metrics show.
#[derive(Debug, Clone, serde::Serialize)]
pub struct GateView {
    pub enabled: bool,
    pub source: Option<&'static str>,
    pub head_commit: Option<String>,
    pub window: usize,
    pub commits: usize,
    pub age_s: Option<u64>,
    pub last_error: Option<String>,
}

#[derive(Debug, Default)]
struct Status {
    last_error: Option<String>,
}

/// A source of commit lists, tried in order at every refresh.
#[derive(Clone)]
enum SourceSpec {
    Forgejo(Arc<forgejo::ForgejoSource>),
    Git { repo: PathBuf },
}

pub struct Gate {
    cfg: GateConfig,
    sources: Vec<SourceSpec>,
    snapshot: ArcSwapOption<Snapshot>,
    status: std::sync::Mutex<Status>,
    pub refresh_failures: AtomicU64,
    /// Serialises refreshes; holds when the last one started.
    refresh_lock: tokio::sync::Mutex<Option<Instant>>,
    /// When the last refresh triggered by a miss started, for the one-per-second limit.
    last_miss_refresh: std::sync::Mutex<Option<Instant>>,
    /// Bumped by the refresher loop; the watchdog stops if it stalls.
    pub heartbeat: AtomicU64,
}

impl std::fmt::Debug for Gate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gate")
            .field("enabled", &self.cfg.enabled)
            .field("sources", &self.sources.len())
            .finish_non_exhaustive()
    }
}

/// Longest a request waits for a refresh-on-miss before it is answered.
pub const MISS_WAIT: Duration = Duration::from_secs(2);
const MISS_MIN_INTERVAL: Duration = Duration::from_secs(1);

impl Gate {
    /// Builds the gate; a Forgejo token or CA that cannot be read is an error naming its key.
    pub fn new(cfg: GateConfig) -> Result<Self, (String, String)> {
        let mut sources = Vec::new();
        if let Some(f) = &cfg.forgejo {
            sources.push(SourceSpec::Forgejo(Arc::new(forgejo::ForgejoSource::new(
                f,
            )?)));
        }
        if let Some(repo) = git::resolve_repo(cfg.repo_path.as_deref()) {
            sources.push(SourceSpec::Git { repo });
        }
        Ok(Gate {
            cfg,
            sources,
            snapshot: ArcSwapOption::empty(),
            status: std::sync::Mutex::new(Status::default()),
            refresh_failures: AtomicU64::new(0),
            refresh_lock: tokio::sync::Mutex::new(None),
            last_miss_refresh: std::sync::Mutex::new(None),
            heartbeat: AtomicU64::new(0),
        })
    }

    fn forgejo_budget(&self) -> Duration {
        (Duration::from_secs(self.cfg.refresh_interval_s) * 2)
            .clamp(Duration::from_secs(2), forgejo::REQUEST_TIMEOUT)
    }

    pub fn enabled(&self) -> bool {
        self.cfg.enabled
    }

    pub fn snapshot(&self) -> Option<Arc<Snapshot>> {
        self.snapshot.load_full()
    }

    /// True when admission can be decided (a list is loaded, or the gate is off).
    pub fn ready(&self) -> bool {
        !self.cfg.enabled || self.snapshot.load().is_some()
    }

    fn lock_status(&self) -> std::sync::MutexGuard<'_, Status> {
        // Invariant: Status holds plain values; a panic mid-update cannot break it.
        self.status.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Admission without waiting: the set lookup alone.
    pub fn check_now(&self, commit: &Commit) -> Admission {
        if !self.cfg.enabled {
            return Admission::Admitted;
        }
        match &*self.snapshot.load() {
            None => Admission::Unavailable,
            Some(s) if s.contains(commit) => Admission::Admitted,
            Some(s) => Admission::NotInWindow { head: s.head() },
        }
    }

    /// Admission with one bounded refresh on a miss, so a commit pushed a moment ago passes.
    pub async fn check(&self, commit: &Commit) -> Admission {
        match self.check_now(commit) {
            Admission::NotInWindow { .. } | Admission::Unavailable => {}
            admitted => return admitted,
        }
        let asked = Instant::now();
        let _ = tokio::time::timeout(MISS_WAIT, self.refresh_after(asked)).await;
        self.check_now(commit)
    }

    /// Refreshes unless a refresh started after `asked` already; honours the per-second limit.
    async fn refresh_after(&self, asked: Instant) {
        let mut last = self.refresh_lock.lock().await;
        if matches!(*last, Some(t) if t >= asked) {
            return;
        }
        let wait = {
            let m = self
                .last_miss_refresh
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            m.map(|t| MISS_MIN_INTERVAL.saturating_sub(t.elapsed()))
                .unwrap_or_default()
        };
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
        *self
            .last_miss_refresh
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
        *last = Some(Instant::now());
        let _ = self.refresh_locked().await;
    }

    /// One refresh pass over the sources (used by the background loop and by `gate`).
    pub async fn refresh(&self) -> Result<(), String> {
        let mut last = self.refresh_lock.lock().await;
        *last = Some(Instant::now());
        self.refresh_locked().await
    }

    async fn refresh_locked(&self) -> Result<(), String> {
        if self.sources.is_empty() {
            let e = "no commit source configured: set [version_gate] repo_path or [version_gate.forgejo], or enabled = false".to_string();
            self.record_failure(&e);
            return Err(e);
        }
        let mut errors = Vec::new();
        let multi = self.sources.len() > 1;
        for (i, spec) in self.sources.iter().enumerate() {
            let result = match spec.clone() {
                SourceSpec::Forgejo(f) => f
                    .list(&self.cfg.branch, self.cfg.window, self.forgejo_budget())
                    .await
                    .map(|l| (l, Source::Forgejo))
                    .map_err(|e| e.to_string()),
                SourceSpec::Git { repo } => {
                    let (branch, window) = (self.cfg.branch.clone(), self.cfg.window);
                    let repo2 = repo.clone();
                    match tokio::task::spawn_blocking(move || {
                        git::list_commits(&repo2, &branch, window)
                    })
                    .await
                    {
                        Ok(Ok(list)) => Ok(list),
                        Ok(Err(e)) => Err(e.to_string()),
                        Err(e) => Err(format!("git reader task failed: {e}")),
                    }
                    .map(|l| {
                        (
                            l,
                            if multi && i > 0 {
                                Source::GitFallback
                            } else {
                                Source::Git
                            },
                        )
                    })
                }
            };
            match result {
                Ok((list, _)) if list.is_empty() => {
                    errors.push(format!("{}: no commits", spec_name(spec)));
                }
                Ok((list, source)) => {
                    self.publish(list, source);
                    return Ok(());
                }
                Err(e) => errors.push(e),
            }
        }
        let e = errors.join("; ");
        self.record_failure(&e);
        Err(e)
    }

    fn publish(&self, list: Vec<Commit>, source: Source) {
        let before = self.snapshot.load_full();
        let previous = before.as_ref().map(|s| s.source);
        let changed = before
            .as_ref()
            .is_none_or(|b| b.source != source || b.commits != list);
        let snap = Snapshot::new(list, source);
        let head = snap.head().map(|c| c.to_string()).unwrap_or_default();
        let count = snap.commits.len();
        self.snapshot.store(Some(Arc::new(snap)));
        self.lock_status().last_error = None;
        if previous != Some(source) && (previous.is_some() || source == Source::GitFallback) {
            tracing::warn!(
                event = "gate_source_changed",
                from = previous.map(Source::as_str).unwrap_or("none"),
                to = source.as_str(),
                "commit gate source changed"
            );
        }
        // INFO when the list moved (a push, a new source), DEBUG for the refreshes that changed
        // nothing, so the journal shows every change without a line every 5 s.
        if changed {
            tracing::info!(
                event = "gate_refreshed",
                source = source.as_str(),
                head,
                commits = count,
                "commit list updated"
            );
        } else {
            tracing::debug!(
                event = "gate_refreshed",
                source = source.as_str(),
                head,
                commits = count
            );
        }
    }

    fn record_failure(&self, e: &str) {
        self.refresh_failures.fetch_add(1, Ordering::Relaxed);
        self.lock_status().last_error = Some(e.to_string());
        tracing::warn!(
            event = "gate_refresh_failed",
            error = e,
            "commit gate refresh failed; keeping the previous list"
        );
    }

    /// Runs the background refresher until `shutdown` fires, bumping `heartbeat` at least every
    /// `beat` (the watchdog reads it).
    pub async fn run_refresher(self: Arc<Self>, beat: Duration, shutdown: CancellationToken) {
        if !self.cfg.enabled {
            loop {
                self.heartbeat.fetch_add(1, Ordering::Relaxed);
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(beat) => {}
                }
            }
        }
        let interval = Duration::from_secs(self.cfg.refresh_interval_s);
        loop {
            let _ = self.refresh().await;
            self.heartbeat.fetch_add(1, Ordering::Relaxed);
            // Wake often so the heartbeat keeps moving with long intervals.
            let until = Instant::now() + interval;
            while Instant::now() < until {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep((until - Instant::now()).min(beat)) => {}
                }
                self.heartbeat.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    pub fn view(&self) -> GateView {
        let snap = self.snapshot.load_full();
        GateView {
            enabled: self.cfg.enabled,
            source: snap.as_ref().map(|s| s.source.as_str()),
            head_commit: snap.as_ref().and_then(|s| s.head()).map(|c| c.to_string()),
            window: self.cfg.window,
            commits: snap.as_ref().map(|s| s.commits.len()).unwrap_or(0),
            age_s: snap.as_ref().map(|s| s.loaded_at.elapsed().as_secs()),
            last_error: self.lock_status().last_error.clone(),
        }
    }

    /// The remediation text for a lab host, from the configured template.
    pub fn remediation(&self, your: Option<&str>, head: Option<&str>) -> String {
        self.cfg
            .remediation
            .replace("{your_commit}", your.unwrap_or(""))
            .replace("{head_commit}", head.unwrap_or(""))
    }
}

/// The gate's series, read at scrape time (SPEC §3).
#[derive(Debug)]
pub(crate) struct Collector(pub(crate) Arc<Gate>);

#[derive(Debug, Clone, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
struct SourceLabel {
    source: &'static str,
}

impl prometheus_client::collector::Collector for Collector {
    fn encode(
        &self,
        mut enc: prometheus_client::encoding::DescriptorEncoder,
    ) -> Result<(), std::fmt::Error> {
        use prometheus_client::encoding::EncodeMetric;
        use prometheus_client::metrics::gauge::ConstGauge;
        let v = self.0.view();
        crate::metrics::gauge(
            &mut enc,
            "cis490_gate_commits",
            "Commits in the current allow-list",
            v.commits as i64,
        )?;
        crate::metrics::gauge_f64(
            &mut enc,
            "cis490_gate_age_seconds",
            "Seconds since the allow-list was last loaded",
            v.age_s.map_or(f64::NAN, |a| a as f64),
        )?;
        let mut family = enc.encode_descriptor(
            "cis490_gate_source",
            "Source of the current allow-list (1 for the current one)",
            None,
            prometheus_client::metrics::MetricType::Gauge,
        )?;
        for s in [Source::Forgejo, Source::Git, Source::GitFallback] {
            let on = ConstGauge::new(i64::from(v.source == Some(s.as_str())));
            on.encode(family.encode_family(&SourceLabel { source: s.as_str() })?)?;
        }
        crate::metrics::counter(
            &mut enc,
            "cis490_gate_refresh_failures",
            "Refreshes in which every source failed",
            self.0.refresh_failures.load(Ordering::Relaxed),
        )
    }
}

fn spec_name(s: &SourceSpec) -> String {
    match s {
        SourceSpec::Forgejo(f) => f.describe(),
        SourceSpec::Git { repo } => format!("git {}", repo.display()),
    }
}
