//! The API of SPEC §3: the route is parsed once here, then each endpoint has its file. Every
//! answer that needs no body is given before the body is polled, so a client that sent
//! `Expect: 100-continue` uploads nothing when it is refused.

mod admission;
mod body;
mod check;
mod get;
mod ping;
mod put;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use serde_json::json;

use cis490_common::{validate_id, Commit, ErrorCode};

use crate::error::ApiError;
use crate::fleet::{Answer, Upload};
use crate::state::AppState;
use crate::store::IndexRow;

pub use put::BodySpan;

/// Every header check a `check` (with `check = true`) or a PUT makes before it needs the
/// receiver's state: the commit's syntax, the tar hash, the content type, and the body's
/// length headers (`X-Cis490-Upload-Length` for a `check`, Content-Length, Content-Range and
/// the resume prefix hash for a PUT). Run by the fuzz targets through [`crate::fuzzing`]; the
/// endpoints make the same calls in the same order.
pub(crate) fn stateless_upload_headers(
    headers: &HeaderMap,
    check: bool,
) -> Result<(Commit, String, Option<BodySpan>, Option<u64>), ApiError> {
    let commit = match header_str(headers, cis490_common::headers::CODE_COMMIT)? {
        None | Some("") => {
            return Err(ApiError::Malformed(
                "the X-Cis490-Code-Commit header is required".into(),
            ))
        }
        Some(s) => Commit::parse(s).map_err(|e| ApiError::Malformed(e.to_string()))?,
    };
    let tar_sha256 = admission::tar_sha256_and_type(headers)?;
    if check {
        let length = parse_len(headers, cis490_common::headers::UPLOAD_LENGTH)?;
        Ok((commit, tar_sha256, None, length))
    } else {
        Ok((commit, tar_sha256, Some(put::body_span(headers)?), None))
    }
}

pub(crate) const RECEIVER_VERSION: &str = env!("CARGO_PKG_VERSION");

pub(crate) type Resp = Response<Full<Bytes>>;

/// Who is calling, from the client certificate of the connection.
#[derive(Debug)]
pub(crate) struct Caller {
    /// The certificate's identity (first DNS SAN, else CN): the caller's `host_id`.
    pub(crate) host: String,
    /// When that certificate expires, for the fleet view (SPEC §14).
    pub(crate) cert_not_after: Option<std::time::SystemTime>,
}

/// Where a request goes, decided from its path alone.
#[derive(Clone, Copy)]
enum Route<'a> {
    Episode { host: &'a str, episode: &'a str },
    Check { host: &'a str, episode: &'a str },
    Ping,
}

impl<'a> Route<'a> {
    fn parse(path: &'a str) -> Option<Route<'a>> {
        if path == "/v1/ping" {
            return Some(Route::Ping);
        }
        let rest = path.strip_prefix("/v1/episodes/")?;
        let parts: Vec<&str> = rest.split('/').collect();
        match parts.as_slice() {
            [host, episode] => Some(Route::Episode { host, episode }),
            [host, episode, "check"] => Some(Route::Check { host, episode }),
            _ => None,
        }
    }

    /// The (host, episode) the path names, for the refusal log.
    fn names(self) -> (&'a str, &'a str) {
        match self {
            Route::Episode { host, episode } | Route::Check { host, episode } => (host, episode),
            Route::Ping => ("", ""),
        }
    }
}

/// One request on the API listener, from routing to the logged and counted answer.
pub(crate) async fn handle(
    state: Arc<AppState>,
    caller: Arc<Option<Caller>>,
    req: Request<Incoming>,
) -> Resp {
    let (parts, body) = req.into_parts();
    let path = parts.uri.path();
    let route = Route::parse(path);
    let upload = match (route, &parts.method) {
        (Some(Route::Episode { .. }), &Method::PUT) => Some(Upload::Put),
        (Some(Route::Check { .. }), &Method::POST) => Some(Upload::Check),
        _ => None,
    };
    let is_put = upload == Some(Upload::Put);
    let caller = caller.as_ref().as_ref();
    let identity = caller.map(|c| c.host.as_str());
    let mut body = Some(body);
    let result = dispatch(&state, identity, route, &parts, &mut body).await;
    let refusal = result.as_ref().err().map(ApiError::code);
    if let Some(unread) = body {
        linger(&parts.headers, unread);
    }
    let resp = match result {
        Ok(r) => r,
        Err(e) => {
            if is_put || e.status().is_server_error() {
                let (host, episode) = route.map(Route::names).unwrap_or_default();
                tracing::warn!(
                    event = "upload_rejected",
                    episode = %episode,
                    host = %host,
                    path = %path,
                    status = e.status().as_u16(),
                    reason = e.code().as_str(),
                    message = %e.message(),
                    "request refused"
                );
            }
            error_response(&e)
        }
    };
    if is_put {
        state.metrics.count_upload(resp.status().as_u16());
    }
    if let Some(c) = caller {
        record(
            &state,
            c,
            &parts.headers,
            route,
            upload,
            resp.status(),
            refusal,
        );
    }
    resp
}

/// What the fleet view learns from one answered request of a host.
fn record(
    state: &AppState,
    caller: &Caller,
    headers: &HeaderMap,
    route: Option<Route<'_>>,
    upload: Option<Upload>,
    status: StatusCode,
    refusal: Option<ErrorCode>,
) {
    let answer = match (upload, route) {
        (Some(kind), Some(route)) => Some(Answer {
            upload: kind,
            status: status.as_u16(),
            code: refusal,
            episode: route.names().1,
            commit: headers
                .get(cis490_common::headers::CODE_COMMIT)
                .and_then(|v| v.to_str().ok()),
        }),
        _ => None,
    };
    state
        .fleet
        .request(&caller.host, headers, caller.cert_not_after, answer);
}

async fn dispatch(
    state: &Arc<AppState>,
    identity: Option<&str>,
    route: Option<Route<'_>>,
    req: &http::request::Parts,
    body: &mut Option<Incoming>,
) -> Result<Resp, ApiError> {
    let path = req.uri.path();
    let Some(route) = route else {
        return Err(ApiError::NoSuchEndpoint { path: path.into() });
    };
    let caller = identity.ok_or(ApiError::AnonymousCertificate)?;
    authorize(state, caller, &req.headers)?;
    match (route, &req.method) {
        (Route::Ping, &Method::POST) => ping::ping(state, caller, &req.headers).await,
        (Route::Episode { host, episode }, &Method::GET) => {
            get::get(state, caller, host, episode).await
        }
        (Route::Episode { host, episode }, &Method::PUT) => {
            put::put(state, caller, host, episode, &req.headers, body).await
        }
        (Route::Check { host, episode }, &Method::POST) => {
            check::check(state, caller, host, episode, &req.headers).await
        }
        (_, m) => Err(ApiError::MethodNotAllowed {
            method: m.to_string(),
            path: path.into(),
        }),
    }
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
    let mut resp = json_response(e.status(), e.body(), e.retry_after());
    if let Some(n) = e.resume_offset() {
        resp.headers_mut()
            .insert(cis490_common::headers::RESUME_OFFSET, n.into());
    }
    resp
}

/// What the stored row of an id says, as `stored` (201) or `already_stored` (200).
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

fn already_stored(row: &IndexRow) -> Resp {
    row_response(StatusCode::OK, "already_stored", row)
}

/// `[auth]` bearer tokens, when configured, on top of the client certificate.
fn authorize(state: &AppState, caller: &str, headers: &HeaderMap) -> Result<(), ApiError> {
    let tokens = state.tokens.load();
    if let Some(t) = tokens.as_ref() {
        let auth = headers
            .get(http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok());
        t.verify(caller, auth)
            .map_err(|m| ApiError::Unauthorized(m.into()))?;
    }
    Ok(())
}

/// The path's ids are valid and the host is the caller's own.
fn own_episode<'a>(
    caller: &str,
    host: &'a str,
    episode: &'a str,
) -> Result<(&'a str, &'a str), ApiError> {
    let invalid = |field: &'static str, given: &str, why: String| ApiError::InvalidId {
        field,
        given: given.into(),
        why,
    };
    validate_id(host).map_err(|e| invalid("host_id", host, e.to_string()))?;
    validate_id(episode).map_err(|e| invalid("episode_id", episode, e.to_string()))?;
    if caller != host {
        return Err(ApiError::WrongHost {
            caller: caller.into(),
            host: host.into(),
        });
    }
    Ok((host, episode))
}

fn header_str<'a>(headers: &'a HeaderMap, name: &str) -> Result<Option<&'a str>, ApiError> {
    match headers.get(name) {
        None => Ok(None),
        Some(v) => v
            .to_str()
            .map(|s| Some(s.trim()))
            .map_err(|_| ApiError::Malformed(format!("header {name} is not ASCII"))),
    }
}

fn parse_len(headers: &HeaderMap, name: &str) -> Result<Option<u64>, ApiError> {
    match header_str(headers, name)? {
        None => Ok(None),
        Some(s) => s.parse::<u64>().map(Some).map_err(|_| {
            ApiError::Malformed(format!(
                "header {name} must be a non-negative integer, got {s:?}"
            ))
        }),
    }
}
