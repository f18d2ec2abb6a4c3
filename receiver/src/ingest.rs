//! One streaming pass over an upload: the compressed bytes go to the sink (a temp file) while
//! they are zstd-decoded, SHA-256'd and walked as a tar, so a bad body is refused as soon as it
//! shows itself and a good one is never read twice.

use std::cell::{Cell, RefCell};
use std::io::{self, BufRead, Read, Write};
use std::rc::Rc;
use std::sync::Arc;

use cis490_common::meta::{commit_from_meta, MAX_META_BYTES};
use cis490_common::Commit;
use sha2::{Digest, Sha256};

use crate::decoders::{self, Busy, DecoderBudget, DecoderLease};
use crate::tarwalk::{self, Kind, WalkError, WalkLimits, DEFAULT_MAX_PATH_BYTES};
use crate::zframes::{FrameError, FrameScanner};

/// Largest zstd window accepted; bounds decoder memory per upload (shared with the shipper).
pub const WINDOW_LOG_MAX: u32 = cis490_common::ZSTD_WINDOW_LOG_MAX;
/// Most tar entries one episode may hold; bounds the duplicate-path set of a tar bomb.
pub const MAX_ENTRIES: u64 = 1_000_000;
/// Default of `[limits] max_compression_ratio`.
pub const DEFAULT_MAX_COMPRESSION_RATIO: u64 = 1000;
/// Decoded bytes before the compression ratio is judged (SPEC §16).
pub const RATIO_GRACE_BYTES: u64 = 1 << 20;

/// What the request headers promised, and the limits the body is held to.
#[derive(Debug, Clone)]
pub struct Expect {
    pub episode_id: String,
    /// `None` when summarising a stored file (reindex): the commit is read, not checked.
    pub commit: Option<Commit>,
    pub tar_sha256: Option<String>,
    pub max_uncompressed: u64,
    /// Longest entry name (`[limits] max_path_bytes`).
    pub max_path_bytes: usize,
    /// Largest uncompressed/compressed ratio once 1 MiB is decoded; 0 turns the check off.
    pub max_ratio: u64,
    /// The budget the decoder leases its memory from, and the host it leases for (`None`:
    /// unbudgeted, for the tools that decode one body at a time).
    pub decoder_budget: Option<(Arc<DecoderBudget>, String)>,
}

impl Expect {
    /// Limits for an upload of `episode_id` with the defaults of SPEC §16.
    pub fn new(episode_id: &str, max_uncompressed: u64) -> Self {
        Expect {
            episode_id: episode_id.to_string(),
            commit: None,
            tar_sha256: None,
            max_uncompressed,
            max_path_bytes: DEFAULT_MAX_PATH_BYTES,
            max_ratio: DEFAULT_MAX_COMPRESSION_RATIO,
            decoder_budget: None,
        }
    }
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
    /// 413: the body decompresses to more than this many times its compressed size.
    #[error("the body decompresses to more than {0} times its compressed size")]
    Ratio(u64),
    /// Writing the sink failed (disk full → 507, else 500); nothing is the client's fault.
    #[error("failed to write the upload: {0}")]
    Sink(io::Error),
    /// Reading the body failed (client gone, idle timeout); the upload is abandoned.
    #[error("failed to read the request body: {0}")]
    Source(io::Error),
    /// 503: the decoder's memory did not come free in time; nothing is the client's fault.
    #[error("{0}")]
    Busy(Busy),
}

impl Rejection {
    /// True for the verdicts on the body itself (422/413), which quarantine it.
    pub fn is_verdict(&self) -> bool {
        matches!(
            self,
            Rejection::Invalid(_) | Rejection::TooLarge(_) | Rejection::Ratio(_)
        )
    }
}

#[derive(Default)]
struct Probe {
    source_err: RefCell<Option<io::Error>>,
    sink_err: RefCell<Option<io::Error>>,
    frame_err: RefCell<Option<FrameError>>,
    busy: RefCell<Option<Busy>>,
    too_large: Cell<bool>,
    ratio: Cell<bool>,
    bytes_in: Cell<u64>,
}

fn take_err<T>(slot: &RefCell<Option<T>>) -> Option<T> {
    slot.borrow_mut().take()
}

/// Copies what it reads into the sink, counts it and follows its zstd framing.
struct Tee<R, W> {
    inner: R,
    sink: W,
    count: u64,
    frames: FrameScanner,
    lease: Option<DecoderLease>,
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
        if let Err(e) = self.frames.feed(&buf[..n]) {
            *self.probe.frame_err.borrow_mut() = Some(e);
            return Err(io::Error::other("zstd framing refused"));
        }
        if let Some(lease) = &mut self.lease {
            // The frame headers just read say what the decoder will allocate: lease it first.
            if let Err(busy) = lease.grow(self.frames.decoder_bytes, decoders::WAIT) {
                *self.probe.busy.borrow_mut() = Some(busy);
                return Err(io::Error::other("decoder memory budget exhausted"));
            }
        }
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

/// Hashes and counts the uncompressed stream, failing once it passes the size limit or the
/// compression ratio.
struct Hashing<R> {
    inner: R,
    hasher: Sha256,
    count: u64,
    limit: u64,
    max_ratio: u64,
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
        if self.max_ratio > 0
            && self.count > RATIO_GRACE_BYTES
            && self.count / self.max_ratio > self.probe.bytes_in.get()
        {
            self.probe.ratio.set(true);
            return Err(io::Error::other("compression ratio exceeded"));
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
    validate_listing(body, sink, expect, |_, _| {})
}

/// As [`validate`], and tells `on_entry` every admitted member (path below the episode
/// directory, and its kind) in archive order.
pub fn validate_listing<R: Read, W: Write>(
    body: R,
    sink: W,
    expect: &Expect,
    on_entry: impl FnMut(&str, Kind),
) -> Result<Validated, Rejection> {
    let lease = expect
        .decoder_budget
        .as_ref()
        .map(|(budget, host)| budget.lease(host));
    validate_inner(body, sink, expect, lease, on_entry)
}

/// As [`validate`], with decoder memory already leased (`None`: unbudgeted; the caller bounds
/// it otherwise). The lease still grows, waiting as [`validate`] does, should a later frame
/// declare a larger window.
pub fn validate_leased<R: Read, W: Write>(
    body: R,
    sink: W,
    expect: &Expect,
    lease: Option<DecoderLease>,
) -> Result<Validated, Rejection> {
    validate_inner(body, sink, expect, lease, |_, _| {})
}

fn validate_inner<R: Read, W: Write>(
    body: R,
    sink: W,
    expect: &Expect,
    lease: Option<DecoderLease>,
    on_entry: impl FnMut(&str, Kind),
) -> Result<Validated, Rejection> {
    let probe = Rc::new(Probe::default());
    let mut hashing = open(body, sink, expect, lease, &probe)?;
    let (walked, meta_commit) = walk_members(&mut hashing, expect, &probe, on_entry)?;
    debug_assert_eq!(walked.total, hashing.count);
    let sha = hex::encode(hashing.hasher.finalize());
    let compressed_bytes = end_of_body(hashing.inner, expect, &probe)?;
    let commit = meta_commit.ok_or_else(|| {
        invalid(format!(
            "tar has no {}/meta.json regular file",
            expect.episode_id
        ))
    })?;
    matches_headers(expect, &commit, &sha)?;
    Ok(Validated {
        tar_sha256: sha,
        uncompressed_bytes: walked.total,
        compressed_bytes,
        files: walked.files,
        commit,
    })
}

type Streams<R, W> = Hashing<zstd::stream::read::Decoder<'static, io::BufReader<Tee<R, W>>>>;

impl Probe {
    /// Names the cause of a failed read: the layer that recorded one wins, else `what`.
    fn classify(&self, e: io::Error, what: &str, expect: &Expect) -> Rejection {
        if let Some(e) = take_err(&self.sink_err) {
            return Rejection::Sink(e);
        }
        if let Some(e) = take_err(&self.source_err) {
            return Rejection::Source(e);
        }
        if let Some(b) = take_err(&self.busy) {
            return Rejection::Busy(b);
        }
        if let Some(e) = take_err(&self.frame_err) {
            return invalid(e.to_string());
        }
        if self.too_large.get() {
            return Rejection::TooLarge(expect.max_uncompressed);
        }
        if self.ratio.get() {
            return Rejection::Ratio(expect.max_ratio);
        }
        if self.bytes_in.get() == 0 {
            return invalid("body is empty");
        }
        invalid(format!("{what}: {e}"))
    }
}

/// Step 1: body -> tee into the sink -> zstd -> hashing and limits.
fn open<R: Read, W: Write>(
    body: R,
    sink: W,
    expect: &Expect,
    lease: Option<DecoderLease>,
    probe: &Rc<Probe>,
) -> Result<Streams<R, W>, Rejection> {
    let tee = Tee {
        inner: body,
        sink,
        count: 0,
        frames: FrameScanner::new(),
        lease,
        probe: probe.clone(),
    };
    let mut decoder = zstd::stream::read::Decoder::new(tee)
        .map_err(|e| probe.classify(e, "zstd decoder", expect))?;
    decoder
        .window_log_max(WINDOW_LOG_MAX)
        .map_err(|e| probe.classify(e, "zstd decoder", expect))?;
    Ok(Hashing {
        inner: decoder,
        hasher: Sha256::new(),
        count: 0,
        limit: expect.max_uncompressed,
        max_ratio: expect.max_ratio,
        probe: probe.clone(),
    })
}

/// Step 2: the tar walk, which also reads the commit out of `meta.json`.
fn walk_members<R: Read>(
    tar: &mut R,
    expect: &Expect,
    probe: &Probe,
    mut on_entry: impl FnMut(&str, Kind),
) -> Result<(tarwalk::Walked, Option<Commit>), Rejection> {
    let limits = WalkLimits {
        max_path_bytes: expect.max_path_bytes,
        max_entries: MAX_ENTRIES,
    };
    let mut meta_commit: Option<Commit> = None;
    let walked = tarwalk::walk(tar, &expect.episode_id, &limits, |m, data| {
        on_entry(m.rel, m.kind);
        if m.kind == Kind::File && m.rel == "meta.json" {
            meta_commit = Some(read_meta(m.size, data)?);
        }
        Ok(())
    });
    match walked {
        Ok(w) => Ok((w, meta_commit)),
        Err(WalkError::Invalid(m)) => {
            // A refusal can follow a read error the walk saw as an end of data.
            if let Some(e) = take_err(&probe.frame_err) {
                return Err(invalid(e.to_string()));
            }
            if let Some(b) = take_err(&probe.busy) {
                return Err(Rejection::Busy(b));
            }
            Err(invalid(m))
        }
        Err(WalkError::Io(e, what)) => Err(probe.classify(e, what, expect)),
    }
}

/// The commit `meta.json` names, bounded by [`MAX_META_BYTES`].
fn read_meta(size: u64, data: &mut dyn Read) -> Result<Commit, WalkError> {
    if size > MAX_META_BYTES {
        return Err(WalkError::Invalid(format!(
            "meta.json is {size} bytes; at most {MAX_META_BYTES} are accepted"
        )));
    }
    let mut buf = Vec::with_capacity(size as usize);
    data.read_to_end(&mut buf)
        .map_err(|e| WalkError::Io(e, "failed to read meta.json"))?;
    if (buf.len() as u64) < size {
        return Err(WalkError::Invalid(
            "tar stream is truncated: it does not end with two zero blocks".into(),
        ));
    }
    commit_from_meta(&buf).map_err(|e| WalkError::Invalid(e.to_string()))
}

/// Step 3: nothing follows the last zstd frame, and the sink has every byte. Returns the
/// compressed length.
fn end_of_body<R: Read, W: Write>(
    decoder: zstd::stream::read::Decoder<'static, io::BufReader<Tee<R, W>>>,
    expect: &Expect,
    probe: &Probe,
) -> Result<u64, Rejection> {
    let mut rest = decoder.finish();
    let leftover = rest
        .fill_buf()
        .map_err(|e| probe.classify(e, "body is not a valid zstd stream", expect))?;
    if !leftover.is_empty() || !rest.get_ref().frames.at_boundary() {
        return Err(invalid("data follows the last zstd frame"));
    }
    let compressed_bytes = rest.get_ref().count;
    let mut tee = rest.into_inner();
    tee.sink.flush().map_err(Rejection::Sink)?;
    Ok(compressed_bytes)
}

/// Step 4: the body is what the headers declared.
fn matches_headers(expect: &Expect, commit: &Commit, sha: &str) -> Result<(), Rejection> {
    if let Some(want) = &expect.commit {
        if want != commit {
            return Err(invalid(format!(
                "meta.json commit {commit} differs from the X-Cis490-Code-Commit header {want}"
            )));
        }
    }
    if let Some(want) = &expect.tar_sha256 {
        if want != sha {
            return Err(invalid(format!(
                "SHA-256 of the tar stream is {sha}, the X-Cis490-Tar-SHA256 header says {want}"
            )));
        }
    }
    Ok(())
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
    // What is stored was admitted once; the ratio is not judged again.
    let mut e = Expect::new(episode_id, max_uncompressed);
    e.max_ratio = 0;
    validate(body, io::sink(), &e)
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
        let mut e = Expect::new("ep1", 1 << 30);
        e.commit = Some(Commit::parse(C).unwrap());
        e
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
    fn the_ratio_cap_stops_a_bomb_within_a_thousand_times_what_was_read() {
        // 256 MiB of zeros in one member: a few KB compressed.
        let m = meta();
        let big = vec![0u8; 256 << 20];
        let raw = tar_of(&[("ep1/meta.json", &m), ("ep1/zeros", &big)]);
        let body = zst(&raw);
        let (r, sink) = run(&body, &expect());
        assert!(matches!(r, Err(Rejection::Ratio(1000))), "{r:?}");
        // What was decoded is bounded by what was read: the sink saw every compressed byte.
        assert!(sink.len() as u64 * 1000 + RATIO_GRACE_BYTES < 256 << 20);
        // With the check off the same body is admitted.
        let mut e = expect();
        e.max_ratio = 0;
        assert!(run(&body, &e).0.is_ok());
    }

    #[test]
    fn skippable_frames_are_refused_ordinary_frame_splits_are_not() {
        let m = meta();
        let raw = tar_of(&[("ep1/meta.json", &m), ("ep1/data", b"abc")]);
        let cut = 512;
        let mut split = zst(&raw[..cut]);
        split.extend(zst(&raw[cut..]));
        assert!(run(&split, &expect()).0.is_ok());
        let mut skip = zst(&raw[..cut]);
        skip.extend_from_slice(&0x184D_2A50u32.to_le_bytes());
        skip.extend_from_slice(&3u32.to_le_bytes());
        skip.extend_from_slice(b"xyz");
        skip.extend(zst(&raw[cut..]));
        assert!(rejected(&skip, &expect()).contains("skippable frame"));
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
