//! The HTTP API of SPEC §3 against an in-process receiver over real mTLS.

use cis490_tests::episode;
use cis490_tests::harness::World;
use serde_json::json;

use crate::support::{files_under, index_rows, metric_value, start};

const HOST: &str = "labhost-01";

fn headers(commit: &str, sha: &str) -> Vec<(&'static str, String)> {
    vec![
        ("x-cis490-code-commit", commit.to_string()),
        ("x-cis490-tar-sha256", sha.to_string()),
        ("content-type", "application/zstd".to_string()),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn put_stores_durably_then_answers_already_stored_and_conflict() {
    let w = World::new(3);
    let r = start(&w, "").await;
    let c = w.client(r.addr, HOST);
    let b = episode::body(&w.path().join("src"), "ep-001", &w.commits[2], 200_000);

    let first = c.put(HOST, &b).await;
    assert_eq!(
        first.status,
        201,
        "{}",
        String::from_utf8_lossy(&first.body)
    );
    assert_eq!(
        first.json(),
        json!({"status": "stored", "host_id": HOST, "episode_id": "ep-001",
               "tar_sha256": b.sha, "bytes": b.bytes.len()})
    );
    let stored = w
        .store_dir()
        .join("episodes")
        .join(HOST)
        .join("ep-001.tar.zst");
    assert_eq!(
        std::fs::read(&stored).unwrap(),
        b.bytes,
        "body stored exactly as received"
    );
    let rows = index_rows(&w.store_dir());
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0]["path"], format!("episodes/{HOST}/ep-001.tar.zst"));
    assert_eq!(rows[0]["tar_sha256"], b.sha);
    assert_eq!(rows[0]["commit"], w.commits[2]);
    assert_eq!(rows[0]["files"], 2);
    assert_eq!(rows[0]["bytes"], b.bytes.len());
    assert!(rows[0]["uncompressed_bytes"].as_u64().unwrap() > 200_000);

    let read_before = metric_value(&r, "cis490_receiver_body_bytes_read_total").await;
    let again = c.put(HOST, &b).await;
    assert_eq!(again.status, 200);
    assert_eq!(again.json()["status"], "already_stored");
    let read_after = metric_value(&r, "cis490_receiver_body_bytes_read_total").await;
    assert_eq!(
        read_before, read_after,
        "already_stored is answered without reading the body"
    );

    let other = episode::body(&w.path().join("src2"), "ep-001", &w.commits[2], 1000);
    let conflict = c.put(HOST, &other).await;
    assert_eq!(conflict.status, 409);
    assert_eq!(conflict.error(), "conflict");
    assert_eq!(
        std::fs::read(&stored).unwrap(),
        b.bytes,
        "a conflict never replaces bytes"
    );
    assert_eq!(index_rows(&w.store_dir()).len(), 1);

    let got = c
        .request("GET", &format!("/v1/episodes/{HOST}/ep-001"), &[], vec![])
        .await
        .unwrap();
    assert_eq!(got.status, 200);
    assert_eq!(got.json(), rows[0]);
    let missing = c
        .request("GET", &format!("/v1/episodes/{HOST}/nope"), &[], vec![])
        .await
        .unwrap();
    assert_eq!(missing.status, 404);
    let (_, m) = r.ops_get("/metrics").await;
    assert!(
        m.contains("cis490_receiver_uploads_total{status=\"201\"} 1"),
        "{m}"
    );
    assert!(
        m.contains("cis490_receiver_uploads_total{status=\"409\"} 1"),
        "{m}"
    );
    assert!(
        m.contains(&format!(
            "cis490_receiver_stored_bytes_total {}",
            b.bytes.len()
        )),
        "{m}"
    );
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_hosts_path_is_forbidden() {
    let w = World::new(1);
    let r = start(&w, "").await;
    let intruder = w.client(r.addr, "labhost-02");
    let b = episode::body(&w.path().join("src"), "ep1", &w.commits[0], 100);
    let reply = intruder.put(HOST, &b).await;
    assert_eq!(reply.status, 403);
    assert_eq!(reply.error(), "forbidden");
    assert!(reply.json()["message"]
        .as_str()
        .unwrap()
        .contains("labhost-02"));
    let own = w.client(r.addr, HOST);
    assert_eq!(own.put(HOST, &b).await.status, 201);
    let peek = intruder
        .request("GET", &format!("/v1/episodes/{HOST}/ep1"), &[], vec![])
        .await
        .unwrap();
    assert_eq!(peek.status, 403, "a host sees only its own episodes");
    assert!(files_under(&w.store_dir().join("episodes")).len() == 1);
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_headers_and_paths_get_400_with_remediation() {
    let w = World::new(2);
    let r = start(&w, "").await;
    let c = w.client(r.addr, HOST);
    let b = episode::body(&w.path().join("src"), "ep1", &w.commits[1], 100);
    let path = format!("/v1/episodes/{HOST}/ep1");

    let mut h = headers(&b.commit, &b.sha);
    h.remove(0);
    let missing = c.request("PUT", &path, &h, b.bytes.clone()).await.unwrap();
    assert_eq!(missing.status, 400);
    assert_eq!(missing.error(), "missing_commit");
    let rem = missing.json()["remediation"].as_str().unwrap().to_string();
    assert_eq!(
        rem,
        "cd /opt/cis490 && sudo -u cis490 git pull origin main\nsudo /opt/cis490/scripts/install-lab-host.sh"
    );

    for bad in [&b.commit[..39], &format!("{}0", b.commit), &"g".repeat(40)] {
        let reply = c
            .request("PUT", &path, &headers(bad, &b.sha), b.bytes.clone())
            .await
            .unwrap();
        assert_eq!(reply.status, 400, "{bad}");
        assert_eq!(reply.error(), "malformed_commit");
        assert!(reply.json()["remediation"].is_string());
    }

    let mut h = headers(&b.commit, &b.sha);
    h.remove(1);
    let nosha = c.request("PUT", &path, &h, b.bytes.clone()).await.unwrap();
    assert_eq!(
        (nosha.status, nosha.error().as_str()),
        (400, "malformed_request")
    );
    let badsha = c
        .request("PUT", &path, &headers(&b.commit, "abc"), b.bytes.clone())
        .await
        .unwrap();
    assert_eq!(
        (badsha.status, badsha.error().as_str()),
        (400, "malformed_request")
    );
    let mut h = headers(&b.commit, &b.sha);
    h[2].1 = "text/plain".into();
    let ct = c.request("PUT", &path, &h, b.bytes.clone()).await.unwrap();
    assert_eq!((ct.status, ct.error().as_str()), (400, "malformed_request"));

    for bad_path in [
        format!("/v1/episodes/{HOST}/..x"),
        format!("/v1/episodes/{HOST}/-lead"),
        format!("/v1/episodes/{HOST}/{}", "x".repeat(129)),
        "/v1/episodes/bad%20host/ep1".to_string(),
    ] {
        let reply = c
            .request(
                "PUT",
                &bad_path,
                &headers(&b.commit, &b.sha),
                b.bytes.clone(),
            )
            .await
            .unwrap();
        assert_eq!(
            (reply.status, reply.error().as_str()),
            (400, "invalid_id"),
            "{bad_path}"
        );
    }

    let upper = c
        .request(
            "PUT",
            &path,
            &headers(&b.commit.to_uppercase(), &b.sha.to_uppercase()),
            b.bytes.clone(),
        )
        .await
        .unwrap();
    assert_eq!(
        upper.status,
        201,
        "uppercase commit and SHA are accepted: {:?}",
        upper.json()
    );
    assert_eq!(index_rows(&w.store_dir())[0]["commit"], b.commit);
    assert_eq!(
        files_under(&w.store_dir().join("quarantine")),
        Vec::<String>::new()
    );
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_commit_gets_412_with_the_fix() {
    let w = World::new(5);
    let r = start(&w, &format!(
        "[version_gate]\nrepo_path = \"{}\"\nwindow = 2\nremediation = \"cd /srv/lab && git pull  # you: {{your_commit}} head: {{head_commit}}\"\n",
        w.repo.path.display()
    ))
    .await;
    let c = w.client(r.addr, HOST);
    let old = episode::body(&w.path().join("src"), "ep-old", &w.commits[2], 100);
    let reply = c.put(HOST, &old).await;
    assert_eq!(reply.status, 412);
    let j = reply.json();
    assert_eq!(j["error"], "commit_not_in_window");
    assert_eq!(j["your_commit"], w.commits[2]);
    assert_eq!(j["head_commit"], w.commits[4]);
    assert_eq!(
        j["remediation"],
        format!(
            "cd /srv/lab && git pull  # you: {} head: {}",
            w.commits[2], w.commits[4]
        )
    );
    let ok = episode::body(&w.path().join("src"), "ep-new", &w.commits[3], 100);
    assert_eq!(
        c.put(HOST, &ok).await.status,
        201,
        "second newest is inside a window of 2"
    );
    assert_eq!(
        files_under(&w.store_dir().join("episodes")),
        vec![format!("{HOST}/ep-new.tar.zst")]
    );
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_pushed_a_moment_ago_is_admitted_by_refresh_on_miss() {
    let mut w = World::new(2);
    let r = start(
        &w,
        &format!(
            "[version_gate]\nrepo_path = \"{}\"\nrefresh_interval_s = 3600\n",
            w.repo.path.display()
        ),
    )
    .await;
    let fresh = w.repo.commit();
    let c = w.client(r.addr, HOST);
    let b = episode::body(&w.path().join("src"), "ep1", &fresh, 100);
    let reply = c.put(HOST, &b).await;
    assert_eq!(reply.status, 201, "{:?}", reply.json());
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_preflight_answers_what_the_put_would() {
    let w = World::new(3);
    let r = start(&w, "[limits]\nmax_body_bytes = 100000\n").await;
    let c = w.client(r.addr, HOST);
    let b = episode::body(&w.path().join("src"), "ep1", &w.commits[2], 1000);
    let path = format!("/v1/episodes/{HOST}/ep1/check");
    let mut h = headers(&b.commit, &b.sha);
    h.push(("x-cis490-upload-length", b.bytes.len().to_string()));
    let go = c.request("POST", &path, &h, vec![]).await.unwrap();
    assert_eq!(go.status, 204);
    let mut big = headers(&b.commit, &b.sha);
    big.push(("x-cis490-upload-length", "100001".into()));
    let too = c.request("POST", &path, &big, vec![]).await.unwrap();
    assert_eq!((too.status, too.error().as_str()), (413, "too_large"));
    let no_len = c
        .request("POST", &path, &headers(&b.commit, &b.sha), vec![])
        .await
        .unwrap();
    assert_eq!(
        no_len.status, 204,
        "without an upload length no size check is made"
    );
    assert_eq!(c.put(HOST, &b).await.status, 201);
    let already = c.request("POST", &path, &h, vec![]).await.unwrap();
    assert_eq!(already.status, 200);
    assert_eq!(already.json()["status"], "already_stored");
    let other = c
        .request("POST", &path, &headers(&b.commit, &"0".repeat(64)), vec![])
        .await
        .unwrap();
    assert_eq!(other.status, 409);
    let nothing_here = episode::body(&w.path().join("src"), "ep2", &"1".repeat(40), 10);
    let stale = c
        .request(
            "POST",
            &format!("/v1/episodes/{HOST}/ep2/check"),
            &headers(&nothing_here.commit, &nothing_here.sha),
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(stale.status, 412);
    assert!(
        files_under(&w.store_dir().join("episodes")).len() == 1,
        "check writes nothing"
    );
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ping_reports_identity_gate_and_admission() {
    let w = World::new(3);
    let r = start(&w, "").await;
    let c = w.client(r.addr, HOST);
    let p = c.request("POST", "/v1/ping", &[], vec![]).await.unwrap();
    assert_eq!(p.status, 200);
    let j = p.json();
    assert_eq!(j["ok"], true);
    assert_eq!(j["host_id"], HOST);
    assert_eq!(j["receiver_version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(j["gate"]["enabled"], true);
    assert_eq!(j["gate"]["source"], "git");
    assert_eq!(j["gate"]["head_commit"], w.commits[2]);
    assert_eq!(j["gate"]["commits"], 3);
    assert_eq!(j["gate"]["window"], 100);
    assert!(j["gate"]["age_s"].is_u64());
    assert_eq!(j["commit_accepted"], serde_json::Value::Null);

    let yes = c
        .request(
            "POST",
            "/v1/ping",
            &[("x-cis490-code-commit", w.commits[0].clone())],
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(yes.json()["commit_accepted"], true);
    let no = c
        .request(
            "POST",
            "/v1/ping",
            &[("x-cis490-code-commit", "a".repeat(40))],
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(no.json()["commit_accepted"], false);
    assert!(no.json()["remediation"]
        .as_str()
        .unwrap()
        .contains("git pull"));
    assert!(files_under(&w.store_dir().join("episodes")).is_empty());
    r.stop().await;
}

/// Builds a zstd tarball from raw entries, bypassing the canonical packer.
fn raw_body(entries: &[(&str, tar::EntryType, &[u8])]) -> (Vec<u8>, String) {
    use sha2::Digest;
    let mut b = tar::Builder::new(Vec::new());
    for (name, kind, data) in entries {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(*kind);
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        if *kind == tar::EntryType::Symlink {
            h.set_size(0);
            b.append_link(&mut h, name, "/etc/passwd").unwrap();
        } else {
            b.append_data(&mut h, name, *data).unwrap();
        }
    }
    let raw = b.into_inner().unwrap();
    let sha = hex::encode(sha2::Sha256::digest(&raw));
    (zstd::encode_all(&raw[..], 3).unwrap(), sha)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_bodies_get_422_are_quarantined_and_store_nothing() {
    let w = World::new(2);
    let r = start(&w, "").await;
    let c = w.client(r.addr, HOST);
    let commit = w.commits[1].clone();
    let meta = format!(r#"{{"episode_id":"ep1","code_version":{{"commit":"{commit}"}}}}"#);
    let other_meta = format!(
        r#"{{"episode_id":"ep1","code_version":{{"commit":"{}"}}}}"#,
        w.commits[0]
    );
    let reg = tar::EntryType::Regular;
    let good = raw_body(&[("ep1/meta.json", reg, meta.as_bytes())]);
    let cases: Vec<(&str, Vec<u8>, String, &str)> = vec![
        ("sha mismatch", good.0.clone(), "0".repeat(64), "SHA-256"),
        (
            "not zstd",
            b"this is not zstd at all".to_vec(),
            good.1.clone(),
            "zstd",
        ),
        {
            let (b, s) = raw_body(&[("ep1/data", reg, b"x")]);
            ("no meta.json", b, s, "meta.json")
        },
        {
            let (b, s) = raw_body(&[("ep1/meta.json", reg, other_meta.as_bytes())]);
            ("meta commit differs", b, s, "differs")
        },
        {
            let (b, s) = raw_body(&[
                ("ep1/meta.json", reg, meta.as_bytes()),
                ("ep2/x", reg, b"x"),
            ]);
            ("foreign root", b, s, "outside ep1/")
        },
        {
            let (b, s) = raw_body(&[
                ("ep1/meta.json", reg, meta.as_bytes()),
                ("ep1/l", tar::EntryType::Symlink, b""),
            ]);
            ("symlink", b, s, "symlink")
        },
        {
            let (b, s) = raw_body(&[("ep1/meta.json", reg, b"{not json")]);
            ("bad meta json", b, s, "JSON")
        },
        {
            let mut body = good.0.clone();
            body.extend_from_slice(b"garbage after the frame");
            ("trailing garbage", body, good.1.clone(), "zstd")
        },
    ];
    let path = format!("/v1/episodes/{HOST}/ep1");
    for (name, body, sha, needle) in &cases {
        let reply = c
            .request("PUT", &path, &headers(&commit, sha), body.clone())
            .await
            .unwrap();
        assert_eq!(
            reply.status,
            422,
            "{name}: {}",
            String::from_utf8_lossy(&reply.body)
        );
        assert_eq!(reply.error(), "invalid_content", "{name}");
        let msg = reply.json()["message"].as_str().unwrap().to_string();
        assert!(msg.contains(needle), "{name}: {msg}");
    }
    assert!(
        files_under(&w.store_dir().join("episodes")).is_empty(),
        "nothing stored"
    );
    assert!(index_rows(&w.store_dir()).is_empty(), "index untouched");
    let q = files_under(&w.store_dir().join("quarantine"));
    assert_eq!(
        q.iter().filter(|f| f.ends_with(".reason.json")).count(),
        cases.len(),
        "{q:?}"
    );
    let reason: serde_json::Value = serde_json::from_slice(
        &std::fs::read(
            w.store_dir()
                .join("quarantine")
                .join(q.iter().find(|f| f.ends_with(".reason.json")).unwrap()),
        )
        .unwrap(),
    )
    .unwrap();
    assert_eq!(reason["http_status"], 422);
    assert_eq!(reason["host_id"], HOST);
    assert!(
        files_under(&w.store_dir().join("tmp")).is_empty(),
        "no temp files left"
    );
    assert!(metric_value(&r, "cis490_receiver_quarantine_bytes").await > 0.0);
    // The good body is still accepted afterwards.
    let reply = c
        .request("PUT", &path, &headers(&commit, &good.1), good.0.clone())
        .await
        .unwrap();
    assert_eq!(reply.status, 201);
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_puts_of_one_id_store_one_copy() {
    let w = World::new(1);
    let r = start(&w, "").await;
    let c = w.client(r.addr, HOST);
    let b = std::sync::Arc::new(episode::body(
        &w.path().join("src"),
        "ep-race",
        &w.commits[0],
        300_000,
    ));
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let (c, b) = (c.clone(), b.clone());
        tasks.push(tokio::spawn(async move { c.put(HOST, &b).await.status }));
    }
    let mut statuses = Vec::new();
    for t in tasks {
        statuses.push(t.await.unwrap());
    }
    statuses.sort();
    assert_eq!(
        statuses.iter().filter(|s| **s == 201).count(),
        1,
        "{statuses:?}"
    );
    assert!(
        statuses.iter().all(|s| *s == 200 || *s == 201),
        "{statuses:?}"
    );
    assert_eq!(index_rows(&w.store_dir()).len(), 1);
    let stored = w
        .store_dir()
        .join("episodes")
        .join(HOST)
        .join("ep-race.tar.zst");
    assert_eq!(std::fs::read(stored).unwrap(), b.bytes);
    assert!(files_under(&w.store_dir().join("tmp")).is_empty());
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_uploads_work() {
    let w = World::new(1);
    let r = start(&w, "").await;
    let c = w.client(r.addr, HOST).http2();
    let b = episode::body(&w.path().join("src"), "ep-h2", &w.commits[0], 100_000);
    let reply = c.put(HOST, &b).await;
    assert_eq!(reply.status, 201);
    assert_eq!(
        std::fs::read(
            w.store_dir()
                .join("episodes")
                .join(HOST)
                .join("ep-h2.tar.zst")
        )
        .unwrap(),
        b.bytes
    );
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bearer_tokens_are_checked_when_configured() {
    let w = World::new(1);
    let tokens = w.path().join("tokens");
    std::fs::write(&tokens, format!("# host token\n{HOST} s3cret-token\n")).unwrap();
    let r = start(
        &w,
        &format!("[auth]\ntokens_file = \"{}\"\n", tokens.display()),
    )
    .await;
    let b = episode::body(&w.path().join("src"), "ep1", &w.commits[0], 100);
    let none = w.client(r.addr, HOST).put(HOST, &b).await;
    assert_eq!((none.status, none.error().as_str()), (401, "unauthorized"));
    let wrong = w
        .client(r.addr, HOST)
        .with_token("guess")
        .put(HOST, &b)
        .await;
    assert_eq!(
        (wrong.status, wrong.error().as_str()),
        (401, "unauthorized")
    );
    assert!(files_under(&w.store_dir().join("episodes")).is_empty());
    let right = w
        .client(r.addr, HOST)
        .with_token("s3cret-token")
        .put(HOST, &b)
        .await;
    assert_eq!(right.status, 201);
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gate_without_a_list_answers_503_never_412_and_disabled_gate_admits() {
    let w = World::new(1);
    let r = start(
        &w,
        &format!(
            "[version_gate]\nrepo_path = \"{}\"\n",
            w.path().join("no-such-repo").display()
        ),
    )
    .await;
    let c = w.client(r.addr, HOST);
    let b = episode::body(&w.path().join("src"), "ep1", &w.commits[0], 100);
    let reply = c.put(HOST, &b).await;
    assert_eq!(
        (reply.status, reply.error().as_str()),
        (503, "gate_unavailable")
    );
    assert!(reply.headers.get("retry-after").is_some());
    let (status, body) = r.ops_get("/healthz").await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("no-such-repo"), "{body}");
    r.stop().await;

    let w = World::new(1);
    let r = start(&w, "[version_gate]\nenabled = false\n").await;
    let c = w.client(r.addr, HOST);
    let b = episode::body(&w.path().join("src"), "ep1", &"c".repeat(40), 100);
    assert_eq!(
        c.put(HOST, &b).await.status,
        201,
        "disabled gate admits any well-formed commit"
    );
    let (status, body) = r.ops_get("/healthz").await;
    assert_eq!(status, 200);
    assert!(body.contains("disabled"), "{body}");
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthz_and_metrics_describe_the_receiver() {
    let w = World::new(2);
    let r = start(&w, "").await;
    let (status, body) = r.ops_get("/healthz").await;
    assert_eq!(status, 200, "{body}");
    let (status, m) = r.ops_get("/metrics").await;
    assert_eq!(status, 200);
    for series in [
        "cis490_receiver_stored_bytes_total",
        "cis490_receiver_uploads_in_flight",
        "cis490_gate_commits 2",
        "cis490_gate_age_seconds",
        "cis490_gate_source{source=\"git\"} 1",
        "cis490_gate_source{source=\"forgejo\"} 0",
        "cis490_gate_refresh_failures_total 0",
        "cis490_receiver_quarantine_bytes",
        // OpenMetrics names a counter's family without `_total`; its samples carry it.
        "# TYPE cis490_receiver_uploads counter",
    ] {
        assert!(m.contains(series), "missing {series} in\n{m}");
    }
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stored_episode_is_already_stored_even_after_its_commit_left_the_window() {
    // A shipper that crashed between the 201 and retiring must be able to retire it later.
    let mut w = World::new(2);
    let r = start(
        &w,
        &format!(
            "[version_gate]\nrepo_path = \"{}\"\nwindow = 2\nrefresh_interval_s = 1\n",
            w.repo.path.display()
        ),
    )
    .await;
    let c = w.client(r.addr, HOST);
    let b = episode::body(&w.path().join("src"), "ep-1", &w.commits[0], 1000);
    assert_eq!(c.put(HOST, &b).await.status, 201);
    w.repo.commit();
    w.repo.commit();
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    let fresh = episode::body(&w.path().join("src"), "ep-probe", &w.commits[0], 10);
    assert_eq!(
        c.put(HOST, &fresh).await.status,
        412,
        "the old commit is out of the window now"
    );
    let again = c.put(HOST, &b).await;
    assert_eq!(again.status, 200, "{:?}", again.json());
    assert_eq!(again.json()["status"], "already_stored");
    let other = episode::body(&w.path().join("src2"), "ep-1", &w.commits[0], 2000);
    assert_eq!(
        c.put(HOST, &other).await.status,
        412,
        "different bytes from a stale commit: the gate answers"
    );
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_disconnects_mid_body_leaves_nothing_behind() {
    use tokio::io::AsyncWriteExt;
    let w = World::new(1);
    let r = start(&w, "").await;
    let b = episode::body(&w.path().join("src"), "ep-cut", &w.commits[0], 500_000);
    let mut s = cis490_tests::client::raw_tls(r.addr, &w.pki.ca_file, &w.pki.client(HOST)).await;
    let head = format!(
        "PUT /v1/episodes/{HOST}/ep-cut HTTP/1.1\r\nhost: localhost\r\ncontent-length: {}\r\nx-cis490-code-commit: {}\r\nx-cis490-tar-sha256: {}\r\n\r\n",
        b.bytes.len(), b.commit, b.sha
    );
    s.write_all(head.as_bytes()).await.unwrap();
    s.write_all(&b.bytes[..200_000]).await.unwrap();
    s.flush().await.unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    drop(s);
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    assert!(
        files_under(&w.store_dir().join("quarantine")).is_empty(),
        "a cut upload is not quarantined"
    );
    assert!(files_under(&w.store_dir().join("tmp")).is_empty());
    assert!(files_under(&w.store_dir().join("episodes")).is_empty());
    assert_eq!(w.client(r.addr, HOST).put(HOST, &b).await.status, 201);
    r.stop().await;
}
