//! meta.json reading.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = cis490_common::meta::commit_from_meta(data);
});
