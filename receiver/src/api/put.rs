//! `PUT /v1/episodes/{host}/{episode}` (SPEC §3, §5): admission, then the body pump beside the
//! blocking validator that streams into the store, then the answer for what the validator
//! finished with.

use std::io::{self, Read, Write};
use std::sync::Arc;

use http::{HeaderMap, StatusCode};
use hyper::body::Incoming;
use tokio::task::JoinHandle;

use crate::decoders::{self, DecoderBudget};
use crate::error::{ApiError, ConflictSeen};
use crate::ingest::{self, Expect, Rejection, Validated};
use crate::metrics::Metrics;
use crate::state::AppState;
use crate::store::resume::{PartError, ResumeKey, MIN_KEPT};
use crate::store::{CommitOutcome, Held, IndexRow, QuarantineNote, S3Store, Store, Upload};

use super::admission::{admit, declared, host_overloaded, Declared, Verdict};
use super::body::{self, ChannelReader};
use super::{already_stored, header_str, parse_len, row_response, Resp};

pub(super) async fn put(
    state: &Arc<AppState>,
    caller: &str,
    host: &str,
    episode: &str,
    headers: &HeaderMap,
    body_slot: &mut Option<Incoming>,
) -> Result<Resp, ApiError> {
    // Admission. `sent` is what this request carries, `length` the whole body's length (they
    // differ for a resumed upload, SPEC §13).
    let d = declared(state, caller, host, episode, headers)?;
    let BodySpan {
        sent,
        start,
        length,
        prefix_sha256,
    } = body_span(headers)?;
    if let Verdict::Stored(row) = admit(state, &d, Some(length), start).await? {
        return Ok(already_stored(&row));
    }
    let Ok(_permit) = state.uploads.clone().try_acquire_owned() else {
        return Err(ApiError::Overloaded);
    };
    let Some(mut host_slot) = state.host_slots.try_take(d.host, sent) else {
        return Err(host_overloaded(state, d.host));
    };
    state.metrics.uploads_in_flight.inc();
    let _in_flight = InFlight(state.clone());
    let part = resumable_part(state, &d, length, start, prefix_sha256).await?;

    // The body pump, beside the validator.
    let (tx, reader) = body::channel();
    let validator = spawn_validator(state, &d, length, reader, part);
    let Some(body) = body_slot.take() else {
        return Err(ApiError::Internal("request body already taken".into()));
    };
    body::pump(state, body, tx, sent, &mut host_slot).await;

    // The answer.
    let finished = validator
        .await
        .map_err(|e| ApiError::Internal(format!("validator task failed: {e}")))?
        .map_err(|e| ApiError::store_write(e, "failed to store the upload"))?;
    finish(state, &d, finished).await
}

/// What a PUT's length headers say about its body (SPEC §3, §13).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BodySpan {
    /// Bytes this request carries (`Content-Length`).
    pub sent: u64,
    /// Where in the whole body they start: 0 unless `Content-Range` says otherwise.
    pub start: u64,
    /// The whole body's length.
    pub length: u64,
    /// `X-Cis490-Resume-Prefix-SHA256`, lowercased; required when `start` > 0.
    pub prefix_sha256: Option<String>,
}

/// `Content-Length`, `Content-Range` and the prefix hash, checked against each other.
pub(crate) fn body_span(headers: &HeaderMap) -> Result<BodySpan, ApiError> {
    let sent = content_length(headers)?;
    let range = content_range(headers, sent)?;
    let length = range.map_or(sent, |r| r.total);
    let start = range.map_or(0, |r| r.start);
    let prefix_sha256 = resume_prefix(headers, start)?;
    Ok(BodySpan {
        sent,
        start,
        length,
        prefix_sha256,
    })
}

/// `Content-Length`, which every upload must declare (no chunked bodies).
fn content_length(headers: &HeaderMap) -> Result<u64, ApiError> {
    if headers.contains_key(http::header::TRANSFER_ENCODING) {
        return Err(ApiError::LengthRequired);
    }
    parse_len(headers, "content-length")?.ok_or(ApiError::LengthRequired)
}

/// A `Content-Range: bytes S-E/T` of a resumed upload: it must run to the end of the body
/// and agree with `Content-Length`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Range {
    start: u64,
    total: u64,
}

fn content_range(headers: &HeaderMap, sent: u64) -> Result<Option<Range>, ApiError> {
    let Some(v) = header_str(headers, "content-range")? else {
        return Ok(None);
    };
    let r = parse_range(v).ok_or_else(|| {
        ApiError::Malformed(format!(
            "Content-Range {v:?} is not of the form \"bytes N-(L-1)/L\""
        ))
    })?;
    if r.end.checked_add(1) != Some(r.total) {
        return Err(ApiError::Malformed(format!(
            "Content-Range {v:?} must end at the last byte of the body ({})",
            r.total.saturating_sub(1)
        )));
    }
    if r.start > r.end {
        return Err(ApiError::Malformed(format!(
            "Content-Range {v:?} starts after its end"
        )));
    }
    if r.total - r.start != sent {
        return Err(ApiError::Malformed(format!(
            "Content-Length {sent} differs from the {} bytes Content-Range {v:?} names",
            r.total - r.start
        )));
    }
    Ok(Some(Range {
        start: r.start,
        total: r.total,
    }))
}

struct RawRange {
    start: u64,
    end: u64,
    total: u64,
}

/// `bytes S-E/T`, decimal digits only.
fn parse_range(v: &str) -> Option<RawRange> {
    let rest = v.strip_prefix("bytes ")?;
    let (span, total) = rest.split_once('/')?;
    let (start, end) = span.split_once('-')?;
    let num = |s: &str| {
        (!s.is_empty() && s.len() <= 20 && s.bytes().all(|b| b.is_ascii_digit()))
            .then(|| s.parse::<u64>().ok())
            .flatten()
    };
    Some(RawRange {
        start: num(start)?,
        end: num(end)?,
        total: num(total)?,
    })
}

/// `X-Cis490-Resume-Prefix-SHA256`, required when the upload starts past byte 0.
fn resume_prefix(headers: &HeaderMap, start: u64) -> Result<Option<String>, ApiError> {
    let name = cis490_common::headers::RESUME_PREFIX_SHA256;
    match header_str(headers, name)? {
        None if start > 0 => Err(ApiError::Malformed(format!(
            "a Content-Range from byte {start} needs the X-Cis490-Resume-Prefix-SHA256 header"
        ))),
        None => Ok(None),
        Some(s) => cis490_common::ids::parse_sha256(s)
            .map(Some)
            .ok_or_else(|| {
                ApiError::Malformed(format!(
                    "X-Cis490-Resume-Prefix-SHA256 {s:?} is not 64 hex digits"
                ))
            }),
    }
}

/// What a body long enough to be resumable starts from: the fs store's part file, opened from
/// `start` after the held prefix's hash was checked, or the S3 store's checked record. A
/// resume the receiver cannot serve is the 416 of SPEC §13, answered before the body is read.
async fn resumable_part(
    state: &AppState,
    d: &Declared<'_>,
    length: u64,
    start: u64,
    prefix_sha256: Option<String>,
) -> Result<Option<Held>, ApiError> {
    if let Store::S3(s3) = &state.store {
        return s3_resumable(s3, d, length, start, prefix_sha256).await;
    }
    let resumes = match state.store.resumes() {
        Some(r) if length > MIN_KEPT && r.enabled() => r.clone(),
        _ if start > 0 => {
            return Err(ApiError::ResumeUnavailable {
                offset: 0,
                why: "this receiver holds no part of this body".into(),
            })
        }
        _ => return Ok(None),
    };
    let key = ResumeKey {
        host: d.host.to_string(),
        episode: d.episode.to_string(),
        tar_sha256: d.tar_sha256.clone(),
        length,
    };
    let Some(claim) = resumes.claim(&key) else {
        return Err(ApiError::UploadInProgress {
            id: format!("{}/{}", d.host, d.episode),
        });
    };
    let opened = tokio::task::spawn_blocking(move || {
        resumes.open_part(&key, start, prefix_sha256.as_deref(), claim)
    })
    .await
    .map_err(|e| ApiError::Internal(format!("resume task failed: {e}")))?;
    let (part, prefix) = opened_or_416(d, length, start, opened)?;
    Ok(Some(Held::Fs(part, prefix)))
}

/// The S3 store's side of [`resumable_part`]: every body that goes up as a multipart upload
/// is recorded, so the id is claimed here and a resume's record checked.
async fn s3_resumable(
    s3: &S3Store,
    d: &Declared<'_>,
    length: u64,
    start: u64,
    prefix_sha256: Option<String>,
) -> Result<Option<Held>, ApiError> {
    if !s3.recorded(length) {
        if start > 0 {
            return Err(ApiError::ResumeUnavailable {
                offset: 0,
                why: "this receiver holds no part of this body".into(),
            });
        }
        return Ok(None);
    }
    let Some(claim) = s3.claim(d.host, d.episode) else {
        return Err(ApiError::UploadInProgress {
            id: format!("{}/{}", d.host, d.episode),
        });
    };
    let key = ResumeKey {
        host: d.host.to_string(),
        episode: d.episode.to_string(),
        tar_sha256: d.tar_sha256.clone(),
        length,
    };
    let opened = s3
        .resume_from(&key, start, prefix_sha256.as_deref(), claim)
        .await;
    let held = opened_or_416(d, length, start, opened)?;
    Ok(Some(Held::S3(Box::new(held))))
}

/// Logs an accepted resume, or turns a refused one into its answer.
fn opened_or_416<T>(
    d: &Declared<'_>,
    length: u64,
    start: u64,
    opened: Result<T, PartError>,
) -> Result<T, ApiError> {
    match opened {
        Ok(p) => {
            if start > 0 {
                tracing::info!(
                    event = "upload_resumed",
                    host = %d.host,
                    episode = %d.episode,
                    offset = start,
                    bytes = length,
                    "resuming an upload from its held prefix"
                );
            }
            Ok(p)
        }
        Err(PartError::Unavailable { offset, why }) => {
            Err(ApiError::ResumeUnavailable { offset, why })
        }
        Err(PartError::Io(e)) => Err(ApiError::store_write(
            e,
            "failed to open the upload's held prefix",
        )),
    }
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
    held: Option<Held>,
) -> JoinHandle<io::Result<Finished>> {
    let store: Store = state.store.clone();
    let limits = &state.cfg.limits;
    let expect = Expect {
        commit: Some(d.commit),
        tar_sha256: Some(d.tar_sha256.clone()),
        max_path_bytes: limits.max_path_bytes,
        max_ratio: limits.max_compression_ratio,
        decoder_budget: Some((state.decoders.clone(), d.host.to_string())),
        ..Expect::new(d.episode, limits.max_uncompressed_bytes)
    };
    let (host, episode) = (d.host.to_string(), d.episode.to_string());
    let (sha, commit) = (d.tar_sha256.clone(), d.commit.to_string());
    let decoders = state.decoders.clone();
    tokio::task::spawn_blocking(move || -> io::Result<Finished> {
        // A resumed upload's held prefix goes through the validator again, then the new bytes.
        let (held, prefix) = match held {
            Some(Held::Fs(part, prefix)) => (Some(Held::Fs(part, None)), prefix),
            other => (other, None),
        };
        let source: Box<dyn Read + Send> = match prefix {
            Some(f) => Box::new(io::BufReader::with_capacity(1 << 20, f).chain(reader)),
            None => Box::new(reader),
        };
        let mut upload = store.begin(&host, &episode, &sha, &commit, length, held)?;
        let verdict = if upload.validates_afterwards() {
            store_then_validate(source, &mut upload, &expect)
        } else if upload.can_read_back() {
            leased_or_spooled(source, &mut upload, &expect, &decoders, &host)
        } else {
            ingest::validate(source, &mut upload, &expect)
        };
        match verdict {
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

/// A resumed S3 upload: its prefix cannot be read while the rest arrives, so the new bytes go
/// into the store first, then the whole stored body is read back through the validator.
fn store_then_validate(
    source: Box<dyn Read + Send>,
    upload: &mut Box<dyn Upload>,
    expect: &Expect,
) -> Result<Validated, Rejection> {
    spool(source, upload)?;
    validate_stored(upload, expect, |body, expect| {
        ingest::validate(body, io::sink(), expect)
    })
}

/// Copies the whole body into the upload, undecoded.
fn spool(mut source: impl Read, upload: &mut Box<dyn Upload>) -> Result<(), Rejection> {
    // The body arrives in chunks of at most 64 KiB (hyper's read buffer); many uploads may be
    // spooling at once, so no more is held per upload.
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let n = match source.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(Rejection::Source(e)),
        };
        upload.write_all(&buf[..n]).map_err(Rejection::Sink)?;
    }
}

/// Reads the stored body back through `validate`. Reading it back is the store's side: its
/// failures are the store's too.
fn validate_stored(
    upload: &mut Box<dyn Upload>,
    expect: &Expect,
    validate: impl FnOnce(Box<dyn Read + Send>, &Expect) -> Result<Validated, Rejection>,
) -> Result<Validated, Rejection> {
    let body = upload.stored_body().map_err(Rejection::Sink)?;
    validate(body, expect).map_err(|r| match r {
        Rejection::Source(e) => Rejection::Sink(e),
        r => r,
    })
}

/// An fs upload (crate::decoders): validated as it arrives when its first frame's decoder fits
/// the budget now; else written whole to its temp file and validated from there, under a lease
/// if one comes free soon, else on the spare decoder.
fn leased_or_spooled(
    mut source: Box<dyn Read + Send>,
    upload: &mut Box<dyn Upload>,
    expect: &Expect,
    decoders: &Arc<DecoderBudget>,
    host: &str,
) -> Result<Validated, Rejection> {
    let (head, need) = decoders::first_frame(&mut source).map_err(Rejection::Source)?;
    let body = io::Cursor::new(head).chain(source);
    if let Some(lease) = decoders.try_lease(host, need) {
        return ingest::validate_leased(body, upload, expect, Some(lease));
    }
    decoders.spooling();
    spool(body, upload)?;
    let mut lease = decoders.lease(host);
    if lease.take(need, decoders::SPOOL_WAIT).is_ok() {
        return validate_stored(upload, expect, |body, expect| {
            ingest::validate_leased(body, io::sink(), expect, Some(lease))
        });
    }
    drop(lease);
    let _spare = decoders.spare();
    validate_stored(upload, expect, |body, expect| {
        ingest::validate_leased(body, io::sink(), expect, None)
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
