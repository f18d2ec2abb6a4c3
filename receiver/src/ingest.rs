//! One streaming pass over an upload: the compressed bytes go to the sink (a temp file) while
//! they are zstd-decoded, SHA-256'd and walked as a tar, so a bad body is refused as soon as it
//! shows itself and a good one is never read twice.

use std::cell::{Cell, RefCell};
use std::collections::HashSet;
use std::io::{self, BufRead, Read, Write};
use std::rc::Rc;

use cis490_common::meta::{commit_from_meta, MAX_META_BYTES};
use cis490_common::Commit;
use sha2::{Digest, Sha256};

/// Largest zstd window accepted (2^24 = 16 MiB); bounds decoder memory per upload.
pub const WINDOW_LOG_MAX: u32 = 24;
/// Most tar entries one episode may hold; bounds the duplicate-path set of a tar bomb.
pub const MAX_ENTRIES: u64 = 1_000_000;

/// What the request headers promised.
#[derive(Debug, Clone)]
pub struct Expect {
    pub episode_id: String,
    /// `None` when summarising a stored file (reindex): the commit is read, not checked.
    pub commit: Option<Commit>,
    pub tar_sha256: Option<String>,
    pub max_uncompressed: u64,
}

/// Facts about a valid body, as the index records them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Validated {
    pub tar_sha256: String,
    pub uncompressed_bytes: u64,
    pub compressed_bytes: u64,
    pub files: u64,
    pub commit: Commit,
}

#[derive(Debug, thiserror::Error)]
pub enum Rejection {
    /// 422: the body is not a valid episode.
    #[error("{0}")]
    Invalid(String),
    /// 413: the uncompressed stream exceeds the limit.
    #[error("uncompressed size exceeds {0} bytes")]
    TooLarge(u64),
    /// Writing the sink failed (disk full → 507, else 500); nothing is the client's fault.
    #[error("failed to write the upload: {0}")]
    Sink(io::Error),
    /// Reading the body failed (client gone, idle timeout); the upload is abandoned.
    #[error("failed to read the request body: {0}")]
    Source(io::Error),
}

#[derive(Default)]
struct Probe {
    source_err: RefCell<Option<io::Error>>,
    sink_err: RefCell<Option<io::Error>>,
    too_large: Cell<bool>,
    bytes_in: Cell<u64>,
}

fn take_err(slot: &RefCell<Option<io::Error>>) -> Option<io::Error> {
    slot.borrow_mut().take()
}

/// Copies what it reads into the sink and counts it.
struct Tee<R, W> {
    inner: R,
    sink: W,
    count: u64,
    probe: Rc<Probe>,
}

impl<R: Read, W: Write> Read for Tee<R, W> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = match self.inner.read(buf) {
            Ok(n) => n,
            Err(e) => {
                let kind = e.kind();
                *self.probe.source_err.borrow_mut() = Some(e);
                return Err(io::Error::new(kind, "request body read failed"));
            }
        };
        if let Err(e) = self.sink.write_all(&buf[..n]) {
            let kind = e.kind();
            *self.probe.sink_err.borrow_mut() = Some(e);
            return Err(io::Error::new(kind, "sink write failed"));
        }
        self.count += n as u64;
        self.probe.bytes_in.set(self.count);
        Ok(n)
    }
}

/// Hashes and counts the uncompressed stream, failing once it passes the limit.
struct Hashing<R> {
    inner: R,
    hasher: Sha256,
    count: u64,
    limit: u64,
    probe: Rc<Probe>,
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.count += n as u64;
        if self.count > self.limit {
            self.probe.too_large.set(true);
            return Err(io::Error::other("uncompressed limit exceeded"));
        }
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

fn invalid(msg: impl Into<String>) -> Rejection {
    Rejection::Invalid(msg.into())
}

/// Validates `body` as `<episode_id>/...` tar+zstd while copying it into `sink`.
pub fn validate<R: Read, W: Write>(
    body: R,
    sink: W,
    expect: &Expect,
) -> Result<Validated, Rejection> {
    let probe = Rc::new(Probe::default());
    let classify = |e: io::Error, what: &str| -> Rejection {
        if let Some(e) = take_err(&probe.sink_err) {
            return Rejection::Sink(e);
        }
        if let Some(e) = take_err(&probe.source_err) {
            return Rejection::Source(e);
        }
        if probe.too_large.get() {
            return Rejection::TooLarge(expect.max_uncompressed);
        }
        if probe.bytes_in.get() == 0 {
            return invalid("body is empty");
        }
        invalid(format!("{what}: {e}"))
    };
    let tee = Tee {
        inner: body,
        sink,
        count: 0,
        probe: probe.clone(),
    };
    let mut decoder =
        zstd::stream::read::Decoder::new(tee).map_err(|e| classify(e, "zstd decoder"))?;
    decoder
        .window_log_max(WINDOW_LOG_MAX)
        .map_err(|e| classify(e, "zstd decoder"))?;
    let hashing = Hashing {
        inner: decoder,
        hasher: Sha256::new(),
        count: 0,
        limit: expect.max_uncompressed,
        probe: probe.clone(),
    };
    let mut archive = tar::Archive::new(hashing);
    let mut seen: HashSet<u128> = HashSet::new();
    let mut files = 0u64;
    let mut entries_n = 0u64;
    let mut meta_commit: Option<Commit> = None;
    let mut end_of_entries = 0u64;
    {
        let entries = archive
            .entries()
            .map_err(|e| classify(e, "body is not a valid tar+zstd stream"))?;
        for entry in entries {
            let mut entry =
                entry.map_err(|e| classify(e, "body is not a valid tar+zstd stream"))?;
            entries_n += 1;
            if entries_n > MAX_ENTRIES {
                return Err(invalid(format!(
                    "tar holds more than {MAX_ENTRIES} entries"
                )));
            }
            let raw = entry.path_bytes().into_owned();
            let name =
                String::from_utf8(raw).map_err(|_| invalid("tar entry name is not valid UTF-8"))?;
            let kind = entry.header().entry_type();
            let is_dir = kind.is_dir();
            if !(kind.is_file() || is_dir) {
                return Err(invalid(format!(
                    "tar entry {name:?} is a {}; only regular files and directories are allowed",
                    entry_kind_name(kind)
                )));
            }
            let rel = check_path(&name, &expect.episode_id)?;
            let key = path_key(&rel);
            if !seen.insert(key) {
                return Err(invalid(format!(
                    "tar entry {name:?} repeats an earlier path"
                )));
            }
            let size = entry.size();
            end_of_entries = entry.raw_file_position() + size.div_ceil(512) * 512;
            if is_dir {
                continue;
            }
            files += 1;
            if rel == "meta.json" {
                if size > MAX_META_BYTES {
                    return Err(invalid(format!(
                        "meta.json is {size} bytes; at most {MAX_META_BYTES} are accepted"
                    )));
                }
                let mut buf = Vec::with_capacity(size as usize);
                entry
                    .read_to_end(&mut buf)
                    .map_err(|e| classify(e, "failed to read meta.json"))?;
                let c = commit_from_meta(&buf).map_err(|e| invalid(e.to_string()))?;
                meta_commit = Some(c);
            }
        }
    }
    let mut hashing = archive.into_inner();
    // Whatever follows the first end block must be zero padding, through the end of the stream.
    let mut buf = [0u8; 8192];
    loop {
        let n = hashing
            .read(&mut buf)
            .map_err(|e| classify(e, "body is not a valid tar+zstd stream"))?;
        if n == 0 {
            break;
        }
        if buf[..n].iter().any(|&b| b != 0) {
            return Err(invalid("data follows the tar end-of-archive blocks"));
        }
    }
    let total = hashing.count;
    if total == 0 {
        return Err(invalid("body is empty"));
    }
    if total % 512 != 0 || total < end_of_entries + 1024 {
        return Err(invalid(
            "tar stream is truncated: it does not end with two zero blocks",
        ));
    }
    let sha = hex::encode(hashing.hasher.finalize());
    let mut rest = hashing.inner.finish();
    let leftover = rest
        .fill_buf()
        .map_err(|e| classify(e, "body is not a valid zstd stream"))?;
    if !leftover.is_empty() {
        return Err(invalid("data follows the last zstd frame"));
    }
    let compressed_bytes = rest.get_ref().count;
    let mut tee = rest.into_inner();
    tee.sink.flush().map_err(Rejection::Sink)?;

    let commit = meta_commit.ok_or_else(|| {
        invalid(format!(
            "tar has no {}/meta.json regular file",
            expect.episode_id
        ))
    })?;
    if let Some(want) = &expect.commit {
        if *want != commit {
            return Err(invalid(format!(
                "meta.json commit {commit} differs from the X-Cis490-Code-Commit header {want}"
            )));
        }
    }
    if let Some(want) = &expect.tar_sha256 {
        if *want != sha {
            return Err(invalid(format!(
                "SHA-256 of the tar stream is {sha}, the X-Cis490-Tar-SHA256 header says {want}"
            )));
        }
    }
    Ok(Validated {
        tar_sha256: sha,
        uncompressed_bytes: total,
        compressed_bytes,
        files,
        commit,
    })
}

fn entry_kind_name(kind: tar::EntryType) -> &'static str {
    match kind {
        tar::EntryType::Symlink => "symlink",
        tar::EntryType::Link => "hard link",
        tar::EntryType::Char => "character device",
        tar::EntryType::Block => "block device",
        tar::EntryType::Fifo => "FIFO",
        tar::EntryType::Continuous => "contiguous file",
        tar::EntryType::GNUSparse => "sparse file",
        tar::EntryType::XGlobalHeader => "pax global header",
        _ => "special entry",
    }
}

/// Confines a name to `<episode_id>/`; returns the path below it ("" for the directory itself).
fn check_path(name: &str, episode_id: &str) -> Result<String, Rejection> {
    let escape = || {
        invalid(format!(
            "tar entry {name:?} is outside {episode_id}/ (entries must be {episode_id}/...)"
        ))
    };
    if name.starts_with('/') {
        return Err(escape());
    }
    let trimmed = name.strip_suffix('/').unwrap_or(name);
    let mut parts = trimmed.split('/');
    if parts.next() != Some(episode_id) {
        return Err(escape());
    }
    let rest: Vec<&str> = parts.collect();
    if rest
        .iter()
        .any(|p| p.is_empty() || *p == "." || *p == ".." || p.contains('\0'))
    {
        return Err(escape());
    }
    Ok(rest.join("/"))
}

fn path_key(rel: &str) -> u128 {
    let d = Sha256::digest(rel.as_bytes());
    let mut k = [0u8; 16];
    k.copy_from_slice(&d[..16]);
    u128::from_le_bytes(k)
}

/// Summarises a stored tarball (reindex and start-up repair).
pub fn summarize_file(
    path: &std::path::Path,
    episode_id: &str,
    max_uncompressed: u64,
) -> Result<Validated, Rejection> {
    let f = std::fs::File::open(path).map_err(Rejection::Source)?;
    summarize_reader(io::BufReader::new(f), episode_id, max_uncompressed)
}

/// Summarises a stored tarball read from anywhere (the S3 store streams it from the bucket).
pub fn summarize_reader<R: Read>(
    body: R,
    episode_id: &str,
    max_uncompressed: u64,
) -> Result<Validated, Rejection> {
    validate(
        body,
        io::sink(),
        &Expect {
            episode_id: episode_id.to_string(),
            commit: None,
            tar_sha256: None,
            max_uncompressed,
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const C: &str = "0123456789abcdef0123456789abcdef01234567";

    fn meta() -> Vec<u8> {
        format!(r#"{{"episode_id":"ep1","code_version":{{"commit":"{C}"}}}}"#).into_bytes()
    }

    fn tar_of(entries: &[(&str, &[u8])]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (name, data) in entries {
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            h.set_entry_type(tar::EntryType::Regular);
            b.append_data(&mut h, name, *data).unwrap();
        }
        b.into_inner().unwrap()
    }

    fn zst(raw: &[u8]) -> Vec<u8> {
        zstd::encode_all(raw, 3).unwrap()
    }

    fn expect() -> Expect {
        Expect {
            episode_id: "ep1".into(),
            commit: Some(Commit::parse(C).unwrap()),
            tar_sha256: None,
            max_uncompressed: 1 << 30,
        }
    }

    fn run(body: &[u8], e: &Expect) -> (Result<Validated, Rejection>, Vec<u8>) {
        let mut sink = Vec::new();
        let r = validate(body, &mut sink, e);
        (r, sink)
    }

    #[test]
    fn accepts_a_good_episode_and_copies_it() {
        let m = meta();
        let raw = tar_of(&[("ep1/meta.json", &m), ("ep1/data.bin", b"hello")]);
        let body = zst(&raw);
        let mut e = expect();
        e.tar_sha256 = Some(hex::encode(Sha256::digest(&raw)));
        let (r, sink) = run(&body, &e);
        let v = r.unwrap();
        assert_eq!(sink, body);
        assert_eq!(v.files, 2);
        assert_eq!(v.uncompressed_bytes, raw.len() as u64);
        assert_eq!(v.compressed_bytes, body.len() as u64);
        assert_eq!(v.commit.to_string(), C);
    }

    fn rejected(body: &[u8], e: &Expect) -> String {
        match run(body, e).0 {
            Err(Rejection::Invalid(m)) => m,
            other => panic!("expected Invalid, got {other:?}"),
        }
    }

    #[test]
    fn wrong_sha_is_invalid() {
        let m = meta();
        let raw = tar_of(&[("ep1/meta.json", &m)]);
        let mut e = expect();
        e.tar_sha256 = Some("0".repeat(64));
        assert!(rejected(&zst(&raw), &e).contains("SHA-256"));
    }

    #[test]
    fn escapes_and_foreign_roots_are_invalid() {
        let m = meta();
        for bad in ["ep2/meta.json", "ep1/../x", "ep1/./x", "ep1//x", "x"] {
            let mut raw = tar_of(&[("ep1/meta.json", &m)]);
            // Rewrite the first entry's name in place to dodge tar-rs' own path checks.
            raw[..100].fill(0);
            raw[..bad.len()].copy_from_slice(bad.as_bytes());
            let mut h = tar::Header::from_byte_slice(&raw[..512]).clone();
            h.set_cksum();
            raw[..512].copy_from_slice(h.as_bytes());
            let msg = rejected(&zst(&raw), &expect());
            assert!(msg.contains("outside ep1/"), "{bad}: {msg}");
        }
    }

    #[test]
    fn missing_meta_and_wrong_commit_are_invalid() {
        let raw = tar_of(&[("ep1/data", b"x")]);
        assert!(rejected(&zst(&raw), &expect()).contains("no ep1/meta.json"));
        let other = meta();
        let raw = tar_of(&[("ep1/meta.json", &other)]);
        let mut e = expect();
        e.commit = Some(Commit::parse(&"f".repeat(40)).unwrap());
        assert!(rejected(&zst(&raw), &e).contains("differs from the X-Cis490-Code-Commit"));
    }

    #[test]
    fn duplicates_symlinks_and_garbage_are_invalid() {
        let m = meta();
        let raw = tar_of(&[("ep1/meta.json", &m), ("ep1/meta.json", &m)]);
        assert!(rejected(&zst(&raw), &expect()).contains("repeats"));

        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_size(m.len() as u64);
        b.append_data(&mut h, "ep1/meta.json", &m[..]).unwrap();
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Symlink);
        h.set_size(0);
        b.append_link(&mut h, "ep1/link", "/etc/passwd").unwrap();
        let raw = b.into_inner().unwrap();
        assert!(rejected(&zst(&raw), &expect()).contains("symlink"));

        let mut raw = tar_of(&[("ep1/meta.json", &m)]);
        raw.extend_from_slice(b"junk");
        raw.resize(raw.len().div_ceil(512) * 512, 0);
        assert!(rejected(&zst(&raw), &expect()).contains("end-of-archive"));

        let raw = tar_of(&[("ep1/meta.json", &m)]);
        let mut body = zst(&raw);
        body.extend_from_slice(b"trailing garbage");
        assert!(rejected(&body, &expect()).contains("zstd"));

        let body = zst(&raw);
        assert!(rejected(&body[..body.len() - 3], &expect()).contains("tar+zstd"));
        let m = rejected(b"", &expect());
        assert!(m.contains("empty"), "{m}");
    }

    #[test]
    fn truncated_tar_without_end_blocks_is_invalid() {
        let m = meta();
        let raw = tar_of(&[("ep1/meta.json", &m)]);
        let cut = &raw[..raw.len() - 1024];
        assert!(rejected(&zst(cut), &expect()).contains("truncated"));
    }

    #[test]
    fn a_bomb_stops_at_the_limit() {
        let m = meta();
        let big = vec![0u8; 4 << 20];
        let raw = tar_of(&[("ep1/meta.json", &m), ("ep1/zeros", &big)]);
        let body = zst(&raw);
        let mut e = expect();
        e.max_uncompressed = 1 << 20;
        let (r, sink) = run(&body, &e);
        assert!(matches!(r, Err(Rejection::TooLarge(_))), "{r:?}");
        assert!(sink.len() <= body.len());
    }

    #[test]
    fn sink_failures_are_not_blamed_on_the_client() {
        struct Full;
        impl Write for Full {
            fn write(&mut self, _: &[u8]) -> io::Result<usize> {
                Err(io::Error::from(io::ErrorKind::StorageFull))
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let m = meta();
        let body = zst(&tar_of(&[("ep1/meta.json", &m)]));
        let r = validate(&body[..], Full, &expect());
        match r {
            Err(Rejection::Sink(e)) => assert_eq!(e.kind(), io::ErrorKind::StorageFull),
            other => panic!("{other:?}"),
        }
    }
}
