//! The receiver's raw tar header walk on arbitrary (uncompressed) tar streams, with the
//! production limits: refuse or admit, never panic, and never buffer a name past
//! `max_path_bytes` (a long-name record declaring gigabytes must cost nothing).
#![no_main]

use libfuzzer_sys::fuzz_target;

use cis490_receiver::fuzzing::EPISODE;
use cis490_receiver::ingest::MAX_ENTRIES;
use cis490_receiver::tarwalk::{walk, Kind, WalkLimits, DEFAULT_MAX_PATH_BYTES};

fuzz_target!(|data: &[u8]| {
    let limits = WalkLimits {
        max_path_bytes: DEFAULT_MAX_PATH_BYTES,
        max_entries: MAX_ENTRIES,
    };
    let mut buf = [0u8; 64];
    let r = walk(data, EPISODE, &limits, |m, body| {
        // Names handed on are confined and bounded.
        assert!(m.rel.len() <= DEFAULT_MAX_PATH_BYTES);
        assert!(!m.rel.split('/').any(|c| c == ".." || c == "."));
        if m.kind == Kind::Dir {
            assert_eq!(m.size, 0);
        }
        let _ = body.read(&mut buf);
        Ok(())
    });
    if let Ok(w) = r {
        assert!(w.total as usize <= data.len());
        assert_eq!(w.total % 512, 0);
    }
});
