//! The hostile-upload corpus (tests/corpus/hostile/, made by src/bin/e2e-corpus.rs) against the
//! real receiver process: every case refused with the expected status, nothing written outside
//! the receiver's quarantine, memory bounded.

use std::io::Read;
use std::path::Path;

use cis490_tests::harness::{Process, World};
use sha2::Digest;

use crate::support::{files_under, index_rows};

const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

/// SHA-256 of whatever the body decodes to (streamed), or zeros when it does not decode.
fn tar_sha(body: &[u8]) -> String {
    let Ok(mut dec) = zstd::stream::read::Decoder::new(body) else {
        return "0".repeat(64);
    };
    let mut h = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        match dec.read(&mut buf) {
            Ok(0) => return hex::encode(h.finalize()),
            Ok(n) => h.update(&buf[..n]),
            Err(_) => return "0".repeat(64),
        }
    }
}

fn rss_peak_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| {
            l.strip_prefix("VmHWM:")
                .map(|v| v.trim().trim_end_matches(" kB").trim().parse().unwrap())
        })
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_hostile_upload_is_refused_and_contained() {
    let corpus = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus/hostile");
    let expected = std::fs::read_to_string(corpus.join("EXPECTED")).unwrap();
    let w = World::new(1);
    let p = Process::start(
        &w.config("[version_gate]\nenabled = false\n[limits]\nmax_uncompressed_bytes = 67108864\n"),
        &[],
    );
    let c = w.client(p.addr, "labhost-01");
    let mut n = 0;
    for line in expected
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
    {
        let mut parts = line.splitn(3, ' ');
        let (name, status, needle) = (
            parts.next().unwrap(),
            parts.next().unwrap(),
            parts.next().unwrap(),
        );
        let status: u16 = status.parse().unwrap();
        let body = std::fs::read(corpus.join(format!("{name}.tar.zst"))).unwrap();
        let sha = tar_sha(&body);
        let len = body.len().to_string();
        let reply = c
            .request(
                "PUT",
                "/v1/episodes/labhost-01/ep-hostile",
                &[
                    ("x-cis490-code-commit", COMMIT.to_string()),
                    ("x-cis490-tar-sha256", sha),
                    ("content-type", "application/zstd".to_string()),
                    ("content-length", len),
                ],
                body,
            )
            .await
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(
            reply.status,
            status,
            "{name}: {}",
            String::from_utf8_lossy(&reply.body)
        );
        let msg = reply.json()["message"].as_str().unwrap_or("").to_string();
        assert!(msg.contains(needle), "{name}: {msg:?} lacks {needle:?}");
        n += 1;
    }
    assert!(n >= 30, "corpus has {n} cases");
    let store = w.store_dir();
    assert!(
        files_under(&store.join("episodes")).is_empty(),
        "nothing stored"
    );
    assert!(index_rows(&store).is_empty());
    assert!(files_under(&store.join("tmp")).is_empty(), "no temp files");
    for f in files_under(&store) {
        assert!(
            f.starts_with("quarantine/") || f == "index.jsonl" || f == ".lock",
            "{f} outside quarantine"
        );
    }
    for f in files_under(w.path()) {
        assert!(
            !f.contains("escape") && !f.contains("evil"),
            "{f} written by an upload"
        );
    }
    let peak = rss_peak_kib(p.child.id());
    println!(
        "hostile corpus: {n} cases refused; receiver peak RSS {} MiB",
        peak / 1024
    );
    assert!(peak < 200 * 1024, "receiver peak RSS {peak} KiB");
    // Still healthy afterwards.
    let good = cis490_tests::episode::body(&w.path().join("src"), "ep-fine", COMMIT, 1000);
    assert_eq!(c.put("labhost-01", &good).await.status, 201);
}
