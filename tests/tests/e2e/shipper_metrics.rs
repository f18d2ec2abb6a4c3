//! The shipper daemon's metrics and identity (SPEC §11, §12, §14) as a real process: what
//! `/metrics`, `/healthz` and the textfile say after real uploads over real mTLS, the install
//! checkout's HEAD on every request (re-read after a `git pull`), a binary replaced under a
//! running daemon, and the `[metrics]` config errors.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use cis490_tests::episode;
use cis490_tests::git::GitRepo;
use cis490_tests::harness::{
    fake_receiver, metric, metrics_addr, ops_get, read_head, shipper, shipper_bin, shipper_daemon,
    stalled_receiver, World,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::support::{free_port, index_rows, start};

const HOST: &str = "labhost-01";
const RESTART: &str = "sudo systemctl restart cis490-shipper";
/// The shipper's version: the workspace's, as this crate's.
const VERSION: &str = env!("CARGO_PKG_VERSION");
const AGENT: &str = concat!("cis490-shipper/", env!("CARGO_PKG_VERSION"));

/// A `run` daemon started from `exe`, its stderr in `<config>.log`.
struct Daemon {
    child: Child,
    log: PathBuf,
}

impl Daemon {
    fn start(exe: &Path, cfg: &Path, envs: &[(&str, &str)]) -> Daemon {
        let log = cfg.with_extension("log");
        let mut cmd = shipper_daemon(exe, cfg, envs);
        // A binary copied a moment ago may still be open for writing in a child another test
        // thread is forking (ETXTBSY until that child execs): try again briefly.
        let deadline = Instant::now() + Duration::from_secs(5);
        let child = loop {
            match cmd.spawn() {
                Ok(c) => break c,
                Err(e) if e.raw_os_error() == Some(26) && Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(e) => panic!("failed to start {}: {e}", exe.display()),
            }
        };
        Daemon { child, log }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits for the start line and returns the metrics listener's address.
    async fn metrics_addr(&mut self) -> SocketAddr {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(a) = metrics_addr(&self.log_text()) {
                return a;
            }
            if let Some(st) = self.child.try_wait().unwrap() {
                panic!("daemon exited ({st}): {}", self.log_text());
            }
            assert!(
                Instant::now() < deadline,
                "daemon never started: {}",
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Polls `/metrics` until `series` has `want`; returns the text of that scrape.
async fn wait_metric(addr: SocketAddr, series: &str, want: f64) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (status, text) = ops_get(addr, "/metrics").await;
        assert_eq!(status, 200, "{text}");
        if metric(&text, series) == Some(want) {
            return text;
        }
        assert!(
            Instant::now() < deadline,
            "{series} never became {want}:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Samples of a Prometheus text: series (name and labels) → value; checks that each sample's
/// name has a TYPE line of its own.
fn samples(text: &str) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    for line in text
        .lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
    {
        let (series, value) = line.rsplit_once(' ').unwrap();
        let name = series.split('{').next().unwrap();
        assert!(
            text.contains(&format!("# TYPE {name} ")),
            "{name} has no TYPE line of its own:\n{text}"
        );
        out.insert(series.to_string(), value.parse().unwrap());
    }
    out
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

fn not_after(pem: &Path) -> f64 {
    cis490_common::tls::summarize(pem)
        .unwrap()
        .not_after
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as f64
}

/// The `cis490_shipper_*` names the alerting rules use: each must be in a scrape.
fn names_the_rules_use() -> Vec<String> {
    let rules = Path::new(env!("CARGO_MANIFEST_DIR")).join("../etc/prometheus/cis490-rules.yml");
    let text = std::fs::read_to_string(rules).unwrap();
    let mut names: Vec<String> = text
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|w| w.starts_with("cis490_shipper_"))
        .map(str::to_string)
        .collect();
    names.sort();
    names.dedup();
    assert!(names.len() >= 4, "{names:?}");
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daemon_shows_what_it_shipped_on_metrics_healthz_and_the_textfile() {
    let w = World::new(3);
    let r = start(
        &w,
        &format!(
            "[version_gate]\nrepo_path = \"{}\"\nwindow = 2\n",
            w.repo.path.display()
        ),
    )
    .await;
    let prom_dir = w.path().join("node-exporter");
    std::fs::create_dir_all(&prom_dir).unwrap();
    let textfile = prom_dir.join("cis490.prom");
    let cfg = w.shipper_config(
        HOST,
        &format!("https://localhost:{}", r.addr.port()),
        &format!(
            "install_root = \"{}\"\n[metrics]\ntextfile = \"{}\"\n",
            w.repo.path.display(),
            textfile.display()
        ),
    );
    let eps = w.data_dir(HOST).join("episodes");
    episode::write(&eps, "ep-1", &w.commits[2], &[("a", b"one")]);
    // Over 1 MiB: packed to the outbox, sent after a check.
    episode::body(&w.path().join("gen"), "ep-2", &w.commits[1], 1_500_000);
    std::fs::rename(w.path().join("gen/ep-2"), eps.join("ep-2")).unwrap();
    // Outside the window of 2: refused with 412 and quarantined.
    episode::write(&eps, "ep-old", &w.commits[0], &[("a", b"old")]);

    let mut d = Daemon::start(&shipper_bin(), &cfg, &[]);
    let addr = d.metrics_addr().await;
    let text = wait_metric(addr, "cis490_shipper_episodes{dir=\"shipped\"}", 2.0).await;
    let text = if metric(&text, "cis490_shipper_episodes{dir=\"quarantine\"}") == Some(1.0) {
        text
    } else {
        wait_metric(addr, "cis490_shipper_episodes{dir=\"quarantine\"}", 1.0).await
    };
    let m =
        |series: &str| metric(&text, series).unwrap_or_else(|| panic!("no {series} in\n{text}"));

    let rows = index_rows(&w.store_dir());
    assert_eq!(rows.len(), 2, "{rows:?}");
    let stored: u64 = rows.iter().map(|r| r["bytes"].as_u64().unwrap()).sum();
    assert!(stored > 1_000_000, "{rows:?}");
    assert_eq!(m("cis490_shipper_shipped_total"), 2.0);
    assert_eq!(m("cis490_shipper_shipped_bytes_total"), stored as f64);
    assert_eq!(m("cis490_shipper_episodes{dir=\"shipped\"}"), 2.0);
    assert_eq!(m("cis490_shipper_episodes{dir=\"episodes\"}"), 0.0);
    assert_eq!(m("cis490_shipper_episodes{dir=\"outbox\"}"), 0.0);
    assert_eq!(m("cis490_shipper_oldest_queued_age_seconds"), 0.0);
    assert_eq!(
        m("cis490_shipper_rejected_total{reason=\"commit_not_in_window\"}"),
        1.0
    );
    assert_eq!(m("cis490_shipper_rejected_total{reason=\"conflict\"}"), 0.0);
    assert_eq!(m("cis490_shipper_transient_errors_total"), 0.0);
    assert_eq!(m("cis490_shipper_upload_bytes_in_flight"), 0.0);
    assert_eq!(m("cis490_shipper_binary_stale"), 0.0);
    let last = m("cis490_shipper_last_success_timestamp_seconds");
    assert!(
        last > unix_now() - 60.0 && last <= unix_now() + 1.0,
        "{last}"
    );
    let head = w.repo.head();
    assert_eq!(
        m(&format!(
            "cis490_shipper_build_info{{version=\"{VERSION}\",host_commit=\"{head}\"}}"
        )),
        1.0
    );
    // Where `pki issue` put the host's certificate (the harness issues them that way).
    let client_pem = w
        .pki
        .dir
        .join("hosts")
        .join(HOST)
        .join(format!("{HOST}.pem"));
    assert_eq!(
        m("cis490_shipper_cert_not_after_timestamp_seconds{cert=\"client\"}"),
        not_after(&client_pem)
    );
    assert_eq!(
        m("cis490_shipper_cert_not_after_timestamp_seconds{cert=\"ca\"}"),
        not_after(&w.pki.ca_file)
    );
    let scraped = samples(&text);
    for name in names_the_rules_use() {
        assert!(
            scraped
                .keys()
                .any(|s| s == &name || s.starts_with(&format!("{name}{{"))),
            "the rules use {name}, which the daemon does not expose:\n{text}"
        );
    }

    let (status, body) = ops_get(addr, "/healthz").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&body).unwrap()["ok"],
        true
    );
    assert_eq!(ops_get(addr, "/nope").await.0, 404);

    // The textfile: the same series, rewritten (a new file renamed over it) at every scan.
    let first = std::fs::metadata(&textfile).unwrap().ino();
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::fs::metadata(&textfile).unwrap().ino() == first {
        assert!(Instant::now() < deadline, "the textfile is not rewritten");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let file = std::fs::read_to_string(&textfile).unwrap();
    let in_file = samples(&file);
    assert_eq!(
        in_file.keys().collect::<Vec<_>>(),
        scraped.keys().collect::<Vec<_>>(),
        "{file}"
    );
    for series in [
        "cis490_shipper_shipped_total",
        "cis490_shipper_shipped_bytes_total",
        "cis490_shipper_episodes{dir=\"shipped\"}",
    ] {
        assert_eq!(in_file[series], scraped[series], "{series}");
    }
    assert!(
        file.contains("# TYPE cis490_shipper_shipped_total counter\n"),
        "{file}"
    );
    let names: Vec<_> = std::fs::read_dir(&prom_dir).unwrap().flatten().collect();
    assert_eq!(
        names.len(),
        1,
        "only the textfile, no temp files: {names:?}"
    );

    // promtool parses it as Prometheus would, and finds nothing to lint.
    let out = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::fs::File::open(&textfile).unwrap())
        .output()
        .expect("promtool (scripts/install-test-deps.sh)");
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    // node_exporter's textfile collector publishes every series, the counters typed as such.
    let exported = node_exporter_reads(&prom_dir).await;
    assert_eq!(
        metric(&exported, "node_textfile_scrape_error"),
        Some(0.0),
        "{exported}"
    );
    assert!(
        exported.contains("# TYPE cis490_shipper_shipped_total counter\n"),
        "{exported}"
    );
    // node_exporter sorts the labels, so series are compared with theirs sorted.
    let republished: Vec<String> = exported
        .lines()
        .filter(|l| l.starts_with("cis490_"))
        .filter_map(|l| l.rsplit_once(' ').map(|(series, _)| sorted_labels(series)))
        .collect();
    for series in in_file.keys() {
        assert!(
            republished.contains(&sorted_labels(series)),
            "node_exporter lost {series}:\n{exported}"
        );
    }
    r.stop().await;
}

/// `name{b="2",a="1"}` as `name{a="1",b="2"}` (no label value here holds a comma).
fn sorted_labels(series: &str) -> String {
    match series.split_once('{') {
        None => series.to_string(),
        Some((name, labels)) => {
            let mut l: Vec<&str> = labels.trim_end_matches('}').split(',').collect();
            l.sort_unstable();
            format!("{name}{{{}}}", l.join(","))
        }
    }
}

/// What node_exporter (textfile collector only, on a free loopback port) exposes for `dir`.
async fn node_exporter_reads(dir: &Path) -> String {
    let port = free_port();
    let mut child = Command::new("prometheus-node-exporter")
        .arg("--collector.disable-defaults")
        .arg("--collector.textfile")
        .arg(format!("--collector.textfile.directory={}", dir.display()))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("prometheus-node-exporter (scripts/install-test-deps.sh)");
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let text = loop {
        if let Ok(mut s) = tokio::net::TcpStream::connect(addr).await {
            // HTTP/1.0, so the answer comes whole rather than in chunks.
            s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").await.unwrap();
            let mut raw = String::new();
            s.read_to_string(&mut raw).await.unwrap();
            break raw.split_once("\r\n\r\n").unwrap().1.to_string();
        }
        assert!(Instant::now() < deadline, "node_exporter did not start");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let _ = child.kill();
    let _ = child.wait();
    text
}

/// A stand-in receiver that records every request head and answers like the real one would
/// for an admitted commit: ping 200, check 204, PUT 201.
async fn recording_receiver(w: &World) -> (SocketAddr, Arc<Mutex<Vec<String>>>) {
    let heads = Arc::new(Mutex::new(Vec::new()));
    let h = heads.clone();
    let addr = fake_receiver(w, move |mut tls| {
        let h = h.clone();
        async move {
            loop {
                let head = read_head(&mut tls).await;
                if head.is_empty() {
                    return;
                }
                let len: usize = header(&head, "content-length")
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0);
                let mut body = vec![0u8; len];
                if tls.read_exact(&mut body).await.is_err() {
                    return;
                }
                h.lock().unwrap().push(head.clone());
                let (status, json) = if head.starts_with("POST /v1/ping") {
                    (
                        "200 OK",
                        format!(
                            r#"{{"ok":true,"host_id":"{HOST}","receiver_version":"test","gate":{{"enabled":true,"source":"git","head_commit":null,"window":100,"commits":1,"age_s":0,"last_error":null}},"commit_accepted":true}}"#
                        ),
                    )
                } else if head.starts_with("POST ") {
                    ("204 No Content", String::new())
                } else {
                    ("201 Created", r#"{"status":"stored"}"#.to_string())
                };
                let resp = format!(
                    "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{json}",
                    json.len()
                );
                if tls.write_all(resp.as_bytes()).await.is_err() {
                    return;
                }
            }
        }
    })
    .await;
    (addr, heads)
}

/// The value of header `name` in a request head (names compared without case).
fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

fn heads_of(heads: &Arc<Mutex<Vec<String>>>, start: &str) -> Vec<String> {
    heads
        .lock()
        .unwrap()
        .iter()
        .filter(|h| h.starts_with(start))
        .cloned()
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_request_carries_the_install_head_and_a_pull_shows_without_a_restart() {
    let w = World::new(1);
    let (addr, heads) = recording_receiver(&w).await;
    let mut install = GitRepo::init(&w.path().join("install"));
    let first = install.commit();
    let cfg = w.shipper_config(
        HOST,
        &format!("https://localhost:{}", addr.port()),
        &format!("install_root = \"{}\"\n", install.path.display()),
    );

    // ping without --commit asks about the install root's HEAD, and says who it is.
    let (code, out, err) = tokio::task::block_in_place(|| shipper(&cfg, &["ping"]));
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains(&format!("commit:     {first} ADMITTED")),
        "{out}"
    );
    let ping = heads_of(&heads, "POST /v1/ping");
    assert_eq!(ping.len(), 1);
    assert_eq!(
        header(&ping[0], "x-cis490-host-commit"),
        Some(first.as_str())
    );
    assert_eq!(
        header(&ping[0], "x-cis490-code-commit"),
        Some(first.as_str())
    );
    assert_eq!(header(&ping[0], "user-agent"), Some(AGENT));

    // The daemon: a big episode (check, then PUT) and a small one (PUT only).
    let eps = w.data_dir(HOST).join("episodes");
    episode::body(&w.path().join("gen"), "ep-big", &w.commits[0], 1_500_000);
    std::fs::create_dir_all(&eps).unwrap();
    std::fs::rename(w.path().join("gen/ep-big"), eps.join("ep-big")).unwrap();
    episode::write(&eps, "ep-small", &w.commits[0], &[("a", b"a")]);
    let mut d = Daemon::start(&shipper_bin(), &cfg, &[]);
    let ops = d.metrics_addr().await;
    wait_metric(ops, "cis490_shipper_shipped_total", 2.0).await;
    let checks = heads_of(&heads, "POST /v1/episodes/");
    let puts = heads_of(&heads, "PUT ");
    assert_eq!((checks.len(), puts.len()), (1, 2), "{heads:?}");
    for h in checks.iter().chain(&puts) {
        assert_eq!(
            header(h, "x-cis490-host-commit"),
            Some(first.as_str()),
            "{h}"
        );
        assert_eq!(header(h, "user-agent"), Some(AGENT), "{h}");
    }

    // A `git pull` on the host: the next scan reads the new HEAD, no restart.
    let second = install.commit();
    wait_metric(
        ops,
        &format!("cis490_shipper_build_info{{version=\"{VERSION}\",host_commit=\"{second}\"}}"),
        1.0,
    )
    .await;
    episode::write(&eps, "ep-after-pull", &w.commits[0], &[("b", b"b")]);
    let text = wait_metric(ops, "cis490_shipper_shipped_total", 3.0).await;
    assert_eq!(
        text.matches("cis490_shipper_build_info{").count(),
        1,
        "the old HEAD's series is gone: {text}"
    );
    let last = heads_of(&heads, "PUT /v1/episodes/labhost-01/ep-after-pull");
    assert_eq!(last.len(), 1);
    assert_eq!(
        header(&last[0], "x-cis490-host-commit"),
        Some(second.as_str())
    );
    assert!(
        d.log_text().contains("the install checkout's HEAD changed"),
        "{}",
        d.log_text()
    );
    drop(d);

    // An install root that is no git checkout: no header at all (but the User-Agent).
    let plain = w.path().join("not-a-checkout");
    std::fs::create_dir_all(&plain).unwrap();
    let cfg = w.shipper_config(
        HOST,
        &format!("https://localhost:{}", addr.port()),
        &format!("install_root = \"{}\"\n", plain.display()),
    );
    heads.lock().unwrap().clear();
    episode::write(&eps, "ep-no-checkout", &w.commits[0], &[("c", b"c")]);
    let (code, out, err) = tokio::task::block_in_place(|| shipper(&cfg, &["ping"]));
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("is not a git checkout"), "{out}");
    let (code, _, err) = tokio::task::block_in_place(|| shipper(&cfg, &["once"]));
    assert_eq!(code, 0, "{err}");
    let all = heads.lock().unwrap().clone();
    assert_eq!(all.len(), 2, "ping and one PUT: {all:?}");
    for h in &all {
        assert_eq!(header(h, "x-cis490-host-commit"), None, "{h}");
        assert_eq!(header(h, "user-agent"), Some(AGENT), "{h}");
    }
}

/// Copies the shipper binary to `dir/cis490-shipper`, as an install would place it.
fn install_copy(dir: &Path) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let exe = dir.join("cis490-shipper");
    std::fs::copy(shipper_bin(), &exe).unwrap();
    exe
}

/// `doctor` with the given log file; (exit code, stdout).
fn doctor(cfg: &Path, log: &Path) -> (i32, String) {
    let (code, out, err) = shipper(
        cfg,
        &[
            "doctor",
            "--since",
            "1h",
            "--log-file",
            log.to_str().unwrap(),
        ],
    );
    (code, format!("{out}{err}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_binary_replaced_under_the_daemon_is_reported_once_and_by_doctor() {
    let w = World::new(2);
    let r = start(&w, "").await;
    let url = format!("https://localhost:{}", r.addr.port());
    let config = |host: &str, port: u16| {
        w.shipper_config(
            host,
            &url,
            &format!(
                "install_root = \"{}\"\n[metrics]\nlisten = \"127.0.0.1:{port}\"\n",
                w.repo.path.display()
            ),
        )
    };
    let stale_cfg = config(HOST, free_port());
    let fresh_cfg = config("labhost-02", free_port());
    let stale_exe = install_copy(&w.path().join("stale/bin"));
    let fresh_exe = install_copy(&w.path().join("fresh/bin"));
    for host in [HOST, "labhost-02"] {
        episode::write(
            &w.data_dir(host).join("episodes"),
            "ep-1",
            &w.commits[1],
            &[("a", b"a")],
        );
    }
    let mut stale = Daemon::start(&stale_exe, &stale_cfg, &[]);
    let mut fresh = Daemon::start(&fresh_exe, &fresh_cfg, &[]);
    let stale_ops = stale.metrics_addr().await;
    let fresh_ops = fresh.metrics_addr().await;
    wait_metric(stale_ops, "cis490_shipper_shipped_total", 1.0).await;
    wait_metric(fresh_ops, "cis490_shipper_shipped_total", 1.0).await;
    assert_eq!(
        metric(
            &ops_get(stale_ops, "/metrics").await.1,
            "cis490_shipper_binary_stale"
        ),
        Some(0.0),
        "not replaced yet"
    );

    // Install-style replacement: a new file renamed over the path the daemon started from.
    let new = stale_exe.with_extension("new");
    std::fs::copy(shipper_bin(), &new).unwrap();
    std::fs::rename(&new, &stale_exe).unwrap();
    wait_metric(stale_ops, "cis490_shipper_binary_stale", 1.0).await;
    // A few more scans: still reported once, and the daemon keeps working.
    episode::write(
        &w.data_dir(HOST).join("episodes"),
        "ep-2",
        &w.commits[1],
        &[("b", b"b")],
    );
    wait_metric(stale_ops, "cis490_shipper_shipped_total", 2.0).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let log = stale.log_text();
    let events: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("event=\"stale_binary\""))
        .collect();
    assert_eq!(events.len(), 1, "{log}");
    assert!(events[0].contains("ERROR"), "{}", events[0]);
    assert!(events[0].contains(RESTART), "{}", events[0]);
    assert!(
        events[0].contains(stale_exe.to_str().unwrap()),
        "names the path: {}",
        events[0]
    );
    assert!(
        log.contains(&format!("shipper started version=\"{VERSION}\"")),
        "{log}"
    );

    let fresh_text = ops_get(fresh_ops, "/metrics").await.1;
    assert_eq!(
        metric(&fresh_text, "cis490_shipper_binary_stale"),
        Some(0.0)
    );
    assert!(
        !fresh.log_text().contains("stale_binary"),
        "{}",
        fresh.log_text()
    );

    let (stale_log, fresh_log) = (stale.log.clone(), fresh.log.clone());
    let empty = w.path().join("empty.log");
    std::fs::write(&empty, "").unwrap();
    let (code, out) = tokio::task::block_in_place(|| doctor(&stale_cfg, &stale_log));
    assert_eq!(code, 1, "{out}");
    let red = out
        .lines()
        .find(|l| l.starts_with("FAIL") && l.contains("daemon"))
        .unwrap_or_else(|| panic!("no red daemon row:\n{out}"));
    assert!(red.contains("binary was replaced"), "{red}");
    assert!(out.contains(&format!("fix: {RESTART}")), "{out}");
    assert!(
        out.contains(&format!("cis490-shipper version {VERSION}")),
        "{out}"
    );
    assert!(out.contains(&format!("pid {}", stale.child.id())), "{out}");
    // Each source alone is enough: the daemon's /metrics without a log ...
    let (code, out) = tokio::task::block_in_place(|| doctor(&stale_cfg, &empty));
    assert_eq!(code, 1, "{out}");
    assert!(out.contains(&format!("fix: {RESTART}")), "{out}");
    // ... and the log without a listener to ask.
    let no_listen = w.path().join("no-listen.toml");
    let text = std::fs::read_to_string(&stale_cfg).unwrap();
    std::fs::write(
        &no_listen,
        text.replace(&format!("127.0.0.1:{}", stale_ops.port()), ""),
    )
    .unwrap();
    let (code, out) = tokio::task::block_in_place(|| doctor(&no_listen, &stale_log));
    assert_eq!(code, 1, "{out}");
    assert!(out.contains(&format!("fix: {RESTART}")), "{out}");

    // The untouched daemon: doctor is clean and shows what runs.
    let (code, out) = tokio::task::block_in_place(|| doctor(&fresh_cfg, &fresh_log));
    assert_eq!(
        crate::support::doctor_code_on_roomy_disk(code, &out, w.path()),
        0,
        "{out}"
    );
    assert!(!out.contains(RESTART), "{out}");
    assert!(
        out.contains(&format!("answering on 127.0.0.1:{}", fresh_ops.port())),
        "{out}"
    );
    assert!(
        out.contains(&format!("HEAD of {}) is admitted", w.repo.path.display())),
        "{out}"
    );
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthz_turns_503_while_an_upload_is_stalled() {
    let w = World::new(1);
    let addr = stalled_receiver(&w).await;
    let cfg = w.shipper_config(
        HOST,
        &format!("https://localhost:{}", addr.port()),
        "[shipping]\nzstd_level = 1\n",
    );
    // A 1 s watchdog makes the health window 1 s (without it, 180 s).
    let mut d = Daemon::start(&shipper_bin(), &cfg, &[("WATCHDOG_USEC", "1000000")]);
    let ops = d.metrics_addr().await;
    let (status, body) = ops_get(ops, "/healthz").await;
    assert_eq!(status, 200, "idle is healthy: {body}");

    let noise = episode::body(&w.path().join("n"), "n", &w.commits[0], 24 << 20);
    episode::write(
        &w.data_dir(HOST).join("episodes"),
        "ep-big",
        &w.commits[0],
        &[("noise", &noise.bytes)],
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    let body = loop {
        let (status, body) = ops_get(ops, "/healthz").await;
        if status == 503 {
            break body;
        }
        assert!(Instant::now() < deadline, "never unhealthy: {body}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let j: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(j["ok"], false);
    assert!(
        j["problems"][0]
            .as_str()
            .unwrap()
            .contains("an upload has sent no bytes"),
        "{body}"
    );
    let text = ops_get(ops, "/metrics").await.1;
    let in_flight = metric(&text, "cis490_shipper_upload_bytes_in_flight").unwrap();
    assert!(
        in_flight > 1_000_000.0,
        "the stalled body is in flight: {text}"
    );
}

/// Runs a shipper command that must exit at once; (exit code, stderr).
fn must_exit(cfg: &Path, command: &str) -> (Option<i32>, String) {
    let err = cfg.with_extension("err");
    let mut child = Command::new(shipper_bin())
        .arg("--config")
        .arg(cfg)
        .arg(command)
        .env_remove("NOTIFY_SOCKET")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(std::fs::File::create(&err).unwrap()))
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let code = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st.code();
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    (code, std::fs::read_to_string(&err).unwrap_or_default())
}

#[test]
fn metrics_config_errors_exit_2_naming_the_key() {
    let w = World::new(1);
    let plain = w.path().join("plain");
    std::fs::write(&plain, b"not a directory").unwrap();
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken = busy.local_addr().unwrap();
    let cases = [
        (
            format!(
                "textfile = \"{}\"",
                w.path().join("missing/cis490.prom").display()
            ),
            "metrics.textfile",
            "cannot write in",
        ),
        (
            // Even root cannot create a file under a regular file.
            format!("textfile = \"{}\"", plain.join("cis490.prom").display()),
            "metrics.textfile",
            "cannot write in",
        ),
        (
            "textfile = \"cis490.prom\"".to_string(),
            "metrics.textfile",
            "absolute",
        ),
        (
            "listen = \"nonsense\"".to_string(),
            "metrics.listen",
            "nonsense",
        ),
        (
            format!("listen = \"{taken}\""),
            "metrics.listen",
            "failed to listen on",
        ),
    ];
    for (i, (line, key, why)) in cases.iter().enumerate() {
        let cfg = w.shipper_config(
            &format!("labhost-{i:02}"),
            "https://localhost:1",
            &format!("[metrics]\n{line}\n"),
        );
        let (code, err) = must_exit(&cfg, "run");
        assert_eq!(code, Some(2), "{line}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{line}: one line: {err}");
        assert!(
            err.contains(&format!(": {key}: ")) && err.contains(why),
            "{line}: {err}"
        );
        assert!(err.contains(cfg.to_str().unwrap()), "names the file: {err}");
    }
    // `once` serves nothing, so a taken port does not stop it; a bad textfile does.
    let cfg = w.shipper_config(
        "labhost-once",
        "https://localhost:1",
        &format!("[metrics]\nlisten = \"{taken}\"\n"),
    );
    assert_eq!(must_exit(&cfg, "once").0, Some(0));
    let cfg = w.shipper_config(
        "labhost-once",
        "https://localhost:1",
        &format!(
            "[metrics]\ntextfile = \"{}\"\n",
            plain.join("x.prom").display()
        ),
    );
    assert_eq!(must_exit(&cfg, "once").0, Some(2));
}
