//! SPEC §16 against the real receiver: what one compromised lab host (or any network client)
//! can make it spend, and that every other host is still served meanwhile.

use std::io::Write;
use std::time::{Duration, Instant};

use cis490_tests::episode;
use cis490_tests::harness::{metric, ops_get, Process, World};
use cis490_tests::rawtar::{meta, Header, Tar};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::support::{files_under, index_rows, metric_value, start};

const HOST: &str = "labhost-01";
const OTHER: &str = "labhost-02";
const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

fn status_line(resp: &[u8]) -> String {
    String::from_utf8_lossy(resp)
        .lines()
        .next()
        .unwrap_or("")
        .to_string()
}

/// Peak and current resident memory of a process, in KiB.
fn rss_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| {
            l.strip_prefix(field)
                .map(|v| v.trim().trim_end_matches(" kB").trim().parse().unwrap())
        })
        .unwrap()
}

/// User + system CPU seconds a process has used.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f[11].parse::<f64>().unwrap() + f[12].parse::<f64>().unwrap();
    // Linux reports in USER_HZ, 100 on every architecture it runs on here.
    ticks / 100.0
}

fn put_headers(sha: String, len: usize) -> Vec<(&'static str, String)> {
    vec![
        ("x-cis490-code-commit", COMMIT.to_string()),
        ("x-cis490-tar-sha256", sha),
        ("content-type", "application/zstd".to_string()),
        ("content-length", len.to_string()),
    ]
}

/// An episode whose second member is a GNU long-name record declaring `name_mib` MiB of
/// `ep/aaaa...`: a few KB on the wire.
fn long_name_bomb(ep: &str, name_mib: u64) -> Vec<u8> {
    let mut t = Tar::new();
    t.dir(&format!("{ep}/"))
        .file(&format!("{ep}/meta.json"), &meta(ep, COMMIT));
    t.push(
        Header::gnu(b"././@LongLink", b'L', name_mib << 20).finish(),
        b"",
    );
    let mut enc = zstd::stream::write::Encoder::new(Vec::new(), 3).unwrap();
    enc.write_all(&t.0).unwrap();
    let mut chunk = format!("{ep}/").into_bytes();
    chunk.resize(1 << 20, b'a');
    for _ in 0..name_mib {
        enc.write_all(&chunk).unwrap();
        chunk.fill(b'a');
    }
    enc.finish().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_name_bombs_in_parallel_are_refused_at_once_with_bounded_memory() {
    let w = World::new(1);
    let p = Process::start(&w.config("[version_gate]\nenabled = false\n"), &[]);
    let bodies: Vec<Vec<u8>> = (0..8)
        .map(|i| long_name_bomb(&format!("ep-bomb{i}"), 256))
        .collect();
    let size = bodies[0].len();
    println!("long-name bomb: {size} bytes on the wire for a 256 MiB name");
    assert!(size < 300_000, "the bomb is small: {size}");
    let before = rss_kib(p.child.id(), "VmRSS:");
    // The sha header cannot be computed from a stream nobody may decode whole; any well-formed
    // value will do, the body is refused before it matters.
    let sha = "0".repeat(64);
    let mut tasks = Vec::new();
    for (i, body) in bodies.into_iter().enumerate() {
        let c = w.client(p.addr, HOST);
        let sha = sha.clone();
        tasks.push(tokio::spawn(async move {
            let started = Instant::now();
            let headers = put_headers(sha, body.len());
            let reply = c
                .request(
                    "PUT",
                    &format!("/v1/episodes/{HOST}/ep-bomb{i}"),
                    &headers,
                    body,
                )
                .await
                .unwrap();
            (reply, started.elapsed())
        }));
    }
    // Another host is served while the bombs land.
    let good = episode::body(&w.path().join("src"), "ep-fine", COMMIT, 50_000);
    let honest = w.client(p.addr, OTHER).put(OTHER, &good).await;
    assert_eq!(honest.status, 201, "{:?}", honest.json());
    for t in tasks {
        let (reply, took) = t.await.unwrap();
        assert_eq!(
            reply.status,
            422,
            "{}",
            String::from_utf8_lossy(&reply.body)
        );
        let msg = reply.json()["message"].as_str().unwrap().to_string();
        assert!(msg.contains("long-name record declares"), "{msg}");
        assert!(
            msg.len() < 400,
            "the message quotes no huge name: {} bytes",
            msg.len()
        );
        assert!(
            took < Duration::from_secs(1),
            "refused within a second, took {took:?}"
        );
    }
    let peak = rss_kib(p.child.id(), "VmHWM:");
    println!(
        "8 long-name bombs: receiver RSS before {} MiB, peak {} MiB",
        before / 1024,
        peak / 1024
    );
    assert!(peak < 64 * 1024, "receiver peak RSS {peak} KiB");
    assert!(files_under(&w.store_dir().join("tmp")).is_empty());
    let rows = index_rows(&w.store_dir());
    assert_eq!(rows.len(), 1, "only the honest episode is indexed");
    assert_eq!(rows[0]["host_id"], OTHER);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_decompression_bomb_stops_at_the_ratio_cap_after_little_cpu() {
    let w = World::new(1);
    let p = Process::start(&w.config("[version_gate]\nenabled = false\n"), &[]);
    // Frames concatenate: one frame of 64 MiB of zeros, repeated, is a 128 GiB tar member in
    // about 4 MB on the wire (SPEC §16: refused once past the ratio, 413 too_large).
    let ep = "ep-zeros";
    let reps: u64 = 2048;
    let mut head = Tar::new();
    head.dir(&format!("{ep}/"))
        .file(&format!("{ep}/meta.json"), &meta(ep, COMMIT));
    head.push(
        Header::gnu(format!("{ep}/zeros").as_bytes(), b'0', reps << 26).finish(),
        b"",
    );
    let mut body = zstd::encode_all(&head.0[..], 3).unwrap();
    let zeros = zstd::encode_all(&vec![0u8; 64 << 20][..], 3).unwrap();
    for _ in 0..reps {
        body.extend_from_slice(&zeros);
    }
    body.extend(zstd::encode_all(&[0u8; 1024][..], 3).unwrap());
    println!(
        "ratio bomb: {} bytes on the wire for {} GiB of tar",
        body.len(),
        (reps << 26) >> 30
    );
    let cpu0 = cpu_seconds(p.child.id());
    let c = w.client(p.addr, HOST);
    let started = Instant::now();
    let reply = c
        .request(
            "PUT",
            &format!("/v1/episodes/{HOST}/{ep}"),
            &put_headers("0".repeat(64), body.len()),
            body,
        )
        .await
        .unwrap();
    let cpu = cpu_seconds(p.child.id()) - cpu0;
    println!(
        "ratio bomb refused in {:?}, receiver CPU {cpu:.2} s",
        started.elapsed()
    );
    assert_eq!(
        reply.status,
        413,
        "{}",
        String::from_utf8_lossy(&reply.body)
    );
    let msg = reply.json()["message"].as_str().unwrap().to_string();
    assert!(msg.contains("times its compressed size"), "{msg}");
    // Decoding 128 GiB would take minutes of CPU; the cap stops it within ~1 GB.
    assert!(
        cpu < 10.0,
        "receiver spent {cpu:.1} CPU seconds on the bomb"
    );
    assert!(files_under(&w.store_dir().join("episodes")).is_empty());
    assert!(files_under(&w.store_dir().join("tmp")).is_empty());
}

type RawTls = tokio_rustls::client::TlsStream<tokio::net::TcpStream>;

/// Opens a PUT as `host` for `ep` declaring `len` bytes and sends `first` of them.
async fn open_put(
    w: &World,
    addr: std::net::SocketAddr,
    host: &str,
    ep: &str,
    len: usize,
    first: &[u8],
) -> RawTls {
    open_put_sha(w, addr, host, ep, &"0".repeat(64), len, first).await
}

/// [`open_put`] with the body's real tar SHA-256, so that it can also end well.
async fn open_put_sha(
    w: &World,
    addr: std::net::SocketAddr,
    host: &str,
    ep: &str,
    sha: &str,
    len: usize,
    first: &[u8],
) -> RawTls {
    let mut s = cis490_tests::client::raw_tls(addr, &w.pki.ca_file, &w.pki.client(host)).await;
    let head = format!(
        "PUT /v1/episodes/{host}/{ep} HTTP/1.1\r\nhost: localhost\r\ncontent-length: {len}\r\nx-cis490-code-commit: {COMMIT}\r\nx-cis490-tar-sha256: {sha}\r\n\r\n"
    );
    s.write_all(head.as_bytes()).await.unwrap();
    s.write_all(first).await.unwrap();
    s.flush().await.unwrap();
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_host_cannot_hold_every_slot_and_dripping_bodies_are_cut() {
    let w = World::new(1);
    // The idle timeout is far away: only the rate floor can end the drips.
    let r = start(
        &w,
        "[version_gate]\nenabled = false\n[limits]\nbody_idle_timeout_s = 900\n",
    )
    .await;
    let mut held = Vec::new();
    let mut refused = 0;
    let drips: Vec<_> = (0..64)
        .map(|i| {
            episode::body(
                &w.path().join("src"),
                &format!("ep-drip{i}"),
                COMMIT,
                256 << 10,
            )
        })
        .collect();
    for drip_body in &drips {
        // Valid bytes of a real body, so only their pace is wrong.
        let mut s = open_put(
            &w,
            r.addr,
            HOST,
            &drip_body.id,
            drip_body.bytes.len(),
            &drip_body.bytes[..64],
        )
        .await;
        // Over the per-host cap the answer comes at once, from the headers.
        let mut buf = vec![0u8; 2048];
        match tokio::time::timeout(Duration::from_millis(300), s.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => {
                let text = String::from_utf8_lossy(&buf[..n]).to_string();
                assert!(text.starts_with("HTTP/1.1 503"), "{text}");
                assert!(text.contains("max_uploads_per_host"), "{text}");
                refused += 1;
            }
            _ => held.push((s, drip_body)),
        }
    }
    assert_eq!(held.len(), 8, "max_uploads_per_host (8) slots held");
    assert_eq!(refused, 56);
    // The preflight answers what the PUT would.
    let check = w
        .client(r.addr, HOST)
        .request(
            "POST",
            &format!("/v1/episodes/{HOST}/ep-next/check"),
            &[
                ("x-cis490-code-commit", COMMIT.to_string()),
                ("x-cis490-tar-sha256", "0".repeat(64)),
                ("x-cis490-upload-length", "1000".to_string()),
            ],
            Vec::new(),
        )
        .await
        .unwrap();
    assert_eq!((check.status, check.error().as_str()), (503, "overloaded"));
    assert!(check.headers.contains_key("retry-after"));
    // Another host stores within a few seconds.
    let started = Instant::now();
    let good = episode::body(&w.path().join("src"), "ep-honest", COMMIT, 100_000);
    let reply = w.client(r.addr, OTHER).put(OTHER, &good).await;
    assert_eq!(reply.status, 201, "{:?}", reply.json());
    assert!(started.elapsed() < Duration::from_secs(5));
    // The drips: a byte every 20 s, far under min_body_bytes_per_s, never idle for 900 s.
    let t0 = Instant::now();
    let mut next_drip = t0 + Duration::from_secs(20);
    let mut answers = Vec::new();
    let mut open: Vec<_> = held.into_iter().map(|(s, b)| (s, b, 64usize)).collect();
    while !open.is_empty() {
        assert!(
            t0.elapsed() < Duration::from_secs(200),
            "drips still open after 200 s"
        );
        let drip = Instant::now() >= next_drip;
        if drip {
            next_drip += Duration::from_secs(20);
        }
        let mut still = Vec::new();
        for (mut s, drip_body, sent) in open {
            let mut buf = vec![0u8; 2048];
            match tokio::time::timeout(Duration::from_millis(50), s.read(&mut buf)).await {
                Ok(Ok(n)) if n > 0 => answers.push((t0.elapsed(), buf[..n].to_vec())),
                Ok(_) => answers.push((t0.elapsed(), Vec::new())),
                Err(_) if drip => {
                    let _ = s.write_all(&drip_body.bytes[sent..sent + 1]).await;
                    let _ = s.flush().await;
                    still.push((s, drip_body, sent + 1));
                }
                Err(_) => still.push((s, drip_body, sent)),
            }
        }
        open = still;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    for (at, resp) in &answers {
        let text = String::from_utf8_lossy(resp);
        assert!(text.starts_with("HTTP/1.1 408"), "{text}");
        assert!(text.contains("body_timeout"), "{text}");
        assert!(text.contains("min_body_bytes_per_s"), "{text}");
        assert!(
            *at > Duration::from_secs(50),
            "the first minute is grace: cut at {at:?}"
        );
    }
    println!(
        "drips cut with 408 after {:?}",
        answers.iter().map(|a| a.0.as_secs()).collect::<Vec<_>>()
    );
    assert!(
        files_under(&w.store_dir().join("tmp")).is_empty(),
        "temp files gone"
    );
    assert_eq!(
        metric_value(&r, "cis490_receiver_uploads_in_flight").await,
        0.0
    );
    r.stop().await;
}

/// Reads one HTTP/1.1 answer (headers and a Content-Length body) off a keep-alive stream.
async fn read_response<S: tokio::io::AsyncRead + Unpin>(s: &mut S) -> Vec<u8> {
    let mut got = Vec::new();
    let mut buf = vec![0u8; 4096];
    loop {
        if let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&got[..end]).to_ascii_lowercase();
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .map_or(0, |v| v.trim().parse().unwrap());
            if got.len() >= end + 4 + len {
                return got;
            }
        }
        let k = s.read(&mut buf).await.unwrap();
        assert!(k > 0, "connection closed mid-answer");
        got.extend_from_slice(&buf[..k]);
    }
}

fn raise_own_nofile() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    setrlimit(Resource::RLIMIT_NOFILE, hard, hard).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_past_the_cap_are_closed_and_an_honest_host_still_stores() {
    raise_own_nofile();
    let w = World::new(1);
    let p = Process::start(
        &w.config("[version_gate]\nenabled = false\n[limits]\nidle_timeout_s = 2\n"),
        &[],
    );
    // 2,000 TCP connections that never send a byte.
    let mut idle = Vec::new();
    for _ in 0..2000 {
        match tokio::net::TcpStream::connect(p.addr).await {
            Ok(s) => idle.push(s),
            Err(e) => panic!("connect: {e}"),
        }
    }
    let ops = p.ops_addr;
    // Within the header timeout (10 s) none of the accepted ones is let go yet.
    let deadline = Instant::now() + Duration::from_secs(8);
    let refused = loop {
        let (_, text) = ops_get(ops, "/metrics").await;
        let n = metric(&text, "cis490_receiver_connections_refused_total").unwrap_or(0.0);
        if n >= 900.0 || Instant::now() > deadline {
            break n;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        refused >= 900.0,
        "connections over max_connections closed: {refused}"
    );
    let fds = std::fs::read_dir(format!("/proc/{}/fd", p.child.id()))
        .unwrap()
        .count();
    println!("2000 idle connections: {refused} refused at accept, receiver holds {fds} fds");
    assert!(fds < 1024 + 128, "receiver fds {fds}");
    // An honest host gets through once the idle ones time out (header_timeout_s), retrying as
    // the shipper does.
    let good = episode::body(&w.path().join("src"), "ep-honest", COMMIT, 200_000);
    let c = w.client(p.addr, OTHER);
    let started = Instant::now();
    let status = loop {
        if let Ok(Ok(r)) =
            tokio::time::timeout(Duration::from_secs(5), c.put_result(OTHER, &good)).await
        {
            break r.status;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "honest host locked out"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    assert_eq!(status, 201);
    println!(
        "honest upload stored {:?} after 2000 idle connections",
        started.elapsed()
    );
    drop(idle);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_without_a_request_close_after_idle_timeout_over_http1_and_http2() {
    let w = World::new(1);
    // header_timeout_s far above idle_timeout_s: only the idle timeout can close them.
    let p = Process::start(
        &w.config("[version_gate]\nenabled = false\n[limits]\nidle_timeout_s = 2\nheader_timeout_s = 60\n"),
        &[],
    );
    let me = w.pki.client(HOST);
    // HTTP/1.1, kept alive after one request.
    let mut s = cis490_tests::client::raw_tls(p.addr, &w.pki.ca_file, &me).await;
    s.write_all(b"POST /v1/ping HTTP/1.1\r\nhost: localhost\r\ncontent-length: 0\r\n\r\n")
        .await
        .unwrap();
    let got = read_response(&mut s).await;
    assert!(status_line(&got).contains("200"));
    let t = Instant::now();
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf))
        .await
        .expect("closed within 10 s")
        .unwrap_or(0);
    assert_eq!(n, 0, "the idle HTTP/1.1 connection was closed");
    let h1 = t.elapsed();
    assert!(
        h1 >= Duration::from_millis(1500),
        "not before idle_timeout_s: {h1:?}"
    );
    // HTTP/2: one request, then nothing; the server ends the connection.
    let (mut send, conn) = cis490_tests::client::h2_connect(p.addr, &w.pki.ca_file, &me).await;
    let req = http::Request::builder()
        .method("POST")
        .uri("https://localhost/v1/ping")
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .unwrap();
    assert_eq!(send.send_request(req).await.unwrap().status(), 200);
    let t = Instant::now();
    tokio::time::timeout(Duration::from_secs(10), conn)
        .await
        .expect("the idle HTTP/2 connection was closed within 10 s")
        .unwrap()
        .ok();
    let h2 = t.elapsed();
    assert!(
        h2 >= Duration::from_millis(1500),
        "not before idle_timeout_s: {h2:?}"
    );
    let (_, m) = ops_get(p.ops_addr, "/metrics").await;
    assert_eq!(
        metric(&m, "cis490_receiver_connections_idle_closed_total"),
        Some(2.0)
    );
    println!("idle connections closed after {h1:?} (HTTP/1.1) and {h2:?} (HTTP/2)");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_handshakes_hold_at_most_max_handshakes_slots() {
    let w = World::new(1);
    let p = Process::start(
        &w.config("[version_gate]\nenabled = false\n[limits]\nheader_timeout_s = 4\n"),
        &[],
    );
    // 100 connections that send the first byte of a ClientHello and stall.
    let mut stalled = Vec::new();
    for _ in 0..100 {
        let mut s = tokio::net::TcpStream::connect(p.addr).await.unwrap();
        s.write_all(&[0x16]).await.unwrap();
        stalled.push(s);
    }
    let deadline = Instant::now() + Duration::from_secs(3);
    let mut most = 0.0f64;
    while Instant::now() < deadline {
        let (_, text) = ops_get(p.ops_addr, "/metrics").await;
        most = most.max(metric(&text, "cis490_receiver_handshakes_in_progress").unwrap_or(0.0));
        if most >= 64.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(most, 64.0, "max_handshakes (64) slots held, the rest wait");
    // Once the stalled ones time out, an honest host gets through.
    let good = episode::body(&w.path().join("src"), "ep-after", COMMIT, 10_000);
    let c = w.client(p.addr, HOST);
    let started = Instant::now();
    let status = loop {
        if let Ok(Ok(r)) =
            tokio::time::timeout(Duration::from_secs(10), c.put_result(HOST, &good)).await
        {
            break r.status;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "honest host locked out"
        );
    };
    assert_eq!(status, 201);
    let (_, text) = ops_get(p.ops_addr, "/metrics").await;
    assert!(metric(&text, "cis490_receiver_handshakes_in_progress").unwrap_or(99.0) < 64.0);
    drop(stalled);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthz_probes_the_store_at_most_once_a_second() {
    let w = World::new(1);
    let r = start(&w, "").await;
    let t = Instant::now();
    for _ in 0..50 {
        let (code, _) = r.ops_get("/healthz").await;
        assert_eq!(code, 200);
    }
    let took = t.elapsed().as_secs_f64();
    let probes = metric_value(&r, "cis490_receiver_store_probes_total").await;
    assert!(probes >= 1.0);
    assert!(
        probes <= took.ceil() + 1.0,
        "{probes} probes for 50 calls in {took:.2}s"
    );
    assert!(files_under(&w.store_dir().join("tmp")).is_empty());
    r.stop().await;
}

#[test]
fn a_forgejo_token_over_plain_http_is_a_config_error_unless_allowed() {
    let w = World::new(1);
    let token = w.path().join("forgejo.token");
    std::fs::write(&token, "secret\n").unwrap();
    for (allow, want) in [("", Some(2)), ("allow_insecure_http = true\n", Some(0))] {
        let cfg = w.config(&format!(
            "[version_gate]\nrepo_path = \"{}\"\n[version_gate.forgejo]\nbase_url = \"http://forgejo.lab:3000\"\nowner = \"o\"\nrepo = \"r\"\ntoken_file = \"{}\"\n{allow}",
            w.repo.path.display(),
            token.display()
        ));
        let (code, err) = cis490_tests::harness::receiver_check_config(&cfg);
        assert_eq!(code, want, "{allow}: {err}");
        if want == Some(2) {
            assert!(err.contains("version_gate.forgejo.base_url"), "{err}");
            assert!(err.contains("clear text"), "{err}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tiny_invalid_uploads_keep_the_quarantine_within_max_entries_without_rescans() {
    let w = World::new(1);
    let r = start(
        &w,
        "[version_gate]\nenabled = false\n[quarantine]\nmax_entries = 100\n",
    )
    .await;
    // One keep-alive connection, 1,000 tiny invalid bodies (not zstd): 422 and quarantined.
    let mut s = cis490_tests::client::raw_tls(r.addr, &w.pki.ca_file, &w.pki.client(HOST)).await;
    let n = 1000;
    let mut lat = Vec::new();
    for i in 0..n {
        let body = b"not zstd at all";
        let head = format!(
            "PUT /v1/episodes/{HOST}/ep-t{i} HTTP/1.1\r\nhost: localhost\r\ncontent-length: {}\r\nx-cis490-code-commit: {COMMIT}\r\nx-cis490-tar-sha256: {}\r\n\r\n",
            body.len(),
            "0".repeat(64)
        );
        let t = Instant::now();
        s.write_all(head.as_bytes()).await.unwrap();
        s.write_all(body).await.unwrap();
        let got = read_response(&mut s).await;
        lat.push(t.elapsed());
        assert!(
            status_line(&got).contains("422"),
            "{}",
            String::from_utf8_lossy(&got)
        );
    }
    let entries = std::fs::read_dir(w.store_dir().join("quarantine"))
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(".reason.json"))
        .count();
    assert_eq!(entries, 100, "quarantine holds max_entries");
    let bodies = std::fs::read_dir(w.store_dir().join("quarantine"))
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(".tar.zst"))
        .count();
    assert_eq!(bodies, 100);
    let scans = metric_value(&r, "cis490_receiver_quarantine_scans_total").await;
    assert_eq!(
        scans, 1.0,
        "the quarantine directory was listed once, at start"
    );
    let median = |v: &mut [Duration]| {
        v.sort();
        v[v.len() / 2]
    };
    let first = median(&mut lat[..200].to_vec());
    let last = median(&mut lat[n - 200..].to_vec());
    println!("{n} tiny rejections: median latency first 200 {first:?}, last 200 {last:?}");
    r.stop().await;
}

/// `[limits] decoder_memory_bytes` (docs/receiver.md): a decoder leases the memory its frame
/// header declares before it decodes. An upload that finds no room is written whole and
/// validated afterwards (stored all the same, nothing refused); a streaming upload whose later
/// frame needs more than is free waits, then is answered 503 `overloaded`, stores nothing, and
/// stores on its retry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_beyond_the_decoder_budget_are_spooled_or_wait_and_nothing_is_lost() {
    let w = World::new(1);
    let r = start(
        &w,
        "[version_gate]\nenabled = false\n[limits]\ndecoder_memory_bytes = 4194304\n",
    )
    .await;
    let src = w.path().join("src");
    // 3 MiB episodes: the packer's level 3 declares a 2 MiB window, about 2.5 MiB leased.
    let holder = episode::body(&src, "ep-holder", COMMIT, 3 << 20);
    let spooled = episode::body(&src, "ep-spooled", COMMIT, 3 << 20);
    // The holder sends its frame header and a little more, then stops: its lease stays held.
    let mut held = open_put_sha(
        &w,
        r.addr,
        HOST,
        &holder.id,
        &holder.sha,
        holder.bytes.len(),
        &holder.bytes[..64 << 10],
    )
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let leased = metric_value(&r, "cis490_receiver_decoder_memory_bytes").await;
    assert!(
        (2.0 * 1048576.0..4.0 * 1048576.0).contains(&leased),
        "the holder leases its 2 MiB window and the rest: {leased}"
    );
    // A second one does not fit beside it: it is written whole, then validated and stored.
    let started = Instant::now();
    let reply = w.client(r.addr, OTHER).put(OTHER, &spooled).await;
    assert_eq!(reply.status, 201, "{:?}", reply.json());
    assert!(started.elapsed() < Duration::from_secs(8));
    assert_eq!(
        metric_value(&r, "cis490_receiver_decoder_memory_spooled_total").await,
        1.0
    );
    // A bad body that finds no room is written whole too, then refused as any: 422, kept in
    // the quarantine, nothing stored.
    let mut bad = episode::body(&src, "ep-spooled-bad", COMMIT, 3 << 20);
    bad.sha = "ab".repeat(32);
    let reply = w.client(r.addr, OTHER).put(OTHER, &bad).await;
    assert_eq!(
        (reply.status, reply.error().as_str()),
        (422, "invalid_content"),
        "{:?}",
        reply.json()
    );
    let msg = reply.json()["message"].as_str().unwrap().to_string();
    assert!(msg.contains("the X-Cis490-Tar-SHA256 header says"), "{msg}");
    assert_eq!(
        metric_value(&r, "cis490_receiver_decoder_memory_spooled_total").await,
        2.0
    );
    let kept = files_under(&w.store_dir().join("quarantine"));
    assert!(
        kept.iter().any(|p| p.contains("ep-spooled-bad")),
        "{kept:?}"
    );
    // A body whose first frame has a tiny window streams; its second frame, 256 KiB on,
    // declares a 2 MiB window,
    // which does not fit while the holder holds its lease: a 503 after the wait.
    let grower = episode::write(
        &src,
        "ep-grower",
        COMMIT,
        &[("data.bin", &episode::noise(3 << 20, 11))],
    );
    let (packed, packed_body) = episode::pack(&grower, "ep-grower");
    let tar = zstd::decode_all(&packed_body[..]).unwrap();
    let frame = |part: &[u8], window_log: u32| {
        let mut enc = zstd::stream::write::Encoder::new(Vec::new(), 3).unwrap();
        enc.window_log(window_log).unwrap();
        enc.write_all(part).unwrap();
        enc.finish().unwrap()
    };
    let mut body = frame(&tar[..256 << 10], 10);
    body.extend(frame(&tar[256 << 10..], 21));
    let started = Instant::now();
    let reply = w
        .client(r.addr, OTHER)
        .request(
            "PUT",
            &format!("/v1/episodes/{OTHER}/ep-grower"),
            &put_headers(packed.tar_sha256.clone(), body.len()),
            body.clone(),
        )
        .await
        .unwrap();
    let waited = started.elapsed();
    assert_eq!(
        (reply.status, reply.error().as_str()),
        (503, "overloaded"),
        "{:?}",
        reply.json()
    );
    let msg = reply.json()["message"].as_str().unwrap().to_string();
    assert!(msg.contains("limits.decoder_memory_bytes"), "{msg}");
    assert_eq!(reply.headers["retry-after"], "5");
    assert!(
        waited >= Duration::from_secs(9) && waited < Duration::from_secs(20),
        "answered after {waited:?}"
    );
    assert_eq!(
        metric_value(&r, "cis490_receiver_decoder_memory_refused_total").await,
        1.0
    );
    // Nothing of it was kept: no stored file, no row.
    let stored = files_under(&w.store_dir().join("episodes"));
    assert!(
        stored.iter().all(|p| !p.contains("ep-grower")),
        "{stored:?}"
    );
    assert_eq!(index_rows(&w.store_dir()).len(), 1);
    // The holder finishes and is stored; the budget is free again and the retry stores.
    held.write_all(&holder.bytes[64 << 10..]).await.unwrap();
    held.flush().await.unwrap();
    let answer = read_response(&mut held).await;
    assert!(
        status_line(&answer).starts_with("HTTP/1.1 201"),
        "{}",
        String::from_utf8_lossy(&answer)
    );
    let reply = w
        .client(r.addr, OTHER)
        .request(
            "PUT",
            &format!("/v1/episodes/{OTHER}/ep-grower"),
            &put_headers(packed.tar_sha256.clone(), body.len()),
            body,
        )
        .await
        .unwrap();
    assert_eq!(reply.status, 201, "{:?}", reply.json());
    let rows = index_rows(&w.store_dir());
    let mut ids: Vec<&str> = rows
        .iter()
        .map(|r| r["episode_id"].as_str().unwrap())
        .collect();
    ids.sort_unstable();
    assert_eq!(ids, ["ep-grower", "ep-holder", "ep-spooled"]);
    // Each stored file is the body as sent.
    let on_disk = std::fs::read(
        w.store_dir()
            .join("episodes")
            .join(OTHER)
            .join("ep-spooled.tar.zst"),
    )
    .unwrap();
    assert_eq!(on_disk, spooled.bytes);
    assert!(files_under(&w.store_dir().join("tmp")).is_empty());
    assert_eq!(
        metric_value(&r, "cis490_receiver_decoder_memory_bytes").await,
        0.0,
        "every lease is given back"
    );
    r.stop().await;
}

/// A frame that declares a window over 16 MiB (zstd --long=25) is refused at its header, with
/// what the receiver decodes in the message, and kept in quarantine like every 422.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_window_larger_than_the_receiver_decodes_is_refused_at_the_frame_header() {
    let w = World::new(1);
    let r = start(&w, "[version_gate]\nenabled = false\n").await;
    let ep = "ep-wide";
    let mut t = Tar::new();
    t.dir(&format!("{ep}/"))
        .file(&format!("{ep}/meta.json"), &meta(ep, COMMIT))
        .file(&format!("{ep}/data.bin"), &episode::noise(100_000, 5));
    let tar = t.end();
    let sha = {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(&tar))
    };
    let mut enc = zstd::stream::write::Encoder::new(Vec::new(), 3).unwrap();
    enc.window_log(25).unwrap();
    enc.long_distance_matching(true).unwrap();
    enc.write_all(&tar).unwrap();
    let body = enc.finish().unwrap();
    let reply = w
        .client(r.addr, HOST)
        .request(
            "PUT",
            &format!("/v1/episodes/{HOST}/{ep}"),
            &put_headers(sha, body.len()),
            body,
        )
        .await
        .unwrap();
    assert_eq!(
        (reply.status, reply.error().as_str()),
        (422, "invalid_content")
    );
    let msg = reply.json()["message"].as_str().unwrap().to_string();
    assert_eq!(
        msg,
        "the zstd frame at byte 0 needs a 33554432-byte window; the receiver decodes windows up to 16777216 bytes (zstd --long or levels 20-22 without a window limit)"
    );
    assert!(index_rows(&w.store_dir()).is_empty());
    assert!(files_under(&w.store_dir().join("episodes")).is_empty());
    r.stop().await;
}
