//! Power cuts under either daemon, separately: the receiver's store_dir, or the shipper's
//! data_dir (with the lab's own writes), on the fault filesystem; the power cut at seeded random
//! points (every process on the mount SIGKILLed, everything not durable rolled back), the daemon
//! restarted. CI runs 20 cuts each; `CIS490_POWER_CUTS=N` runs more.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, UNIX_EPOCH};

use cis490_tests::episode;
use cis490_tests::faultfs::{self, FaultFs, Loss, Ordering};
use cis490_tests::harness::{receiver_bin, shipper_bin, shipper_daemon, Lcg, Process, World};
use nix::sys::signal::Signal;
use sha2::Digest;

use crate::support::{files_under, index_rows};

const HOST: &str = "labhost-01";

/// Uploads running at once in the receiver loop.
const UPLOADERS: u64 = 4;

/// `CIS490_POWER_CUTS` (default 20, the CI size).
fn cuts_wanted() -> u64 {
    std::env::var("CIS490_POWER_CUTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20)
}

/// Journalled unless `CIS490_POWER_CUT_ORDERING=per-directory`: data_dir and store_dir are
/// documented to need a journalling filesystem (docs/operations.md); the other ordering shows
/// what happens without one.
fn ordering() -> Ordering {
    match std::env::var("CIS490_POWER_CUT_ORDERING").as_deref() {
        Ok("per-directory") => Ordering::PerDirectory,
        _ => Ordering::Journalled,
    }
}

fn trace() -> bool {
    std::env::var_os("CIS490_POWER_CUT_TRACE").is_some()
}

/// The index rows as comparable keys, before and after `cis490-receiver reindex` rebuilt the
/// index from the stored files alone.
fn reindexed(rcfg: &Path, store: &Path) -> (BTreeSet<String>, BTreeSet<String>) {
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
    let before = key(&index_rows(store));
    let out = std::process::Command::new(receiver_bin())
        .arg("--config")
        .arg(rcfg)
        .arg("reindex")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    (before, key(&index_rows(store)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn power_cuts_under_the_receiver_lose_nothing_it_acknowledged() {
    if !faultfs::usable_or_skip("power_cuts_under_the_receiver") {
        return;
    }
    let cuts_wanted = cuts_wanted();
    let seed = cis490_tests::harness::crash_seed();
    println!("power-cut harness seed={seed} (replay with CIS490_CRASH_SEED={seed})");
    let mut rng = Lcg(seed);
    let w = World::new(2);
    let ordering = ordering();
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
    let (mut groups, mut group_rows) = (0u64, 0u64);
    // Acknowledged episodes without an index row once the receiver restarted after a cut (its
    // start-up repair done). Checked at every restart, not only at the end: an episode lost at
    // one cut and uploaded again later would be back in the store by then.
    let mut lost_at_cut: BTreeMap<String, u64> = BTreeMap::new();
    let check_rows = |after: u64, lost_at_cut: &mut BTreeMap<String, u64>| {
        let ids: BTreeSet<String> = index_rows(&store)
            .iter()
            .filter_map(|r| r["episode_id"].as_str().map(str::to_string))
            .collect();
        for &i in acked.lock().unwrap().keys() {
            if !ids.contains(&bodies[i].id) {
                lost_at_cut.entry(bodies[i].id.clone()).or_insert(after);
            }
        }
    };
    for cut in 0..cuts_wanted {
        let mut r = Process::start(&rcfg, &[]);
        if cut > 0 {
            check_rows(cut - 1, &mut lost_at_cut);
        }
        // Several uploads at once, so that the power also goes in the middle of a group
        // commit (one directory fsync and one index fdatasync for uploads finishing together).
        let mut uploads = Vec::new();
        for k in 0..UPLOADERS {
            let client = w.client(r.addr, HOST);
            let (bodies2, acked2) = (bodies.clone(), acked.clone());
            let mut pick = Lcg(seed ^ (cut + 1).wrapping_mul(0x9e37_79b9) ^ (k << 32));
            uploads.push(tokio::spawn(async move {
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
                        Ok(reply) => {
                            panic!("{}: {} {}", bodies2[i].id, reply.status, reply.error())
                        }
                        Err(_) => tokio::time::sleep(Duration::from_millis(5)).await,
                    }
                    if n > 1_000_000 {
                        return;
                    }
                }
            }));
        }
        // The power goes after a random number of the receiver's writes, renames and fsyncs
        // (so at a request boundary inside an upload), or after 3 s if it falls idle.
        fs.cut_after(rng.below(120));
        let deadline = Instant::now() + Duration::from_secs(3);
        while !fs.is_frozen() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        // How many rows the group commits carried (read from memory: the disk is frozen).
        if let Ok((200, m)) = tokio::time::timeout(
            Duration::from_secs(1),
            cis490_tests::harness::ops_get(r.ops_addr, "/metrics"),
        )
        .await
        {
            let get = |s: &str| cis490_tests::harness::metric(&m, s).unwrap_or(0.0) as u64;
            group_rows += get("cis490_receiver_commit_rows_total");
            groups += get("cis490_receiver_commit_groups_total");
        }
        fs.freeze();
        r.child.kill().unwrap();
        let _ = r.child.wait();
        for u in uploads {
            u.abort();
            let _ = u.await;
        }
        let changes = fs.changes();
        let report = fs.power_cut(Loss::Random(rng.next_u64())).unwrap();
        if trace() {
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
    check_rows(cuts_wanted.saturating_sub(1), &mut lost_at_cut);
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
        if let Some(cut) = lost_at_cut.get(&b.id) {
            lost.push(format!("{} (after cut {cut})", b.id));
            continue;
        }
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
    let (before, after) = reindexed(&rcfg, &store);
    println!(
        "power-cut harness: cuts={} acknowledged={answered} (of {} episodes) index_rows={} lost={} duplicated={} corrupted={} rolled_back_files={} undone_changes={} kept_changes={} orphaned={} group_commits={groups} rows_in_them={group_rows} seconds={:.1} seed={seed}",
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

/// What the lab's code writes in the shipper harness, and where the shipper must put it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// Stamped with a commit the receiver admits: ends in shipped/ and in the receiver's store.
    Good,
    /// meta.json without a usable commit: quarantined `unstamped`, never sent.
    Unstamped,
    /// Stamped with a commit outside the window: the receiver answers 412, quarantined
    /// `commit_not_in_window`.
    Foreign,
}

/// One episode of the plan, made on the normal disk first (so its bytes and tar SHA-256 are
/// known before the fault filesystem sees it).
struct Planned {
    id: String,
    kind: Kind,
    src: PathBuf,
    /// Relative path → SHA-256 of every file, as the lab wrote it.
    files: BTreeMap<String, String>,
    /// The canonical tar's SHA-256 (packing keeps file mtimes, so the copy keeps them too).
    tar_sha: String,
}

/// SHA-256 of every regular file under `dir`, by relative path, leaving out `skip` at the top.
fn tree_digest(dir: &Path, skip: Option<&str>) -> BTreeMap<String, String> {
    files_under(dir)
        .into_iter()
        .filter(|rel| Some(rel.as_str()) != skip)
        .map(|rel| {
            let bytes = std::fs::read(dir.join(&rel)).unwrap_or_default();
            (rel, hex::encode(sha2::Sha256::digest(&bytes)))
        })
        .collect()
}

/// A mixed backlog: mostly small episodes, some around and over the 1 MiB the shipper keeps in
/// memory (those go through outbox/ and, over 1 MiB, the `check` preflight), a few of 2-4 MB,
/// and about one in eight that must end quarantined.
fn plan(w: &World, rng: &mut Lcg, n: u64) -> Vec<Planned> {
    let gen = w.path().join("gen-lab");
    let foreign = "deadbeef".repeat(5);
    (0..n)
        .map(|i| {
            let id = format!("ep-{i:04}");
            let draw = rng.below(32);
            let kind = match draw {
                0..=1 => Kind::Unstamped,
                2..=3 => Kind::Foreign,
                _ => Kind::Good,
            };
            let size = match draw {
                3 => 1_100_000 + rng.below(400_000) as usize,
                4..=9 => 64,
                10..=19 => 2_000 + rng.below(30_000) as usize,
                20..=25 => 100_000 + rng.below(200_000) as usize,
                26..=29 => 900_000 + rng.below(400_000) as usize,
                30 => 2_000_000 + rng.below(2_000_000) as usize,
                _ => 5_000,
            };
            let meta = match kind {
                Kind::Good => format!(
                    r#"{{"episode_id": "{id}", "code_version": {{"commit": "{}"}}}}"#,
                    w.commits[1]
                ),
                Kind::Foreign => {
                    format!(
                        r#"{{"episode_id": "{id}", "code_version": {{"commit": "{foreign}"}}}}"#
                    )
                }
                Kind::Unstamped => {
                    format!(r#"{{"episode_id": "{id}", "code_version": {{"commit": "HEAD"}}}}"#)
                }
            };
            let data = episode::noise(size, 0x5eed ^ (i + 1).wrapping_mul(0x9e37_79b9));
            let mut files: Vec<(&str, &[u8])> = vec![("data.bin", &data)];
            let notes = format!("episode {id}: {size} bytes\n");
            if i % 3 == 0 {
                files.push(("logs/notes.txt", notes.as_bytes()));
            }
            let src = episode::write(&gen, &id, &w.commits[1], &files);
            std::fs::write(src.join("meta.json"), meta).unwrap();
            // Fixed file times: a copy written again after a cut packs to the same bytes.
            let when = UNIX_EPOCH + Duration::from_secs(1_790_000_000 + i);
            for rel in files_under(&src) {
                let f = std::fs::File::options()
                    .write(true)
                    .open(src.join(rel))
                    .unwrap();
                f.set_modified(when).unwrap();
            }
            let tar_sha = episode::pack(&src, &id).0.tar_sha256;
            Planned {
                files: tree_digest(&src, None),
                id,
                kind,
                src,
                tar_sha,
            }
        })
        .collect()
}

/// Copies `src` to `dst` (which must not exist) the way careful lab code writes: every file
/// written, its mtime set, fsynced; every directory fsynced once its entries are in.
fn copy_durable(src: &Path, dst: &Path) -> io::Result<()> {
    std::fs::create_dir(dst)?;
    let mut names: Vec<_> = std::fs::read_dir(src)?
        .map(|e| e.map(|e| e.file_name()))
        .collect::<io::Result<_>>()?;
    names.sort();
    for name in names {
        let (from, to) = (src.join(&name), dst.join(&name));
        let md = std::fs::symlink_metadata(&from)?;
        if md.is_dir() {
            copy_durable(&from, &to)?;
            continue;
        }
        let mut input = std::fs::File::open(&from)?;
        let mut out = std::fs::File::options()
            .write(true)
            .create_new(true)
            .open(&to)?;
        let mut buf = vec![0u8; 256 << 10];
        loop {
            let n = input.read(&mut buf)?;
            if n == 0 {
                break;
            }
            out.write_all(&buf[..n])?;
        }
        out.set_modified(md.modified()?)?;
        out.sync_all()?;
    }
    std::fs::File::open(dst)?.sync_all()
}

/// The lab's code finishing one episode: written in full under `staging/`, made durable, renamed
/// into `episodes/` (so the shipper never sees half an episode), and `episodes/` fsynced. Only
/// when this returns does the episode count as written: until then the lab has not made it
/// durable, and a power cut may take it away.
fn produce(p: &Planned, staging: &Path, episodes: &Path) -> io::Result<()> {
    let tmp = staging.join(&p.id);
    copy_durable(&p.src, &tmp)?;
    std::fs::rename(&tmp, episodes.join(&p.id))?;
    std::fs::File::open(episodes)?.sync_all()?;
    std::fs::File::open(staging)?.sync_all()
}

/// Where an episode id is under `data_dir`: `(place, entry name)` for each of episodes/,
/// shipped/ and quarantine/ holding it (under its own name or a `<id>.N` suffix).
fn places(data: &Path) -> BTreeMap<String, Vec<(&'static str, String)>> {
    let mut out: BTreeMap<String, Vec<(&'static str, String)>> = BTreeMap::new();
    for place in ["episodes", "shipped", "quarantine"] {
        let Ok(rd) = std::fs::read_dir(data.join(place)) else {
            continue;
        };
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') {
                continue;
            }
            // Planned ids have no dots: what follows one is a collision suffix.
            let id = name.split('.').next().unwrap_or_default().to_string();
            out.entry(id).or_default().push((place, name));
        }
    }
    out
}

/// Names left where a drained, stopped shipper should leave nothing: anything in episodes/ or
/// outbox/, hidden entries (pending reasons, temp files, half-deleted directories) in shipped/
/// and quarantine/, a temp file inside a quarantined episode, and unknown names in data_dir.
fn leftovers(data: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let names = |d: &Path| -> Vec<String> {
        std::fs::read_dir(d)
            .map(|rd| {
                rd.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default()
    };
    for n in names(data) {
        if ![
            "episodes",
            "outbox",
            "shipped",
            "quarantine",
            ".lock",
            ".daemon.lock",
        ]
        .contains(&n.as_str())
        {
            out.push(n);
        }
    }
    for d in ["episodes", "outbox"] {
        out.extend(names(&data.join(d)).into_iter().map(|n| format!("{d}/{n}")));
    }
    for d in ["shipped", "quarantine"] {
        for n in names(&data.join(d)) {
            if n.starts_with('.') {
                out.push(format!("{d}/{n}"));
            } else if d == "quarantine" {
                out.extend(
                    names(&data.join(d).join(&n))
                        .into_iter()
                        .filter(|f| f.starts_with('.'))
                        .map(|f| format!("{d}/{n}/{f}")),
                );
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn power_cuts_under_the_shipper_lose_no_episode() {
    if !faultfs::usable_or_skip("power_cuts_under_the_shipper") {
        return;
    }
    let cuts_wanted = cuts_wanted();
    let seed = cis490_tests::harness::crash_seed();
    println!("shipper power-cut harness seed={seed} (replay with CIS490_CRASH_SEED={seed})");
    let mut rng = Lcg(seed);
    let w = World::new(2);
    let ordering = ordering();
    println!("shipper power-cut harness ordering={ordering:?}");
    let mut fs =
        FaultFs::mount(&w.path().join("faultfs"), ordering).unwrap_or_else(|e| panic!("{e}"));
    let data = fs.path().join("data");
    let staging = fs.path().join("lab-staging");
    let episodes = data.join("episodes");
    for d in [&staging, &episodes] {
        std::fs::create_dir_all(d).unwrap();
    }
    for d in [fs.path(), &data] {
        std::fs::File::open(d).unwrap().sync_all().unwrap();
    }

    // The receiver stays up on the normal disk throughout.
    let rcfg = w.config("");
    let mut receiver = Process::start(&rcfg, &[]);
    let scfg = w.shipper_config(
        HOST,
        &format!("https://localhost:{}", receiver.addr.port()),
        "[shipping]\nconcurrency = 2\nmax_backoff_s = 1\n",
    );
    let text = std::fs::read_to_string(&scfg).unwrap().replace(
        &format!("data_dir = \"{}\"", w.data_dir(HOST).display()),
        &format!("data_dir = \"{}\"", data.display()),
    );
    assert!(text.contains(&data.display().to_string()));
    std::fs::write(&scfg, text).unwrap();

    let planned = Arc::new(plan(&w, &mut rng, 30 + 3 * cuts_wanted));
    let mut todo: VecDeque<usize> = (0..planned.len()).collect();
    // Episodes the lab has made durable (or found on the lab host after a cut).
    let mut written: BTreeSet<usize> = BTreeSet::new();
    // A backlog waiting before the first start; from then on the lab writes while the shipper
    // works, and what it writes after a scan is the next start's backlog.
    for i in todo.drain(..8).collect::<Vec<_>>() {
        produce(&planned[i], &staging, &episodes).unwrap();
        written.insert(i);
    }
    let (mut rewritten, mut totals) = (0u64, faultfs::CutReport::default());
    let started = Instant::now();
    for cut in 0..cuts_wanted {
        // The power goes after a random number of changing requests (the lab's and the
        // shipper's writes, renames and fsyncs), or when all is quiet.
        fs.cut_after(rng.below(150));
        let mut ship = shipper_daemon(&shipper_bin(), &scfg, &[]).spawn().unwrap();
        let batch: Vec<usize> = (0..1 + rng.below(4))
            .filter_map(|_| todo.pop_front())
            .collect();
        let (p, st, ep) = (planned.clone(), staging.clone(), episodes.clone());
        let lab = std::thread::spawn(move || {
            // The episodes finished, the one the power cut interrupted, those not begun.
            let mut done = Vec::new();
            for (k, &i) in batch.iter().enumerate() {
                if produce(&p[i], &st, &ep).is_err() {
                    return (done, Some(i), batch[k + 1..].to_vec());
                }
                done.push(i);
            }
            (done, None, Vec::new())
        });
        // Or when all is quiet: the lab done and nothing changed for 300 ms (what the lab
        // wrote after the shipper's scan waits for the next start).
        let deadline = Instant::now() + Duration::from_secs(3);
        let (mut seen, mut since) = (fs.changes(), Instant::now());
        while !fs.is_frozen() && Instant::now() < deadline {
            let now = fs.changes();
            if now != seen {
                (seen, since) = (now, Instant::now());
            }
            if lab.is_finished() && since.elapsed() > Duration::from_millis(300) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        fs.freeze();
        ship.kill().unwrap();
        let _ = ship.wait();
        let (done, interrupted, unstarted) = lab.join().unwrap();
        let changes = fs.changes();
        let report = fs.power_cut(Loss::Random(rng.next_u64())).unwrap();
        written.extend(&done);
        // The episode being written when the power went: written if the cut left it on the
        // lab host (then it is complete: its files were durable before the rename); otherwise
        // the lab writes it again, byte for byte (even if the shipper had already sent it).
        for i in unstarted.into_iter().rev() {
            todo.push_front(i);
        }
        if let Some(i) = interrupted {
            if places(&data).contains_key(&planned[i].id) {
                written.insert(i);
            } else {
                todo.push_front(i);
                rewritten += 1;
            }
        }
        // What the lab left half-written is its own to clear.
        for e in std::fs::read_dir(&staging).unwrap().flatten() {
            std::fs::remove_dir_all(e.path()).unwrap();
        }
        if trace() {
            println!(
                "cut {cut}: {changes} changing requests, written {}, interrupted {interrupted:?}, {report:?}",
                written.len()
            );
        }
        totals.files_rolled_back += report.files_rolled_back;
        totals.changes_undone += report.changes_undone;
        totals.changes_kept += report.changes_kept;
        totals.orphaned += report.orphaned;
        assert!(
            started.elapsed() < Duration::from_secs(60 + cuts_wanted * 3),
            "power-cut loop too slow"
        );
    }
    let cut_seconds = started.elapsed().as_secs_f64();

    // The lab writes the rest; the shipper drains it all without a cut, then stops on SIGTERM
    // (which makes its last moves durable and exits 0 only if every fsync succeeded).
    let mut ship = shipper_daemon(&shipper_bin(), &scfg, &[]).spawn().unwrap();
    while let Some(i) = todo.pop_front() {
        produce(&planned[i], &staging, &episodes).unwrap();
        written.insert(i);
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let at = places(&data);
        let drained = written.iter().all(|&i| {
            at.get(&planned[i].id)
                .is_some_and(|p| p.iter().all(|(place, _)| *place != "episodes"))
        }) && files_under(&data.join("outbox")).is_empty();
        if drained {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the backlog never drained: {}",
            std::fs::read_to_string(scfg.with_extension("log")).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(ship.id() as i32),
        Signal::SIGTERM,
    )
    .unwrap();
    let status = ship.wait().unwrap();
    assert_eq!(status.code(), Some(0), "shipper exit after SIGTERM");

    // The oracle, on the lab host: every episode the lab wrote is in exactly one of shipped/
    // and quarantine/ (the one its kind says), intact, and nothing else is there.
    let at = places(&data);
    let (mut lost, mut duplicated, mut misplaced, mut corrupted) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for &i in &written {
        let p = &planned[i];
        let found = at.get(&p.id).cloned().unwrap_or_default();
        let [(place, name)] = found.as_slice() else {
            if found.is_empty() {
                lost.push(p.id.clone());
            } else {
                duplicated.push(format!("{}: {found:?}", p.id));
            }
            continue;
        };
        let want = if p.kind == Kind::Good {
            "shipped"
        } else {
            "quarantine"
        };
        if *place != want {
            misplaced.push(format!("{} in {place}/{name}", p.id));
            continue;
        }
        let dir = data.join(place).join(name);
        let reason_file = (p.kind != Kind::Good).then_some("quarantine_reason.json");
        if tree_digest(&dir, reason_file) != p.files {
            corrupted.push(format!("{place}/{name}: files differ"));
            continue;
        }
        match p.kind {
            Kind::Good => {
                if episode::pack(&dir, &p.id).0.tar_sha256 != p.tar_sha {
                    corrupted.push(format!("{place}/{name}: packs differently"));
                }
            }
            Kind::Unstamped | Kind::Foreign => {
                let want = if p.kind == Kind::Unstamped {
                    "unstamped"
                } else {
                    "commit_not_in_window"
                };
                let reason: serde_json::Value = std::fs::read(dir.join("quarantine_reason.json"))
                    .ok()
                    .and_then(|b| serde_json::from_slice(&b).ok())
                    .unwrap_or_default();
                if reason["episode_id"] != p.id.as_str() || reason["reason"] != want {
                    corrupted.push(format!("{place}/{name}: reason {reason}"));
                }
            }
        }
    }
    let unplanned: Vec<&String> = at
        .keys()
        .filter(|id| !written.iter().any(|&i| planned[i].id == **id))
        .collect();
    let left = leftovers(&data);

    // On the receiver, stopped (reindex needs the store to itself): every shipped episode
    // stored once, intact; nothing else stored.
    receiver.signal(Signal::SIGTERM);
    assert_eq!(
        receiver.wait_exit(Duration::from_secs(10)),
        Some(0),
        "{}",
        receiver.log_text()
    );
    let store = w.store_dir();
    let rows = index_rows(&store);
    let mut per_id: BTreeMap<String, Vec<&serde_json::Value>> = BTreeMap::new();
    for row in &rows {
        per_id
            .entry(row["episode_id"].as_str().unwrap_or_default().to_string())
            .or_default()
            .push(row);
    }
    let (mut not_stored, mut stored_wrongly) = (Vec::new(), Vec::new());
    for p in planned.iter() {
        let mine = per_id.remove(&p.id).unwrap_or_default();
        match (p.kind, mine.as_slice()) {
            (Kind::Good, [row]) => {
                let bytes = std::fs::read(store.join(row["path"].as_str().unwrap_or_default()))
                    .unwrap_or_default();
                let tar = zstd::decode_all(&bytes[..]).unwrap_or_default();
                if row["tar_sha256"] != p.tar_sha.as_str()
                    || hex::encode(sha2::Sha256::digest(&tar)) != p.tar_sha
                {
                    corrupted.push(format!("stored {}", p.id));
                }
            }
            (Kind::Good, []) => not_stored.push(p.id.clone()),
            (Kind::Good, _) => duplicated.push(format!("{} has {} rows", p.id, mine.len())),
            (_, []) => {}
            (_, _) => stored_wrongly.push(p.id.clone()),
        }
    }
    stored_wrongly.extend(per_id.into_keys());
    let stored_files = files_under(&store.join("episodes")).len();
    let (before, after) = reindexed(&rcfg, &store);
    let count = |k: Kind| planned.iter().filter(|p| p.kind == k).count();
    println!(
        "shipper power-cut harness: ordering={ordering:?} cuts={} episodes={} (good {}, unstamped {}, foreign commit {}) rewritten_after_cut={rewritten} index_rows={} lost={} duplicated={} misplaced={} corrupted={} not_stored={} stored_wrongly={} unplanned={} leftovers={} rolled_back_files={} undone_changes={} kept_changes={} orphaned={} seconds={:.1} (cuts {cut_seconds:.1}) seed={seed}",
        fs.cuts(),
        planned.len(),
        count(Kind::Good),
        count(Kind::Unstamped),
        count(Kind::Foreign),
        rows.len(),
        lost.len(),
        duplicated.len(),
        misplaced.len(),
        corrupted.len(),
        not_stored.len(),
        stored_wrongly.len(),
        unplanned.len(),
        left.len(),
        totals.files_rolled_back,
        totals.changes_undone,
        totals.changes_kept,
        totals.orphaned,
        started.elapsed().as_secs_f64()
    );
    assert_eq!(written.len(), planned.len(), "the lab wrote every episode");
    assert!(
        lost.is_empty(),
        "written but gone from the lab host: {lost:?}"
    );
    assert!(duplicated.is_empty(), "duplicated: {duplicated:?}");
    assert!(misplaced.is_empty(), "in the wrong place: {misplaced:?}");
    assert!(corrupted.is_empty(), "corrupted: {corrupted:?}");
    assert!(
        not_stored.is_empty(),
        "shipped but not stored: {not_stored:?}"
    );
    assert!(
        stored_wrongly.is_empty(),
        "stored but not to be: {stored_wrongly:?}"
    );
    assert!(
        unplanned.is_empty(),
        "never written by the lab: {unplanned:?}"
    );
    assert!(left.is_empty(), "left behind: {left:?}");
    assert_eq!(stored_files, rows.len(), "one stored file per index row");
    assert_eq!(before, after, "reindex disagrees with the index");
    assert_eq!(fs.cuts(), cuts_wanted);
}

/// The quarantine transition (SPEC §2) cut after each of its changing requests, both orderings,
/// `Loss::All` and two random seeds: `quarantine-unstamped` moves an unstamped episode and is cut;
/// `once` (whose sweep finishes interrupted quarantines) runs after the cut. The episode must end
/// in quarantine/ once, with its reason file, and nothing else may be left in quarantine/.
#[test]
fn a_quarantine_cut_at_any_step_ends_with_its_reason() {
    if !faultfs::usable_or_skip("a_quarantine_cut_at_any_step") {
        return;
    }
    let w = World::new(2);
    let mut failures = Vec::new();
    let mut cuts = 0;
    for ordering in [Ordering::Journalled, Ordering::PerDirectory] {
        let mut fs = FaultFs::mount(&w.path().join(format!("faultfs-{ordering:?}")), ordering)
            .unwrap_or_else(|e| panic!("{e}"));
        let data = fs.path().join("data");
        let scfg = w.shipper_config(HOST, "https://localhost:9", "");
        let text = std::fs::read_to_string(&scfg).unwrap().replace(
            &format!("data_dir = \"{}\"", w.data_dir(HOST).display()),
            &format!("data_dir = \"{}\"", data.display()),
        );
        std::fs::write(&scfg, text).unwrap();
        let shipper = |args: &[&str]| {
            std::process::Command::new(shipper_bin())
                .arg("--config")
                .arg(&scfg)
                .args(args)
                .env("CIS490_LOG", "error")
                .env_remove("NOTIFY_SOCKET")
                .output()
                .unwrap()
        };
        // data_dir as an install would leave it, then the shipper's four directories.
        std::fs::create_dir(&data).unwrap();
        std::fs::File::open(fs.path()).unwrap().sync_all().unwrap();
        assert!(shipper(&["once"]).status.success());
        let mut k = 0;
        for loss in [Loss::All, Loss::Random(7), Loss::Random(1_000_003)] {
            for n in 0.. {
                k += 1;
                let id = format!("q-{k:04}");
                let gen = w.path().join("gen-q");
                let src = episode::write(&gen, &id, "not-a-commit", &[("data.bin", b"x")]);
                produce_dir(&src, &data.join("episodes"), &id);
                fs.cut_after(n);
                shipper(&["quarantine-unstamped"]);
                let cut = fs.is_frozen();
                fs.power_cut(if cut { loss } else { Loss::All }).unwrap();
                cuts += 1;
                let after = shipper(&["once"]);
                let at = places(&data);
                let found = at.get(&id).cloned().unwrap_or_default();
                let reason: serde_json::Value = found
                    .first()
                    .and_then(|(_, name)| {
                        std::fs::read(data.join("quarantine").join(name).join(REASON)).ok()
                    })
                    .and_then(|b| serde_json::from_slice(&b).ok())
                    .unwrap_or_default();
                let hidden: Vec<String> = files_under(&data.join("quarantine"))
                    .into_iter()
                    .filter(|f| f.split('/').any(|c| c.starts_with('.')))
                    .collect();
                if found.len() != 1
                    || found[0].0 != "quarantine"
                    || reason["reason"] != "unstamped"
                    || !hidden.is_empty()
                    || !after.status.success()
                {
                    failures.push(format!(
                        "{ordering:?} {loss:?} cut after {n}: {found:?}, reason {reason}, left {hidden:?}, once: {}",
                        String::from_utf8_lossy(&after.stderr).trim()
                    ));
                }
                if !cut {
                    break;
                }
            }
        }
    }
    println!(
        "quarantine cut at every step: {cuts} cuts, {} failures",
        failures.len()
    );
    assert!(failures.is_empty(), "{failures:#?}");
}

const REASON: &str = "quarantine_reason.json";

/// [`produce`] for a test's one-off episode: copied in whole, then renamed into `episodes/`,
/// everything fsynced.
fn produce_dir(src: &Path, episodes: &Path, id: &str) {
    let tmp = episodes.parent().unwrap().join(format!("{id}.staging"));
    copy_durable(src, &tmp).unwrap();
    std::fs::File::open(episodes.parent().unwrap())
        .unwrap()
        .sync_all()
        .unwrap();
    std::fs::rename(&tmp, episodes.join(id)).unwrap();
    std::fs::File::open(episodes).unwrap().sync_all().unwrap();
    std::fs::File::open(episodes.parent().unwrap())
        .unwrap()
        .sync_all()
        .unwrap();
}
