//! Everything decided about an upload before its body is read, shared by `PUT` and `check`
//! (SPEC §3, §4), in the order a lab admin would want the refusals explained.

use http::HeaderMap;

use cis490_common::{headers, Commit};

use crate::error::{ApiError, ConflictSeen};
use crate::gate::Admission;
use crate::state::AppState;
use crate::store::IndexRow;

use super::{header_str, own_episode};

/// What an upload's path and headers declare, each parsed and checked.
pub(super) struct Declared<'a> {
    pub(super) host: &'a str,
    pub(super) episode: &'a str,
    pub(super) commit: Commit,
    pub(super) tar_sha256: String,
}

/// The verdict on a declared upload.
pub(super) enum Verdict {
    /// Send the body.
    Go,
    /// This id is stored with these bytes already: nothing to send.
    Stored(IndexRow),
}

/// Step 1: the ids, the caller, the commit, the tar hash and the content type.
pub(super) fn declared<'a>(
    state: &AppState,
    caller: &str,
    host: &'a str,
    episode: &'a str,
    headers: &HeaderMap,
) -> Result<Declared<'a>, ApiError> {
    let (host, episode) = own_episode(caller, host, episode)?;
    let commit = commit(state, headers)?;
    let tar_sha256 = tar_sha256_and_type(headers)?;
    Ok(Declared {
        host,
        episode,
        commit,
        tar_sha256,
    })
}

/// The tar hash (required) and the content type (optional, but zstd when given): the part of
/// step 1 that needs nothing but the headers.
pub(super) fn tar_sha256_and_type(headers: &HeaderMap) -> Result<String, ApiError> {
    let tar_sha256 = match header_str(headers, headers::TAR_SHA256)? {
        None => {
            return Err(ApiError::Malformed(
                "the X-Cis490-Tar-SHA256 header is required".into(),
            ))
        }
        Some(s) => cis490_common::ids::parse_sha256(s).ok_or_else(|| {
            ApiError::Malformed(format!("X-Cis490-Tar-SHA256 {s:?} is not 64 hex digits"))
        })?,
    };
    if let Some(ct) = header_str(headers, "content-type")? {
        let base = ct.split(';').next().unwrap_or("").trim();
        if !base.eq_ignore_ascii_case(headers::CONTENT_TYPE_ZSTD)
            && !base.eq_ignore_ascii_case("application/octet-stream")
        {
            return Err(ApiError::Malformed(format!(
                "Content-Type must be application/zstd, got {ct:?}"
            )));
        }
    }
    Ok(tar_sha256)
}

/// The `X-Cis490-Code-Commit` header; a refusal carries the remediation.
fn commit(state: &AppState, headers: &HeaderMap) -> Result<Commit, ApiError> {
    let head = || state.gate.view().head_commit;
    match header_str(headers, headers::CODE_COMMIT)? {
        None | Some("") => Err(ApiError::MissingCommit {
            remediation: state.gate.remediation(None, head().as_deref()),
        }),
        Some(s) => Commit::parse(s).map_err(|e| ApiError::MalformedCommit {
            given: s.into(),
            why: e.to_string(),
            remediation: state.gate.remediation(Some(s), head().as_deref()),
        }),
    }
}

/// Step 2, given the body's length when it is known (a `PUT` always knows it, a `check` when
/// it sent `X-Cis490-Upload-Length`): size limits, the stored row, the gate, disk space and
/// the upload slots. `held` bytes of the body are on disk already (a resumed upload) and need
/// no more room.
pub(super) async fn admit(
    state: &AppState,
    d: &Declared<'_>,
    length: Option<u64>,
    held: u64,
) -> Result<Verdict, ApiError> {
    if let Some(len) = length {
        within_limits(state, len)?;
    }
    // Already stored with these bytes: 200 before the gate, so a shipper that crashed after
    // the 201 can still retire the episode once its commit has left the window.
    let stored = state.store.find_intact(d.host, d.episode).await?;
    if let Some(row) = stored.as_ref().filter(|r| r.tar_sha256 == d.tar_sha256) {
        return Ok(Verdict::Stored(row.clone()));
    }
    gate(state, d).await?;
    if let Some(row) = stored {
        return Err(ApiError::conflict(
            &format!("{}/{}", d.host, d.episode),
            row.tar_sha256,
            &d.tar_sha256,
            ConflictSeen::Before,
        ));
    }
    if let Some(len) = length {
        room_for(state, len.saturating_sub(held))?;
    }
    if state.uploads.available_permits() == 0 {
        return Err(ApiError::Overloaded);
    }
    if state.host_slots.held_by(d.host) >= state.host_slots.per_host() {
        return Err(host_overloaded(state, d.host));
    }
    Ok(Verdict::Go)
}

pub(super) fn host_overloaded(state: &AppState, host: &str) -> ApiError {
    ApiError::HostOverloaded {
        host: host.into(),
        cap: state.host_slots.per_host(),
    }
}

fn within_limits(state: &AppState, len: u64) -> Result<(), ApiError> {
    let max = state.cfg.limits.max_body_bytes;
    if len > max {
        return Err(ApiError::TooLarge(format!(
            "the body is {len} bytes; this receiver accepts at most {max}"
        )));
    }
    if len == 0 {
        return Err(ApiError::InvalidContent("the body is empty".into()));
    }
    Ok(())
}

async fn gate(state: &AppState, d: &Declared<'_>) -> Result<(), ApiError> {
    match state.gate.check(&d.commit).await {
        Admission::Admitted => {
            if !state.gate.enabled() {
                tracing::warn!(episode = d.episode, host = d.host, commit = %d.commit, "version gate disabled: admitting without a commit check");
            }
            Ok(())
        }
        Admission::Unavailable => Err(ApiError::GateUnavailable),
        Admission::NotInWindow { head } => {
            let head_commit = head.map(|c| c.to_string());
            let your_commit = d.commit.to_string();
            Err(ApiError::NotInWindow {
                remediation: state
                    .gate
                    .remediation(Some(&your_commit), head_commit.as_deref()),
                your_commit,
                head_commit,
                window: state.cfg.version_gate.window,
                branch: state.cfg.version_gate.branch.clone(),
            })
        }
    }
}

/// Uploads in flight will take what they declared: count it as used.
fn room_for(state: &AppState, len: u64) -> Result<(), ApiError> {
    let Some(free) = state.store.free_bytes() else {
        return Ok(());
    };
    let reserved = state.host_slots.reserved_bytes();
    if free < len.saturating_add(reserved) {
        return Err(ApiError::InsufficientStorage(format!(
            "the store has {free} bytes free, {reserved} of them promised to uploads in progress; this upload needs {len}"
        )));
    }
    Ok(())
}
