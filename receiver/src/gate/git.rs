//! Local git source: the last `window` commits of `branch`, read in-process with gix (no `git`
//! subprocess), newest first by commit time as `git log` lists them.

use std::path::{Path, PathBuf};

use cis490_common::Commit;

#[derive(Debug, thiserror::Error)]
pub enum GitError {
    #[error("failed to open git repository {path}: {detail}")]
    Open { path: PathBuf, detail: String },
    #[error("branch {branch:?} not found in {path}: {detail}")]
    Branch {
        path: PathBuf,
        branch: String,
        detail: String,
    },
    #[error("failed to walk history of {branch:?} in {path}: {detail}")]
    Walk {
        path: PathBuf,
        branch: String,
        detail: String,
    },
    #[error("commit id of unexpected length in {path}")]
    HashKind { path: PathBuf },
}

/// The default repository when `repo_path` is unset: the install root, if it holds one.
pub const DEFAULT_REPO: &str = "/opt/cis490";

/// Resolves the configured repository path; `None` when unset and the default holds no repo.
pub fn resolve_repo(configured: Option<&Path>) -> Option<PathBuf> {
    match configured {
        Some(p) => Some(p.to_path_buf()),
        None => {
            let d = Path::new(DEFAULT_REPO);
            (d.join(".git").exists() || d.join("HEAD").exists()).then(|| d.to_path_buf())
        }
    }
}

/// Lists up to `window` commits reachable from `branch`, newest first.
pub fn list_commits(
    repo_path: &Path,
    branch: &str,
    window: usize,
) -> Result<Vec<Commit>, GitError> {
    // Isolated: the receiver's own environment and global git config must not change the answer.
    let repo =
        gix::open_opts(repo_path, gix::open::Options::isolated()).map_err(|e| GitError::Open {
            path: repo_path.to_path_buf(),
            detail: e.to_string(),
        })?;
    let branch_err = |detail: String| GitError::Branch {
        path: repo_path.to_path_buf(),
        branch: branch.to_string(),
        detail,
    };
    let mut reference = repo
        .find_reference(branch)
        .map_err(|e| branch_err(e.to_string()))?;
    let tip = reference
        .peel_to_commit()
        .map_err(|e| branch_err(e.to_string()))?
        .id;
    let walk_err = |detail: String| GitError::Walk {
        path: repo_path.to_path_buf(),
        branch: branch.to_string(),
        detail,
    };
    let walk = repo
        .rev_walk([tip])
        .sorting(gix::revision::walk::Sorting::ByCommitTime(
            gix::traverse::commit::simple::CommitTimeOrder::NewestFirst,
        ))
        .all()
        .map_err(|e| walk_err(e.to_string()))?;
    let mut out = Vec::with_capacity(window);
    for info in walk.take(window) {
        let info = info.map_err(|e| walk_err(e.to_string()))?;
        let bytes: [u8; 20] = info
            .id
            .as_bytes()
            .try_into()
            .map_err(|_| GitError::HashKind {
                path: repo_path.to_path_buf(),
            })?;
        out.push(Commit::from_bytes(bytes));
    }
    Ok(out)
}
