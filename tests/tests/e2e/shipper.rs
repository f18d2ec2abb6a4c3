//! The shipper against the real receiver over mTLS: outcomes, quarantine reasons, commands.

use std::path::{Path, PathBuf};

use cis490_tests::episode;
use cis490_tests::harness::{shipper, World};
use serde_json::Value;

use crate::support::{doctor_code_on_roomy_disk, files_under, index_rows, start};

const HOST: &str = "labhost-01";

async fn run(cfg: &Path, args: &[&str]) -> (i32, String, String) {
    let cfg = cfg.to_path_buf();
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        shipper(&cfg, &refs)
    })
    .await
    .unwrap()
}

fn url(addr: std::net::SocketAddr) -> String {
    format!("https://localhost:{}", addr.port())
}

fn episodes_dir(w: &World) -> PathBuf {
    w.data_dir(HOST).join("episodes")
}

fn reason(w: &World, name: &str) -> Value {
    let p = w
        .data_dir(HOST)
        .join("quarantine")
        .join(name)
        .join("quarantine_reason.json");
    serde_json::from_slice(&std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display())))
        .unwrap()
}

fn dirs(p: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(p)
        .map(|rd| {
            rd.flatten()
                .filter(|e| e.path().is_dir())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn once_ships_retires_and_the_receiver_holds_the_same_bytes() {
    let w = World::new(3);
    let r = start(&w, "").await;
    let cfg = w.shipper_config(HOST, &url(r.addr), "");
    // Incompressible, so the body stays within max_compression_ratio (SPEC §16).
    let big = episode::noise(3 << 20, 0x2545_f491_4f6c_dd1d);
    episode::write(
        &episodes_dir(&w),
        "ep-a",
        &w.commits[2],
        &[("a.bin", b"alpha"), ("sub/b.bin", b"beta")],
    );
    let dir_b = episode::write(
        &episodes_dir(&w),
        "ep-b",
        &w.commits[1],
        &[("big.bin", &big)],
    );
    let expected_b = episode::pack(&dir_b, "ep-b").0.tar_sha256;
    let (code, out, err) = run(&cfg, &["once"]).await;
    assert_eq!(code, 0, "{out}\n{err}");
    assert_eq!(
        dirs(&w.data_dir(HOST).join("shipped")),
        vec!["ep-a", "ep-b"]
    );
    assert!(dirs(&episodes_dir(&w)).is_empty());
    assert!(
        files_under(&w.data_dir(HOST).join("outbox")).is_empty(),
        "tarballs deleted"
    );
    let rows = index_rows(&w.store_dir());
    assert_eq!(rows.len(), 2);
    let b = rows.iter().find(|r| r["episode_id"] == "ep-b").unwrap();
    assert_eq!(
        b["tar_sha256"], expected_b,
        "receiver's SHA-256 equals the packer's"
    );
    assert_eq!(b["commit"], w.commits[1]);
    assert!(
        err.contains("event=\"shipped\"") || err.contains("event=shipped"),
        "{err}"
    );
    // Shipped dirs keep the data.
    assert_eq!(
        std::fs::read(w.data_dir(HOST).join("shipped/ep-a/sub/b.bin")).unwrap(),
        b"beta"
    );
    // Nothing left: a second pass is a no-op that exits 0.
    assert_eq!(run(&cfg, &["--once"]).await.0, 0);
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fatal_answers_quarantine_with_the_right_reason() {
    let w = World::new(5);
    let r = start(
        &w,
        &format!(
            "[version_gate]\nrepo_path = \"{}\"\nwindow = 3\n[limits]\nmax_body_bytes = 2000000\n",
            w.repo.path.display()
        ),
    )
    .await;
    let cfg = w.shipper_config(HOST, &url(r.addr), "");
    let eps = episodes_dir(&w);
    // 412: produced by a commit that fell out of the window.
    episode::write(&eps, "ep-stale", &w.commits[0], &[("x", b"x")]);
    // 409: the receiver already holds different bytes under this id.
    let other = episode::body(&w.path().join("other"), "ep-conflict", &w.commits[4], 500);
    assert_eq!(w.client(r.addr, HOST).put(HOST, &other).await.status, 201);
    episode::write(&eps, "ep-conflict", &w.commits[4], &[("y", b"different")]);
    // 413: bigger than max_body_bytes (incompressible).
    let noise = episode::body(&w.path().join("noise"), "n", &w.commits[4], 3_000_000);
    episode::write(
        &eps,
        "ep-big",
        &w.commits[4],
        &[("noise.zst", &noise.bytes)],
    );
    // 422: a stale outbox tarball from other content (meta.json names another commit).
    episode::write(&eps, "ep-bad", &w.commits[4], &[("z", b"z")]);
    let foreign = episode::body(&w.path().join("foreign"), "ep-bad", &w.commits[3], 100);
    std::fs::create_dir_all(w.data_dir(HOST).join("outbox")).unwrap();
    std::fs::write(
        w.data_dir(HOST).join("outbox/ep-bad.tar.zst"),
        &foreign.bytes,
    )
    .unwrap();
    // unsupported_entry: a symlink inside.
    let link = episode::write(&eps, "ep-link", &w.commits[4], &[]);
    std::os::unix::fs::symlink("/etc/hostname", link.join("host")).unwrap();
    // unstamped: meta.json without a commit.
    let bad = eps.join("ep-nostamp");
    std::fs::create_dir_all(&bad).unwrap();
    std::fs::write(bad.join("meta.json"), b"{\"episode_id\": \"ep-nostamp\"}").unwrap();

    let (code, out, err) = run(&cfg, &["once"]).await;
    assert_eq!(
        code, 0,
        "fatal outcomes leave nothing to retry\n{out}\n{err}"
    );
    assert!(dirs(&eps).is_empty(), "{:?}", dirs(&eps));
    let stale = reason(&w, "ep-stale");
    assert_eq!(stale["reason"], "commit_not_in_window");
    assert_eq!(stale["http_status"], 412);
    assert_eq!(stale["commit"], w.commits[0]);
    assert_eq!(stale["episode_id"], "ep-stale");
    assert_eq!(stale["receiver_response"]["error"], "commit_not_in_window");
    assert!(stale["quarantined_at"].as_str().unwrap().ends_with('Z'));
    assert!(
        err.contains("git pull origin main"),
        "remediation logged:\n{err}"
    );
    assert_eq!(reason(&w, "ep-conflict")["reason"], "conflict");
    assert_eq!(reason(&w, "ep-conflict")["http_status"], 409);
    assert_eq!(reason(&w, "ep-big")["reason"], "too_large");
    assert_eq!(reason(&w, "ep-bad")["reason"], "invalid_content");
    assert_eq!(reason(&w, "ep-bad")["http_status"], 422);
    assert_eq!(reason(&w, "ep-link")["reason"], "unsupported_entry");
    assert_eq!(reason(&w, "ep-link")["http_status"], Value::Null);
    assert_eq!(reason(&w, "ep-nostamp")["reason"], "unstamped");
    assert!(files_under(&w.data_dir(HOST).join("outbox")).is_empty());
    // The data is all still there.
    assert_eq!(
        std::fs::read(w.data_dir(HOST).join("quarantine/ep-conflict/y")).unwrap(),
        b"different"
    );

    let (code, out, _) = run(&cfg, &["status", "--json"]).await;
    assert_eq!(code, 0);
    let s: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(s["quarantine"]["count"], 6);
    assert_eq!(s["quarantine"]["by_reason"]["conflict"], 1);
    assert_eq!(s["episodes"]["count"], 0);
    assert_eq!(s["episodes"]["oldest_age_s"], Value::Null);

    let (code, _, _) = run(&cfg, &["requeue", "ep-stale"]).await;
    assert_eq!(code, 0);
    assert!(episodes_dir(&w).join("ep-stale/meta.json").exists());
    assert!(!episodes_dir(&w)
        .join("ep-stale/quarantine_reason.json")
        .exists());
    assert_eq!(run(&cfg, &["requeue", "nope"]).await.0, 1);
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_failures_and_a_dead_receiver_keep_the_episode() {
    let w = World::new(1);
    let r = start(&w, "").await;
    // The certificate names labhost-02 but the config says labhost-01: 403.
    let cfg = w.shipper_config_with(HOST, &w.pki.client("labhost-02"), &url(r.addr), "");
    episode::write(&episodes_dir(&w), "ep1", &w.commits[0], &[("x", b"x")]);
    let (code, _, err) = run(&cfg, &["once"]).await;
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("403"), "{err}");
    assert_eq!(dirs(&episodes_dir(&w)), vec!["ep1"]);
    assert!(dirs(&w.data_dir(HOST).join("quarantine")).is_empty());
    r.stop().await;

    // Nobody listening.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let cfg = w.shipper_config(HOST, &format!("https://localhost:{port}"), "");
    let (code, _, err) = run(&cfg, &["once"]).await;
    assert_eq!(code, 1);
    assert!(err.contains("ship_transient"), "{err}");
    assert_eq!(dirs(&episodes_dir(&w)), vec!["ep1"]);
    assert!(dirs(&w.data_dir(HOST).join("quarantine")).is_empty());
    // A tarball this small is packed in memory for each attempt: nothing waits in the outbox.
    assert!(files_under(&w.data_dir(HOST).join("outbox")).is_empty());

    // A second URL that works is used when the first is down.
    let r = start(&w, "").await;
    let cfg = w.shipper_config(
        HOST,
        &format!("[\"https://localhost:{port}\", \"{}\"]", url(r.addr)),
        "",
    );
    let (code, _, err) = run(&cfg, &["once"]).await;
    assert_eq!(
        code, 0,
        "the dead first URL is skipped within the attempt: {err}"
    );
    assert!(err.contains("switching to the next receiver URL"), "{err}");
    assert_eq!(dirs(&w.data_dir(HOST).join("shipped")), vec!["ep1"]);
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reship_after_a_crash_between_put_and_retire_is_not_a_duplicate() {
    let w = World::new(1);
    let r = start(&w, "").await;
    let cfg = w.shipper_config(HOST, &url(r.addr), "");
    let dir = episode::write(
        &episodes_dir(&w),
        "ep1",
        &w.commits[0],
        &[("x", b"payload")],
    );
    // The receiver stored it, then the shipper died before moving it to shipped/.
    let (p, bytes) = episode::pack(&dir, "ep1");
    let b = episode::Body {
        id: "ep1".into(),
        commit: w.commits[0].clone(),
        sha: p.tar_sha256,
        bytes,
    };
    assert_eq!(w.client(r.addr, HOST).put(HOST, &b).await.status, 201);
    let (code, _, err) = run(&cfg, &["once"]).await;
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("status=200"), "answered already_stored: {err}");
    assert_eq!(dirs(&w.data_dir(HOST).join("shipped")), vec!["ep1"]);
    assert_eq!(index_rows(&w.store_dir()).len(), 1, "stored once");
    r.stop().await;
}

/// SPEC §2 "oldest first": with one upload at a time, a small episode packed ahead must not be
/// stored before an older, larger one that is still packing. Each round races the two (the
/// small one's pack finishes first whenever it wins the pack slot), so a shipper that lets a
/// packed episode jump the queue fails within a few rounds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_concurrency_1_episodes_are_stored_oldest_first() {
    const ROUNDS: usize = 20;
    let w = World::new(1);
    let r = start(&w, "").await;
    let cfg = w.shipper_config(HOST, &url(r.addr), "[shipping]\nconcurrency = 1\n");
    let eps = episodes_dir(&w);
    // Incompressible and over 1 MiB: packed to the outbox, with a preflight, so it takes long.
    let big = episode::noise(2_500_000, 0x9e37_79b9_7f4a_7c15);
    let mut expected = Vec::new();
    for round in 0..ROUNDS {
        let older = format!("ep-{round:02}-older");
        let newer = format!("ep-{round:02}-newer");
        let d_old = episode::write(&eps, &older, &w.commits[0], &[("big.bin", &big)]);
        let d_new = episode::write(&eps, &newer, &w.commits[0], &[("x", b"small")]);
        // The queue's age is the directory's mtime: set both, a minute apart.
        let now = std::time::SystemTime::now();
        for (d, ago) in [(&d_old, 120), (&d_new, 60)] {
            std::fs::File::open(d)
                .unwrap()
                .set_modified(now - std::time::Duration::from_secs(ago))
                .unwrap();
        }
        let (code, out, err) = run(&cfg, &["once"]).await;
        assert_eq!(code, 0, "round {round}: {out}\n{err}");
        expected.extend([older, newer]);
    }
    let stored: Vec<String> = index_rows(&w.store_dir())
        .iter()
        .map(|row| row["episode_id"].as_str().unwrap().to_string())
        .collect();
    let overtaken: Vec<usize> = (0..ROUNDS)
        .filter(|&k| stored.get(2 * k..2 * k + 2) != expected.get(2 * k..2 * k + 2))
        .collect();
    assert!(
        overtaken.is_empty(),
        "rounds {overtaken:?} of {ROUNDS} stored the newer episode first: {stored:?}"
    );
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sweep_settle_and_unstamped_drain() {
    let w = World::new(1);
    let r = start(&w, "").await;
    let cfg = w.shipper_config(HOST, &url(r.addr), "[shipping]\nsettle_s = 3600\n");
    let eps = episodes_dir(&w);
    episode::write(&eps, "ep-fresh", &w.commits[0], &[("x", b"x")]);
    let outbox = w.data_dir(HOST).join("outbox");
    std::fs::create_dir_all(&outbox).unwrap();
    std::fs::write(outbox.join("gone.tar.zst"), b"orphan").unwrap();
    std::fs::write(outbox.join("ep-fresh.tar.zst.partial"), b"half").unwrap();
    let (code, _, err) = run(&cfg, &["once"]).await;
    assert_eq!(code, 0, "settling episodes do not count: {err}");
    assert_eq!(
        dirs(&eps),
        vec!["ep-fresh"],
        "not shipped before it settles"
    );
    assert!(
        files_under(&outbox).is_empty(),
        "sweep removed the orphan and the partial"
    );
    assert!(err.contains("outbox_swept"), "{err}");

    // quarantine-unstamped leaves settling episodes alone, then drains the unstamped ones.
    let cfg0 = w.shipper_config(HOST, &url(r.addr), "");
    let nometa = eps.join("ep-nometa");
    std::fs::create_dir_all(&nometa).unwrap();
    std::fs::write(nometa.join("data"), b"d").unwrap();
    let badmeta = eps.join("ep-badmeta");
    std::fs::create_dir_all(&badmeta).unwrap();
    std::fs::write(
        badmeta.join("meta.json"),
        br#"{"code_version": {"commit": "abc"}}"#,
    )
    .unwrap();
    let (code, out, _) = run(&cfg0, &["quarantine-unstamped", "--dry-run"]).await;
    assert_eq!(code, 0);
    assert!(out.contains("kept 1, would quarantine 2"), "{out}");
    assert_eq!(dirs(&eps).len(), 3, "dry run moves nothing");
    let (_, out, _) = run(&cfg0, &["quarantine-unstamped"]).await;
    assert!(out.contains("kept 1, quarantined 2"), "{out}");
    let (_, out, _) = run(&cfg0, &["quarantine-unstamped"]).await;
    assert!(out.contains("kept 1, quarantined 0"), "idempotent: {out}");
    assert_eq!(reason(&w, "ep-nometa")["reason"], "unstamped");
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ping_reports_admission_with_exit_codes() {
    let w = World::new(2);
    let r = start(&w, "").await;
    let cfg = w.shipper_config(HOST, &url(r.addr), "");
    let (code, out, _) = run(&cfg, &["ping", "--commit", &w.commits[1]]).await;
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("identity:   labhost-01"), "{out}");
    assert!(out.contains("ADMITTED"), "{out}");
    let (code, out, _) = run(&cfg, &["--ping", "--commit", &"d".repeat(40)]).await;
    assert_eq!(code, 4, "{out}");
    assert!(
        out.contains("NOT ADMITTED") && out.contains("git pull origin main"),
        "{out}"
    );
    r.stop().await;
    let (code, out, _) = run(&cfg, &["ping", "--commit", &w.commits[1]]).await;
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("UNREACHABLE"), "{out}");
}

#[test]
fn shipper_config_errors_exit_2_naming_the_key() {
    let w = World::new(1);
    let cfg = w.shipper_config(HOST, "https://localhost:1", "[shipping]\nconcurrency = 0\n");
    let (code, _, err) = shipper(&cfg, &["once"]);
    assert_eq!(code, 2);
    assert!(
        err.contains("shipping.concurrency") && err.contains(cfg.to_str().unwrap()),
        "{err}"
    );
    let cfg = w.shipper_config_with(
        HOST,
        &cis490_tests::pki::CertFiles {
            cert: w.path().join("none.pem"),
            key: w.path().join("none.key"),
        },
        "https://localhost:1",
        "",
    );
    let (code, _, err) = shipper(&cfg, &["once"]);
    assert_eq!(code, 2);
    assert!(
        err.contains("receiver.cert_file") && err.contains("none.pem"),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn doctor_classifies_the_log_and_checks_the_host() {
    let w = World::new(4);
    let r = start(
        &w,
        &format!(
            "[version_gate]\nrepo_path = \"{}\"\nwindow = 2\n",
            w.repo.path.display()
        ),
    )
    .await;
    let cfg = w.shipper_config(HOST, &url(r.addr), "");
    let eps = episodes_dir(&w);
    episode::write(&eps, "ep-ok", &w.commits[3], &[("x", b"x")]);
    let (code, _, clean_log) = run(&cfg, &["once"]).await;
    assert_eq!(code, 0);
    let clean = w.path().join("clean.log");
    std::fs::write(&clean, &clean_log).unwrap();
    let (code, out, _) = run(&cfg, &["doctor", "--log-file", clean.to_str().unwrap()]).await;
    assert_eq!(doctor_code_on_roomy_disk(code, &out, w.path()), 0, "{out}");
    assert!(out.contains("OK    config"), "{out}");
    assert!(out.contains("1 episode(s) shipped cleanly"), "{out}");
    assert!(
        out.contains("reachable; it sees this host as labhost-01"),
        "{out}"
    );
    assert!(
        !out.contains('\x1b'),
        "no colour when stdout is not a terminal"
    );

    episode::write(&eps, "ep-stale-1", &w.commits[0], &[("x", b"x")]);
    episode::write(&eps, "ep-stale-2", &w.commits[0], &[("y", b"y")]);
    let (_, _, bad_log) = run(&cfg, &["once"]).await;
    let bad = w.path().join("bad.log");
    std::fs::write(&bad, format!("{clean_log}{bad_log}")).unwrap();
    let (code, out, _) = run(
        &cfg,
        &[
            "doctor",
            "--since",
            "1h",
            "--log-file",
            bad.to_str().unwrap(),
        ],
    )
    .await;
    assert_eq!(code, 1, "{out}");
    let first_journal = out.lines().find(|l| l.contains("journal")).unwrap();
    assert!(
        first_journal.starts_with("FAIL")
            && first_journal.contains("2 ship(s) rejected as out-of-window"),
        "{out}"
    );
    assert!(
        out.contains("fix: cd /opt/cis490 && sudo -u cis490 git pull origin main"),
        "{out}"
    );
    assert!(out.contains("commit_not_in_window: 2"), "{out}");
    let (code, out, _) = run(
        &cfg,
        &["doctor", "--json", "--log-file", bad.to_str().unwrap()],
    )
    .await;
    assert_eq!(code, 1);
    let j: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(j["ok"], false);
    assert!(j["rows"]
        .as_array()
        .unwrap()
        .iter()
        .any(|r| r["level"] == "red" && r["check"] == "journal"));

    // No journalctl to run: a yellow row that says how to get access.
    let out = tokio::task::block_in_place(|| {
        std::process::Command::new(cis490_tests::harness::shipper_bin())
            .arg("--config")
            .arg(&cfg)
            .arg("doctor")
            .env("PATH", w.path().join("empty-path"))
            .output()
            .unwrap()
    });
    let code = out.status.code().unwrap();
    let out = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.contains("journal not readable"), "{out}");
    assert!(out.contains("systemd-journal"), "{out}");
    assert_eq!(
        doctor_code_on_roomy_disk(code, &out, w.path()),
        0,
        "a yellow row is not a failure: {out}"
    );
    r.stop().await;
}
