//! The Forgejo commit-list decoder.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = cis490_receiver::gate::forgejo::decode_page(data);
});
