//! Header and URL parsers: commits, SHA-256, ids, Retry-After, receiver URLs.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(c) = cis490_common::Commit::parse(s) {
        assert_eq!(c.to_string(), s.to_ascii_lowercase());
    }
    if let Some(h) = cis490_common::ids::parse_sha256(s) {
        assert_eq!(h.len(), 64);
    }
    if cis490_common::validate_id(s).is_ok() {
        assert!(!s.contains('/') && !s.contains(".."));
    }
    let _ = cis490_shipper::transport::parse_retry_after(Some(s));
    let _ = cis490_shipper::transport::Endpoint::parse(s);
});
