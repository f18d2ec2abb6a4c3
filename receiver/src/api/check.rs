//! `POST /v1/episodes/{host}/{episode}/check`: the `PUT`'s admission without a body (SPEC §3).

use http::{HeaderMap, StatusCode};
use http_body_util::Full;
use hyper::Response;

use cis490_common::headers;

use crate::error::ApiError;
use crate::state::AppState;

use crate::store::resume::{ResumeKey, MIN_KEPT};

use super::admission::{admit, declared, Declared, Verdict};
use super::{already_stored, parse_len, Resp};

pub(super) async fn check(
    state: &AppState,
    caller: &str,
    host: &str,
    episode: &str,
    headers: &HeaderMap,
) -> Result<Resp, ApiError> {
    let d = declared(state, caller, host, episode, headers)?;
    let length = parse_len(headers, headers::UPLOAD_LENGTH)?;
    // What is held of this body needs no more room on disk.
    let offset = resume_offset(state, &d, length).await;
    Ok(match admit(state, &d, length, offset).await? {
        Verdict::Go => {
            let mut b = Response::builder().status(StatusCode::NO_CONTENT);
            if offset > 0 {
                b = b.header(headers::RESUME_OFFSET, offset);
            }
            // Invariant: a status and a numeric header value cannot make the builder fail.
            b.body(Full::default()).unwrap_or_default()
        }
        Verdict::Stored(row) => already_stored(&row),
    })
}

/// How much of this body the receiver holds from an interrupted upload (SPEC §13): where the
/// `PUT` may start. Known only with the body's length.
async fn resume_offset(state: &AppState, d: &Declared<'_>, length: Option<u64>) -> u64 {
    if let (crate::store::Store::S3(s3), Some(length)) = (&state.store, length) {
        return s3.offered(d.host, d.episode, &d.tar_sha256, length).await;
    }
    let (Some(resumes), Some(length)) = (state.store.resumes(), length) else {
        return 0;
    };
    if length <= MIN_KEPT || !resumes.enabled() {
        return 0;
    }
    let key = ResumeKey {
        host: d.host.to_string(),
        episode: d.episode.to_string(),
        tar_sha256: d.tar_sha256.clone(),
        length,
    };
    let resumes = resumes.clone();
    tokio::task::spawn_blocking(move || resumes.offered(&key))
        .await
        .unwrap_or(0)
}
