//! Benchmarks of the real binaries on loopback mTLS (run by `scripts/bench.sh`, release build).
//! Prints one line per figure; docs/BENCHMARKS.md records them with the command.

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;

mod compare;
mod link;
mod scaleout;
mod stages;

use cis490_tests::episode;
use cis490_tests::harness::{bin, Process, World};

const HOST: &str = "labhost-01";

fn rss_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix(field)
                .map(|v| v.trim().trim_end_matches(" kB").trim().parse().unwrap_or(0))
        })
        .unwrap_or(0)
}

/// Semi-compressible data: runs of a repeating pattern broken by pseudo-random bytes.
fn data(size: usize, seed: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(size);
    let mut x = seed | 1;
    while out.len() < size {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        if x % 3 == 0 {
            out.extend_from_slice(&[(x >> 8) as u8; 64]);
        } else {
            out.extend_from_slice(&x.to_le_bytes());
        }
    }
    out.truncate(size);
    out
}

struct Conn {
    send: hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    host: String,
}

async fn connect(w: &World, addr: std::net::SocketAddr) -> Conn {
    connect_as(w, addr, HOST).await
}

/// Lab host `k` of a bench's fleet: connections spread over 8 hosts, so the receiver's
/// per-host slot cap (`max_uploads_per_host`, 8) is what a real fleet meets.
fn fleet_host(k: usize) -> String {
    format!("labhost-{:02}", k % 8 + 1)
}

async fn connect_as(w: &World, addr: std::net::SocketAddr, host: &str) -> Conn {
    let tls = cis490_tests::client::raw_tls(addr, &w.pki.ca_file, &w.pki.client(host)).await;
    let _ = tls.get_ref().0.set_nodelay(true);
    let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(conn);
    Conn {
        send,
        host: host.to_string(),
    }
}

async fn put(c: &mut Conn, b: &episode::Body) -> u16 {
    c.send.ready().await.unwrap();
    let req = http::Request::builder()
        .method("PUT")
        .uri(format!("/v1/episodes/{}/{}", c.host, b.id))
        .header("host", "localhost")
        .header("x-cis490-code-commit", &b.commit)
        .header("x-cis490-tar-sha256", &b.sha)
        .header("content-type", "application/zstd")
        .body(Full::new(Bytes::from(b.bytes.clone())))
        .unwrap();
    let resp = c.send.send_request(req).await.unwrap();
    let status = resp.status().as_u16();
    let _ = resp.into_body().collect().await;
    status
}

fn body_from(dir: &Path, id: &str, commit: &str) -> episode::Body {
    let (p, bytes) = cis490_shipper::pack::pack(
        dir,
        id,
        Vec::new(),
        cis490_shipper::pack::Compression {
            level: 3,
            threads: 0,
            mode: cis490_shipper::pack::Mode::Level,
        },
    )
    .unwrap();
    episode::Body {
        id: id.into(),
        commit: commit.into(),
        sha: p.tar_sha256,
        bytes,
    }
}

fn pct(v: &mut [Duration], p: f64) -> Duration {
    v.sort();
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

async fn receiver_benches(scale: usize) {
    // 1. One large upload.
    let w = World::new(3);
    let p = Process::start(&w.config("[limits]\nmax_concurrent_uploads = 64\n"), &[]);
    let gb = 1usize << 30;
    let size = gb / scale;
    let dir = w.path().join("big/ep-big");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("meta.json"),
        format!(r#"{{"code_version":{{"commit":"{}"}}}}"#, w.commits[2]),
    )
    .unwrap();
    for i in 0..8 {
        std::fs::write(
            dir.join(format!("part{i}.bin")),
            data(size / 8, i as u64 + 7),
        )
        .unwrap();
    }
    let b = body_from(&dir, "ep-big", &w.commits[2]);
    let mut c = connect(&w, p.addr).await;
    let t = Instant::now();
    let status = put(&mut c, &b).await;
    let el = t.elapsed();
    assert_eq!(status, 201);
    println!(
        "receiver.single_upload tar_bytes={} body_bytes={} seconds={:.2} body_MBps={:.0} tar_MBps={:.0} receiver_peak_rss_MiB={:.1}",
        size,
        b.bytes.len(),
        el.as_secs_f64(),
        b.bytes.len() as f64 / 1e6 / el.as_secs_f64(),
        size as f64 / 1e6 / el.as_secs_f64(),
        rss_kib(p.child.id(), "VmHWM:") as f64 / 1024.0
    );
    drop(b);
    drop(p);

    // 2. Many small uploads over 16 kept-alive connections.
    let w = World::new(3);
    let p = Process::start(&w.config(""), &[]);
    let n = 5000 / scale.min(10);
    let commit = w.commits[2].clone();
    let bodies: Vec<episode::Body> = (0..n)
        .map(|i| {
            let d = w.path().join("small").join(format!("ep-{i:05}"));
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(
                d.join("meta.json"),
                format!(r#"{{"code_version":{{"commit":"{commit}"}}}}"#),
            )
            .unwrap();
            std::fs::write(d.join("data.bin"), data(16 * 1024, i as u64 + 1)).unwrap();
            let (pk, bytes) = cis490_shipper::pack::pack(
                &d,
                &format!("ep-{i:05}"),
                Vec::new(),
                Default::default(),
            )
            .unwrap();
            episode::Body {
                id: format!("ep-{i:05}"),
                commit: commit.clone(),
                sha: pk.tar_sha256,
                bytes,
            }
        })
        .collect();
    let bodies = Arc::new(bodies);
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let t = Instant::now();
    let mut tasks = Vec::new();
    for k in 0..16 {
        let (bodies, next) = (bodies.clone(), next.clone());
        let mut c = connect_as(&w, p.addr, &fleet_host(k)).await;
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= bodies.len() {
                    return lat;
                }
                let t = Instant::now();
                assert_eq!(put(&mut c, &bodies[i]).await, 201);
                lat.push(t.elapsed());
            }
        }));
    }
    let mut lat = Vec::new();
    for t in tasks {
        lat.extend(t.await.unwrap());
    }
    let el = t.elapsed();
    println!(
        "receiver.small_uploads episodes={n} connections=16 seconds={:.2} episodes_per_s={:.0} p50_ms={:.2} p99_ms={:.2} receiver_peak_rss_MiB={:.1}",
        el.as_secs_f64(),
        n as f64 / el.as_secs_f64(),
        pct(&mut lat, 0.5).as_secs_f64() * 1e3,
        pct(&mut lat, 0.99).as_secs_f64() * 1e3,
        rss_kib(p.child.id(), "VmHWM:") as f64 / 1024.0
    );
    drop(p);

    // 3. 64 concurrent uploads: the receiver's peak memory.
    let w = World::new(3);
    let p = Process::start(&w.config("[limits]\nmax_concurrent_uploads = 64\n"), &[]);
    concurrent_64(&w, &p, scale, "receiver.concurrent_64").await;
}

/// 64 connections each PUT a 16 MiB (÷ scale) episode at once; prints the receiver's peak RSS.
async fn concurrent_64(w: &World, p: &Process, scale: usize, label: &str) {
    let commit = w.commits[2].clone();
    let bodies: Vec<episode::Body> = (0..64)
        .map(|i| {
            let d = w.path().join("mid").join(format!("ep-{i:02}"));
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(
                d.join("meta.json"),
                format!(r#"{{"code_version":{{"commit":"{commit}"}}}}"#),
            )
            .unwrap();
            std::fs::write(d.join("data.bin"), data((16 << 20) / scale, i as u64 + 99)).unwrap();
            body_from(&d, &format!("ep-{i:02}"), &commit)
        })
        .collect();
    let before = rss_kib(p.child.id(), "VmRSS:");
    let t = Instant::now();
    let mut tasks = Vec::new();
    for (k, b) in bodies.into_iter().enumerate() {
        let mut c = connect_as(w, p.addr, &fleet_host(k)).await;
        tasks.push(tokio::spawn(async move { put(&mut c, &b).await }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), 201);
    }
    println!(
        "{label} each_tar_MiB={} seconds={:.2} rss_before_MiB={:.1} receiver_peak_rss_MiB={:.1}",
        16 / scale.max(1),
        t.elapsed().as_secs_f64(),
        before as f64 / 1024.0,
        rss_kib(p.child.id(), "VmHWM:") as f64 / 1024.0
    );
}

/// `memory [runs]`: the 64-upload peak RSS of a fresh receiver, `runs` times (issue 21: the
/// target holds in every run, not on average).
async fn memory_bench(runs: usize, scale: usize) {
    for run in 1..=runs {
        let w = World::new(3);
        let p = Process::start(&w.config("[limits]\nmax_concurrent_uploads = 64\n"), &[]);
        concurrent_64(&w, &p, scale, &format!("memory.run{run}")).await;
    }
}

/// Runs `e2e-shipper --config cfg once`, sampling its peak RSS; returns (seconds, peak MiB, exit).
fn shipper_once(cfg: &Path) -> (f64, f64, i32) {
    let t = Instant::now();
    let mut child = Command::new(bin("e2e-shipper"))
        .arg("--config")
        .arg(cfg)
        .arg("once")
        .env("CIS490_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut peak = 0;
    let code = loop {
        peak = peak.max(rss_kib(child.id(), "VmHWM:"));
        if let Some(st) = child.try_wait().unwrap() {
            break st.code().unwrap_or(-1);
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    (t.elapsed().as_secs_f64(), peak as f64 / 1024.0, code)
}

async fn shipper_benches(scale: usize) {
    // 1 GB of mixed episodes (1 MB to 64 MB), two uploads at once, 1 or 2 zstd threads each.
    for zstd_threads in [1, 2] {
        let w = World::new(3);
        let p = Process::start(&w.config(""), &[]);
        let url = format!("https://localhost:{}", p.addr.port());
        let cfg = w.shipper_config(
            HOST,
            &url,
            &format!("[shipping]\nconcurrency = 2\nzstd_threads = {zstd_threads}\n"),
        );
        let eps = w.data_dir(HOST).join("episodes");
        let mut total = 0usize;
        let mut i = 0u64;
        let sizes = [1usize << 20, 4 << 20, 16 << 20, 64 << 20];
        while total < (1usize << 30) / scale {
            let size = sizes[(i % 4) as usize] / scale.min(4);
            let d = episode::write(&eps, &format!("mix-{i:03}"), &w.commits[2], &[]);
            std::fs::write(d.join("data.bin"), data(size, i + 5)).unwrap();
            total += size;
            i += 1;
        }
        let (secs, peak, code) = tokio::task::block_in_place(|| shipper_once(&cfg));
        assert_eq!(code, 0);
        println!(
            "shipper.mixed concurrency=2 zstd_threads={zstd_threads} episodes={i} tar_bytes={total} seconds={secs:.2} MBps={:.0} shipper_peak_rss_MiB={peak:.1}",
            total as f64 / 1e6 / secs
        );
    }

    // 5,000 × 16 KB.
    let w = World::new(3);
    let p2 = Process::start(&w.config(""), &[]);
    let cfg = w.shipper_config(
        HOST,
        &format!("https://localhost:{}", p2.addr.port()),
        "[shipping]\nconcurrency = 2\nzstd_threads = 2\n",
    );
    let eps = w.data_dir(HOST).join("episodes");
    let n = 5000 / scale.min(10);
    for i in 0..n {
        let d = episode::write(&eps, &format!("small-{i:05}"), &w.commits[2], &[]);
        std::fs::write(d.join("data.bin"), data(16 * 1024, i as u64 + 3)).unwrap();
    }
    let (secs, peak, code) = tokio::task::block_in_place(|| shipper_once(&cfg));
    assert_eq!(code, 0);
    println!(
        "shipper.small episodes={n} seconds={secs:.2} episodes_per_s={:.0} shipper_peak_rss_MiB={peak:.1}",
        n as f64 / secs
    );
    drop(p2);

    // Time to the first upload with a large backlog.
    let w = World::new(3);
    let p3 = Process::start(&w.config(""), &[]);
    let cfg = w.shipper_config(HOST, &format!("https://localhost:{}", p3.addr.port()), "");
    let eps = w.data_dir(HOST).join("episodes");
    let n = 100_000 / scale;
    let meta = format!(r#"{{"code_version":{{"commit":"{}"}}}}"#, w.commits[2]);
    for i in 0..n {
        let d = eps.join(format!("b-{i:06}"));
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("meta.json"), &meta).unwrap();
    }
    let shipped = w.data_dir(HOST).join("shipped");
    let t = Instant::now();
    let mut child = Command::new(bin("e2e-shipper"))
        .arg("--config")
        .arg(&cfg)
        .arg("run")
        .env("CIS490_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let first = loop {
        if std::fs::read_dir(&shipped)
            .map(|mut r| r.next().is_some())
            .unwrap_or(false)
        {
            break t.elapsed();
        }
        assert!(
            t.elapsed() < Duration::from_secs(120),
            "no upload within 120 s"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    let _ = child.kill();
    let _ = child.wait();
    println!(
        "shipper.backlog episodes={n} first_upload_s={:.3}",
        first.as_secs_f64()
    );
}

async fn check_rate(w: &World, addr: std::net::SocketAddr, commit: &str, total: usize) -> f64 {
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let t = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..16 {
        let next = next.clone();
        let commit = commit.to_string();
        let mut c = connect(w, addr).await;
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= total {
                    return;
                }
                c.send.ready().await.unwrap();
                let req = http::Request::builder()
                    .method("POST")
                    .uri(format!("/v1/episodes/{HOST}/ep-{i}/check"))
                    .header("host", "localhost")
                    .header("x-cis490-code-commit", &commit)
                    .header("x-cis490-tar-sha256", "0".repeat(64))
                    .header("x-cis490-upload-length", "1000")
                    .body(Full::new(Bytes::new()))
                    .unwrap();
                let resp = c.send.send_request(req).await.unwrap();
                assert_eq!(resp.status().as_u16(), 204);
                let _ = resp.into_body().collect().await;
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    total as f64 / t.elapsed().as_secs_f64()
}

async fn gate_benches() {
    use cis490_receiver::config::{ForgejoConfig, GateConfig};
    use cis490_receiver::gate::Gate;
    let w = World::new(150);
    let cfg = GateConfig {
        repo_path: Some(w.repo.path.clone()),
        ..GateConfig::default()
    };
    let gate = Gate::new(cfg).unwrap();
    gate.refresh().await.unwrap();
    let hit = cis490_common::Commit::parse(&w.commits[120]).unwrap();
    let miss = cis490_common::Commit::from_bytes([7; 20]);
    let mut lat = Vec::with_capacity(200_000);
    for i in 0..200_000 {
        let c = if i % 2 == 0 { &hit } else { &miss };
        let t = Instant::now();
        std::hint::black_box(gate.check_now(std::hint::black_box(c)));
        lat.push(t.elapsed());
    }
    println!(
        "gate.check_now commits=100 calls=200000 p50_ns={} p99_ns={} max_ns={}",
        pct(&mut lat, 0.5).as_nanos(),
        pct(&mut lat, 0.99).as_nanos(),
        lat.iter().max().unwrap().as_nanos()
    );
    let mut lat = Vec::new();
    for _ in 0..50 {
        let t = Instant::now();
        gate.refresh().await.unwrap();
        lat.push(t.elapsed());
    }
    println!(
        "gate.refresh source=git commits=100 p50_ms={:.2} p99_ms={:.2}",
        pct(&mut lat, 0.5).as_secs_f64() * 1e3,
        pct(&mut lat, 0.99).as_secs_f64() * 1e3
    );
    let f = cis490_tests::forgejo::StandIn::start(w.repo.log(200)).await;
    let cfg = GateConfig {
        forgejo: Some(ForgejoConfig {
            base_url: f.base_url(),
            owner: "lab".into(),
            repo: "code".into(),
            token_file: None,
            ca_file: None,
            allow_insecure_http: false,
        }),
        repo_path: None,
        ..GateConfig::default()
    };
    let gate = Gate::new(cfg).unwrap();
    let mut lat = Vec::new();
    for _ in 0..50 {
        let t = Instant::now();
        gate.refresh().await.unwrap();
        lat.push(t.elapsed());
    }
    assert_eq!(gate.view().source, Some("forgejo"));
    println!(
        "gate.refresh source=forgejo-stand-in commits=100 pages=2 p50_ms={:.2} p99_ms={:.2}",
        pct(&mut lat, 0.5).as_secs_f64() * 1e3,
        pct(&mut lat, 0.99).as_secs_f64() * 1e3
    );
    let p = Process::start(&w.config(""), &[]);
    let on = check_rate(&w, p.addr, &w.commits[140], 20_000).await;
    drop(p);
    let w2 = World::new(3);
    let p = Process::start(&w2.config("[version_gate]\nenabled = false\n"), &[]);
    let off = check_rate(&w2, p.addr, &w2.commits[2], 20_000).await;
    println!("gate.check_endpoint requests=20000 connections=16 gate_on_per_s={on:.0} gate_off_per_s={off:.0}");
}

/// A compromised host sending `n` tiny invalid bodies over one kept-alive connection: the
/// receiver quarantine stays at `max_entries` (1,000 here) and a rejection costs the same at
/// the end as at the start (SPEC §16). Run with TMPDIR on a tmpfs to leave the disk's fsyncs
/// out of the figure.
async fn quarantine_bench(n: usize) {
    let w = World::new(1);
    let p = Process::start(
        &w.config("[version_gate]\nenabled = false\n[quarantine]\nmax_entries = 1000\n"),
        &[],
    );
    let mut c = connect(&w, p.addr).await;
    let tenth = (n / 10).max(1);
    let mut rates = Vec::new();
    let t0 = Instant::now();
    let mut t = Instant::now();
    for i in 0..n {
        let b = episode::Body {
            id: format!("q{i:07}"),
            commit: w.commits[0].clone(),
            sha: "0".repeat(64),
            bytes: b"not a zstd stream".to_vec(),
        };
        assert_eq!(put(&mut c, &b).await, 422);
        if (i + 1) % tenth == 0 {
            rates.push(tenth as f64 / t.elapsed().as_secs_f64());
            t = Instant::now();
        }
    }
    let qdir = w.store_dir().join("quarantine");
    let entries = std::fs::read_dir(&qdir)
        .map(|d| {
            d.flatten()
                .filter(|e| e.file_name().to_string_lossy().ends_with(".reason.json"))
                .count()
        })
        .unwrap_or(0);
    let (_, m) = cis490_tests::harness::ops_get(p.ops_addr, "/metrics").await;
    let scans = cis490_tests::harness::metric(&m, "cis490_receiver_quarantine_scans_total");
    println!(
        "quarantine.tiny_rejections n={n} seconds={:.1} per_s_first_tenth={:.0} per_s_last_tenth={:.0} per_s_each_tenth={:?} entries_kept={entries} directory_listings={} receiver_peak_rss_MiB={:.1}",
        t0.elapsed().as_secs_f64(),
        rates.first().copied().unwrap_or(0.0),
        rates.last().copied().unwrap_or(0.0),
        rates.iter().map(|r| r.round() as u64).collect::<Vec<_>>(),
        scans.unwrap_or(-1.0),
        rss_kib(p.child.id(), "VmHWM:") as f64 / 1024.0
    );
}

/// Held load: 64 kept-alive connections uploading small episodes for `secs` seconds, plus a
/// handful of slow clients holding connections open; reports rate, latency, errors and RSS.
async fn load_bench(secs: u64) {
    let w = World::new(3);
    let p = Process::start(
        &w.config("[limits]\nmax_concurrent_uploads = 64\nheader_timeout_s = 5\n"),
        &[],
    );
    let commit = w.commits[2].clone();
    // Slowloris clients: TLS up, half a request line, then nothing.
    let mut slow = Vec::new();
    for _ in 0..16 {
        let mut s =
            cis490_tests::client::raw_tls(p.addr, &w.pki.ca_file, &w.pki.client(HOST)).await;
        use tokio::io::AsyncWriteExt;
        let _ = s
            .write_all(b"PUT /v1/episodes/labhost-01/slow HTTP/1.1\r\nhost: loc")
            .await;
        slow.push(s);
    }
    let stop = Instant::now() + Duration::from_secs(secs);
    let counter = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let t = Instant::now();
    let mut tasks = Vec::new();
    for k in 0..64 {
        let mut c = connect_as(&w, p.addr, &fleet_host(k)).await;
        let commit = commit.clone();
        let counter = counter.clone();
        let dir = w.path().join(format!("load-{k}"));
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut errors = 0usize;
            while Instant::now() < stop {
                let i = counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let id = format!("ld-{i:07}");
                let d = dir.join(&id);
                std::fs::create_dir_all(&d).unwrap();
                std::fs::write(
                    d.join("meta.json"),
                    format!(r#"{{"code_version":{{"commit":"{commit}"}}}}"#),
                )
                .unwrap();
                std::fs::write(d.join("data.bin"), data(16 * 1024, i as u64)).unwrap();
                let (pk, bytes) =
                    cis490_shipper::pack::pack(&d, &id, Vec::new(), Default::default()).unwrap();
                let _ = std::fs::remove_dir_all(&d);
                let b = episode::Body {
                    id,
                    commit: commit.clone(),
                    sha: pk.tar_sha256,
                    bytes,
                };
                let t = Instant::now();
                if put(&mut c, &b).await == 201 {
                    lat.push(t.elapsed());
                } else {
                    errors += 1;
                }
            }
            (lat, errors)
        }));
    }
    let mut lat = Vec::new();
    let mut errors = 0;
    for t in tasks {
        let (l, e) = t.await.unwrap();
        lat.extend(l);
        errors += e;
    }
    let el = t.elapsed();
    let fds = std::fs::read_dir(format!("/proc/{}/fd", p.child.id()))
        .map(|d| d.count())
        .unwrap_or(0);
    println!(
        "load connections=64 slowloris=16 seconds={:.0} stored={} per_s={:.0} p50_ms={:.1} p99_ms={:.1} errors={errors} receiver_peak_rss_MiB={:.1} open_fds_after={fds}",
        el.as_secs_f64(),
        lat.len(),
        lat.len() as f64 / el.as_secs_f64(),
        pct(&mut lat, 0.5).as_secs_f64() * 1e3,
        pct(&mut lat, 0.99).as_secs_f64() * 1e3,
        rss_kib(p.child.id(), "VmHWM:") as f64 / 1024.0
    );
    // The group commit's work (issue 21): rows per flush, and fsyncs per stored episode (the
    // body's own fsync, plus its share of the directory fsyncs and index fdatasyncs).
    let (_, m) = cis490_tests::harness::ops_get(p.ops_addr, "/metrics").await;
    let get = |name: &str| cis490_tests::harness::metric(&m, name).unwrap_or(0.0);
    let groups = get("cis490_receiver_commit_groups_total");
    let rows = get("cis490_receiver_commit_rows_total");
    let dirs = get("cis490_receiver_commit_dir_fsyncs_total");
    println!(
        "load.group_commit rows={rows} groups={groups} rows_per_group={:.2} dir_fsyncs={dirs} receiver_fsyncs_per_episode={:.2}",
        rows / groups.max(1.0),
        1.0 + (dirs + groups) / rows.max(1.0)
    );
    drop(slow);
}

/// The receiver's start-up time and resident memory with `rows` stored episodes (16 hosts;
/// the stored files are empty stand-ins: only the index and the directory walk are measured),
/// and a sample of rows read back through `GET`.
async fn index_bench(rows: usize) {
    let w = World::new(2);
    let store = w.store_dir();
    let mut index = std::io::BufWriter::new(
        std::fs::File::create({
            std::fs::create_dir_all(store.join("episodes")).unwrap();
            store.join("index.jsonl")
        })
        .unwrap(),
    );
    let t = Instant::now();
    for i in 0..rows {
        use std::io::Write;
        let host = format!("labhost-{:02}", i % 16);
        let ep = format!("episode-{i:09}");
        let dir = store.join("episodes").join(&host);
        if i < 16 {
            std::fs::create_dir_all(&dir).unwrap();
        }
        std::fs::File::create(dir.join(format!("{ep}.tar.zst"))).unwrap();
        let sha = format!("{:064x}", i as u128 * 0x9E37_79B9_7F4A_7C15);
        writeln!(
            index,
            r#"{{"ts":"2026-11-28T12:00:00Z","host_id":"{host}","episode_id":"{ep}","path":"episodes/{host}/{ep}.tar.zst","bytes":{i},"tar_sha256":"{sha}","uncompressed_bytes":{},"files":3,"commit":"{}"}}"#,
            i * 3,
            w.commits[1]
        )
        .unwrap();
    }
    drop(index);
    let made = t.elapsed();
    let t = Instant::now();
    let p = Process::start(&w.config(""), &[]);
    let start_s = t.elapsed().as_secs_f64();
    let rss = rss_kib(p.child.id(), "VmRSS:") as f64 / 1024.0;
    let hwm = rss_kib(p.child.id(), "VmHWM:") as f64 / 1024.0;
    let mut checked = 0;
    for k in 0..20 {
        let i = (k * 7919 + 13) % rows;
        let host = format!("labhost-{:02}", i % 16);
        let ep = format!("episode-{i:09}");
        let reply = w
            .client(p.addr, &host)
            .request("GET", &format!("/v1/episodes/{host}/{ep}"), &[], Vec::new())
            .await
            .unwrap();
        assert_eq!(reply.status, 200, "{}", reply.error());
        assert_eq!(reply.json()["bytes"], i as u64);
        checked += 1;
    }
    println!(
        "index rows={rows} made_in_s={:.1} receiver_start_s={start_s:.2} receiver_rss_MiB={rss:.1} receiver_peak_rss_MiB={hwm:.1} bytes_per_row={:.0} rows_read_back={checked}",
        made.as_secs_f64(),
        rss * 1024.0 * 1024.0 / rows as f64,
    );
}

/// Soak: the daemon pair under a steady trickle of episodes for `minutes`; samples RSS and open
/// file descriptors of both every minute, to show growth (or its absence).
async fn soak(minutes: u64) {
    let w = World::new(3);
    let p = Process::start(&w.config(""), &[]);
    let cfg = w.shipper_config(
        HOST,
        &format!("https://localhost:{}", p.addr.port()),
        "[shipping]\nscan_interval_s = 1\n",
    );
    let eps = w.data_dir(HOST).join("episodes");
    std::fs::create_dir_all(&eps).unwrap();
    let mut shipper = Command::new(bin("e2e-shipper"))
        .arg("--config")
        .arg(&cfg)
        .arg("run")
        .env("CIS490_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let fds = |pid: u32| {
        std::fs::read_dir(format!("/proc/{pid}/fd"))
            .map(|d| d.count())
            .unwrap_or(0)
    };
    let rss = |pid: u32| rss_kib(pid, "VmRSS:") as f64 / 1024.0;
    let staging = w.path().join("staging");
    let start = Instant::now();
    let end = start + Duration::from_secs(minutes * 60);
    let mut next_sample = start;
    let mut made = 0u64;
    let mut samples = Vec::new();
    while Instant::now() < end {
        let size = match made % 5 {
            0 => 2 << 20,
            1 => 256 << 10,
            _ => 16 << 10,
        };
        let id = format!("soak-{made:07}");
        let d = episode::write(&staging, &id, &w.commits[2], &[]);
        std::fs::write(d.join("data.bin"), data(size, made)).unwrap();
        std::fs::rename(&d, eps.join(&id)).unwrap();
        made += 1;
        if Instant::now() >= next_sample {
            let shipped = std::fs::read_dir(w.data_dir(HOST).join("shipped"))
                .map(|d| d.count())
                .unwrap_or(0);
            let backlog = std::fs::read_dir(&eps).map(|d| d.count()).unwrap_or(0);
            let row = (
                start.elapsed().as_secs(),
                rss(p.child.id()),
                fds(p.child.id()),
                rss(shipper.id()),
                fds(shipper.id()),
                shipped,
                backlog,
            );
            println!(
                "soak t={}s receiver_rss_MiB={:.1} receiver_fds={} shipper_rss_MiB={:.1} shipper_fds={} shipped={} backlog={}",
                row.0, row.1, row.2, row.3, row.4, row.5, row.6
            );
            samples.push(row);
            next_sample += Duration::from_secs(60);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (first, last) = (
        samples[1.min(samples.len() - 1)],
        samples[samples.len() - 1],
    );
    println!(
        "soak minutes={minutes} episodes={made} receiver_rss_MiB {:.1}->{:.1} receiver_fds {}->{} shipper_rss_MiB {:.1}->{:.1} shipper_fds {}->{} (from minute 1 to the end)",
        first.1, last.1, first.2, last.2, first.3, last.3, first.4, last.4
    );
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(shipper.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    let _ = shipper.wait();
}

#[tokio::main]
async fn main() {
    // CIS490_BENCH_SCALE=N divides the sizes for a quick smoke run.
    let scale: usize = std::env::var("CIS490_BENCH_SCALE")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1)
        .max(1);
    let which = std::env::args().nth(1).unwrap_or_else(|| "all".into());
    if which == "all" || which == "receiver" {
        receiver_benches(scale).await;
    }
    // The mode's numeric arguments, positional after its name.
    let arg = |n: usize, default: u64| -> u64 {
        std::env::args()
            .nth(n)
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    match which.as_str() {
        "compare" => return compare::run(arg(2, 3) as usize, scale),
        "stages" => return stages::run(arg(2, 3) as usize, scale),
        "link" => return link::run(arg(2, 1) as usize, scale).await,
        "s3" => return scaleout::run(scale).await,
        "index" => return index_bench(arg(2, 1_000_000) as usize).await,
        "soak" => return soak(arg(2, 30)).await,
        "load" => return load_bench(arg(2, 60)).await,
        "quarantine" => return quarantine_bench(arg(2, 100_000) as usize).await,
        "memory" => return memory_bench(arg(2, 6) as usize, scale).await,
        "fleet" => {
            let (hosts, per_host) = (arg(2, 64) as usize, arg(3, 20) as usize);
            let w = World::new(2);
            let limit = Duration::from_secs(900);
            let r = cis490_tests::fleet::run(&w, hosts, per_host, "", 1, limit).await;
            println!("{r}");
            return;
        }
        _ => {}
    }
    if which == "all" || which == "gate" {
        gate_benches().await;
    }
    if which == "all" || which == "shipper" {
        shipper_benches(scale).await;
    }
}
