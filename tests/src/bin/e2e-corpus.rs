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
            entry(t, b"placeholder", reg, b"x", b"");
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
        "outside",
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
        put("zstd-bomb", enc.finish().unwrap(), 413, "exceeds");
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
