//! `POST /v1/episodes/{host}/{episode}/check`: the `PUT`'s admission without a body (SPEC §3).

use http::{HeaderMap, StatusCode};
use http_body_util::Full;
use hyper::Response;

use cis490_common::headers;

use crate::error::ApiError;
use crate::state::AppState;

use super::admission::{admit, declared, Verdict};
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
    Ok(match admit(state, &d, length).await? {
        Verdict::Go => Response::builder()
            .status(StatusCode::NO_CONTENT)
            .body(Full::default())
            .unwrap_or_default(),
        Verdict::Stored(row) => already_stored(&row),
    })
}
