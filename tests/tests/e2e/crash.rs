//! The crash-consistency harness: a backlog of episodes, the shipper and the receiver as real
//! processes, both SIGKILLed at seeded random instants and restarted until the backlog drains.
//! CI runs 50 kills; `CIS490_CRASH_KILLS=1000` runs the long version (`--ignored` not needed).

use std::time::{Duration, Instant};

use cis490_tests::episode;
use cis490_tests::harness::{Process, World};
use cis490_tests::relay::{Cuts, Relay};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use sha2::Digest;

use crate::support::{files_under, free_port, index_rows, spawn_shipper};

const HOST: &str = "labhost-01";

/// Waits until the shipper's queue `eps` is empty, failing after `limit`.
async fn wait_drained(eps: &std::path::Path, limit: Duration) {
    let deadline = Instant::now() + limit;
    while std::fs::read_dir(eps).unwrap().count() > 0 {
        assert!(Instant::now() < deadline, "backlog never drained");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// One step of a kill schedule: SIGKILLs the shipper, the receiver or both (as `rng` draws)
/// and starts again what was killed. Returns the (shipper, receiver) kills made.
fn kill_and_restart(
    rng: &mut cis490_tests::harness::Lcg,
    ship: &mut Option<std::process::Child>,
    receiver: &mut Option<Process>,
    rcfg: &std::path::Path,
    spawn: impl Fn() -> std::process::Child,
) -> (usize, usize) {
    let which = rng.below(3);
    let (mut sk, mut rk) = (0, 0);
    if which != 1 {
        if let Some(mut s) = ship.take() {
            s.kill().unwrap();
            let _ = s.wait();
            sk = 1;
        }
    }
    if which != 0 {
        if let Some(mut r) = receiver.take() {
            r.child.kill().unwrap();
            let _ = r.child.wait();
            rk = 1;
        }
    }
    if receiver.is_none() {
        *receiver = Some(Process::start(rcfg, &[]));
    }
    if ship.is_none() {
        *ship = Some(spawn());
    }
    (sk, rk)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_shipper_and_receiver_loses_and_duplicates_nothing() {
    let kills_wanted: usize = std::env::var("CIS490_CRASH_KILLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(50);
    let seed = cis490_tests::harness::crash_seed();
    println!("crash harness seed={seed} (replay with CIS490_CRASH_SEED={seed})");
    let mut rng = cis490_tests::harness::Lcg(seed);
    let w = World::new(2);
    let port = free_port();
    let rcfg = w.config("");
    let text = std::fs::read_to_string(&rcfg).unwrap().replace(
        "listen = \"127.0.0.1:0\"\nmetrics",
        &format!("listen = \"127.0.0.1:{port}\"\nmetrics"),
    );
    std::fs::write(&rcfg, text).unwrap();
    let scfg = w.shipper_config(
        HOST,
        &format!("https://localhost:{port}"),
        "[shipping]\nconcurrency = 3\nmax_backoff_s = 1\n",
    );
    let eps = w.data_dir(HOST).join("episodes");
    std::fs::create_dir_all(&eps).unwrap();
    let n_eps = std::env::var("CIS490_CRASH_EPISODES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(40usize);
    for i in 0..n_eps {
        let size = match rng.below(4) {
            0 => 64,
            1 => 30_000,
            2 => 300_000,
            _ => 1_200_000 + rng.below(1_500_000) as usize,
        };
        let id = format!("ep-{i:04}");
        let gen = w.path().join("gen");
        episode::body(&gen, &id, &w.commits[1], size);
        std::fs::rename(gen.join(&id), eps.join(&id)).unwrap();
    }

    let mut receiver = Some(Process::start(&rcfg, &[]));
    let mut ship = Some(spawn_shipper(&scfg));
    let (mut kills, mut receiver_kills, mut shipper_kills) = (0usize, 0usize, 0usize);
    let started = Instant::now();
    let budget = Duration::from_secs(60 + kills_wanted as u64 * 2);
    while kills < kills_wanted {
        tokio::time::sleep(Duration::from_millis(40 + rng.below(460))).await;
        let (sk, rk) = kill_and_restart(&mut rng, &mut ship, &mut receiver, &rcfg, || {
            spawn_shipper(&scfg)
        });
        (shipper_kills, receiver_kills, kills) =
            (shipper_kills + sk, receiver_kills + rk, kills + sk + rk);
        assert!(started.elapsed() < budget, "crash loop ran past {budget:?}");
    }
    // Let the pair drain the backlog undisturbed.
    wait_drained(&eps, Duration::from_secs(120)).await;
    let mut s = ship.take().unwrap();
    kill(Pid::from_raw(s.id() as i32), Signal::SIGTERM).unwrap();
    let _ = s.wait();
    let mut r = receiver.take().unwrap();
    r.signal(Signal::SIGTERM);
    let t = Instant::now();
    let code = r.wait_exit(Duration::from_secs(10));
    let log = r.log_text();
    let tail: Vec<&str> = log.lines().rev().take(30).collect();
    assert_eq!(
        code,
        Some(0),
        "receiver exit after SIGTERM ({:.1} s); its last log lines, newest first:\n{}",
        t.elapsed().as_secs_f64(),
        tail.join("\n")
    );

    // The oracle.
    let shipped = w.data_dir(HOST).join("shipped");
    let names: Vec<String> = std::fs::read_dir(&shipped)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    let expected: Vec<String> = (0..n_eps).map(|i| format!("ep-{i:04}")).collect();
    let lost = expected.iter().filter(|e| !names.contains(e)).count();
    let quarantined = std::fs::read_dir(w.data_dir(HOST).join("quarantine"))
        .unwrap()
        .count();
    let extra_shipped = names.iter().filter(|n| !expected.contains(n)).count();
    let rows = index_rows(&w.store_dir());
    let stored = files_under(&w.store_dir().join("episodes"));
    let mut duplicated =
        extra_shipped + rows.len().saturating_sub(n_eps) + stored.len().saturating_sub(n_eps);
    let mut corrupted = 0;
    for name in &expected {
        let mine: Vec<_> = rows
            .iter()
            .filter(|r| r["episode_id"] == name.as_str())
            .collect();
        if mine.len() != 1 {
            duplicated += mine.len().saturating_sub(1);
            continue;
        }
        let (p, _) = episode::pack(&shipped.join(name), name);
        let bytes = std::fs::read(w.store_dir().join(mine[0]["path"].as_str().unwrap())).unwrap();
        let tar = zstd::decode_all(&bytes[..]).unwrap_or_default();
        if mine[0]["tar_sha256"] != p.tar_sha256
            || hex::encode(sha2::Sha256::digest(&tar)) != p.tar_sha256
        {
            corrupted += 1;
        }
    }
    let leftovers = files_under(&w.data_dir(HOST).join("outbox")).len()
        + files_under(&w.store_dir().join("tmp")).len();
    println!(
        "crash harness: kills={kills} (shipper {shipper_kills}, receiver {receiver_kills}) episodes={n_eps} lost={lost} duplicated={duplicated} corrupted={corrupted} quarantined={quarantined} leftovers={leftovers} seconds={:.1} seed={seed}",
        started.elapsed().as_secs_f64()
    );
    assert_eq!(
        (lost, duplicated, corrupted, quarantined, leftovers),
        (0, 0, 0, 0, 0)
    );
    assert_eq!(rows.len(), n_eps, "one index row per stored file");
    assert_eq!(stored.len(), n_eps);
}

/// The same harness during large uploads (SPEC §13): episodes of 12-28 MiB on a paced link,
/// both daemons SIGKILLed at seeded instants while bodies are in flight. Nothing is lost,
/// duplicated or corrupted, and the bytes sent in all are reported against the bodies'.
/// CI runs 12 kills over 4 episodes; `CIS490_RESUME_CRASH_KILLS=N` and
/// `CIS490_RESUME_CRASH_EPISODES=M` run more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_both_during_large_uploads_resumes_and_loses_nothing() {
    let kills_wanted: usize = std::env::var("CIS490_RESUME_CRASH_KILLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(12);
    let seed = cis490_tests::harness::crash_seed();
    println!("resume crash harness seed={seed} (replay with CIS490_CRASH_SEED={seed})");
    let mut rng = cis490_tests::harness::Lcg(seed);
    let w = World::new(2);
    let port = free_port();
    // CIS490_RESUME_CRASH_OFF=1: the same schedule with resumes turned off, for comparison.
    let off = std::env::var("CIS490_RESUME_CRASH_OFF").is_ok_and(|v| v == "1");
    let rcfg = w.config(if off {
        "[limits]\nresume_max_bytes = 0\n"
    } else {
        ""
    });
    let text = std::fs::read_to_string(&rcfg).unwrap().replace(
        "listen = \"127.0.0.1:0\"\nmetrics",
        &format!("listen = \"127.0.0.1:{port}\"\nmetrics"),
    );
    std::fs::write(&rcfg, text).unwrap();
    let target: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    // Counts every byte the shipper sends, across all connections and restarts.
    let relay = Relay::start(target, Cuts::Total(vec![])).await;
    let scfg = w.shipper_config(
        HOST,
        &format!("https://localhost:{}", relay.addr.port()),
        "[shipping]\nconcurrency = 2\nmax_backoff_s = 1\nbandwidth_limit_mbps = 80\n",
    );
    let eps = w.data_dir(HOST).join("episodes");
    std::fs::create_dir_all(&eps).unwrap();
    let n_eps = std::env::var("CIS490_RESUME_CRASH_EPISODES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(4usize);
    let mut body_bytes = 0u64;
    for i in 0..n_eps {
        let size = (12 << 20) + rng.below(16 << 20) as usize;
        let id = format!("big-{i:02}");
        let gen = w.path().join("gen");
        let b = episode::body(&gen, &id, &w.commits[1], size);
        body_bytes += b.bytes.len() as u64;
        std::fs::rename(gen.join(&id), eps.join(&id)).unwrap();
    }
    let daemon = || {
        cis490_tests::harness::shipper_daemon(&cis490_tests::harness::shipper_bin(), &scfg, &[])
            .spawn()
            .unwrap()
    };
    let mut receiver = Some(Process::start(&rcfg, &[]));
    let mut ship = Some(daemon());
    let (mut kills, mut receiver_kills, mut shipper_kills) = (0usize, 0usize, 0usize);
    let started = Instant::now();
    let budget = Duration::from_secs(120 + kills_wanted as u64 * 5);
    while kills < kills_wanted && std::fs::read_dir(&eps).unwrap().count() > 0 {
        tokio::time::sleep(Duration::from_millis(300 + rng.below(900))).await;
        let (sk, rk) = kill_and_restart(&mut rng, &mut ship, &mut receiver, &rcfg, daemon);
        (shipper_kills, receiver_kills, kills) =
            (shipper_kills + sk, receiver_kills + rk, kills + sk + rk);
        assert!(started.elapsed() < budget, "crash loop ran past {budget:?}");
    }
    wait_drained(&eps, Duration::from_secs(180)).await;
    let mut s = ship.take().unwrap();
    kill(Pid::from_raw(s.id() as i32), Signal::SIGTERM).unwrap();
    let _ = s.wait();
    let mut r = receiver.take().unwrap();
    r.signal(Signal::SIGTERM);
    assert_eq!(r.wait_exit(Duration::from_secs(10)), Some(0));

    let shipped = w.data_dir(HOST).join("shipped");
    let rows = index_rows(&w.store_dir());
    let mut lost = 0;
    let mut corrupted = 0;
    for i in 0..n_eps {
        let name = format!("big-{i:02}");
        let mine: Vec<_> = rows
            .iter()
            .filter(|r| r["episode_id"] == name.as_str())
            .collect();
        if mine.is_empty() || !shipped.join(&name).is_dir() {
            lost += 1;
            continue;
        }
        let (p, _) = episode::pack(&shipped.join(&name), &name);
        let bytes = std::fs::read(w.store_dir().join(mine[0]["path"].as_str().unwrap())).unwrap();
        let tar = zstd::decode_all(&bytes[..]).unwrap_or_default();
        if mine[0]["tar_sha256"] != p.tar_sha256
            || hex::encode(sha2::Sha256::digest(&tar)) != p.tar_sha256
        {
            corrupted += 1;
        }
    }
    let duplicated = rows.len().saturating_sub(n_eps)
        + files_under(&w.store_dir().join("episodes"))
            .len()
            .saturating_sub(n_eps);
    let leftovers = files_under(&w.data_dir(HOST).join("outbox")).len()
        + files_under(&w.store_dir().join("tmp")).len()
        + files_under(&w.store_dir().join("resume")).len();
    let log = std::fs::read_to_string(scfg.with_extension("log")).unwrap_or_default();
    let resumes = log.matches("ship_resumed").count();
    println!(
        "resume crash harness: kills={kills} (shipper {shipper_kills}, receiver {receiver_kills}) episodes={n_eps} bodies={body_bytes} sent={} ({:.2} x) resumes={resumes} lost={lost} duplicated={duplicated} corrupted={corrupted} leftovers={leftovers} seconds={:.1} seed={seed}",
        relay.sent(),
        relay.sent() as f64 / body_bytes as f64,
        started.elapsed().as_secs_f64()
    );
    assert_eq!((lost, duplicated, corrupted, leftovers), (0, 0, 0, 0));
}
