//! Header names of the wire protocol (SPEC §3), lowercase as HTTP/2 sends them.

pub const CODE_COMMIT: &str = "x-cis490-code-commit";
pub const TAR_SHA256: &str = "x-cis490-tar-sha256";
pub const UPLOAD_LENGTH: &str = "x-cis490-upload-length";
/// How many body bytes of an interrupted upload the receiver holds (SPEC §13).
pub const RESUME_OFFSET: &str = "x-cis490-resume-offset";
/// SHA-256 of the body bytes a resumed `PUT` does not send again (SPEC §13).
pub const RESUME_PREFIX_SHA256: &str = "x-cis490-resume-prefix-sha256";
pub const CONTENT_TYPE_ZSTD: &str = "application/zstd";
/// HEAD of the lab host's install checkout (SPEC §11); informational, never a reason to refuse.
pub const HOST_COMMIT: &str = "x-cis490-host-commit";
/// The shipper's `User-Agent` product token; the version follows the `/`.
pub const SHIPPER_AGENT: &str = "cis490-shipper";
