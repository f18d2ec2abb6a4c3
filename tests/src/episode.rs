//! Episodes as the producer writes them, packed by the shipper's real packer.

use std::path::{Path, PathBuf};

use cis490_shipper::pack::{self, Compression, Mode, Packed};

/// Writes `root/<id>/meta.json` stamped with `commit` plus the given files.
pub fn write(root: &Path, id: &str, commit: &str, files: &[(&str, &[u8])]) -> PathBuf {
    let d = root.join(id);
    std::fs::create_dir_all(&d).unwrap();
    let meta =
        format!("{{\"episode_id\": \"{id}\", \"code_version\": {{\"commit\": \"{commit}\"}}}}\n");
    std::fs::write(d.join("meta.json"), meta).unwrap();
    for (name, data) in files {
        let p = d.join(name);
        if let Some(parent) = p.parent() {
            std::fs::create_dir_all(parent).unwrap();
        }
        std::fs::write(p, data).unwrap();
    }
    d
}

/// Packs `dir` as episode `id`; returns the tarball bytes and what the packer measured.
pub fn pack(dir: &Path, id: &str) -> (Packed, Vec<u8>) {
    let (p, bytes) = pack::pack(
        dir,
        id,
        Vec::new(),
        Compression {
            level: 3,
            threads: 1,
            mode: Mode::Level,
        },
    )
    .unwrap();
    (p, bytes)
}

/// A packed episode ready to PUT.
pub struct Body {
    pub id: String,
    pub commit: String,
    pub sha: String,
    pub bytes: Vec<u8>,
}

/// `size` pseudo-random (incompressible) bytes, the same for the same (non-zero) seed.
pub fn noise(size: usize, seed: u64) -> Vec<u8> {
    let mut data = Vec::with_capacity(size + 8);
    let mut x = seed;
    while data.len() < size {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        data.extend_from_slice(&x.to_le_bytes());
    }
    data.truncate(size);
    data
}

/// Writes and packs an episode with `size` bytes of pseudo-random data.
pub fn body(root: &Path, id: &str, commit: &str, size: usize) -> Body {
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15 ^ size as u64 ^ id.len() as u64;
    for b in id.bytes() {
        x = x.wrapping_mul(31).wrapping_add(u64::from(b));
    }
    let data = noise(size, x);
    let dir = write(root, id, commit, &[("data.bin", &data)]);
    let (p, bytes) = pack(&dir, id);
    Body {
        id: id.to_string(),
        commit: commit.to_string(),
        sha: p.tar_sha256,
        bytes,
    }
}

/// The xorshift stream behind [`csv`] and [`random`].
fn xorshift(seed: u64) -> impl FnMut() -> u64 {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    }
}

/// Seeded sensor-log lines (a counter and four readings): zstd -3 takes them to about 37 %.
/// The benchmarks' compressible member, and the tests' stand-in for a lab's CSV.
pub fn csv(size: usize, seed: u64) -> Vec<u8> {
    let mut next = xorshift(seed);
    let mut out = Vec::with_capacity(size + 128);
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
    out.truncate(size);
    out
}

/// Seeded incompressible bytes: the stand-in for camera frames and other packed data.
pub fn random(size: usize, seed: u64) -> Vec<u8> {
    let mut next = xorshift(seed);
    let mut out = Vec::with_capacity(size + 8);
    while out.len() < size {
        out.extend_from_slice(&next().to_le_bytes());
    }
    out.truncate(size);
    out
}
