//! The pool of zstd contexts, in a process of its own so no other test packs meanwhile.

use std::fs;
use std::io::Write;

use cis490_shipper::pack::{context_counts, pack, Compression, Mode};

fn noise(n: usize) -> Vec<u8> {
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    (0..n)
        .map(|i| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            // Half text-like, half random: both of zstd's paths.
            if i % 2 == 0 {
                b'a' + (x % 4) as u8
            } else {
                x as u8
            }
        })
        .collect()
}

#[test]
fn packs_reuse_one_context_and_a_level_change_does_not_stick() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path().join("ep1");
    fs::create_dir_all(&d).unwrap();
    fs::write(d.join("meta.json"), br#"{"code_version":{"commit":"x"}}"#).unwrap();
    fs::write(d.join("data.bin"), noise(300_000)).unwrap();
    let c3 = Compression {
        level: 3,
        threads: 1,
        mode: Mode::Level,
    };
    let (p, first) = pack(&d, "ep1", Vec::new(), c3).unwrap();
    assert_eq!(context_counts(), (1, 1), "made one, gave it back");
    for _ in 0..20 {
        let (again, z) = pack(&d, "ep1", Vec::new(), c3).unwrap();
        assert_eq!((&again, &z), (&p, &first));
    }
    assert_eq!(
        context_counts(),
        (1, 1),
        "sequential packs reuse the one context"
    );

    // Level 19 on the pooled context, then back to 3: the frame is what a fresh level-3 encoder
    // makes from the same tar, not a level-19 one.
    let (_, z19) = pack(
        &d,
        "ep1",
        Vec::new(),
        Compression {
            level: 19,
            threads: 1,
            mode: Mode::Level,
        },
    )
    .unwrap();
    assert_ne!(z19, first);
    let (_, back) = pack(&d, "ep1", Vec::new(), c3).unwrap();
    assert_eq!(back, first);
    let tar = zstd::decode_all(&first[..]).unwrap();
    let mut fresh = zstd::stream::write::Encoder::new(Vec::new(), 3).unwrap();
    fresh.write_all(&tar).unwrap();
    assert_eq!(fresh.finish().unwrap(), first);
    assert_eq!(context_counts().0, 1);
}
