//! SPEC §13 on the fs store: an upload cut past 8 MiB leaves its prefix under `resume/`;
//! `check` offers it, a `Content-Range` PUT continues it and is validated over the whole body.
//! Every malformed or stale resume gets its exact answer and leaves the held prefix (or the
//! store) as it was.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use cis490_tests::client::Client;
use cis490_tests::episode::{self, Body};
use cis490_tests::harness::{metric, ops_get, shipper_bin, shipper_daemon, Process, World};
use cis490_tests::relay::{Cuts, Relay};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::receiver_process::put_head;
use crate::support::{files_under, index_rows};

const HOST: &str = "labhost-01";
const MIB: usize = 1 << 20;

pub(crate) fn big(w: &World, id: &str, mib: usize) -> Body {
    episode::body(&w.path().join("src"), id, &w.commits[0], mib * MIB)
}

fn resume_dir(store: &Path) -> PathBuf {
    store.join("resume")
}

/// The held prefix files (host/name) of a store.
fn held(store: &Path) -> Vec<String> {
    files_under(&resume_dir(store))
}

fn held_len(store: &Path) -> u64 {
    held(store)
        .first()
        .and_then(|f| std::fs::metadata(resume_dir(store).join(f)).ok())
        .map_or(0, |m| m.len())
}

async fn tls(
    w: &World,
    addr: std::net::SocketAddr,
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    cis490_tests::client::raw_tls(addr, &w.pki.ca_file, &w.pki.client(HOST)).await
}

/// Starts a whole upload, sends `n` bytes of it, and waits until the receiver's part file
/// holds at least `at_least`; the stream is returned still open.
async fn start_upload(
    w: &World,
    addr: std::net::SocketAddr,
    b: &Body,
    n: usize,
    at_least: u64,
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let mut s = tls(w, addr).await;
    s.write_all(put_head(b).as_bytes()).await.unwrap();
    s.write_all(&b.bytes[..n]).await.unwrap();
    s.flush().await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while held_len(&w.store_dir()) < at_least {
        assert!(
            Instant::now() < deadline,
            "the part file never reached {at_least} bytes"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    s
}

/// `check` with the body's length: (status, offered offset).
pub(crate) async fn check(c: &Client, b: &Body) -> (u16, u64) {
    let r = c
        .request(
            "POST",
            &format!("/v1/episodes/{HOST}/{}/check", b.id),
            &[
                ("x-cis490-code-commit", b.commit.clone()),
                ("x-cis490-tar-sha256", b.sha.clone()),
                ("x-cis490-upload-length", b.bytes.len().to_string()),
            ],
            vec![],
        )
        .await
        .unwrap();
    (r.status, offset_of(&r))
}

pub(crate) fn offset_of(r: &cis490_tests::client::Reply) -> u64 {
    r.headers
        .get("x-cis490-resume-offset")
        .map_or(0, |v| v.to_str().unwrap().parse().unwrap())
}

/// Waits until the receiver offers more than 8 MiB of `b` and the offer stays put (the cut
/// upload was noticed and its last bytes written).
async fn offered(c: &Client, b: &Body) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut last = 0;
    loop {
        let (status, off) = check(c, b).await;
        assert_eq!(status, 204, "check while waiting for an offer");
        if off > 8 << 20 && off == last {
            return off;
        }
        last = off;
        assert!(Instant::now() < deadline, "no steady resume offer");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

pub(crate) fn sha(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// A resumed PUT: `range` is the Content-Range sent, `prefix` the prefix hash, `body` the bytes.
async fn resume_raw(
    c: &Client,
    b: &Body,
    range: Option<String>,
    prefix: Option<String>,
    body: Vec<u8>,
) -> cis490_tests::client::Reply {
    let mut h = vec![
        ("x-cis490-code-commit", b.commit.clone()),
        ("x-cis490-tar-sha256", b.sha.clone()),
        ("content-type", "application/zstd".to_string()),
    ];
    if let Some(r) = range {
        h.push(("content-range", r));
    }
    if let Some(p) = prefix {
        h.push(("x-cis490-resume-prefix-sha256", p));
    }
    c.request_expect("PUT", &format!("/v1/episodes/{HOST}/{}", b.id), &h, &body)
        .await
        .unwrap()
}

/// What a shipper sends to resume `b` from `n`.
/// The cut upload may still hold the id for a moment after `check` offers its prefix: a 503
/// `overloaded` is retried, as the shipper would.
pub(crate) async fn resume(c: &Client, b: &Body, n: u64) -> cis490_tests::client::Reply {
    let n_us = n as usize;
    let l = b.bytes.len();
    for _ in 0..100 {
        let r = resume_raw(
            c,
            b,
            Some(format!("bytes {n}-{}/{l}", l - 1)),
            Some(sha(&b.bytes[..n_us])),
            b.bytes[n_us..].to_vec(),
        )
        .await;
        if r.status != 503 {
            return r;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the id stayed busy");
}

fn stored(w: &World, b: &Body) -> Option<Vec<u8>> {
    std::fs::read(
        w.store_dir()
            .join("episodes")
            .join(HOST)
            .join(format!("{}.tar.zst", b.id)),
    )
    .ok()
}

async fn resumed_total(p: &Process) -> f64 {
    let (_, text) = ops_get(p.ops_addr, "/metrics").await;
    metric(&text, "cis490_receiver_resumed_total").unwrap_or(-1.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_upload_resumes_from_its_held_prefix_after_a_receiver_kill() {
    let w = World::new(1);
    let cfg = w.config("");
    let b = big(&w, "ep-big", 20);
    let mut p = Process::start(&cfg, &[]);
    let _s = start_upload(&w, p.addr, &b, 14 * MIB, 12 << 20).await;
    p.child.kill().unwrap();
    let _ = p.child.wait();
    drop(p);
    let kept = held_len(&w.store_dir());
    assert!(kept >= 12 << 20, "the prefix survives the kill: {kept}");

    let p = Process::start(&cfg, &[]);
    assert_eq!(held(&w.store_dir()).len(), 1, "a restart keeps resume/");
    let c = w.client(p.addr, HOST);
    let (status, n) = check(&c, &b).await;
    assert_eq!(status, 204);
    assert!(
        n > 8 << 20 && n <= kept && n % 65536 == 0,
        "offer {n} of {kept}"
    );
    let l = b.bytes.len();
    let r = match c
        .request_expect(
            "PUT",
            &format!("/v1/episodes/{HOST}/{}", b.id),
            &[
                ("x-cis490-code-commit", b.commit.clone()),
                ("x-cis490-tar-sha256", b.sha.clone()),
                ("content-range", format!("bytes {n}-{}/{l}", l - 1)),
                ("x-cis490-resume-prefix-sha256", sha(&b.bytes[..n as usize])),
            ],
            &b.bytes[n as usize..],
        )
        .await
    {
        Ok(r) => r,
        Err(e) => panic!("{e}\n{}", p.log_text()),
    };
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.json()["bytes"], b.bytes.len() as u64);
    assert_eq!(
        stored(&w, &b).as_deref(),
        Some(&b.bytes[..]),
        "stored bytes equal a whole upload's"
    );
    let rows = index_rows(&w.store_dir());
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0]["tar_sha256"], b.sha.as_str());
    assert!(
        held(&w.store_dir()).is_empty(),
        "a completed upload frees its prefix"
    );
    assert_eq!(resumed_total(&p).await, 1.0);
    // Done: the same resume again is simply already stored.
    assert_eq!(resume(&c, &b, n).await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_resumes_get_their_exact_answer_and_leave_the_prefix_alone() {
    let w = World::new(1);
    let cfg = w.config("");
    let b = big(&w, "ep-bad", 16);
    let p = Process::start(&cfg, &[]);
    let c = w.client(p.addr, HOST);
    let s = start_upload(&w, p.addr, &b, 12 * MIB, 10 << 20).await;
    drop(s);
    let n = offered(&c, &b).await;
    let nu = n as usize;
    let l = b.bytes.len();
    let tail = || b.bytes[nu..].to_vec();
    let (_, text) = ops_get(p.ops_addr, "/metrics").await;
    let gauge = metric(&text, "cis490_receiver_resumable_bytes").unwrap_or(0.0);
    assert!(gauge >= n as f64, "resumable_bytes {gauge} < {n}");
    let expect = |r: cis490_tests::client::Reply, status: u16, error: &str, words: &str| {
        let body = String::from_utf8_lossy(&r.body).to_string();
        assert_eq!((r.status, r.error().as_str()), (status, error), "{body}");
        assert!(body.contains(words), "{words:?} not in {body}");
        r
    };
    let prefix = Some(sha(&b.bytes[..nu]));
    // Malformed ranges: 400 (the shipper would quarantine, so only a broken client sees it).
    for (range, words) in [
        (format!("bytes={n}-{}/{l}", l - 1), "is not of the form"),
        (format!("bytes {n}-{}/*", l - 1), "is not of the form"),
        (
            format!("bytes {n}-{}/{l}", l - 2),
            "must end at the last byte",
        ),
        (format!("bytes {n}-{l}/{l}"), "must end at the last byte"),
        (format!("bytes {}-{}/{l}", n + 1, l - 1), "differs from the"),
    ] {
        let r = resume_raw(&c, &b, Some(range), prefix.clone(), tail()).await;
        expect(r, 400, "malformed_request", words);
    }
    let r = resume_raw(
        &c,
        &b,
        Some(format!("bytes {n}-{}/{l}", l - 1)),
        None,
        tail(),
    )
    .await;
    expect(r, 400, "malformed_request", "X-Cis490-Resume-Prefix-SHA256");
    let r = resume_raw(
        &c,
        &b,
        Some(format!("bytes {n}-{}/{l}", l - 1)),
        Some("abc".into()),
        tail(),
    )
    .await;
    expect(r, 400, "malformed_request", "not 64 hex digits");
    // Past what is held: 416 with the receiver's own offset.
    let far = n + (4 << 20);
    let r = resume_raw(
        &c,
        &b,
        Some(format!("bytes {far}-{}/{l}", l - 1)),
        Some(sha(&b.bytes[..far as usize])),
        b.bytes[far as usize..].to_vec(),
    )
    .await;
    let r = expect(r, 416, "resume_unavailable", "holds");
    assert_eq!(offset_of(&r), n);
    assert_eq!(r.json()["resume_offset"], n);
    // Another total names another body: nothing held for it.
    let mut longer = tail();
    longer.push(0);
    let r = resume_raw(
        &c,
        &b,
        Some(format!("bytes {n}-{l}/{}", l + 1)),
        prefix.clone(),
        longer,
    )
    .await;
    let r = expect(r, 416, "resume_unavailable", "holds no part");
    assert_eq!(offset_of(&r), 0);
    // Another host's upload: 403, as for any request.
    let other = w.client(p.addr, "labhost-02");
    let r = other
        .request_expect(
            "PUT",
            &format!("/v1/episodes/{HOST}/{}", b.id),
            &[
                ("x-cis490-code-commit", b.commit.clone()),
                ("x-cis490-tar-sha256", b.sha.clone()),
                ("content-range", format!("bytes {n}-{}/{l}", l - 1)),
                ("x-cis490-resume-prefix-sha256", prefix.clone().unwrap()),
            ],
            &tail(),
        )
        .await
        .unwrap();
    expect(r, 403, "forbidden", "this client certificate is for");
    assert!(
        stored(&w, &b).is_none(),
        "nothing stored by a refused resume"
    );
    assert_eq!(
        check(&c, &b).await,
        (204, n),
        "the held prefix is untouched"
    );

    // A prefix hash that differs: 416 from 0, and the held bytes are dropped.
    let r = resume_raw(
        &c,
        &b,
        Some(format!("bytes {n}-{}/{l}", l - 1)),
        Some(sha(b"other")),
        tail(),
    )
    .await;
    let r = expect(r, 416, "resume_unavailable", "send the whole body");
    assert_eq!(offset_of(&r), 0);
    assert!(held(&w.store_dir()).is_empty());
    assert_eq!(check(&c, &b).await, (204, 0));
    // The shipper falls back to a whole upload.
    assert_eq!(c.put(HOST, &b).await.status, 201);
    assert_eq!(stored(&w, &b).as_deref(), Some(&b.bytes[..]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resume_is_validated_over_the_whole_body_and_a_damaged_prefix_is_never_stored() {
    let w = World::new(1);
    let p = Process::start(&w.config(""), &[]);
    let c = w.client(p.addr, HOST);

    // New bytes that spoil the body: 422, the prefix goes with the upload to quarantine.
    let b = big(&w, "ep-spoilt", 16);
    drop(start_upload(&w, p.addr, &b, 12 * MIB, 10 << 20).await);
    let n = offered(&c, &b).await;
    let mut spoilt = b.bytes.clone();
    let last = spoilt.len() - 100;
    spoilt[last] ^= 0xff;
    let bad = Body {
        id: b.id.clone(),
        commit: b.commit.clone(),
        sha: b.sha.clone(),
        bytes: spoilt,
    };
    let r = resume(&c, &bad, n).await;
    assert_eq!(
        (r.status, r.error().as_str()),
        (422, "invalid_content"),
        "{}",
        String::from_utf8_lossy(&r.body)
    );
    assert!(stored(&w, &b).is_none());
    assert!(held(&w.store_dir()).is_empty(), "the prefix is discarded");
    let q = files_under(&w.store_dir().join("quarantine"));
    assert_eq!(
        q.iter().filter(|f| f.ends_with(".tar.zst")).count(),
        1,
        "{q:?}"
    );

    // A byte flipped inside the held prefix on disk: the shipper's hash differs, so 416 from
    // zero; the whole upload is stored intact and the good episode is never quarantined.
    let g = big(&w, "ep-flipped", 16);
    drop(start_upload(&w, p.addr, &g, 12 * MIB, 10 << 20).await);
    let n = offered(&c, &g).await;
    let part = resume_dir(&w.store_dir()).join(&held(&w.store_dir())[0]);
    let mut bytes = std::fs::read(&part).unwrap();
    bytes[MIB] ^= 0x01;
    std::fs::write(&part, bytes).unwrap();
    let r = resume(&c, &g, n).await;
    assert_eq!(
        (r.status, offset_of(&r)),
        (416, 0),
        "{}",
        String::from_utf8_lossy(&r.body)
    );
    assert_eq!(c.put(HOST, &g).await.status, 201);
    assert_eq!(stored(&w, &g).as_deref(), Some(&g.bytes[..]));
    let q = files_under(&w.store_dir().join("quarantine"));
    assert_eq!(
        q.iter().filter(|f| f.ends_with(".tar.zst")).count(),
        1,
        "still only the spoilt one: {q:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_upload_of_an_id_at_a_time_and_expired_prefixes_are_not_offered() {
    let w = World::new(1);
    let p = Process::start(&w.config("[limits]\nresume_keep_s = 3\n"), &[]);
    let c = w.client(p.addr, HOST);
    let b = big(&w, "ep-twice", 12);
    // A first upload holds the id; a second one of the same body waits its turn.
    let mut s = start_upload(&w, p.addr, &b, 10 * MIB, 9 << 20).await;
    let r = resume_raw(&c, &b, None, None, b.bytes.clone()).await;
    assert_eq!((r.status, r.error().as_str()), (503, "overloaded"));
    assert!(r.json()["message"]
        .as_str()
        .unwrap()
        .contains("already in progress"));
    assert!(r.headers.contains_key("retry-after"));
    s.write_all(&b.bytes[10 * MIB..]).await.unwrap();
    let mut buf = vec![0u8; 4096];
    let got = s.read(&mut buf).await.unwrap();
    let answer = String::from_utf8_lossy(&buf[..got]).to_string();
    assert!(answer.starts_with("HTTP/1.1 201"), "{answer}");
    assert_eq!(stored(&w, &b).as_deref(), Some(&b.bytes[..]));

    // A prefix past resume_keep_s is neither offered nor resumed.
    let e = big(&w, "ep-expiring", 12);
    drop(start_upload(&w, p.addr, &e, 10 * MIB, 9 << 20).await);
    let n = offered(&c, &e).await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(check(&c, &e).await, (204, 0));
    let r = resume(&c, &e, n).await;
    assert_eq!((r.status, offset_of(&r)), (416, 0));
    assert!(String::from_utf8_lossy(&r.body).contains("expired"));
    assert!(held(&w.store_dir()).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_while_appending_is_507_and_the_prefix_stays_usable() {
    let w = World::new(1);
    let Some(p) = crate::receiver_process::start_on_small_disk_with(&w, "40m", "") else {
        return;
    };
    let c = w.client(p.addr, HOST);
    // What the receiver sees of its store, through its own mount namespace.
    let root = PathBuf::from(format!("/proc/{}/root", p.child.id()));
    let store = root.join(w.store_dir().strip_prefix("/").unwrap());
    let b = big(&w, "ep-full", 20);
    let mut s = tls(&w, p.addr).await;
    s.write_all(put_head(&b).as_bytes()).await.unwrap();
    s.write_all(&b.bytes[..12 * MIB]).await.unwrap();
    s.flush().await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while held_len(&store) < 10 << 20 {
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(s);
    let n = offered(&c, &b).await;
    // Room for the headers' check (the rest of the body), then the disk fills under the upload.
    let filler = store.join("filler");
    std::fs::write(&filler, vec![0u8; 14 * MIB]).unwrap();
    let mut s = tls(&w, p.addr).await;
    let l = b.bytes.len();
    let head = format!(
        "PUT /v1/episodes/{HOST}/{} HTTP/1.1\r\nhost: localhost\r\ncontent-length: {}\r\ncontent-range: bytes {n}-{}/{l}\r\nx-cis490-resume-prefix-sha256: {}\r\nx-cis490-code-commit: {}\r\nx-cis490-tar-sha256: {}\r\n\r\n",
        b.id,
        l - n as usize,
        l - 1,
        sha(&b.bytes[..n as usize]),
        b.commit,
        b.sha
    );
    s.write_all(head.as_bytes()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    std::fs::OpenOptions::new()
        .append(true)
        .open(&filler)
        .unwrap()
        .write_all(&vec![0u8; 10 * MIB])
        .unwrap_or(());
    let _ = s.write_all(&b.bytes[n as usize..]).await;
    let mut buf = vec![0u8; 4096];
    let got = s.read(&mut buf).await.unwrap_or(0);
    let answer = String::from_utf8_lossy(&buf[..got]).to_string();
    assert!(answer.starts_with("HTTP/1.1 507"), "{answer}");
    assert!(files_under(&store.join("episodes")).is_empty());
    // The prefix is intact: once space is back, the resume completes.
    std::fs::remove_file(&filler).unwrap();
    let n2 = offered(&c, &b).await;
    assert!(n2 >= n, "{n2} < {n}");
    let r = resume(&c, &b, n2).await;
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(
        std::fs::read(store.join("episodes").join(HOST).join("ep-full.tar.zst")).unwrap(),
        b.bytes
    );
}

/// Waits until `data/shipped/<id>` exists.
pub(crate) fn wait_shipped(data: &Path, id: &str, limit: Duration) {
    let deadline = Instant::now() + limit;
    while !data.join("shipped").join(id).exists() {
        assert!(
            Instant::now() < deadline,
            "{id} not shipped within {limit:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The size of the episode's body (`CIS490_RESUME_MB`, default 40 MiB of incompressible data:
/// a cut at 30 % then leaves more than the 8 MiB a receiver keeps).
fn resume_mib() -> usize {
    std::env::var("CIS490_RESUME_MB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(40)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shipper_resumes_through_a_link_cut_at_30_60_and_90_percent() {
    let w = World::new(1);
    let p = Process::start(&w.config(""), &[]);
    let data = w.data_dir(HOST);
    let mib = resume_mib();
    let payload = episode::noise(mib * MIB, 7);
    episode::write(
        &data.join("episodes"),
        "ep-cut",
        &w.commits[0],
        &[("data.bin", &payload)],
    );
    // Incompressible: the body is the payload plus a little framing.
    let approx = payload.len() as u64;
    let cuts = [3, 6, 9].map(|k| approx * k / 10).to_vec();
    let relay = Relay::start(p.addr, Cuts::Total(cuts)).await;
    let cfg = w.shipper_config(
        HOST,
        &format!("https://localhost:{}", relay.addr.port()),
        "",
    );
    let started = Instant::now();
    let mut shipper = shipper_daemon(&shipper_bin(), &cfg, &[]).spawn().unwrap();
    let data2 = data.clone();
    tokio::task::spawn_blocking(move || wait_shipped(&data2, "ep-cut", Duration::from_secs(300)))
        .await
        .unwrap();
    let took = started.elapsed();
    let _ = shipper.kill();
    let _ = shipper.wait();
    let body = std::fs::read(
        w.store_dir()
            .join("episodes")
            .join(HOST)
            .join("ep-cut.tar.zst"),
    )
    .unwrap();
    let rows = index_rows(&w.store_dir());
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0]["bytes"], body.len() as u64);
    let tar = zstd::decode_all(&body[..]).unwrap();
    assert_eq!(rows[0]["tar_sha256"], sha(&tar).as_str(), "stored intact");
    assert_eq!(relay.cuts(), 3, "every cut happened");
    let log = std::fs::read_to_string(cfg.with_extension("log")).unwrap();
    let resumed = log.matches("ship_resumed").count();
    assert!(resumed >= 2, "resumed {resumed} times:\n{log}");
    let ratio = relay.sent() as f64 / body.len() as f64;
    eprintln!(
        "resume through 3 cuts: body {} bytes, sent {} bytes through the relay ({ratio:.3} x), {} resumes, {:.1} s",
        body.len(),
        relay.sent(),
        resumed,
        took.as_secs_f64()
    );
    assert!(ratio <= 1.1, "sent {ratio:.3} x the body");
    assert!(held(&w.store_dir()).is_empty());
    // The receiver's side of each resume, from its log: the prefix hash check (PUT sent to
    // `upload_resumed`) and, for the last one, reading the prefix again with the tail.
    let rlog = p.log_text();
    let at = |l: &str| seconds_of_day(l.split_whitespace().next().unwrap_or(""));
    let sent_at: Vec<f64> = log
        .lines()
        .filter(|l| l.contains("ship_resumed"))
        .map(at)
        .collect();
    let resumed_at: Vec<f64> = rlog
        .lines()
        .filter(|l| l.contains("upload_resumed"))
        .map(at)
        .collect();
    let stored_at = rlog.lines().rfind(|l| l.contains("upload_stored")).map(at);
    for (i, (s, r)) in sent_at.iter().zip(&resumed_at).enumerate() {
        eprintln!("resume {}: prefix hash check {:.2} s", i + 1, r - s);
    }
    if let (Some(r), Some(done)) = (resumed_at.last(), stored_at) {
        eprintln!(
            "last resume: prefix re-read and tail to stored {:.2} s",
            done - r
        );
    }
}

/// Seconds since midnight of a log line's RFC 3339 timestamp (`...THH:MM:SS.ffffffZ`).
fn seconds_of_day(ts: &str) -> f64 {
    let t = ts.split('T').nth(1).unwrap_or("").trim_end_matches('Z');
    let mut parts = t.split(':').map(|p| p.parse::<f64>().unwrap_or(0.0));
    let (h, m, s) = (
        parts.next().unwrap_or(0.0),
        parts.next().unwrap_or(0.0),
        parts.next().unwrap_or(0.0),
    );
    h * 3600.0 + m * 60.0 + s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shipper_killed_mid_upload_resumes_after_its_restart() {
    let w = World::new(1);
    let p = Process::start(&w.config(""), &[]);
    let data = w.data_dir(HOST);
    let payload = episode::noise(24 * MIB, 11);
    episode::write(
        &data.join("episodes"),
        "ep-restart",
        &w.commits[0],
        &[("data.bin", &payload)],
    );
    // A slow link, so the kill lands mid-upload.
    let cfg = w.shipper_config(
        HOST,
        &format!("https://localhost:{}", p.addr.port()),
        "[shipping]\nbandwidth_limit_mbps = 80\n",
    );
    let mut shipper = shipper_daemon(&shipper_bin(), &cfg, &[]).spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while held_len(&w.store_dir()) < 12 << 20 {
        assert!(
            Instant::now() < deadline,
            "the upload never got past 12 MiB"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    shipper.kill().unwrap();
    let _ = shipper.wait();
    let outbox = files_under(&data.join("outbox"));
    assert_eq!(
        outbox,
        vec!["ep-restart.tar.zst".to_string()],
        "the tarball is kept"
    );
    let mut shipper = shipper_daemon(&shipper_bin(), &cfg, &[]).spawn().unwrap();
    let data2 = data.clone();
    tokio::task::spawn_blocking(move || {
        wait_shipped(&data2, "ep-restart", Duration::from_secs(120))
    })
    .await
    .unwrap();
    let _ = shipper.kill();
    let _ = shipper.wait();
    let log = std::fs::read_to_string(cfg.with_extension("log")).unwrap();
    let line = log
        .lines()
        .find(|l| l.contains("ship_resumed"))
        .unwrap_or_else(|| panic!("no ship_resumed in\n{log}"));
    let offset: u64 = line
        .split_whitespace()
        .find_map(|kv| kv.strip_prefix("offset="))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no offset in {line}"));
    assert!(offset >= 8 << 20, "{line}");
    let body = std::fs::read(
        w.store_dir()
            .join("episodes")
            .join(HOST)
            .join("ep-restart.tar.zst"),
    )
    .unwrap();
    let tar = zstd::decode_all(&body[..]).unwrap();
    assert_eq!(
        index_rows(&w.store_dir())[0]["tar_sha256"],
        sha(&tar).as_str()
    );
    assert!(files_under(&data.join("outbox")).is_empty());
    assert_eq!(p.log_text().matches("upload_resumed").count(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_max_bytes_0_turns_resumes_off() {
    let w = World::new(1);
    let p = Process::start(&w.config("[limits]\nresume_max_bytes = 0\n"), &[]);
    let c = w.client(p.addr, HOST);
    let b = big(&w, "ep-off", 12);
    let mut s = tls(&w, p.addr).await;
    s.write_all(put_head(&b).as_bytes()).await.unwrap();
    s.write_all(&b.bytes[..10 * MIB]).await.unwrap();
    s.flush().await.unwrap();
    // The upload goes to tmp/, as every upload did before resumes.
    let deadline = Instant::now() + Duration::from_secs(20);
    while files_under(&w.store_dir().join("tmp")).is_empty() {
        assert!(Instant::now() < deadline, "the upload never reached tmp/");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(s);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(held(&w.store_dir()).is_empty());
    assert_eq!(check(&c, &b).await, (204, 0));
    let r = resume(&c, &b, 9 << 20).await;
    assert_eq!((r.status, offset_of(&r)), (416, 0));
    assert_eq!(c.put(HOST, &b).await.status, 201);
}
