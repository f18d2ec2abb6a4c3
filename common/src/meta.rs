//! Reading the commit out of an episode's `meta.json` (`code_version.commit`).

use crate::ids::{Commit, CommitError};

/// Upper bound on a `meta.json` the daemons will parse; episodes carry their bulk elsewhere.
pub const MAX_META_BYTES: u64 = 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum MetaError {
    #[error("meta.json is not valid JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("meta.json has no code_version.commit string")]
    NoCommit,
    #[error("meta.json code_version.commit is malformed: {0}")]
    BadCommit(#[from] CommitError),
    #[error("meta.json is larger than {MAX_META_BYTES} bytes")]
    TooLarge,
}

/// Parses `meta.json` bytes and returns `code_version.commit`.
pub fn commit_from_meta(bytes: &[u8]) -> Result<Commit, MetaError> {
    if bytes.len() as u64 > MAX_META_BYTES {
        return Err(MetaError::TooLarge);
    }
    let v: serde_json::Value = serde_json::from_slice(bytes)?;
    let s = v
        .get("code_version")
        .and_then(|cv| cv.get("commit"))
        .and_then(|c| c.as_str())
        .ok_or(MetaError::NoCommit)?;
    Ok(Commit::parse(s)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_commit() {
        let c = "0123456789abcdef0123456789abcdef01234567";
        let m = format!(r#"{{"episode_id":"e1","code_version":{{"commit":"{c}"}}}}"#);
        assert_eq!(commit_from_meta(m.as_bytes()).unwrap().to_string(), c);
    }

    #[test]
    fn rejects_missing_or_bad_commits() {
        assert!(matches!(
            commit_from_meta(br#"{"episode_id":"e1"}"#),
            Err(MetaError::NoCommit)
        ));
        assert!(matches!(
            commit_from_meta(br#"{"code_version":{"commit":42}}"#),
            Err(MetaError::NoCommit)
        ));
        assert!(matches!(
            commit_from_meta(br#"{"code_version":{"commit":"abc"}}"#),
            Err(MetaError::BadCommit(_))
        ));
        assert!(matches!(commit_from_meta(b"{"), Err(MetaError::Json(_))));
    }
}
