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
    // Rebuilt when HEAD moves or the index changes (a commit, a checkout, an add).
    for f in [
        ".git/HEAD",
        ".git/index",
        ".git/packed-refs",
        ".git/refs/heads",
    ] {
        let p = root.join(f);
        if p.exists() {
            println!("cargo:rerun-if-changed={}", p.display());
        }
    }
    println!("cargo:rerun-if-changed=build.rs");
}
