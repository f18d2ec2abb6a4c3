//! The shipper daemon as a real process: notify protocol, watchdog on a stalled peer, SIGTERM,
//! Retry-After, and a SIGKILL crash loop over a backlog.

use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cis490_tests::episode;
use cis490_tests::harness::{
    fake_receiver, read_head, shipper_bin, shipper_daemon, stalled_receiver, World,
};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::support::{index_rows, start};

const HOST: &str = "labhost-01";

fn spawn_daemon(cfg: &Path, envs: &[(&str, &str)]) -> Child {
    let mut cmd = shipper_daemon(&shipper_bin(), cfg, envs);
    cmd.spawn().expect("shipper starts")
}

fn wait_exit(child: &mut Child, limit: Duration) -> Option<i32> {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if let Some(st) = child.try_wait().unwrap() {
            return st.code();
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

fn recv_all(sock: &UnixDatagram, limit: Duration) -> Vec<(Instant, String)> {
    let deadline = Instant::now() + limit;
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    sock.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    while Instant::now() < deadline {
        if let Ok(n) = sock.recv(&mut buf) {
            out.push((
                Instant::now(),
                String::from_utf8_lossy(&buf[..n]).into_owned(),
            ));
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watchdog_stops_while_an_upload_is_stalled_and_sigterm_stops_cleanly() {
    let w = World::new(1);
    let addr = stalled_receiver(&w).await;
    let cfg = w.shipper_config(
        HOST,
        &format!("https://localhost:{}", addr.port()),
        "[shipping]\nzstd_level = 1\n",
    );
    let sock_path = w.path().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    let mut child = spawn_daemon(
        &cfg,
        &[
            ("NOTIFY_SOCKET", sock_path.to_str().unwrap()),
            ("WATCHDOG_USEC", "1000000"),
        ],
    );
    let early = tokio::task::block_in_place(|| recv_all(&sock, Duration::from_secs(3)));
    assert!(
        early.iter().any(|(_, m)| m.contains("READY=1")),
        "{early:?}"
    );
    let pings = early
        .iter()
        .filter(|(_, m)| m.contains("WATCHDOG=1"))
        .count();
    assert!(pings >= 3, "WATCHDOG=1 while idle: {early:?}");

    // Now a big incompressible episode: its upload fills the socket buffers and stalls.
    let noise = episode::body(&w.path().join("n"), "n", &w.commits[0], 24 << 20);
    episode::write(
        &w.data_dir(HOST).join("episodes"),
        "ep-big",
        &w.commits[0],
        &[("noise", &noise.bytes)],
    );
    let during = tokio::task::block_in_place(|| recv_all(&sock, Duration::from_secs(6)));
    let last_ping = during
        .iter()
        .filter(|(_, m)| m.contains("WATCHDOG=1"))
        .map(|(t, _)| *t)
        .max();
    let quiet_for = last_ping.map_or(Duration::from_secs(6), |t| t.elapsed());
    assert!(
        quiet_for >= Duration::from_secs(2),
        "watchdog kept being fed during a stalled upload ({} pings, last {:?} ago)",
        during
            .iter()
            .filter(|(_, m)| m.contains("WATCHDOG=1"))
            .count(),
        quiet_for
    );

    kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM).unwrap();
    let t = Instant::now();
    let end = tokio::task::block_in_place(|| recv_all(&sock, Duration::from_millis(500)));
    assert!(end.iter().any(|(_, m)| m.contains("STOPPING=1")), "{end:?}");
    assert_eq!(wait_exit(&mut child, Duration::from_secs(10)), Some(0));
    assert!(t.elapsed() < Duration::from_secs(10));
    // Consistent: still queued, its tarball complete in the outbox.
    assert!(w.data_dir(HOST).join("episodes/ep-big/meta.json").exists());
    let outbox: Vec<_> = std::fs::read_dir(w.data_dir(HOST).join("outbox"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert_eq!(outbox, vec![std::ffi::OsString::from("ep-big.tar.zst")]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_after_is_honoured() {
    let w = World::new(1);
    let hits = Arc::new(Mutex2::default());
    let h = hits.clone();
    let addr = fake_receiver(&w, move |mut tls| {
        let h = h.clone();
        async move {
            loop {
                let head = read_head(&mut tls).await;
                if head.is_empty() {
                    return;
                }
                let len: usize = head
                    .lines()
                    .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().parse().unwrap_or(0)))
                    .unwrap_or(0);
                let mut body = vec![0u8; len];
                let _ = tls.read_exact(&mut body).await;
                let n = h.hit();
                let resp = if n == 1 {
                    "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 3\r\ncontent-length: 56\r\n\r\n{\"error\":\"overloaded\",\"message\":\"busy, come back later\"}"
                        .to_string()
                } else {
                    let body = r#"{"status":"stored"}"#;
                    format!("HTTP/1.1 201 Created\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}", body.len())
                };
                if tls.write_all(resp.as_bytes()).await.is_err() {
                    return;
                }
            }
        }
    })
    .await;
    let cfg = w.shipper_config(
        HOST,
        &format!("https://localhost:{}", addr.port()),
        "[shipping]\nmax_backoff_s = 60\n",
    );
    episode::write(
        &w.data_dir(HOST).join("episodes"),
        "ep1",
        &w.commits[0],
        &[("x", b"x")],
    );
    let mut child = spawn_daemon(&cfg, &[]);
    let deadline = Instant::now() + Duration::from_secs(15);
    while !w.data_dir(HOST).join("shipped/ep1").exists() {
        assert!(Instant::now() < deadline, "never shipped");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let times = hits.times();
    assert_eq!(times.len(), 2);
    let gap = times[1] - times[0];
    assert!(
        gap >= Duration::from_millis(2900),
        "retried after {gap:?}, Retry-After said 3 s"
    );
    let _ = child.kill();
    let _ = child.wait();
}

#[derive(Default)]
struct Mutex2(std::sync::Mutex<Vec<Instant>>);
impl Mutex2 {
    fn hit(&self) -> usize {
        let mut v = self.0.lock().unwrap();
        v.push(Instant::now());
        v.len()
    }
    fn times(&self) -> Vec<Instant> {
        self.0.lock().unwrap().clone()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_crash_loop_ships_every_episode_exactly_once() {
    let kills_wanted: usize = std::env::var("CIS490_SHIPPER_KILLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(25);
    let seed = cis490_tests::harness::crash_seed();
    println!("crash loop seed={seed} (replay with CIS490_CRASH_SEED={seed})");
    let mut rng = cis490_tests::harness::Lcg(seed);
    let w = World::new(2);
    let r = start(&w, "").await;
    let cfg = w.shipper_config(
        HOST,
        &format!("https://localhost:{}", r.addr.port()),
        "[shipping]\nscan_interval_s = 1\nconcurrency = 3\n",
    );
    let eps = w.data_dir(HOST).join("episodes");
    let n_eps = 30;
    for i in 0..n_eps {
        let size = match rng.below(4) {
            0 => 100,
            1 => 20_000,
            2 => 400_000,
            _ => 1_500_000 + rng.below(1_000_000) as usize,
        };
        let b = episode::body(
            &w.path().join("gen"),
            &format!("ep-{i:03}"),
            &w.commits[1],
            size,
        );
        let _ = b;
        std::fs::rename(
            w.path().join("gen").join(format!("ep-{i:03}")),
            eps.join(format!("ep-{i:03}")),
        )
        .ok();
        if !eps.join(format!("ep-{i:03}")).exists() {
            std::fs::create_dir_all(&eps).unwrap();
            std::fs::rename(
                w.path().join("gen").join(format!("ep-{i:03}")),
                eps.join(format!("ep-{i:03}")),
            )
            .unwrap();
        }
    }
    let kills = AtomicUsize::new(0);
    let started = Instant::now();
    while kills.load(Ordering::Relaxed) < kills_wanted {
        let mut child = spawn_daemon(&cfg, &[]);
        let wait = Duration::from_millis(30 + rng.below(400));
        tokio::time::sleep(wait).await;
        child.kill().unwrap();
        let _ = child.wait();
        kills.fetch_add(1, Ordering::Relaxed);
        assert!(
            started.elapsed() < Duration::from_secs(240),
            "crash loop ran too long"
        );
    }
    // Let a final daemon drain the backlog.
    let sock_path = w.path().join("final.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    let mut child = spawn_daemon(&cfg, &[("NOTIFY_SOCKET", sock_path.to_str().unwrap())]);
    let seen = tokio::task::block_in_place(|| recv_all(&sock, Duration::from_secs(2)));
    assert!(seen.iter().any(|(_, m)| m.contains("READY=1")), "{seen:?}");
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let left = std::fs::read_dir(&eps).unwrap().count();
        if left == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "{left} episodes never drained");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM).unwrap();
    let code = wait_exit(&mut child, Duration::from_secs(10));
    if code != Some(0) {
        let log = std::fs::read_to_string(cfg.with_extension("log")).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(30).collect();
        panic!(
            "daemon did not stop cleanly ({code:?}); log tail:\n{}",
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        );
    }

    let shipped = w.data_dir(HOST).join("shipped");
    let mut names: Vec<String> = std::fs::read_dir(&shipped)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    let expected: Vec<String> = (0..n_eps).map(|i| format!("ep-{i:03}")).collect();
    let lost = expected.iter().filter(|e| !names.contains(e)).count();
    let duplicated = names.len() - (names.len().min(expected.len()))
        + names.iter().filter(|n| !expected.contains(n)).count();
    assert!(
        std::fs::read_dir(w.data_dir(HOST).join("quarantine"))
            .unwrap()
            .next()
            .is_none(),
        "nothing quarantined"
    );
    let rows = index_rows(&w.store_dir());
    let mut corrupted = 0;
    for name in &expected {
        let row: Vec<_> = rows
            .iter()
            .filter(|r| r["episode_id"] == name.as_str())
            .collect();
        assert_eq!(row.len(), 1, "{name} stored once");
        let (p, _) = episode::pack(&shipped.join(name), name);
        if row[0]["tar_sha256"] != p.tar_sha256 {
            corrupted += 1;
        }
        let stored = std::fs::read(w.store_dir().join(row[0]["path"].as_str().unwrap())).unwrap();
        let tar = zstd::decode_all(&stored[..]).unwrap();
        use sha2::Digest;
        if hex::encode(sha2::Sha256::digest(&tar)) != p.tar_sha256 {
            corrupted += 1;
        }
    }
    let outbox_left = std::fs::read_dir(w.data_dir(HOST).join("outbox"))
        .unwrap()
        .count();
    println!(
        "crash loop: kills={} episodes={n_eps} lost={lost} duplicated={duplicated} corrupted={corrupted} outbox_left={outbox_left} seed={seed}",
        kills.load(Ordering::Relaxed)
    );
    assert_eq!((lost, duplicated, corrupted, outbox_left), (0, 0, 0, 0));
    assert_eq!(rows.len(), n_eps);
    r.stop().await;
}

/// Sets a directory's mtime `days` into the past (as if it was retired that long ago).
fn age(dir: &Path, days: u64) {
    let t = std::time::SystemTime::now() - Duration::from_secs(days * 86_400);
    std::fs::File::open(dir).unwrap().set_modified(t).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_runs_at_start_then_at_most_once_per_interval() {
    let w = World::new(1);
    let cfg = w.shipper_config(
        HOST,
        "https://localhost:1",
        "[retention]\nshipped_keep_days = 14\nquarantine_keep_days = 0\ncleanup_interval_s = 3600\n",
    );
    // The harness puts [retention] keys before [shipping]; make sure they landed in the file.
    assert!(std::fs::read_to_string(&cfg)
        .unwrap()
        .contains("cleanup_interval_s = 3600"));
    let data = w.data_dir(HOST);
    for d in ["shipped/old-1", "shipped/new-1", "quarantine/old-q"] {
        std::fs::create_dir_all(data.join(d)).unwrap();
    }
    age(&data.join("shipped/old-1"), 15);
    age(&data.join("shipped/new-1"), 13);
    age(&data.join("quarantine/old-q"), 400);
    std::fs::create_dir_all(data.join("episodes")).unwrap();
    let sock_path = w.path().join("ret.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    let mut child = spawn_daemon(&cfg, &[("NOTIFY_SOCKET", sock_path.to_str().unwrap())]);
    let seen = tokio::task::block_in_place(|| recv_all(&sock, Duration::from_secs(2)));
    assert!(seen.iter().any(|(_, m)| m.contains("READY=1")));
    assert!(!data.join("shipped/old-1").exists(), "expired at start");
    assert!(data.join("shipped/new-1").exists(), "13 days < 14");
    assert!(
        data.join("quarantine/old-q").exists(),
        "quarantine_keep_days = 0 keeps forever"
    );
    // Another expired entry appears: not removed before the interval passes (3 scans later).
    std::fs::create_dir_all(data.join("shipped/old-2")).unwrap();
    age(&data.join("shipped/old-2"), 20);
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        data.join("shipped/old-2").exists(),
        "cleanup ran again before cleanup_interval_s"
    );
    kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM).unwrap();
    assert_eq!(wait_exit(&mut child, Duration::from_secs(10)), Some(0));
    let log = std::fs::read_to_string(cfg.with_extension("log")).unwrap();
    assert!(
        log.contains("event=\"cleanup\" episode=old-1")
            || log.contains("event=cleanup episode=old-1"),
        "{log}"
    );

    // With a 1 s interval it goes on the next pass.
    let cfg = w.shipper_config(
        HOST,
        "https://localhost:1",
        "[retention]\nshipped_keep_days = 14\ncleanup_interval_s = 1\n",
    );
    let mut child = spawn_daemon(&cfg, &[]);
    std::fs::create_dir_all(data.join("shipped/old-3")).unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    age(&data.join("shipped/old-3"), 20);
    let deadline = Instant::now() + Duration::from_secs(6);
    while data.join("shipped/old-3").exists() {
        assert!(Instant::now() < deadline, "not cleaned with a 1 s interval");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _ = child.kill();
    let _ = child.wait();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_while_packing_leaves_no_corrupt_tarball_and_recovers() {
    let probe = std::process::Command::new("unshare")
        .args(["-m", "true"])
        .status();
    if !matches!(probe, Ok(s) if s.success()) {
        eprintln!("SKIP: cannot create a mount namespace here");
        return;
    }
    let w = World::new(1);
    let r = crate::support::start(&w, "").await;
    let data = w.data_dir(HOST);
    std::fs::create_dir_all(&data).unwrap();
    let cfg = w.shipper_config(
        HOST,
        &format!("https://localhost:{}", r.addr.port()),
        "[shipping]\nzstd_level = 1\n",
    );
    // 1.5 MB of noise: over the 1 MiB a tarball may stay in memory, so it is packed to the
    // outbox; the episode fits in 2 MiB, its tarball next to it does not.
    let noise = episode::body(&w.path().join("n"), "n", &w.commits[0], 1_500_000);
    let src = episode::write(
        &w.path().join("src"),
        "ep-big",
        &w.commits[0],
        &[("noise", &noise.bytes[..1_500_000.min(noise.bytes.len())])],
    );
    let report = w.path().join("report.txt");
    let script = w.path().join("small-disk.sh");
    std::fs::write(
        &script,
        format!(
            r#"#!/bin/sh
set -u
mount --make-rprivate / 2>/dev/null || true
mount -t tmpfs -o size=2m tmpfs '{data}'
mkdir -p '{data}/episodes' && cp -a '{src}' '{data}/episodes/'
sha_before=$(cd '{data}/episodes/ep-big' && cat meta.json noise | sha256sum)
'{bin}' --config '{cfg}' once 2>'{logdir}/full.log'; echo "first_exit=$?" >>'{report}'
echo "outbox_after_full=$(ls -A '{data}/outbox' | tr '\n' ' ')" >>'{report}'
sha_after=$(cd '{data}/episodes/ep-big' && cat meta.json noise | sha256sum)
[ "$sha_before" = "$sha_after" ] && echo "episode_intact=yes" >>'{report}'
mount -o remount,size=8m '{data}'
'{bin}' --config '{cfg}' once 2>'{logdir}/ok.log'; echo "second_exit=$?" >>'{report}'
echo "shipped=$(ls '{data}/shipped' | tr '\n' ' ')" >>'{report}'
"#,
            data = data.display(),
            src = src.display(),
            bin = cis490_tests::harness::shipper_bin().display(),
            cfg = cfg.display(),
            report = report.display(),
            logdir = w.path().display(),
        ),
    )
    .unwrap();
    let status = tokio::task::spawn_blocking(move || {
        std::process::Command::new("unshare")
            .arg("-m")
            .arg("sh")
            .arg(&script)
            .status()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(status.success());
    let rep = std::fs::read_to_string(&report).unwrap();
    let full_log = std::fs::read_to_string(w.path().join("full.log")).unwrap_or_default();
    assert!(
        rep.contains("first_exit=1"),
        "packing on a full disk is transient:\n{rep}\n{full_log}"
    );
    assert!(
        full_log.contains("No space left") || full_log.contains("space"),
        "{full_log}"
    );
    assert!(
        rep.contains("outbox_after_full= \n") || rep.contains("outbox_after_full=\n"),
        "no partial or corrupt tarball left:\n{rep}"
    );
    assert!(rep.contains("episode_intact=yes"), "{rep}");
    assert!(
        rep.contains("second_exit=0"),
        "{rep}\n{}",
        std::fs::read_to_string(w.path().join("ok.log")).unwrap_or_default()
    );
    assert!(rep.contains("shipped=ep-big"), "{rep}");
    assert_eq!(index_rows(&w.store_dir()).len(), 1);
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_shipping_process_on_one_data_dir_is_refused() {
    let w = World::new(1);
    let cfg = w.shipper_config(HOST, "https://localhost:1", "");
    let sock_path = w.path().join("two.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    let mut child = spawn_daemon(&cfg, &[("NOTIFY_SOCKET", sock_path.to_str().unwrap())]);
    let seen = tokio::task::block_in_place(|| recv_all(&sock, Duration::from_secs(2)));
    assert!(seen.iter().any(|(_, m)| m.contains("READY=1")));
    let (code, _, err) =
        tokio::task::block_in_place(|| cis490_tests::harness::shipper(&cfg, &["once"]));
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("in use by another cis490-shipper"), "{err}");
    // Commands that only move directories under the short lock still work beside it.
    let (code, _, _) = tokio::task::block_in_place(|| {
        cis490_tests::harness::shipper(&cfg, &["quarantine-unstamped", "--dry-run"])
    });
    assert_eq!(code, 0);
    kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM).unwrap();
    assert_eq!(wait_exit(&mut child, Duration::from_secs(10)), Some(0));
    let (code, _, _) =
        tokio::task::block_in_place(|| cis490_tests::harness::shipper(&cfg, &["once"]));
    assert_eq!(
        code, 0,
        "free again once the daemon stopped (nothing queued: exit 0)"
    );
}

/// Every state change takes `data_dir/.lock`: while another process (a CLI command) holds it,
/// the daemon uploads but moves nothing; once it is released, the move happens.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_moves_wait_for_the_data_dir_lock() {
    let w = World::new(2);
    let r = start(&w, "").await;
    let cfg = w.shipper_config(HOST, &format!("https://localhost:{}", r.addr.port()), "");
    let data = w.data_dir(HOST);
    let eps = data.join("episodes");
    episode::write(&eps, "held", &w.commits[1], &[("d", b"payload")]);
    let held = cis490_common::lock::exclusive(&data).unwrap();
    let mut once = Command::new(shipper_bin())
        .arg("--config")
        .arg(&cfg)
        .arg("once")
        .env("CIS490_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        eps.join("held").is_dir(),
        "nothing moves while the lock is held"
    );
    assert!(!data.join("shipped/held").exists());
    assert!(
        once.try_wait().unwrap().is_none(),
        "once waits for the lock"
    );
    drop(held);
    assert_eq!(wait_exit(&mut once, Duration::from_secs(20)), Some(0));
    assert!(data.join("shipped/held").is_dir());
    assert!(!eps.join("held").exists());
    assert_eq!(index_rows(&w.store_dir()).len(), 1);
    r.stop().await;
}
