//! Both config parsers on arbitrary TOML: errors are one line, never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    let p = std::path::Path::new("fuzz.toml");
    if let Err(e) = cis490_receiver::Config::parse(p, s) {
        assert!(!e.to_string().contains('\n'));
    }
    if let Err(e) = cis490_shipper::config::Config::parse(p, s) {
        assert!(!e.to_string().contains('\n'));
    }
});
