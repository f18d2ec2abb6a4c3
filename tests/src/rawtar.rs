//! Byte-level tar construction for hostile and differential tests: every field is set by hand,
//! so a test can write what no well-behaved tar library would (pax records, prefix bytes,
//! odd numeric forms, long-name records in the wrong place).

/// GNU magic and version (`ustar  \0`), as the shipper writes.
pub const GNU_MAGIC: &[u8; 8] = b"ustar  \0";
/// POSIX ustar magic and version (`ustar\0` `00`).
pub const USTAR_MAGIC: &[u8; 8] = b"ustar\x0000";

/// One 512-byte header under construction.
#[derive(Clone)]
pub struct Header(pub [u8; 512]);

impl Header {
    /// A GNU header: name (cut to 100 bytes), type, size, mode 0644, mtime fixed.
    pub fn gnu(name: &[u8], typeflag: u8, size: u64) -> Header {
        let mut h = Header([0u8; 512]);
        h.set_name(name);
        h.octal(100..108, 0o644);
        h.octal(108..116, 0);
        h.octal(116..124, 0);
        h.octal(124..136, size);
        h.octal(136..148, 1_700_000_000);
        h.0[156] = typeflag;
        h.0[257..265].copy_from_slice(GNU_MAGIC);
        h
    }

    pub fn set_name(&mut self, name: &[u8]) -> &mut Self {
        self.0[..100].fill(0);
        let n = name.len().min(100);
        self.0[..n].copy_from_slice(&name[..n]);
        self
    }

    /// Writes `v` as zero-padded octal digits and a NUL, as tar writers do.
    pub fn octal(&mut self, r: std::ops::Range<usize>, v: u64) -> &mut Self {
        let width = r.len() - 1;
        let s = format!("{v:0width$o}");
        let s = &s.as_bytes()[s.len().saturating_sub(width)..];
        self.0[r.clone()].fill(0);
        self.0[r.start..r.start + s.len()].copy_from_slice(s);
        self
    }

    /// Overwrites `r` with `bytes` (the rest of the field zeroed).
    pub fn field(&mut self, r: std::ops::Range<usize>, bytes: &[u8]) -> &mut Self {
        self.0[r.clone()].fill(0);
        let n = bytes.len().min(r.len());
        self.0[r.start..r.start + n].copy_from_slice(&bytes[..n]);
        self
    }

    /// The unsigned checksum, written as tar writers do (six octal digits, NUL, space).
    pub fn finish(&mut self) -> [u8; 512] {
        self.0[148..156].fill(b' ');
        let sum: u64 = self.0.iter().map(|&b| u64::from(b)).sum();
        let s = format!("{sum:06o}\0 ");
        self.0[148..156].copy_from_slice(s.as_bytes());
        self.0
    }

    /// The right checksum written in base-256, a form GNU tar does not read (Python does).
    pub fn finish_base256_checksum(&mut self) -> [u8; 512] {
        self.0[148..156].fill(b' ');
        let sum: u64 = self.0.iter().map(|&b| u64::from(b)).sum();
        let mut f = [0u8; 8];
        f[0] = 0x80;
        f[6..].copy_from_slice(&(sum as u16).to_be_bytes());
        self.field(148..156, &f);
        self.0
    }

    /// Like [`Header::finish`] but leaves the checksum field as it is.
    pub fn raw(&self) -> [u8; 512] {
        self.0
    }
}

/// A tar stream under construction.
#[derive(Default, Clone)]
pub struct Tar(pub Vec<u8>);

impl Tar {
    pub fn new() -> Tar {
        Tar(Vec::new())
    }

    /// A header block and `data`, padded to the block size.
    pub fn push(&mut self, header: [u8; 512], data: &[u8]) -> &mut Self {
        self.0.extend_from_slice(&header);
        self.0.extend_from_slice(data);
        self.pad();
        self
    }

    pub fn pad(&mut self) -> &mut Self {
        self.0.resize(self.0.len().div_ceil(512) * 512, 0);
        self
    }

    pub fn file(&mut self, name: &str, data: &[u8]) -> &mut Self {
        let h = Header::gnu(name.as_bytes(), b'0', data.len() as u64).finish();
        self.push(h, data)
    }

    pub fn dir(&mut self, name: &str) -> &mut Self {
        let mut h = Header::gnu(name.as_bytes(), b'5', 0);
        h.octal(100..108, 0o755);
        self.push(h.finish(), b"")
    }

    /// A GNU long-name record for `name` (payload: the name and a NUL).
    pub fn long_name(&mut self, name: &[u8]) -> &mut Self {
        let mut payload = name.to_vec();
        payload.push(0);
        let h = Header::gnu(b"././@LongLink", b'L', payload.len() as u64).finish();
        self.push(h, &payload)
    }

    /// A pax header (`x`, or `g` for global) with these records.
    pub fn pax(&mut self, typeflag: u8, records: &[(&str, &str)]) -> &mut Self {
        let mut payload = Vec::new();
        for (k, v) in records {
            payload.extend(pax_record(k, v));
        }
        let h = Header::gnu(b"PaxHeaders/x", typeflag, payload.len() as u64).finish();
        self.push(h, &payload)
    }

    /// The two zero blocks that end an archive.
    pub fn end(&mut self) -> Vec<u8> {
        self.0.extend_from_slice(&[0u8; 1024]);
        std::mem::take(&mut self.0)
    }
}

/// One pax record: `"<len> <key>=<value>\n"` where len counts itself.
pub fn pax_record(key: &str, value: &str) -> Vec<u8> {
    let body = format!(" {key}={value}\n");
    let mut len = body.len() + 1;
    while format!("{len}{body}").len() != len {
        len += 1;
    }
    format!("{len}{body}").into_bytes()
}

/// A zstd skippable frame holding `payload`.
pub fn skippable_frame(payload: &[u8]) -> Vec<u8> {
    let mut f = 0x184D_2A53u32.to_le_bytes().to_vec();
    f.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    f.extend_from_slice(payload);
    f
}

/// The meta.json of an episode produced by `commit`.
pub fn meta(episode_id: &str, commit: &str) -> Vec<u8> {
    format!(
        "{{\"episode_id\": \"{episode_id}\", \"code_version\": {{\"commit\": \"{commit}\"}}}}\n"
    )
    .into_bytes()
}
