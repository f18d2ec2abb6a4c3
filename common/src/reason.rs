//! The refusal vocabulary both sides share: the receiver's `error` codes with their HTTP
//! statuses (SPEC §3, §16), the quarantine reasons of SPEC §2, and what a shipper does with
//! each status. The receiver answers with these codes and the shipper classifies by them, so
//! a code added on one side cannot be missing on the other.

use std::fmt;

/// The `error` field of every non-2xx answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ErrorCode {
    MissingCommit,
    MalformedCommit,
    InvalidId,
    MalformedRequest,
    Unauthorized,
    Forbidden,
    NotFound,
    MethodNotAllowed,
    BodyTimeout,
    Conflict,
    LengthRequired,
    CommitNotInWindow,
    TooLarge,
    InvalidContent,
    Internal,
    Overloaded,
    GateUnavailable,
    StoreUnavailable,
    InsufficientStorage,
    /// A resumed upload names a prefix the receiver does not hold (SPEC §13): send from the
    /// offset the answer gives.
    ResumeUnavailable,
}

impl ErrorCode {
    pub const ALL: [ErrorCode; 20] = [
        ErrorCode::MissingCommit,
        ErrorCode::MalformedCommit,
        ErrorCode::InvalidId,
        ErrorCode::MalformedRequest,
        ErrorCode::Unauthorized,
        ErrorCode::Forbidden,
        ErrorCode::NotFound,
        ErrorCode::MethodNotAllowed,
        ErrorCode::BodyTimeout,
        ErrorCode::Conflict,
        ErrorCode::LengthRequired,
        ErrorCode::CommitNotInWindow,
        ErrorCode::TooLarge,
        ErrorCode::InvalidContent,
        ErrorCode::Internal,
        ErrorCode::Overloaded,
        ErrorCode::GateUnavailable,
        ErrorCode::StoreUnavailable,
        ErrorCode::InsufficientStorage,
        ErrorCode::ResumeUnavailable,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::MissingCommit => "missing_commit",
            ErrorCode::MalformedCommit => "malformed_commit",
            ErrorCode::InvalidId => "invalid_id",
            ErrorCode::MalformedRequest => "malformed_request",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::NotFound => "not_found",
            ErrorCode::MethodNotAllowed => "method_not_allowed",
            ErrorCode::BodyTimeout => "body_timeout",
            ErrorCode::Conflict => "conflict",
            ErrorCode::LengthRequired => "length_required",
            ErrorCode::CommitNotInWindow => "commit_not_in_window",
            ErrorCode::TooLarge => "too_large",
            ErrorCode::InvalidContent => "invalid_content",
            ErrorCode::Internal => "internal",
            ErrorCode::Overloaded => "overloaded",
            ErrorCode::GateUnavailable => "gate_unavailable",
            ErrorCode::StoreUnavailable => "store_unavailable",
            ErrorCode::InsufficientStorage => "insufficient_storage",
            ErrorCode::ResumeUnavailable => "resume_unavailable",
        }
    }

    /// The HTTP status this code is always answered with.
    pub fn status(self) -> u16 {
        match self {
            ErrorCode::MissingCommit
            | ErrorCode::MalformedCommit
            | ErrorCode::InvalidId
            | ErrorCode::MalformedRequest => 400,
            ErrorCode::Unauthorized => 401,
            ErrorCode::Forbidden => 403,
            ErrorCode::NotFound => 404,
            ErrorCode::MethodNotAllowed => 405,
            ErrorCode::BodyTimeout => 408,
            ErrorCode::Conflict => 409,
            ErrorCode::LengthRequired => 411,
            ErrorCode::CommitNotInWindow => 412,
            ErrorCode::TooLarge => 413,
            ErrorCode::ResumeUnavailable => 416,
            ErrorCode::InvalidContent => 422,
            ErrorCode::Internal => 500,
            ErrorCode::Overloaded | ErrorCode::GateUnavailable | ErrorCode::StoreUnavailable => 503,
            ErrorCode::InsufficientStorage => 507,
        }
    }

    pub fn parse(s: &str) -> Option<ErrorCode> {
        ErrorCode::ALL.into_iter().find(|c| c.as_str() == s)
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why an episode sits in the shipper's `quarantine/` (SPEC §2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Reason {
    CommitNotInWindow,
    MalformedRequest,
    Conflict,
    TooLarge,
    InvalidContent,
    /// Filed by the shipper itself: meta.json missing or without a commit.
    Unstamped,
    /// Filed by the shipper itself: a symlink, device, FIFO or socket in the episode.
    UnsupportedEntry,
}

impl Reason {
    pub const ALL: [Reason; 7] = [
        Reason::CommitNotInWindow,
        Reason::MalformedRequest,
        Reason::Conflict,
        Reason::TooLarge,
        Reason::InvalidContent,
        Reason::Unstamped,
        Reason::UnsupportedEntry,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Reason::CommitNotInWindow => "commit_not_in_window",
            Reason::MalformedRequest => "malformed_request",
            Reason::Conflict => "conflict",
            Reason::TooLarge => "too_large",
            Reason::InvalidContent => "invalid_content",
            Reason::Unstamped => "unstamped",
            Reason::UnsupportedEntry => "unsupported_entry",
        }
    }

    pub fn parse(s: &str) -> Option<Reason> {
        Reason::ALL.into_iter().find(|r| r.as_str() == s)
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a shipper does with an answer (the last column of SPEC §3's table).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disposition {
    /// 200/201: the receiver holds the episode; retire it.
    Stored,
    /// A fatal refusal: the episode can never be admitted as it is.
    Quarantine(Reason),
    /// 401/403: keep the episode, retry with a long backoff, log at ERROR.
    Auth,
    /// Everything else: keep it and retry with backoff.
    Transient,
}

impl Disposition {
    pub fn of_status(status: u16) -> Disposition {
        match status {
            200 | 201 => Disposition::Stored,
            400 | 411 => Disposition::Quarantine(Reason::MalformedRequest),
            409 => Disposition::Quarantine(Reason::Conflict),
            412 => Disposition::Quarantine(Reason::CommitNotInWindow),
            413 => Disposition::Quarantine(Reason::TooLarge),
            422 => Disposition::Quarantine(Reason::InvalidContent),
            401 | 403 => Disposition::Auth,
            _ => Disposition::Transient,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip_and_are_unique() {
        for c in ErrorCode::ALL {
            assert_eq!(ErrorCode::parse(c.as_str()), Some(c));
        }
        for r in Reason::ALL {
            assert_eq!(Reason::parse(r.as_str()), Some(r));
        }
        assert_eq!(ErrorCode::parse("nope"), None);
    }

    /// The receiver's own codes land where SPEC §3 says the shipper puts them.
    #[test]
    fn every_code_has_the_disposition_of_its_status() {
        let fatal = |c: ErrorCode| Disposition::of_status(c.status());
        assert_eq!(
            fatal(ErrorCode::CommitNotInWindow),
            Disposition::Quarantine(Reason::CommitNotInWindow)
        );
        for c in [
            ErrorCode::MissingCommit,
            ErrorCode::MalformedCommit,
            ErrorCode::InvalidId,
            ErrorCode::MalformedRequest,
            ErrorCode::LengthRequired,
        ] {
            assert_eq!(fatal(c), Disposition::Quarantine(Reason::MalformedRequest));
        }
        assert_eq!(
            fatal(ErrorCode::Conflict),
            Disposition::Quarantine(Reason::Conflict)
        );
        assert_eq!(
            fatal(ErrorCode::TooLarge),
            Disposition::Quarantine(Reason::TooLarge)
        );
        assert_eq!(
            fatal(ErrorCode::InvalidContent),
            Disposition::Quarantine(Reason::InvalidContent)
        );
        for c in [ErrorCode::Unauthorized, ErrorCode::Forbidden] {
            assert_eq!(fatal(c), Disposition::Auth);
        }
        for c in [
            ErrorCode::BodyTimeout,
            ErrorCode::Overloaded,
            ErrorCode::GateUnavailable,
            ErrorCode::StoreUnavailable,
            ErrorCode::InsufficientStorage,
            ErrorCode::Internal,
        ] {
            assert_eq!(fatal(c), Disposition::Transient, "{c}");
        }
    }
}
