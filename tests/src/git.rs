//! Real git repositories driven with the `git` CLI.

use std::path::{Path, PathBuf};
use std::process::Command;

pub struct GitRepo {
    pub path: PathBuf,
    n: u32,
}

pub fn git(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(args)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env("GIT_AUTHOR_NAME", "cis490 test")
        .env("GIT_AUTHOR_EMAIL", "test@cis490.invalid")
        .env("GIT_COMMITTER_NAME", "cis490 test")
        .env("GIT_COMMITTER_EMAIL", "test@cis490.invalid")
        .output()
        .expect("git runs");
    assert!(
        out.status.success(),
        "git {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

impl GitRepo {
    pub fn init(path: &Path) -> GitRepo {
        std::fs::create_dir_all(path).unwrap();
        git(path, &["init", "-q", "-b", "main"]);
        GitRepo {
            path: path.to_path_buf(),
            n: 0,
        }
    }

    /// Adds an empty commit dated `n` minutes after a fixed epoch; returns its id.
    pub fn commit(&mut self) -> String {
        self.n += 1;
        let date = format!("{} +0000", 1_700_000_000 + u64::from(self.n) * 60);
        let out = Command::new("git")
            .arg("-C")
            .arg(&self.path)
            .args(["commit", "-q", "--allow-empty", "-m"])
            .arg(format!("change {}", self.n))
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .env("GIT_CONFIG_GLOBAL", "/dev/null")
            .env("GIT_AUTHOR_NAME", "cis490 test")
            .env("GIT_AUTHOR_EMAIL", "test@cis490.invalid")
            .env("GIT_COMMITTER_NAME", "cis490 test")
            .env("GIT_COMMITTER_EMAIL", "test@cis490.invalid")
            .env("GIT_AUTHOR_DATE", &date)
            .env("GIT_COMMITTER_DATE", &date)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        self.head()
    }

    pub fn head(&self) -> String {
        git(&self.path, &["rev-parse", "HEAD"])
    }

    /// `git log --format=%H -n <n> main`.
    pub fn log(&self, n: usize) -> Vec<String> {
        git(
            &self.path,
            &["log", "--format=%H", "-n", &n.to_string(), "main"],
        )
        .lines()
        .map(str::to_string)
        .collect()
    }
}
