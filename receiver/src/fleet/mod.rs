//! The fleet as the receiver sees it (SPEC §11): one record per lab host, updated on the request
//! path, and the view `/v1/fleet`, the page, the `fleet` command and `/metrics` are made from.
//!
//! Hosts are found through a copy-on-write map (a lookup takes no lock); each host's record has
//! its own mutex, so only requests of the same host ever wait for one another.

pub(crate) mod client;
pub(crate) mod page;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use http::HeaderMap;
use serde::{Deserialize, Serialize};

use cis490_common::{headers, timefmt, Commit, ErrorCode};

use crate::gate::{Gate, GateView};
use crate::store::IndexRow;

/// Longest host commit or shipper version kept as sent (a malformed one is shown, cut here).
const MAX_SHOWN: usize = 64;

/// A host's state, worst first (the order of precedence of SPEC §11 and of the page's rows).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum HostState {
    Stale,
    Rejecting,
    Silent,
    Unknown,
    Ok,
}

impl HostState {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            HostState::Stale => "stale",
            HostState::Rejecting => "rejecting",
            HostState::Silent => "silent",
            HostState::Unknown => "unknown",
            HostState::Ok => "ok",
        }
    }
}

/// Which request answered: PUT and `check` both count for staleness and rejections; only a
/// PUT makes a host `rejecting`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Upload {
    Put,
    Check,
}

/// The latest episode stored for a host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct LastStored {
    pub ts: String,
    pub episode_id: String,
    pub commit: String,
}

/// The latest 4xx answer to a host's PUT or `check`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct LastRejection {
    pub ts: String,
    pub status: u16,
    pub error: String,
    pub episode_id: String,
    pub commit: Option<String>,
}

/// What the receiver knows about one host.
#[derive(Debug, Default)]
struct Record {
    last_seen: Option<SystemTime>,
    shipper_version: Option<String>,
    /// The host commit as sent (cut to [`MAX_SHOWN`]) and, when well formed, parsed.
    host_commit: Option<(String, Option<Commit>)>,
    last_stored: Option<LastStored>,
    /// When `last_stored` happened, for `silent` after a restart and for `/metrics`.
    last_stored_at: Option<SystemTime>,
    stored_episodes: u64,
    stored_bytes: u64,
    last_rejection: Option<LastRejection>,
    rejections: BTreeMap<&'static str, u64>,
    /// Status of the latest PUT or `check`.
    last_upload_status: Option<u16>,
    /// Status of the latest PUT.
    last_put_status: Option<u16>,
    /// Not-after of the client certificate the host last presented (SPEC §14).
    cert_not_after: Option<SystemTime>,
}

#[derive(Debug)]
struct Host {
    record: Mutex<Record>,
}

impl Host {
    fn lock(&self) -> MutexGuard<'_, Record> {
        // Invariant: every critical section is a handful of field stores that cannot panic
        // midway, so a poisoned lock still guards a consistent record.
        self.record.lock().unwrap_or_else(|p| p.into_inner())
    }
}

type Hosts = HashMap<Box<str>, Arc<Host>>;

/// Every host's record.
#[derive(Debug)]
pub(crate) struct Fleet {
    hosts: ArcSwap<Hosts>,
    /// Serialises the (rare) insertion of a new host into the copy-on-write map.
    adding: Mutex<()>,
    silent_after: Duration,
    /// Until the index has been read at start: the ids stored since, which the index read
    /// may or may not include (they must not count twice). `None` once it has been read.
    stored_before_load: Mutex<Option<HashSet<(String, String)>>>,
    /// Set once the index has been read: from then on a store takes no lock but its host's.
    index_read: AtomicBool,
}

/// One host as `/v1/fleet` lists it (and as `cis490-receiver fleet` reads it back).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct HostView {
    pub host_id: String,
    pub state: HostState,
    pub last_seen: Option<String>,
    pub shipper_version: Option<String>,
    pub host_commit: Option<String>,
    pub host_commit_valid: Option<bool>,
    pub host_commit_in_window: Option<bool>,
    pub last_stored: Option<LastStored>,
    pub stored_episodes: u64,
    pub stored_bytes: u64,
    pub last_rejection: Option<LastRejection>,
    pub rejections: BTreeMap<String, u64>,
    pub cert_not_after: Option<String>,
    /// For `/metrics`: seconds since the epoch of `last_seen` and of the last store.
    #[serde(skip)]
    pub last_seen_s: Option<u64>,
    #[serde(skip)]
    pub last_stored_s: Option<u64>,
    #[serde(skip)]
    pub cert_not_after_s: Option<u64>,
}

/// The whole of `/v1/fleet`.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct FleetView {
    pub generated_at: String,
    pub window: GateView,
    pub hosts: Vec<HostView>,
}

/// `/v1/fleet` as `cis490-receiver fleet` reads it back.
#[derive(Debug, Clone, Deserialize)]
pub(crate) struct FleetDoc {
    pub generated_at: String,
    pub hosts: Vec<HostView>,
}

fn epoch_s(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Keeps at most [`MAX_SHOWN`] characters of a header value.
fn shown(s: &str) -> String {
    s.chars().take(MAX_SHOWN).collect()
}

impl Fleet {
    pub(crate) fn new(silent_after: Duration) -> Fleet {
        Fleet {
            hosts: ArcSwap::from_pointee(HashMap::new()),
            adding: Mutex::new(()),
            silent_after,
            stored_before_load: Mutex::new(Some(HashSet::new())),
            index_read: AtomicBool::new(false),
        }
    }

    fn host(&self, id: &str) -> Arc<Host> {
        if let Some(h) = self.hosts.load().get(id) {
            return h.clone();
        }
        let _adding = self.adding.lock().unwrap_or_else(|p| p.into_inner());
        let current = self.hosts.load_full();
        if let Some(h) = current.get(id) {
            return h.clone();
        }
        let h = Arc::new(Host {
            record: Mutex::new(Record::default()),
        });
        let mut next: Hosts = (*current).clone();
        next.insert(id.into(), h.clone());
        self.hosts.store(Arc::new(next));
        h
    }

    /// Every stored row of the index, at start: `stored_*` and `last_stored` survive a
    /// restart. For an id with several rows the last one counts (SPEC §15).
    pub(crate) fn load_index(&self, rows: impl IntoIterator<Item = IndexRow>) {
        let mut latest: HashMap<(String, String), IndexRow> = HashMap::new();
        for row in rows {
            latest.insert((row.host_id.clone(), row.episode_id.clone()), row);
        }
        // Held to the end, so that a store answered meanwhile is counted by exactly one side.
        let mut before = self
            .stored_before_load
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(live) = before.take() {
            latest.retain(|id, _| !live.contains(id));
        }
        self.index_read.store(true, Ordering::Release);
        let mut per_host: HashMap<String, Vec<IndexRow>> = HashMap::new();
        for ((host, _), row) in latest {
            per_host.entry(host).or_default().push(row);
        }
        for (host, rows) in per_host {
            let h = self.host(&host);
            let mut r = h.lock();
            for row in rows {
                r.stored_episodes += 1;
                r.stored_bytes += row.bytes;
                let newer = r.last_stored.as_ref().is_none_or(|l| row.ts > l.ts);
                if newer {
                    r.last_stored_at = humantime::parse_rfc3339(&row.ts).ok();
                    r.last_stored = Some(LastStored {
                        ts: row.ts,
                        episode_id: row.episode_id,
                        commit: row.commit,
                    });
                }
            }
        }
    }

    /// Any authenticated request of `host`: when, which shipper, which install commit.
    /// Any authenticated request of `host`, and the answer when it was a PUT or `check`: one
    /// lookup and one lock of that host's record per request.
    pub(crate) fn request(
        &self,
        host: &str,
        headers: &HeaderMap,
        cert_not_after: Option<SystemTime>,
        answer: Option<Answer<'_>>,
    ) {
        self.seen_and(host, headers, cert_not_after, answer);
    }

    /// The shipper version and install commit recorded for `host`, as the fleet view shows
    /// them (the commit as sent, and parsed when well formed).
    pub(crate) fn shipper_of(
        &self,
        host: &str,
    ) -> (Option<String>, Option<(String, Option<Commit>)>) {
        let h = self.host(host);
        let r = h.lock();
        (r.shipper_version.clone(), r.host_commit.clone())
    }

    #[cfg(test)]
    pub(crate) fn seen(&self, host: &str, headers: &HeaderMap, cert_not_after: Option<SystemTime>) {
        self.seen_and(host, headers, cert_not_after, None);
    }

    fn seen_and(
        &self,
        host: &str,
        headers: &HeaderMap,
        cert_not_after: Option<SystemTime>,
        answer: Option<Answer<'_>>,
    ) {
        // The headers as sent; a record is rewritten (and anything allocated) only when a
        // value differs from what it holds, which after a host's first request is rare.
        let agent = headers.get(http::header::USER_AGENT).map(|v| v.as_bytes());
        let version = agent.and_then(|ua| {
            let rest = ua
                .strip_prefix(headers::SHIPPER_AGENT.as_bytes())?
                .strip_prefix(b"/")?;
            Some(rest.split(|b| *b == b' ').next().unwrap_or_default())
        });
        let commit = headers
            .get(headers::HOST_COMMIT)
            .map(|v| v.as_bytes().trim_ascii());
        let h = self.host(host);
        let mut r = h.lock();
        r.last_seen = Some(SystemTime::now());
        if let Some(v) = version {
            if r.shipper_version.as_deref().map(str::as_bytes) != Some(v) {
                r.shipper_version = Some(shown(&String::from_utf8_lossy(v)));
            }
        }
        match commit {
            Some(c)
                if r.host_commit
                    .as_ref()
                    .is_none_or(|(raw, _)| raw.as_bytes() != c) =>
            {
                let text = shown(&String::from_utf8_lossy(c));
                let parsed = Commit::parse(&text).ok();
                r.host_commit = Some((text, parsed));
            }
            Some(_) => {}
            // A shipper without a checkout sends none: forget an older one.
            None if agent.is_some_and(|ua| ua.starts_with(headers::SHIPPER_AGENT.as_bytes())) => {
                r.host_commit = None
            }
            None => {}
        }
        if cert_not_after.is_some() {
            r.cert_not_after = cert_not_after;
        }
        if let Some(a) = answer {
            r.answered(&a);
        }
    }

    /// The answer to a PUT or `check` of `host`: `code` is the `error` code of a refusal.
    #[cfg(test)]
    pub(crate) fn answered(
        &self,
        host: &str,
        upload: Upload,
        status: u16,
        code: Option<ErrorCode>,
        episode: &str,
        commit: Option<&str>,
    ) {
        let h = self.host(host);
        h.lock().answered(&Answer {
            upload,
            status,
            code,
            episode,
            commit,
        });
    }
}

/// The answer to a PUT or `check`: `code` is the `error` code of a refusal.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Answer<'a> {
    pub upload: Upload,
    pub status: u16,
    pub code: Option<ErrorCode>,
    pub episode: &'a str,
    pub commit: Option<&'a str>,
}

impl Record {
    fn answered(&mut self, a: &Answer<'_>) {
        let r = self;
        let Answer {
            upload,
            status,
            code,
            episode,
            commit,
        } = *a;
        r.last_upload_status = Some(status);
        if upload == Upload::Put {
            r.last_put_status = Some(status);
        }
        if (400..500).contains(&status) {
            let error = code.map_or("unknown", |c| c.as_str());
            *r.rejections.entry(error).or_default() += 1;
            r.last_rejection = Some(LastRejection {
                ts: timefmt::now_rfc3339(),
                status,
                error: error.to_string(),
                episode_id: shown(episode),
                commit: commit.map(shown),
            });
        }
    }
}

impl Fleet {
    /// An episode stored now (201).
    pub(crate) fn stored(&self, row: &IndexRow) {
        // Until the index is read, a store is noted so it is not counted twice; `load_index`
        // holds the lock to its end, so a store that sees no flag waits for it and then finds
        // the set gone.
        if !self.index_read.load(Ordering::Acquire) {
            let mut before = self
                .stored_before_load
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            if let Some(live) = before.as_mut() {
                live.insert((row.host_id.clone(), row.episode_id.clone()));
            }
        }
        let h = self.host(&row.host_id);
        let mut r = h.lock();
        r.stored_episodes += 1;
        r.stored_bytes += row.bytes;
        r.last_stored_at = Some(SystemTime::now());
        r.last_stored = Some(LastStored {
            ts: row.ts.clone(),
            episode_id: row.episode_id.clone(),
            commit: row.commit.clone(),
        });
    }

    /// Every host, worst first, as of `now`.
    pub(crate) fn view(&self, gate: &Gate, now: SystemTime) -> FleetView {
        let snapshot = if gate.enabled() {
            gate.snapshot()
        } else {
            None
        };
        let hosts = self.hosts.load_full();
        let mut out: Vec<HostView> = hosts
            .iter()
            .map(|(id, h)| {
                let r = h.lock();
                let in_window = match (&r.host_commit, &snapshot) {
                    (Some((_, Some(c))), Some(s)) => Some(s.contains(c)),
                    _ => None,
                };
                let active = r.last_seen.or(r.last_stored_at);
                let state = if r.last_upload_status == Some(412) || in_window == Some(false) {
                    HostState::Stale
                } else if r
                    .last_put_status
                    .is_some_and(|s| matches!(s, 400 | 409 | 413 | 422))
                {
                    HostState::Rejecting
                } else if active
                    .is_some_and(|t| now.duration_since(t).unwrap_or_default() >= self.silent_after)
                {
                    HostState::Silent
                } else if r.last_put_status.is_none()
                    && r.last_stored.is_none()
                    && r.host_commit.is_none()
                {
                    HostState::Unknown
                } else {
                    HostState::Ok
                };
                HostView {
                    host_id: id.to_string(),
                    state,
                    last_seen: r.last_seen.map(timefmt::rfc3339),
                    shipper_version: r.shipper_version.clone(),
                    host_commit: r.host_commit.as_ref().map(|(raw, _)| raw.clone()),
                    host_commit_valid: r.host_commit.as_ref().map(|(_, c)| c.is_some()),
                    host_commit_in_window: in_window,
                    last_stored: r.last_stored.clone(),
                    stored_episodes: r.stored_episodes,
                    stored_bytes: r.stored_bytes,
                    last_rejection: r.last_rejection.clone(),
                    rejections: r
                        .rejections
                        .iter()
                        .map(|(k, v)| (k.to_string(), *v))
                        .collect(),
                    cert_not_after: r.cert_not_after.map(timefmt::rfc3339),
                    last_seen_s: r.last_seen.map(epoch_s),
                    last_stored_s: r.last_stored_at.map(epoch_s),
                    cert_not_after_s: r.cert_not_after.map(epoch_s),
                }
            })
            .collect();
        out.sort_by(|a, b| (a.state, &a.host_id).cmp(&(b.state, &b.host_id)));
        FleetView {
            generated_at: timefmt::rfc3339(now),
            window: gate.view(),
            hosts: out,
        }
    }
}

/// The per-host series of `/metrics` (SPEC §11, §14), made from the fleet view at scrape time.
#[derive(Debug)]
pub(crate) struct Collector {
    pub(crate) fleet: Arc<Fleet>,
    pub(crate) gate: Arc<Gate>,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
struct HostLabel {
    host: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
struct HostErrorLabel {
    host: String,
    error: String,
}

impl prometheus_client::collector::Collector for Collector {
    fn encode(
        &self,
        mut enc: prometheus_client::encoding::DescriptorEncoder,
    ) -> Result<(), std::fmt::Error> {
        use prometheus_client::encoding::EncodeMetric;
        use prometheus_client::metrics::counter::ConstCounter;
        use prometheus_client::metrics::gauge::ConstGauge;
        use prometheus_client::metrics::MetricType;

        let view = self.fleet.view(&self.gate, SystemTime::now());
        let per_host = |enc: &mut prometheus_client::encoding::DescriptorEncoder,
                        name: &str,
                        help: &str,
                        value: &dyn Fn(&HostView) -> Option<i64>|
         -> Result<(), std::fmt::Error> {
            let mut family = enc.encode_descriptor(name, help, None, MetricType::Gauge)?;
            for h in &view.hosts {
                if let Some(v) = value(h) {
                    ConstGauge::new(v).encode(family.encode_family(&HostLabel {
                        host: h.host_id.clone(),
                    })?)?;
                }
            }
            Ok(())
        };
        let secs = |s: Option<u64>| s.map(|s| i64::try_from(s).unwrap_or(i64::MAX));
        per_host(
            &mut enc,
            "cis490_fleet_host_last_seen_timestamp_seconds",
            "When the host last made a request (since this receiver started)",
            &|h| secs(h.last_seen_s),
        )?;
        per_host(
            &mut enc,
            "cis490_fleet_host_last_stored_timestamp_seconds",
            "When an episode of the host was last stored",
            &|h| secs(h.last_stored_s),
        )?;
        per_host(
            &mut enc,
            "cis490_fleet_host_stale",
            "1 when the host's latest PUT or check was 412 or its host commit is outside the window",
            &|h| Some(i64::from(h.state == HostState::Stale)),
        )?;
        per_host(
            &mut enc,
            "cis490_fleet_host_cert_not_after_timestamp_seconds",
            "When the client certificate the host last presented expires",
            &|h| secs(h.cert_not_after_s),
        )?;
        let mut family = enc.encode_descriptor(
            "cis490_fleet_host_rejections",
            "PUT and check answers of status 400-499 per host and error code, since start",
            None,
            MetricType::Counter,
        )?;
        for h in &view.hosts {
            for (error, n) in &h.rejections {
                ConstCounter::new(*n).encode(family.encode_family(&HostErrorLabel {
                    host: h.host_id.clone(),
                    error: error.clone(),
                })?)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hdrs(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                http::HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    fn state_of(f: &Fleet, host: &str, gate: &Gate) -> HostState {
        f.view(gate, SystemTime::now())
            .hosts
            .into_iter()
            .find(|h| h.host_id == host)
            .map(|h| h.state)
            .unwrap()
    }

    fn gate_off() -> Gate {
        Gate::new(crate::config::GateConfig {
            enabled: false,
            ..Default::default()
        })
        .unwrap()
    }

    #[test]
    fn states_follow_the_order_of_precedence() {
        let f = Fleet::new(Duration::from_secs(3600));
        let g = gate_off();
        f.seen("a", &hdrs(&[("user-agent", "curl/8")]), None);
        assert_eq!(state_of(&f, "a", &g), HostState::Unknown);
        f.answered("a", Upload::Put, 201, None, "e1", Some("c"));
        assert_eq!(state_of(&f, "a", &g), HostState::Ok);
        f.answered(
            "a",
            Upload::Put,
            422,
            Some(ErrorCode::InvalidContent),
            "e2",
            None,
        );
        assert_eq!(state_of(&f, "a", &g), HostState::Rejecting);
        f.answered(
            "a",
            Upload::Check,
            412,
            Some(ErrorCode::CommitNotInWindow),
            "e3",
            None,
        );
        assert_eq!(
            state_of(&f, "a", &g),
            HostState::Stale,
            "stale wins over rejecting"
        );
        f.answered("a", Upload::Check, 204, None, "e4", None);
        assert_eq!(
            state_of(&f, "a", &g),
            HostState::Rejecting,
            "the latest PUT was 422"
        );
        f.answered("a", Upload::Put, 201, None, "e4", None);
        assert_eq!(state_of(&f, "a", &g), HostState::Ok);
        let v = f.view(&g, SystemTime::now());
        assert_eq!(v.hosts[0].rejections.get("invalid_content"), Some(&1));
        assert_eq!(v.hosts[0].rejections.get("commit_not_in_window"), Some(&1));
        assert_eq!(v.hosts[0].last_rejection.as_ref().unwrap().status, 412);
    }

    #[test]
    fn a_host_quiet_for_longer_than_silent_after_is_silent() {
        let f = Fleet::new(Duration::from_secs(60));
        let g = gate_off();
        f.seen("a", &HeaderMap::new(), None);
        f.answered("a", Upload::Put, 201, None, "e1", None);
        let later = SystemTime::now() + Duration::from_secs(61);
        assert_eq!(f.view(&g, later).hosts[0].state, HostState::Silent);
        assert_eq!(f.view(&g, SystemTime::now()).hosts[0].state, HostState::Ok);
    }

    #[test]
    fn malformed_identity_headers_are_kept_cut_and_marked() {
        let f = Fleet::new(Duration::from_secs(60));
        let g = gate_off();
        let long = "z".repeat(300);
        f.seen(
            "a",
            &hdrs(&[
                ("user-agent", &format!("cis490-shipper/{long}")),
                ("x-cis490-host-commit", &long),
            ]),
            None,
        );
        let h = &f.view(&g, SystemTime::now()).hosts[0];
        assert_eq!(h.host_commit.as_deref().map(str::len), Some(MAX_SHOWN));
        assert_eq!(h.host_commit_valid, Some(false));
        assert_eq!(h.host_commit_in_window, None);
        assert_eq!(h.shipper_version.as_deref().map(str::len), Some(MAX_SHOWN));
    }

    #[test]
    fn the_index_gives_counts_and_the_latest_store_and_last_row_wins() {
        let f = Fleet::new(Duration::from_secs(60));
        let row = |host: &str, ep: &str, bytes: u64, ts: &str| IndexRow {
            ts: ts.into(),
            host_id: host.into(),
            episode_id: ep.into(),
            path: String::new(),
            bytes,
            tar_sha256: String::new(),
            uncompressed_bytes: 0,
            files: 0,
            commit: "c".into(),
        };
        f.load_index([
            row("a", "e1", 10, "2026-01-01T00:00:00Z"),
            row("a", "e2", 20, "2026-01-02T00:00:00Z"),
            row("a", "e1", 15, "2026-01-03T00:00:00Z"),
            row("b", "e1", 5, "2026-01-01T00:00:00Z"),
        ]);
        let v = f.view(&gate_off(), SystemTime::now());
        let a = v.hosts.iter().find(|h| h.host_id == "a").unwrap();
        assert_eq!((a.stored_episodes, a.stored_bytes), (2, 35));
        assert_eq!(a.last_stored.as_ref().unwrap().episode_id, "e1");
        assert_eq!(a.last_seen, None);
    }

    #[test]
    fn worst_rows_come_first() {
        let f = Fleet::new(Duration::from_secs(3600));
        let g = gate_off();
        f.answered("ok-host", Upload::Put, 201, None, "e", None);
        f.answered(
            "bad-host",
            Upload::Put,
            412,
            Some(ErrorCode::CommitNotInWindow),
            "e",
            None,
        );
        f.answered(
            "meh-host",
            Upload::Put,
            409,
            Some(ErrorCode::Conflict),
            "e",
            None,
        );
        let order: Vec<String> = f
            .view(&g, SystemTime::now())
            .hosts
            .into_iter()
            .map(|h| h.host_id)
            .collect();
        assert_eq!(order, ["bad-host", "meh-host", "ok-host"]);
    }
}

/// What recording one request costs, for docs/BENCHMARKS.md:
/// `cargo test --release -p cis490-receiver --lib fleet::cost -- --ignored --nocapture`.
#[cfg(test)]
mod cost {
    use super::*;

    #[test]
    #[ignore = "a measurement, not a check; run by hand"]
    fn per_request_record() {
        let f = Fleet::new(Duration::from_secs(3600));
        let mut h = HeaderMap::new();
        h.insert(
            http::header::USER_AGENT,
            http::HeaderValue::from_static("cis490-shipper/0.1.0"),
        );
        h.insert(
            headers::HOST_COMMIT,
            http::HeaderValue::from_static("0123456789abcdef0123456789abcdef01234567"),
        );
        let hosts: Vec<String> = (0..64).map(|i| format!("lab-{i:02}")).collect();
        let n = 2_000_000u32;
        let started = std::time::Instant::now();
        for i in 0..n {
            let host = &hosts[(i % 64) as usize];
            f.request(
                host,
                &h,
                None,
                Some(Answer {
                    upload: Upload::Put,
                    status: 201,
                    code: None,
                    episode: "ep-000001",
                    commit: Some("0123456789abcdef0123456789abcdef01234567"),
                }),
            );
        }
        let per = started.elapsed() / n;
        println!("fleet record: {per:?} per request (64 hosts, {n} requests, one thread)");
    }
}
