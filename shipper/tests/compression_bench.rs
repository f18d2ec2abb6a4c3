//! Figures for `compression = "auto"` against `"level"` (docs/BENCHMARKS.md, issue 21): bytes of
//! body and the packer's CPU per GB of tar on four workloads, and `zstd -3` of the same tars.
//! Ignored: run in release, alone, with
//! `cargo test --release -p cis490-shipper --test compression_bench -- --ignored --nocapture`.
//! `CIS490_BENCH_SCALE=10` divides every size by 10.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use cis490_shipper::pack::{pack_counted, Compression, Mode};

/// The generator of `tests/src/bin/e2e-bench/compare.rs`: CSV sensor-log lines or xorshift bytes.
fn gen(kind: u8, size: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let mut out = Vec::with_capacity(size + 128);
    if kind == 0 {
        let mut t = 0u64;
        while out.len() < size {
            t += 1;
            let r = next();
            out.extend_from_slice(
                format!(
                    "{t},{:.4},{:.4},{:.4},{},ok\n",
                    (r % 10_000) as f64 / 1e3,
                    ((r >> 16) % 10_000) as f64 / 1e3,
                    ((r >> 32) % 10_000) as f64 / 1e3,
                    r % 7
                )
                .as_bytes(),
            );
        }
    } else {
        while out.len() < size {
            out.extend_from_slice(&next().to_le_bytes());
        }
    }
    out.truncate(size);
    out
}

/// `n` episodes of `csv` bytes of joints.csv and `frames` bytes of camera/frames.bin.
fn workload(root: &Path, name: &str, n: usize, csv: usize, frames: usize) -> Vec<PathBuf> {
    (0..n)
        .map(|i| {
            let d = root.join(format!("{name}-{i:05}"));
            std::fs::create_dir_all(d.join("camera")).unwrap();
            std::fs::write(
                d.join("meta.json"),
                format!("{{\"episode_id\": \"{name}-{i:05}\"}}\n"),
            )
            .unwrap();
            if csv > 0 {
                std::fs::write(d.join("joints.csv"), gen(0, csv, i as u64 * 2 + 1)).unwrap();
            }
            if frames > 0 {
                std::fs::write(
                    d.join("camera/frames.bin"),
                    gen(1, frames, i as u64 * 2 + 2),
                )
                .unwrap();
            }
            d
        })
        .collect()
}

fn cpu_self() -> f64 {
    let u = nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_SELF).unwrap();
    let s = |t: nix::sys::time::TimeVal| t.tv_sec() as f64 + t.tv_usec() as f64 / 1e6;
    s(u.user_time()) + s(u.system_time())
}

struct Run {
    tar: u64,
    body: u64,
    cpu: f64,
    switches: u64,
    stored: u64,
    bodies: Vec<Vec<u8>>,
}

fn run(eps: &[PathBuf], c: Compression, keep: bool) -> Run {
    let mut r = Run {
        tar: 0,
        body: 0,
        cpu: 0.0,
        switches: 0,
        stored: 0,
        bodies: Vec::new(),
    };
    let start = cpu_self();
    for d in eps {
        let id = d.file_name().unwrap().to_str().unwrap();
        let (p, body, s) = pack_counted(d, id, Vec::new(), c).unwrap();
        r.tar += p.tar_bytes;
        r.body += body.len() as u64;
        r.switches += s.switches;
        r.stored += s.stored_bytes;
        if keep {
            r.bodies.push(body);
        }
    }
    r.cpu = cpu_self() - start;
    r
}

/// Bytes `zstd -3` (the CLI, one thread) makes of each tar, summed; the zstd crate when the CLI
/// is missing.
fn zstd3(bodies: &[Vec<u8>]) -> (u64, &'static str) {
    let cli = Command::new("zstd").arg("--version").output().is_ok();
    let mut total = 0;
    for b in bodies {
        let tar = zstd::decode_all(&b[..]).unwrap();
        total += if cli {
            let mut child = Command::new("zstd")
                .args(["-3", "-q", "-c", "-T1"])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .spawn()
                .unwrap();
            let mut stdin = child.stdin.take().unwrap();
            let writer = std::thread::spawn(move || stdin.write_all(&tar).unwrap());
            let out = child.wait_with_output().unwrap();
            writer.join().unwrap();
            out.stdout.len() as u64
        } else {
            zstd::encode_all(&tar[..], 3).unwrap().len() as u64
        };
    }
    (total, if cli { "zstd CLI" } else { "zstd crate" })
}

#[test]
#[ignore = "benchmark: run in release, alone"]
fn auto_against_level() {
    let scale: usize = std::env::var("CIS490_BENCH_SCALE")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    let only = std::env::var("CIS490_BENCH_ONLY").unwrap_or_default();
    let threads_list: Vec<u32> = std::env::var("CIS490_BENCH_THREADS")
        .ok()
        .map(|v| v.split(',').filter_map(|t| t.parse().ok()).collect())
        .unwrap_or_else(|| vec![1]);
    let t = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    // compare.rs's workloads (large: 40 x 10 MiB CSV + 15 MiB frames; small: 5,000 x 8 KiB + 8 KiB),
    // and the two pure ones at the large workload's size.
    let mb = (1 << 20) / scale;
    let loads: Vec<(&str, Vec<PathBuf>)> = [
        ("large", 40, 10 * mb, 15 * mb),
        ("small", 5000 / scale, 8 << 10, 8 << 10),
        ("csv", 40, 25 * mb, 0),
        ("random", 40, 0, 25 * mb),
    ]
    .into_iter()
    .filter(|(n, ..)| only.is_empty() || only.split(',').any(|o| o == *n))
    .map(|(name, n, csv, frames)| (name, workload(t.path(), name, n, csv, frames)))
    .collect();
    println!(
        "workload | threads | mode | tar bytes | body bytes | body / zstd -3 | CPU s | CPU s per GB of tar | switches | stored bytes"
    );
    for (name, eps) in &loads {
        for &threads in &threads_list {
            let modes = [("level", Mode::Level), ("auto", Mode::Auto)];
            // One untimed pass warms the page cache and the context pool.
            let warm = run(
                eps,
                Compression {
                    level: 3,
                    threads,
                    mode: Mode::Level,
                },
                true,
            );
            let (reference, by) = zstd3(&warm.bodies);
            for (label, mode) in modes {
                let c = Compression {
                    level: 3,
                    threads,
                    mode,
                };
                let r = run(eps, c, false);
                println!(
                    "{name} | {threads} | {label} | {} | {} | {:.4} | {:.2} | {:.2} | {} | {}",
                    r.tar,
                    r.body,
                    r.body as f64 / reference as f64,
                    r.cpu,
                    r.cpu / (r.tar as f64 / 1e9),
                    r.switches,
                    r.stored
                );
            }
            println!(
                "{name} | {threads} | zstd -3 ({by}) | {} | {reference} | 1 | | | |",
                warm.tar
            );
        }
    }
}

/// CPU per GB of the pieces of a pack, in memory: where the auto mode can save.
#[test]
#[ignore = "benchmark: run in release, alone"]
fn pieces() {
    use sha2::Digest;
    let n = 200_000_000
        / std::env::var("CIS490_BENCH_SCALE")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(1usize);
    let random = gen(1, n, 2);
    let csv = gen(0, n, 1);
    let per_gb = |label: &str, data: &[u8], f: &dyn Fn(&[u8]) -> usize| {
        let start = cpu_self();
        let out = f(data);
        let cpu = cpu_self() - start;
        println!(
            "{label} | {:.3} s per GB | out {out}",
            cpu / (data.len() as f64 / 1e9)
        );
    };
    for (name, data) in [("random", &random), ("csv", &csv)] {
        per_gb(&format!("{name}: sha256"), data, &|d| {
            sha2::Sha256::digest(d).len()
        });
        per_gb(&format!("{name}: memcpy 1 MiB at a time"), data, &|d| {
            let mut buf = vec![0u8; 1 << 20];
            d.chunks(1 << 20)
                .map(|c| {
                    buf[..c.len()].copy_from_slice(c);
                    buf[c.len() / 2] as usize
                })
                .sum()
        });
        per_gb(&format!("{name}: entropy of 64 KiB per MiB"), data, &|d| {
            d.chunks(1 << 20)
                .map(|c| cis490_shipper::pack::entropy(&c[..c.len().min(65536)]) as usize)
                .sum()
        });
        for level in [3, 1, -1, -10, -50] {
            per_gb(
                &format!("{name}: zstd level {level}, streamed"),
                data,
                &|d| {
                    let mut e = zstd::stream::write::Encoder::new(
                        Vec::with_capacity(d.len() + 1024),
                        level,
                    )
                    .unwrap();
                    for c in d.chunks(64 << 10) {
                        e.write_all(c).unwrap();
                    }
                    e.finish().unwrap().len()
                },
            );
        }
    }
}
