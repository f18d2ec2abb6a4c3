//! SPEC §15: the disk wins over the index. An episode whose stored body vanished or was cut
//! short is not `already_stored`: `check` says go, the PUT stores it again with a new row, and
//! that last row is the one every reader sees.

use cis490_tests::episode;
use cis490_tests::harness::{Process, World};

use crate::support::index_rows;

const HOST: &str = "lab-01";

fn check_headers(b: &episode::Body) -> Vec<(&'static str, String)> {
    vec![
        ("x-cis490-code-commit", b.commit.clone()),
        ("x-cis490-tar-sha256", b.sha.clone()),
        ("x-cis490-upload-length", b.bytes.len().to_string()),
    ]
}

fn export(cfg: &std::path::Path) -> Vec<serde_json::Value> {
    let (code, out, err) = cis490_tests::harness::output(
        std::process::Command::new(cis490_tests::harness::receiver_bin())
            .arg("--config")
            .arg(cfg)
            .arg("export-index"),
    );
    assert_eq!(code, 0, "{err}");
    out.lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vanished_or_cut_body_is_stored_again_and_its_last_row_wins() {
    let w = World::new(2);
    let cfg = w.config("");
    let p = Process::start(&cfg, &[]);
    let c = w.client(p.addr, HOST);
    let b = episode::body(&w.path().join("src"), "ep-1", &w.commits[1], 50_000);
    assert_eq!(c.put(HOST, &b).await.status, 201);
    let stored = w
        .store_dir()
        .join("episodes")
        .join(HOST)
        .join("ep-1.tar.zst");
    let check_path = format!("/v1/episodes/{HOST}/ep-1/check");
    let check = c
        .request("POST", &check_path, &check_headers(&b), vec![])
        .await
        .unwrap();
    assert_eq!(check.status, 200, "intact: already stored");

    for (case, damage) in [
        (
            "deleted",
            Box::new(|p: &std::path::Path| std::fs::remove_file(p).unwrap())
                as Box<dyn Fn(&std::path::Path)>,
        ),
        (
            "truncated",
            Box::new(|p: &std::path::Path| {
                let f = std::fs::OpenOptions::new().write(true).open(p).unwrap();
                f.set_len(1000).unwrap();
            }),
        ),
    ] {
        damage(&stored);
        let check = c
            .request("POST", &check_path, &check_headers(&b), vec![])
            .await
            .unwrap();
        assert_eq!(check.status, 204, "{case}: the episode may be sent again");
        let put = c.put(HOST, &b).await;
        assert_eq!(
            put.status,
            201,
            "{case}: {}",
            String::from_utf8_lossy(&put.body)
        );
        assert_eq!(
            std::fs::read(&stored).unwrap(),
            b.bytes,
            "{case}: the body is whole again"
        );
        let again = c.put(HOST, &b).await;
        assert_eq!(again.status, 200, "{case}: and now it is already stored");
    }
    let rows = index_rows(&w.store_dir());
    assert_eq!(
        rows.len(),
        3,
        "a new row each time the body was stored again"
    );
    let exported = export(&cfg);
    assert_eq!(
        exported.len(),
        1,
        "export-index gives the last row of an id only"
    );
    assert_eq!(exported[0], rows[2]);
    let get = c
        .request("GET", &format!("/v1/episodes/{HOST}/ep-1"), &[], vec![])
        .await
        .unwrap();
    assert_eq!(get.status, 200);
    assert_eq!(get.json()["ts"], rows[2]["ts"]);

    let log = p.log_text();
    let missing: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("stored_missing"))
        .collect();
    assert!(missing.len() >= 2, "{log}");
    assert!(
        missing.iter().any(|l| l.contains("found_bytes=None")),
        "{log}"
    );
    assert!(
        missing.iter().any(|l| l.contains("found_bytes=Some(1000)")),
        "{log}"
    );
    assert!(
        missing[0].contains("episode=ep-1") && missing[0].contains("host_id=lab-01"),
        "{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vanished_body_is_no_conflict_for_other_bytes() {
    let w = World::new(2);
    let p = Process::start(&w.config(""), &[]);
    let c = w.client(p.addr, HOST);
    let src = w.path().join("src");
    let first = episode::body(&src, "ep-1", &w.commits[1], 5_000);
    assert_eq!(c.put(HOST, &first).await.status, 201);
    let mut other = episode::body(&w.path().join("src2"), "ep-1", &w.commits[1], 7_000);
    other.id = "ep-1".into();
    assert_eq!(
        c.put(HOST, &other).await.status,
        409,
        "intact: other bytes conflict"
    );
    std::fs::remove_file(
        w.store_dir()
            .join("episodes")
            .join(HOST)
            .join("ep-1.tar.zst"),
    )
    .unwrap();
    let put = c.put(HOST, &other).await;
    assert_eq!(
        put.status,
        201,
        "nothing is stored any more: {}",
        String::from_utf8_lossy(&put.body)
    );
    assert_eq!(
        c.put(HOST, &first).await.status,
        409,
        "now the new body is the stored one"
    );
}

fn scrub(cfg: &std::path::Path, args: &[&str]) -> (i32, String, String) {
    cis490_tests::harness::output(
        std::process::Command::new(cis490_tests::harness::receiver_bin())
            .arg("--config")
            .arg(cfg)
            .arg("scrub")
            .args(args),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scrub_finds_missing_truncated_and_corrupt_bodies_and_repair_lets_them_be_stored_again() {
    let w = World::new(2);
    let cfg = w.config("");
    let p = Process::start(&cfg, &[]);
    let c = w.client(p.addr, HOST);
    let mut bodies = Vec::new();
    for id in ["ep-ok", "ep-gone", "ep-cut", "ep-flip"] {
        let b = episode::body(&w.path().join("src"), id, &w.commits[1], 300_000);
        assert_eq!(c.put(HOST, &b).await.status, 201);
        bodies.push(b);
    }
    let file = |id: &str| {
        w.store_dir()
            .join("episodes")
            .join(HOST)
            .join(format!("{id}.tar.zst"))
    };
    let (code, out, err) = scrub(&cfg, &[]);
    assert_eq!(
        (code, out.as_str()),
        (0, "4 checked, 0 missing, 0 truncated, 0 corrupt\n"),
        "{err}"
    );

    std::fs::remove_file(file("ep-gone")).unwrap();
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(file("ep-cut"))
        .unwrap();
    f.set_len(bodies[2].bytes.len() as u64 - 1).unwrap();
    let mut flipped = std::fs::read(file("ep-flip")).unwrap();
    let mid = flipped.len() / 2;
    flipped[mid] ^= 0x55;
    std::fs::write(file("ep-flip"), &flipped).unwrap();
    let before: Vec<Option<Vec<u8>>> = ["ep-ok", "ep-gone", "ep-cut", "ep-flip"]
        .iter()
        .map(|id| std::fs::read(file(id)).ok())
        .collect();

    let (code, out, err) = scrub(&cfg, &["--max-bytes-per-s", "0"]);
    assert_eq!(code, 1, "{out}{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(
        lines,
        [
            "lab-01 ep-gone missing",
            "lab-01 ep-cut truncated",
            "lab-01 ep-flip corrupt",
            "4 checked, 1 missing, 1 truncated, 1 corrupt"
        ],
        "{err}"
    );
    let after: Vec<Option<Vec<u8>>> = ["ep-ok", "ep-gone", "ep-cut", "ep-flip"]
        .iter()
        .map(|id| std::fs::read(file(id)).ok())
        .collect();
    assert_eq!(before, after, "without --repair nothing changes");

    let (code, out, _) = scrub(&cfg, &["--json"]);
    assert_eq!(code, 1);
    let objs: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(
        objs[0],
        serde_json::json!({"host_id": HOST, "episode_id": "ep-gone", "problem": "missing"})
    );
    assert_eq!(
        objs[3],
        serde_json::json!({"checked": 4, "missing": 1, "truncated": 1, "corrupt": 1})
    );

    // The corrupt body has its indexed length: the receiver would call it already stored.
    let flip = &bodies[3];
    assert_eq!(c.put(HOST, flip).await.status, 200);
    let (code, _, err) = scrub(&cfg, &["--repair"]);
    assert_eq!(code, 1, "{err}");
    assert!(
        !file("ep-cut").exists() && !file("ep-flip").exists(),
        "moved to the quarantine"
    );
    let notes: Vec<String> = std::fs::read_dir(w.store_dir().join("quarantine"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().ends_with(".reason.json"))
        .map(|p| std::fs::read_to_string(p).unwrap())
        .collect();
    assert_eq!(notes.len(), 2);
    assert!(notes.iter().any(|n| n.contains("\"scrub_truncated\"")));
    assert!(notes.iter().any(|n| n.contains("\"scrub_corrupt\"")));
    // Now every bad episode is stored again by its next upload.
    for b in &bodies[1..] {
        let put = c.put(HOST, b).await;
        assert_eq!(
            put.status,
            201,
            "{}: {}",
            b.id,
            String::from_utf8_lossy(&put.body)
        );
    }
    let (code, out, _) = scrub(&cfg, &[]);
    assert_eq!(
        (code, out.as_str()),
        (0, "4 checked, 0 missing, 0 truncated, 0 corrupt\n")
    );
    // A config error is exit 2.
    let bad = w.path().join("bad.toml");
    std::fs::write(&bad, "store_dir = 3\n").unwrap();
    assert_eq!(scrub(&bad, &[]).0, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_background_scrub_reports_a_bad_episode_and_changes_nothing() {
    let w = World::new(2);
    let p = Process::start(&w.config("[store]\nscrub_interval_s = 1\n"), &[]);
    let c = w.client(p.addr, HOST);
    for id in ["ep-1", "ep-2"] {
        let b = episode::body(&w.path().join("src"), id, &w.commits[1], 20_000);
        assert_eq!(c.put(HOST, &b).await.status, 201);
    }
    let cut = w
        .store_dir()
        .join("episodes")
        .join(HOST)
        .join("ep-2.tar.zst");
    let f = std::fs::OpenOptions::new().write(true).open(&cut).unwrap();
    f.set_len(100).unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    let m = loop {
        let (_, m) = cis490_tests::harness::ops_get(p.ops_addr, "/metrics").await;
        if cis490_tests::harness::metric(
            &m,
            "cis490_receiver_scrub_last_completed_timestamp_seconds",
        )
        .is_some_and(|v| v > 0.0)
        {
            break m;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no scrub finished: {m}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    };
    let metric = |s: &str| cis490_tests::harness::metric(&m, s).unwrap_or(-1.0);
    assert!(metric("cis490_receiver_scrub_checked_total") >= 2.0, "{m}");
    assert!(
        metric("cis490_receiver_scrub_problems_total{problem=\"truncated\"}") >= 1.0,
        "{m}"
    );
    assert_eq!(
        metric("cis490_receiver_scrub_problems_total{problem=\"corrupt\"}"),
        0.0
    );
    for _ in 0..50 {
        if p.log_text().contains("scrub_problem") {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let log = p.log_text();
    let line = log
        .lines()
        .find(|l| l.contains("scrub_problem"))
        .unwrap_or_else(|| panic!("{log}"));
    assert!(
        line.contains("ERROR") && line.contains("episode=ep-2") && line.contains("truncated"),
        "{line}"
    );
    assert_eq!(
        std::fs::metadata(&cut).unwrap().len(),
        100,
        "the background scrub never repairs"
    );
}
