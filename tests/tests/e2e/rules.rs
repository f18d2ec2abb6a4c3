//! The Prometheus alerting rules (SPEC §11, §14): `promtool check rules`, `promtool test rules`,
//! and a scan of the files so that a misspelt metric name or a rule without a runbook fails here
//! rather than staying silent in production.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

const RULES: &str = "etc/prometheus/cis490-rules.yml";
const RULE_TESTS: &str = "etc/prometheus/cis490-rules.test.yml";

/// Every alert the rules file must define, and nothing else.
const ALERTS: &[&str] = &[
    "Cis490HostStale",
    "Cis490HostRejecting",
    "Cis490HostUnauthorized",
    "Cis490HostSilent",
    "Cis490HostCertExpiring",
    "Cis490ReceiverDown",
    "Cis490ReceiverUnhealthy",
    "Cis490GateListStale",
    "Cis490GateOnGitFallback",
    "Cis490ReceiverQuarantineRising",
    "Cis490ReceiverBinaryStale",
    "Cis490ReceiverCertExpiring",
    "Cis490ShipperDown",
    "Cis490ShipperBacklog",
    "Cis490ShipperStuck",
    "Cis490ShipperBinaryStale",
    "Cis490ShipperCertExpiring",
];

/// The metric names SPEC defines (§3, §11, §12, §13, §14, §15). The rules may use only these, so
/// they hold for any build that meets the SPEC; a name not listed here is a typo.
const SPEC_METRICS: &[&str] = &[
    // §3
    "cis490_receiver_uploads_total",
    "cis490_receiver_stored_bytes_total",
    "cis490_receiver_uploads_in_flight",
    "cis490_gate_commits",
    "cis490_gate_age_seconds",
    "cis490_gate_source",
    "cis490_gate_refresh_failures_total",
    "cis490_receiver_quarantine_bytes",
    // §11
    "cis490_fleet_host_last_seen_timestamp_seconds",
    "cis490_fleet_host_last_stored_timestamp_seconds",
    "cis490_fleet_host_stale",
    "cis490_fleet_host_rejections_total",
    "cis490_receiver_binary_stale",
    "cis490_receiver_build_info",
    // §12
    "cis490_shipper_episodes",
    "cis490_shipper_oldest_queued_age_seconds",
    "cis490_shipper_shipped_total",
    "cis490_shipper_shipped_bytes_total",
    "cis490_shipper_rejected_total",
    "cis490_shipper_transient_errors_total",
    "cis490_shipper_last_success_timestamp_seconds",
    "cis490_shipper_upload_bytes_in_flight",
    "cis490_shipper_binary_stale",
    "cis490_shipper_build_info",
    // §13
    "cis490_receiver_resumable_bytes",
    "cis490_receiver_resumed_total",
    // §14
    "cis490_receiver_cert_not_after_timestamp_seconds",
    "cis490_fleet_host_cert_not_after_timestamp_seconds",
    "cis490_shipper_cert_not_after_timestamp_seconds",
    // §15
    "cis490_receiver_scrub_checked_total",
    "cis490_receiver_scrub_problems_total",
    "cis490_receiver_scrub_last_completed_timestamp_seconds",
];

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(repo_root().join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

/// Runs promtool from the repository root; a missing promtool is a failure, not a skip.
fn promtool(args: &[&str]) -> (i32, String) {
    let out = Command::new("promtool")
        .args(args)
        .current_dir(repo_root())
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run promtool ({e}): run scripts/install-test-deps.sh \
                 (it installs the Debian package prometheus, which ships promtool)"
            )
        });
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), text)
}

/// `(alert name, its lines)` for every `- alert:` block of the rules file.
fn alert_blocks(text: &str) -> Vec<(String, Vec<&str>)> {
    let mut blocks: Vec<(String, Vec<&str>)> = Vec::new();
    for line in text.lines() {
        let t = line.trim_start();
        if let Some(name) = t.strip_prefix("- alert:") {
            blocks.push((name.trim().to_string(), Vec::new()));
        } else if t.starts_with("- name:") {
            // The next group: whatever follows is not part of the last alert.
            blocks.push((String::new(), Vec::new()));
        } else if let Some((_, lines)) = blocks.last_mut() {
            lines.push(line);
        }
    }
    blocks.retain(|(name, _)| !name.is_empty());
    blocks
}

/// Every `cis490_...` identifier in `text` (metric names; hyphenated program names do not match).
fn metric_names(text: &str) -> BTreeSet<String> {
    let bytes = text.as_bytes();
    let ident = |b: u8| b.is_ascii_alphanumeric() || b == b'_';
    let mut out = BTreeSet::new();
    let mut i = 0;
    while let Some(pos) = text[i..].find("cis490_") {
        let start = i + pos;
        let mut end = start;
        while end < bytes.len() && ident(bytes[end]) {
            end += 1;
        }
        // A bare "cis490_" (as in "cis490_*" in prose) names no metric.
        if (start == 0 || !ident(bytes[start - 1])) && end > start + "cis490_".len() {
            out.insert(text[start..end].to_string());
        }
        i = end;
    }
    out
}

#[test]
fn rules_pass_promtool_check() {
    let (code, out) = promtool(&["check", "rules", RULES]);
    assert_eq!(code, 0, "promtool check rules {RULES}:\n{out}");
    let want = format!("SUCCESS: {} rules found", ALERTS.len());
    assert!(out.contains(&want), "expected {want:?}:\n{out}");
}

#[test]
fn rules_pass_their_promtool_unit_tests() {
    let (code, out) = promtool(&["test", "rules", RULE_TESTS]);
    assert_eq!(code, 0, "promtool test rules {RULE_TESTS}:\n{out}");
    assert!(out.contains("SUCCESS"), "{out}");
    assert!(!out.contains("FAILED"), "{out}");
}

#[test]
fn every_rule_has_severity_summary_runbook_and_spec_metric_names() {
    let text = read(RULES);
    let blocks = alert_blocks(&text);
    let names: Vec<&str> = blocks.iter().map(|(n, _)| n.as_str()).collect();
    let got: BTreeSet<&str> = names.iter().copied().collect();
    assert_eq!(got.len(), names.len(), "an alert name repeats: {names:?}");
    assert_eq!(
        got,
        ALERTS.iter().copied().collect::<BTreeSet<_>>(),
        "alerts in {RULES}"
    );
    for (name, lines) in &blocks {
        let has = |key: &str| lines.iter().any(|l| l.trim_start().starts_with(key));
        assert!(has("expr:"), "{name}: no expr");
        assert!(
            lines.iter().any(|l| {
                let t = l.trim();
                t == "severity: warning" || t == "severity: critical"
            }),
            "{name}: needs labels.severity warning or critical"
        );
        assert!(has("summary:"), "{name}: no summary annotation");
        let runbook = lines
            .iter()
            .find(|l| l.trim_start().starts_with("runbook:"))
            .unwrap_or_else(|| panic!("{name}: no runbook annotation"));
        assert!(
            runbook.contains("cis490") || runbook.contains("systemctl"),
            "{name}: the runbook names no command: {runbook}"
        );
    }

    let known: BTreeSet<&str> = SPEC_METRICS.iter().copied().collect();
    for (file, text) in [(RULES, text.clone()), (RULE_TESTS, read(RULE_TESTS))] {
        let unknown: Vec<String> = metric_names(&text)
            .into_iter()
            .filter(|m| !known.contains(m.as_str()))
            .collect();
        assert!(
            unknown.is_empty(),
            "{file} uses metric names the SPEC does not define (typo?): {unknown:?}"
        );
    }
}

#[test]
fn every_alert_has_a_firing_and_a_quiet_unit_test() {
    let text = read(RULE_TESTS);
    let lines: Vec<&str> = text.lines().map(str::trim).collect();
    let mut fires = BTreeSet::new();
    let mut quiet = BTreeSet::new();
    for (i, line) in lines.iter().enumerate() {
        let Some(name) = line.strip_prefix("alertname:") else {
            continue;
        };
        let name = name.trim().to_string();
        match lines.get(i + 1).copied() {
            Some("exp_alerts: []") => quiet.insert(name),
            Some("exp_alerts:") => fires.insert(name),
            other => panic!(
                "{RULE_TESTS}: `alertname: {name}` must be followed by exp_alerts, got {other:?}"
            ),
        };
    }
    for alert in ALERTS {
        assert!(
            fires.contains(*alert),
            "{alert}: no unit test in which it fires"
        );
        assert!(
            quiet.contains(*alert),
            "{alert}: no unit test in which it must not fire"
        );
    }
    let all: BTreeSet<&str> = ALERTS.iter().copied().collect();
    for name in fires.iter().chain(&quiet) {
        assert!(
            all.contains(name.as_str()),
            "{RULE_TESTS} tests an unknown alert {name}"
        );
    }
}

#[test]
fn metric_name_scan_finds_names_and_skips_program_names() {
    let found = metric_names(
        "up{job=\"cis490-receiver\"} and cis490_gate_age_seconds > 3 or x_cis490_no, cis490_*",
    );
    assert_eq!(
        found.into_iter().collect::<Vec<_>>(),
        vec!["cis490_gate_age_seconds".to_string()]
    );
}

/// The sample names a `/metrics` text exposes (family names are on `# TYPE` lines; samples
/// carry the `_total`, `_bucket`, ... forms the rules use).
fn exposed_names(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(str::to_string)
        .collect()
}

/// Every `cis490_*` name an alert uses is exported by the running daemons, so renaming a
/// metric cannot silently disable an alert: a real receiver (with a host that stored an
/// episode and was refused one) and a real shipper daemon are scraped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_the_rules_use_is_exported_by_the_running_daemons() {
    use cis490_tests::episode;
    use cis490_tests::harness::{ops_get, World};
    use std::time::{Duration, Instant};

    let w = World::new(3);
    let r = crate::support::start(&w, "").await;
    let c = w.client(r.addr, "lab-01");
    let src = w.path().join("src");
    let b = episode::body(&src, "ep-1", &w.commits[2], 2_000);
    assert_eq!(c.put("lab-01", &b).await.status, 201);
    let old = episode::body(&src, "ep-old", &"0".repeat(40), 1_000);
    assert_eq!(c.put("lab-01", &old).await.status, 412);
    let (_, receiver) = r.ops_get("/metrics").await;

    let port = crate::support::free_port();
    let url = format!("https://localhost:{}", r.addr.port());
    let cfg = w.shipper_config(
        "lab-02",
        &url,
        &format!("[metrics]\nlisten = \"127.0.0.1:{port}\"\n"),
    );
    std::fs::create_dir_all(w.data_dir("lab-02").join("episodes")).unwrap();
    let mut shipper = crate::support::spawn_shipper(&cfg);
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let shipper_text = loop {
        if let Ok(Ok(_)) = tokio::time::timeout(
            Duration::from_millis(500),
            tokio::net::TcpStream::connect(addr),
        )
        .await
        {
            let (status, text) = ops_get(addr, "/metrics").await;
            if status == 200 && text.contains("cis490_shipper_episodes") {
                break text;
            }
        }
        assert!(
            Instant::now() < deadline,
            "the shipper's /metrics never answered"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let _ = shipper.kill();
    let _ = shipper.wait();
    r.stop().await;

    let mut exported = exposed_names(&receiver);
    exported.extend(exposed_names(&shipper_text));
    let used = metric_names(&read(RULES));
    let missing: Vec<&String> = used.iter().filter(|n| !exported.contains(*n)).collect();
    assert!(
        missing.is_empty(),
        "the rules use names no daemon exports: {missing:?}\nexported: {exported:?}"
    );
    assert!(
        used.len() >= 12,
        "the scan found the rules' names: {used:?}"
    );
}
