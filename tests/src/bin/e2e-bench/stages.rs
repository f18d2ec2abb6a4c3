//! Where the CPU goes, stage by stage, measured in-process on bytes already in memory (issue 21,
//! items 1 and 5): the shipper's `pack` against reading the files, level-3 zstd and SHA-256
//! alone; the receiver's `ingest::validate` (the validation floor: decompression, SHA-256 and the
//! tar walk, no TLS, no disk) against each of those parts alone. CPU seconds of the whole
//! process (user + system), so another load on the machine costs wall time, not these figures.
//! The same for `compression = "auto"` bodies (stored raw blocks decode as a copy).
//! `scripts/bench.sh stages [reps]`; the same workloads as `compare` (large: 10 MiB CSV + 15 MiB
//! random per episode; small: 8 KiB + 8 KiB).

use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use cis490_common::Commit;
use cis490_receiver::ingest::{validate, Expect, MAX_ENTRIES};
use cis490_receiver::tarwalk::{walk, WalkLimits, DEFAULT_MAX_PATH_BYTES};
use cis490_shipper::pack::{pack, Compression, Mode};
use cis490_tests::harness::World;
use sha2::Digest;

use crate::compare::gen;

/// user + system CPU seconds of this process so far.
fn cpu_now() -> f64 {
    let u = nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_SELF)
        .expect("getrusage(RUSAGE_SELF) cannot fail for this process");
    let secs = |t: nix::sys::time::TimeVal| t.tv_sec() as f64 + t.tv_usec() as f64 / 1e6;
    secs(u.user_time()) + secs(u.system_time())
}

/// The median CPU seconds of `reps` runs of `f` (each run does the whole workload).
fn measure(reps: usize, mut f: impl FnMut()) -> f64 {
    let mut v: Vec<f64> = (0..reps)
        .map(|_| {
            let t = cpu_now();
            f();
            cpu_now() - t
        })
        .collect();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

struct Episode {
    id: String,
    dir: PathBuf,
    files: Vec<PathBuf>,
    /// The level-3 body, and the one `compression = "auto"` makes of the same tar.
    body: Vec<u8>,
    auto_body: Vec<u8>,
    tar: Vec<u8>,
    sha: String,
}

fn make(
    root: &Path,
    name: &str,
    n: usize,
    log: usize,
    frames: usize,
    commit: &str,
) -> Vec<Episode> {
    let (level, auto) = (compression(Mode::Level), compression(Mode::Auto));
    (0..n)
        .map(|i| {
            let id = format!("{name}-{i:05}");
            let log = gen(0, log, i as u64 * 2 + 1);
            let fr = gen(1, frames, i as u64 * 2 + 2);
            let dir = cis490_tests::episode::write(
                root,
                &id,
                commit,
                &[("joints.csv", &log), ("camera/frames.bin", &fr)],
            );
            let files = vec![
                dir.join("meta.json"),
                dir.join("joints.csv"),
                dir.join("camera/frames.bin"),
            ];
            let (packed, body) = pack(&dir, &id, Vec::new(), level).expect("pack");
            let tar = zstd::decode_all(&body[..]).expect("the packed body decodes");
            let (again, auto_body) = pack(&dir, &id, Vec::new(), auto).expect("pack");
            assert_eq!(
                again.tar_sha256, packed.tar_sha256,
                "auto packs the same tar"
            );
            Episode {
                id,
                dir,
                files,
                body,
                auto_body,
                tar,
                sha: packed.tar_sha256,
            }
        })
        .collect()
}

/// Level 3 on one thread, in either mode.
fn compression(mode: Mode) -> Compression {
    Compression {
        level: 3,
        threads: 1,
        mode,
    }
}

/// Reads `r` to its end, discarding the bytes.
fn drain(mut r: impl Read) -> io::Result<u64> {
    let mut buf = [0u8; 64 << 10];
    let mut n = 0;
    loop {
        match r.read(&mut buf)? {
            0 => return Ok(n),
            k => n += k as u64,
        }
    }
}

pub fn run(reps: usize, scale: usize) {
    let w = World::new(3);
    let commit = w.commits[2].clone();
    let workloads = [
        ("large", 40 / scale.min(10), 10 << 20, 15 << 20),
        ("small", 2000 / scale, 8 << 10, 8 << 10),
    ];
    for (name, n, log, frames) in workloads {
        let eps = make(w.path(), name, n, log, frames, &commit);
        let tar_bytes: usize = eps.iter().map(|e| e.tar.len()).sum();
        let body_bytes: usize = eps.iter().map(|e| e.body.len()).sum();
        let gb = tar_bytes as f64 / 1e9;
        let auto_bytes: usize = eps.iter().map(|e| e.auto_body.len()).sum();
        let (level, auto) = (compression(Mode::Level), compression(Mode::Auto));
        let expect = |e: &Episode| Expect {
            commit: Commit::parse(&commit).ok(),
            tar_sha256: Some(e.sha.clone()),
            ..Expect::new(&e.id, 128 << 30)
        };
        // The shipper's side.
        let pack_all = measure(reps, || {
            for e in &eps {
                let (p, _) = pack(&e.dir, &e.id, io::sink(), level).expect("pack");
                assert_eq!(p.tar_sha256, e.sha);
            }
        });
        let pack_auto = measure(reps, || {
            for e in &eps {
                let (p, _) = pack(&e.dir, &e.id, io::sink(), auto).expect("pack");
                assert_eq!(p.tar_sha256, e.sha);
            }
        });
        let read_files = measure(reps, || {
            for e in &eps {
                for f in &e.files {
                    let n = drain(std::fs::File::open(f).expect("open")).expect("read");
                    assert!(n > 0);
                }
            }
        });
        let compress = measure(reps, || {
            for e in &eps {
                let mut enc = zstd::stream::write::Encoder::new(io::sink(), 3).expect("encoder");
                enc.write_all(&e.tar).expect("compress");
                enc.finish().expect("finish");
            }
        });
        let hash = measure(reps, || {
            for e in &eps {
                let h = hex::encode(sha2::Sha256::digest(&e.tar));
                assert_eq!(h, e.sha);
            }
        });
        // The receiver's side.
        let floor = measure(reps, || {
            for e in &eps {
                let v = validate(&e.body[..], io::sink(), &expect(e)).expect("valid");
                assert_eq!(v.tar_sha256, e.sha);
            }
        });
        let floor_auto = measure(reps, || {
            for e in &eps {
                let v = validate(&e.auto_body[..], io::sink(), &expect(e)).expect("valid");
                assert_eq!(v.tar_sha256, e.sha);
            }
        });
        let decompress_auto = measure(reps, || {
            for e in &eps {
                let n = drain(zstd::stream::read::Decoder::new(&e.auto_body[..]).expect("decoder"))
                    .expect("decode");
                assert_eq!(n, e.tar.len() as u64);
            }
        });
        let decompress = measure(reps, || {
            for e in &eps {
                let n = drain(zstd::stream::read::Decoder::new(&e.body[..]).expect("decoder"))
                    .expect("decode");
                assert_eq!(n, e.tar.len() as u64);
            }
        });
        let limits = WalkLimits {
            max_path_bytes: DEFAULT_MAX_PATH_BYTES,
            max_entries: MAX_ENTRIES,
        };
        let walk_all = measure(reps, || {
            for e in &eps {
                walk(&e.tar[..], &e.id, &limits, |_, body| {
                    drain(body).map(|_| ()).map_err(|err| {
                        cis490_receiver::tarwalk::WalkError::Io(err, "reading a member")
                    })
                })
                .expect("walk");
            }
        });
        let per_gb = |s: f64| s / gb;
        println!(
            "stages {name} episodes={n} tar_MB={:.1} body_MB={:.1} auto_body_MB={:.1} reps={reps} (CPU seconds per GB of tar, median)",
            tar_bytes as f64 / 1e6,
            body_bytes as f64 / 1e6,
            auto_bytes as f64 / 1e6
        );
        println!(
            "stages {name} shipper pack_total={:.2} read_files={:.2} zstd3_compress={:.2} sha256={:.2} tar_framing_copies_other={:.2}",
            per_gb(pack_all),
            per_gb(read_files),
            per_gb(compress),
            per_gb(hash),
            per_gb(pack_all - read_files - compress - hash)
        );
        println!(
            "stages {name} receiver validate_floor={:.2} zstd_decompress={:.2} sha256={:.2} tar_walk={:.2} copies_other={:.2}",
            per_gb(floor),
            per_gb(decompress),
            per_gb(hash),
            per_gb(walk_all),
            per_gb(floor - decompress - hash - walk_all)
        );
        println!(
            "stages {name} auto shipper_pack_total={:.2} receiver_validate_floor={:.2} zstd_decompress={:.2}",
            per_gb(pack_auto),
            per_gb(floor_auto),
            per_gb(decompress_auto)
        );
    }
}
