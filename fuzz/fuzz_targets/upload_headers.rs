//! One `check` or PUT request's headers as the receiver reads them before any state: commit,
//! tar hash, content type, Content-Length, Content-Range and the resume prefix hash (SPEC §3,
//! §13), then the fleet's reading of User-Agent and X-Cis490-Host-Commit (SPEC §11).
//!
//! Input: the first byte picks `check` (odd) or PUT (even) and whether the second request the
//! fleet sees drops X-Cis490-Host-Commit (bit 1); the rest is `name: value` lines.
#![no_main]
use http::{HeaderMap, HeaderName, HeaderValue};
use libfuzzer_sys::fuzz_target;

use cis490_common::headers::{HOST_COMMIT, SHIPPER_AGENT};
use cis490_receiver::fuzzing::{fleet_sees, upload_headers};
use cis490_shipper::transport::{content_range, parse_resume_offset};

fn is_lower_hex(s: &str, len: usize) -> bool {
    s.len() == len && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

fuzz_target!(|data: &[u8]| {
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    let check = flags & 1 == 1;
    let mut headers = HeaderMap::new();
    for line in rest.split(|b| *b == b'\n') {
        let Some(colon) = line.iter().position(|b| *b == b':') else {
            continue;
        };
        let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(&line[..colon]),
            HeaderValue::from_bytes(line[colon + 1..].trim_ascii()),
        ) else {
            continue;
        };
        headers.append(name, value);
    }

    if let Ok(u) = upload_headers(&headers, check) {
        assert!(is_lower_hex(&u.commit, 40), "{u:?}");
        assert!(is_lower_hex(&u.tar_sha256, 64), "{u:?}");
        assert_eq!(u.span.is_some(), !check);
        if let Some(span) = &u.span {
            assert_eq!(
                span.start.checked_add(span.sent),
                Some(span.length),
                "{u:?}"
            );
            match &span.prefix_sha256 {
                Some(p) => assert!(is_lower_hex(p, 64), "{u:?}"),
                None => assert_eq!(span.start, 0, "{u:?}"),
            }
            // What the shipper sends for this span reads back as the same span.
            if span.start > 0 {
                let mut again = headers.clone();
                again.insert(
                    "content-range",
                    HeaderValue::from_str(&content_range(span.start, span.length)).unwrap(),
                );
                let back = upload_headers(&again, false).expect("the shipper's own Content-Range");
                assert_eq!(back.span.as_ref(), Some(span));
            }
        }
    }

    // The shipper's reading of a resume offset never points past the body.
    for v in headers.get_all("x-cis490-resume-offset") {
        if let Ok(s) = v.to_str() {
            for len in [0, 1, 1 << 20, u64::MAX] {
                let o = parse_resume_offset(Some(s), len);
                assert!(o == 0 || o < len);
            }
        }
    }

    let mut second = headers.clone();
    if flags & 2 == 2 {
        second.remove(HOST_COMMIT);
    }
    let (version, commit) = fleet_sees(&headers, &second);
    if let Some(v) = &version {
        assert!(v.chars().count() <= 64);
    }
    if let Some((raw, parsed)) = &commit {
        assert!(raw.chars().count() <= 64);
        if let Some(c) = parsed {
            assert!(is_lower_hex(c, 40));
            assert_eq!(c, &raw.to_ascii_lowercase());
        }
    }
    let shipper_without_commit = !second.contains_key(HOST_COMMIT)
        && second
            .get("user-agent")
            .is_some_and(|ua| ua.as_bytes().starts_with(SHIPPER_AGENT.as_bytes()));
    if shipper_without_commit {
        assert!(commit.is_none(), "a shipper that sends no commit has none");
    }
});
