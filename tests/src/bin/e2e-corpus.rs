//! Writes the hostile-upload corpus (tests/corpus/hostile/) deterministically. Run it again after
//! changing a case: `cargo run -p cis490-tests --bin e2e-corpus -- tests/corpus/hostile`.
//! Every case is an upload the receiver must refuse (422, or 413 for the bombs) without writing
//! anything outside its quarantine. `EXPECTED` lists `name status needle-in-message`.

use std::io::Write;
use std::path::Path;

const EP: &str = "ep-hostile";
pub const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

fn meta(commit: &str) -> Vec<u8> {
    format!("{{\"episode_id\": \"{EP}\", \"code_version\": {{\"commit\": \"{commit}\"}}}}\n")
        .into_bytes()
}

/// Appends one raw tar entry: the name bytes go in as given (no sanitising), then the data.
fn entry(out: &mut Vec<u8>, name: &[u8], kind: tar::EntryType, data: &[u8], link: &[u8]) {
    let mut h = tar::Header::new_gnu();
    {
        let b = h.as_mut_bytes();
        b[..100].fill(0);
        let n = name.len().min(100);
        b[..n].copy_from_slice(&name[..n]);
        let l = link.len().min(100);
        b[157..157 + l].copy_from_slice(&link[..l]);
    }
    h.set_entry_type(kind);
    h.set_size(data.len() as u64);
    h.set_mode(0o644);
    h.set_mtime(1_700_000_000);
    h.set_uid(0);
    h.set_gid(0);
    h.set_cksum();
    out.extend_from_slice(h.as_bytes());
    out.extend_from_slice(data);
    out.resize(out.len().div_ceil(512) * 512, 0);
}

fn end(out: &mut Vec<u8>) {
    out.extend_from_slice(&[0u8; 1024]);
}

fn good_meta(out: &mut Vec<u8>) {
    entry(
        out,
        format!("{EP}/").as_bytes(),
        tar::EntryType::Directory,
        b"",
        b"",
    );
    entry(
        out,
        format!("{EP}/meta.json").as_bytes(),
        tar::EntryType::Regular,
        &meta(COMMIT),
        b"",
    );
}

fn tar_with(extra: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
    let mut t = Vec::new();
    good_meta(&mut t);
    extra(&mut t);
    end(&mut t);
    t
}

fn zst(raw: &[u8]) -> Vec<u8> {
    zstd::encode_all(raw, 19).unwrap()
}

fn pax_record(key: &str, value: &str) -> Vec<u8> {
    // "<len> <key>=<value>\n" where len counts itself.
    let body = format!(" {key}={value}\n");
    let mut len = body.len() + 1;
    while format!("{len}{body}").len() != len {
        len += 1;
    }
    format!("{len}{body}").into_bytes()
}

/// The constructions of SPEC §16 (issue 15): each refused before anything is stored.
fn hardening_cases(put: &mut impl FnMut(&str, Vec<u8>, u16, &str)) {
    use cis490_tests::rawtar::{skippable_frame, Header, Tar};
    let root = format!("{EP}/");
    let meta_name = format!("{EP}/meta.json");
    let m = meta(COMMIT);
    let base = || {
        let mut t = Tar::new();
        t.dir(&root).file(&meta_name, &m);
        t
    };
    {
        // A long-name record declaring 128 MiB of name: about 8 KB on the wire.
        let mut enc = zstd::stream::write::Encoder::new(Vec::new(), 19).unwrap();
        let mut t = base();
        let size = 128u64 << 20;
        t.push(Header::gnu(b"././@LongLink", b'L', size).finish(), b"");
        t.0.truncate(t.0.len());
        enc.write_all(&t.0).unwrap();
        let mut chunk = format!("{EP}/").into_bytes();
        chunk.resize(1 << 20, b'a');
        for _ in 0..128 {
            enc.write_all(&chunk).unwrap();
            chunk.fill(b'a');
        }
        put(
            "longname-128mib",
            enc.finish().unwrap(),
            422,
            "long-name record declares",
        );
    }
    {
        // A directory whose "data" holds a symlink to /etc and a file written through it, as
        // GNU tar and Python would read them if the directory's size were honoured.
        let mut hidden = Tar::new();
        let mut link = Header::gnu(format!("{EP}/link").as_bytes(), b'2', 0);
        link.field(157..257, b"/etc");
        hidden.push(link.finish(), b"");
        hidden.file(&format!("{EP}/link/cron-evil"), b"* * * * * root id\n");
        let data = hidden.0.clone();
        let mut t = base();
        let mut d = Header::gnu(format!("{EP}/d/").as_bytes(), b'5', data.len() as u64);
        d.octal(100..108, 0o755);
        t.push(d.finish(), &data);
        put(
            "dir-with-size-hiding-headers",
            zst(&t.end()),
            422,
            "directory that declares",
        );
    }
    {
        let mut t = base();
        t.pax(
            b'x',
            &[
                ("path", &format!("{EP}/first")),
                ("path", &format!("{EP}/../second")),
            ],
        );
        t.file(&format!("{EP}/innocent"), b"x");
        put("pax-two-paths", zst(&t.end()), 422, "pax extended header");
    }
    {
        let mut t = base();
        t.pax(b'x', &[("path", &format!("{EP}/from-pax"))]);
        t.long_name(format!("{EP}/{}", "l".repeat(120)).as_bytes());
        t.file(&format!("{EP}/innocent"), b"x");
        put(
            "pax-path-and-longname",
            zst(&t.end()),
            422,
            "pax extended header",
        );
    }
    {
        let mut t = base();
        t.pax(b'x', &[("GNU.sparse.name", "../../sparse-escape")]);
        t.file(&format!("{EP}/innocent"), b"x");
        put(
            "pax-gnu-sparse-name",
            zst(&t.end()),
            422,
            "pax extended header",
        );
    }
    {
        let mut t = base();
        t.pax(b'g', &[("path", "../global")]);
        put("pax-global", zst(&t.end()), 422, "pax global header");
    }
    {
        let mut t = base();
        let mut h = Header::gnu(b"innocent", b'0', 1);
        h.field(345..500, format!("{EP}/../../prefix-escape").as_bytes());
        t.push(h.finish(), b"x");
        put("gnu-prefix-bytes", zst(&t.end()), 422, "prefix field");
    }
    {
        let mut t = base();
        let mut h = Header::gnu(b"x", b'0', 1);
        h.field(257..265, USTAR_MAGIC_POSIX);
        h.field(345..500, EP.as_bytes());
        t.push(h.finish(), b"x");
        put("ustar-prefix-name", zst(&t.end()), 422, "prefix field");
    }
    {
        let mut t = base();
        let mut h = Header::gnu(b"././@LongLink", b'K', 6);
        h.octal(124..136, 6);
        t.push(h.finish(), b"/etc\0\0");
        t.file(&format!("{EP}/innocent"), b"x");
        put("gnu-longlink", zst(&t.end()), 422, "long link");
    }
    {
        let mut t = base();
        t.long_name(format!("{EP}/short").as_bytes());
        t.file(&format!("{EP}/placeholder"), b"x");
        put("longname-short", zst(&t.end()), 422, "fits the header");
    }
    {
        let mut t = base();
        t.long_name(format!("{EP}/{}", "a".repeat(120)).as_bytes());
        t.long_name(format!("{EP}/{}/../../x", "b".repeat(120)).as_bytes());
        t.file(&format!("{EP}/placeholder"), b"x");
        put("longname-twice", zst(&t.end()), 422, "two GNU long-name");
    }
    {
        let mut t = base();
        t.long_name(format!("{EP}/{}", "a".repeat(120)).as_bytes());
        put("longname-dangling", zst(&t.end()), 422, "not followed");
    }
    {
        let mut t = base();
        let long = format!("{EP}/{}", "c".repeat(300));
        t.long_name(long.as_bytes());
        // The member's own name is the long name's first 100 bytes, as tar writers put it.
        t.file(&long[..100], b"x");
        put("component-too-long", zst(&t.end()), 422, "component longer");
    }
    {
        let mut t = base();
        let name = format!("{EP}/{}", "d/".repeat(2100));
        t.long_name(name.as_bytes());
        t.file(&format!("{EP}/placeholder"), b"x");
        put(
            "path-too-long",
            zst(&t.end()),
            422,
            "long-name record declares",
        );
    }
    {
        let mut t = base();
        t.file(&format!("{EP}\\..\\win-escape"), b"x");
        put("backslash-name", zst(&t.end()), 422, "backslash");
    }
    {
        let mut t = Tar::new();
        t.file(EP, b"not a directory");
        t.file(&meta_name, &m);
        put(
            "root-as-file",
            zst(&t.end()),
            422,
            "named as the episode directory",
        );
    }
    {
        let mut t = base();
        t.file(&format!("{EP}/data"), b"x");
        t.file(&format!("{EP}/data/inner"), b"y");
        put(
            "file-under-file",
            zst(&t.end()),
            422,
            "which is a regular file",
        );
    }
    {
        let mut t = base();
        t.file(&format!("{EP}/a/b"), b"x");
        t.file(&format!("{EP}/a"), b"y");
        put(
            "file-over-implied-dir",
            zst(&t.end()),
            422,
            "put a directory",
        );
    }
    {
        let mut t = base();
        t.push(
            Header::gnu(format!("{EP}/odd/").as_bytes(), b'0', 0).finish(),
            b"",
        );
        put(
            "file-with-trailing-slash",
            zst(&t.end()),
            422,
            "ends with '/'",
        );
    }
    {
        let mut t = base();
        let mut h = Header::gnu(format!("{EP}/v7").as_bytes(), b'0', 1);
        h.field(257..265, b"");
        t.push(h.finish(), b"x");
        put("v7-header", zst(&t.end()), 422, "neither a ustar nor a GNU");
    }
    {
        let mut t = base();
        let mut h = Header::gnu(format!("{EP}/odd-size").as_bytes(), b'0', 0);
        h.field(124..136, b"1 2");
        t.push(h.finish(), b"x");
        put(
            "size-with-inner-space",
            zst(&t.end()),
            422,
            "malformed size",
        );
    }
    {
        let mut t = base();
        let mut h = Header::gnu(format!("{EP}/linked").as_bytes(), b'0', 1);
        h.field(157..257, b"/etc/shadow");
        t.push(h.finish(), b"x");
        put("file-with-link-name", zst(&t.end()), 422, "link name");
    }
    {
        let mut t = base();
        let mut h = Header::gnu(b"", b'0', 1);
        h.field(0..100, format!("{EP}/a\0../../escape").as_bytes());
        t.push(h.finish(), b"x");
        put("bytes-after-name-nul", zst(&t.end()), 422, "after the NUL");
    }
    {
        // Type NUL: Python reads it as a directory when the header's own name ends in '/',
        // here the first 100 bytes of a long name.
        let mut t = base();
        let long = format!("{EP}/{}/{}", "d".repeat(99 - EP.len() - 1), "x".repeat(30));
        assert_eq!(long.as_bytes()[99], b'/');
        t.long_name(long.as_bytes());
        let mut hidden = Tar::new();
        hidden.file(&format!("{EP}/evil.txt"), b"evil");
        let data = hidden.0;
        t.push(
            Header::gnu(&long.as_bytes()[..100], 0, data.len() as u64).finish(),
            &data,
        );
        put("nul-typeflag-slash", zst(&t.end()), 422, "type NUL");
    }
    {
        // A long name whose member header names something else (a directory-looking name):
        // extractors disagree on whose trailing '/' counts.
        let mut t = base();
        let long = format!("{EP}/{}", "f".repeat(120));
        t.long_name(long.as_bytes());
        let mut hidden = Tar::new();
        hidden.file(&format!("{EP}/evil.txt"), b"evil");
        let data = hidden.0;
        t.push(
            Header::gnu(format!("{EP}/x/").as_bytes(), b'0', data.len() as u64).finish(),
            &data,
        );
        put(
            "longname-own-name-differs",
            zst(&t.end()),
            422,
            "but its GNU long-name record names",
        );
    }
    {
        // A base-256 checksum: Python accepts it, GNU tar skips the header and reads its data.
        let mut t = base();
        let mut hidden = Tar::new();
        hidden.file(&format!("{EP}/evil.txt"), b"evil");
        let data = hidden.0;
        let mut h = Header::gnu(format!("{EP}/good").as_bytes(), b'0', data.len() as u64);
        t.push(h.finish_base256_checksum(), &data);
        put("base256-checksum", zst(&t.end()), 422, "malformed checksum");
    }
    {
        // A size near 2^64: padding it to whole blocks would wrap around.
        let mut t = base();
        let mut h = Header::gnu(format!("{EP}/big").as_bytes(), b'0', 0);
        let mut f = [0xffu8; 12];
        f[..4].copy_from_slice(&[0x80, 0, 0, 0]);
        h.field(124..136, &f);
        t.push(h.finish(), b"");
        t.file(&format!("{EP}/hidden.txt"), b"h");
        put(
            "size-near-u64-max",
            zst(&t.end()),
            422,
            "declares a member of",
        );
    }
    {
        let raw = base().end();
        let half = raw.len() / 1024 * 512;
        let mut body = zst(&raw[..half]);
        body.extend(skippable_frame(b"bytes no SHA-256 covers"));
        body.extend(zst(&raw[half..]));
        put("skippable-frame", body, 422, "skippable frame");
    }
    {
        let mut body = zst(&base().end());
        body.extend(skippable_frame(b"trailer"));
        put("skippable-frame-at-end", body, 422, "skippable frame");
    }
}

const USTAR_MAGIC_POSIX: &[u8] = b"ustar\x0000";

fn main() {
    let dir = std::env::args().nth(1).expect("usage: e2e-corpus DIR");
    let dir = Path::new(&dir);
    std::fs::create_dir_all(dir).unwrap();
    let reg = tar::EntryType::Regular;
    let mut expected = Vec::new();
    let mut put = |name: &str, body: Vec<u8>, status: u16, needle: &str| {
        std::fs::write(dir.join(format!("{name}.tar.zst")), body).unwrap();
        expected.push(format!("{name} {status} {needle}"));
    };

    put(
        "path-dotdot",
        zst(&tar_with(|t| {
            entry(t, format!("{EP}/../escape").as_bytes(), reg, b"x", b"")
        })),
        422,
        "outside",
    );
    put(
        "path-absolute",
        zst(&tar_with(|t| entry(t, b"/etc/cron.d/evil", reg, b"x", b""))),
        422,
        "outside",
    );
    put(
        "path-dot-dotdot",
        zst(&tar_with(|t| entry(t, b"./../escape", reg, b"x", b""))),
        422,
        "outside",
    );
    put(
        "path-inner-dot",
        zst(&tar_with(|t| {
            entry(t, format!("{EP}/./x").as_bytes(), reg, b"x", b"")
        })),
        422,
        "outside",
    );
    put(
        "path-other-root",
        zst(&tar_with(|t| entry(t, b"other-episode/x", reg, b"x", b""))),
        422,
        "outside",
    );
    put(
        "path-bare-file-at-root",
        zst(&tar_with(|t| entry(t, b"loose-file", reg, b"x", b""))),
        422,
        "outside",
    );
    let long_escape = format!("{EP}/{}../../../../../../tmp/escape", "deep/".repeat(30));
    put(
        "path-gnu-longname-escape",
        zst(&tar_with(|t| {
            let mut name = long_escape.clone().into_bytes();
            name.push(0);
            entry(t, b"././@LongLink", tar::EntryType::GNULongName, &name, b"");
            entry(t, &long_escape.as_bytes()[..100], reg, b"x", b"");
        })),
        422,
        "outside",
    );
    put(
        "path-pax-override-escape",
        zst(&tar_with(|t| {
            let rec = pax_record("path", "../../etc/passwd");
            entry(t, b"PaxHeaders/x", tar::EntryType::XHeader, &rec, b"");
            entry(t, format!("{EP}/innocent").as_bytes(), reg, b"x", b"");
        })),
        422,
        "pax extended header",
    );
    put(
        "symlink-inside",
        zst(&tar_with(|t| {
            entry(
                t,
                format!("{EP}/link").as_bytes(),
                tar::EntryType::Symlink,
                b"",
                b"meta.json",
            )
        })),
        422,
        "symlink",
    );
    put(
        "symlink-escaping",
        zst(&tar_with(|t| {
            entry(
                t,
                format!("{EP}/link").as_bytes(),
                tar::EntryType::Symlink,
                b"",
                b"/etc/shadow",
            )
        })),
        422,
        "symlink",
    );
    put(
        "hardlink-inside",
        zst(&tar_with(|t| {
            entry(
                t,
                format!("{EP}/hl").as_bytes(),
                tar::EntryType::Link,
                b"",
                format!("{EP}/meta.json").as_bytes(),
            )
        })),
        422,
        "hard link",
    );
    put(
        "hardlink-escaping",
        zst(&tar_with(|t| {
            entry(
                t,
                format!("{EP}/hl").as_bytes(),
                tar::EntryType::Link,
                b"",
                b"/etc/shadow",
            )
        })),
        422,
        "hard link",
    );
    put(
        "char-device",
        zst(&tar_with(|t| {
            entry(
                t,
                format!("{EP}/null").as_bytes(),
                tar::EntryType::Char,
                b"",
                b"",
            )
        })),
        422,
        "character device",
    );
    put(
        "block-device",
        zst(&tar_with(|t| {
            entry(
                t,
                format!("{EP}/sda").as_bytes(),
                tar::EntryType::Block,
                b"",
                b"",
            )
        })),
        422,
        "block device",
    );
    put(
        "fifo",
        zst(&tar_with(|t| {
            entry(
                t,
                format!("{EP}/pipe").as_bytes(),
                tar::EntryType::Fifo,
                b"",
                b"",
            )
        })),
        422,
        "FIFO",
    );
    put(
        "sparse-file",
        zst(&tar_with(|t| {
            entry(
                t,
                format!("{EP}/sparse").as_bytes(),
                tar::EntryType::GNUSparse,
                b"",
                b"",
            )
        })),
        422,
        "tar",
    );
    put(
        "duplicate-entry",
        zst(&tar_with(|t| {
            entry(t, format!("{EP}/data").as_bytes(), reg, b"first", b"");
            entry(t, format!("{EP}/data").as_bytes(), reg, b"second", b"");
        })),
        422,
        "repeats",
    );
    put(
        "duplicate-meta",
        zst(&tar_with(|t| {
            entry(
                t,
                format!("{EP}/meta.json").as_bytes(),
                reg,
                &meta(COMMIT),
                b"",
            )
        })),
        422,
        "repeats",
    );
    put(
        "non-utf8-name",
        zst(&tar_with(|t| {
            entry(
                t,
                &[b"ep-hostile/\xff\xfe".as_slice()].concat(),
                reg,
                b"x",
                b"",
            )
        })),
        422,
        "UTF-8",
    );
    {
        let mut t = Vec::new();
        entry(
            &mut t,
            format!("{EP}/data").as_bytes(),
            reg,
            b"no meta here",
            b"",
        );
        end(&mut t);
        put("missing-meta", zst(&t), 422, "meta.json");
    }
    {
        let mut t = Vec::new();
        let mut big = meta(COMMIT);
        big.truncate(big.len() - 2);
        big.extend_from_slice(b", \"pad\": \"");
        big.extend(std::iter::repeat_n(b'a', 2 << 20));
        big.extend_from_slice(b"\"}\n");
        entry(&mut t, format!("{EP}/meta.json").as_bytes(), reg, &big, b"");
        end(&mut t);
        put("oversized-meta", zst(&t), 422, "meta.json");
    }
    {
        let mut t = Vec::new();
        entry(
            &mut t,
            format!("{EP}/meta.json").as_bytes(),
            reg,
            b"{\"code_version\": ",
            b"",
        );
        end(&mut t);
        put("invalid-meta", zst(&t), 422, "JSON");
    }
    {
        let mut t = Vec::new();
        entry(
            &mut t,
            format!("{EP}/meta.json").as_bytes(),
            reg,
            &meta(&"f".repeat(40)),
            b"",
        );
        end(&mut t);
        put("meta-other-commit", zst(&t), 422, "differs");
    }
    {
        let body = zst(&tar_with(|t| {
            entry(t, format!("{EP}/data").as_bytes(), reg, &[7u8; 5000], b"")
        }));
        put(
            "truncated-zstd",
            body[..body.len() / 2].to_vec(),
            422,
            "zstd",
        );
    }
    {
        let a = zst(&tar_with(|_| {}));
        let mut body = a.clone();
        body.extend_from_slice(&zstd::encode_all(&[0u8; 512][..], 3).unwrap());
        body.extend_from_slice(b"TRAILING GARBAGE AFTER THE FRAMES");
        put("concatenated-frames-trailing-garbage", body, 422, "zstd");
    }
    {
        let mut t = tar_with(|_| {});
        t.extend_from_slice(b"data after the end blocks");
        t.resize(t.len().div_ceil(512) * 512, 0);
        put("data-after-end-blocks", zst(&t), 422, "end-of-archive");
    }
    {
        let mut t = Vec::new();
        good_meta(&mut t);
        put("no-end-blocks", zst(&t), 422, "truncated");
    }
    put("empty-body", Vec::new(), 422, "empty");
    {
        let mut t = Vec::new();
        end(&mut t);
        put("only-end-blocks", zst(&t), 422, "meta.json");
    }
    put(
        "not-zstd",
        b"PK\x03\x04 this is a zip file, not zstd".to_vec(),
        422,
        "zstd",
    );
    {
        let mut t = tar_with(|_| {});
        let n = t.len();
        t[n - 1100] ^= 0xff; // corrupt the meta.json header checksum region
        put(
            "bad-header-checksum",
            zst(&tar_with(|t| {
                let mut h = tar::Header::new_gnu();
                h.as_mut_bytes()[..5].copy_from_slice(b"ep-ho");
                h.set_size(0);
                // No set_cksum: the checksum field stays wrong.
                t.extend_from_slice(h.as_bytes());
            })),
            422,
            "tar",
        );
        let _ = t;
    }
    {
        // 1 GiB of zeros in one file: about 32 KiB on the wire (the test caps uncompressed at 64 MiB).
        let mut enc = zstd::stream::write::Encoder::new(Vec::new(), 19).unwrap();
        let mut t = Vec::new();
        good_meta(&mut t);
        let mut h = tar::Header::new_gnu();
        h.as_mut_bytes()[..15].copy_from_slice(b"ep-hostile/zero");
        h.set_entry_type(reg);
        h.set_size(1 << 30);
        h.set_mode(0o644);
        h.set_cksum();
        t.extend_from_slice(h.as_bytes());
        enc.write_all(&t).unwrap();
        let zeros = vec![0u8; 1 << 20];
        for _ in 0..1024 {
            enc.write_all(&zeros).unwrap();
        }
        enc.write_all(&[0u8; 1024]).unwrap();
        put(
            "zstd-bomb",
            enc.finish().unwrap(),
            413,
            "times its compressed size",
        );
    }
    {
        // 300,000 empty files: ~150 MiB of tar headers, a few MiB on the wire.
        let mut enc = zstd::stream::write::Encoder::new(Vec::new(), 19).unwrap();
        let mut t = Vec::new();
        good_meta(&mut t);
        enc.write_all(&t).unwrap();
        for i in 0..300_000u32 {
            let mut e = Vec::new();
            entry(&mut e, format!("{EP}/f{i:07}").as_bytes(), reg, b"", b"");
            enc.write_all(&e).unwrap();
        }
        enc.write_all(&[0u8; 1024]).unwrap();
        put("tar-bomb-many-files", enc.finish().unwrap(), 413, "exceeds");
    }
    hardening_cases(&mut put);
    expected.sort();
    let mut f = std::fs::File::create(dir.join("EXPECTED")).unwrap();
    writeln!(
        f,
        "# name status needle (generated by tests/src/bin/e2e-corpus.rs)"
    )
    .unwrap();
    for e in expected {
        writeln!(f, "{e}").unwrap();
    }
}
