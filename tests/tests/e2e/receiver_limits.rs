//! Limits: early answers that read no body, size caps, concurrency, slow clients.

use std::process::Command;
use std::time::{Duration, Instant};

use cis490_tests::episode;
use cis490_tests::harness::World;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::support::{files_under, metric_value, start};

const HOST: &str = "labhost-01";

/// curl with the lab host's certificate; returns (http status, body, curl's verbose log).
fn curl(w: &World, url: &str, args: &[&str]) -> (u16, String, String) {
    let me = w.pki.client(HOST);
    let out = Command::new("curl")
        // Expect: 100-continue is the HTTP/1.1 mechanism; see docs/receiver.md for curl over h2.
        .args([
            "-sS",
            "-v",
            "--http1.1",
            "--max-time",
            "20",
            "-o",
            "-",
            "-w",
            "\n%{http_code}",
        ])
        .arg("--cacert")
        .arg(&w.pki.ca_file)
        .arg("--cert")
        .arg(&me.cert)
        .arg("--key")
        .arg(&me.key)
        .args(args)
        .arg(url)
        .output()
        .expect("curl runs");
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let (body, code) = stdout.rsplit_once('\n').unwrap_or(("", "0"));
    (
        code.trim().parse().unwrap_or(0),
        body.to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expect_100_continue_rejection_uploads_nothing() {
    let w = World::new(3);
    let r = start(&w, "[limits]\nmax_body_bytes = 1000000\n").await;
    // A 4 MB body with a commit the gate does not know.
    let stale = "b".repeat(40);
    let big = w.path().join("big.tar.zst");
    std::fs::write(&big, vec![1u8; 4_000_000]).unwrap();
    let url = format!(
        "https://localhost:{}/v1/episodes/{HOST}/ep-big",
        r.addr.port()
    );
    let args: Vec<String> = vec![
        "-T".into(),
        big.to_string_lossy().into_owned(),
        "-H".into(),
        "Expect: 100-continue".into(),
        "-H".into(),
        format!("X-Cis490-Code-Commit: {stale}"),
        "-H".into(),
        format!("X-Cis490-Tar-SHA256: {}", "0".repeat(64)),
        "-H".into(),
        "Content-Type: application/zstd".into(),
    ];
    let (code, body, log) = tokio::task::block_in_place(|| {
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        curl(&w, &url, &refs)
    });
    assert_eq!(code, 413, "{body}\n{log}");
    assert!(body.contains("too_large"));
    assert!(
        !log.contains("HTTP/1.1 100"),
        "no 100 Continue was sent:\n{log}"
    );
    assert_eq!(
        metric_value(&r, "cis490_receiver_body_bytes_read_total").await,
        0.0
    );
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_commit_with_expect_continue_reads_no_body_bytes() {
    let w = World::new(3);
    let r = start(&w, "").await;
    let big = w.path().join("big.tar.zst");
    std::fs::write(&big, vec![1u8; 2_000_000]).unwrap();
    let url = format!(
        "https://localhost:{}/v1/episodes/{HOST}/ep-big",
        r.addr.port()
    );
    let args: Vec<String> = vec![
        "-T".into(),
        big.to_string_lossy().into_owned(),
        "-H".into(),
        "Expect: 100-continue".into(),
        "-H".into(),
        format!("X-Cis490-Code-Commit: {}", "b".repeat(40)),
        "-H".into(),
        format!("X-Cis490-Tar-SHA256: {}", "0".repeat(64)),
    ];
    let (code, body, log) = tokio::task::block_in_place(|| {
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        curl(&w, &url, &refs)
    });
    assert_eq!(code, 412, "{body}\n{log}");
    assert!(body.contains("commit_not_in_window"));
    assert!(body.contains("remediation"));
    assert!(!log.contains("HTTP/1.1 100"), "{log}");
    assert_eq!(
        metric_value(&r, "cis490_receiver_body_bytes_read_total").await,
        0.0
    );
    // The same request with a current commit gets 100 Continue and is read.
    let good = episode::body(&w.path().join("src"), "ep-ok", &w.commits[2], 10_000);
    let f = w.path().join("ok.tar.zst");
    std::fs::write(&f, &good.bytes).unwrap();
    let url = format!(
        "https://localhost:{}/v1/episodes/{HOST}/ep-ok",
        r.addr.port()
    );
    let args: Vec<String> = vec![
        "-T".into(),
        f.to_string_lossy().into_owned(),
        "-H".into(),
        "Expect: 100-continue".into(),
        "-H".into(),
        format!("X-Cis490-Code-Commit: {}", good.commit),
        "-H".into(),
        format!("X-Cis490-Tar-SHA256: {}", good.sha),
    ];
    let (code, body, _) = tokio::task::block_in_place(|| {
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        curl(&w, &url, &refs)
    });
    assert_eq!(code, 201, "{body}");
    assert_eq!(
        metric_value(&r, "cis490_receiver_body_bytes_read_total").await,
        good.bytes.len() as f64
    );
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunked_upload_gets_411_and_big_uncompressed_gets_413() {
    let w = World::new(1);
    let r = start(&w, "[limits]\nmax_uncompressed_bytes = 100000\n").await;
    let b = episode::body(&w.path().join("src"), "ep1", &w.commits[0], 1_000);
    let f = w.path().join("b.tar.zst");
    std::fs::write(&f, &b.bytes).unwrap();
    let url = format!("https://localhost:{}/v1/episodes/{HOST}/ep1", r.addr.port());
    let args: Vec<String> = vec![
        "-T".into(),
        f.to_string_lossy().into_owned(),
        "-H".into(),
        "Transfer-Encoding: chunked".into(),
        "-H".into(),
        format!("X-Cis490-Code-Commit: {}", b.commit),
        "-H".into(),
        format!("X-Cis490-Tar-SHA256: {}", b.sha),
    ];
    let (code, body, _) = tokio::task::block_in_place(|| {
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        curl(&w, &url, &refs)
    });
    assert_eq!(code, 411, "{body}");
    assert!(body.contains("length_required"));

    // A tiny body that inflates past the limit: the zstd bomb stops early with 413.
    let zeros = vec![0u8; 5_000_000];
    let dir = episode::write(
        &w.path().join("bomb"),
        "ep-bomb",
        &w.commits[0],
        &[("zeros", &zeros)],
    );
    let (p, bytes) = episode::pack(&dir, "ep-bomb");
    assert!(bytes.len() < 10_000, "the bomb is small on the wire");
    let bomb = episode::Body {
        id: "ep-bomb".into(),
        commit: w.commits[0].clone(),
        sha: p.tar_sha256,
        bytes,
    };
    let reply = w.client(r.addr, HOST).put(HOST, &bomb).await;
    assert_eq!((reply.status, reply.error().as_str()), (413, "too_large"));
    assert!(files_under(&w.store_dir().join("episodes")).is_empty());
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_upload_slots_answer_503_overloaded() {
    let w = World::new(1);
    let r = start(
        &w,
        "[limits]\nmax_concurrent_uploads = 1\nbody_idle_timeout_s = 30\n",
    )
    .await;
    let b = episode::body(&w.path().join("src"), "ep-slow", &w.commits[0], 10_000);
    // Hold the only slot: headers and half the body, then wait.
    let mut slow = raw_tls(&w, r.addr).await;
    let head = format!(
        "PUT /v1/episodes/{HOST}/ep-slow HTTP/1.1\r\nhost: localhost\r\ncontent-length: {}\r\nx-cis490-code-commit: {}\r\nx-cis490-tar-sha256: {}\r\n\r\n",
        b.bytes.len(),
        b.commit,
        b.sha
    );
    slow.write_all(head.as_bytes()).await.unwrap();
    slow.write_all(&b.bytes[..5_000]).await.unwrap();
    slow.flush().await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while metric_value(&r, "cis490_receiver_uploads_in_flight").await < 1.0 {
        assert!(Instant::now() < deadline, "upload never started");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let other = episode::body(&w.path().join("src"), "ep-other", &w.commits[0], 100);
    let reply = w.client(r.addr, HOST).put(HOST, &other).await;
    assert_eq!((reply.status, reply.error().as_str()), (503, "overloaded"));
    assert_eq!(reply.headers["retry-after"], "5");
    // Finishing the slow upload frees the slot.
    slow.write_all(&b.bytes[5_000..]).await.unwrap();
    let mut resp = vec![0u8; 1024];
    let n = slow.read(&mut resp).await.unwrap();
    assert!(String::from_utf8_lossy(&resp[..n]).starts_with("HTTP/1.1 201"));
    assert_eq!(w.client(r.addr, HOST).put(HOST, &other).await.status, 201);
    r.stop().await;
}

async fn raw_tls(
    w: &World,
    addr: std::net::SocketAddr,
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    cis490_tests::client::raw_tls(addr, &w.pki.ca_file, &w.pki.client(HOST)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_clients_cannot_hold_a_slot() {
    let w = World::new(1);
    let r = start(
        &w,
        "[limits]\nheader_timeout_s = 1\nbody_idle_timeout_s = 1\nmax_concurrent_uploads = 1\n",
    )
    .await;
    // Slowloris: half a request line, then silence. The server hangs up.
    let mut s = raw_tls(&w, r.addr).await;
    s.write_all(b"PUT /v1/episodes/labhost-01/x HTTP/1.1\r\nhost: loc")
        .await
        .unwrap();
    let started = Instant::now();
    let mut buf = [0u8; 512];
    let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf))
        .await
        .expect("server hung up");
    assert!(
        matches!(n, Ok(0) | Err(_)) || String::from_utf8_lossy(&buf[..n.unwrap()]).contains("408")
    );
    assert!(started.elapsed() < Duration::from_secs(5));

    // Slow body: headers, a few bytes, silence. The upload is abandoned and the slot freed.
    let b = episode::body(&w.path().join("src"), "ep-stall", &w.commits[0], 10_000);
    let mut s = raw_tls(&w, r.addr).await;
    let head = format!(
        "PUT /v1/episodes/{HOST}/ep-stall HTTP/1.1\r\nhost: localhost\r\ncontent-length: {}\r\nx-cis490-code-commit: {}\r\nx-cis490-tar-sha256: {}\r\n\r\n",
        b.bytes.len(), b.commit, b.sha
    );
    s.write_all(head.as_bytes()).await.unwrap();
    s.write_all(&b.bytes[..100]).await.unwrap();
    let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf))
        .await
        .expect("answered")
        .unwrap_or(0);
    let text = String::from_utf8_lossy(&buf[..n]).to_string();
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(text.contains("body_timeout"));
    assert!(
        files_under(&w.store_dir().join("tmp")).is_empty(),
        "temp file removed"
    );
    assert!(files_under(&w.store_dir().join("episodes")).is_empty());
    assert_eq!(
        w.client(r.addr, HOST).put(HOST, &b).await.status,
        201,
        "slot is free again"
    );
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_early_answer_reaches_a_client_still_sending_its_body() {
    // Without Expect: 100-continue the client streams the body while the 412 is sent; the
    // receiver drains small bodies so the client reads the answer, not a reset.
    let w = World::new(2);
    let r = start(&w, "").await;
    let c = w.client(r.addr, HOST);
    let stale = episode::body(
        &w.path().join("src"),
        "ep-stale",
        &"a".repeat(40),
        1_500_000,
    );
    for _ in 0..5 {
        let reply = c.put(HOST, &stale).await;
        assert_eq!(reply.status, 412);
        assert_eq!(reply.error(), "commit_not_in_window");
    }
    assert_eq!(
        metric_value(&r, "cis490_receiver_body_bytes_read_total").await,
        0.0,
        "drained bytes are not ingested"
    );
    assert!(files_under(&w.store_dir().join("tmp")).is_empty());
    r.stop().await;
}

/// The load harness in CI, bounded: 64 connections uploading for 5 s beside 16 slowloris
/// clients; every request answered, none failed, file descriptors back down afterwards.
#[test]
fn held_load_with_slowloris_clients_has_no_errors() {
    let out = std::process::Command::new(cis490_tests::harness::bin("e2e-bench"))
        .args(["load", "5"])
        .env("CIS490_LOG", "warn")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = text
        .lines()
        .find(|l| l.starts_with("load "))
        .expect("a load line");
    println!("{line}");
    let field = |name: &str| -> f64 {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(&format!("{name}=")))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in {line}"))
    };
    assert_eq!(field("errors"), 0.0, "{line}");
    assert!(field("stored") >= 64.0, "{line}");
    assert!(
        field("open_fds_after") < 64.0,
        "slow and finished connections are closed: {line}"
    );
}

/// Sixteen lab hosts as sixteen real shipper daemons (own certificates, own data dirs) against
/// one receiver that admits 4 uploads at a time: the surplus is refused 503 and retried, and in
/// the end every episode is shipped once, stored once, byte for byte.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_of_shipper_processes_drains_through_a_busy_receiver() {
    let w = World::new(2);
    let r = cis490_tests::fleet::run(
        &w,
        16,
        8,
        "[limits]\nmax_concurrent_uploads = 4\n",
        cis490_tests::harness::crash_seed(),
        Duration::from_secs(150),
    )
    .await;
    println!("{r}");
    assert_eq!(
        (r.lost, r.duplicated, r.corrupted, r.quarantined),
        (0, 0, 0, 0),
        "{r}"
    );
    assert!(r.refused_busy > 0, "the upload limit was reached: {r}");
    assert!(r.receiver_fds_after < 64, "{r}");
}
