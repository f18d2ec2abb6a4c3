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

/// Compression settings (`zstd_level`, `zstd_threads`; 0 threads = all cores).
#[derive(Debug, Clone, Copy)]
pub struct Compression {
    pub level: i32,
    pub threads: u32,
}

impl Default for Compression {
    fn default() -> Self {
        Compression {
            level: 3,
            threads: 0,
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
    fn take(level: i32, threads: u32) -> io::Result<PooledContext> {
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
        ctx.set_parameter(CParameter::NbWorkers(if threads > 1 { threads } else { 0 }))
            .map_err(zstd_error)?;
        if threads > 1 {
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
    let threads = match compression.threads {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get() as u32),
        n => n,
    };
    let mut ctx = PooledContext::take(compression.level, threads).map_err(io_at(dir))?;
    let enc = zstd::stream::write::Encoder::with_context(out, ctx.get());
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
    let out = inner.finish().map_err(io_at(dir))?;
    Ok((
        Packed {
            tar_sha256: hex::encode(hasher.finalize()),
            tar_bytes: count,
            files,
        },
        out,
    ))
}

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
    b: &mut tar::Builder<W>,
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

fn append_file<W: Write>(
    b: &mut tar::Builder<W>,
    path: &Path,
    name: &str,
) -> Result<(), PackError> {
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
            },
        )
        .unwrap();
        assert_eq!(a, b);
        assert_eq!(
            zstd::decode_all(&za[..]).unwrap(),
            zstd::decode_all(&zb[..]).unwrap()
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
            let c = Compression { level: 3, threads };
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
