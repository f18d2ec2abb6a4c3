//! Records the git commit the binaries are built from (and whether the tree had uncommitted
//! changes) for `--version`. Without git or outside a checkout (a source package) it is
//! "unknown commit".

use std::path::Path;
use std::process::Command;

fn git(root: &Path, args: &[&str]) -> Option<String> {
    let out = Command::new("git")
        .arg("-C")
        .arg(root)
        .args(args)
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn main() {
    let manifest = std::env::var("CARGO_MANIFEST_DIR").unwrap_or_else(|_| ".".into());
    let root = Path::new(&manifest).parent().unwrap_or(Path::new("."));
    let commit = git(root, &["rev-parse", "HEAD"]).filter(|c| c.len() == 40);
    let described = match commit {
        Some(c) => {
            let dirty = git(root, &["status", "--porcelain", "--untracked-files=no"])
                .is_some_and(|s| !s.is_empty());
            if dirty {
                format!("commit {c}, dirty")
            } else {
                format!("commit {c}")
            }
        }
        None => "unknown commit".to_string(),
    };
    println!("cargo:rustc-env=CIS490_BUILD_COMMIT={described}");
    // Rebuilt when HEAD moves or the index changes (a commit, a checkout, an add). In a linked
    // worktree `.git` is a file: HEAD and the index live in the worktree's own git directory,
    // the branches in the common one, so both are asked of git rather than assumed.
    let abs = |d: String| {
        let p = Path::new(&d).to_path_buf();
        if p.is_absolute() {
            p
        } else {
            root.join(p)
        }
    };
    let git_dir = git(root, &["rev-parse", "--git-dir"]).map(abs);
    let common_dir = git(root, &["rev-parse", "--git-common-dir"]).map(abs);
    let watched = [
        (&git_dir, "HEAD"),
        (&git_dir, "index"),
        (&common_dir, "packed-refs"),
        (&common_dir, "refs/heads"),
    ];
    for (dir, f) in watched {
        if let Some(p) = dir.as_ref().map(|d| d.join(f)).filter(|p| p.exists()) {
            println!("cargo:rerun-if-changed={}", p.display());
        }
    }
    println!("cargo:rerun-if-changed=build.rs");
}
