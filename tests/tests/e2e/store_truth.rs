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
