//! SPEC §15 on a real Garage cluster: admission believes the bucket over the index objects
//! (`stored_missing`), `scrub` finds bodies damaged through the S3 API, `--repair` moves them
//! to `<prefix>quarantine/`, and the background scrub counts what it finds at its pace.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use cis490_tests::episode::{self, Body};
use cis490_tests::garage::{Bucket, Garage};
use cis490_tests::harness::{metric, ops_get, output, receiver_bin, InProcess, Process, World};

const HOST: &str = "labhost-01";
/// Every test runs under a prefix, as a lab sharing a bucket would.
const PREFIX: &str = "lab1/";

fn body_key(b: &Body) -> String {
    format!("{PREFIX}episodes/{HOST}/{}/{}.tar.zst", b.id, b.sha)
}

fn config(w: &World, g: &Garage, store_extra: &str) -> std::path::PathBuf {
    w.config(&format!(
        "{}{store_extra}",
        g.store_section(&g.endpoint, PREFIX)
    ))
}

fn scrub(cfg: &Path, args: &[&str]) -> (i32, String, String) {
    output(
        std::process::Command::new(receiver_bin())
            .arg("--config")
            .arg(cfg)
            .arg("scrub")
            .args(args),
    )
}

fn check_headers(b: &Body) -> Vec<(&'static str, String)> {
    vec![
        ("x-cis490-code-commit", b.commit.clone()),
        ("x-cis490-tar-sha256", b.sha.clone()),
        ("x-cis490-upload-length", b.bytes.len().to_string()),
    ]
}

/// Every object under the prefix but the health probes, with its bytes.
async fn snapshot(b: &Bucket) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    for k in b.keys(PREFIX).await {
        if k.starts_with(&format!("{PREFIX}health/")) {
            continue;
        }
        // A key listed but not found was deleted a moment ago: Garage's listing can lag a
        // delete under load, and an empty body in its place made one snapshot differ from the
        // next with nothing changed (a CI flake, 2026-12-08).
        if let Some(data) = b.get(&k).await {
            out.insert(k, data.to_vec());
        }
    }
    out
}

/// The keys whose bytes differ between two snapshots (or that only one has).
fn changed_keys(a: &BTreeMap<String, Vec<u8>>, b: &BTreeMap<String, Vec<u8>>) -> Vec<String> {
    a.keys()
        .chain(b.keys())
        .filter(|k| a.get(*k) != b.get(*k))
        .cloned()
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect()
}

/// The ways a body is damaged behind the receiver's back, all through the S3 API.
async fn flip_a_byte(b: &Bucket, key: &str) {
    let mut data = b.get(key).await.unwrap().to_vec();
    let mid = data.len() / 2;
    data[mid] ^= 0x55;
    b.put(key, data).await;
}

async fn cut_short(b: &Bucket, key: &str, len: usize) {
    let data = b.get(key).await.unwrap().to_vec();
    b.put(key, data[..len].to_vec()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vanished_or_cut_body_in_the_bucket_is_stored_again() {
    let w = World::new(2);
    let g = Garage::start(&w.path().join("garage"));
    let b = g.bucket();
    let cfg = config(&w, &g, "");
    let p = Process::start(&cfg, &[]);
    let c = w.client(p.addr, HOST);
    let gen = w.path().join("gen");
    let gone = episode::body(&gen, "ep-gone", &w.commits[1], 40_000);
    let cut = episode::body(&gen, "ep-cut", &w.commits[1], 40_000);
    for e in [&gone, &cut] {
        assert_eq!(c.put(HOST, e).await.status, 201);
    }
    let check = |e: &Body| {
        let c = &c;
        let path = format!("/v1/episodes/{HOST}/{}/check", e.id);
        let h = check_headers(e);
        async move { c.request("POST", &path, &h, vec![]).await.unwrap().status }
    };
    assert_eq!(check(&gone).await, 200, "intact: already stored");
    assert_eq!(check(&cut).await, 200, "intact: already stored");

    b.delete(&body_key(&gone)).await;
    cut_short(&b, &body_key(&cut), 1000).await;
    for e in [&gone, &cut] {
        assert_eq!(check(e).await, 204, "{}: may be sent again", e.id);
        let put = c.put(HOST, e).await;
        assert_eq!(
            put.status,
            201,
            "{}: {}",
            e.id,
            String::from_utf8_lossy(&put.body)
        );
        assert!(
            b.get(&body_key(e)).await.unwrap().to_vec() == e.bytes,
            "{}: the body is whole again",
            e.id
        );
        let row = b
            .json(&format!("{PREFIX}index/{HOST}/{}.json", e.id))
            .await
            .unwrap();
        assert_eq!(row["bytes"], e.bytes.len() as u64);
        assert_eq!(c.put(HOST, e).await.status, 200, "{}: stored now", e.id);
    }
    let log = p.log_text();
    let missing: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("event=\"stored_missing\"") || l.contains("event=stored_missing"))
        .collect();
    let line = |id: &str| {
        missing
            .iter()
            .find(|l| l.contains(&format!("episode={id}")))
            .unwrap_or_else(|| panic!("no stored_missing for {id}: {log}"))
    };
    let g_line = line("ep-gone");
    assert!(
        g_line.contains("ERROR")
            && g_line.contains(&format!("host_id={HOST}"))
            && g_line.contains("found_bytes=None"),
        "{g_line}"
    );
    let c_line = line("ep-cut");
    assert!(c_line.contains("found_bytes=Some(1000)"), "{c_line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scrub_names_damaged_bodies_and_repair_lets_them_be_stored_again() {
    let w = World::new(2);
    let g = Garage::start(&w.path().join("garage"));
    let b = g.bucket();
    let cfg = config(&w, &g, "");
    // The daemon serves from the bucket all along: scrub runs beside it.
    let p = Process::start(&cfg, &[]);
    let c = w.client(p.addr, HOST);
    let gen = w.path().join("gen");
    let eps: Vec<Body> = ["ep-ok", "ep-flip", "ep-cut", "ep-gone"]
        .iter()
        .map(|id| episode::body(&gen, id, &w.commits[1], 300_000))
        .collect();
    for e in &eps {
        assert_eq!(c.put(HOST, e).await.status, 201);
    }
    let (code, out, err) = scrub(&cfg, &[]);
    assert_eq!(
        (code, out.as_str()),
        (0, "4 checked, 0 missing, 0 truncated, 0 corrupt\n"),
        "{err}"
    );

    let (ok, flip, cut, gone) = (&eps[0], &eps[1], &eps[2], &eps[3]);
    flip_a_byte(&b, &body_key(flip)).await;
    cut_short(&b, &body_key(cut), cut.bytes.len() - 1).await;
    b.delete(&body_key(gone)).await;
    let damaged = snapshot(&b).await;

    let (code, out, err) = scrub(&cfg, &["--max-bytes-per-s", "0"]);
    assert_eq!(code, 1, "{out}{err}");
    assert_eq!(
        out.lines().collect::<Vec<_>>(),
        [
            "labhost-01 ep-cut truncated",
            "labhost-01 ep-flip corrupt",
            "labhost-01 ep-gone missing",
            "4 checked, 1 missing, 1 truncated, 1 corrupt",
        ],
        "{err}"
    );
    assert!(err.contains("does not exist"), "the detail: {err}");
    let (code, out, _) = scrub(&cfg, &["--json"]);
    assert_eq!(code, 1);
    let objs: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(
        objs,
        [
            serde_json::json!({"host_id": HOST, "episode_id": "ep-cut", "problem": "truncated"}),
            serde_json::json!({"host_id": HOST, "episode_id": "ep-flip", "problem": "corrupt"}),
            serde_json::json!({"host_id": HOST, "episode_id": "ep-gone", "problem": "missing"}),
            serde_json::json!({"checked": 4, "missing": 1, "truncated": 1, "corrupt": 1}),
        ]
    );
    let after = snapshot(&b).await;
    assert!(
        after == damaged,
        "without --repair nothing changes: {:?}",
        changed_keys(&damaged, &after)
    );

    // The flipped body has its indexed length: admission still calls it stored.
    assert_eq!(c.put(HOST, flip).await.status, 200);

    let (code, out, err) = scrub(&cfg, &["--repair"]);
    assert_eq!(code, 1, "{err}");
    assert_eq!(
        out.lines().last(),
        Some("4 checked, 1 missing, 1 truncated, 1 corrupt")
    );
    let after = snapshot(&b).await;
    let q: Vec<&String> = after
        .keys()
        .filter(|k| k.starts_with(&format!("{PREFIX}quarantine/")))
        .collect();
    assert_eq!(q.len(), 4, "a body and a reason for each: {q:?}");
    for (e, reason) in [(flip, "scrub_corrupt"), (cut, "scrub_truncated")] {
        let note_key = q
            .iter()
            .find(|k| {
                k.contains(&format!("/{HOST}/")) && k.contains(&e.id) && k.ends_with(".reason.json")
            })
            .unwrap_or_else(|| panic!("no reason for {}: {q:?}", e.id));
        let note: serde_json::Value = serde_json::from_slice(&after[*note_key]).unwrap();
        assert_eq!(note["error"], reason, "{note}");
        assert_eq!(note["episode_id"], e.id.as_str());
        assert_eq!(note["host_id"], HOST);
        assert_eq!(note["body_kept"], true);
        let kept = note_key.replace(".reason.json", ".tar.zst");
        assert_eq!(
            after.get(&kept),
            damaged.get(&body_key(e)),
            "{}: the damaged body is what the quarantine keeps",
            e.id
        );
        assert!(
            !after.contains_key(&body_key(e)),
            "{}: out of episodes/",
            e.id
        );
    }
    // Nothing else changed: the intact body, every index object, the missing one still gone.
    let rest = |m: &BTreeMap<String, Vec<u8>>| -> BTreeMap<String, Vec<u8>> {
        m.iter()
            .filter(|(k, _)| {
                !k.starts_with(&format!("{PREFIX}quarantine/"))
                    && **k != body_key(flip)
                    && **k != body_key(cut)
            })
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    };
    assert!(
        rest(&after) == rest(&damaged),
        "only the two bad bodies moved"
    );
    assert!(after[&body_key(ok)] == ok.bytes);

    // Every bad episode is stored again by its next upload, and the bucket is clean.
    for e in [flip, cut, gone] {
        let put = c.put(HOST, e).await;
        assert_eq!(
            put.status,
            201,
            "{}: {}",
            e.id,
            String::from_utf8_lossy(&put.body)
        );
        assert!(b.get(&body_key(e)).await.unwrap().to_vec() == e.bytes);
    }
    let (code, out, err) = scrub(&cfg, &[]);
    assert_eq!(
        (code, out.as_str()),
        (0, "4 checked, 0 missing, 0 truncated, 0 corrupt\n"),
        "{err}"
    );
}

/// A field of a logfmt line, as text.
fn field<'a>(line: &'a str, name: &str) -> Option<&'a str> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(&format!("{name}=")))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_background_scrub_covers_the_bucket_at_its_pace_and_changes_nothing() {
    const LIMIT: f64 = 1_500_000.0;
    let w = World::new(2);
    let g = Garage::start(&w.path().join("garage"));
    let b = g.bucket();
    // Stored by a receiver without a background scrub, so the one under test starts from a
    // settled bucket.
    let plain = config(&w, &g, "");
    let r = InProcess::start(&plain).await;
    let c = w.client(r.addr, HOST);
    let gen = w.path().join("gen");
    let eps: Vec<Body> = ["ep-1", "ep-2", "ep-3"]
        .iter()
        .map(|id| episode::body(&gen, id, &w.commits[1], 2_000_000))
        .collect();
    for e in &eps {
        assert_eq!(c.put(HOST, e).await.status, 201);
    }
    r.stop().await;
    let cut = &eps[1];
    cut_short(&b, &body_key(cut), 100).await;
    let intact: u64 = [&eps[0], &eps[2]]
        .iter()
        .map(|e| e.bytes.len() as u64)
        .sum();

    // The command line without a limit, to show the limit is what holds the rate below.
    let started = Instant::now();
    let (code, out, err) = scrub(&plain, &["--max-bytes-per-s", "0"]);
    let took = started.elapsed().as_secs_f64();
    assert_eq!(code, 1, "{out}{err}");
    println!(
        "s3 scrub command, no limit: {intact} body bytes read in {took:.2}s = {:.0} B/s",
        intact as f64 / took
    );

    // The command line at an explicit pace, for the record.
    let started = Instant::now();
    let (code, out, err) = scrub(&plain, &["--max-bytes-per-s", &(LIMIT as u64).to_string()]);
    let took = started.elapsed().as_secs_f64();
    assert_eq!(code, 1, "{out}{err}");
    println!(
        "s3 scrub command: {intact} body bytes read in {took:.2}s = {:.0} B/s (limit {LIMIT:.0})",
        intact as f64 / took
    );
    assert!(intact as f64 / took <= LIMIT * 1.02, "{took}");

    let text = std::fs::read_to_string(&plain).unwrap().replace(
        "[store]\n",
        &format!(
            "[store]\nscrub_interval_s = 1\nscrub_max_bytes_per_s = {}\n",
            LIMIT as u64
        ),
    );
    let cfg = w.path().join("receiver-scrub.toml");
    std::fs::write(&cfg, text).unwrap();
    let p = Process::start(&cfg, &[]);
    let deadline = Instant::now() + Duration::from_secs(30);
    let finished = loop {
        let log = p.log_text();
        if let Some(l) = log
            .lines()
            .find(|l| l.contains("background scrub finished"))
        {
            break l.to_string();
        }
        assert!(Instant::now() < deadline, "no scrub finished: {log}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let num = |name: &str| -> f64 {
        field(&finished, name)
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in {finished}"))
    };
    assert_eq!(
        (
            num("checked"),
            num("missing"),
            num("truncated"),
            num("corrupt")
        ),
        (3.0, 0.0, 1.0, 0.0),
        "{finished}"
    );
    let (bytes, seconds) = (num("bytes_read"), num("seconds"));
    assert!(
        bytes >= intact as f64,
        "every intact body read whole: {finished}"
    );
    let rate = bytes / seconds;
    println!(
        "s3 background scrub: {bytes} body bytes in {seconds:.2}s = {rate:.0} B/s (limit {LIMIT:.0})"
    );
    assert!(rate <= LIMIT * 1.02, "{finished}");

    let (_, m) = ops_get(p.ops_addr, "/metrics").await;
    let metric = |s: &str| metric(&m, s).unwrap_or(-1.0);
    assert!(metric("cis490_receiver_scrub_checked_total") >= 3.0, "{m}");
    assert!(
        metric("cis490_receiver_scrub_problems_total{problem=\"truncated\"}") >= 1.0,
        "{m}"
    );
    assert_eq!(
        metric("cis490_receiver_scrub_problems_total{problem=\"corrupt\"}"),
        0.0
    );
    assert!(metric("cis490_receiver_scrub_last_completed_timestamp_seconds") > 0.0);
    let log = p.log_text();
    let line = log
        .lines()
        .find(|l| l.contains("scrub_problem"))
        .unwrap_or_else(|| panic!("{log}"));
    assert!(
        line.contains("ERROR") && line.contains("episode=ep-2") && line.contains("truncated"),
        "{line}"
    );
    assert!(
        !log.contains("covers fs stores only"),
        "no warning that S3 is skipped: {log}"
    );
    assert_eq!(
        b.get(&body_key(cut)).await.unwrap().len(),
        100,
        "the background scrub never repairs"
    );
    assert!(b.keys(&format!("{PREFIX}quarantine")).await.is_empty());
}
