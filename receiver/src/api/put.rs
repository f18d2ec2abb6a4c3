//! `PUT /v1/episodes/{host}/{episode}` (SPEC §3, §5): admission, then the body pump beside the
//! blocking validator that streams into the store, then the answer for what the validator
//! finished with.

use std::io;
use std::sync::Arc;

use http::{HeaderMap, StatusCode};
use hyper::body::Incoming;
use tokio::task::JoinHandle;

use crate::error::{ApiError, ConflictSeen};
use crate::ingest::{self, Expect};
use crate::metrics::Metrics;
use crate::state::AppState;
use crate::store::{CommitOutcome, IndexRow, QuarantineNote, Store};

use super::admission::{admit, declared, host_overloaded, Declared, Verdict};
use super::body::{self, ChannelReader};
use super::{already_stored, parse_len, row_response, Resp};

pub(super) async fn put(
    state: &Arc<AppState>,
    caller: &str,
    host: &str,
    episode: &str,
    headers: &HeaderMap,
    body_slot: &mut Option<Incoming>,
) -> Result<Resp, ApiError> {
    // Admission.
    let d = declared(state, caller, host, episode, headers)?;
    let length = content_length(headers)?;
    if let Verdict::Stored(row) = admit(state, &d, Some(length)).await? {
        return Ok(already_stored(&row));
    }
    let Ok(_permit) = state.uploads.clone().try_acquire_owned() else {
        return Err(ApiError::Overloaded);
    };
    let Some(mut host_slot) = state.host_slots.try_take(d.host, length) else {
        return Err(host_overloaded(state, d.host));
    };
    state.metrics.uploads_in_flight.inc();
    let _in_flight = InFlight(state.clone());

    // The body pump, beside the validator.
    let (tx, reader) = body::channel();
    let validator = spawn_validator(state, &d, length, reader);
    let Some(body) = body_slot.take() else {
        return Err(ApiError::Internal("request body already taken".into()));
    };
    body::pump(state, body, tx, length, &mut host_slot).await;

    // The answer.
    let finished = validator
        .await
        .map_err(|e| ApiError::Internal(format!("validator task failed: {e}")))?
        .map_err(|e| ApiError::store_write(e, "failed to store the upload"))?;
    finish(state, &d, finished).await
}

/// `Content-Length`, which every upload must declare (no chunked bodies).
fn content_length(headers: &HeaderMap) -> Result<u64, ApiError> {
    if headers.contains_key(http::header::TRANSFER_ENCODING) {
        return Err(ApiError::LengthRequired);
    }
    parse_len(headers, "content-length")?.ok_or(ApiError::LengthRequired)
}

/// How the validator's run ended.
enum Finished {
    Committed(CommitOutcome),
    /// The body was refused; `kept` says whether it went to the quarantine.
    Refused {
        error: ApiError,
        kept: Kept,
    },
}

enum Kept {
    InQuarantine,
    Discarded,
}

/// Validates the body as it arrives and streams it into the store, on a blocking thread.
/// A verdict on the body itself (413/422) keeps the upload in quarantine with a note built
/// from the answer the client gets.
fn spawn_validator(
    state: &AppState,
    d: &Declared<'_>,
    length: u64,
    reader: ChannelReader,
) -> JoinHandle<io::Result<Finished>> {
    let store: Store = state.store.clone();
    let limits = &state.cfg.limits;
    let expect = Expect {
        commit: Some(d.commit),
        tar_sha256: Some(d.tar_sha256.clone()),
        max_path_bytes: limits.max_path_bytes,
        max_ratio: limits.max_compression_ratio,
        ..Expect::new(d.episode, limits.max_uncompressed_bytes)
    };
    let (host, episode) = (d.host.to_string(), d.episode.to_string());
    let (sha, commit) = (d.tar_sha256.clone(), d.commit.to_string());
    tokio::task::spawn_blocking(move || -> io::Result<Finished> {
        let mut upload = store.begin(&host, &episode, &sha, &commit, length)?;
        match ingest::validate(reader, &mut upload, &expect) {
            Ok(v) => Ok(Finished::Committed(upload.commit(&v)?)),
            Err(r) => {
                let verdict = r.is_verdict();
                let error = ApiError::from(r);
                if !verdict {
                    return Ok(Finished::Refused {
                        error,
                        kept: Kept::Discarded,
                    });
                }
                let note = note(&error, host, episode, commit);
                let kept = match upload.quarantine(&note) {
                    Ok(()) => Kept::InQuarantine,
                    Err(err) => {
                        tracing::error!(error = %err, "failed to keep a rejected upload in quarantine");
                        Kept::Discarded
                    }
                };
                Ok(Finished::Refused { error, kept })
            }
        }
    })
}

/// The reason file kept beside a quarantined upload: what the client was answered.
fn note(error: &ApiError, host_id: String, episode_id: String, commit: String) -> QuarantineNote {
    QuarantineNote::new(
        host_id,
        episode_id,
        commit,
        error.status().as_u16(),
        error.code().as_str(),
        error.message(),
    )
}

async fn finish(
    state: &Arc<AppState>,
    d: &Declared<'_>,
    finished: Finished,
) -> Result<Resp, ApiError> {
    match finished {
        Finished::Committed(CommitOutcome::Stored(row)) => Ok(stored(state, &row)),
        Finished::Committed(CommitOutcome::AlreadyStored(row)) => Ok(already_stored(&row)),
        Finished::Committed(CommitOutcome::Conflict(row)) => Err(ApiError::conflict(
            &format!("{}/{}", d.host, d.episode),
            row.tar_sha256,
            &d.tar_sha256,
            ConflictSeen::Meanwhile,
        )),
        Finished::Refused { error, kept } => {
            if let Kept::InQuarantine = kept {
                refresh_quarantine_gauge(state).await;
            }
            Err(error)
        }
    }
}

fn stored(state: &AppState, row: &IndexRow) -> Resp {
    state.fleet.stored(row);
    state.metrics.stored_bytes.inc_by(row.bytes);
    tracing::info!(
        event = "upload_stored",
        host = %row.host_id,
        episode = %row.episode_id,
        bytes = row.bytes,
        commit = %row.commit,
        tar_sha256 = %row.tar_sha256,
        "episode stored"
    );
    row_response(StatusCode::CREATED, "stored", row)
}

async fn refresh_quarantine_gauge(state: &AppState) {
    if let Some(q) = state.store.quarantine_held().await {
        Metrics::set_bytes(&state.metrics.quarantine_bytes, q);
    }
}

/// Counts an upload in `uploads_in_flight` for as long as it lives.
struct InFlight(Arc<AppState>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.metrics.uploads_in_flight.dec();
    }
}
