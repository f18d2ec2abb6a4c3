//! A fleet of real shipper daemons (one process per lab host, each with its own certificate and
//! data dir) draining their backlogs into one real receiver process, and the oracle that checks
//! what arrived. Used by the bounded CI test and by `scripts/bench.sh fleet`.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use sha2::Digest;

use crate::episode;
use crate::harness::{metric, ops_get, shipper_bin, Lcg, Process, World};

/// What a fleet run measured and what the oracle found.
#[derive(Debug, Default)]
pub struct Report {
    /// The seed of the episode sizes (replay with `CIS490_CRASH_SEED`).
    pub seed: u64,
    pub hosts: usize,
    pub episodes: usize,
    pub bytes: u64,
    pub seconds: f64,
    /// Episodes in no host's `shipped/` at the end.
    pub lost: usize,
    /// Extra index rows, stored files or shipped entries beyond one per episode.
    pub duplicated: usize,
    /// Stored bodies whose tar SHA-256 differs from a repack of the shipped episode.
    pub corrupted: usize,
    pub quarantined: usize,
    /// PUTs the receiver answered 503 (its upload limit), which the shippers retried.
    pub refused_busy: u64,
    pub receiver_peak_rss_mib: f64,
    pub shipper_peak_rss_mib_max: f64,
    pub receiver_fds_after: usize,
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "fleet seed={} hosts={} episodes={} MB={:.1} seconds={:.1} episodes_per_s={:.0} lost={} duplicated={} corrupted={} quarantined={} busy_503={} receiver_peak_rss_MiB={:.1} shipper_peak_rss_MiB_max={:.1} receiver_fds_after={}",
            self.seed,
            self.hosts,
            self.episodes,
            self.bytes as f64 / 1e6,
            self.seconds,
            self.episodes as f64 / self.seconds.max(1e-9),
            self.lost,
            self.duplicated,
            self.corrupted,
            self.quarantined,
            self.refused_busy,
            self.receiver_peak_rss_mib,
            self.shipper_peak_rss_mib_max,
            self.receiver_fds_after,
        )
    }
}

/// `VmHWM`/`VmRSS` etc. of a live process, in KiB (0 once it is gone).
pub fn status_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

pub fn host_name(k: usize) -> String {
    format!("labhost-{k:03}")
}

/// Runs `hosts` shipper daemons with `per_host` episodes each (mixed sizes, seeded) against one
/// receiver started with `receiver_extra` config, until every backlog drains or `limit` passes.
pub async fn run(
    w: &World,
    hosts: usize,
    per_host: usize,
    receiver_extra: &str,
    seed: u64,
    limit: Duration,
) -> Report {
    let receiver = Process::start(&w.config(receiver_extra), &[]);
    let url = format!("https://localhost:{}", receiver.addr.port());
    let mut rng = Lcg(seed);
    let mut report = Report {
        seed,
        hosts,
        episodes: hosts * per_host,
        ..Default::default()
    };
    let mut configs = Vec::new();
    for k in 0..hosts {
        let host = host_name(k);
        let cfg = w.shipper_config(
            &host,
            &url,
            "[shipping]\nconcurrency = 2\nmax_backoff_s = 1\n",
        );
        let eps = w.data_dir(&host).join("episodes");
        std::fs::create_dir_all(&eps).unwrap();
        let gen = w.data_dir(&host).join("gen");
        for i in 0..per_host {
            // Mostly small, some over the 1 MiB preflight threshold.
            let size = match rng.below(10) {
                0 => 1_100_000 + rng.below(900_000) as usize,
                1..=2 => 200_000,
                _ => 16_384,
            };
            let id = format!("ep-{i:04}");
            episode::body(&gen, &id, &w.commits[1], size);
            report.bytes += size as u64;
            std::fs::rename(gen.join(&id), eps.join(&id)).unwrap();
        }
        configs.push(cfg);
    }
    let started = Instant::now();
    let mut ships: Vec<Child> = configs
        .iter()
        .map(|cfg| {
            Command::new(shipper_bin())
                .arg("--config")
                .arg(cfg)
                .arg("run")
                .env("CIS490_LOG", "warn")
                .env_remove("NOTIFY_SOCKET")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("shipper starts")
        })
        .collect();
    let backlog = || -> usize {
        (0..hosts)
            .map(|k| {
                std::fs::read_dir(w.data_dir(&host_name(k)).join("episodes"))
                    .map(|d| d.count())
                    .unwrap_or(0)
            })
            .sum()
    };
    let deadline = started + limit;
    while backlog() > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    report.seconds = started.elapsed().as_secs_f64();
    for s in &ships {
        let kib = status_kib(s.id(), "VmHWM:");
        report.shipper_peak_rss_mib_max = report.shipper_peak_rss_mib_max.max(kib as f64 / 1024.0);
    }
    for s in &ships {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(s.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
    }
    for s in &mut ships {
        let _ = s.wait();
    }
    report.receiver_peak_rss_mib = status_kib(receiver.child.id(), "VmHWM:") as f64 / 1024.0;
    report.receiver_fds_after = std::fs::read_dir(format!("/proc/{}/fd", receiver.child.id()))
        .map(|d| d.count())
        .unwrap_or(0);
    let (_, text) = ops_get(receiver.ops_addr, "/metrics").await;
    report.refused_busy =
        metric(&text, "cis490_receiver_uploads_total{status=\"503\"}").unwrap_or(0.0) as u64;
    drop(receiver);
    judge(w, hosts, per_host, &mut report);
    report
}

/// The oracle: every episode shipped exactly once, stored once with its own bytes.
fn judge(w: &World, hosts: usize, per_host: usize, report: &mut Report) {
    let store = w.store_dir();
    let rows: Vec<serde_json::Value> = std::fs::read_to_string(store.join("index.jsonl"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let mut by_key: std::collections::HashMap<(String, String), Vec<&serde_json::Value>> =
        Default::default();
    for r in &rows {
        let k = (
            r["host_id"].as_str().unwrap_or("").to_string(),
            r["episode_id"].as_str().unwrap_or("").to_string(),
        );
        by_key.entry(k).or_default().push(r);
    }
    let stored_files: usize = std::fs::read_dir(store.join("episodes"))
        .map(|d| {
            d.flatten()
                .map(|h| std::fs::read_dir(h.path()).map(|x| x.count()).unwrap_or(0))
                .sum()
        })
        .unwrap_or(0);
    let expected = hosts * per_host;
    report.duplicated +=
        rows.len().saturating_sub(expected) + stored_files.saturating_sub(expected);
    for k in 0..hosts {
        let host = host_name(k);
        let shipped = w.data_dir(&host).join("shipped");
        let names: std::collections::HashSet<String> = std::fs::read_dir(&shipped)
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        report.quarantined += std::fs::read_dir(w.data_dir(&host).join("quarantine"))
            .map(|d| d.count())
            .unwrap_or(0);
        report.duplicated += names.len().saturating_sub(per_host);
        for i in 0..per_host {
            let id = format!("ep-{i:04}");
            if !names.contains(&id) {
                report.lost += 1;
                continue;
            }
            let Some(mine) = by_key.get(&(host.clone(), id.clone())) else {
                report.lost += 1;
                continue;
            };
            let (p, _) = episode::pack(&shipped.join(&id), &id);
            let ok = std::fs::read(store.join(mine[0]["path"].as_str().unwrap_or("")))
                .ok()
                .and_then(|b| zstd::decode_all(&b[..]).ok())
                .is_some_and(|tar| {
                    hex::encode(sha2::Sha256::digest(&tar)) == p.tar_sha256
                        && mine[0]["tar_sha256"] == p.tar_sha256.as_str()
                });
            if !ok {
                report.corrupted += 1;
            }
        }
    }
}
