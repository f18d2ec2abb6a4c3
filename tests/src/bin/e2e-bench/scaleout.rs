//! `scripts/bench.sh s3`: the large and small workloads shipped by two lab hosts, once into one
//! receiver on the filesystem store and once into two receivers on a 3-node Garage cluster
//! (each host lists both receivers, in opposite orders); then the receiver's peak memory with
//! 64 concurrent uploads streaming into the bucket.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Instant;

use cis490_tests::garage::Garage;
use cis490_tests::harness::{bin, Process, World};

use crate::{concurrent_64, data, rss_kib};

const HOSTS: [&str; 2] = ["labhost-01", "labhost-02"];

struct Workload {
    name: &'static str,
    per_host: usize,
    size: usize,
}

fn fill(w: &World, wl: &Workload, commit: &str) -> u64 {
    let mut total = 0u64;
    for (h, host) in HOSTS.iter().enumerate() {
        let eps = w.data_dir(host).join("episodes");
        for i in 0..wl.per_host {
            let d = cis490_tests::episode::write(&eps, &format!("{}-{i:05}", wl.name), commit, &[]);
            let seed = (h * 1_000_000 + i) as u64 + 11;
            if wl.size > 1 << 20 {
                // Half sensor-log-like (compressible), half frame-like (incompressible).
                let half = wl.size / 2;
                std::fs::write(d.join("log.bin"), data(half, seed)).unwrap();
                let mut x = seed | 1;
                let frames: Vec<u8> = (0..wl.size - half)
                    .map(|_| {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        x as u8
                    })
                    .collect();
                std::fs::write(d.join("frames.bin"), frames).unwrap();
            } else {
                std::fs::write(d.join("data.bin"), data(wl.size, seed)).unwrap();
            }
            total += wl.size as u64;
        }
    }
    total
}

fn once(cfg: &Path) -> Child {
    Command::new(bin("e2e-shipper"))
        .arg("--config")
        .arg(cfg)
        .arg("once")
        .env("CIS490_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

/// Ships the workload from both hosts at once; returns wall seconds and receivers' peak RSS.
fn ship_all(cfgs: &[PathBuf], receivers: &[&Process]) -> (f64, Vec<f64>) {
    let t = Instant::now();
    let mut kids: Vec<Child> = cfgs.iter().map(|c| once(c)).collect();
    for k in &mut kids {
        let st = k.wait().unwrap();
        assert!(st.success(), "shipper once failed: {st}");
    }
    let secs = t.elapsed().as_secs_f64();
    let rss = receivers
        .iter()
        .map(|p| rss_kib(p.child.id(), "VmHWM:") as f64 / 1024.0)
        .collect();
    (secs, rss)
}

/// `CIS490_BENCH_CONCURRENCY` (default 2) uploads at once per lab host.
fn shipping(extra: &str) -> String {
    let c: usize = std::env::var("CIS490_BENCH_CONCURRENCY")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2);
    format!("[shipping]\nconcurrency = {c}\nzstd_threads = 1\n{extra}")
}

pub async fn run(scale: usize) {
    let workloads = [
        Workload {
            name: "large",
            per_host: 20 / scale.min(10),
            size: 25_000_000,
        },
        Workload {
            name: "small",
            per_host: 2_500 / scale.min(10),
            size: 16 * 1024,
        },
    ];
    // CIS490_BENCH_ONLY=small (or large, or concurrent) runs one part.
    let only = std::env::var("CIS490_BENCH_ONLY").unwrap_or_default();
    for wl in workloads
        .iter()
        .filter(|w| only.is_empty() || only == w.name)
    {
        for kind in ["fs", "s3"] {
            let w = World::new(3);
            let commit = w.commits[2].clone();
            let total = fill(&w, wl, &commit);
            let n = wl.per_host * HOSTS.len();
            let garage;
            let mut receivers = Vec::new();
            if kind == "fs" {
                receivers.push(Process::start(&w.config(""), &[]));
            } else {
                garage = Garage::start(&w.path().join("garage"));
                let cfg = w.config(&garage.store_section(&garage.endpoint, ""));
                receivers.push(Process::start(&cfg, &[]));
                receivers.push(Process::start(&cfg, &[]));
            }
            let urls: Vec<String> = receivers
                .iter()
                .map(|p| format!("\"https://localhost:{}\"", p.addr.port()))
                .collect();
            let cfgs: Vec<PathBuf> = HOSTS
                .iter()
                .enumerate()
                .map(|(h, host)| {
                    let mut u = urls.clone();
                    let k = h % u.len();
                    u.rotate_left(k);
                    w.shipper_config(host, &format!("[{}]", u.join(", ")), &shipping(""))
                })
                .collect();
            let refs: Vec<&Process> = receivers.iter().collect();
            let (secs, rss) = tokio::task::block_in_place(|| ship_all(&cfgs, &refs));
            let rss_s: Vec<String> = rss.iter().map(|r| format!("{r:.1}")).collect();
            println!(
                "scaleout.{} store={kind} receivers={} hosts=2 {} episodes={n} tar_bytes={total} seconds={secs:.2} MBps={:.1} episodes_per_s={:.0} receiver_peak_rss_MiB={}",
                wl.name,
                receivers.len(),
                shipping("").lines().nth(1).unwrap_or("").replace(" = ", "="),
                total as f64 / 1e6 / secs,
                n as f64 / secs,
                rss_s.join("/")
            );
            if kind == "s3" {
                // Where the time goes: mean latency per kind of store request, first receiver.
                let (_, m) =
                    cis490_tests::harness::ops_get(receivers[0].ops_addr, "/metrics").await;
                let mut parts = Vec::new();
                for l in m
                    .lines()
                    .filter(|l| l.starts_with("cis490_store_request_duration_seconds_sum{"))
                {
                    let op = l.split('"').nth(1).unwrap_or("?");
                    let sum: f64 = l
                        .rsplit(' ')
                        .next()
                        .and_then(|v| v.parse().ok())
                        .unwrap_or(0.0);
                    let count = cis490_tests::harness::metric(
                        &m,
                        &format!("cis490_store_request_duration_seconds_count{{op=\"{op}\"}}"),
                    )
                    .unwrap_or(0.0);
                    if count > 0.0 {
                        parts.push(format!("{op}={:.1}ms/{count}", sum / count * 1e3));
                    }
                }
                println!("scaleout.{}.store_latency {}", wl.name, parts.join(" "));
            }
            drop(receivers);
        }
    }

    if !(only.is_empty() || only == "concurrent") {
        return;
    }
    // 64 concurrent uploads of 16 MiB into the bucket: each streams as multipart.
    let w = World::new(3);
    let garage = Garage::start(&w.path().join("garage"));
    let cfg = w.config(&format!(
        "[limits]\nmax_concurrent_uploads = 64\n{}",
        garage.store_section(&garage.endpoint, "")
    ));
    let p = Process::start(&cfg, &[]);
    concurrent_64(&w, &p, scale, "scaleout.concurrent_64 store=s3").await;
}
