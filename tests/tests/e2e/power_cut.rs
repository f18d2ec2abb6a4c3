//! Power cuts under the receiver: its store_dir on the fault filesystem, uploads running, the
//! power cut at seeded random points (the receiver SIGKILLed, everything not durable rolled
//! back), the receiver restarted. CI runs 20 cuts; `CIS490_POWER_CUTS=N` runs more.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cis490_tests::episode;
use cis490_tests::faultfs::{self, FaultFs, Loss, Ordering};
use cis490_tests::harness::{receiver_bin, Lcg, Process, World};
use nix::sys::signal::Signal;
use sha2::Digest;

use crate::support::index_rows;

const HOST: &str = "labhost-01";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn power_cuts_under_the_receiver_lose_nothing_it_acknowledged() {
    if !faultfs::usable_or_skip("power_cuts_under_the_receiver") {
        return;
    }
    let cuts_wanted: u64 = std::env::var("CIS490_POWER_CUTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let seed = cis490_tests::harness::crash_seed();
    println!("power-cut harness seed={seed} (replay with CIS490_CRASH_SEED={seed})");
    let mut rng = Lcg(seed);
    let w = World::new(2);
    // data_dir and store_dir must be on a journalling filesystem (docs/RELIABILITY.md);
    // `CIS490_POWER_CUT_ORDERING=per-directory` tries the receiver without that guarantee.
    let ordering = match std::env::var("CIS490_POWER_CUT_ORDERING").as_deref() {
        Ok("per-directory") => Ordering::PerDirectory,
        _ => Ordering::Journalled,
    };
    println!("power-cut harness ordering={ordering:?}");
    let mut fs =
        FaultFs::mount(&w.path().join("faultfs"), ordering).unwrap_or_else(|e| panic!("{e}"));
    let store = fs.path().join("store");
    let rcfg = w.config("");
    let text = std::fs::read_to_string(&rcfg).unwrap().replace(
        &format!("store_dir = \"{}\"", w.store_dir().display()),
        &format!("store_dir = \"{}\"", store.display()),
    );
    assert!(text.contains(&store.display().to_string()));
    std::fs::write(&rcfg, text).unwrap();

    let gen = w.path().join("gen");
    // Enough episodes that uploads are still running at the last cut.
    let n_eps = 40 + 5 * cuts_wanted;
    let bodies: Arc<Vec<episode::Body>> = Arc::new(
        (0..n_eps)
            .map(|i| {
                let size = match rng.below(8) {
                    0 => 64,
                    1..=3 => 2_000 + rng.below(30_000) as usize,
                    4..=6 => 100_000 + rng.below(200_000) as usize,
                    _ => 600_000 + rng.below(600_000) as usize,
                };
                episode::body(&gen, &format!("ep-{i:04}"), &w.commits[1], size)
            })
            .collect(),
    );
    // Every episode the receiver answered 201 or 200 for, with the status of the first answer.
    let acked: Arc<Mutex<BTreeMap<usize, u16>>> = Arc::default();
    let started = Instant::now();
    let (mut answered, mut totals) = (0u64, faultfs::CutReport::default());
    for cut in 0..cuts_wanted {
        let mut r = Process::start(&rcfg, &[]);
        let client = w.client(r.addr, HOST);
        let (bodies2, acked2) = (bodies.clone(), acked.clone());
        let mut pick = Lcg(seed ^ (cut + 1).wrapping_mul(0x9e37_79b9));
        let uploads = tokio::spawn(async move {
            let mut n = 0u64;
            loop {
                // Mostly episodes not yet acknowledged; sometimes one again (the 200 path).
                let i = {
                    let acked = acked2.lock().unwrap();
                    let fresh: Vec<usize> = (0..bodies2.len())
                        .filter(|i| !acked.contains_key(i))
                        .collect();
                    if fresh.is_empty() || pick.below(8) == 0 {
                        pick.below(bodies2.len() as u64) as usize
                    } else {
                        fresh[pick.below(fresh.len() as u64) as usize]
                    }
                };
                match client.put_result(HOST, &bodies2[i]).await {
                    Ok(reply) if reply.status == 201 || reply.status == 200 => {
                        acked2.lock().unwrap().entry(i).or_insert(reply.status);
                        n += 1;
                    }
                    Ok(reply) if reply.status >= 500 => {}
                    Ok(reply) => panic!("{}: {} {}", bodies2[i].id, reply.status, reply.error()),
                    Err(_) => tokio::time::sleep(Duration::from_millis(5)).await,
                }
                if n > 1_000_000 {
                    return;
                }
            }
        });
        // The power goes after a random number of the receiver's writes, renames and fsyncs
        // (so at a request boundary inside an upload), or after 3 s if it falls idle.
        fs.cut_after(rng.below(120));
        let deadline = Instant::now() + Duration::from_secs(3);
        while !fs.is_frozen() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        fs.freeze();
        r.child.kill().unwrap();
        let _ = r.child.wait();
        uploads.abort();
        let _ = uploads.await;
        let changes = fs.changes();
        let report = fs.power_cut(Loss::Random(rng.next_u64())).unwrap();
        if std::env::var_os("CIS490_POWER_CUT_TRACE").is_some() {
            println!(
                "cut {cut}: {changes} changing requests, acknowledged {}, {report:?}",
                acked.lock().unwrap().len()
            );
        }
        totals.files_rolled_back += report.files_rolled_back;
        totals.changes_undone += report.changes_undone;
        totals.changes_kept += report.changes_kept;
        totals.orphaned += report.orphaned;
        answered = acked.lock().unwrap().len() as u64;
        assert!(
            started.elapsed() < Duration::from_secs(60 + cuts_wanted * 3),
            "power-cut loop too slow"
        );
    }

    // One clean run: the receiver repairs what the last cut left, then stops on SIGTERM.
    let mut r = Process::start(&rcfg, &[]);
    r.signal(Signal::SIGTERM);
    assert_eq!(
        r.wait_exit(Duration::from_secs(10)),
        Some(0),
        "{}",
        r.log_text()
    );

    // The oracle.
    let acked = acked.lock().unwrap().clone();
    let rows = index_rows(&store);
    let mut per_id: BTreeMap<String, usize> = BTreeMap::new();
    for row in &rows {
        *per_id
            .entry(row["episode_id"].as_str().unwrap().to_string())
            .or_default() += 1;
    }
    let duplicated: Vec<_> = per_id.iter().filter(|(_, n)| **n > 1).collect();
    let (mut lost, mut corrupted) = (Vec::new(), Vec::new());
    for &i in acked.keys() {
        let b = &bodies[i];
        let row = rows.iter().find(|r| r["episode_id"] == b.id.as_str());
        let Some(row) = row else {
            lost.push(b.id.clone());
            continue;
        };
        let stored = std::fs::read(store.join(row["path"].as_str().unwrap())).unwrap_or_default();
        let tar = zstd::decode_all(&stored[..]).unwrap_or_default();
        if stored != b.bytes
            || row["tar_sha256"] != b.sha.as_str()
            || hex::encode(sha2::Sha256::digest(&tar)) != b.sha
        {
            corrupted.push(b.id.clone());
        }
    }
    // The index agrees with what reindex rebuilds from the stored files alone.
    let key = |rows: &[serde_json::Value]| -> BTreeSet<String> {
        rows.iter()
            .map(|r| {
                format!(
                    "{} {} {} {} {}",
                    r["host_id"], r["episode_id"], r["path"], r["bytes"], r["tar_sha256"]
                )
            })
            .collect()
    };
    let before = key(&rows);
    let out = std::process::Command::new(receiver_bin())
        .arg("--config")
        .arg(&rcfg)
        .arg("reindex")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let after = key(&index_rows(&store));
    println!(
        "power-cut harness: cuts={} acknowledged={answered} (of {} episodes) index_rows={} lost={} duplicated={} corrupted={} rolled_back_files={} undone_changes={} kept_changes={} orphaned={} seconds={:.1} seed={seed}",
        fs.cuts(),
        bodies.len(),
        rows.len(),
        lost.len(),
        duplicated.len(),
        corrupted.len(),
        totals.files_rolled_back,
        totals.changes_undone,
        totals.changes_kept,
        totals.orphaned,
        started.elapsed().as_secs_f64()
    );
    assert!(
        lost.is_empty(),
        "acknowledged but not in the index: {lost:?}"
    );
    assert!(
        duplicated.is_empty(),
        "duplicated index rows: {duplicated:?}"
    );
    assert!(corrupted.is_empty(), "stored bytes differ: {corrupted:?}");
    assert_eq!(before, after, "reindex disagrees with the index");
    assert!(answered > 0, "no upload was ever acknowledged");
}
