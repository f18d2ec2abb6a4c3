//! The canonical episode tar (SPEC §2) streamed through zstd, hashed in the same pass: the same
//! files always give the same tar bytes, so the SHA-256 is the episode's identity.

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::UNIX_EPOCH;

use sha2::{Digest, Sha256};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use zstd::zstd_safe::{CCtx, CParameter, ResetDirective};

mod auto;
#[doc(hidden)]
pub use auto::{entropy, Switches, BLOCK, ENTROPY_LIMIT, MIN_STORED_STRETCH, SAMPLE};

#[derive(Debug, thiserror::Error)]
pub enum PackError {
    #[error("{path}: {kind} entries cannot be shipped (only regular files and directories)")]
    Unsupported { path: PathBuf, kind: &'static str },
    #[error("{path}: file name is not valid UTF-8")]
    NonUtf8 { path: PathBuf },
    #[error("{path}: file changed size while it was being packed")]
    Changed { path: PathBuf },
    #[error("failed to pack {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
}

fn io_at(path: &Path) -> impl FnOnce(io::Error) -> PackError + '_ {
    move |source| PackError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// What packing produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Packed {
    /// SHA-256 of the uncompressed tar stream, lowercase hex.
    pub tar_sha256: String,
    pub tar_bytes: u64,
    pub files: u64,
}

/// Counts and hashes every byte written through it.
struct HashingWriter<W> {
    inner: W,
    hasher: Sha256,
    count: u64,
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.count += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Bytes of input per multithreaded zstd job.
const MT_JOB_SIZE: u32 = 1 << 20;

/// How the zstd setting is chosen (`[shipping] compression`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mode {
    /// Every byte at `zstd_level`: one frame, the body the shipper made before `auto`.
    Level,
    /// Stretches that look incompressible are stored raw (frames of raw blocks), the rest at
    /// `zstd_level`.
    #[default]
    Auto,
}

impl std::str::FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> Result<Mode, String> {
        match s {
            "auto" => Ok(Mode::Auto),
            "level" => Ok(Mode::Level),
            other => Err(format!("{other:?} is not \"auto\" or \"level\"")),
        }
    }
}

/// Compression settings (`compression`, `zstd_level`, `zstd_threads`; 0 threads = all cores).
#[derive(Debug, Clone, Copy)]
pub struct Compression {
    pub level: i32,
    pub threads: u32,
    pub mode: Mode,
}

impl Default for Compression {
    fn default() -> Self {
        Compression {
            level: 3,
            threads: 0,
            mode: Mode::Auto,
        }
    }
}

/// Compression contexts kept between packs. A new level-3 context allocates and clears over a
/// MiB of match tables (and starts its worker threads); a reused one does neither (zstd treats
/// the old entries as stale). Each kept context holds its tables and, when multithreaded, its
/// workers and job buffers while idle: the shipper's RSS counts them (docs/decisions.md).
static CONTEXTS: Mutex<Vec<CCtx<'static>>> = Mutex::new(Vec::new());

/// Contexts made since start (for the pool's test).
static CREATED: AtomicUsize = AtomicUsize::new(0);

/// How many contexts have been made and how many are kept now (for tests).
#[doc(hidden)]
pub fn context_counts() -> (usize, usize) {
    let kept = CONTEXTS.lock().unwrap_or_else(|p| p.into_inner()).len();
    (CREATED.load(Ordering::Relaxed), kept)
}

/// Contexts kept at most; one more pack at once than this simply makes a fresh one.
const KEPT_CONTEXTS: usize = 4;

/// A context taken from [`CONTEXTS`] (or new), given back when dropped, also when a pack fails
/// or panics midway: the next take resets it.
struct PooledContext(Option<CCtx<'static>>);

fn zstd_error(code: usize) -> io::Error {
    io::Error::other(format!("zstd: {}", zstd::zstd_safe::get_error_name(code)))
}

impl PooledContext {
    /// `workers` as zstd's `nbWorkers`: 0 compresses on the calling thread.
    fn take(level: i32, workers: u32) -> io::Result<PooledContext> {
        let pooled = CONTEXTS.lock().unwrap_or_else(|p| p.into_inner()).pop();
        let mut ctx = match pooled {
            Some(c) => c,
            None => {
                CREATED.fetch_add(1, Ordering::Relaxed);
                CCtx::try_create().ok_or_else(|| {
                    io::Error::other("zstd: cannot allocate a compression context")
                })?
            }
        };
        // A pack that failed midway left a frame open: start a new one, keep the memory.
        ctx.reset(ResetDirective::SessionOnly).map_err(zstd_error)?;
        ctx.set_parameter(CParameter::CompressionLevel(level))
            .map_err(zstd_error)?;
        // Levels 20-22 would declare windows of 2^25-2^27 bytes in a stream of unknown size,
        // which the receiver refuses; below 20 the level's own window is at most 2^23. A pooled
        // context keeps its parameters, so the default (0) is set back explicitly.
        let window_log = if level > 19 {
            cis490_common::ZSTD_WINDOW_LOG_MAX
        } else {
            0
        };
        ctx.set_parameter(CParameter::WindowLog(window_log))
            .map_err(zstd_error)?;
        ctx.set_parameter(CParameter::NbWorkers(workers))
            .map_err(zstd_error)?;
        if workers > 0 {
            // Small jobs keep each worker's buffers near a MiB instead of 4 windows (bench: RSS).
            ctx.set_parameter(CParameter::JobSize(MT_JOB_SIZE))
                .map_err(zstd_error)?;
        }
        Ok(PooledContext(Some(ctx)))
    }

    fn get(&mut self) -> &mut CCtx<'static> {
        self.0
            .as_mut()
            .expect("invariant: the context is only taken out by Drop")
    }
}

impl Drop for PooledContext {
    fn drop(&mut self) {
        if let Some(ctx) = self.0.take() {
            let mut kept = CONTEXTS.lock().unwrap_or_else(|p| p.into_inner());
            if kept.len() < KEPT_CONTEXTS {
                kept.push(ctx);
            }
        }
    }
}

/// Writes the canonical tar of `dir` (as `<episode_id>/...`) through zstd into `out`.
pub fn pack<W: Write>(
    dir: &Path,
    episode_id: &str,
    out: W,
    compression: Compression,
) -> Result<(Packed, W), PackError> {
    let (packed, out, _) = pack_counted(dir, episode_id, out, compression)?;
    Ok((packed, out))
}

/// [`pack`], and what the auto mode did (for tests and the benchmark).
#[doc(hidden)]
pub fn pack_counted<W: Write>(
    dir: &Path,
    episode_id: &str,
    out: W,
    compression: Compression,
) -> Result<(Packed, W, Switches), PackError> {
    let threads = match compression.threads {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get() as u32),
        n => n,
    };
    let workers = if threads > 1 { threads } else { 0 };
    let mut ctx = PooledContext::take(compression.level, workers).map_err(io_at(dir))?;
    let enc = match compression.mode {
        Mode::Level => Encoder::Level(zstd::stream::write::Encoder::with_context(out, ctx.get())),
        Mode::Auto => Encoder::Auto(auto::AutoEncoder::new(ctx.get(), out)),
    };
    let hashing = HashingWriter {
        inner: enc,
        hasher: Sha256::new(),
        count: 0,
    };
    let mut builder = tar::Builder::new(hashing);
    builder.mode(tar::HeaderMode::Deterministic);
    let mut files = 0;
    append_dir(&mut builder, dir, episode_id, &mut files)?;
    let hashing = builder.into_inner().map_err(io_at(dir))?;
    let HashingWriter {
        inner,
        hasher,
        count,
    } = hashing;
    let (out, switches) = inner.finish().map_err(io_at(dir))?;
    Ok((
        Packed {
            tar_sha256: hex::encode(hasher.finalize()),
            tar_bytes: count,
            files,
        },
        out,
        switches,
    ))
}

/// The zstd writer of one pack.
enum Encoder<'c, W: Write> {
    Level(zstd::stream::write::Encoder<'c, W>),
    Auto(auto::AutoEncoder<'c, W>),
}

impl<W: Write> Encoder<'_, W> {
    /// A regular file's header and data, `len` bytes in all, come next.
    fn member(&mut self, len: u64) -> io::Result<()> {
        match self {
            Encoder::Level(_) => Ok(()),
            Encoder::Auto(a) => a.member(len),
        }
    }

    fn finish(self) -> io::Result<(W, Switches)> {
        match self {
            Encoder::Level(e) => Ok((e.finish()?, Switches::default())),
            Encoder::Auto(a) => a.finish(),
        }
    }
}

impl<W: Write> Write for Encoder<'_, W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Encoder::Level(e) => e.write(buf),
            Encoder::Auto(a) => a.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Encoder::Level(e) => e.flush(),
            Encoder::Auto(a) => a.flush(),
        }
    }
}

type Builder<'c, W> = tar::Builder<HashingWriter<Encoder<'c, W>>>;

fn header(kind: tar::EntryType, size: u64, mode: u32, mtime: u64) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_size(size);
    h.set_mode(mode);
    h.set_mtime(mtime);
    h.set_uid(0);
    h.set_gid(0);
    // new_gnu leaves user and group names empty, as the canonical form wants.
    h
}

fn append_dir<W: Write>(
    b: &mut Builder<'_, W>,
    dir: &Path,
    name: &str,
    files: &mut u64,
) -> Result<(), PackError> {
    let mut h = header(tar::EntryType::Directory, 0, 0o755, 0);
    b.append_data(&mut h, format!("{name}/"), io::empty())
        .map_err(io_at(dir))?;
    let mut children: Vec<(Vec<u8>, PathBuf, fs::FileType)> = Vec::new();
    for e in fs::read_dir(dir).map_err(io_at(dir))? {
        let e = e.map_err(io_at(dir))?;
        let ft = e.file_type().map_err(io_at(&e.path()))?;
        children.push((e.file_name().into_encoded_bytes(), e.path(), ft));
    }
    children.sort_by(|a, b| a.0.cmp(&b.0));
    for (raw, path, ft) in children {
        let child =
            String::from_utf8(raw).map_err(|_| PackError::NonUtf8 { path: path.clone() })?;
        let entry_name = format!("{name}/{child}");
        if ft.is_dir() {
            append_dir(b, &path, &entry_name, files)?;
        } else if ft.is_file() {
            append_file(b, &path, &entry_name)?;
            *files += 1;
        } else {
            let kind = if ft.is_symlink() {
                "symlink"
            } else if ft.is_fifo() {
                "FIFO"
            } else if ft.is_socket() {
                "socket"
            } else if ft.is_block_device() {
                "block device"
            } else if ft.is_char_device() {
                "character device"
            } else {
                "special"
            };
            return Err(PackError::Unsupported { path, kind });
        }
    }
    Ok(())
}

fn append_file<W: Write>(b: &mut Builder<'_, W>, path: &Path, name: &str) -> Result<(), PackError> {
    let f = File::open(path).map_err(io_at(path))?;
    let md = f.metadata().map_err(io_at(path))?;
    let exec = md.permissions().mode() & 0o111 != 0;
    let mtime = md
        .modified()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_secs());
    let len = md.len();
    let mut h = header(
        tar::EntryType::Regular,
        len,
        if exec { 0o755 } else { 0o644 },
        mtime,
    );
    // The header's block plus the data: what the auto mode judges as one file.
    b.get_mut()
        .inner
        .member(len.saturating_add(512))
        .map_err(io_at(path))?;
    let mut reader = ExactReader {
        inner: f.take(len),
        left: len,
        shrank: false,
    };
    b.append_data(&mut h, name, &mut reader).map_err(|e| {
        // Only the reader's own early-EOF is "changed size"; a failed write (a full disk) with
        // bytes still to read is an I/O error and must say so.
        if reader.shrank {
            PackError::Changed {
                path: path.to_path_buf(),
            }
        } else {
            PackError::Io {
                path: path.to_path_buf(),
                source: e,
            }
        }
    })
}

/// Fails if the file ends before the size recorded in its header.
struct ExactReader<R> {
    inner: R,
    left: u64,
    shrank: bool,
}

impl<R: Read> Read for ExactReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if n == 0 && self.left > 0 && !buf.is_empty() {
            self.shrank = true;
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "file shrank"));
        }
        self.left -= n as u64;
        Ok(n)
    }
}

/// SHA-256 of the tar stream inside a `.tar.zst` (for tarballs packed before a restart).
pub fn hash_tarball(path: &Path) -> io::Result<String> {
    let f = File::open(path)?;
    let mut dec = zstd::stream::read::Decoder::new(f)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = dec.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex::encode(hasher.finalize()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn episode(root: &Path) -> PathBuf {
        let d = root.join("ep1");
        fs::create_dir_all(d.join("cam/b")).unwrap();
        fs::write(d.join("meta.json"), b"{}").unwrap();
        fs::write(d.join("cam/b/frame"), vec![7u8; 5000]).unwrap();
        fs::write(d.join("cam/a"), b"a").unwrap();
        fs::write(d.join("Z"), b"upper sorts first").unwrap();
        d
    }

    fn names(raw: &[u8]) -> Vec<(String, u32, u64, u64)> {
        let mut a = tar::Archive::new(raw);
        a.entries()
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                let h = e.header();
                (
                    e.path().unwrap().to_string_lossy().into_owned(),
                    h.mode().unwrap(),
                    h.uid().unwrap(),
                    h.mtime().unwrap(),
                )
            })
            .collect()
    }

    #[test]
    fn canonical_order_modes_and_owner() {
        let t = tempfile::tempdir().unwrap();
        let d = episode(t.path());
        fs::set_permissions(d.join("cam/a"), fs::Permissions::from_mode(0o700)).unwrap();
        let (p, z) = pack(&d, "ep1", Vec::new(), Compression::default()).unwrap();
        let raw = zstd::decode_all(&z[..]).unwrap();
        assert_eq!(p.tar_bytes, raw.len() as u64);
        assert_eq!(p.tar_sha256, hex::encode(Sha256::digest(&raw)));
        assert_eq!(p.files, 4);
        let n = names(&raw);
        let order: Vec<&str> = n.iter().map(|x| x.0.as_str()).collect();
        assert_eq!(
            order,
            [
                "ep1/",
                "ep1/Z",
                "ep1/cam/",
                "ep1/cam/a",
                "ep1/cam/b/",
                "ep1/cam/b/frame",
                "ep1/meta.json"
            ]
        );
        assert_eq!(n[3].1, 0o755, "executable file");
        assert_eq!(n[1].1, 0o644);
        assert_eq!(n[2].1, 0o755, "directory");
        assert!(n.iter().all(|x| x.2 == 0));
        assert_eq!(n[2].3, 0, "directory mtime");
        assert!(n[1].3 > 0, "file mtime kept");
    }

    #[test]
    fn packing_twice_gives_the_same_tar() {
        let t = tempfile::tempdir().unwrap();
        let d = episode(t.path());
        let (a, za) = pack(
            &d,
            "ep1",
            Vec::new(),
            Compression {
                level: 3,
                threads: 1,
                mode: Mode::Level,
            },
        )
        .unwrap();
        let (b, zb) = pack(
            &d,
            "ep1",
            Vec::new(),
            Compression {
                level: 9,
                threads: 2,
                mode: Mode::Level,
            },
        )
        .unwrap();
        assert_eq!(a, b);
        assert_eq!(
            zstd::decode_all(&za[..]).unwrap(),
            zstd::decode_all(&zb[..]).unwrap()
        );
    }

    /// Levels 20-22 declare windows over the receiver's limit unless the shipper caps them; a
    /// pooled context that packed at level 22 must not keep the cap (or anything) for level 3.
    #[test]
    fn every_level_declares_a_window_the_receiver_accepts() {
        let t = tempfile::tempdir().unwrap();
        let d = episode(t.path());
        fs::write(d.join("table.csv"), text(400_000, 7)).unwrap();
        let decode = |z: &[u8]| -> Vec<u8> {
            let mut dec = zstd::stream::read::Decoder::new(z).unwrap();
            dec.window_log_max(cis490_common::ZSTD_WINDOW_LOG_MAX)
                .unwrap();
            let mut out = Vec::new();
            std::io::Read::read_to_end(&mut dec, &mut out).unwrap();
            out
        };
        let level = |level, threads, mode| Compression {
            level,
            threads,
            mode,
        };
        let (first, z3) = pack(&d, "ep1", Vec::new(), level(3, 1, Mode::Level)).unwrap();
        for mode in [Mode::Level, Mode::Auto] {
            for threads in [1, 2] {
                for l in 1..=22 {
                    let (p, z) = pack(&d, "ep1", Vec::new(), level(l, threads, mode)).unwrap();
                    let tar = decode(&z);
                    assert_eq!(hex::encode(Sha256::digest(&tar)), p.tar_sha256, "level {l}");
                    assert_eq!(p, first);
                }
            }
        }
        let (_, again) = pack(&d, "ep1", Vec::new(), level(3, 1, Mode::Level)).unwrap();
        assert_eq!(
            again, z3,
            "a pooled context kept a parameter of an earlier pack"
        );
    }

    #[test]
    fn a_failing_writer_is_an_io_error_not_a_changed_file() {
        #[derive(Debug)]
        struct Full;
        impl Write for Full {
            fn write(&mut self, _: &[u8]) -> io::Result<usize> {
                Err(io::Error::from(io::ErrorKind::StorageFull))
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let t = tempfile::tempdir().unwrap();
        let d = episode(t.path());
        fs::write(d.join("big"), vec![1u8; 4 << 20]).unwrap();
        let e = pack(
            &d,
            "ep1",
            Full,
            Compression {
                level: 1,
                threads: 1,
                mode: Mode::Level,
            },
        )
        .unwrap_err();
        match e {
            PackError::Io { source, .. } => assert_eq!(source.kind(), io::ErrorKind::StorageFull),
            other => panic!("{other}"),
        }
    }

    #[test]
    fn reused_contexts_give_the_bytes_of_a_fresh_encoder_even_after_a_failed_pack() {
        #[derive(Debug)]
        struct FailAfter(usize);
        impl Write for FailAfter {
            fn write(&mut self, b: &[u8]) -> io::Result<usize> {
                if self.0 < b.len() {
                    return Err(io::Error::from(io::ErrorKind::StorageFull));
                }
                self.0 -= b.len();
                Ok(b.len())
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let t = tempfile::tempdir().unwrap();
        let d = episode(t.path());
        let noisy: Vec<u8> = (0..3u32 << 20)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        fs::write(d.join("big"), &noisy).unwrap();
        for threads in [1, 2] {
            let c = Compression {
                level: 3,
                threads,
                mode: Mode::Level,
            };
            // Leaves frames half written in pooled contexts.
            for _ in 0..KEPT_CONTEXTS + 1 {
                assert!(pack(&d, "ep1", FailAfter(100_000), c).is_err());
            }
            let (p1, z1) = pack(&d, "ep1", Vec::new(), c).unwrap();
            let (p2, z2) = pack(&d, "ep1", Vec::new(), c).unwrap();
            assert_eq!(p1, p2);
            assert_eq!(z1, z2, "threads={threads}");
            // The same frame a one-off encoder makes from the same tar bytes.
            let tar = zstd::decode_all(&z1[..]).unwrap();
            let mut fresh = zstd::stream::write::Encoder::new(Vec::new(), 3).unwrap();
            if threads > 1 {
                fresh.multithread(threads).unwrap();
                fresh
                    .set_parameter(CParameter::JobSize(MT_JOB_SIZE))
                    .unwrap();
            }
            fresh.write_all(&tar).unwrap();
            assert_eq!(fresh.finish().unwrap(), z1, "threads={threads}");
            assert_eq!(hex::encode(Sha256::digest(&tar)), p1.tar_sha256);
        }
    }

    /// CSV-like lines: zstd -3 takes them to about a third.
    fn text(n: usize, seed: u64) -> Vec<u8> {
        let mut x = seed | 1;
        let mut out = Vec::with_capacity(n + 64);
        while out.len() < n {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            out.extend_from_slice(
                format!(
                    "{},{:.3},{},ok\n",
                    out.len(),
                    (x % 9999) as f64 / 7.0,
                    x % 5
                )
                .as_bytes(),
            );
        }
        out.truncate(n);
        out
    }

    fn random(n: usize, seed: u64) -> Vec<u8> {
        let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 24) as u8
            })
            .collect()
    }

    fn ep_with(root: &Path, files: &[(&str, Vec<u8>)]) -> PathBuf {
        let d = root.join("ep1");
        fs::create_dir_all(&d).unwrap();
        for (name, bytes) in files {
            fs::write(d.join(name), bytes).unwrap();
        }
        d
    }

    /// zstd frames in `body`.
    fn frames(body: &[u8]) -> usize {
        let mut rest = body;
        let mut n = 0;
        while !rest.is_empty() {
            let len = zstd::zstd_safe::find_frame_compressed_size(rest).unwrap();
            rest = &rest[len..];
            n += 1;
        }
        n
    }

    const AUTO: Compression = Compression {
        level: 3,
        threads: 1,
        mode: Mode::Auto,
    };
    const LEVEL: Compression = Compression {
        level: 3,
        threads: 1,
        mode: Mode::Level,
    };

    #[test]
    fn entropy_separates_text_from_random() {
        assert_eq!(entropy(&[]), 0.0);
        assert_eq!(entropy(&[7u8; 1000]), 0.0);
        assert!(entropy(&random(SAMPLE, 1)) > 7.99);
        assert!(entropy(&text(SAMPLE, 1)) < 4.5);
        // A tar header's zeros in the sample do not hide random data.
        let mut with_header = vec![0u8; 1536];
        with_header.extend(random(SAMPLE - 1536, 2));
        assert!(entropy(&with_header) > auto::ENTROPY_LIMIT);
    }

    #[test]
    fn auto_stores_random_members_and_compresses_text_with_the_same_tar() {
        let t = tempfile::tempdir().unwrap();
        let d = ep_with(
            t.path(),
            &[
                ("a.csv", text(3 << 20, 1)),
                ("b.bin", random(3 << 20, 2)),
                ("c.csv", text(2 << 20, 3)),
                ("meta.json", b"{}".to_vec()),
            ],
        );
        let (pl, level, sl) = pack_counted(&d, "ep1", Vec::new(), LEVEL).unwrap();
        assert_eq!(sl, Switches::default());
        assert_eq!(frames(&level), 1);
        for threads in [1, 2] {
            let c = Compression { threads, ..AUTO };
            let (pa, auto, sa) = pack_counted(&d, "ep1", Vec::new(), c).unwrap();
            assert_eq!(pa, pl, "{threads} threads: the same tar");
            assert_eq!(
                zstd::decode_all(&auto[..]).unwrap(),
                zstd::decode_all(&level[..]).unwrap(),
                "{threads} threads"
            );
            assert_eq!(sa.switches, 2, "stored from b.bin, zstd again from c.csv");
            // b.bin's data and its header.
            assert_eq!(sa.stored_bytes, (3 << 20) + 512, "{threads} threads");
            // zstd (a.csv), raw (b.bin), zstd (c.csv, meta.json, the end blocks).
            assert_eq!(frames(&auto), 3, "{threads} threads");
            let first = zstd::zstd_safe::find_frame_compressed_size(&auto).unwrap();
            let raw = &auto[first..];
            assert_eq!(raw[..6], [0x28, 0xB5, 0x2F, 0xFD, 0x00, 0x38]);
            assert_eq!(
                zstd::zstd_safe::find_frame_compressed_size(raw).unwrap(),
                6 + (3 << 20) + 512 + 3 * 25,
                "24 full raw blocks and a last one of 512 bytes, 3 header bytes each"
            );
            // A tarball packed before a restart is hashed across all its frames.
            let f = t.path().join(format!("auto-{threads}.tar.zst"));
            fs::write(&f, &auto).unwrap();
            assert_eq!(hash_tarball(&f).unwrap(), pa.tar_sha256);
            // The random member costs what zstd's own raw blocks cost; the text the same.
            assert!(
                (auto.len() as f64) < level.len() as f64 * 1.001,
                "{threads} threads: {} vs {}",
                auto.len(),
                level.len()
            );
        }
    }

    #[test]
    fn small_and_short_members_never_switch() {
        let t = tempfile::tempdir().unwrap();
        let files: Vec<(String, Vec<u8>)> = (0..40)
            .map(|i| {
                (
                    format!("f{i:02}"),
                    if i % 2 == 0 {
                        random(10_000, i)
                    } else {
                        text(10_000, i)
                    },
                )
            })
            .chain([(
                "g.bin".to_string(),
                random((MIN_STORED_STRETCH - 1024) as usize, 99),
            )])
            .collect();
        let refs: Vec<(&str, Vec<u8>)> =
            files.iter().map(|(n, b)| (n.as_str(), b.clone())).collect();
        let d = ep_with(t.path(), &refs);
        let (_, body, s) = pack_counted(&d, "ep1", Vec::new(), AUTO).unwrap();
        assert_eq!(s, Switches::default(), "too short to be worth a frame");
        let (_, level) = pack(&d, "ep1", Vec::new(), LEVEL).unwrap();
        assert_eq!(body, level, "no switch: the body a level pack makes");
    }

    #[test]
    fn a_lying_sample_costs_at_most_a_block() {
        let t = tempfile::tempdir().unwrap();
        // Compressible head, random tail; then random head, compressible tail.
        let mut head_text = text(BLOCK as usize / 2, 1);
        head_text.extend(random(4 * BLOCK as usize, 2));
        let mut head_random = random(BLOCK as usize / 2, 3);
        head_random.extend(text(4 * BLOCK as usize, 4));
        for (bytes, fast_min, fast_max) in [
            (head_text, 3 * BLOCK, 4 * BLOCK),
            (head_random, BLOCK / 2, BLOCK + 1024),
        ] {
            let d = ep_with(t.path(), &[("x.bin", bytes)]);
            let (p, body, s) = pack_counted(&d, "ep1", Vec::new(), AUTO).unwrap();
            let (pl, level) = pack(&d, "ep1", Vec::new(), LEVEL).unwrap();
            assert_eq!(p, pl);
            assert_eq!(
                zstd::decode_all(&body[..]).unwrap(),
                zstd::decode_all(&level[..]).unwrap()
            );
            assert!((fast_min..=fast_max).contains(&s.stored_bytes), "{s:?}");
            // The lie (half a block of text at the fast setting) can cost at most its own size.
            assert!(
                body.len() as u64 <= level.len() as u64 + BLOCK / 2,
                "{} vs {}",
                body.len(),
                level.len()
            );
            fs::remove_dir_all(&d).unwrap();
        }
    }

    #[test]
    fn symlinks_and_fifos_are_refused() {
        let t = tempfile::tempdir().unwrap();
        let d = episode(t.path());
        std::os::unix::fs::symlink("/etc/passwd", d.join("link")).unwrap();
        let e = pack(&d, "ep1", Vec::new(), Compression::default()).unwrap_err();
        assert!(
            matches!(
                e,
                PackError::Unsupported {
                    kind: "symlink",
                    ..
                }
            ),
            "{e}"
        );
        fs::remove_file(d.join("link")).unwrap();
        nix::unistd::mkfifo(
            &d.join("fifo"),
            nix::sys::stat::Mode::from_bits_truncate(0o600),
        )
        .unwrap();
        let e = pack(&d, "ep1", Vec::new(), Compression::default()).unwrap_err();
        assert!(
            matches!(e, PackError::Unsupported { kind: "FIFO", .. }),
            "{e}"
        );
    }
}
