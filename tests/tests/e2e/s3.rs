//! The S3 store (SPEC §5b) on a real 3-node Garage cluster: two receivers sharing one bucket,
//! multipart bodies, conflicts decided from what is stored, index objects, reindex and
//! export-index, quarantine, a node down, the bucket unreachable, and the crash loop.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use cis490_tests::episode::{self, Body};
use cis490_tests::garage::{Garage, Proxy};

use crate::support::{free_port, spawn_shipper};
use cis490_tests::harness::{metric, receiver_bin, shipper, InProcess, Process, World};
use nix::sys::signal::Signal;
use sha2::Digest;

const HOST: &str = "labhost-01";

fn body_key(id: &str, sha: &str) -> String {
    format!("episodes/{HOST}/{id}/{sha}.tar.zst")
}

/// A world, a cluster, and the receiver config pointing at it (through `endpoint` if given).
fn setup(w: &World, g: &Garage, endpoint: Option<&str>, extra: &str) -> std::path::PathBuf {
    let ep = endpoint
        .map(str::to_string)
        .unwrap_or_else(|| g.endpoint.clone());
    w.config(&format!("{}\n{extra}", g.store_section(&ep, "")))
}

/// Two index rows name the same stored episode (`ts` may differ: a rebuilt row takes the
/// body's LastModified).
fn same_row(a: &serde_json::Value, b: &serde_json::Value) {
    for k in [
        "host_id",
        "episode_id",
        "path",
        "bytes",
        "tar_sha256",
        "uncompressed_bytes",
        "files",
        "commit",
    ] {
        assert_eq!(a[k], b[k], "{k}");
    }
}

fn receiver_cmd(cfg: &Path, cmd: &str) -> (i32, String, String) {
    let out = Command::new(receiver_bin())
        .arg("--config")
        .arg(cfg)
        .arg(cmd)
        .env("CIS490_LOG", "warn")
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

async fn ops(r: &InProcess, path: &str) -> (u16, String) {
    r.ops_get(path).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_receivers_share_one_bucket() {
    let w = World::new(3);
    let g = Garage::start(&w.path().join("garage"));
    let b = g.bucket();
    let cfg = setup(&w, &g, None, "");
    let ra = InProcess::start(&cfg).await;
    let rb = InProcess::start(&cfg).await;
    let (ca, cb) = (w.client(ra.addr, HOST), w.client(rb.addr, HOST));
    let gen = w.path().join("gen");

    let e1 = episode::body(&gen, "ep-1", &w.commits[2], 20_000);
    let r = ca.put(HOST, &e1).await;
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    let key = body_key("ep-1", &e1.sha);
    assert_eq!(
        b.keys(&format!("episodes/{HOST}/ep-1")).await,
        vec![key.clone()]
    );
    assert_eq!(
        b.get(&key).await.unwrap().to_vec(),
        e1.bytes,
        "the body as received"
    );
    let meta = b.metadata(&key).await;
    assert_eq!(meta["tar-sha256"], e1.sha);
    assert_eq!(meta["commit"], w.commits[2]);
    let tar = zstd::decode_all(&e1.bytes[..]).unwrap();
    assert_eq!(meta["uncompressed-bytes"], tar.len().to_string());
    assert_eq!(meta["files"], "2", "meta.json and data.bin");
    let row = b.json(&format!("index/{HOST}/ep-1.json")).await.unwrap();
    assert_eq!(row["path"], key.as_str(), "the full object key");
    assert_eq!(row["tar_sha256"], e1.sha.as_str());
    assert_eq!(row["bytes"], e1.bytes.len() as u64);
    assert_eq!(row["commit"], w.commits[2].as_str());

    // Receiver B knows nothing locally, yet answers from the bucket.
    let got = cb
        .request("GET", &format!("/v1/episodes/{HOST}/ep-1"), &[], vec![])
        .await
        .unwrap();
    assert_eq!(got.status, 200);
    assert_eq!(got.json(), row);
    let again = cb.put(HOST, &e1).await;
    assert_eq!(again.status, 200);
    assert_eq!(again.json()["status"], "already_stored");
    let check = cb
        .request(
            "POST",
            &format!("/v1/episodes/{HOST}/ep-1/check"),
            &[
                ("x-cis490-code-commit", e1.commit.clone()),
                ("x-cis490-tar-sha256", e1.sha.clone()),
            ],
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(check.status, 200);

    // Different bytes under the same id: 409 through either receiver, nothing replaced.
    let other = episode::body(&w.path().join("gen2"), "ep-1", &w.commits[2], 21_000);
    for c in [&cb, &ca] {
        let r = c.put(HOST, &other).await;
        assert_eq!(r.status, 409, "{}", String::from_utf8_lossy(&r.body));
        assert_eq!(r.json()["stored_tar_sha256"], e1.sha.as_str());
    }
    assert_eq!(
        b.keys(&format!("episodes/{HOST}/ep-1")).await,
        vec![key.clone()]
    );

    // A body that fails validation never appears under episodes/; it is kept in quarantine.
    let mut bad = episode::body(&gen, "ep-bad", &w.commits[2], 5_000);
    bad.sha = "ab".repeat(32);
    let r = cb.put(HOST, &bad).await;
    assert_eq!(r.status, 422, "{}", String::from_utf8_lossy(&r.body));
    assert!(b.keys(&format!("episodes/{HOST}/ep-bad")).await.is_empty());
    let q = b.keys("quarantine").await;
    assert_eq!(q.len(), 2, "{q:?}");
    let reason_key = q.iter().find(|k| k.ends_with(".reason.json")).unwrap();
    let reason = b.json(reason_key).await.unwrap();
    assert_eq!(reason["error"], "invalid_content");
    assert_eq!(reason["episode_id"], "ep-bad");
    assert_eq!(reason["body_kept"], true);
    let kept = q.iter().find(|k| k.ends_with(".tar.zst")).unwrap();
    assert_eq!(b.get(kept).await.unwrap().to_vec(), bad.bytes);
    assert!(
        metric(
            &ops(&rb, "/metrics").await.1,
            "cis490_receiver_quarantine_bytes"
        )
        .unwrap()
            > 0.0
    );

    // Operations views name the bucket and count store requests.
    let (status, health) = ops(&ra, "/healthz").await;
    assert_eq!(status, 200, "{health}");
    assert!(health.contains("s3 bucket \\\"cis490\\\""), "{health}");
    let (_, m) = ops(&ra, "/metrics").await;
    assert!(
        metric(&m, "cis490_store_requests_total{op=\"put\",result=\"ok\"}").unwrap() >= 1.0,
        "{m}"
    );
    // Label order is the encoder's (`le` first); only the series matters.
    assert!(
        m.lines().any(
            |l| l.starts_with("cis490_store_request_duration_seconds_bucket{")
                && l.contains("op=\"list\"")
        ),
        "{m}"
    );

    // export-index from any machine with the config: the rows, as JSON lines.
    let (code, out, err) = receiver_cmd(&cfg, "export-index");
    assert_eq!(code, 0, "{err}");
    let rows: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows, vec![row]);
    assert!(err.is_empty(), "no conflict and no missing row: {err}");
    ra.stop().await;
    rb.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_bodies_stream_as_multipart_and_a_failed_one_leaves_nothing() {
    let w = World::new(2);
    let g = Garage::start(&w.path().join("garage"));
    let b = g.bucket();
    let cfg = setup(&w, &g, None, "");
    let ra = InProcess::start(&cfg).await;
    let rb = InProcess::start(&cfg).await;
    let (ca, cb) = (w.client(ra.addr, HOST), w.client(rb.addr, HOST));
    let gen = w.path().join("gen");

    // 13 MB of incompressible data: three parts of the multipart upload.
    let big = episode::body(&gen, "big", &w.commits[1], 13_000_000);
    let r = ca.put(HOST, &big).await;
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    let key = body_key("big", &big.sha);
    let stored = b.get(&key).await.unwrap();
    assert_eq!(stored.len(), big.bytes.len());
    assert!(stored.to_vec() == big.bytes, "stored bytes equal the body");
    let (_, m) = ops(&ra, "/metrics").await;
    assert!(
        metric(
            &m,
            "cis490_store_requests_total{op=\"complete_multipart\",result=\"ok\"}"
        )
        .unwrap()
            >= 1.0,
        "{m}"
    );
    let row = b.json(&format!("index/{HOST}/big.json")).await.unwrap();
    let tar_len = zstd::decode_all(&big.bytes[..]).unwrap().len() as u64;
    assert_eq!(row["uncompressed_bytes"], tar_len);

    // Published by a copy that set all four metadata fields (SPEC §5b).
    let meta = b.metadata(&key).await;
    assert_eq!(meta["tar-sha256"], big.sha);
    assert_eq!(meta["uncompressed-bytes"], tar_len.to_string());
    assert_eq!(meta["files"], row["files"].to_string());
    assert!(
        b.keys("tmp/resume").await.is_empty(),
        "nothing left under tmp/"
    );

    // The row lost (a receiver died between body and row): the next look rebuilds it without
    // reading the body.
    b.delete(&format!("index/{HOST}/big.json")).await;
    let got = cb
        .request("GET", &format!("/v1/episodes/{HOST}/big"), &[], vec![])
        .await
        .unwrap();
    assert_eq!(got.status, 200);
    let rebuilt = got.json();
    same_row(&rebuilt, &row);
    assert!(b.json(&format!("index/{HOST}/big.json")).await.is_some());
    let summary_key = format!("summaries/{HOST}/big/{}.json", big.sha);
    let summary = b
        .json(&summary_key)
        .await
        .expect("summary object beside the multipart body");
    assert_eq!(summary["uncompressed_bytes"], tar_len);
    let (_, m) = ops(&rb, "/metrics").await;
    assert_eq!(
        metric(&m, "cis490_store_requests_total{op=\"get\",result=\"ok\"}"),
        None,
        "rebuilt from the summary, without reading the body"
    );
    // Without the summary or metadata (a body copied in by hand): the body itself is read.
    b.delete(&format!("index/{HOST}/big.json")).await;
    b.delete(&summary_key).await;
    b.put(&key, big.bytes.clone()).await;
    let got = cb
        .request("GET", &format!("/v1/episodes/{HOST}/big"), &[], vec![])
        .await
        .unwrap();
    assert_eq!(got.status, 200);
    same_row(&got.json(), &row);
    let (_, m) = ops(&rb, "/metrics").await;
    assert_eq!(
        metric(&m, "cis490_store_requests_total{op=\"get\",result=\"ok\"}"),
        Some(1.0)
    );

    // A large body whose SHA-256 is wrong is found out after its parts went up: the multipart
    // upload is aborted, nothing appears under episodes/, the reason is kept.
    let mut liar = episode::body(&w.path().join("gen2"), "liar", &w.commits[1], 12_000_000);
    liar.sha = "cd".repeat(32);
    let r = cb.put(HOST, &liar).await;
    assert_eq!(r.status, 422, "{}", String::from_utf8_lossy(&r.body));
    assert!(b.keys(&format!("episodes/{HOST}/liar")).await.is_empty());
    let q = b.keys("quarantine").await;
    assert_eq!(q.len(), 1, "only the reason: {q:?}");
    let reason = b.json(&q[0]).await.unwrap();
    assert_eq!(reason["body_kept"], false);
    assert!(
        reason["message"].as_str().unwrap().contains("SHA-256"),
        "{reason}"
    );
    ra.stop().await;
    rb.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raced_bodies_are_both_kept_the_earlier_wins_and_tools_report_it() {
    let w = World::new(2);
    let g = Garage::start(&w.path().join("garage"));
    let b = g.bucket();
    let cfg = setup(&w, &g, None, "");
    let r = InProcess::start(&cfg).await;
    let c = w.client(r.addr, HOST);

    let first = episode::body(&w.path().join("g1"), "ep-r", &w.commits[1], 9_000);
    let second = episode::body(&w.path().join("g2"), "ep-r", &w.commits[1], 9_500);
    assert_eq!(c.put(HOST, &first).await.status, 201);
    // What a second receiver racing with a different body leaves behind: its own object.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    b.put(&body_key("ep-r", &second.sha), second.bytes.clone())
        .await;
    assert_eq!(b.keys(&format!("episodes/{HOST}/ep-r")).await.len(), 2);

    let again = c.put(HOST, &second).await;
    assert_eq!(again.status, 409, "the later body is the conflict");
    assert_eq!(again.json()["stored_tar_sha256"], first.sha.as_str());
    assert_eq!(c.put(HOST, &first).await.status, 200);
    assert_eq!(
        b.keys(&format!("episodes/{HOST}/ep-r")).await.len(),
        2,
        "both kept"
    );

    b.delete(&format!("index/{HOST}/ep-r.json")).await;
    let (code, out, err) = receiver_cmd(&cfg, "reindex");
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("reindexed 1 episode(s)"), "{out}");
    assert!(
        err.contains("ep-r: conflict: 2 bodies") && err.contains(&first.sha),
        "{err}"
    );
    let row = b.json(&format!("index/{HOST}/ep-r.json")).await.unwrap();
    assert_eq!(row["tar_sha256"], first.sha.as_str());
    let (code, out, err) = receiver_cmd(&cfg, "export-index");
    assert_eq!(code, 0);
    assert_eq!(out.lines().count(), 1);
    assert!(err.contains("conflict"), "{err}");

    // A different body landing while an upload streams (another receiver won the race): the
    // streaming upload sees it after its own body is in, answers 409 and writes no row.
    let slow = episode::body(&w.path().join("g3"), "ep-s", &w.commits[1], 30_000_000);
    let rival = episode::body(&w.path().join("g4"), "ep-s", &w.commits[1], 5_000);
    let c2 = w.client(r.addr, HOST);
    let up = tokio::spawn(async move { c2.put(HOST, &slow).await });
    let before = crate::support::metric_value(&r, "cis490_receiver_body_bytes_read_total").await;
    while crate::support::metric_value(&r, "cis490_receiver_body_bytes_read_total").await
        < before + 1e6
    {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    b.put(&body_key("ep-s", &rival.sha), rival.bytes.clone())
        .await;
    let reply = up.await.unwrap();
    assert_eq!(
        reply.status,
        409,
        "{}",
        String::from_utf8_lossy(&reply.body)
    );
    assert_eq!(reply.json()["stored_tar_sha256"], rival.sha.as_str());
    assert_eq!(
        b.keys(&format!("episodes/{HOST}/ep-s")).await.len(),
        2,
        "both kept"
    );
    assert!(b.json(&format!("index/{HOST}/ep-s.json")).await.is_none());
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_rows_come_back_through_already_stored_and_reindex() {
    let w = World::new(2);
    let g = Garage::start(&w.path().join("garage"));
    let b = g.bucket();
    let cfg = setup(&w, &g, None, "[quarantine]\nmax_bytes = 30000\n");
    let r = InProcess::start(&cfg).await;
    let c = w.client(r.addr, HOST);
    let gen = w.path().join("gen");
    let eps: Vec<Body> = (0..3)
        .map(|i| episode::body(&gen, &format!("ep-{i}"), &w.commits[1], 10_000 + i))
        .collect();
    for e in &eps {
        assert_eq!(c.put(HOST, e).await.status, 201);
    }
    let mut before = Vec::new();
    for i in 0..3 {
        before.push(b.json(&format!("index/{HOST}/ep-{i}.json")).await);
    }
    b.delete(&format!("index/{HOST}/ep-0.json")).await;
    b.delete(&format!("index/{HOST}/ep-1.json")).await;
    let (_, out, err) = receiver_cmd(&cfg, "export-index");
    assert_eq!(out.lines().count(), 1);
    assert!(err.contains("ep-0: stored without an index row"), "{err}");

    let r0 = c.put(HOST, &eps[0]).await;
    assert_eq!(r0.status, 200);
    let back = b.json(&format!("index/{HOST}/ep-0.json")).await.unwrap();
    let want = before[0].clone().unwrap();
    // `ts` becomes the body's LastModified (the original said when 201 was sent).
    same_row(&back, &want);
    let (code, out, err) = receiver_cmd(&cfg, "reindex");
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("reindexed 3 episode(s); 0 object(s) skipped"),
        "{out}"
    );
    let after = b.json(&format!("index/{HOST}/ep-1.json")).await.unwrap();
    let want = before[1].clone().unwrap();
    same_row(&after, &want);

    // Quarantine retention on the bucket: max_bytes keeps the newest entries only.
    for i in 0..3 {
        let mut bad = episode::body(&gen, &format!("bad-{i}"), &w.commits[1], 12_000);
        bad.sha = "ef".repeat(32);
        assert_eq!(c.put(HOST, &bad).await.status, 422);
    }
    let q = b.keys("quarantine").await;
    let bodies: Vec<_> = q.iter().filter(|k| k.ends_with(".tar.zst")).collect();
    assert!(bodies.len() < 3 && !bodies.is_empty(), "{q:?}");
    assert!(
        bodies.iter().any(|k| k.contains("bad-2")),
        "the newest stays: {q:?}"
    );
    let held = metric(
        &ops(&r, "/metrics").await.1,
        "cis490_receiver_quarantine_bytes",
    )
    .unwrap();
    assert!(held <= 30_000.0 && held > 0.0, "{held}");
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_bucket_is_503_and_shipping_resumes_when_it_returns() {
    let w = World::new(2);
    let g = Garage::start(&w.path().join("garage"));
    let b = g.bucket();
    let proxy = Proxy::start(g.addr()).await;
    // Through a proxy, and under a prefix (as a lab sharing a bucket would).
    let cfg = w.config(&g.store_section(&proxy.endpoint(), "lab1/"));
    let r = InProcess::start(&cfg).await;
    let c = w.client(r.addr, HOST);
    assert_eq!(ops(&r, "/healthz").await.0, 200);

    proxy.cut();
    let e = episode::body(&w.path().join("gen"), "ep-x", &w.commits[1], 4_000);
    let started = Instant::now();
    let reply = c.put(HOST, &e).await;
    assert_eq!(
        reply.status,
        503,
        "{}",
        String::from_utf8_lossy(&reply.body)
    );
    assert_eq!(reply.error(), "store_unavailable");
    assert!(reply.headers.contains_key("retry-after"));
    assert!(started.elapsed() < Duration::from_secs(15));
    // /healthz probes the bucket at most once a second (SPEC §16): the next probe sees it.
    let deadline = Instant::now() + Duration::from_secs(5);
    let (status, health) = loop {
        let (status, health) = ops(&r, "/healthz").await;
        if status != 200 || Instant::now() > deadline {
            break (status, health);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(status, 503);
    assert!(health.contains("bucket is not writable"), "{health}");
    let (_, m) = ops(&r, "/metrics").await;
    assert!(
        metric(
            &m,
            "cis490_store_requests_total{op=\"list\",result=\"error\"}"
        )
        .unwrap()
            >= 1.0
    );

    // A shipper keeps its episodes through the outage and ships them once the bucket is back.
    let scfg = w.shipper_config(HOST, &format!("https://localhost:{}", r.addr.port()), "");
    let eps = w.data_dir(HOST).join("episodes");
    for i in 0..4 {
        episode::write(&eps, &format!("s-{i}"), &w.commits[1], &[("d", b"payload")]);
    }
    let (code, _, err) = shipper(&scfg, &["once"]);
    assert_eq!(code, 1, "transient failures keep episodes queued: {err}");
    assert!(err.contains("store_unavailable"), "{err}");
    assert_eq!(std::fs::read_dir(&eps).unwrap().count(), 4);
    proxy.restore();
    // The cached probe answer lasts at most a second.
    let deadline = Instant::now() + Duration::from_secs(5);
    while ops(&r, "/healthz").await.0 != 200 {
        assert!(
            Instant::now() < deadline,
            "/healthz stays 503 after the bucket is back"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (code, _, err) = shipper(&scfg, &["once"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(std::fs::read_dir(&eps).unwrap().count(), 0);
    for i in 0..4 {
        assert_eq!(
            b.keys(&format!("lab1/episodes/{HOST}/s-{i}")).await.len(),
            1
        );
        let row = b
            .json(&format!("lab1/index/{HOST}/s-{i}.json"))
            .await
            .unwrap();
        assert!(row["path"]
            .as_str()
            .unwrap()
            .starts_with(&format!("lab1/episodes/{HOST}/s-{i}/")));
    }
    assert!(b.keys("episodes").await.is_empty() && b.keys("index").await.is_empty());
    assert!(!b.keys("lab1/health").await.is_empty());
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_garage_node_down_does_not_stop_uploads() {
    let w = World::new(2);
    let g = Garage::start(&w.path().join("garage"));
    let b = g.bucket();
    let cfg = setup(&w, &g, None, "");
    let r = InProcess::start(&cfg).await;
    let c = w.client(r.addr, HOST);
    let gen = w.path().join("gen");
    let before = episode::body(&gen, "before", &w.commits[1], 7_000);
    assert_eq!(c.put(HOST, &before).await.status, 201);
    g.kill_node(3);
    // Quorum is 2 of 3: writes, reads and listings keep working, small and multipart alike.
    for (i, size) in [3_000usize, 40_000, 6_000_000].iter().enumerate() {
        let e = episode::body(&gen, &format!("down-{i}"), &w.commits[1], *size);
        let reply = c.put(HOST, &e).await;
        assert_eq!(
            reply.status,
            201,
            "{}",
            String::from_utf8_lossy(&reply.body)
        );
        assert_eq!(
            b.get(&body_key(&e.id, &e.sha)).await.unwrap().to_vec(),
            e.bytes
        );
    }
    assert_eq!(
        c.put(HOST, &before).await.status,
        200,
        "reads with a node down"
    );
    g.start_node(3);
    let e = episode::body(&gen, "after", &w.commits[1], 5_000);
    assert_eq!(c.put(HOST, &e).await.status, 201);
    r.stop().await;
}

/// The crash oracle on the bucket: two receivers and the shipper SIGKILLed at seeded instants;
/// the shipper fails over between the receivers; at the end every episode is shipped once,
/// stored once with its SHA-256, and indexed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_receivers_on_garage_loses_and_duplicates_nothing() {
    let kills_wanted: usize = std::env::var("CIS490_S3_CRASH_KILLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let seed = cis490_tests::harness::crash_seed();
    println!("s3 crash harness seed={seed} (replay with CIS490_CRASH_SEED={seed})");
    let mut rng = cis490_tests::harness::Lcg(seed);
    let w = World::new(2);
    let g = Garage::start(&w.path().join("garage"));
    let b = g.bucket();
    let base = setup(&w, &g, None, "");
    let text = std::fs::read_to_string(&base).unwrap();
    let ports = [free_port(), free_port()];
    let cfgs: Vec<_> = ports
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let t = text.replace(
                "listen = \"127.0.0.1:0\"\nmetrics",
                &format!("listen = \"127.0.0.1:{p}\"\nmetrics"),
            );
            let path = w.path().join(format!("receiver-{i}.toml"));
            std::fs::write(&path, t).unwrap();
            path
        })
        .collect();
    let scfg = w.shipper_config(
        HOST,
        &format!(
            "[\"https://localhost:{}\", \"https://localhost:{}\"]",
            ports[0], ports[1]
        ),
        "[shipping]\nconcurrency = 3\nmax_backoff_s = 1\n",
    );
    let eps = w.data_dir(HOST).join("episodes");
    std::fs::create_dir_all(&eps).unwrap();
    let n_eps = 30;
    for i in 0..n_eps {
        let size = match rng.below(3) {
            0 => 500,
            1 => 200_000,
            _ => 5_500_000 + rng.below(2_000_000) as usize,
        };
        let id = format!("ep-{i:04}");
        let gen = w.path().join("gen");
        episode::body(&gen, &id, &w.commits[1], size);
        std::fs::rename(gen.join(&id), eps.join(&id)).unwrap();
    }
    let mut rs: Vec<Option<Process>> = cfgs.iter().map(|c| Some(Process::start(c, &[]))).collect();
    let mut ship = Some(spawn_shipper(&scfg));
    let (mut kills, mut receiver_kills, mut shipper_kills) = (0usize, 0usize, 0usize);
    let started = Instant::now();
    while kills < kills_wanted {
        tokio::time::sleep(Duration::from_millis(100 + rng.below(500))).await;
        match rng.below(4) {
            0 => {
                let mut s = ship.take().unwrap();
                s.kill().unwrap();
                let _ = s.wait();
                shipper_kills += 1;
            }
            k => {
                // Mostly one receiver at a time, so the other takes over mid-backlog.
                let i = (k as usize - 1) % 2;
                let mut p = rs[i].take().unwrap();
                p.child.kill().unwrap();
                let _ = p.child.wait();
                receiver_kills += 1;
                tokio::time::sleep(Duration::from_millis(rng.below(800))).await;
            }
        }
        kills += 1;
        for (i, slot) in rs.iter_mut().enumerate() {
            if slot.is_none() {
                *slot = Some(Process::start(&cfgs[i], &[]));
            }
        }
        if ship.is_none() {
            ship = Some(spawn_shipper(&scfg));
        }
        assert!(
            started.elapsed() < Duration::from_secs(240),
            "crash loop too slow"
        );
    }
    let deadline = Instant::now() + Duration::from_secs(180);
    while std::fs::read_dir(&eps).unwrap().count() > 0 {
        assert!(Instant::now() < deadline, "backlog never drained");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let mut s = ship.take().unwrap();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(s.id() as i32), Signal::SIGTERM).unwrap();
    let _ = s.wait();
    for p in rs.iter_mut().flatten() {
        p.signal(Signal::SIGTERM);
        assert_eq!(p.wait_exit(Duration::from_secs(10)), Some(0));
    }

    let shipped = w.data_dir(HOST).join("shipped");
    let expected: Vec<String> = (0..n_eps).map(|i| format!("ep-{i:04}")).collect();
    let names: Vec<String> = std::fs::read_dir(&shipped)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    let lost = expected.iter().filter(|e| !names.contains(e)).count();
    let quarantined = std::fs::read_dir(w.data_dir(HOST).join("quarantine"))
        .unwrap()
        .count();
    let bodies = b.keys("episodes").await;
    let rows = b.keys("index").await;
    let mut duplicated = names.len().saturating_sub(n_eps)
        + bodies.len().saturating_sub(n_eps)
        + rows.len().saturating_sub(n_eps);
    let mut corrupted = 0;
    for name in &expected {
        let mine: Vec<_> = bodies
            .iter()
            .filter(|k| k.starts_with(&format!("episodes/{HOST}/{name}/")))
            .collect();
        if mine.len() != 1 {
            duplicated += mine.len().saturating_sub(1);
            continue;
        }
        let (p, _) = episode::pack(&shipped.join(name), name);
        let data = b.get(mine[0]).await.unwrap();
        let tar = zstd::decode_all(&data[..]).unwrap_or_default();
        let row = b.json(&format!("index/{HOST}/{name}.json")).await;
        if *mine[0] != body_key(name, &p.tar_sha256)
            || hex::encode(sha2::Sha256::digest(&tar)) != p.tar_sha256
            || row.is_none_or(|r| r["tar_sha256"] != p.tar_sha256.as_str())
        {
            corrupted += 1;
        }
    }
    let leftovers = std::fs::read_dir(w.data_dir(HOST).join("outbox"))
        .unwrap()
        .count();
    println!(
        "s3 crash harness: kills={kills} (shipper {shipper_kills}, receivers {receiver_kills}) episodes={n_eps} lost={lost} duplicated={duplicated} corrupted={corrupted} quarantined={quarantined} leftovers={leftovers} seconds={:.1} seed={seed}",
        started.elapsed().as_secs_f64()
    );
    assert_eq!(
        (lost, duplicated, corrupted, quarantined, leftovers),
        (0, 0, 0, 0, 0)
    );
}

/// A receiver SIGKILLed in the middle of an upload: the shipper moves to the second URL and
/// the episode is stored once, through the survivor.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receiver_killed_mid_upload_fails_over_to_the_other() {
    let w = World::new(2);
    let g = Garage::start(&w.path().join("garage"));
    let b = g.bucket();
    let cfg = setup(&w, &g, None, "");
    let mut ra = Process::start(&cfg, &[]);
    let rb = Process::start(&cfg, &[]);
    let scfg = w.shipper_config(
        HOST,
        &format!(
            "[\"https://localhost:{}\", \"https://localhost:{}\"]",
            ra.addr.port(),
            rb.addr.port()
        ),
        // 24 MB at 48 Mbit/s: about 4 s on the wire, time to kill A mid-body.
        "[shipping]\nbandwidth_limit_mbps = 48\nconcurrency = 1\n",
    );
    let eps = w.data_dir(HOST).join("episodes");
    std::fs::create_dir_all(&eps).unwrap();
    let gen = w.path().join("gen");
    let e = episode::body(&gen, "ep-long", &w.commits[1], 24_000_000);
    std::fs::rename(gen.join("ep-long"), eps.join("ep-long")).unwrap();
    let mut ship = spawn_shipper(&scfg);
    // Kill A once it has read some of the body.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (_, m) = cis490_tests::harness::ops_get(ra.ops_addr, "/metrics").await;
        if metric(&m, "cis490_receiver_body_bytes_read_total").unwrap_or(0.0) > 2e6 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the upload never reached receiver A"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    ra.child.kill().unwrap();
    let _ = ra.child.wait();
    let shipped = w.data_dir(HOST).join("shipped/ep-long");
    let deadline = Instant::now() + Duration::from_secs(60);
    while !shipped.exists() {
        assert!(Instant::now() < deadline, "not shipped through receiver B");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _ = ship.kill();
    let _ = ship.wait();
    assert!(
        rb.log_text().contains("episode stored"),
        "receiver B stored it: {}",
        rb.log_text()
    );
    assert_eq!(
        b.keys(&format!("episodes/{HOST}/ep-long")).await,
        vec![body_key("ep-long", &e.sha)]
    );
    // The shipper packs with its default, `compression = "auto"` (one zstd thread in the
    // tests' config): the same body as packing the retired directory again that way.
    let (_, packed) = cis490_shipper::pack::pack(
        &shipped,
        "ep-long",
        Vec::new(),
        cis490_shipper::pack::Compression {
            level: 3,
            threads: 1,
            mode: cis490_shipper::pack::Mode::Auto,
        },
    )
    .unwrap();
    let stored = b.get(&body_key("ep-long", &e.sha)).await.unwrap();
    assert!(stored.to_vec() == packed, "the body as packed");
    assert!(b
        .json(&format!("index/{HOST}/ep-long.json"))
        .await
        .is_some());
}

#[test]
fn s3_config_errors_exit_2_naming_the_key() {
    let w = World::new(1);
    let base = "[store]\nkind = \"s3\"\nendpoint = \"http://127.0.0.1:9\"\nbucket = \"b\"\n";
    let key = w.path().join("ak");
    std::fs::write(&key, "GK1\n").unwrap();
    let empty = w.path().join("empty");
    std::fs::write(&empty, "  \n").unwrap();
    let cases = [
        (
            format!("{base}secret_key_file = \"{}\"\n", key.display()),
            "store.access_key_file: is required",
        ),
        (
            format!(
                "{base}access_key_file = \"{}\"\nsecret_key_file = \"/nonexistent/sk\"\n",
                key.display()
            ),
            "store.secret_key_file: /nonexistent/sk: No such file",
        ),
        (
            format!(
                "{base}access_key_file = \"{}\"\nsecret_key_file = \"{}\"\n",
                empty.display(),
                key.display()
            ),
            "store.access_key_file:",
        ),
    ];
    for (section, want) in cases {
        let cfg = w.config(&section);
        for cmd in ["check-config", "serve", "export-index"] {
            let (code, _, err) = receiver_cmd(&cfg, cmd);
            assert_eq!(code, 2, "{cmd}: {err}");
            assert!(
                err.contains(want) && err.lines().count() == 1,
                "{cmd}: {err}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ping_and_doctor_report_every_receiver() {
    let w = World::new(2);
    let r = InProcess::start(&w.config("")).await;
    let dead = free_port();
    let scfg = w.shipper_config(
        HOST,
        &format!(
            "[\"https://localhost:{}\", \"https://localhost:{dead}\"]",
            r.addr.port()
        ),
        "",
    );
    let (code, out, _) = shipper(&scfg, &["ping", "--commit", &w.commits[1]]);
    assert_eq!(code, 1, "one receiver is down: {out}");
    assert!(
        out.contains(&format!("receiver:   https://localhost:{}", r.addr.port())),
        "{out}"
    );
    assert!(
        out.contains(&format!("receiver:   https://localhost:{dead}")),
        "{out}"
    );
    assert!(
        out.contains("ADMITTED") && out.contains("UNREACHABLE"),
        "{out}"
    );
    assert!(out.contains("summary:    1 of 2 receivers OK"), "{out}");

    let log = w.path().join("empty.log");
    std::fs::write(&log, "").unwrap();
    let (_, out, err) = shipper(&scfg, &["doctor", "--log-file", log.to_str().unwrap()]);
    let up = out
        .lines()
        .find(|l| l.contains(&format!("receiver https://localhost:{}", r.addr.port())))
        .unwrap_or_else(|| panic!("{out}{err}"));
    assert!(up.contains("reachable"), "{up}");
    let down = out
        .lines()
        .find(|l| l.contains(&format!("receiver https://localhost:{dead}")))
        .unwrap_or_else(|| panic!("{out}"));
    assert!(down.contains("unreachable"), "{down}");
    r.stop().await;
}
