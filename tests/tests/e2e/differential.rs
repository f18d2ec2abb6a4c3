//! The receiver against the extractors a dataset consumer uses (SPEC §16): whatever it admits,
//! GNU tar and Python's `tarfile` extract to exactly the paths and types it checked; whatever it
//! refuses leaves nothing stored. Cases: the hostile corpus, the shipper's own packs, and a
//! seeded family of header combinations (`CIS490_DIFF_SEED` replays one).

use std::collections::BTreeMap;
use std::io::Read;
use std::path::Path;
use std::process::Command;

use cis490_receiver::ingest::{self, Expect};
use cis490_receiver::tarwalk::Kind;
use cis490_tests::client::Client;
use cis490_tests::harness::{Lcg, Process, World};
use cis490_tests::rawtar::{meta, pax_record, Header, Tar, USTAR_MAGIC};
use sha2::Digest;

use crate::support::index_rows;

const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";
const HOST: &str = "labhost-01";

/// Path → 'f' (regular file) or 'd' (directory), or 'l'/'o' for anything else an extractor made.
type Tree = BTreeMap<String, char>;

fn tar_sha(body: &[u8]) -> String {
    let mut out = Vec::new();
    match zstd::stream::read::Decoder::new(body).and_then(|mut d| d.read_to_end(&mut out)) {
        Ok(_) => hex::encode(sha2::Sha256::digest(&out)),
        Err(_) => "0".repeat(64),
    }
}

/// What the receiver's own validator lists for a stored body, with the directories its paths
/// imply (extraction creates those too).
fn receiver_tree(stored: &Path, ep: &str) -> Tree {
    let f = std::fs::File::open(stored).unwrap();
    let mut tree = Tree::new();
    let mut e = Expect::new(ep, 1 << 30);
    e.max_ratio = 0;
    ingest::validate_listing(f, std::io::sink(), &e, |rel, kind| {
        let path = if rel.is_empty() {
            ep.to_string()
        } else {
            format!("{ep}/{rel}")
        };
        let mut up = path.as_str();
        while let Some(cut) = up.rfind('/') {
            up = &up[..cut];
            tree.entry(up.to_string()).or_insert('d');
        }
        tree.insert(
            path,
            match kind {
                Kind::File => 'f',
                Kind::Dir => 'd',
            },
        );
    })
    .unwrap();
    tree
}

fn walk(dir: &Path) -> Tree {
    fn go(base: &Path, d: &Path, out: &mut Tree) {
        for e in std::fs::read_dir(d).unwrap().flatten() {
            let p = e.path();
            let rel = p.strip_prefix(base).unwrap().to_string_lossy().into_owned();
            let t = std::fs::symlink_metadata(&p).unwrap().file_type();
            let c = if t.is_symlink() {
                'l'
            } else if t.is_dir() {
                'd'
            } else if t.is_file() {
                'f'
            } else {
                'o'
            };
            out.insert(rel, c);
            if c == 'd' {
                go(base, &p, out);
            }
        }
    }
    let mut out = Tree::new();
    go(dir, dir, &mut out);
    out
}

const PY_EXTRACT: &str = "import sys, tarfile
with tarfile.open(sys.argv[1]) as t:
    if hasattr(tarfile, 'data_filter'):
        t.extractall(sys.argv[2], filter='data')
    else:
        t.extractall(sys.argv[2])
";

/// Extracts the raw tar with GNU tar and with Python into fresh directories.
fn extractors(tar: &Path, scratch: &Path) -> Vec<(&'static str, Result<Tree, String>)> {
    let mut out = Vec::new();
    for tool in ["gnu-tar", "python-tarfile"] {
        let dest = scratch.join(tool);
        let _ = std::fs::remove_dir_all(&dest);
        std::fs::create_dir_all(&dest).unwrap();
        let o = match tool {
            "gnu-tar" => Command::new("tar")
                .arg("-xf")
                .arg(tar)
                .arg("-C")
                .arg(&dest)
                .args(["--no-same-owner", "--no-same-permissions"])
                .output(),
            _ => Command::new("python3")
                .args(["-c", PY_EXTRACT])
                .arg(tar)
                .arg(&dest)
                .output(),
        }
        .unwrap();
        let r = if o.status.success() {
            Ok(walk(&dest))
        } else {
            Err(String::from_utf8_lossy(&o.stderr).into_owned())
        };
        out.push((tool, r));
    }
    out
}

struct Verdicts {
    admitted: usize,
    refused: usize,
}

/// PUTs `body` as `ep`; admitted bodies must extract the same everywhere, refused ones must
/// leave nothing stored.
async fn judge(w: &World, c: &Client, ep: &str, body: Vec<u8>, label: &str, v: &mut Verdicts) {
    let sha = tar_sha(&body);
    let raw = {
        let mut out = Vec::new();
        let _ =
            zstd::stream::read::Decoder::new(&body[..]).and_then(|mut d| d.read_to_end(&mut out));
        out
    };
    let reply = c
        .request(
            "PUT",
            &format!("/v1/episodes/{HOST}/{ep}"),
            &[
                ("x-cis490-code-commit", COMMIT.to_string()),
                ("x-cis490-tar-sha256", sha),
                ("content-type", "application/zstd".to_string()),
                ("content-length", body.len().to_string()),
            ],
            body,
        )
        .await
        .unwrap_or_else(|e| panic!("{label}: {e}"));
    let stored = w.store_dir().join(format!("episodes/{HOST}/{ep}.tar.zst"));
    let rows: Vec<_> = index_rows(&w.store_dir())
        .into_iter()
        .filter(|r| r["episode_id"] == ep)
        .collect();
    match reply.status {
        201 => {
            v.admitted += 1;
            assert_eq!(rows.len(), 1, "{label}: one index row");
            let want = receiver_tree(&stored, ep);
            let files = want.values().filter(|&&k| k == 'f').count() as u64;
            assert_eq!(rows[0]["files"], files, "{label}: indexed file count");
            let scratch = w.path().join("extract");
            let tar = w.path().join("extract.tar");
            std::fs::write(&tar, &raw).unwrap();
            for (tool, got) in extractors(&tar, &scratch) {
                let got = got
                    .unwrap_or_else(|e| panic!("{label}: {tool} failed on an admitted body: {e}"));
                assert_eq!(
                    got, want,
                    "{label}: {tool} extracts other paths than the receiver indexed"
                );
            }
        }
        400..=499 => {
            v.refused += 1;
            assert!(
                !stored.exists(),
                "{label}: refused ({}) yet stored",
                reply.status
            );
            assert!(rows.is_empty(), "{label}: refused yet indexed");
        }
        s => panic!(
            "{label}: unexpected status {s}: {}",
            String::from_utf8_lossy(&reply.body)
        ),
    }
}

/// One member of a generated archive, drawn from what tar writers and attackers produce.
fn member(rng: &mut Lcg, ep: &str, i: usize, t: &mut Tar) {
    let pick = |rng: &mut Lcg, pct: u64| rng.below(100) < pct;
    let depth = rng.below(3) as usize;
    let mut name = ep.to_string();
    for d in 0..depth {
        name.push_str(&format!("/d{d}"));
    }
    // Name length: short, exactly 100 bytes, or long (a GNU long-name record).
    let leaf = match rng.below(6) {
        0 => {
            let n = 100usize.saturating_sub(name.len() + 1).max(1);
            "n".repeat(n)
        }
        1 => format!("long-{}", "x".repeat(100 + rng.below(150) as usize)),
        2 => "ünïcødé".to_string(),
        _ => format!("f{i}"),
    };
    name.push('/');
    name.push_str(&leaf);
    let kind = match rng.below(20) {
        0 => b'2',
        1 => b'x',
        2 => b'g',
        3 => b'K',
        4 => b'S',
        5 => 0,
        6..=9 => b'5',
        _ => b'0',
    };
    if kind == b'5' || pick(rng, 5) {
        name.push('/');
    }
    if pick(rng, 4) {
        name = name.replacen('/', "/../", 1);
    }
    if pick(rng, 3) {
        name = name.replace("/d0", "\\d0");
    }
    let data: Vec<u8> = if kind == b'0' || kind == 0 {
        format!("data {i}\n").into_bytes()
    } else if kind == b'5' && pick(rng, 15) {
        // A directory that hides a header in its "data".
        let mut inner = Tar::new();
        inner.file(&format!("{ep}/hidden{i}"), b"h");
        inner.0
    } else if kind == b'x' || kind == b'g' {
        let key = ["path", "linkpath", "GNU.sparse.name", "size"][rng.below(4) as usize];
        let mut p = pax_record(key, &format!("{ep}/pax{i}"));
        if pick(rng, 50) {
            p.extend(pax_record("path", &format!("{ep}/../pax-second{i}")));
        }
        p
    } else {
        Vec::new()
    };
    let long = name.len() > 100;
    if long || pick(rng, 4) {
        let mut payload = name.as_bytes().to_vec();
        payload.push(0);
        if pick(rng, 5) {
            payload.extend_from_slice(b"trail\0");
        }
        let l = Header::gnu(b"././@LongLink", b'L', payload.len() as u64).finish();
        t.push(l, &payload);
        if pick(rng, 4) {
            let l2 = Header::gnu(b"././@LongLink", b'L', payload.len() as u64).finish();
            t.push(l2, &payload);
        }
    }
    let mut h = Header::gnu(name.as_bytes(), kind, data.len() as u64);
    if long && pick(rng, 10) {
        // The member's own name differs from its long name (Python reads its trailing '/').
        h.set_name(format!("{ep}/x/").as_bytes());
    }
    if pick(rng, 3) {
        // A size near 2^64 (padding would wrap).
        let mut f = [0xffu8; 12];
        f[..4].copy_from_slice(&[0x80, 0, 0, 0]);
        h.field(124..136, &f);
    }
    if kind == b'5' {
        h.octal(100..108, 0o755);
    }
    if kind == b'2' {
        h.field(157..257, b"/etc");
    }
    if pick(rng, 20) {
        h.field(257..265, USTAR_MAGIC);
    } else if pick(rng, 3) {
        h.field(257..265, b"");
    }
    if pick(rng, 5) {
        h.field(345..500, format!("{ep}/pre").as_bytes());
    }
    match rng.below(30) {
        // Numeric forms: space-terminated, base-256, an inner space, leading spaces.
        0 => {
            let s = format!("{:011o} ", data.len());
            h.field(124..136, s.as_bytes());
        }
        1 => {
            let mut f = [0u8; 12];
            f[0] = 0x80;
            f[4..].copy_from_slice(&(data.len() as u64).to_be_bytes());
            h.field(124..136, &f);
        }
        2 => {
            h.field(124..136, b"1 0");
        }
        3 => {
            let s = format!("   {:o}", data.len());
            h.field(124..136, s.as_bytes());
        }
        4 => {
            h.field(100..108, b"0644 x");
        }
        _ => {}
    }
    let bytes = match rng.below(100) {
        0..=2 => h.raw(),
        // A base-256 checksum of the right value: GNU tar reads checksums as octal only.
        3..=5 => h.finish_base256_checksum(),
        _ => h.finish(),
    };
    t.push(bytes, &data);
}

fn generated(seed: u64, i: usize, ep: &str) -> Vec<u8> {
    let mut rng = Lcg(seed ^ (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    let mut t = Tar::new();
    if rng.below(100) < 85 {
        t.dir(&format!("{ep}/"));
    }
    t.file(&format!("{ep}/meta.json"), &meta(ep, COMMIT));
    for j in 0..1 + rng.below(3) as usize {
        member(&mut rng, ep, j, &mut t);
    }
    zstd::encode_all(&t.end()[..], 3).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_the_receiver_admits_extracts_the_same_with_gnu_tar_and_python() {
    let seed = std::env::var("CIS490_DIFF_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x15_2026_1202u64);
    println!("differential seed {seed} (CIS490_DIFF_SEED replays it)");
    let w = World::new(1);
    // The corpus's limits (its bombs are bombs at 64 MiB).
    let p = Process::start(
        &w.config("[version_gate]\nenabled = false\n[limits]\nmax_uncompressed_bytes = 67108864\n"),
        &[],
    );
    let c = w.client(p.addr, HOST);
    let mut v = Verdicts {
        admitted: 0,
        refused: 0,
    };

    // The hostile corpus: each refused, nothing stored.
    let corpus = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus/hostile");
    let mut names: Vec<_> = std::fs::read_dir(&corpus)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".tar.zst"))
        .collect();
    names.sort();
    for n in &names {
        let body = std::fs::read(corpus.join(n)).unwrap();
        judge(&w, &c, "ep-hostile", body, n, &mut v).await;
    }
    assert_eq!(v.admitted, 0, "a hostile corpus body was admitted");

    // The shipper's own packs: long names, nesting, unicode, empty dirs, admitted.
    let src = w.path().join("src");
    let deep = format!("{}/{}/leaf.bin", "a".repeat(120), "b".repeat(200));
    let files: Vec<(&str, &[u8])> = vec![
        ("cam/000001.jpg", b"jpeg"),
        (&deep, b"deep"),
        ("ünïcødé/ñame.txt", b"u"),
        ("Case", b"upper"),
        ("case", b"lower"),
    ];
    let dir = cis490_tests::episode::write(&src, "ep-shipper", COMMIT, &files);
    std::fs::create_dir_all(dir.join("empty/dir")).unwrap();
    let (_, body) = cis490_tests::episode::pack(&dir, "ep-shipper");
    judge(&w, &c, "ep-shipper", body, "shipper pack", &mut v).await;
    assert_eq!(v.admitted, 1, "the shipper's own pack is admitted");

    // The generated family.
    for i in 0..300 {
        let ep = format!("ep-gen-{i}");
        let body = generated(seed, i, &ep);
        judge(
            &w,
            &c,
            &ep,
            body,
            &format!("generated case {i} (seed {seed})"),
            &mut v,
        )
        .await;
    }
    println!(
        "differential: {} admitted, {} refused, all admitted bodies extract identically",
        v.admitted, v.refused
    );
    assert!(
        v.admitted >= 30,
        "too few admitted cases to compare: {}",
        v.admitted
    );
    assert!(v.refused >= 100, "too few refused cases: {}", v.refused);
}
