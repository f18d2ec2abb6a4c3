//! Property: the shipper's packer and the receiver's validator agree on every tree the shipper
//! accepts (issue 19, item 5). Random directory trees (spaces and unicode in names, deep paths
//! past the 100-byte ustar name field, empty files and directories, sizes around the 512-byte
//! block and the 1 MiB in-memory limit) are packed, then validated: the same tar SHA-256, every
//! entry listed in the canonical order of SPEC §2, and every file's bytes inside the tar.
//!
//! `PROPTEST_CASES` raises the number of trees (default [`DEFAULT_CASES`]).

use std::collections::BTreeMap;
use std::fs;
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use cis490_receiver::ingest::{self, Expect};
use cis490_receiver::tarwalk::Kind;
use cis490_shipper::pack::{self, Compression};
use proptest::prelude::*;
use sha2::{Digest, Sha256};

const DEFAULT_CASES: u32 = 48;
const COMMIT: &str = "89abcdef0123456789abcdef0123456789abcdef";

#[derive(Debug, Clone)]
enum Node {
    File {
        size: usize,
        exec: bool,
    },
    Dir(BTreeMap<String, Node>),
    /// The producer's meta.json with this text (never generated, added at the top).
    Meta(String),
}

/// Pieces names are made of: spaces, unicode, dots, and one long piece so that a few levels
/// reach past 100 bytes (GNU long names) while no component passes 255 bytes.
const PIECES: [&str; 14] = [
    "a",
    "data",
    " ",
    "x y",
    "é",
    "日本語",
    "🦀",
    "-",
    "_",
    ".cfg",
    "frame 0001",
    "Ünïcødé naïve",
    "0",
    "a_fairly_long_directory_name_to_pass_the_ustar_limit",
];

fn name() -> impl Strategy<Value = String> {
    prop::collection::vec(prop::sample::select(&PIECES[..]), 1..4)
        .prop_map(|p| p.concat())
        // The producer's own meta.json is added at the top; "." alone never comes out.
        .prop_filter("reserved", |n| n != "meta.json")
}

fn size() -> impl Strategy<Value = usize> {
    prop_oneof![
        6 => prop::sample::select(&[0usize, 1, 100, 511, 512, 513, 1023, 1024, 1025, 10_000][..]),
        1 => prop::sample::select(&[(1 << 20) - 1, 1 << 20, (1 << 20) + 1][..]),
    ]
}

fn node() -> impl Strategy<Value = Node> {
    let leaf = prop_oneof![
        4 => (size(), any::<bool>()).prop_map(|(size, exec)| Node::File { size, exec }),
        1 => Just(Node::Dir(BTreeMap::new())),
    ];
    leaf.prop_recursive(6, 32, 4, |inner| {
        prop::collection::btree_map(name(), inner, 0..4).prop_map(Node::Dir)
    })
}

fn episode_id() -> impl Strategy<Value = String> {
    prop::sample::select(vec![
        "ep1".to_string(),
        "Episode_2026.01-x".to_string(),
        format!("e{}", "p".repeat(127)),
    ])
}

/// Bytes of a file, different for every file and position.
fn content(seed: u64, n: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Writes `tree` under `dir`; returns what the validator must list, in the canonical order
/// (each directory before its children, children by the bytes of their names), with each
/// file's SHA-256.
fn write_tree(
    dir: &Path,
    rel: &str,
    tree: &BTreeMap<String, Node>,
    seed: &mut u64,
    out: &mut Vec<(String, Option<String>)>,
) {
    // BTreeMap<String, _> iterates in byte order of the names, the canonical order.
    for (name, node) in tree {
        let path = dir.join(name);
        let r = if rel.is_empty() {
            name.clone()
        } else {
            format!("{rel}/{name}")
        };
        match node {
            Node::File { size, exec } => {
                *seed += 1;
                let bytes = content(*seed, *size);
                fs::write(&path, &bytes).unwrap();
                if *exec {
                    fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).unwrap();
                }
                out.push((r, Some(hex::encode(Sha256::digest(&bytes)))));
            }
            Node::Meta(text) => {
                fs::write(&path, text).unwrap();
                out.push((r, Some(hex::encode(Sha256::digest(text)))));
            }
            Node::Dir(children) => {
                fs::create_dir(&path).unwrap();
                out.push((r.clone(), None));
                write_tree(&path, &r, children, seed, out);
            }
        }
    }
}

fn round_trip(id: &str, mut top: BTreeMap<String, Node>) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join(id);
    fs::create_dir(&dir).unwrap();
    let meta = format!(r#"{{"episode_id":"{id}","code_version":{{"commit":"{COMMIT}"}}}}"#);
    top.insert("meta.json".to_string(), Node::Meta(meta));
    let mut expected = Vec::new();
    let mut seed = 0;
    write_tree(&dir, "", &top, &mut seed, &mut expected);

    let (packed, body) = pack::pack(&dir, id, Vec::new(), Compression::default()).unwrap();
    let (again, body_again) = pack::pack(&dir, id, Vec::new(), Compression::default()).unwrap();
    assert_eq!(packed, again, "packing twice gives the same tar");
    let _ = body_again;

    let mut e = Expect::new(id, 1 << 34);
    e.commit = Some(cis490_common::Commit::parse(COMMIT).unwrap());
    e.tar_sha256 = Some(packed.tar_sha256.clone());
    let mut listed = Vec::new();
    let v = ingest::validate_listing(&body[..], std::io::sink(), &e, |p, k| {
        listed.push((p.to_string(), k))
    })
    .unwrap_or_else(|r| panic!("the validator refused the shipper's pack of {id}: {r}"));
    assert_eq!(v.tar_sha256, packed.tar_sha256);
    assert_eq!(v.uncompressed_bytes, packed.tar_bytes);
    assert_eq!(v.files, packed.files);
    assert_eq!(v.compressed_bytes, body.len() as u64);

    let want: Vec<(String, Kind)> = std::iter::once((String::new(), Kind::Dir))
        .chain(expected.iter().map(|(p, sha)| {
            let k = if sha.is_some() { Kind::File } else { Kind::Dir };
            (p.clone(), k)
        }))
        .collect();
    let listed_without_root: Vec<_> = if listed.first().is_some_and(|(p, _)| p.is_empty()) {
        listed.clone()
    } else {
        std::iter::once((String::new(), Kind::Dir))
            .chain(listed.clone())
            .collect()
    };
    assert_eq!(listed_without_root, want, "validator's listing vs the tree");

    // Every file's bytes are in the tar under its name.
    let tar = zstd::decode_all(&body[..]).unwrap();
    assert_eq!(hex::encode(Sha256::digest(&tar)), packed.tar_sha256);
    let mut in_tar = Vec::new();
    let mut archive = tar::Archive::new(&tar[..]);
    for entry in archive.entries().unwrap() {
        let mut entry = entry.unwrap();
        let path = entry.path().unwrap().to_str().unwrap().to_string();
        let rel = path
            .strip_prefix(&format!("{id}/"))
            .unwrap_or_else(|| panic!("{path} outside {id}/"))
            .trim_end_matches('/')
            .to_string();
        if entry.header().entry_type().is_dir() {
            in_tar.push((rel, None));
        } else {
            let mut bytes = Vec::new();
            entry.read_to_end(&mut bytes).unwrap();
            in_tar.push((rel, Some(hex::encode(Sha256::digest(&bytes)))));
        }
    }
    let want_in_tar: Vec<_> = std::iter::once((String::new(), None))
        .chain(expected.iter().cloned())
        .collect();
    assert_eq!(in_tar, want_in_tar, "tar members vs the tree");
}

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(DEFAULT_CASES)
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: cases(),
        max_shrink_iters: 256,
        ..ProptestConfig::default()
    })]

    #[test]
    fn pack_then_validate_round_trips(
        id in episode_id(),
        top in prop::collection::btree_map(name(), node(), 0..6),
    ) {
        round_trip(&id, top);
    }
}

/// The cases the property is about, each present for sure: a path past 100 bytes, names with
/// spaces and unicode, an empty file, an empty directory, and the sizes around 512 and 1 MiB.
#[test]
fn pack_then_validate_round_trips_the_edge_cases() {
    let file = |size| Node::File { size, exec: false };
    let long = "a_fairly_long_directory_name_to_pass_the_ustar_limit";
    let mut deep = BTreeMap::new();
    deep.insert("leaf file.bin".to_string(), file(513));
    let mut mid = BTreeMap::new();
    mid.insert(format!("{long}日本語"), Node::Dir(deep));
    let mut top = BTreeMap::new();
    top.insert(long.to_string(), Node::Dir(mid));
    top.insert("empty".to_string(), file(0));
    top.insert("empty dir".to_string(), Node::Dir(BTreeMap::new()));
    top.insert(
        "🦀 crab".to_string(),
        Node::File {
            size: 511,
            exec: true,
        },
    );
    top.insert("block".to_string(), file(512));
    top.insert("mib-1".to_string(), file((1 << 20) - 1));
    top.insert("mib".to_string(), file(1 << 20));
    top.insert("mib+1".to_string(), file((1 << 20) + 1));
    round_trip("ep1", top.clone());
    round_trip(&format!("e{}", "p".repeat(127)), top);
}
