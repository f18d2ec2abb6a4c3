//! Entry points for the fuzz targets in `fuzz/`, not a stable API: the receiver's reading of an
//! upload's headers before it consults any state, and the fleet's reading of who sent a request.

use std::time::Duration;

use http::HeaderMap;

pub use crate::api::BodySpan;

/// The episode id the body targets validate against: the one of the hostile corpus
/// (`tests/corpus/hostile`) their seeds come from, so a seed's members are walked, not refused
/// at the first name.
pub const EPISODE: &str = "ep-hostile";
/// The commit the hostile corpus's `meta.json` names.
pub const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

/// What the stateless header checks of an upload accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UploadHeaders {
    /// `X-Cis490-Code-Commit`, parsed.
    pub commit: String,
    /// `X-Cis490-Tar-SHA256`, lowercased.
    pub tar_sha256: String,
    /// A PUT's body span.
    pub span: Option<BodySpan>,
    /// A `check`'s `X-Cis490-Upload-Length`.
    pub upload_length: Option<u64>,
}

/// The checks a `check` (`check = true`) or a PUT makes on `headers` before any state; the
/// error is the message the receiver would send back.
pub fn upload_headers(headers: &HeaderMap, check: bool) -> Result<UploadHeaders, String> {
    crate::api::stateless_upload_headers(headers, check)
        .map(|(commit, tar_sha256, span, upload_length)| UploadHeaders {
            commit: commit.to_string(),
            tar_sha256,
            span,
            upload_length,
        })
        .map_err(|e| e.message())
}

/// What the fleet view records of a host after it sent `first`, then `second`: the shipper
/// version from `User-Agent` and the install commit from `X-Cis490-Host-Commit` (as sent, and
/// parsed when it is a commit).
pub fn fleet_sees(
    first: &HeaderMap,
    second: &HeaderMap,
) -> (Option<String>, Option<(String, Option<String>)>) {
    let fleet = crate::fleet::Fleet::new(Duration::from_secs(3600));
    fleet.request("h", first, None, None);
    fleet.request("h", second, None, None);
    let (version, commit) = fleet.shipper_of("h");
    (
        version,
        commit.map(|(raw, parsed)| (raw, parsed.map(|c| c.to_string()))),
    )
}
