//! The receiver's one answer type for refusals (SPEC §3, §16). Each variant names a cause; the
//! exhaustive match in [`ApiError::code`] is the only place a cause meets its `error` code, and
//! the status always comes from that code, so no handler writes either by hand.

use std::io;

use cis490_common::ErrorCode;
use http::StatusCode;
use serde_json::{json, Map, Value};

use crate::ingest::Rejection;
use crate::store::StoreUnavailable;

#[derive(Debug, Clone)]
pub(crate) enum ApiError {
    /// No `X-Cis490-Code-Commit` on an upload.
    MissingCommit {
        remediation: String,
    },
    /// `X-Cis490-Code-Commit` is not a commit id.
    MalformedCommit {
        given: String,
        why: String,
        remediation: String,
    },
    /// A host or episode id in the path breaks the id rules.
    InvalidId {
        field: &'static str,
        given: String,
        why: String,
    },
    /// A header or the body's framing is unusable.
    Malformed(String),
    /// The bearer token is missing or wrong (`[auth]`).
    Unauthorized(String),
    /// The client certificate names no host at all.
    AnonymousCertificate,
    /// The certificate is for another host than the path names.
    WrongHost {
        caller: String,
        host: String,
    },
    NoSuchEndpoint {
        path: String,
    },
    NotStored {
        host: String,
        episode: String,
    },
    MethodNotAllowed {
        method: String,
        path: String,
    },
    /// The body stalled (idle timeout or below the rate floor).
    BodyTimeout(String),
    /// The id is stored with other bytes.
    Conflict {
        message: String,
        stored_tar_sha256: String,
    },
    LengthRequired,
    /// The version gate refused the commit.
    NotInWindow {
        your_commit: String,
        head_commit: Option<String>,
        window: usize,
        branch: String,
        remediation: String,
    },
    TooLarge(String),
    InvalidContent(String),
    Internal(String),
    /// Every upload slot of the receiver is taken.
    Overloaded,
    /// The host holds all the upload slots it may (`[limits] max_uploads_per_host`).
    HostOverloaded {
        host: String,
        cap: usize,
    },
    /// The decoders' memory budget stayed full (`[limits] decoder_memory_bytes`).
    DecoderBusy(String),
    /// The gate has not loaded its window yet.
    GateUnavailable,
    /// The object store (or the index it answers from) failed: the shipper retries.
    StoreUnavailable(String),
    InsufficientStorage(String),
    /// A resumed upload names a prefix this receiver does not hold (SPEC §13); `offset` is
    /// where the client should send from.
    ResumeUnavailable {
        offset: u64,
        why: String,
    },
    /// A resumable upload of this id is already running (its part file is in use).
    UploadInProgress {
        id: String,
    },
}

impl ApiError {
    pub(crate) fn code(&self) -> ErrorCode {
        match self {
            ApiError::MissingCommit { .. } => ErrorCode::MissingCommit,
            ApiError::MalformedCommit { .. } => ErrorCode::MalformedCommit,
            ApiError::InvalidId { .. } => ErrorCode::InvalidId,
            ApiError::Malformed(_) => ErrorCode::MalformedRequest,
            ApiError::Unauthorized(_) => ErrorCode::Unauthorized,
            ApiError::AnonymousCertificate | ApiError::WrongHost { .. } => ErrorCode::Forbidden,
            ApiError::NoSuchEndpoint { .. } | ApiError::NotStored { .. } => ErrorCode::NotFound,
            ApiError::MethodNotAllowed { .. } => ErrorCode::MethodNotAllowed,
            ApiError::BodyTimeout(_) => ErrorCode::BodyTimeout,
            ApiError::Conflict { .. } => ErrorCode::Conflict,
            ApiError::LengthRequired => ErrorCode::LengthRequired,
            ApiError::NotInWindow { .. } => ErrorCode::CommitNotInWindow,
            ApiError::TooLarge(_) => ErrorCode::TooLarge,
            ApiError::InvalidContent(_) => ErrorCode::InvalidContent,
            ApiError::Internal(_) => ErrorCode::Internal,
            ApiError::Overloaded
            | ApiError::HostOverloaded { .. }
            | ApiError::DecoderBusy(_)
            | ApiError::UploadInProgress { .. } => ErrorCode::Overloaded,
            ApiError::ResumeUnavailable { .. } => ErrorCode::ResumeUnavailable,
            ApiError::GateUnavailable => ErrorCode::GateUnavailable,
            ApiError::StoreUnavailable(_) => ErrorCode::StoreUnavailable,
            ApiError::InsufficientStorage(_) => ErrorCode::InsufficientStorage,
        }
    }

    pub(crate) fn status(&self) -> StatusCode {
        // Invariant: every ErrorCode status is a valid HTTP status (a unit test checks all).
        StatusCode::from_u16(self.code().status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
    }

    /// The `X-Cis490-Resume-Offset` a 416 carries (SPEC §13).
    pub(crate) fn resume_offset(&self) -> Option<u64> {
        match self {
            ApiError::ResumeUnavailable { offset, .. } => Some(*offset),
            _ => None,
        }
    }

    /// Seconds a client should wait before retrying, for the transient refusals.
    pub(crate) fn retry_after(&self) -> Option<u64> {
        match self.code() {
            ErrorCode::Overloaded | ErrorCode::StoreUnavailable => Some(5),
            ErrorCode::GateUnavailable => Some(10),
            ErrorCode::InsufficientStorage => Some(60),
            _ => None,
        }
    }

    pub(crate) fn message(&self) -> String {
        match self {
            ApiError::MissingCommit { .. } => "the X-Cis490-Code-Commit header is required".into(),
            ApiError::MalformedCommit { given, why, .. } => {
                format!("X-Cis490-Code-Commit {given:?} is not a commit: {why}")
            }
            ApiError::InvalidId { field, given, why } => format!("{field} {given:?}: {why}"),
            ApiError::AnonymousCertificate => {
                "the client certificate names no host (no DNS SAN and no CN)".into()
            }
            ApiError::WrongHost { caller, host } => {
                format!("this client certificate is for {caller:?}, not {host:?}")
            }
            ApiError::NoSuchEndpoint { path } => format!("no such endpoint: {path}"),
            ApiError::NotStored { host, episode } => {
                format!("episode {host}/{episode} is not stored")
            }
            ApiError::MethodNotAllowed { method, path } => {
                format!("{method} is not allowed on {path}")
            }
            ApiError::LengthRequired => {
                "a Content-Length header is required; chunked uploads are not accepted".into()
            }
            ApiError::NotInWindow {
                your_commit,
                window,
                branch,
                ..
            } => format!(
                "commit {your_commit} is not among the last {window} commits of {branch}; update this lab host's code"
            ),
            ApiError::Overloaded => "too many uploads in progress; retry later".into(),
            ApiError::HostOverloaded { host, cap } => format!(
                "{host} already has {cap} uploads in progress (limits.max_uploads_per_host); retry later"
            ),
            ApiError::GateUnavailable => {
                "the receiver has not loaded its list of current commits yet; retry later".into()
            }
            ApiError::ResumeUnavailable { offset, why } => {
                format!("{why}; send the body from byte {offset}")
            }
            ApiError::UploadInProgress { id } => {
                format!("an upload of {id} is already in progress; retry later")
            }
            ApiError::Malformed(m)
            | ApiError::Unauthorized(m)
            | ApiError::BodyTimeout(m)
            | ApiError::Conflict { message: m, .. }
            | ApiError::TooLarge(m)
            | ApiError::InvalidContent(m)
            | ApiError::Internal(m)
            | ApiError::StoreUnavailable(m)
            | ApiError::DecoderBusy(m)
            | ApiError::InsufficientStorage(m) => m.clone(),
        }
    }

    /// The fields beside `error` and `message` in the JSON body.
    fn extra(&self) -> Map<String, Value> {
        let mut m = Map::new();
        match self {
            ApiError::MissingCommit { remediation }
            | ApiError::MalformedCommit { remediation, .. } => {
                m.insert("remediation".into(), json!(remediation));
            }
            ApiError::NotInWindow {
                your_commit,
                head_commit,
                remediation,
                ..
            } => {
                m.insert("remediation".into(), json!(remediation));
                m.insert("your_commit".into(), json!(your_commit));
                m.insert("head_commit".into(), json!(head_commit));
            }
            ApiError::Conflict {
                stored_tar_sha256, ..
            } => {
                m.insert("stored_tar_sha256".into(), json!(stored_tar_sha256));
            }
            ApiError::ResumeUnavailable { offset, .. } => {
                m.insert("resume_offset".into(), json!(offset));
            }
            _ => {}
        }
        m
    }

    pub(crate) fn body(&self) -> Value {
        let mut m = Map::new();
        m.insert("error".into(), json!(self.code().as_str()));
        m.insert("message".into(), json!(self.message()));
        m.extend(self.extra());
        Value::Object(m)
    }

    /// A write to the store failed: a full disk and an unavailable object store are the
    /// client's cue to retry; anything else is the receiver's fault. `doing` opens the message.
    pub(crate) fn store_write(e: io::Error, doing: &str) -> ApiError {
        if StoreUnavailable::is(&e) {
            ApiError::StoreUnavailable(e.to_string())
        } else if e.kind() == io::ErrorKind::StorageFull {
            ApiError::InsufficientStorage(format!("the store is full: {e}"))
        } else {
            ApiError::Internal(format!("{doing}: {e}"))
        }
    }

    /// Builds the 409 for an id stored with other bytes; `how` says when that was found.
    pub(crate) fn conflict(id: &str, stored: String, sent: &str, how: ConflictSeen) -> ApiError {
        let when = match how {
            ConflictSeen::Before => "is already stored",
            ConflictSeen::Meanwhile => "was stored meanwhile",
        };
        ApiError::Conflict {
            message: format!("{id} {when} with tar SHA-256 {stored}, not {sent}"),
            stored_tar_sha256: stored,
        }
    }
}

/// When a conflicting stored body was found: before the upload, or while it ran.
#[derive(Debug, Clone, Copy)]
pub(crate) enum ConflictSeen {
    Before,
    Meanwhile,
}

/// The validator's verdicts (413/422), its sink failures and its source failures.
impl From<Rejection> for ApiError {
    fn from(r: Rejection) -> ApiError {
        match r {
            Rejection::Invalid(m) => ApiError::InvalidContent(m),
            Rejection::TooLarge(limit) => {
                ApiError::TooLarge(format!("the uncompressed episode exceeds {limit} bytes"))
            }
            Rejection::Ratio(ratio) => ApiError::TooLarge(format!(
                "the body decompresses to more than {ratio} times its compressed size (limits.max_compression_ratio)"
            )),
            Rejection::Sink(e) => ApiError::store_write(e, "failed to write the upload"),
            Rejection::Source(e) if e.kind() == io::ErrorKind::TimedOut => {
                ApiError::BodyTimeout(format!("the upload stalled: {e}"))
            }
            Rejection::Busy(b) => ApiError::DecoderBusy(format!("{b}; retry later")),
            Rejection::Source(e) => {
                ApiError::Malformed(format!("failed to read the request body: {e}"))
            }
        }
    }
}

impl From<StoreUnavailable> for ApiError {
    fn from(e: StoreUnavailable) -> ApiError {
        ApiError::StoreUnavailable(e.to_string())
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {}: {}",
            self.status().as_u16(),
            self.code(),
            self.message()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_has_error_message_and_extras() {
        let e = ApiError::NotInWindow {
            your_commit: "abc".into(),
            head_commit: None,
            window: 3,
            branch: "main".into(),
            remediation: "git pull".into(),
        };
        assert_eq!(e.status(), StatusCode::PRECONDITION_FAILED);
        assert_eq!(
            e.body(),
            json!({
                "error": "commit_not_in_window",
                "message": "commit abc is not among the last 3 commits of main; update this lab host's code",
                "remediation": "git pull",
                "your_commit": "abc",
                "head_commit": null,
            })
        );
    }

    #[test]
    fn every_code_has_a_valid_status() {
        for c in ErrorCode::ALL {
            assert!(StatusCode::from_u16(c.status()).is_ok(), "{c}");
        }
    }

    #[test]
    fn transient_refusals_say_when_to_retry() {
        assert_eq!(ApiError::Overloaded.retry_after(), Some(5));
        assert_eq!(ApiError::GateUnavailable.retry_after(), Some(10));
        assert_eq!(
            ApiError::InsufficientStorage("full".into()).retry_after(),
            Some(60)
        );
        assert_eq!(
            ApiError::StoreUnavailable("x".into()).retry_after(),
            Some(5)
        );
        assert_eq!(ApiError::LengthRequired.retry_after(), None);
    }

    #[test]
    fn a_full_disk_is_507_and_a_store_outage_503() {
        let full = io::Error::new(io::ErrorKind::StorageFull, "no space");
        assert_eq!(
            ApiError::store_write(full, "x").status(),
            StatusCode::INSUFFICIENT_STORAGE
        );
        let gone = StoreUnavailable("put: timeout".into()).into_io();
        assert_eq!(
            ApiError::store_write(gone, "x").status(),
            StatusCode::SERVICE_UNAVAILABLE
        );
        let other = io::Error::other("bad");
        assert_eq!(
            ApiError::store_write(other, "failed to store the upload").message(),
            "failed to store the upload: bad"
        );
    }
}
