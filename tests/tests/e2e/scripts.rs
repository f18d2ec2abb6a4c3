//! The install scripts (run for real under --root) and the smoke test.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use cis490_tests::episode;
use cis490_tests::harness::{bin, World};

use crate::support::start;

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// A directory holding the daemons under their installed names.
fn bin_dir(t: &Path) -> PathBuf {
    let d = t.join("prebuilt");
    std::fs::create_dir_all(&d).unwrap();
    for (src, name) in [
        ("e2e-shipper", "cis490-shipper"),
        ("e2e-receiver", "cis490-receiver"),
    ] {
        std::fs::copy(bin(src), d.join(name)).unwrap();
    }
    d
}

fn script(path: &Path, args: &[&str]) -> (i32, String) {
    let out = Command::new("bash").arg(path).args(args).output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), text)
}

/// Every file under `root` with its size and mtime, to prove a run changed nothing.
fn snapshot(root: &Path) -> BTreeMap<PathBuf, (u64, std::time::SystemTime)> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let md = std::fs::symlink_metadata(e.path()).unwrap();
            if md.is_dir() {
                stack.push(e.path());
            }
            out.insert(e.path(), (md.len(), md.modified().unwrap()));
        }
    }
    out
}

#[test]
fn install_scripts_are_idempotent_and_keep_existing_config() {
    let t = tempfile::tempdir().unwrap();
    let root = t.path().join("root");
    let bins = bin_dir(t.path());
    let lab = repo_root().join("scripts/install-lab-host.sh");
    let recv = repo_root().join("scripts/install-receiver.sh");
    let args = [
        "--root",
        root.to_str().unwrap(),
        "--bin-dir",
        bins.to_str().unwrap(),
    ];

    let (code, out) = script(&lab, &args);
    assert_eq!(code, 0, "{out}");
    for p in [
        "opt/cis490/bin/cis490-shipper",
        "opt/cis490/scripts/install-lab-host.sh",
        "etc/cis490/lab-host.toml",
        "etc/systemd/system/cis490-shipper.service",
        "var/lib/cis490/episodes",
        "var/lib/cis490/quarantine",
    ] {
        assert!(root.join(p).exists(), "{p} missing after install:\n{out}");
    }
    assert_eq!(
        std::fs::read(root.join("etc/systemd/system/cis490-shipper.service")).unwrap(),
        std::fs::read(repo_root().join("etc/cis490-shipper.service")).unwrap()
    );
    let (code, out) = script(&recv, &args);
    assert_eq!(code, 0, "{out}");
    assert!(root.join("opt/cis490/bin/cis490-receiver").exists());
    assert!(root.join("etc/cis490/receiver.toml").exists());

    // Point the lab host at a data dir inside the root and leave an unstamped episode there.
    let data = root.join("var/lib/cis490");
    let cfg = root.join("etc/cis490/lab-host.toml");
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace(
            "data_dir = \"/var/lib/cis490\"",
            &format!("data_dir = \"{}\"", data.display()),
        )
        .replace("settle_s = 5", "settle_s = 0");
    std::fs::write(&cfg, &text).unwrap();
    std::fs::create_dir_all(data.join("episodes/ep-nostamp")).unwrap();
    std::fs::write(data.join("episodes/ep-nostamp/meta.json"), b"{}").unwrap();
    let (code, out) = script(&lab, &args);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("quarantined 1"), "{out}");
    assert!(data
        .join("quarantine/ep-nostamp/quarantine_reason.json")
        .exists());
    assert_eq!(
        std::fs::read_to_string(&cfg).unwrap(),
        text,
        "an existing config is kept"
    );

    // Second runs change nothing at all, also when run from inside the install root.
    let before = snapshot(&root);
    let (code, out) = script(&lab, &args);
    assert_eq!(code, 0, "{out}");
    assert!(out.trim_end().ends_with("done: nothing changed"), "{out}");
    let (code, out) = script(&recv, &args);
    assert!(
        code == 0 && out.trim_end().ends_with("done: nothing changed"),
        "{out}"
    );
    let (code, out) = script(&root.join("opt/cis490/scripts/install-lab-host.sh"), &args);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("running from the install root"), "{out}");
    assert!(out.trim_end().ends_with("done: nothing changed"), "{out}");
    assert_eq!(snapshot(&root), before, "a second run touched files");

    let (code, out) = script(&lab, &["--bogus"]);
    assert_ne!(code, 0);
    assert!(out.contains("unknown argument --bogus"), "{out}");

    // A missing prerequisite is named, and nothing is installed.
    let path = t.path().join("path-without-git");
    std::fs::create_dir_all(&path).unwrap();
    for tool in [
        "bash",
        "tar",
        "install",
        "cmp",
        "sha256sum",
        "find",
        "sort",
        "xargs",
        "comm",
        "cut",
        "sed",
        "realpath",
        "mkdir",
        "id",
        "getent",
        "stat",
        "dirname",
        "cat",
        "rm",
        "mv",
        "cargo",
    ] {
        if let Ok(p) = which(tool) {
            std::os::unix::fs::symlink(p, path.join(tool)).unwrap();
        }
    }
    let fresh = t.path().join("fresh-root");
    let out = Command::new(path.join("bash"))
        .arg(&lab)
        .args(["--root", fresh.to_str().unwrap()])
        .env("PATH", &path)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stderr);
    assert_ne!(out.status.code(), Some(0));
    assert!(text.contains("missing prerequisites: git"), "{text}");
    assert!(
        !fresh.exists(),
        "nothing installed without the prerequisites"
    );
}

fn which(tool: &str) -> Result<PathBuf, ()> {
    let out = Command::new("bash")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .map_err(|_| ())?;
    let p = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if p.starts_with('/') {
        Ok(PathBuf::from(p))
    } else {
        Err(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smoke_test_passes_or_names_the_fix() {
    let w = World::new(3);
    let r = start(
        &w,
        &format!(
            "[version_gate]\nrepo_path = \"{}\"\nwindow = 2\n",
            w.repo.path.display()
        ),
    )
    .await;
    let cfg = w.shipper_config(
        "labhost-01",
        &format!("https://localhost:{}", r.addr.port()),
        "",
    );
    let smoke = repo_root().join("scripts/smoke-test.sh");
    let run = |commit: String, cfg: PathBuf| {
        let smoke = smoke.clone();
        tokio::task::spawn_blocking(move || {
            let out = Command::new("bash")
                .arg(&smoke)
                .args(["--config", cfg.to_str().unwrap(), "--commit", &commit])
                .env("CIS490_SHIPPER", bin("e2e-shipper"))
                .output()
                .unwrap();
            (
                out.status.code().unwrap_or(-1),
                String::from_utf8_lossy(&out.stdout).into_owned(),
            )
        })
    };
    let (code, out) = run(w.commits[2].clone(), cfg.clone()).await.unwrap();
    assert_eq!(code, 0, "{out}");
    assert!(
        out.trim_end()
            .ends_with("PASS: the receiver knows this host and admits its commit"),
        "{out}"
    );
    let (code, out) = run(w.commits[0].clone(), cfg.clone()).await.unwrap();
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("FAIL: this host's code is out of date"),
        "{out}"
    );
    assert!(out.contains("git pull origin main"), "{out}");
    let wrong = w.shipper_config_with(
        "labhost-01",
        &w.pki.client("labhost-02"),
        &format!("https://localhost:{}", r.addr.port()),
        "",
    );
    let (code, out) = run(w.commits[2].clone(), wrong).await.unwrap();
    assert_eq!(code, 1);
    assert!(
        out.contains("FAIL: the certificate belongs to another host"),
        "{out}"
    );
    let rogue = cis490_tests::pki::Pki::new(&w.path().join("rogue"), "rogue");
    let text = std::fs::read_to_string(&cfg).unwrap().replace(
        w.pki.ca_file.to_str().unwrap(),
        rogue.ca_file.to_str().unwrap(),
    );
    let wrong_ca = w.path().join("wrong-ca.toml");
    std::fs::write(&wrong_ca, text).unwrap();
    let (code, out) = run(w.commits[2].clone(), wrong_ca).await.unwrap();
    assert_eq!(code, 1);
    assert!(
        out.contains("FAIL: TLS")
            && out.contains("receiver.ca_file (")
            && out.contains(rogue.ca_file.to_str().unwrap()),
        "{out}"
    );
    r.stop().await;
    let (code, out) = run(w.commits[2].clone(), cfg).await.unwrap();
    assert_eq!(code, 1);
    assert!(
        out.contains("FAIL: the receiver cannot be reached; fix: check receiver.url"),
        "{out}"
    );
    let _ = episode::body;
}
