//! The commit gate against real git repositories and a Forgejo stand-in.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use cis490_common::Commit;
use cis490_receiver::config::{ForgejoConfig, GateConfig};
use cis490_receiver::gate::{git, Admission, Gate};
use cis490_tests::episode;
use cis490_tests::forgejo::{Mode, StandIn};
use cis490_tests::git::{git as run_git, GitRepo};
use cis490_tests::harness::World;

use crate::support::start;

fn gix_list(path: &Path, n: usize) -> Vec<String> {
    git::list_commits(path, "main", n)
        .unwrap()
        .iter()
        .map(|c| c.to_string())
        .collect()
}

fn git_log(path: &Path, n: usize) -> Vec<String> {
    run_git(path, &["log", "--format=%H", "-n", &n.to_string(), "main"])
        .lines()
        .map(str::to_string)
        .collect()
}

/// Commits with the same committer date, a merge, and a side branch.
fn tricky_repo(path: &Path) -> GitRepo {
    let mut r = GitRepo::init(path);
    for _ in 0..5 {
        r.commit();
    }
    let same = "1700099999 +0000";
    for i in 0..4 {
        let out = std::process::Command::new("git")
            .arg("-C")
            .arg(path)
            .args([
                "-c",
                "user.name=t",
                "-c",
                "user.email=t@x",
                "commit",
                "-q",
                "--allow-empty",
                "-m",
            ])
            .arg(format!("same-time {i}"))
            .env("GIT_AUTHOR_DATE", same)
            .env("GIT_COMMITTER_DATE", same)
            .output()
            .unwrap();
        assert!(out.status.success());
    }
    run_git(path, &["checkout", "-q", "-b", "side", "HEAD~2"]);
    for _ in 0..3 {
        r.commit();
    }
    run_git(path, &["checkout", "-q", "main"]);
    r.commit();
    run_git(
        path,
        &[
            "-c",
            "user.name=t",
            "-c",
            "user.email=t@x",
            "merge",
            "-q",
            "--no-ff",
            "-m",
            "merge side",
            "side",
        ],
    );
    r.commit();
    r
}

#[test]
fn gix_lists_exactly_what_git_log_lists() {
    let t = tempfile::tempdir().unwrap();
    // Linear.
    let mut lin = GitRepo::init(&t.path().join("linear"));
    for _ in 0..130 {
        lin.commit();
    }
    assert_eq!(gix_list(&lin.path, 100), git_log(&lin.path, 100));
    assert_eq!(
        gix_list(&lin.path, 1000).len(),
        130,
        "short history: all of it"
    );
    // Merges and identical timestamps.
    let tricky = tricky_repo(&t.path().join("tricky"));
    assert_eq!(gix_list(&tricky.path, 100), git_log(&tricky.path, 100));
    assert_eq!(gix_list(&tricky.path, 7), git_log(&tricky.path, 7));
    // The .git directory itself, and a bare clone with packed refs.
    assert_eq!(
        gix_list(&tricky.path.join(".git"), 100),
        git_log(&tricky.path, 100)
    );
    let bare = t.path().join("bare.git");
    run_git(
        t.path(),
        &[
            "clone",
            "-q",
            "--bare",
            tricky.path.to_str().unwrap(),
            bare.to_str().unwrap(),
        ],
    );
    assert!(bare.join("packed-refs").exists() || bare.join("refs/heads/main").exists());
    assert_eq!(gix_list(&bare, 100), git_log(&bare, 100));
    // After gc: everything packed, with a commit-graph.
    run_git(&lin.path, &["gc", "-q", "--aggressive"]);
    run_git(&lin.path, &["commit-graph", "write", "--reachable"]);
    assert!(
        lin.path.join(".git/objects/info/commit-graph").exists()
            || lin.path.join(".git/objects/info/commit-graphs").exists()
    );
    assert_eq!(gix_list(&lin.path, 100), git_log(&lin.path, 100));
    // Errors name the repository and the branch.
    let e = git::list_commits(&t.path().join("nope"), "main", 5)
        .unwrap_err()
        .to_string();
    assert!(e.contains("nope"), "{e}");
    let e = git::list_commits(&lin.path, "no-such-branch", 5)
        .unwrap_err()
        .to_string();
    assert!(e.contains("no-such-branch"), "{e}");
}

fn gate_cfg(repo: Option<&Path>, forgejo: Option<&StandIn>, token: Option<&Path>) -> GateConfig {
    GateConfig {
        window: 100,
        refresh_interval_s: 1,
        repo_path: repo.map(Path::to_path_buf),
        forgejo: forgejo.map(|f| ForgejoConfig {
            base_url: f.base_url(),
            owner: "lab".into(),
            repo: "code".into(),
            token_file: token.map(Path::to_path_buf),
            ca_file: None,
            // The stand-in speaks plain HTTP on 127.0.0.1.
            allow_insecure_http: true,
        }),
        ..GateConfig::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forgejo_first_then_git_fallback_then_last_good_list() {
    let t = tempfile::tempdir().unwrap();
    let mut repo = GitRepo::init(&t.path().join("repo"));
    for _ in 0..130 {
        repo.commit();
    }
    let log = git_log(&repo.path, 1000);
    let f = StandIn::start(log.clone()).await;
    let token = t.path().join("token");
    std::fs::write(&token, "s3cret\n").unwrap();
    let gate = Gate::new(gate_cfg(Some(&repo.path), Some(&f), Some(&token))).unwrap();

    gate.refresh().await.unwrap();
    let v = gate.view();
    assert_eq!(v.source, Some("forgejo"));
    assert_eq!(v.commits, 100);
    assert_eq!(v.head_commit.as_deref(), Some(log[0].as_str()));
    let snap = gate.snapshot().unwrap();
    let listed: Vec<String> = snap.commits.iter().map(|c| c.to_string()).collect();
    assert_eq!(listed, log[..100].to_vec(), "paged list equals git log");
    let reqs = f.requests();
    assert_eq!(reqs.len(), 2, "two pages of 50: {reqs:?}");
    assert!(reqs[1].0.starts_with("/api/v1/repos/lab/code/commits?sha=main&limit=50&page=2&stat=false&verification=false&files=false"), "{reqs:?}");
    assert_eq!(reqs[0].1.as_deref(), Some("token s3cret"));

    for (mode, name) in [
        (Mode::Fail, "500"),
        (Mode::Empty, "[]"),
        (Mode::Garbage, "garbage"),
        (Mode::Hang, "hang"),
    ] {
        f.set_mode(mode);
        gate.refresh().await.unwrap();
        assert_eq!(gate.view().source, Some("git-fallback"), "{name}");
        assert_eq!(gate.view().commits, 100);
        f.set_mode(Mode::Ok);
        gate.refresh().await.unwrap();
        assert_eq!(gate.view().source, Some("forgejo"), "back after {name}");
    }

    // Everything down: the last good list stays, the failure is recorded, age grows.
    f.set_mode(Mode::Fail);
    std::fs::rename(&repo.path, t.path().join("moved")).unwrap();
    let failures = gate
        .refresh_failures
        .load(std::sync::atomic::Ordering::Relaxed);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert!(gate.refresh().await.is_err());
    let v = gate.view();
    assert_eq!(v.commits, 100, "last good list kept");
    assert_eq!(v.source, Some("forgejo"));
    assert!(v.age_s.unwrap() >= 1);
    let err = v.last_error.unwrap();
    assert!(err.contains("500"), "{err}");
    assert!(err.contains(repo.path.to_str().unwrap()), "{err}");
    assert_eq!(
        gate.refresh_failures
            .load(std::sync::atomic::Ordering::Relaxed),
        failures + 1
    );
    let head = Commit::parse(&log[0]).unwrap();
    assert_eq!(
        gate.check_now(&head),
        Admission::Admitted,
        "still admitting from the last good list"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_pushed_to_forgejo_a_moment_ago_is_admitted() {
    let w = World::new(3);
    let f = StandIn::start(git_log(&w.repo.path, 100)).await;
    let r = start(&w, &format!(
        "[version_gate]\nrefresh_interval_s = 60\n[version_gate.forgejo]\nbase_url = \"{}\"\nowner = \"lab\"\nrepo = \"code\"\n",
        f.base_url()
    ))
    .await;
    let c = w.client(r.addr, "labhost-01");
    let p = c.request("POST", "/v1/ping", &[], vec![]).await.unwrap();
    assert_eq!(
        p.json()["gate"]["source"],
        "forgejo",
        "only forgejo configured"
    );
    let mut repo = GitRepo::init(&w.path().join("newer"));
    let fresh = repo.commit();
    let mut list = vec![fresh.clone()];
    list.extend(git_log(&w.repo.path, 100));
    f.set_commits(list);
    let b = episode::body(&w.path().join("src"), "ep-fresh", &fresh, 100);
    let reply = c.put("labhost-01", &b).await;
    assert_eq!(reply.status, 201, "{:?}", reply.json());
    let gone = episode::body(&w.path().join("src"), "ep-unknown", &"e".repeat(40), 100);
    let t = std::time::Instant::now();
    assert_eq!(c.put("labhost-01", &gone).await.status, 412);
    assert!(
        t.elapsed() < Duration::from_secs(4),
        "refresh-on-miss is bounded: {:?}",
        t.elapsed()
    );
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_checks_during_refreshes_agree() {
    let t = tempfile::tempdir().unwrap();
    let mut repo = GitRepo::init(&t.path().join("repo"));
    for _ in 0..50 {
        repo.commit();
    }
    let known: Vec<Commit> = git_log(&repo.path, 50)
        .iter()
        .map(|c| Commit::parse(c).unwrap())
        .collect();
    let gate = Arc::new(Gate::new(gate_cfg(Some(&repo.path), None, None)).unwrap());
    gate.refresh().await.unwrap();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let refresher = {
        let (g, s) = (gate.clone(), stop.clone());
        tokio::spawn(async move {
            let mut n = 0;
            while !s.load(std::sync::atomic::Ordering::Relaxed) {
                g.refresh().await.unwrap();
                n += 1;
            }
            n
        })
    };
    let mut tasks = Vec::new();
    for k in 0..8u8 {
        let (g, known) = (gate.clone(), known.clone());
        tasks.push(tokio::spawn(async move {
            let unknown = Commit::from_bytes([k; 20]);
            for i in 0..2000 {
                assert_eq!(g.check_now(&known[i % known.len()]), Admission::Admitted);
                assert!(matches!(
                    g.check_now(&unknown),
                    Admission::NotInWindow { .. }
                ));
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    assert!(refresher.await.unwrap() >= 1);
}

#[test]
fn an_unreadable_forgejo_token_is_a_config_error() {
    let w = World::new(1);
    let cfg = w.config(&format!(
        "[version_gate]\nrepo_path = \"{}\"\n[version_gate.forgejo]\nbase_url = \"https://127.0.0.1:9\"\nowner = \"o\"\nrepo = \"r\"\ntoken_file = \"/nonexistent/token\"\n",
        w.repo.path.display()
    ));
    let (code, err) = cis490_tests::harness::receiver_check_config(&cfg);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("version_gate.forgejo.token_file"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_change_of_source_is_logged_once() {
    let w = World::new(3);
    let f = StandIn::start(git_log(&w.repo.path, 100)).await;
    let cfg = w.config(&format!(
        "[version_gate]\nrepo_path = \"{}\"\nrefresh_interval_s = 1\n[version_gate.forgejo]\nbase_url = \"{}\"\nowner = \"lab\"\nrepo = \"code\"\n",
        w.repo.path.display(),
        f.base_url()
    ));
    let p = cis490_tests::harness::Process::start(&cfg, &[]);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    f.set_mode(Mode::Fail);
    tokio::time::sleep(Duration::from_millis(3500)).await;
    f.set_mode(Mode::Ok);
    tokio::time::sleep(Duration::from_millis(3500)).await;
    let log = p.log_text();
    let changes: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("gate_source_changed"))
        .collect();
    assert_eq!(changes.len(), 2, "{changes:#?}");
    assert!(changes[0].contains("WARN"), "{}", changes[0]);
    assert!(
        changes[0].contains("to=\"git-fallback\"") || changes[0].contains("to=git-fallback"),
        "{}",
        changes[0]
    );
    assert!(
        changes[1].contains("to=\"forgejo\"") || changes[1].contains("to=forgejo"),
        "{}",
        changes[1]
    );
    assert!(
        log.lines()
            .filter(|l| l.contains("gate_refresh_failed"))
            .count()
            == 0,
        "git answered each time"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forgejo_that_caps_its_page_size_is_still_paged_to_the_window() {
    let t = tempfile::tempdir().unwrap();
    let mut repo = GitRepo::init(&t.path().join("repo"));
    for _ in 0..120 {
        repo.commit();
    }
    let log = git_log(&repo.path, 1000);
    let f = StandIn::start(log.clone()).await;
    f.set_max_page(30);
    let gate = Gate::new(gate_cfg(None, Some(&f), None)).unwrap();
    gate.refresh().await.unwrap();
    let listed: Vec<String> = gate
        .snapshot()
        .unwrap()
        .commits
        .iter()
        .map(|c| c.to_string())
        .collect();
    assert_eq!(
        listed,
        log[..100].to_vec(),
        "pages of 30 are followed until the window is full"
    );
    assert_eq!(f.requests().len(), 4);
}
