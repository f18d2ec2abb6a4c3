//! The API of SPEC §3. Every answer that needs no body is given before the body is polled,
//! so a client that sent `Expect: 100-continue` uploads nothing when it is refused.

use std::io::{self, Read};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use bytes::Bytes;
use http::{HeaderMap, Method, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use serde_json::json;
use tokio::sync::mpsc;

use cis490_common::{headers, timefmt, validate_id, Commit};

use crate::error::ApiError;
use crate::gate::Admission;
use crate::ingest::{self, Expect, Rejection};
use crate::s3::StoreUnavailable;
use crate::server::AppState;
use crate::store::{CommitOutcome, IndexRow, QuarantineNote, Store};

pub const RECEIVER_VERSION: &str = env!("CARGO_PKG_VERSION");

type Resp = Response<Full<Bytes>>;

fn json_response(status: StatusCode, body: serde_json::Value, retry_after: Option<u64>) -> Resp {
    let mut b = Response::builder()
        .status(status)
        .header("content-type", "application/json");
    if let Some(s) = retry_after {
        b = b.header("retry-after", s.to_string());
    }
    let mut text = body.to_string();
    text.push('\n');
    // Invariant: status and header values above are always valid, so the builder cannot fail.
    b.body(Full::new(Bytes::from(text))).unwrap_or_default()
}

fn error_response(e: &ApiError) -> Resp {
    json_response(e.status, e.body(), e.retry_after)
}

fn row_response(status: StatusCode, kind: &str, row: &IndexRow) -> Resp {
    json_response(
        status,
        json!({
            "status": kind,
            "host_id": row.host_id,
            "episode_id": row.episode_id,
            "tar_sha256": row.tar_sha256,
            "bytes": row.bytes,
        }),
        None,
    )
}

enum Route<'a> {
    Episode(&'a str, &'a str),
    Check(&'a str, &'a str),
    Ping,
}

fn route(path: &str) -> Option<Route<'_>> {
    if path == "/v1/ping" {
        return Some(Route::Ping);
    }
    let rest = path.strip_prefix("/v1/episodes/")?;
    let parts: Vec<&str> = rest.split('/').collect();
    match parts.as_slice() {
        [h, e] => Some(Route::Episode(h, e)),
        [h, e, "check"] => Some(Route::Check(h, e)),
        _ => None,
    }
}

pub async fn handle(
    state: Arc<AppState>,
    identity: Arc<Option<String>>,
    req: Request<Incoming>,
) -> Resp {
    let path = req.uri().path().to_string();
    let method = req.method().clone();
    let is_put = method == Method::PUT && matches!(route(&path), Some(Route::Episode(..)));
    let (parts, body) = req.into_parts();
    let mut body = Some(body);
    let result = dispatch(&state, identity.as_deref(), &parts, &mut body).await;
    if let Some(unread) = body {
        linger(&parts.headers, unread);
    }
    let resp = match result {
        Ok(r) => r,
        Err(e) => {
            if is_put || e.status.is_server_error() {
                let (host, episode) = match route(&path) {
                    Some(Route::Episode(h, e) | Route::Check(h, e)) => {
                        (h.to_string(), e.to_string())
                    }
                    _ => (String::new(), String::new()),
                };
                tracing::warn!(
                    event = "upload_rejected",
                    episode = %episode,
                    host = %host,
                    path = %path,
                    status = e.status.as_u16(),
                    reason = e.code,
                    message = %e.message,
                    "request refused"
                );
            }
            error_response(&e)
        }
    };
    if is_put {
        state.metrics.count_upload(resp.status().as_u16());
    }
    resp
}

/// Bytes of an unread body drained after an early answer, so the client reads the answer
/// instead of a connection reset (clients that sent `Expect: 100-continue` sent no body).
const LINGER_BYTES: u64 = 2 << 20;

/// After an answer given without reading the body: read (and drop) a small body in the
/// background so the connection closes cleanly; a large one is left for the close.
fn linger(headers: &HeaderMap, body: Incoming) {
    let expects = headers
        .get(http::header::EXPECT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("100-continue"));
    let len = headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0);
    if expects || len == 0 || len > LINGER_BYTES {
        return;
    }
    tokio::spawn(async move {
        let mut body = body;
        let _ = tokio::time::timeout(Duration::from_secs(10), async {
            while let Some(Ok(_)) = body.frame().await {}
        })
        .await;
    });
}

type Parts = http::request::Parts;

async fn dispatch(
    state: &Arc<AppState>,
    identity: Option<&str>,
    req: &Parts,
    body: &mut Option<Incoming>,
) -> Result<Resp, ApiError> {
    let path = req.uri.path().to_string();
    let Some(r) = route(&path) else {
        return Err(ApiError::not_found(format!("no such endpoint: {path}")));
    };
    let caller = identity.ok_or_else(|| {
        ApiError::forbidden("the client certificate names no host (no DNS SAN and no CN)")
    })?;
    authorize(state, caller, &req.headers)?;
    match (r, req.method.clone()) {
        (Route::Ping, Method::POST) => ping(state, caller, &req.headers).await,
        (Route::Episode(h, e), Method::GET) => {
            let (h, e) = ids(h, e)?;
            same_host(caller, h)?;
            match state.store.find(h, e).await.map_err(store_error)? {
                Some(row) => Ok(json_response(
                    StatusCode::OK,
                    serde_json::to_value(&row).map_err(|e| ApiError::internal(e.to_string()))?,
                    None,
                )),
                None => Err(ApiError::not_found(format!(
                    "episode {h}/{e} is not stored"
                ))),
            }
        }
        (Route::Episode(h, e), Method::PUT) => {
            let (h, e) = (h.to_string(), e.to_string());
            put(state, caller, &h, &e, &req.headers, body).await
        }
        (Route::Check(h, e), Method::POST) => {
            let pre = precheck(state, caller, h, e, &req.headers, Kind::Check).await?;
            Ok(match pre {
                Pre::Go(_) => Response::builder()
                    .status(StatusCode::NO_CONTENT)
                    .body(Full::new(Bytes::new()))
                    .unwrap_or_default(),
                Pre::Already(row) => row_response(StatusCode::OK, "already_stored", &row),
            })
        }
        (_, m) => Err(ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            format!("{m} is not allowed on {path}"),
        )),
    }
}

fn authorize(state: &AppState, caller: &str, headers: &HeaderMap) -> Result<(), ApiError> {
    let tokens = state.tokens.load();
    if let Some(t) = tokens.as_ref() {
        let auth = headers
            .get(http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok());
        t.verify(caller, auth).map_err(ApiError::unauthorized)?;
    }
    Ok(())
}

fn ids<'a>(h: &'a str, e: &'a str) -> Result<(&'a str, &'a str), ApiError> {
    validate_id(h)
        .map_err(|err| ApiError::bad_request("invalid_id", format!("host_id {h:?}: {err}")))?;
    validate_id(e)
        .map_err(|err| ApiError::bad_request("invalid_id", format!("episode_id {e:?}: {err}")))?;
    Ok((h, e))
}

fn same_host(caller: &str, host: &str) -> Result<(), ApiError> {
    if caller != host {
        return Err(ApiError::forbidden(format!(
            "this client certificate is for {caller:?}, not {host:?}"
        )));
    }
    Ok(())
}

fn header_str<'a>(headers: &'a HeaderMap, name: &str) -> Result<Option<&'a str>, ApiError> {
    match headers.get(name) {
        None => Ok(None),
        Some(v) => v
            .to_str()
            .map(|s| Some(s.trim()))
            .map_err(|_| ApiError::malformed(format!("header {name} is not ASCII"))),
    }
}

fn parse_len(headers: &HeaderMap, name: &str) -> Result<Option<u64>, ApiError> {
    match header_str(headers, name)? {
        None => Ok(None),
        Some(s) => s.parse::<u64>().map(Some).map_err(|_| {
            ApiError::malformed(format!(
                "header {name} must be a non-negative integer, got {s:?}"
            ))
        }),
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Put,
    Check,
}

struct Go {
    commit: Commit,
    sha: String,
    length: u64,
}

enum Pre {
    Go(Go),
    Already(IndexRow),
}

fn commit_error(state: &AppState, code: &'static str, msg: String, your: Option<&str>) -> ApiError {
    let head = state.gate.view().head_commit;
    ApiError::bad_request(code, msg)
        .with("remediation", state.gate.remediation(your, head.as_deref()))
}

/// Every check that needs no body, in the order a lab admin would want them explained.
async fn precheck(
    state: &AppState,
    caller: &str,
    host: &str,
    ep: &str,
    headers: &HeaderMap,
    kind: Kind,
) -> Result<Pre, ApiError> {
    let (host, ep) = ids(host, ep)?;
    same_host(caller, host)?;
    let commit = match header_str(headers, headers::CODE_COMMIT)? {
        None | Some("") => {
            return Err(commit_error(
                state,
                "missing_commit",
                "the X-Cis490-Code-Commit header is required".into(),
                None,
            ));
        }
        Some(s) => Commit::parse(s).map_err(|e| {
            commit_error(
                state,
                "malformed_commit",
                format!("X-Cis490-Code-Commit {s:?} is not a commit: {e}"),
                Some(s),
            )
        })?,
    };
    let sha = match header_str(headers, headers::TAR_SHA256)? {
        None => {
            return Err(ApiError::malformed(
                "the X-Cis490-Tar-SHA256 header is required",
            ))
        }
        Some(s) => cis490_common::ids::parse_sha256(s).ok_or_else(|| {
            ApiError::malformed(format!("X-Cis490-Tar-SHA256 {s:?} is not 64 hex digits"))
        })?,
    };
    if let Some(ct) = header_str(headers, "content-type")? {
        let base = ct.split(';').next().unwrap_or("").trim();
        if !base.eq_ignore_ascii_case(headers::CONTENT_TYPE_ZSTD)
            && !base.eq_ignore_ascii_case("application/octet-stream")
        {
            return Err(ApiError::malformed(format!(
                "Content-Type must be application/zstd, got {ct:?}"
            )));
        }
    }
    let length = match kind {
        Kind::Put => {
            if headers.contains_key(http::header::TRANSFER_ENCODING) {
                return Err(ApiError::length_required());
            }
            Some(parse_len(headers, "content-length")?.ok_or_else(ApiError::length_required)?)
        }
        Kind::Check => parse_len(headers, headers::UPLOAD_LENGTH)?,
    };
    let limits = &state.cfg.limits;
    if let Some(len) = length {
        if len > limits.max_body_bytes {
            return Err(ApiError::too_large(format!(
                "the body is {len} bytes; this receiver accepts at most {}",
                limits.max_body_bytes
            )));
        }
        if len == 0 {
            return Err(ApiError::invalid_content("the body is empty"));
        }
    }
    // Already stored with these bytes: 200 before the gate, so a shipper that crashed after
    // the 201 can still retire the episode once its commit has left the window.
    let stored = state.store.find(host, ep).await.map_err(store_error)?;
    if let Some(row) = stored.as_ref().filter(|r| r.tar_sha256 == sha) {
        return Ok(Pre::Already(row.clone()));
    }
    match state.gate.check(&commit).await {
        Admission::Admitted => {
            if !state.gate.enabled() {
                tracing::warn!(episode = ep, host = host, commit = %commit, "version gate disabled: admitting without a commit check");
            }
        }
        Admission::Unavailable => {
            return Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "gate_unavailable",
                "the receiver has not loaded its list of current commits yet; retry later",
            )
            .retry_after(10));
        }
        Admission::NotInWindow { head } => {
            let head_s = head.map(|c| c.to_string());
            let your = commit.to_string();
            return Err(ApiError::new(
                StatusCode::PRECONDITION_FAILED,
                "commit_not_in_window",
                format!(
                    "commit {your} is not among the last {} commits of {}; update this lab host's code",
                    state.cfg.version_gate.window, state.cfg.version_gate.branch
                ),
            )
            .with("remediation", state.gate.remediation(Some(&your), head_s.as_deref()))
            .with("your_commit", your)
            .with("head_commit", head_s));
        }
    }
    if let Some(row) = stored {
        return Err(ApiError::conflict(format!(
            "{host}/{ep} is already stored with tar SHA-256 {}, not {sha}",
            row.tar_sha256
        ))
        .with("stored_tar_sha256", row.tar_sha256));
    }
    if let (Some(len), Some(free)) = (length, state.store.free_bytes()) {
        // Uploads in flight will take what they declared; count it as used.
        let reserved = state.host_slots.reserved_bytes();
        if free < len.saturating_add(reserved) {
            return Err(ApiError::insufficient_storage(format!(
                "the store has {free} bytes free, {reserved} of them promised to uploads in progress; this upload needs {len}"
            )));
        }
    }
    if state.uploads.available_permits() == 0 {
        return Err(ApiError::overloaded());
    }
    if state.host_slots.held_by(host) >= state.host_slots.per_host() {
        return Err(ApiError::host_overloaded(host, state.host_slots.per_host()));
    }
    Ok(Pre::Go(Go {
        commit,
        sha,
        length: length.unwrap_or(0),
    }))
}

async fn ping(state: &AppState, caller: &str, headers: &HeaderMap) -> Result<Resp, ApiError> {
    let commit = header_str(headers, headers::CODE_COMMIT)?
        .filter(|s| !s.is_empty())
        .map(|s| (s.to_string(), Commit::parse(s)));
    let mut body = json!({
        "ok": true,
        "host_id": caller,
        "receiver_version": RECEIVER_VERSION,
        "gate": state.gate.view(),
        "commit_accepted": null,
    });
    if let Some((raw, parsed)) = commit {
        let accepted = match parsed {
            Err(_) => Some(false),
            Ok(c) => match state.gate.check(&c).await {
                Admission::Admitted => Some(true),
                Admission::NotInWindow { .. } => Some(false),
                Admission::Unavailable => None,
            },
        };
        body["commit_accepted"] = json!(accepted);
        if accepted == Some(false) {
            let head = state.gate.view().head_commit;
            body["remediation"] = json!(state.gate.remediation(Some(&raw), head.as_deref()));
        }
        // The gate view may have changed during a refresh-on-miss.
        body["gate"] = serde_json::to_value(state.gate.view()).unwrap_or_default();
    }
    Ok(json_response(StatusCode::OK, body, None))
}

/// What the network side tells the validator.
enum Chunk {
    Data(Bytes),
    /// The whole body arrived. Without it a closed channel means the request was dropped
    /// (client gone, shutdown), which is not the end of a valid body.
    End,
    Failed(io::Error),
}

/// Feeds the blocking validator from the async body, one chunk at a time.
struct ChannelReader {
    rx: mpsc::Receiver<Chunk>,
    cur: Bytes,
    ended: bool,
}

impl Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.cur.is_empty() {
            if self.ended {
                return Ok(0);
            }
            match self.rx.blocking_recv() {
                Some(Chunk::Data(b)) => self.cur = b,
                Some(Chunk::End) => self.ended = true,
                Some(Chunk::Failed(e)) => return Err(e),
                None => {
                    return Err(io::Error::new(
                        io::ErrorKind::ConnectionAborted,
                        "the request was dropped before its body ended",
                    ));
                }
            }
        }
        let n = buf.len().min(self.cur.len());
        buf[..n].copy_from_slice(&self.cur[..n]);
        let _ = self.cur.split_to(n);
        Ok(n)
    }
}

enum Finished {
    Outcome(CommitOutcome),
    Rejected(Rejection, bool),
}

async fn put(
    state: &Arc<AppState>,
    caller: &str,
    host: &str,
    ep: &str,
    headers: &HeaderMap,
    body_slot: &mut Option<Incoming>,
) -> Result<Resp, ApiError> {
    let go = match precheck(state, caller, host, ep, headers, Kind::Put).await? {
        Pre::Already(row) => return Ok(row_response(StatusCode::OK, "already_stored", &row)),
        Pre::Go(go) => go,
    };
    let Ok(_permit) = state.uploads.clone().try_acquire_owned() else {
        return Err(ApiError::overloaded());
    };
    let Some(mut host_slot) = state.host_slots.try_take(host, go.length) else {
        return Err(ApiError::host_overloaded(host, state.host_slots.per_host()));
    };
    state
        .metrics
        .uploads_in_flight
        .fetch_add(1, Ordering::Relaxed);
    let _in_flight = InFlight(state.clone());

    // Two chunks in flight: enough to overlap network and validation, little memory per upload.
    let (tx, rx) = mpsc::channel::<Chunk>(2);
    let store = state.store.clone();
    let limits = &state.cfg.limits;
    let expect = Expect {
        commit: Some(go.commit),
        tar_sha256: Some(go.sha.clone()),
        max_path_bytes: limits.max_path_bytes,
        max_ratio: limits.max_compression_ratio,
        ..Expect::new(ep, limits.max_uncompressed_bytes)
    };
    let (h, e) = (host.to_string(), ep.to_string());
    let (sha, commit_s, length) = (go.sha.clone(), go.commit.to_string(), go.length);
    let validator = tokio::task::spawn_blocking(move || -> io::Result<Finished> {
        let mut upload = store.begin(&h, &e, &sha, &commit_s, length)?;
        let reader = ChannelReader {
            rx,
            cur: Bytes::new(),
            ended: false,
        };
        match ingest::validate(reader, &mut upload, &expect) {
            Ok(v) => Ok(Finished::Outcome(upload.commit(&v)?)),
            Err(r) if r.is_verdict() => {
                let (status, code) = match r {
                    Rejection::TooLarge(_) | Rejection::Ratio(_) => (413, "too_large"),
                    _ => (422, "invalid_content"),
                };
                let note = QuarantineNote {
                    host_id: h.clone(),
                    episode_id: e.clone(),
                    commit: expect.commit.map(|c| c.to_string()).unwrap_or_default(),
                    http_status: status,
                    error: code.into(),
                    message: r.to_string(),
                    quarantined_at: timefmt::now_rfc3339(),
                };
                let kept = match upload.quarantine(&note) {
                    Ok(()) => true,
                    Err(err) => {
                        tracing::error!(error = %err, "failed to keep a rejected upload in quarantine");
                        false
                    }
                };
                Ok(Finished::Rejected(r, kept))
            }
            Err(r) => Ok(Finished::Rejected(r, false)),
        }
    });

    let idle = Duration::from_secs(state.cfg.limits.body_idle_timeout_s);
    let Some(mut body) = body_slot.take() else {
        return Err(ApiError::internal("request body already taken"));
    };
    let mut received: u64 = 0;
    let mut rate = RateFloor::new(state.cfg.limits.min_body_bytes_per_s);
    let mut last_frame = Instant::now();
    loop {
        let idle_deadline = last_frame + idle;
        let deadline = idle_deadline.min(Instant::now() + rate.until_next_check());
        let frame = match tokio::time::timeout_at(deadline, body.frame()).await {
            Err(_) if rate.too_slow(received) => {
                let _ = tx.send(Chunk::Failed(rate.failure())).await;
                break;
            }
            Err(_) if Instant::now() < idle_deadline => continue,
            Err(_) => {
                let _ = tx
                    .send(Chunk::Failed(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("no body bytes for {}s", idle.as_secs()),
                    )))
                    .await;
                break;
            }
            Ok(None) => {
                let _ = tx.send(Chunk::End).await;
                break;
            }
            Ok(Some(Err(e))) => {
                let _ = tx
                    .send(Chunk::Failed(io::Error::other(e.to_string())))
                    .await;
                break;
            }
            Ok(Some(Ok(f))) => {
                last_frame = Instant::now();
                f
            }
        };
        if let Ok(data) = frame.into_data() {
            received += data.len() as u64;
            host_slot.progress(data.len() as u64);
            state
                .metrics
                .body_bytes_read_total
                .fetch_add(data.len() as u64, Ordering::Relaxed);
            if rate.too_slow(received) {
                let _ = tx.send(Chunk::Failed(rate.failure())).await;
                break;
            }
            if received > go.length {
                let _ = tx
                    .send(Chunk::Failed(io::Error::other(
                        "body is longer than Content-Length",
                    )))
                    .await;
                break;
            }
            if tx.send(Chunk::Data(data)).await.is_err() {
                // The validator stopped early (a rejection); it holds the verdict.
                break;
            }
        }
    }
    drop(tx);
    let finished = validator
        .await
        .map_err(|e| ApiError::internal(format!("validator task failed: {e}")))?;
    let finished = match finished {
        Ok(f) => f,
        Err(e) if StoreUnavailable::is(&e) => return Err(store_error(e)),
        Err(e) if e.kind() == io::ErrorKind::StorageFull => {
            return Err(ApiError::insufficient_storage(format!(
                "the store is full: {e}"
            )));
        }
        Err(e) => {
            return Err(ApiError::internal(format!(
                "failed to store the upload: {e}"
            )))
        }
    };
    match finished {
        Finished::Outcome(CommitOutcome::Stored(row)) => {
            state
                .metrics
                .stored_bytes_total
                .fetch_add(row.bytes, Ordering::Relaxed);
            tracing::info!(
                event = "upload_stored",
                host = %row.host_id,
                episode = %row.episode_id,
                bytes = row.bytes,
                commit = %row.commit,
                tar_sha256 = %row.tar_sha256,
                "episode stored"
            );
            Ok(row_response(StatusCode::CREATED, "stored", &row))
        }
        Finished::Outcome(CommitOutcome::AlreadyStored(row)) => {
            Ok(row_response(StatusCode::OK, "already_stored", &row))
        }
        Finished::Outcome(CommitOutcome::Conflict(row)) => Err(ApiError::conflict(format!(
            "{host}/{ep} was stored meanwhile with tar SHA-256 {}, not {}",
            row.tar_sha256, go.sha
        ))
        .with("stored_tar_sha256", row.tar_sha256)),
        Finished::Rejected(r, kept) => {
            if kept {
                refresh_quarantine_gauge(state).await;
            }
            Err(match r {
                Rejection::Invalid(m) => ApiError::invalid_content(m),
                Rejection::TooLarge(limit) => {
                    ApiError::too_large(format!("the uncompressed episode exceeds {limit} bytes"))
                }
                Rejection::Ratio(ratio) => ApiError::too_large(format!(
                    "the body decompresses to more than {ratio} times its compressed size (limits.max_compression_ratio)"
                )),
                Rejection::Sink(e) if StoreUnavailable::is(&e) => store_error(e),
                Rejection::Sink(e) if e.kind() == io::ErrorKind::StorageFull => {
                    ApiError::insufficient_storage(format!("the store is full: {e}"))
                }
                Rejection::Sink(e) => {
                    ApiError::internal(format!("failed to write the upload: {e}"))
                }
                Rejection::Source(e) if e.kind() == io::ErrorKind::TimedOut => ApiError::new(
                    StatusCode::REQUEST_TIMEOUT,
                    "body_timeout",
                    format!("the upload stalled: {e}"),
                ),
                Rejection::Source(e) => {
                    ApiError::malformed(format!("failed to read the request body: {e}"))
                }
            })
        }
    }
}

/// `[limits] min_body_bytes_per_s` (SPEC §16): after a first minute of grace, every 60 s window
/// must bring at least a minute's worth of bytes at that rate.
struct RateFloor {
    min_per_s: u64,
    window_start: Instant,
    window_bytes: u64,
}

const RATE_WINDOW: Duration = Duration::from_secs(60);

impl RateFloor {
    fn new(min_per_s: u64) -> Self {
        RateFloor {
            min_per_s,
            // The first window opens after the grace minute.
            window_start: Instant::now() + RATE_WINDOW,
            window_bytes: 0,
        }
    }

    /// How long until the current window closes (at least a millisecond).
    fn until_next_check(&self) -> Duration {
        if self.min_per_s == 0 {
            return Duration::from_secs(86400);
        }
        (self.window_start + RATE_WINDOW)
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(1))
    }

    /// Checks the window that has closed, if any, and opens the next.
    fn too_slow(&mut self, received: u64) -> bool {
        let now = Instant::now();
        if self.min_per_s == 0 || now < self.window_start + RATE_WINDOW {
            if now < self.window_start {
                self.window_bytes = received;
            }
            return false;
        }
        let got = received - self.window_bytes;
        if got < self.min_per_s.saturating_mul(RATE_WINDOW.as_secs()) {
            return true;
        }
        self.window_start = now;
        self.window_bytes = received;
        false
    }

    fn failure(&self) -> io::Error {
        io::Error::new(
            io::ErrorKind::TimedOut,
            format!(
                "the body arrived slower than {} bytes/s over {}s (limits.min_body_bytes_per_s)",
                self.min_per_s,
                RATE_WINDOW.as_secs()
            ),
        )
    }
}

async fn refresh_quarantine_gauge(state: &Arc<AppState>) {
    let held = match &state.store {
        // The S3 quarantine applied its retention when it kept the upload.
        Store::S3(s) => Some(s.quarantine_bytes()),
        Store::Fs(_) => state.store.clean_quarantine().await.ok(),
    };
    if let Some(q) = held {
        state.metrics.quarantine_bytes.store(q, Ordering::Relaxed);
    }
}

fn store_error(e: impl std::fmt::Display) -> ApiError {
    ApiError::store_unavailable(e.to_string())
}

struct InFlight(Arc<AppState>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0
            .metrics
            .uploads_in_flight
            .fetch_sub(1, Ordering::Relaxed);
    }
}
