//! The whole receiver validator (frame scanner, libzstd, SHA-256, limits, tar walk, meta.json)
//! on tar bytes the fuzzer writes directly: the input is wrapped in zstd frames made of raw
//! (stored) blocks, so every mutation lands in the tar instead of in compressed bytes that
//! mostly fail to decode. The `ingest` target still covers hostile compressed streams.
//!
//! Input: the first byte shapes the framing (bits 0-2: block size 2^(7+n) bytes, capped at
//! zstd's 128 KiB; bit 3: every block in a frame of its own; bit 4: add a content checksum of
//! the wrong value to the last frame, which libzstd must refuse); the rest is the tar.
#![no_main]
use libfuzzer_sys::fuzz_target;

use cis490_common::Commit;
use cis490_receiver::fuzzing::{COMMIT, EPISODE};
use cis490_receiver::ingest::{validate, Expect, Rejection};

const MAGIC: [u8; 4] = 0xFD2F_B528u32.to_le_bytes();
/// Window descriptor for a 1 MiB window (exponent 10, mantissa 0): enough for 128 KiB blocks.
const WINDOW_1MIB: u8 = 10 << 3;
const MAX_BLOCK: usize = 128 << 10;

/// Starts a frame: magic, then a descriptor with a window descriptor and no content size.
fn frame_header(out: &mut Vec<u8>, checksum: bool) {
    out.extend_from_slice(&MAGIC);
    out.push(if checksum { 0x04 } else { 0x00 });
    out.push(WINDOW_1MIB);
}

/// A raw block header: bit 0 last block, bits 1-2 type 0 (raw), bits 3.. the size.
fn raw_block(out: &mut Vec<u8>, data: &[u8], last: bool) {
    let h = ((data.len() as u32) << 3) | u32::from(last);
    out.extend_from_slice(&h.to_le_bytes()[..3]);
    out.extend_from_slice(data);
}

fn frame(tar: &[u8], shape: u8) -> Vec<u8> {
    let block = (128usize << (shape & 7)).min(MAX_BLOCK);
    let frame_per_block = shape & 8 != 0;
    let bad_checksum = shape & 16 != 0;
    let mut out = Vec::with_capacity(tar.len() + tar.len() / block * 8 + 16);
    let chunks: Vec<&[u8]> = if tar.is_empty() {
        vec![&[][..]]
    } else {
        tar.chunks(block).collect()
    };
    let n = chunks.len();
    for (i, c) in chunks.into_iter().enumerate() {
        let last_of_all = i + 1 == n;
        let closes = frame_per_block || last_of_all;
        let checksum = bad_checksum && last_of_all;
        if frame_per_block || i == 0 {
            frame_header(&mut out, checksum);
        }
        raw_block(&mut out, c, closes);
        if closes && checksum {
            out.extend_from_slice(&[0xde, 0xad, 0xbe, 0xef]);
        }
    }
    out
}

fuzz_target!(|data: &[u8]| {
    let Some((&shape, tar)) = data.split_first() else {
        return;
    };
    let body = frame(tar, shape);
    let expect = Expect {
        commit: Commit::parse(COMMIT).ok(),
        ..Expect::new(EPISODE, 128 << 30)
    };
    let mut copy = Vec::new();
    let r = validate(&body[..], &mut copy, &expect);
    // The sink gets the body as it came, whatever the verdict on it.
    if !matches!(r, Err(Rejection::Sink(_) | Rejection::Source(_))) {
        assert!(body.starts_with(&copy), "the sink got other bytes than the body");
    }
    match r {
        Ok(v) => {
            // Raw blocks decode to the input itself: what is admitted is exactly this tar.
            assert_eq!(copy, body);
            assert_eq!(v.uncompressed_bytes as usize, tar.len());
            assert_eq!(v.compressed_bytes as usize, body.len());
            assert!(shape & 16 == 0, "a wrong content checksum was admitted");
            use sha2::Digest;
            assert_eq!(v.tar_sha256, hex::encode(sha2::Sha256::digest(tar)));
        }
        Err(Rejection::Sink(e) | Rejection::Source(e)) => {
            panic!("an in-memory body and sink cannot fail I/O: {e}")
        }
        Err(_) => {}
    }
});
