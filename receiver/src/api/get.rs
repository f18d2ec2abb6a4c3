//! `GET /v1/episodes/{host}/{episode}`: the stored row of one of the caller's episodes.

use http::StatusCode;

use crate::error::ApiError;
use crate::state::AppState;

use super::{json_response, own_episode, Resp};

pub(super) async fn get(
    state: &AppState,
    caller: &str,
    host: &str,
    episode: &str,
) -> Result<Resp, ApiError> {
    let (host, episode) = own_episode(caller, host, episode)?;
    match state.store.find(host, episode).await? {
        Some(row) => Ok(json_response(
            StatusCode::OK,
            serde_json::to_value(&row).map_err(|e| ApiError::Internal(e.to_string()))?,
            None,
        )),
        None => Err(ApiError::NotStored {
            host: host.into(),
            episode: episode.into(),
        }),
    }
}
