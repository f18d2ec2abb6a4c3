//! The shipper's metrics (SPEC §12, §14): each declared once in one `prometheus-client`
//! registry, rendered the same way for the plain-HTTP listener (`/metrics`, `/healthz`) and for
//! node_exporter's textfile collector.

use std::convert::Infallible;
use std::fmt::Write as _;
use std::io::Write as _;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use cis490_common::durable::{DurableFile, Existing, TEMP_SUFFIX};
use cis490_common::{ErrorCode, Reason};

use crate::queue::Census;

/// The series `doctor` reads from the running daemon to learn that its binary is stale.
pub(crate) const BINARY_STALE: &str = "cis490_shipper_binary_stale";
/// The build-info series; its `version` label is the running daemon's version.
pub(crate) const BUILD_INFO: &str = "cis490_shipper_build_info";
/// The Prometheus text format both outputs use (node_exporter reads no other in a textfile).
const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DirLabel {
    dir: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    version: &'static str,
    host_commit: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CertLabel {
    cert: &'static str,
}

/// Which configured PEM file a certificate expiry belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CertFile {
    /// `[receiver] cert_file`: this host's client certificate.
    Client,
    /// `[receiver] ca_file`: the CA the receiver's certificate must chain to.
    Ca,
}

impl CertFile {
    fn label(self) -> &'static str {
        match self {
            CertFile::Client => "client",
            CertFile::Ca => "ca",
        }
    }
}

/// Every refusal reason `rejected_total` counts: the quarantine reasons, and the credential
/// refusals after which the episode is kept.
fn rejection_reasons() -> impl Iterator<Item = &'static str> {
    Reason::ALL
        .into_iter()
        .map(Reason::as_str)
        .chain([ErrorCode::Unauthorized, ErrorCode::Forbidden].map(ErrorCode::as_str))
}

/// The shipper's metrics. Counters count from the daemon's start; the queue gauges hold what
/// the last scan found, so a scrape costs no disk access.
pub(crate) struct Metrics {
    registry: Registry,
    episodes: Family<DirLabel, Gauge>,
    oldest_queued_age: Gauge,
    shipped: Counter,
    shipped_bytes: Counter,
    rejected: Family<ReasonLabel, Counter>,
    transient_errors: Counter,
    resumed_bytes: Counter,
    last_success: Gauge,
    upload_bytes_in_flight: Gauge,
    binary_stale: Gauge,
    build_info: Family<BuildLabels, Gauge>,
    /// The `host_commit` label of the one build_info series.
    build_commit: Mutex<String>,
    cert_not_after: Family<CertLabel, Gauge>,
    zstd_level: Gauge,
}

impl Metrics {
    pub(crate) fn new() -> Metrics {
        let mut registry = Registry::default();
        let episodes = Family::<DirLabel, Gauge>::default();
        registry.register(
            "cis490_shipper_episodes",
            "Entries in each queue directory (episodes, outbox, shipped, quarantine) at the last scan",
            episodes.clone(),
        );
        let oldest_queued_age = Gauge::default();
        registry.register(
            "cis490_shipper_oldest_queued_age_seconds",
            "Age by mtime of the oldest entry of episodes/ at the last scan (0 when empty)",
            oldest_queued_age.clone(),
        );
        // prometheus-client appends `_total` to a counter's name.
        let shipped = Counter::default();
        registry.register(
            "cis490_shipper_shipped",
            "Episodes the receiver answered 200 or 201 for and that were retired to shipped/",
            shipped.clone(),
        );
        let shipped_bytes = Counter::default();
        registry.register(
            "cis490_shipper_shipped_bytes",
            "Compressed body bytes of the shipped episodes, as the receiver stores them",
            shipped_bytes.clone(),
        );
        let rejected = Family::<ReasonLabel, Counter>::default();
        registry.register(
            "cis490_shipper_rejected",
            "Attempts refused for good (quarantine reasons) or for this host's credentials (unauthorized, forbidden)",
            rejected.clone(),
        );
        let transient_errors = Counter::default();
        registry.register(
            "cis490_shipper_transient_errors",
            "Attempts that ended in a transient failure and are retried with backoff",
            transient_errors.clone(),
        );
        let resumed_bytes = Counter::default();
        registry.register(
            "cis490_shipper_resumed_bytes",
            "Body bytes not sent again because a PUT continued an interrupted upload (the sum of the resumed PUTs' offsets)",
            resumed_bytes.clone(),
        );
        let last_success = Gauge::default();
        registry.register(
            "cis490_shipper_last_success_timestamp_seconds",
            "Unix time of the last episode retired to shipped/ (0 if none)",
            last_success.clone(),
        );
        let upload_bytes_in_flight = Gauge::default();
        registry.register(
            "cis490_shipper_upload_bytes_in_flight",
            "Body bytes of the uploads on the wire now",
            upload_bytes_in_flight.clone(),
        );
        let binary_stale = Gauge::default();
        registry.register(
            BINARY_STALE,
            "1 when the executable this daemon was started from has been replaced on disk (restart it)",
            binary_stale.clone(),
        );
        let build_info = Family::<BuildLabels, Gauge>::default();
        registry.register(
            BUILD_INFO,
            "Always 1: the daemon's version and the HEAD of the install checkout (empty without one)",
            build_info.clone(),
        );
        let cert_not_after = Family::<CertLabel, Gauge>::default();
        registry.register(
            "cis490_shipper_cert_not_after_timestamp_seconds",
            "Unix time at which the client certificate or the receiver CA of the config expires",
            cert_not_after.clone(),
        );
        let zstd_level = Gauge::default();
        registry.register(
            "cis490_shipper_zstd_level",
            "The zstd level the next pack uses (moved with the link under compression = \"auto\")",
            zstd_level.clone(),
        );
        for dir in ["episodes", "outbox", "shipped", "quarantine"] {
            episodes.get_or_create(&DirLabel { dir }).set(0);
        }
        // Every reason is shown from the start, so the first refusal is an increase.
        for reason in rejection_reasons() {
            let _ = rejected.get_or_create(&ReasonLabel { reason });
        }
        build_info
            .get_or_create(&BuildLabels {
                version: env!("CARGO_PKG_VERSION"),
                host_commit: String::new(),
            })
            .set(1);
        Metrics {
            registry,
            episodes,
            oldest_queued_age,
            shipped,
            shipped_bytes,
            rejected,
            transient_errors,
            resumed_bytes,
            last_success,
            upload_bytes_in_flight,
            binary_stale,
            build_info,
            build_commit: Mutex::new(String::new()),
            cert_not_after,
            zstd_level,
        }
    }

    pub(crate) fn zstd_level(&self, level: i32) {
        self.zstd_level.set(i64::from(level));
    }

    /// What a scan found in the queue.
    pub(crate) fn record_census(&self, c: &Census) {
        for (dir, n) in [
            ("episodes", c.episodes),
            ("outbox", c.outbox),
            ("shipped", c.shipped),
            ("quarantine", c.quarantine),
        ] {
            self.episodes
                .get_or_create(&DirLabel { dir })
                .set(saturating_i64(n));
        }
        self.oldest_queued_age
            .set(saturating_i64(c.oldest_queued_age_s.unwrap_or(0)));
    }

    /// An episode retired after 200/201 whose body is `bytes` long.
    pub(crate) fn shipped(&self, bytes: u64, at: SystemTime) {
        self.shipped.inc();
        self.shipped_bytes.inc_by(bytes);
        self.last_succeeded_at(at);
    }

    /// The last success: a retire now, or at start the newest entry of shipped/.
    pub(crate) fn last_succeeded_at(&self, at: SystemTime) {
        self.last_success.set(unix_seconds(at));
    }

    /// A refusal with `reason` (a quarantine reason, or `unauthorized` / `forbidden`).
    pub(crate) fn rejected(&self, reason: &str) {
        // Only the known reasons have a series: a label value never comes from the network.
        if let Some(reason) = rejection_reasons().find(|r| *r == reason) {
            self.rejected.get_or_create(&ReasonLabel { reason }).inc();
        }
    }

    pub(crate) fn transient_error(&self) {
        self.transient_errors.inc();
    }

    /// A PUT sent from `offset`: that many body bytes were not sent again (SPEC §13).
    pub(crate) fn resumed(&self, offset: u64) {
        self.resumed_bytes.inc_by(offset);
    }

    /// Counts `bytes` as on the wire until the returned guard drops.
    pub(crate) fn upload_in_flight(&self, bytes: u64) -> InFlight {
        let bytes = saturating_i64(bytes);
        self.upload_bytes_in_flight.inc_by(bytes);
        InFlight {
            gauge: self.upload_bytes_in_flight.clone(),
            bytes,
        }
    }

    pub(crate) fn binary_stale(&self, stale: bool) {
        self.binary_stale.set(i64::from(stale));
    }

    /// The install checkout's HEAD for build_info; the series of the previous HEAD goes.
    pub(crate) fn host_commit(&self, commit: Option<&str>) {
        let commit = commit.unwrap_or("").to_string();
        let mut current = self.build_commit.lock().unwrap_or_else(|p| p.into_inner());
        if *current == commit {
            return;
        }
        // The new series first: a scrape in between sees two, never none.
        self.build_info
            .get_or_create(&BuildLabels {
                version: env!("CARGO_PKG_VERSION"),
                host_commit: commit.clone(),
            })
            .set(1);
        self.build_info.remove(&BuildLabels {
            version: env!("CARGO_PKG_VERSION"),
            host_commit: std::mem::replace(&mut *current, commit),
        });
    }

    pub(crate) fn cert_not_after(&self, which: CertFile, not_after: SystemTime) {
        self.cert_not_after
            .get_or_create(&CertLabel {
                cert: which.label(),
            })
            .set(unix_seconds(not_after));
    }

    /// Every metric in the Prometheus text format (0.0.4).
    pub(crate) fn render(&self) -> String {
        let mut open = String::new();
        // Writing into a String cannot fail and every label set here encodes, so an error is a
        // bug: logged, not a panic in the daemon.
        if let Err(e) =
            prometheus_client::encoding::text::encode_registry(&mut open, &self.registry)
        {
            tracing::error!(error = %e, "failed to encode the metrics");
        }
        to_prometheus_text(&open)
    }
}

/// Keeps a finished (or abandoned) upload's bytes from counting as in flight.
pub(crate) struct InFlight {
    gauge: Gauge,
    bytes: i64,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.gauge.dec_by(self.bytes);
    }
}

fn saturating_i64(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

fn unix_seconds(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| saturating_i64(d.as_secs()))
}

/// prometheus-client writes OpenMetrics, where a counter family `x` has the sample `x_total`
/// and the text ends with `# EOF`. node_exporter's textfile collector reads the older
/// Prometheus format, in which that sample would be a separate, untyped family: so the
/// counters' HELP and TYPE lines are renamed to the sample's name and `# EOF` is dropped.
/// Sample lines are left exactly as the library encoded them.
fn to_prometheus_text(open: &str) -> String {
    let counters: Vec<&str> = open
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(open.len() + 16 * counters.len());
    for line in open.lines() {
        if line == "# EOF" {
            continue;
        }
        let renamed = ["# HELP ", "# TYPE "].iter().find_map(|tag| {
            let rest = line.strip_prefix(tag)?;
            let (name, tail) = rest.split_once(' ')?;
            counters
                .contains(&name)
                .then(|| format!("{tag}{name}_total {tail}"))
        });
        match renamed {
            Some(l) => out.push_str(&l),
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

/// `[metrics] textfile`: rewritten atomically (durable-write helper) at every scan, so
/// node_exporter never reads half a file.
#[derive(Debug)]
pub(crate) struct Textfile {
    path: PathBuf,
    dir: PathBuf,
    /// The temp files' name stem: hidden, so node_exporter (which reads `*.prom`) skips them.
    stem: String,
    /// The last write failed: logged once, until a write succeeds again.
    failing: AtomicBool,
}

impl Textfile {
    /// Checks that the textfile can be written where the config says (the directory exists, is
    /// a directory and takes a new file), before the daemon starts.
    pub(crate) fn open(path: &Path) -> Result<Textfile, String> {
        if path.is_dir() {
            return Err(format!("{} is a directory, not a file", path.display()));
        }
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        let stem = path
            .file_name()
            .map_or_else(|| "metrics".into(), |n| n.to_string_lossy().into_owned());
        let stem = format!(".{stem}");
        // A real file in the real directory: root passes permission bits but not a missing
        // directory or a parent that is a regular file. Dropped uncommitted, it is removed.
        DurableFile::create_in(dir, &stem)
            .map_err(|e| format!("cannot write in {}: {e}", dir.display()))?;
        // Temp files of an earlier process killed mid-write (only ours: the directory is
        // usually node_exporter's, shared with other writers).
        if let Ok(rd) = std::fs::read_dir(dir) {
            for e in rd.flatten() {
                let name = e.file_name();
                let name = name.to_string_lossy();
                if name.starts_with(&format!("{stem}.")) && name.ends_with(TEMP_SUFFIX) {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
        Ok(Textfile {
            path: path.to_path_buf(),
            dir: dir.to_path_buf(),
            stem,
            failing: AtomicBool::new(false),
        })
    }

    /// Replaces the file with `text`, readable by all (node_exporter runs as its own user,
    /// and the unit's umask would leave it readable by group `cis490` only).
    pub(crate) fn write(&self, text: &str) {
        let replace = || -> std::io::Result<()> {
            let mut f = DurableFile::create_in(&self.dir, &self.stem)?;
            f.file()
                .set_permissions(std::fs::Permissions::from_mode(0o644))?;
            f.write_all(text.as_bytes())?;
            f.commit(&self.path, Existing::Replace)
        };
        match replace() {
            Ok(()) => {
                if self.failing.swap(false, Ordering::Relaxed) {
                    tracing::info!(path = %self.path.display(), "metrics textfile written again");
                }
            }
            Err(e) => {
                if !self.failing.swap(true, Ordering::Relaxed) {
                    tracing::error!(path = %self.path.display(), error = %e, "failed to write the metrics textfile; will retry at every scan");
                }
            }
        }
    }
}

/// Why the daemon is not healthy, or `Ok` while its work loop makes progress.
pub(crate) type Health = Arc<dyn Fn() -> Result<(), Vec<String>> + Send + Sync>;

/// Serves `GET /metrics` and `GET /healthz` on `listener` until `stop`.
pub(crate) async fn serve(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    health: Health,
    stop: CancellationToken,
) {
    loop {
        let (stream, _) = tokio::select! {
            _ = stop.cancelled() => return,
            r = listener.accept() => match r {
                Ok(s) => s,
                // Out of file descriptors, most likely: wait rather than spin.
                Err(_) => { tokio::time::sleep(Duration::from_millis(100)).await; continue; }
            }
        };
        let (metrics, health) = (metrics.clone(), health.clone());
        tokio::spawn(async move {
            let svc = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                let resp = answer(&metrics, &health, req.uri().path());
                async move { Ok::<_, Infallible>(resp) }
            });
            let mut b = hyper::server::conn::http1::Builder::new();
            b.timer(TokioTimer::new())
                .header_read_timeout(Some(Duration::from_secs(10)));
            let _ = b.serve_connection(TokioIo::new(stream), svc).await;
        });
    }
}

fn answer(metrics: &Metrics, health: &Health, path: &str) -> hyper::Response<Full<Bytes>> {
    let text = |status: u16, ct: &str, body: String| {
        hyper::Response::builder()
            .status(status)
            .header("content-type", ct)
            .body(Full::new(Bytes::from(body)))
            .unwrap_or_default()
    };
    match path {
        "/metrics" => text(200, CONTENT_TYPE, metrics.render()),
        "/healthz" => {
            let (status, problems) = match health() {
                Ok(()) => (200, Vec::new()),
                Err(p) => (503, p),
            };
            let body = serde_json::json!({"ok": status == 200, "problems": problems});
            text(status, "application/json", body.to_string() + "\n")
        }
        _ => text(404, "text/plain", "not found\n".into()),
    }
}

/// A `GET` on a daemon's listener at `addr`, for `doctor`: the status and body, or why not.
pub(crate) async fn get(addr: SocketAddr, path: &str) -> Result<(u16, String), String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let work = async {
        let mut s = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| e.to_string())?;
        let mut req = String::new();
        let _ = write!(
            req,
            "GET {path} HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\n\r\n"
        );
        s.write_all(req.as_bytes())
            .await
            .map_err(|e| e.to_string())?;
        let mut raw = Vec::new();
        s.read_to_end(&mut raw).await.map_err(|e| e.to_string())?;
        let raw = String::from_utf8_lossy(&raw);
        let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
        let status = head
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| "not an HTTP answer".to_string())?;
        Ok((status, body.to_string()))
    };
    tokio::time::timeout(Duration::from_secs(3), work)
        .await
        .map_err(|_| "timed out".to_string())?
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The value of the series whose line starts with `series` and a space.
    fn value(text: &str, series: &str) -> Option<i64> {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
            .and_then(|v| v.parse().ok())
    }

    #[test]
    fn every_spec_name_is_exposed_exactly_as_spelt() {
        let m = Metrics::new();
        m.record_census(&Census {
            episodes: 3,
            outbox: 1,
            shipped: 7,
            quarantine: 2,
            oldest_queued_age_s: Some(42),
        });
        m.shipped(1000, UNIX_EPOCH + Duration::from_secs(1_700_000_000));
        m.shipped(24, UNIX_EPOCH + Duration::from_secs(1_700_000_100));
        m.rejected("commit_not_in_window");
        m.rejected("forbidden");
        m.rejected("a label from nowhere");
        m.transient_error();
        m.resumed(8 << 20);
        m.resumed(1 << 20);
        m.binary_stale(true);
        m.zstd_level(5);
        m.host_commit(Some("0123456789abcdef0123456789abcdef01234567"));
        m.cert_not_after(
            CertFile::Client,
            UNIX_EPOCH + Duration::from_secs(1_800_000_000),
        );
        m.cert_not_after(
            CertFile::Ca,
            UNIX_EPOCH + Duration::from_secs(1_900_000_000),
        );
        let t = m.render();
        let want = [
            ("cis490_shipper_episodes{dir=\"episodes\"}", 3),
            ("cis490_shipper_episodes{dir=\"outbox\"}", 1),
            ("cis490_shipper_episodes{dir=\"shipped\"}", 7),
            ("cis490_shipper_episodes{dir=\"quarantine\"}", 2),
            ("cis490_shipper_oldest_queued_age_seconds", 42),
            ("cis490_shipper_shipped_total", 2),
            ("cis490_shipper_shipped_bytes_total", 1024),
            ("cis490_shipper_rejected_total{reason=\"commit_not_in_window\"}", 1),
            ("cis490_shipper_rejected_total{reason=\"forbidden\"}", 1),
            ("cis490_shipper_rejected_total{reason=\"too_large\"}", 0),
            ("cis490_shipper_transient_errors_total", 1),
            ("cis490_shipper_resumed_bytes_total", 9 << 20),
            ("cis490_shipper_last_success_timestamp_seconds", 1_700_000_100),
            ("cis490_shipper_upload_bytes_in_flight", 0),
            ("cis490_shipper_binary_stale", 1),
            ("cis490_shipper_zstd_level", 5),
            (
                &*format!(
                    "cis490_shipper_build_info{{version=\"{}\",host_commit=\"0123456789abcdef0123456789abcdef01234567\"}}",
                    env!("CARGO_PKG_VERSION")
                ),
                1,
            ),
            ("cis490_shipper_cert_not_after_timestamp_seconds{cert=\"client\"}", 1_800_000_000),
            ("cis490_shipper_cert_not_after_timestamp_seconds{cert=\"ca\"}", 1_900_000_000),
        ];
        for (series, v) in want {
            assert_eq!(value(&t, series), Some(v), "{series} in\n{t}");
        }
        assert!(!t.contains("a label from nowhere"), "{t}");
        assert!(!t.contains("_total_total"), "{t}");
        assert_eq!(
            t.matches("cis490_shipper_build_info{").count(),
            1,
            "one build_info series: {t}"
        );
        // The Prometheus text format: counters typed under their sample's name, no EOF.
        assert!(
            t.contains("# TYPE cis490_shipper_shipped_total counter\n"),
            "{t}"
        );
        assert!(t.contains("# HELP cis490_shipper_shipped_total "), "{t}");
        assert!(t.contains("# TYPE cis490_shipper_episodes gauge\n"), "{t}");
        assert!(!t.contains("# EOF"), "{t}");
        for line in t.lines().filter(|l| !l.starts_with('#')) {
            let name = line.split(['{', ' ']).next().unwrap_or("");
            assert!(
                t.contains(&format!("# TYPE {name} ")),
                "{name} has no TYPE line of its own name:\n{t}"
            );
        }
    }

    #[test]
    fn build_info_follows_the_install_head() {
        let m = Metrics::new();
        let series = |c: &str| {
            format!(
                "{BUILD_INFO}{{version=\"{}\",host_commit=\"{c}\"}}",
                env!("CARGO_PKG_VERSION")
            )
        };
        assert_eq!(value(&m.render(), &series("")), Some(1), "no checkout yet");
        m.host_commit(Some("a"));
        m.host_commit(Some("b"));
        let t = m.render();
        assert_eq!(value(&t, &series("b")), Some(1));
        assert_eq!(t.matches("cis490_shipper_build_info{").count(), 1, "{t}");
        m.host_commit(None);
        assert_eq!(value(&m.render(), &series("")), Some(1));
    }

    #[test]
    fn in_flight_bytes_leave_with_their_upload() {
        let m = Metrics::new();
        let a = m.upload_in_flight(100);
        let b = m.upload_in_flight(20);
        assert_eq!(
            value(&m.render(), "cis490_shipper_upload_bytes_in_flight"),
            Some(120)
        );
        drop(a);
        assert_eq!(
            value(&m.render(), "cis490_shipper_upload_bytes_in_flight"),
            Some(20)
        );
        drop(b);
        assert_eq!(
            value(&m.render(), "cis490_shipper_upload_bytes_in_flight"),
            Some(0)
        );
    }

    #[test]
    fn the_textfile_needs_a_writable_directory() {
        let d = tempfile::tempdir().unwrap();
        let ok = d.path().join("cis490.prom");
        let t = Textfile::open(&ok).unwrap();
        t.write("a 1\n");
        t.write("a 2\n");
        assert_eq!(std::fs::read_to_string(&ok).unwrap(), "a 2\n");
        let mode = std::fs::metadata(&ok).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o644, "readable by node_exporter's user");
        let names: Vec<_> = std::fs::read_dir(d.path()).unwrap().flatten().collect();
        assert_eq!(names.len(), 1, "no probe or temp file left: {names:?}");

        let missing = d.path().join("nope/cis490.prom");
        assert!(Textfile::open(&missing)
            .unwrap_err()
            .contains("cannot write in"));
        std::fs::write(d.path().join(".cis490.prom.1.0.tmp"), b"left by a kill").unwrap();
        std::fs::write(d.path().join("other.prom"), b"someone else's").unwrap();
        Textfile::open(&ok).unwrap();
        let mut names: Vec<_> = std::fs::read_dir(d.path())
            .unwrap()
            .flatten()
            .map(|e| e.file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(
            names,
            ["cis490.prom", "other.prom"],
            "only our leftovers go"
        );
        let file = d.path().join("plain");
        std::fs::write(&file, b"").unwrap();
        // Even root cannot make a file under a regular file.
        assert!(Textfile::open(&file.join("cis490.prom")).is_err());
        assert!(Textfile::open(d.path())
            .unwrap_err()
            .contains("is a directory"));
    }
}
