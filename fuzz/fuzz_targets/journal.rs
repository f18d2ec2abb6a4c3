//! doctor's journal and log-line parser and classifier.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    let lines = cis490_shipper::doctor::parse_log(s);
    let c = cis490_shipper::doctor::classify(&lines, std::time::UNIX_EPOCH);
    let _ = cis490_shipper::doctor::log_rows(&c, "10min", "fix");
});
