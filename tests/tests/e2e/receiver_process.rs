//! The real receiver binary: notify protocol, signals, SIGKILL mid-upload, repair, reindex,
//! config errors and a full disk.

use std::os::unix::net::UnixDatagram;
use std::process::Command;
use std::time::{Duration, Instant};

use cis490_tests::episode;
use cis490_tests::harness::{receiver_bin, Process, World};
use nix::sys::signal::Signal;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::support::{files_under, index_rows};

const HOST: &str = "labhost-01";

struct NotifySocket {
    sock: UnixDatagram,
    path: std::path::PathBuf,
}

impl NotifySocket {
    fn new(dir: &std::path::Path) -> NotifySocket {
        let path = dir.join("notify.sock");
        let sock = UnixDatagram::bind(&path).unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        NotifySocket { sock, path }
    }

    /// Collects messages until `pred` matches one or `limit` passes; returns all seen.
    fn until(&self, limit: Duration, pred: impl Fn(&str) -> bool) -> (bool, Vec<String>) {
        let deadline = Instant::now() + limit;
        let mut seen = Vec::new();
        let mut buf = [0u8; 4096];
        while Instant::now() < deadline {
            if let Ok(n) = self.sock.recv(&mut buf) {
                let m = String::from_utf8_lossy(&buf[..n]).to_string();
                let hit = pred(&m);
                seen.push(m);
                if hit {
                    return (true, seen);
                }
            }
        }
        (false, seen)
    }
}

async fn raw_tls(
    w: &World,
    addr: std::net::SocketAddr,
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    cis490_tests::client::raw_tls(addr, &w.pki.ca_file, &w.pki.client(HOST)).await
}

/// The head of a whole upload of `b` by `labhost-01`, for raw HTTP/1.1 requests.
pub(crate) fn put_head(b: &episode::Body) -> String {
    format!(
        "PUT /v1/episodes/{HOST}/{} HTTP/1.1\r\nhost: localhost\r\ncontent-length: {}\r\nx-cis490-code-commit: {}\r\nx-cis490-tar-sha256: {}\r\n\r\n",
        b.id,
        b.bytes.len(),
        b.commit,
        b.sha
    )
}

async fn server_cert_der(w: &World, addr: std::net::SocketAddr) -> Vec<u8> {
    let s = raw_tls(w, addr).await;
    s.get_ref().1.peer_certificates().unwrap()[0].to_vec()
}

fn pem_der(path: &std::path::Path) -> Vec<u8> {
    cis490_common::tls::load_certs(path).unwrap()[0].to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notify_ready_watchdog_reload_and_stop() {
    let w = World::new(2);
    let cfg = w.config("");
    let n = NotifySocket::new(w.path());
    let mut p = Process::start(
        &cfg,
        &[
            ("NOTIFY_SOCKET", n.path.to_str().unwrap()),
            ("WATCHDOG_USEC", "1000000"),
        ],
    );
    let (ready, seen) = n.until(Duration::from_secs(10), |m| m.contains("READY=1"));
    assert!(ready, "{seen:?}");
    let (_, seen) = n.until(Duration::from_millis(2200), |_| false);
    let pings = seen.iter().filter(|m| m.contains("WATCHDOG=1")).count();
    assert!(pings >= 3, "WATCHDOG=1 about every 0.5 s, got {seen:?}");

    // An upload in flight across the reload must still complete.
    let b = episode::body(&w.path().join("src"), "ep-reload", &w.commits[1], 50_000);
    let mut inflight = raw_tls(&w, p.addr).await;
    inflight.write_all(put_head(&b).as_bytes()).await.unwrap();
    inflight.write_all(&b.bytes[..1000]).await.unwrap();
    inflight.flush().await.unwrap();

    let old = server_cert_der(&w, p.addr).await;
    assert_eq!(old, pem_der(&w.server.cert));
    let fresh = w.pki.server("server2");
    std::fs::copy(&fresh.cert, &w.server.cert).unwrap();
    std::fs::copy(&fresh.key, &w.server.key).unwrap();
    p.signal(Signal::SIGHUP);
    let (reloaded, seen) = n.until(Duration::from_secs(5), |m| m.contains("RELOADING=1"));
    assert!(reloaded, "{seen:?}");
    let msg = seen.last().unwrap();
    assert!(msg.contains("MONOTONIC_USEC="), "{msg}");
    let (ready, seen) = n.until(Duration::from_secs(5), |m| m.contains("READY=1"));
    assert!(ready, "{seen:?}");
    assert_eq!(
        server_cert_der(&w, p.addr).await,
        pem_der(&fresh.cert),
        "new handshakes see the new certificate"
    );

    inflight.write_all(&b.bytes[1000..]).await.unwrap();
    let mut buf = vec![0u8; 2048];
    let got = inflight.read(&mut buf).await.unwrap();
    assert!(
        String::from_utf8_lossy(&buf[..got]).starts_with("HTTP/1.1 201"),
        "{}",
        String::from_utf8_lossy(&buf[..got])
    );

    p.signal(Signal::SIGTERM);
    let (stopping, seen) = n.until(Duration::from_secs(5), |m| m.contains("STOPPING=1"));
    assert!(stopping, "{seen:?}");
    assert_eq!(p.wait_exit(Duration::from_secs(10)), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_a_stalled_upload_still_exits_within_ten_seconds() {
    let w = World::new(1);
    let mut p = Process::start(&w.config(""), &[]);
    let b = episode::body(&w.path().join("src"), "ep-stuck", &w.commits[0], 50_000);
    let mut s = raw_tls(&w, p.addr).await;
    s.write_all(put_head(&b).as_bytes()).await.unwrap();
    s.write_all(&b.bytes[..500]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let t = Instant::now();
    p.signal(Signal::SIGTERM);
    assert_eq!(p.wait_exit(Duration::from_secs(12)), Some(0));
    assert!(
        t.elapsed() < Duration::from_secs(10),
        "took {:?}",
        t.elapsed()
    );
    assert!(files_under(&w.store_dir().join("episodes")).is_empty());
    assert!(
        files_under(&w.store_dir().join("quarantine")).is_empty(),
        "an aborted upload is not quarantined"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_upload_leaves_no_partial_file_and_reupload_works() {
    let w = World::new(1);
    let cfg = w.config("");
    let b = episode::body(&w.path().join("src"), "ep-kill", &w.commits[0], 2_000_000);
    let done = episode::body(&w.path().join("src"), "ep-done", &w.commits[0], 1000);
    let mut p = Process::start(&cfg, &[]);
    assert_eq!(w.client(p.addr, HOST).put(HOST, &done).await.status, 201);
    let mut s = raw_tls(&w, p.addr).await;
    s.write_all(put_head(&b).as_bytes()).await.unwrap();
    s.write_all(&b.bytes[..1_000_000]).await.unwrap();
    s.flush().await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while files_under(&w.store_dir().join("tmp")).is_empty() {
        assert!(Instant::now() < deadline, "upload never reached tmp/");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    p.child.kill().unwrap();
    let _ = p.child.wait();
    assert_eq!(
        files_under(&w.store_dir().join("episodes")),
        vec![format!("{HOST}/ep-done.tar.zst")],
        "no partial file under episodes/"
    );
    drop(p);
    let p = Process::start(&cfg, &[]);
    assert!(
        files_under(&w.store_dir().join("tmp")).is_empty(),
        "tmp/ emptied at start"
    );
    let reply = w.client(p.addr, HOST).put(HOST, &b).await;
    assert_eq!(reply.status, 201);
    assert_eq!(
        std::fs::read(
            w.store_dir()
                .join("episodes")
                .join(HOST)
                .join("ep-kill.tar.zst")
        )
        .unwrap(),
        b.bytes
    );
    assert_eq!(index_rows(&w.store_dir()).len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_repairs_missing_index_rows_and_reindex_rebuilds_the_same_rows() {
    let w = World::new(1);
    let cfg = w.config("");
    let p = Process::start(&cfg, &[]);
    for i in 0..3 {
        let b = episode::body(
            &w.path().join("src"),
            &format!("ep-{i}"),
            &w.commits[0],
            5000 + i,
        );
        assert_eq!(w.client(p.addr, HOST).put(HOST, &b).await.status, 201);
    }
    drop(p);
    let before = index_rows(&w.store_dir());
    assert_eq!(before.len(), 3);
    // A crash between the link and the index append: the last row never made it.
    let index = w.store_dir().join("index.jsonl");
    let text = std::fs::read_to_string(&index).unwrap();
    let mut lines: Vec<&str> = text.lines().collect();
    lines.pop();
    // ...and a torn half-row from the append that was under way.
    std::fs::write(&index, format!("{}\n{{\"ts\":\"2026", lines.join("\n"))).unwrap();
    let p = Process::start(&cfg, &[]);
    let after = index_rows(&w.store_dir());
    assert_eq!(after.len(), 3, "the missing row was repaired");
    let key = |r: &serde_json::Value| r["episode_id"].as_str().unwrap().to_string();
    let strip = |mut r: serde_json::Value| {
        r.as_object_mut().unwrap().remove("ts");
        r
    };
    let mut a: Vec<_> = after.iter().cloned().map(strip).collect();
    let mut b: Vec<_> = before.iter().cloned().map(strip).collect();
    a.sort_by_key(key);
    b.sort_by_key(key);
    assert_eq!(a, b);
    drop(p);

    std::fs::remove_file(&index).unwrap();
    let out = Command::new(receiver_bin())
        .arg("--config")
        .arg(&cfg)
        .arg("reindex")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("reindexed 3 episode(s)"));
    let mut c: Vec<_> = index_rows(&w.store_dir()).into_iter().map(strip).collect();
    c.sort_by_key(key);
    assert_eq!(c, b, "reindex gives the same rows");

    let out = Command::new(receiver_bin())
        .arg("--config")
        .arg(&cfg)
        .arg("export-index")
        .output()
        .unwrap();
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stdout).lines().count(), 3);
}

#[test]
fn config_errors_exit_2_with_one_line_naming_file_and_key() {
    let w = World::new(1);
    let cfg = w.config("[limits]\nmax_body_byte = 5\n");
    let out = Command::new(receiver_bin())
        .arg("--config")
        .arg(&cfg)
        .arg("check-config")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(
        err.contains(cfg.to_str().unwrap()) && err.contains("max_body_byte"),
        "{err}"
    );

    let cfg = w.config("");
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("receiver.pem", "missing.pem");
    std::fs::write(&cfg, text).unwrap();
    let out = Command::new(receiver_bin())
        .arg("--config")
        .arg(&cfg)
        .arg("serve")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("tls.cert_file") && err.contains("missing.pem"),
        "{err}"
    );

    let out = Command::new(receiver_bin())
        .arg("check-config")
        .env("CIS490_RECEIVER_CONFIG", w.config(""))
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let out = Command::new(receiver_bin())
        .arg("--config")
        .arg(w.path().join("nope.toml"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let out = Command::new(receiver_bin())
        .arg("--bogus")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let out = Command::new(receiver_bin())
        .arg("--version")
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains(env!("CARGO_PKG_VERSION")));
}

#[test]
fn gate_command_prints_the_allow_list_view() {
    let w = World::new(4);
    let out = Command::new(receiver_bin())
        .arg("--config")
        .arg(w.config(""))
        .arg("gate")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(text.contains("source:     git"), "{text}");
    assert!(
        text.contains(&format!("head:       {}", w.commits[3])),
        "{text}"
    );
    assert!(text.contains("commits:    4 (window 100)"), "{text}");
    let bad = w.config(&format!(
        "[version_gate]\nrepo_path = \"{}\"\n",
        w.path().join("none").display()
    ));
    let out = Command::new(receiver_bin())
        .arg("--config")
        .arg(bad)
        .arg("gate")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("last_error: failed to open git repository")
    );
}

/// Runs the receiver in its own mount namespace with a small tmpfs as its store.
fn start_on_small_disk(w: &World, size: &str) -> Option<Process> {
    start_on_small_disk_with(w, size, "")
}

/// The receiver with its store on a tmpfs of `size` in its own mount namespace (`None` where
/// no namespace can be made); `extra` is added to its config.
pub(crate) fn start_on_small_disk_with(w: &World, size: &str, extra: &str) -> Option<Process> {
    let probe = Command::new("unshare").args(["-m", "true"]).status();
    if !matches!(probe, Ok(s) if s.success()) {
        eprintln!("SKIP: cannot create a mount namespace here");
        return None;
    }
    let store = w.store_dir();
    std::fs::create_dir_all(&store).unwrap();
    let cfg = w.config(extra);
    let wrapper = w.path().join("small-disk.sh");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\nset -e\nmount --make-rprivate / 2>/dev/null || true\nmount -t tmpfs -o size={size} tmpfs '{}'\nexec '{}' \"$@\"\n",
            store.display(),
            receiver_bin().display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(
        &wrapper,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    Some(Process::start_with(
        Command::new("unshare").arg("-m").arg(&wrapper),
        &cfg,
        &[],
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_free_space_check_counts_the_uploads_in_flight() {
    let w = World::new(1);
    let Some(p) = start_on_small_disk(&w, "1m") else {
        return;
    };
    // Each fits the empty disk alone; together they do not (SPEC §16).
    let x = episode::body(&w.path().join("src"), "ep-x", &w.commits[0], 600_000);
    let y = episode::body(&w.path().join("src"), "ep-y", &w.commits[0], 600_000);
    let mut sx = raw_tls(&w, p.addr).await;
    sx.write_all(put_head(&x).as_bytes()).await.unwrap();
    sx.write_all(&x.bytes[..1000]).await.unwrap();
    sx.flush().await.unwrap();
    // Wait until x holds its slot.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (_, m) = cis490_tests::harness::ops_get(p.ops_addr, "/metrics").await;
        if cis490_tests::harness::metric(&m, "cis490_receiver_uploads_in_flight") == Some(1.0) {
            break;
        }
        assert!(Instant::now() < deadline, "x never started");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // y is answered from its headers alone: nothing of its body is sent.
    let mut sy = raw_tls(&w, p.addr).await;
    sy.write_all(put_head(&y).as_bytes()).await.unwrap();
    let mut by = vec![0u8; 4096];
    let ny = tokio::time::timeout(Duration::from_secs(5), sy.read(&mut by))
        .await
        .expect("y answered without its body")
        .unwrap();
    let ay = String::from_utf8_lossy(&by[..ny]).to_string();
    assert!(ay.starts_with("HTTP/1.1 507"), "{ay}");
    assert!(ay.contains("promised to uploads in progress"), "{ay}");
    // x completes: what it was promised was there.
    sx.write_all(&x.bytes[1000..]).await.unwrap();
    let mut bx = vec![0u8; 4096];
    let nx = sx.read(&mut bx).await.unwrap();
    assert!(String::from_utf8_lossy(&bx[..nx]).starts_with("HTTP/1.1 201"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_answers_507_and_leaves_nothing_partial() {
    let w = World::new(1);
    let Some(p) = start_on_small_disk(&w, "1m") else {
        return;
    };
    let c = w.client(p.addr, HOST);
    let first = episode::body(&w.path().join("src"), "ep-a", &w.commits[0], 600_000);
    assert_eq!(c.put(HOST, &first).await.status, 201);
    // Too big for what is left: refused from the headers alone.
    let big = episode::body(&w.path().join("src"), "ep-b", &w.commits[0], 600_000);
    let reply = c.put(HOST, &big).await;
    assert_eq!(
        (reply.status, reply.error().as_str()),
        (507, "insufficient_storage"),
        "{:?}",
        reply.json()
    );
    // Two that each fit alone but not together: one runs out of space mid-stream.
    let x = episode::body(&w.path().join("src"), "ep-x", &w.commits[0], 250_000);
    let y = episode::body(&w.path().join("src"), "ep-y", &w.commits[0], 250_000);
    let mut sx = raw_tls(&w, p.addr).await;
    let mut sy = raw_tls(&w, p.addr).await;
    sx.write_all(put_head(&x).as_bytes()).await.unwrap();
    sy.write_all(put_head(&y).as_bytes()).await.unwrap();
    sx.write_all(&x.bytes).await.unwrap();
    sy.write_all(&y.bytes).await.unwrap();
    let mut bx = vec![0u8; 4096];
    let mut by = vec![0u8; 4096];
    let nx = sx.read(&mut bx).await.unwrap_or(0);
    let ny = sy.read(&mut by).await.unwrap_or(0);
    let ax = String::from_utf8_lossy(&bx[..nx]).to_string();
    let ay = String::from_utf8_lossy(&by[..ny]).to_string();
    let statuses = [&ax, &ay].map(|a| a.split_whitespace().nth(1).unwrap_or("").to_string());
    assert!(statuses.contains(&"507".to_string()), "{ax}\n{ay}");
    // What the receiver sees of its store, through its own mount namespace.
    let root = std::path::PathBuf::from(format!("/proc/{}/root", p.child.id()));
    let store = root.join(w.store_dir().strip_prefix("/").unwrap());
    let tmp = files_under(&store.join("tmp"));
    assert!(tmp.is_empty(), "no temp files left: {tmp:?}");
    for f in files_under(&store.join("episodes")) {
        let id = f
            .rsplit('/')
            .next()
            .unwrap()
            .trim_end_matches(".tar.zst")
            .to_string();
        let want = [&first, &x, &y].into_iter().find(|b| b.id == id).unwrap();
        assert_eq!(
            std::fs::read(store.join("episodes").join(&f)).unwrap(),
            want.bytes,
            "{f} intact"
        );
    }
    let small = episode::body(&w.path().join("src"), "ep-small", &w.commits[0], 1000);
    assert_eq!(
        c.put(HOST, &small).await.status,
        201,
        "still serving after a full disk"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_receiver_per_store_and_no_reindex_under_a_running_one() {
    let w = World::new(1);
    let cfg = w.config("");
    let p = Process::start(&cfg, &[]);
    let b = episode::body(&w.path().join("src"), "ep-1", &w.commits[0], 1000);
    assert_eq!(w.client(p.addr, HOST).put(HOST, &b).await.status, 201);
    let out = Command::new(receiver_bin())
        .arg("--config")
        .arg(&cfg)
        .arg("serve")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("store_dir") && err.contains("in use by another cis490-receiver"),
        "{err}"
    );
    let out = Command::new(receiver_bin())
        .arg("--config")
        .arg(&cfg)
        .arg("reindex")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("in use"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // check-config is safe beside a running receiver: it leaves the store alone.
    std::fs::write(w.store_dir().join("tmp/in-flight.tmp"), b"someone's upload").unwrap();
    let out = Command::new(receiver_bin())
        .arg("--config")
        .arg(&cfg)
        .arg("check-config")
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(w.store_dir().join("tmp/in-flight.tmp").exists());
    assert_eq!(index_rows(&w.store_dir()).len(), 1);
    drop(p);
    let out = Command::new(receiver_bin())
        .arg("--config")
        .arg(&cfg)
        .arg("reindex")
        .output()
        .unwrap();
    assert!(out.status.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receiver_log_lines_carry_event_and_episode() {
    let w = World::new(2);
    let p = Process::start(&w.config(""), &[]);
    let c = w.client(p.addr, HOST);
    let ok = episode::body(&w.path().join("src"), "ep-logged", &w.commits[1], 100);
    assert_eq!(c.put(HOST, &ok).await.status, 201);
    let stale = episode::body(&w.path().join("src"), "ep-refused", &"9".repeat(40), 100);
    assert_eq!(c.put(HOST, &stale).await.status, 412);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let log = p.log_text();
    let stored = log
        .lines()
        .find(|l| l.contains("upload_stored"))
        .expect("upload_stored logged");
    assert!(stored.contains("episode=ep-logged"), "{stored}");
    let refused = log
        .lines()
        .find(|l| l.contains("upload_rejected"))
        .expect("upload_rejected logged");
    assert!(
        refused.contains("episode=ep-refused") && refused.contains("status=412"),
        "{refused}"
    );
}
