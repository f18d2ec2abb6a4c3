//! The fleet view of SPEC §11 against real receivers over real mTLS: the state of each host,
//! `/v1/fleet`, the page, `/metrics`, the `fleet` command, restarts, and the stale-binary
//! watch of SPEC §12 on the receiver's own executable.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use cis490_tests::client::{Client, Reply};
use cis490_tests::episode::{self, Body};
use cis490_tests::harness::{metric, ops_get, receiver_bin, InProcess, Process, World};

use crate::support::{free_port, start};

/// A commit no repository of the test has: outside every window.
const FOREIGN: &str = "0123456789abcdef0123456789abcdef01234567";

/// PUTs `b` as a shipper would, with its identity headers.
async fn put_as_shipper(
    c: &Client,
    host: &str,
    b: &Body,
    agent: &str,
    host_commit: Option<&str>,
) -> Reply {
    let mut h = vec![
        ("x-cis490-code-commit", b.commit.clone()),
        ("x-cis490-tar-sha256", b.sha.clone()),
        ("content-type", "application/zstd".to_string()),
        ("user-agent", agent.to_string()),
    ];
    if let Some(hc) = host_commit {
        h.push(("x-cis490-host-commit", hc.to_string()));
    }
    c.request(
        "PUT",
        &format!("/v1/episodes/{host}/{}", b.id),
        &h,
        b.bytes.clone(),
    )
    .await
    .expect("request completes")
}

async fn fleet_json(r: &InProcess) -> serde_json::Value {
    let (status, body) = r.ops_get("/v1/fleet").await;
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).expect("fleet view is JSON")
}

fn host<'a>(fleet: &'a serde_json::Value, id: &str) -> &'a serde_json::Value {
    fleet["hosts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|h| h["host_id"] == id)
        .unwrap_or_else(|| panic!("{id} not in {fleet:#}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hosts_in_three_states_are_listed_worst_first_in_json_page_and_metrics() {
    let w = World::new(3);
    let r = start(&w, "").await;
    let head = w.commits[2].clone();
    let src = w.path().join("src");

    // lab-ok: current code, current checkout, stores an episode.
    let ok = w.client(r.addr, "lab-ok");
    let b = episode::body(&src, "ep-ok", &head, 50_000);
    let a = put_as_shipper(&ok, "lab-ok", &b, "cis490-shipper/0.1.0", Some(&head)).await;
    assert_eq!(a.status, 201, "{}", String::from_utf8_lossy(&a.body));

    // lab-412: ships episodes of code outside the window.
    let stale = w.client(r.addr, "lab-412");
    let old = episode::body(&src, "ep-old", FOREIGN, 1_000);
    let a = put_as_shipper(&stale, "lab-412", &old, "cis490-shipper/0.1.0", Some(&head)).await;
    assert_eq!(a.status, 412);

    // lab-checkout: its episodes pass, but its install checkout is outside the window.
    let co = w.client(r.addr, "lab-checkout");
    let b = episode::body(&src, "ep-co", &head, 1_000);
    let a = put_as_shipper(
        &co,
        "lab-checkout",
        &b,
        "cis490-shipper/0.0.9",
        Some(FOREIGN),
    )
    .await;
    assert_eq!(a.status, 201, "a stale host commit never refuses an upload");

    let f = fleet_json(&r).await;
    let order: Vec<&str> = f["hosts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["host_id"].as_str().unwrap())
        .collect();
    assert_eq!(order, ["lab-412", "lab-checkout", "lab-ok"], "{f:#}");
    assert_eq!(f["window"]["head_commit"], head);

    let h = host(&f, "lab-ok");
    assert_eq!(h["state"], "ok");
    assert_eq!(h["shipper_version"], "0.1.0");
    assert_eq!(h["host_commit"], head);
    assert_eq!(h["host_commit_valid"], true);
    assert_eq!(h["host_commit_in_window"], true);
    assert_eq!(h["stored_episodes"], 1);
    assert_eq!(h["last_stored"]["episode_id"], "ep-ok");
    assert_eq!(h["last_stored"]["commit"], head);
    assert!(h["last_seen"].as_str().unwrap().ends_with('Z'));
    assert!(h["last_rejection"].is_null());
    assert!(h["cert_not_after"].as_str().is_some(), "{h:#}");

    let h = host(&f, "lab-412");
    assert_eq!(h["state"], "stale");
    assert_eq!(h["last_rejection"]["status"], 412);
    assert_eq!(h["last_rejection"]["error"], "commit_not_in_window");
    assert_eq!(h["last_rejection"]["episode_id"], "ep-old");
    assert_eq!(h["last_rejection"]["commit"], FOREIGN);
    assert_eq!(h["rejections"]["commit_not_in_window"], 1);
    assert_eq!(h["stored_episodes"], 0);

    let h = host(&f, "lab-checkout");
    assert_eq!(h["state"], "stale");
    assert_eq!(h["host_commit_in_window"], false);
    assert_eq!(h["shipper_version"], "0.0.9");
    assert!(h["last_rejection"].is_null());

    // The page: every host, worst first, its state as a class the colours hang on.
    let (status, page) = r.ops_get("/").await;
    assert_eq!(status, 200);
    assert!(page.starts_with("<!DOCTYPE html>"));
    assert!(page.contains("http-equiv=\"refresh\""));
    assert!(
        !page.contains("<script") && !page.contains("src=\"http"),
        "self-contained"
    );
    let pos = |s: &str| {
        page.find(s)
            .unwrap_or_else(|| panic!("{s} not on the page"))
    };
    assert!(pos(">lab-412<") < pos(">lab-checkout<") && pos(">lab-checkout<") < pos(">lab-ok<"));
    assert_eq!(page.matches("<tr class=\"stale\"").count(), 2);
    assert_eq!(page.matches("<tr class=\"ok\"").count(), 1);

    // /metrics: per host, typed, with the receiver's build.
    let (_, m) = r.ops_get("/metrics").await;
    assert_eq!(
        metric(&m, "cis490_fleet_host_stale{host=\"lab-412\"}"),
        Some(1.0)
    );
    assert_eq!(
        metric(&m, "cis490_fleet_host_stale{host=\"lab-checkout\"}"),
        Some(1.0)
    );
    assert_eq!(
        metric(&m, "cis490_fleet_host_stale{host=\"lab-ok\"}"),
        Some(0.0)
    );
    assert_eq!(
        metric(
            &m,
            "cis490_fleet_host_rejections_total{host=\"lab-412\",error=\"commit_not_in_window\"}"
        ),
        Some(1.0)
    );
    assert!(
        metric(
            &m,
            "cis490_fleet_host_last_seen_timestamp_seconds{host=\"lab-ok\"}"
        )
        .unwrap()
            > 1.7e9
    );
    assert!(
        metric(
            &m,
            "cis490_fleet_host_last_stored_timestamp_seconds{host=\"lab-ok\"}"
        )
        .unwrap()
            > 1.7e9
    );
    assert_eq!(
        metric(
            &m,
            "cis490_fleet_host_last_stored_timestamp_seconds{host=\"lab-412\"}"
        ),
        None
    );
    assert!(
        metric(
            &m,
            "cis490_fleet_host_cert_not_after_timestamp_seconds{host=\"lab-ok\"}"
        )
        .unwrap()
            > 1.7e9
    );
    assert_eq!(
        metric(
            &m,
            &format!(
                "cis490_receiver_build_info{{version=\"{}\"}}",
                env!("CARGO_PKG_VERSION")
            )
        ),
        Some(1.0)
    );
    assert_eq!(metric(&m, "cis490_receiver_binary_stale"), Some(0.0));
    for cert in ["server", "client_ca"] {
        let s = format!("cis490_receiver_cert_not_after_timestamp_seconds{{cert=\"{cert}\"}}");
        assert!(metric(&m, &s).unwrap() > 1.7e9, "{s}: {m}");
    }
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejecting_host_turns_ok_again_once_its_puts_are_stored() {
    let w = World::new(2);
    let r = start(&w, "").await;
    let c = w.client(r.addr, "lab-a");
    let src = w.path().join("src");
    let mut bad = episode::body(&src, "ep-bad", &w.commits[1], 5_000);
    bad.sha = "ab".repeat(32);
    let a = put_as_shipper(&c, "lab-a", &bad, "cis490-shipper/0.1.0", None).await;
    assert_eq!(a.status, 422);
    let f = fleet_json(&r).await;
    assert_eq!(host(&f, "lab-a")["state"], "rejecting");
    assert_eq!(host(&f, "lab-a")["rejections"]["invalid_content"], 1);
    let good = episode::body(&src, "ep-good", &w.commits[1], 5_000);
    assert_eq!(
        put_as_shipper(&c, "lab-a", &good, "cis490-shipper/0.1.0", None)
            .await
            .status,
        201
    );
    let f = fleet_json(&r).await;
    assert_eq!(host(&f, "lab-a")["state"], "ok");
    assert_eq!(
        host(&f, "lab-a")["rejections"]["invalid_content"],
        1,
        "counts since start stay"
    );
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_identity_headers_never_refuse_and_are_shown_as_text() {
    let w = World::new(2);
    let r = start(&w, "").await;
    let c = w.client(r.addr, "lab-x");
    let b = episode::body(&w.path().join("src"), "ep-1", &w.commits[1], 2_000);
    let agent = "cis490-shipper/<script>alert(1)</script>";
    let commit = format!("<img src=x onerror=alert(1)>{}", "f".repeat(100));
    let a = put_as_shipper(&c, "lab-x", &b, agent, Some(&commit)).await;
    assert_eq!(
        a.status, 201,
        "malformed identity headers are no reason to refuse"
    );
    let f = fleet_json(&r).await;
    let h = host(&f, "lab-x");
    assert_eq!(h["host_commit_valid"], false);
    assert!(h["host_commit_in_window"].is_null());
    assert_eq!(
        h["host_commit"].as_str().unwrap().chars().count(),
        64,
        "cut at 64"
    );
    assert_eq!(h["state"], "ok");
    let (_, page) = r.ops_get("/").await;
    assert!(!page.contains("<script>alert"), "{page}");
    assert!(!page.contains("<img"), "{page}");
    assert!(page.contains("&lt;script&gt;alert(1)&lt;/script&gt;"));
    assert!(page.contains("&lt;img src=x onerror=alert(1)&gt;"));
    // A non-ASCII value is no reason to refuse either.
    let b2 = episode::body(&w.path().join("src"), "ep-2", &w.commits[1], 2_000);
    let a = put_as_shipper(&c, "lab-x", &b2, "cis490-shipper/1.0", Some("ünïcödé")).await;
    assert_eq!(a.status, 201);
    let f = fleet_json(&r).await;
    assert_eq!(host(&f, "lab-x")["host_commit_valid"], false);
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stored_counts_come_back_from_the_index_after_a_restart() {
    let w = World::new(2);
    let cfg = w.config("");
    let r = InProcess::start(&cfg).await;
    let c = w.client(r.addr, "lab-r");
    let mut bytes = 0;
    for i in 0..3 {
        let b = episode::body(
            &w.path().join("src"),
            &format!("ep-{i}"),
            &w.commits[1],
            3_000,
        );
        bytes += b.bytes.len() as u64;
        assert_eq!(c.put("lab-r", &b).await.status, 201);
    }
    r.stop().await;
    let r = InProcess::start(&cfg).await;
    let c = w.client(r.addr, "lab-r");
    let mut f = fleet_json(&r).await;
    for _ in 0..100 {
        if f["hosts"].as_array().is_some_and(|h| !h.is_empty()) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        f = fleet_json(&r).await;
    }
    let h = host(&f, "lab-r");
    assert_eq!(h["stored_episodes"], 3);
    assert_eq!(h["stored_bytes"], bytes);
    assert!(h["last_seen"].is_null(), "not seen since the restart");
    assert!(h["last_stored"]["episode_id"]
        .as_str()
        .unwrap()
        .starts_with("ep-"));
    assert_eq!(h["state"], "ok");
    // A store after the restart adds to the index's counts, once.
    let b = episode::body(&w.path().join("src"), "ep-9", &w.commits[1], 3_000);
    assert_eq!(c.put("lab-r", &b).await.status, 201);
    assert_eq!(host(&fleet_json(&r).await, "lab-r")["stored_episodes"], 4);
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_quiet_past_silent_after_is_silent() {
    let w = World::new(2);
    let r = start(&w, "[fleet]\nsilent_after_s = 1\n").await;
    let c = w.client(r.addr, "lab-q");
    let b = episode::body(&w.path().join("src"), "ep-1", &w.commits[1], 1_000);
    assert_eq!(c.put("lab-q", &b).await.status, 201);
    assert_eq!(host(&fleet_json(&r).await, "lab-q")["state"], "ok");
    tokio::time::sleep(Duration::from_millis(1300)).await;
    assert_eq!(host(&fleet_json(&r).await, "lab-q")["state"], "silent");
    r.stop().await;
}

/// A receiver config with a fixed operations port, as `fleet` reads it.
fn config_with_ops_port(w: &World) -> (std::path::PathBuf, u16) {
    let cfg = w.config("");
    let port = free_port();
    let text = std::fs::read_to_string(&cfg).unwrap().replace(
        "metrics_listen = \"127.0.0.1:0\"",
        &format!("metrics_listen = \"127.0.0.1:{port}\""),
    );
    std::fs::write(&cfg, text).unwrap();
    (cfg, port)
}

fn fleet_cmd(cfg: &Path, args: &[&str]) -> (i32, String, String) {
    cis490_tests::harness::output(
        Command::new(receiver_bin())
            .arg("--config")
            .arg(cfg)
            .arg("fleet")
            .args(args)
            .env("NO_COLOR", "1"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fleet_command_prints_the_table_and_exits_by_the_worst_state() {
    let w = World::new(2);
    let (cfg, _) = config_with_ops_port(&w);
    // Nothing listens yet: exit 2, naming where it asked.
    let (code, _, err) = fleet_cmd(&cfg, &[]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("metrics_listen"), "{err}");

    let p = Process::start(&cfg, &[]);
    let (code, out, err) = fleet_cmd(&cfg, &[]);
    assert_eq!((code, out.lines().count()), (0, 2), "{out}{err}");
    assert!(out.starts_with("HOST"), "{out}");

    let c = w.client(p.addr, "lab-ok");
    let b = episode::body(&w.path().join("src"), "ep-1", &w.commits[1], 1_000);
    assert_eq!(c.put("lab-ok", &b).await.status, 201);
    let (code, out, _) = fleet_cmd(&cfg, &[]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("lab-ok") && out.contains(" ok "), "{out}");

    let c = w.client(p.addr, "lab-bad");
    let old = episode::body(&w.path().join("src"), "ep-old", FOREIGN, 1_000);
    assert_eq!(c.put("lab-bad", &old).await.status, 412);
    let (code, out, _) = fleet_cmd(&cfg, &[]);
    assert_eq!(code, 1, "a host is not ok: {out}");
    let first_row = out.lines().nth(1).unwrap();
    assert!(
        first_row.starts_with("lab-bad") && first_row.contains("stale"),
        "{out}"
    );
    assert!(out.contains("2 hosts, 1 not ok"), "{out}");

    let (code, json, _) = fleet_cmd(&cfg, &["--json"]);
    assert_eq!(code, 1);
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v["hosts"][0]["host_id"], "lab-bad");
    assert_eq!(v["hosts"][0]["state"], "stale");

    // A config error is exit 2 too.
    let bad = w.path().join("bad.toml");
    std::fs::write(&bad, "nonsense = 1\n").unwrap();
    let (code, _, err) = fleet_cmd(&bad, &[]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("config error"), "{err}");
}

/// Starts the receiver from a copy of its binary in `dir`.
fn start_from_copy(w: &World, dir: &Path) -> (Process, std::path::PathBuf) {
    std::fs::create_dir_all(dir).unwrap();
    let copy = dir.join("cis490-receiver");
    std::fs::copy(receiver_bin(), &copy).unwrap();
    let p = Process::start_with(&mut Command::new(&copy), &w.config(""), &[]);
    (p, copy)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replaced_receiver_binary_is_reported_once_and_an_untouched_one_never() {
    let w = World::new(2);
    let (p, copy) = start_from_copy(&w, &w.path().join("bin"));
    let (_, m) = ops_get(p.ops_addr, "/metrics").await;
    assert_eq!(metric(&m, "cis490_receiver_binary_stale"), Some(0.0));
    assert!(!p.log_text().contains("stale_binary"));

    // Install-style: write the new file beside it, then rename it over the old path.
    let new = copy.with_extension("new");
    std::fs::copy(receiver_bin(), &new).unwrap();
    std::fs::rename(&new, &copy).unwrap();
    for _ in 0..3 {
        let (_, m) = ops_get(p.ops_addr, "/metrics").await;
        assert_eq!(metric(&m, "cis490_receiver_binary_stale"), Some(1.0), "{m}");
    }
    let events = |log: &str| {
        log.lines()
            .filter(|l| l.contains("event=\"stale_binary\"") || l.contains("event=stale_binary"))
            .count()
    };
    // The log is read from the child's stderr by a thread: give it a moment to arrive.
    for _ in 0..50 {
        if events(&p.log_text()) > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let log = p.log_text();
    assert_eq!(events(&log), 1, "reported once: {log}");
    assert!(
        log.contains("sudo systemctl restart cis490-receiver"),
        "{log}"
    );
    // It keeps serving.
    let c = w.client(p.addr, "lab-1");
    let b = episode::body(&w.path().join("src"), "ep-1", &w.commits[1], 1_000);
    assert_eq!(c.put("lab-1", &b).await.status, 201);
    drop(p);

    let w2 = World::new(2);
    let (p2, _) = start_from_copy(&w2, &w2.path().join("bin"));
    for _ in 0..3 {
        let (_, m) = ops_get(p2.ops_addr, "/metrics").await;
        assert_eq!(metric(&m, "cis490_receiver_binary_stale"), Some(0.0));
    }
    assert!(!p2.log_text().contains("stale_binary"));
}

/// Runs headless Chromium (Debian's `chromium`, installed by scripts/install-test-deps.sh)
/// with `args`; its stdout, or `None` when the browser is missing and the run says to skip.
fn chromium(profile: &Path, args: &[String]) -> Option<String> {
    let Some(bin) = ["chromium", "chromium-browser"].into_iter().find(|b| {
        Command::new(b)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    }) else {
        if std::env::var_os("CIS490_SKIP_BROWSER").is_some() {
            eprintln!("SKIPPED: no chromium here and CIS490_SKIP_BROWSER is set");
            return None;
        }
        panic!("chromium is not installed: run scripts/install-test-deps.sh (or set CIS490_SKIP_BROWSER=1 where it cannot be installed)");
    };
    let mut child = Command::new(bin)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-quic",
            "--no-first-run",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("chromium starts");
    let mut stdout = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut stdout, &mut s);
        s
    });
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("chromium did not finish within 60 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Some(reader.join().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_shows_each_hosts_state_in_a_real_browser() {
    let w = World::new(3);
    let r = start(&w, "").await;
    let head = w.commits[2].clone();
    let src = w.path().join("src");
    let ok = w.client(r.addr, "lab-ok");
    let b = episode::body(&src, "ep-ok", &head, 20_000);
    assert_eq!(
        put_as_shipper(&ok, "lab-ok", &b, "cis490-shipper/0.1.0", Some(&head))
            .await
            .status,
        201
    );
    let stale = w.client(r.addr, "lab-412");
    let old = episode::body(&src, "ep-old", FOREIGN, 1_000);
    assert_eq!(
        put_as_shipper(&stale, "lab-412", &old, "cis490-shipper/0.1.0", Some(&head))
            .await
            .status,
        412
    );
    let co = w.client(r.addr, "lab-checkout");
    let b = episode::body(&src, "ep-co", &head, 1_000);
    assert_eq!(
        put_as_shipper(
            &co,
            "lab-checkout",
            &b,
            "cis490-shipper/0.0.9",
            Some(FOREIGN)
        )
        .await
        .status,
        201
    );

    let url = format!("http://{}/", r.ops_addr);
    let ops = r.ops_addr;
    let profile = w.path().join("chromium");
    let shot = w.path().join("fleet.png");
    let dom = {
        let (profile, url) = (profile.clone(), url.clone());
        tokio::task::spawn_blocking(move || chromium(&profile, &["--dump-dom".into(), url]))
            .await
            .unwrap()
    };
    let Some(dom) = dom else {
        r.stop().await;
        return;
    };
    // The DOM as the browser built it: one row per host, worst first, with its state.
    let rows: Vec<&str> = dom.split("<tr class=\"").skip(1).collect();
    assert_eq!(rows.len(), 3, "{dom}");
    assert!(
        rows[0].starts_with("stale") && rows[0].contains(">lab-412<"),
        "{dom}"
    );
    assert!(
        rows[1].starts_with("stale") && rows[1].contains(">lab-checkout<"),
        "{dom}"
    );
    assert!(rows[1].contains("OUTSIDE window"), "{dom}");
    assert!(
        rows[2].starts_with("ok") && rows[2].contains(">lab-ok<"),
        "{dom}"
    );
    assert!(dom.contains("2 of 3 hosts need attention"), "{dom}");

    let args = vec![
        format!("--screenshot={}", shot.display()),
        "--window-size=1500,420".to_string(),
        format!("http://{ops}/"),
    ];
    let profile2 = profile.clone();
    tokio::task::spawn_blocking(move || chromium(&profile2, &args))
        .await
        .unwrap();
    let png = std::fs::read(&shot).expect("chromium wrote the screenshot");
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 10_000,
        "{} bytes",
        png.len()
    );
    if let Some(keep) = std::env::var_os("CIS490_KEEP_SCREENSHOT") {
        std::fs::copy(&shot, keep).unwrap();
    }
    r.stop().await;
}

#[test]
fn both_binaries_say_which_commit_they_were_built_from() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let head = cis490_tests::git::git(root, &["rev-parse", "HEAD"]);
    for bin in [receiver_bin(), cis490_tests::harness::shipper_bin()] {
        let out = Command::new(&bin).arg("--version").output().unwrap();
        assert!(out.status.success());
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.contains(env!("CARGO_PKG_VERSION"))
                && text.contains(&format!("commit {}", head.trim())),
            "{}: {text}",
            bin.display()
        );
    }
}

/// A real shipper says who it is, and the receiver's fleet view shows it: version and install
/// commit in the window; a shipper whose install root is no checkout only pinged: `unknown`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_shippers_identify_themselves_to_the_fleet_view() {
    let w = World::new(3);
    let r = start(&w, "").await;
    let url = format!("https://localhost:{}", r.addr.port());
    let head = w.commits[2].clone();

    // lab-a: its install root is the project's checkout (HEAD in the window); it ships.
    let cfg = w.shipper_config(
        "lab-a",
        &url,
        &format!(
            "install_root = \"{}\"\n[metrics]\nlisten = \"\"\n",
            w.repo.path.display()
        ),
    );
    episode::write(
        &w.data_dir("lab-a").join("episodes"),
        "ep-1",
        &head,
        &[("x.bin", b"data")],
    );
    let (code, out, err) = cis490_tests::harness::shipper(&cfg, &["once"]);
    assert_eq!(code, 0, "{out}{err}");

    // lab-b: installed from a tarball (no checkout); it only pings.
    let plain = w.path().join("plain-install");
    std::fs::create_dir_all(&plain).unwrap();
    let cfg_b = w.shipper_config(
        "lab-b",
        &url,
        &format!(
            "install_root = \"{}\"\n[metrics]\nlisten = \"\"\n",
            plain.display()
        ),
    );
    let (code, out, err) = cis490_tests::harness::shipper(&cfg_b, &["ping", "--commit", &head]);
    assert_eq!(code, 0, "{out}{err}");

    let f = fleet_json(&r).await;
    let a = host(&f, "lab-a");
    assert_eq!(a["state"], "ok", "{f:#}");
    assert_eq!(a["shipper_version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(a["host_commit"], head);
    assert_eq!(a["host_commit_in_window"], true);
    assert_eq!(a["stored_episodes"], 1);
    let b = host(&f, "lab-b");
    assert_eq!(b["state"], "unknown", "{f:#}");
    assert!(b["host_commit"].is_null());
    assert_eq!(b["shipper_version"], env!("CARGO_PKG_VERSION"));
    r.stop().await;
}
