//! `POST /v1/ping`: who the receiver thinks the caller is, and whether its commit would pass.

use http::{HeaderMap, StatusCode};
use serde_json::json;

use cis490_common::{headers, Commit};

use crate::error::ApiError;
use crate::gate::Admission;
use crate::state::AppState;

use super::{header_str, json_response, Resp, RECEIVER_VERSION};

pub(super) async fn ping(
    state: &AppState,
    caller: &str,
    headers: &HeaderMap,
) -> Result<Resp, ApiError> {
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
