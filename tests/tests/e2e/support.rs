//! Helpers shared by the test modules.

use std::path::Path;

use cis490_tests::harness::{metric, InProcess, World};

/// Files under `dir`, recursively, as paths relative to it (sorted).
pub fn files_under(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    fn walk(base: &Path, d: &Path, out: &mut Vec<String>) {
        let Ok(rd) = std::fs::read_dir(d) else { return };
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                walk(base, &p, out);
            } else {
                out.push(p.strip_prefix(base).unwrap().to_string_lossy().into_owned());
            }
        }
    }
    walk(dir, dir, &mut out);
    out.sort();
    out
}

pub fn index_rows(store: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(store.join("index.jsonl"))
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

pub async fn metric_value(r: &InProcess, series: &str) -> f64 {
    let (_, text) = r.ops_get("/metrics").await;
    metric(&text, series).unwrap_or(0.0)
}

pub async fn start(world: &World, extra: &str) -> InProcess {
    InProcess::start(&world.config(extra)).await
}

/// A loopback port free right now (for configs that need a fixed port across restarts).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `e2e-shipper run` as a quiet child process, for tests that SIGKILL it.
pub fn spawn_shipper(cfg: &Path) -> std::process::Child {
    std::process::Command::new(cis490_tests::harness::shipper_bin())
        .arg("--config")
        .arg(cfg)
        .arg("run")
        .env("CIS490_LOG", "warn")
        .env_remove("NOTIFY_SOCKET")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap()
}

/// `doctor`'s exit code as the test would see it on a roomy disk. The disk row is the one row
/// whose colour depends on the machine rather than on the test: when `statvfs` of `dir` shows
/// what doctor calls low (under 1 GiB or 2 % free), that row must be red, and only that row is
/// discounted; every other red row still makes the answer 1.
pub fn doctor_code_on_roomy_disk(code: i32, out: &str, dir: &Path) -> i32 {
    let st = nix::sys::statvfs::statvfs(dir).unwrap();
    let free = st.blocks_available() * st.fragment_size();
    let total = (st.blocks() * st.fragment_size()).max(1);
    let low = free < (1 << 30) || (free as f64 * 100.0 / total as f64) < 2.0;
    if !low {
        return code;
    }
    assert!(
        out.lines()
            .any(|l| l.starts_with("FAIL") && l.contains(" disk ")),
        "the disk is low, so doctor's disk row must be red:\n{out}"
    );
    let other_red = out
        .lines()
        .any(|l| l.starts_with("FAIL") && !l.contains(" disk "));
    i32::from(other_red)
}
