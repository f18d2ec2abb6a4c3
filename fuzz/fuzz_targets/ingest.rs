//! The receiver's streaming validator on arbitrary bodies: it may refuse, never panic or hang.
#![no_main]
use libfuzzer_sys::fuzz_target;

use cis490_common::Commit;
use cis490_receiver::ingest::{validate, Expect};

fuzz_target!(|data: &[u8]| {
    let expect = Expect {
        episode_id: "ep".into(),
        commit: Commit::parse("0123456789abcdef0123456789abcdef01234567").ok(),
        tar_sha256: None,
        max_uncompressed: 16 << 20,
    };
    let _ = validate(data, std::io::sink(), &expect);
});
