//! The receiver's streaming validator on arbitrary bodies, with the production limits
//! (SPEC §6, §16): it may refuse, never panic, hang or allocate past what the limits allow
//! (scripts/fuzz.sh runs it with -rss_limit_mb=256).
#![no_main]
use libfuzzer_sys::fuzz_target;

use cis490_common::Commit;
use cis490_receiver::fuzzing::{COMMIT, EPISODE};
use cis490_receiver::ingest::{validate, Expect};

fuzz_target!(|data: &[u8]| {
    let expect = Expect {
        commit: Commit::parse(COMMIT).ok(),
        ..Expect::new(EPISODE, 128 << 30)
    };
    let _ = validate(data, std::io::sink(), &expect);
});
