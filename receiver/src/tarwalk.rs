//! The receiver's own tar reader: it admits only the form the shipper writes (SPEC §2, §16)
//! and reads every header itself, so nothing is buffered that a limit has not bounded first
//! and nothing is skipped or resolved differently from GNU tar and Python's `tarfile`.
//!
//! Admitted: 512-byte ustar (`ustar\0` `00`) or GNU (`ustar  \0`) headers with a correct
//! unsigned checksum, of type `0`/NUL (regular file) or `5` (directory, size 0), an empty link
//! name and an all-zero prefix area, numeric fields as tar writers write them (octal digits
//! ended by NUL or space, or base-256), names cut at their first NUL with only NULs after it;
//! a GNU long-name record (`L`) only directly before the member it names, only for a name
//! longer than the 100 bytes a header holds, and only up to `max_path_bytes`. The archive ends
//! with zero blocks and only zero bytes after them. Everything else is refused.

use std::collections::HashMap;
use std::io::{self, Read};

/// Default of `[limits] max_path_bytes`.
pub const DEFAULT_MAX_PATH_BYTES: usize = 4096;
/// Longest path component (every common filesystem's NAME_MAX).
pub const MAX_COMPONENT_BYTES: usize = 255;
/// Most bytes of a name quoted in a message.
const QUOTE_BYTES: usize = 200;
/// Most distinct paths (entries and the directories they imply) one walk keeps track of.
pub const MAX_TRACKED_PATHS: usize = 1_100_000;
/// Largest member size taken at face value (2^62): far above any limit, and padding it to
/// whole blocks cannot overflow. GNU tar refuses sizes past off_t.
pub const MAX_MEMBER_SIZE: u64 = 1 << 62;

const BLOCK: usize = 512;

#[derive(Debug, Clone, Copy)]
pub struct WalkLimits {
    pub max_path_bytes: usize,
    pub max_entries: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    File,
    Dir,
}

/// One admitted member, as the walk hands it on.
#[derive(Debug)]
pub struct Member<'a> {
    /// The path below `<episode_id>/` ("" for the episode directory itself).
    pub rel: &'a str,
    pub kind: Kind,
    pub size: u64,
}

#[derive(Debug)]
pub enum WalkError {
    /// Reading the stream failed; `what` says where, for the caller's message.
    Io(io::Error, &'static str),
    /// The archive is not in the admitted form.
    Invalid(String),
}

fn invalid(msg: impl Into<String>) -> WalkError {
    WalkError::Invalid(msg.into())
}

/// What a complete walk found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Walked {
    pub files: u64,
    pub entries: u64,
    /// Bytes of the tar stream, end blocks and trailing zeros included.
    pub total: u64,
}

/// A name quoted for a message: at most 200 bytes of it.
pub fn quote(name: &str) -> String {
    if name.len() <= QUOTE_BYTES {
        return format!("{name:?}");
    }
    let mut cut = QUOTE_BYTES;
    while !name.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{:?}... ({} bytes)", &name[..cut], name.len())
}

struct Counted<R> {
    inner: R,
    pos: u64,
}

impl<R: Read> Counted<R> {
    /// Reads one block; `Ok(false)` at a clean end of stream before its first byte.
    fn block(&mut self, buf: &mut [u8; BLOCK]) -> Result<bool, WalkError> {
        let mut got = 0;
        while got < BLOCK {
            match self.inner.read(&mut buf[got..]) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(WalkError::Io(e, "body is not a valid tar+zstd stream")),
            }
        }
        self.pos += got as u64;
        match got {
            0 => Ok(false),
            BLOCK => Ok(true),
            _ => Err(truncated()),
        }
    }

    /// Reads and drops `n` bytes.
    fn skip(&mut self, mut n: u64) -> Result<(), WalkError> {
        let mut buf = [0u8; 8192];
        while n > 0 {
            let want = (buf.len() as u64).min(n) as usize;
            let got = match self.inner.read(&mut buf[..want]) {
                Ok(0) => return Err(truncated()),
                Ok(got) => got,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(WalkError::Io(e, "body is not a valid tar+zstd stream")),
            };
            self.pos += got as u64;
            n -= got as u64;
        }
        Ok(())
    }
}

impl<R: Read> Read for Counted<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.pos += n as u64;
        Ok(n)
    }
}

fn truncated() -> WalkError {
    invalid("tar stream is truncated: it does not end with two zero blocks")
}

fn padded(size: u64) -> u64 {
    size.div_ceil(BLOCK as u64) * BLOCK as u64
}

/// A header's fields, by offset (POSIX ustar layout; GNU uses the same offsets up to 345).
mod field {
    use std::ops::Range;
    pub const NAME: Range<usize> = 0..100;
    pub const MODE: Range<usize> = 100..108;
    pub const UID: Range<usize> = 108..116;
    pub const GID: Range<usize> = 116..124;
    pub const SIZE: Range<usize> = 124..136;
    pub const MTIME: Range<usize> = 136..148;
    pub const CHKSUM: Range<usize> = 148..156;
    pub const TYPEFLAG: usize = 156;
    pub const LINKNAME: Range<usize> = 157..257;
    pub const MAGIC: Range<usize> = 257..265;
    pub const DEVMAJOR: Range<usize> = 329..337;
    pub const DEVMINOR: Range<usize> = 337..345;
    /// The ustar prefix; in a GNU header, atime, ctime and the old sparse map.
    pub const PREFIX: Range<usize> = 345..500;
}

/// Parses a numeric field the one way every extractor agrees on: octal digits (at least one
/// when `required`) then only NULs or spaces; or, where `base256`, base-256 with the high bit
/// of the first byte set (GNU tar reads the checksum as octal only).
fn numeric_field(
    h: &[u8; BLOCK],
    r: std::ops::Range<usize>,
    what: &str,
    required: bool,
    base256: bool,
) -> Result<u64, WalkError> {
    let f = &h[r];
    let bad = || invalid(format!("tar header has a malformed {what} field"));
    if f[0] & 0x80 != 0 {
        if !base256 || f[0] != 0x80 {
            return Err(bad());
        }
        let mut v: u64 = 0;
        for &b in &f[1..] {
            if v >> 56 != 0 {
                return Err(bad());
            }
            v = (v << 8) | u64::from(b);
        }
        return Ok(v);
    }
    let digits = f.iter().take_while(|b| (b'0'..=b'7').contains(b)).count();
    if digits == f.len() || (required && digits == 0) {
        return Err(bad());
    }
    if f[digits..].iter().any(|&b| b != 0 && b != b' ') {
        return Err(bad());
    }
    let mut v: u64 = 0;
    for &b in &f[..digits] {
        if v >> 60 != 0 {
            return Err(bad());
        }
        v = (v << 3) | u64::from(b - b'0');
    }
    Ok(v)
}

fn numeric(
    h: &[u8; BLOCK],
    r: std::ops::Range<usize>,
    what: &str,
    required: bool,
) -> Result<u64, WalkError> {
    numeric_field(h, r, what, required, true)
}

/// The checks every header of the admitted form passes, whatever its type.
fn check_header(h: &[u8; BLOCK], at: u64) -> Result<(), WalkError> {
    let stored = numeric_field(h, field::CHKSUM, "checksum", true, false).map_err(|_| {
        invalid(format!(
            "tar header at byte {at} has a malformed checksum field"
        ))
    })?;
    let sum: u64 = h
        .iter()
        .enumerate()
        .map(|(i, &b)| {
            if field::CHKSUM.contains(&i) {
                u64::from(b' ')
            } else {
                u64::from(b)
            }
        })
        .sum();
    if sum != stored {
        return Err(invalid(format!(
            "tar header at byte {at} has a bad checksum (stored {stored}, computed {sum})"
        )));
    }
    let magic = &h[field::MAGIC];
    if magic != b"ustar\x0000" && magic != b"ustar  \0" {
        return Err(invalid(format!(
            "tar header at byte {at} is neither a ustar nor a GNU header (only the shipper's tar form is accepted)"
        )));
    }
    if h[field::PREFIX].iter().any(|&b| b != 0) {
        return Err(invalid(format!(
            "tar header at byte {at} has bytes in its ustar prefix field (only the shipper's tar form is accepted)"
        )));
    }
    for (r, what) in [
        (field::MODE, "mode"),
        (field::UID, "uid"),
        (field::GID, "gid"),
        (field::MTIME, "mtime"),
        (field::DEVMAJOR, "devmajor"),
        (field::DEVMINOR, "devminor"),
    ] {
        numeric(h, r, what, false)?;
    }
    Ok(())
}

fn kind_name(t: u8) -> &'static str {
    match t {
        b'1' => "hard link",
        b'2' => "symlink",
        b'3' => "character device",
        b'4' => "block device",
        b'6' => "FIFO",
        b'7' => "contiguous file",
        b'x' => "pax extended header",
        b'g' => "pax global header",
        b'K' => "GNU long link name record",
        b'S' => "GNU sparse file",
        b'V' => "GNU volume header",
        b'M' => "GNU multi-volume continuation",
        b'N' => "GNU old long name record",
        b'D' => "GNU dump directory",
        _ => "special entry",
    }
}

/// The header's own name: bytes up to the first NUL, and only NULs after it.
fn header_name(h: &[u8; BLOCK]) -> Result<&[u8], WalkError> {
    let f = &h[field::NAME];
    let len = f.iter().position(|&b| b == 0).unwrap_or(f.len());
    if f[len..].iter().any(|&b| b != 0) {
        return Err(invalid(
            "tar header has bytes after the NUL that ends its name",
        ));
    }
    Ok(&f[..len])
}

/// Confines a name to `<episode_id>/`; returns the path below it ("" for the directory itself).
fn check_path(
    name: &str,
    episode_id: &str,
    kind: Kind,
    limits: &WalkLimits,
) -> Result<String, WalkError> {
    let q = quote(name);
    if name.len() > limits.max_path_bytes {
        return Err(invalid(format!(
            "tar entry {q} is longer than {} bytes",
            limits.max_path_bytes
        )));
    }
    let escape = || {
        invalid(format!(
            "tar entry {q} is outside {episode_id}/ (entries must be {episode_id}/...)"
        ))
    };
    if name.starts_with('/') {
        return Err(escape());
    }
    if name.contains('\\') {
        return Err(invalid(format!(
            "tar entry {q} holds a backslash, which some extractors read as a path separator"
        )));
    }
    let trimmed = match name.strip_suffix('/') {
        Some(t) if kind == Kind::File => {
            let _ = t;
            return Err(invalid(format!(
                "tar entry {q} is a regular file whose name ends with '/'"
            )));
        }
        Some(t) => t,
        None => name,
    };
    let mut parts = trimmed.split('/');
    if parts.next() != Some(episode_id) {
        return Err(escape());
    }
    let mut rel = String::with_capacity(trimmed.len());
    for p in parts {
        if p.is_empty() || p == "." || p == ".." {
            return Err(escape());
        }
        if p.len() > MAX_COMPONENT_BYTES {
            return Err(invalid(format!(
                "tar entry {q} has a component longer than {MAX_COMPONENT_BYTES} bytes"
            )));
        }
        if !rel.is_empty() {
            rel.push('/');
        }
        rel.push_str(p);
    }
    if rel.is_empty() && kind == Kind::File {
        return Err(invalid(format!(
            "tar entry {q} is a regular file named as the episode directory {episode_id}/"
        )));
    }
    Ok(rel)
}

/// Keys of every prefix of a path (the episode directory first), chained so each costs one
/// keyed hash of its last component: key(p/c) = H(key(p), c). The hash key is secret and new
/// for every walk, so nobody can choose paths that collide; a collision could only merge two
/// paths into one, which refuses (a repeat), never admits.
struct PrefixKeys {
    hasher: std::collections::hash_map::RandomState,
    /// The previous entry's components and keys: a depth-first archive shares most of them.
    last: Vec<(String, u64)>,
}

impl PrefixKeys {
    fn new() -> Self {
        PrefixKeys {
            hasher: std::collections::hash_map::RandomState::new(),
            last: Vec::new(),
        }
    }

    /// Keys of "", then each ancestor of `rel`, then `rel` itself.
    fn of(&mut self, rel: &str) -> Vec<u64> {
        use std::hash::{BuildHasher, Hasher};
        let comps: Vec<&str> = if rel.is_empty() {
            Vec::new()
        } else {
            rel.split('/').collect()
        };
        let shared = self
            .last
            .iter()
            .zip(&comps)
            .take_while(|((c, _), n)| c == *n)
            .count();
        self.last.truncate(shared);
        for c in &comps[shared..] {
            let parent = self.last.last().map_or(0, |(_, k)| *k);
            let mut h = self.hasher.build_hasher();
            h.write_u64(parent);
            h.write(c.as_bytes());
            // A separator, so ("ab", "c") and ("a", "bc") never feed the same bytes.
            h.write_u8(0xff);
            self.last.push((c.to_string(), h.finish()));
        }
        let mut keys = Vec::with_capacity(comps.len() + 1);
        keys.push(0);
        keys.extend(self.last.iter().map(|(_, k)| *k));
        keys
    }
}

const NAMED: u8 = 1;
const DIR: u8 = 2;
const FILE: u8 = 4;

/// The tree the archive builds, kept as keys: what extraction would make of each path
/// (named by an entry, a directory named or implied by a deeper entry, a regular file).
struct Tree {
    paths: HashMap<u64, u8>,
    keys: PrefixKeys,
}

impl Tree {
    fn new() -> Self {
        Tree {
            paths: HashMap::new(),
            keys: PrefixKeys::new(),
        }
    }

    fn add(&mut self, rel: &str, kind: Kind, q: &str) -> Result<(), WalkError> {
        let keys = self.keys.of(rel);
        let (key, ancestors) = keys.split_last().unwrap_or((&0, &[]));
        // Every ancestor (the root excluded) must be, or become, a directory.
        for (depth, k) in ancestors.iter().enumerate().skip(1) {
            let flags = self.paths.entry(*k).or_insert(DIR);
            if *flags & FILE != 0 {
                let upto = rel.split('/').take(depth).collect::<Vec<_>>().join("/");
                return Err(invalid(format!(
                    "tar entry {q} lies below {}, which is a regular file",
                    quote(&upto)
                )));
            }
        }
        let flags = self.paths.entry(*key).or_insert(0);
        if *flags & NAMED != 0 {
            return Err(invalid(format!("tar entry {q} repeats an earlier path")));
        }
        match kind {
            Kind::File if *flags & DIR != 0 => {
                return Err(invalid(format!(
                    "tar entry {q} is a regular file where earlier entries put a directory"
                )))
            }
            Kind::File => *flags |= NAMED | FILE,
            Kind::Dir => *flags |= NAMED | DIR,
        }
        if self.paths.len() > MAX_TRACKED_PATHS {
            return Err(invalid(format!(
                "tar names more than {MAX_TRACKED_PATHS} distinct paths"
            )));
        }
        Ok(())
    }
}

/// Walks the tar stream `r` to its end. `on_member` sees every admitted member with a reader
/// of its data (at most `size` bytes; what it leaves unread is skipped).
pub fn walk<R, F>(
    r: R,
    episode_id: &str,
    limits: &WalkLimits,
    mut on_member: F,
) -> Result<Walked, WalkError>
where
    R: Read,
    F: FnMut(&Member<'_>, &mut dyn Read) -> Result<(), WalkError>,
{
    let mut r = Counted { inner: r, pos: 0 };
    let mut h = [0u8; BLOCK];
    let mut tree = Tree::new();
    let mut files = 0u64;
    let mut entries = 0u64;
    let mut long_name: Option<String> = None;
    loop {
        let at = r.pos;
        if !r.block(&mut h)? {
            if at == 0 {
                return Err(invalid("body is empty"));
            }
            return Err(truncated());
        }
        if h.iter().all(|&b| b == 0) {
            if long_name.is_some() {
                return Err(invalid(
                    "a GNU long-name record is not followed by the member it names",
                ));
            }
            return finish(r, at, files, entries);
        }
        check_header(&h, at)?;
        let size = numeric(&h, field::SIZE, "size", true)?;
        if size > MAX_MEMBER_SIZE {
            return Err(invalid(format!(
                "tar header at byte {at} declares a member of {size} bytes"
            )));
        }
        let t = h[field::TYPEFLAG];
        let kind = match t {
            b'0' | 0 => Kind::File,
            b'5' => Kind::Dir,
            b'L' => {
                if long_name.is_some() {
                    return Err(invalid("two GNU long-name records in a row"));
                }
                long_name = Some(read_long_name(&mut r, size, limits)?);
                continue;
            }
            other => {
                let name = String::from_utf8_lossy(header_name(&h).unwrap_or(b"?"));
                let name = long_name.as_deref().unwrap_or(&name);
                return Err(invalid(format!(
                    "tar entry {} is a {}; only regular files and directories are allowed",
                    quote(name),
                    kind_name(other)
                )));
            }
        };
        if h[field::LINKNAME].iter().any(|&b| b != 0) {
            return Err(invalid(format!(
                "tar header at byte {at} has a link name on a {}",
                match kind {
                    Kind::File => "regular file",
                    Kind::Dir => "directory",
                }
            )));
        }
        entries += 1;
        if entries > limits.max_entries {
            return Err(invalid(format!(
                "tar holds more than {} entries",
                limits.max_entries
            )));
        }
        let own = header_name(&h)?;
        if t == 0 && own.ends_with(b"/") {
            // Python (and old tars) read a type NUL entry whose header name ends in '/' as a
            // directory, whatever a long-name record says.
            return Err(invalid(format!(
                "tar header at byte {at} is of type NUL with a name ending in '/'"
            )));
        }
        let name = match long_name.take() {
            // The header's own name is what tar writers put there: the long name's start.
            // Extractors ignore it, but Python reads its trailing '/' first.
            Some(n) if !n.as_bytes().starts_with(own) || own.is_empty() => {
                return Err(invalid(format!(
                    "tar header at byte {at} names {} but its GNU long-name record names {}",
                    quote(&String::from_utf8_lossy(own)),
                    quote(&n)
                )))
            }
            Some(n) => n,
            None => String::from_utf8(own.to_vec())
                .map_err(|_| invalid("tar entry name is not valid UTF-8"))?,
        };
        let q = quote(&name);
        if kind == Kind::Dir && size != 0 {
            return Err(invalid(format!(
                "tar entry {q} is a directory that declares {size} bytes of data"
            )));
        }
        let rel = check_path(&name, episode_id, kind, limits)?;
        tree.add(&rel, kind, &q)?;
        if kind == Kind::File {
            files += 1;
        }
        let start = r.pos;
        {
            let mut data = (&mut r).take(size);
            on_member(
                &Member {
                    rel: &rel,
                    kind,
                    size,
                },
                &mut data,
            )?;
        }
        let used = r.pos - start;
        r.skip(padded(size) - used)?;
    }
}

fn read_long_name<R: Read>(
    r: &mut Counted<R>,
    size: u64,
    limits: &WalkLimits,
) -> Result<String, WalkError> {
    // The payload is the name and one terminating NUL.
    if size > limits.max_path_bytes as u64 + 1 {
        return Err(invalid(format!(
            "a GNU long-name record declares {size} bytes; names are at most {} bytes",
            limits.max_path_bytes
        )));
    }
    let mut buf = vec![0u8; padded(size) as usize];
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) => return Err(truncated()),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(WalkError::Io(e, "body is not a valid tar+zstd stream")),
        }
    }
    buf.truncate(size as usize);
    if buf.pop() != Some(0) || buf.contains(&0) {
        return Err(invalid(
            "a GNU long-name record must hold the name and one terminating NUL",
        ));
    }
    if buf.len() <= 100 {
        return Err(invalid(format!(
            "a GNU long-name record holds a {}-byte name, which fits the header itself",
            buf.len()
        )));
    }
    String::from_utf8(buf).map_err(|_| invalid("tar entry name is not valid UTF-8"))
}

/// After the first zero block: only zeros, in whole blocks, at least one more block.
fn finish<R: Read>(
    mut r: Counted<R>,
    end: u64,
    files: u64,
    entries: u64,
) -> Result<Walked, WalkError> {
    let mut buf = [0u8; 8192];
    loop {
        let n = match r.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(WalkError::Io(e, "body is not a valid tar+zstd stream")),
        };
        if buf[..n].iter().any(|&b| b != 0) {
            return Err(invalid("data follows the tar end-of-archive blocks"));
        }
    }
    let total = r.pos;
    if total % BLOCK as u64 != 0 || total < end + 2 * BLOCK as u64 {
        return Err(truncated());
    }
    Ok(Walked {
        files,
        entries,
        total,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: WalkLimits = WalkLimits {
        max_path_bytes: DEFAULT_MAX_PATH_BYTES,
        max_entries: 1000,
    };

    fn header(name: &[u8], typeflag: u8, size: u64) -> [u8; BLOCK] {
        let mut h = [0u8; BLOCK];
        h[..name.len()].copy_from_slice(name);
        h[100..107].copy_from_slice(b"0000644");
        h[108..115].copy_from_slice(b"0000000");
        h[116..123].copy_from_slice(b"0000000");
        h[124..135].copy_from_slice(format!("{size:011o}").as_bytes());
        h[136..147].copy_from_slice(b"00000000000");
        h[156] = typeflag;
        h[257..265].copy_from_slice(b"ustar  \0");
        h[148..156].fill(b' ');
        let sum: u64 = h.iter().map(|&b| u64::from(b)).sum();
        h[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
        h
    }

    /// Hands out `head`, then fails: proves nothing past it was read.
    struct Only<'a> {
        head: &'a [u8],
    }

    impl Read for Only<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            if self.head.is_empty() {
                return Err(io::Error::other("read past the long-name header"));
            }
            let n = buf.len().min(self.head.len());
            buf[..n].copy_from_slice(&self.head[..n]);
            self.head = &self.head[n..];
            Ok(n)
        }
    }

    #[test]
    fn an_oversized_long_name_is_refused_before_its_payload_is_read() {
        let mut t = header(b"ep/", b'5', 0).to_vec();
        t.extend_from_slice(&header(b"././@LongLink", b'L', 1 << 30));
        match walk(Only { head: &t }, "ep", &LIMITS, |_, _| Ok(())) {
            Err(WalkError::Invalid(m)) => {
                assert!(m.contains("declares 1073741824 bytes"), "{m}")
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_long_name_at_the_cap_is_admitted_and_one_past_it_is_not() {
        for (len, ok) in [
            (DEFAULT_MAX_PATH_BYTES, true),
            (DEFAULT_MAX_PATH_BYTES + 1, false),
        ] {
            let mut name = b"ep/".to_vec();
            while name.len() < len {
                name.extend_from_slice(b"d/");
            }
            name.truncate(len - 1);
            name.push(b'f');
            let mut payload = name.clone();
            payload.push(0);
            let mut t = header(b"ep/", b'5', 0).to_vec();
            t.extend_from_slice(&header(b"././@LongLink", b'L', payload.len() as u64));
            t.extend_from_slice(&payload);
            t.resize(t.len().div_ceil(BLOCK) * BLOCK, 0);
            t.extend_from_slice(&header(&name[..100], b'0', 0));
            t.extend_from_slice(&[0u8; 1024]);
            let mut seen = Vec::new();
            let r = walk(&t[..], "ep", &LIMITS, |m, _| {
                seen.push(m.rel.len());
                Ok(())
            });
            assert_eq!(r.is_ok(), ok, "{len}: {r:?}");
            if ok {
                assert_eq!(seen, vec![0, len - 3]);
            }
        }
    }

    #[test]
    fn messages_quote_at_most_200_bytes_of_a_name() {
        let long = "é".repeat(1000);
        let q = quote(&long);
        assert!(q.len() < 260, "{}", q.len());
        assert!(q.ends_with("(2000 bytes)"), "{q}");
        assert_eq!(quote("ep/x"), "\"ep/x\"");
    }

    #[test]
    fn numeric_fields_take_only_the_form_every_extractor_agrees_on() {
        let mut h = [0u8; BLOCK];
        let mut set = |f: &[u8]| {
            h[124..136].fill(0);
            h[124..124 + f.len()].copy_from_slice(f);
            numeric(&h, field::SIZE, "size", true).ok()
        };
        assert_eq!(set(b"00000000012\0"), Some(10));
        assert_eq!(set(b"12 "), Some(10));
        assert_eq!(set(b"12\0 \0"), Some(10));
        assert_eq!(set(&[0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0]), Some(256));
        assert_eq!(set(b" 12"), None, "leading space");
        assert_eq!(set(b"1 2"), None, "inner space");
        assert_eq!(set(b"19"), None, "not octal");
        assert_eq!(set(b""), None, "empty size");
        assert_eq!(set(b"777777777777"), None, "no terminator");
    }

    #[test]
    fn a_file_cannot_sit_where_a_directory_is_implied_or_below_a_file() {
        let run = |names: &[&[u8]]| {
            let mut t = Vec::new();
            for n in names {
                t.extend_from_slice(&header(n, b'0', 0));
            }
            t.extend_from_slice(&[0u8; 1024]);
            walk(&t[..], "ep", &LIMITS, |_, _| Ok(()))
        };
        assert!(run(&[b"ep/a/b", b"ep/a/c", b"ep/d"]).is_ok());
        assert!(
            matches!(run(&[b"ep/a/b", b"ep/a"]), Err(WalkError::Invalid(m)) if m.contains("put a directory"))
        );
        assert!(
            matches!(run(&[b"ep/a", b"ep/a/b"]), Err(WalkError::Invalid(m)) if m.contains("regular file"))
        );
        assert!(
            matches!(run(&[b"ep"]), Err(WalkError::Invalid(m)) if m.contains("episode directory"))
        );
        assert!(
            matches!(run(&[b"ep/a\\b"]), Err(WalkError::Invalid(m)) if m.contains("backslash"))
        );
        // Names differing only in case are distinct paths (docs/decisions.md).
        assert!(run(&[b"ep/Case", b"ep/case"]).is_ok());
    }
}
